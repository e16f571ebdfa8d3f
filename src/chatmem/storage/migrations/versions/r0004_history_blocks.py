"""History blocks: a long conversation's window read in a few rows (``storage.blocks``).

A new table, filled by SQLite's chat turns as conversations go on; conversations stored
before it get blocks as they grow.  On PostgreSQL it stays empty.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # IF NOT EXISTS: a database adopted from before migrations may have been made from
    # models that already had this table.
    op.create_table(
        "history_blocks",
        sa.Column(
            "conversation_pk",
            sa.Integer(),
            sa.ForeignKey("conversations.pk", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("last_seq", sa.Integer(), primary_key=True),
        sa.Column("first_seq", sa.Integer(), nullable=False),
        sa.Column("resend", sa.String(16), nullable=False),
        sa.Column("roles", sa.LargeBinary(), nullable=False),
        sa.Column("ends", sa.LargeBinary(), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        if_not_exists=True,
    )


def downgrade() -> None:
    op.drop_table("history_blocks")
