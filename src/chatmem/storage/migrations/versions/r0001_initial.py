"""The first schema: conversations and their messages.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

Json = sa.JSON(none_as_null=True)


def upgrade() -> None:
    op.create_table(
        "conversations",
        sa.Column("pk", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(128), nullable=False),
        sa.Column("tenant", sa.String(255), nullable=False),
        sa.Column("user_id", sa.String(255), nullable=False),
        sa.Column("system_prompt", Json, nullable=True),
        sa.Column("metadata", Json, nullable=True),
        sa.Column("last_seq", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.Integer(), nullable=False),
        sa.UniqueConstraint("tenant", "user_id", "id", name="uq_conversations_owner_id"),
    )
    op.create_index(
        "ix_conversations_owner_created",
        "conversations",
        ["tenant", "user_id", "created_at", "pk"],
    )
    op.create_table(
        "messages",
        sa.Column("pk", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column(
            "conversation_pk",
            sa.Integer(),
            sa.ForeignKey("conversations.pk", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("role", sa.String(32), nullable=False),
        sa.Column("content", Json, nullable=True),
        sa.Column("name", sa.String(255), nullable=True),
        sa.Column("tool_calls", Json, nullable=True),
        sa.Column("tool_call_id", sa.String(255), nullable=True),
        sa.Column("reasoning", sa.Text(), nullable=True),
        sa.Column("model", sa.String(255), nullable=True),
        sa.Column("finish_reason", sa.String(64), nullable=True),
        sa.Column("usage", Json, nullable=True),
        sa.Column("created_at", sa.Integer(), nullable=False),
        sa.UniqueConstraint("conversation_pk", "seq", name="uq_messages_seq"),
    )


def downgrade() -> None:
    op.drop_table("messages")
    op.drop_index("ix_conversations_owner_created", table_name="conversations")
    op.drop_table("conversations")
