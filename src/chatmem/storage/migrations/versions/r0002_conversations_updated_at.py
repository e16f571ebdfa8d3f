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
    op.create_index("ix_conversations_updated", "conversations", ["updated_at"])


def downgrade() -> None:
    op.drop_index("ix_conversations_updated", table_name="conversations")
