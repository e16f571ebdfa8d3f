"""Index conversations by updated_at, so retention can find old ones without a scan.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # IF NOT EXISTS: a database adopted from before migrations may have been made from
    # models that already had this index.
    op.create_index("ix_conversations_updated", "conversations", ["updated_at"], if_not_exists=True)


def downgrade() -> None:
    op.drop_index("ix_conversations_updated", table_name="conversations")
