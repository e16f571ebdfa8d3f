"""History blocks keep each message's text followed by a comma (``storage.texts``).

A window is now kept as its messages' texts joined, so a block goes into it as it is,
without being cut into messages and joined again.  The blocks of 0004 have no commas:
they are dropped, both ways, since each revision's chatmem would misread the other's.
Blocks are copies of messages: long conversations are read row by row until their next
block is written, every 32 messages.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("DELETE FROM history_blocks")


def downgrade() -> None:
    op.execute("DELETE FROM history_blocks")
