"""History blocks keep each message's text followed by a comma, and the texts' sizes.

A window is now kept as its messages' texts joined (``storage.texts``), so a read puts
blocks into it as they are, without cutting them into messages and joining them again;
and the blocks a read needs are read as one, with the sizes of all their texts in one
string (``ends``, where each text ended in its block, is now ``sizes``).  The blocks of
0004 are dropped, and so are 0005's by a downgrade: each revision's chatmem would misread
the other's.  Blocks are copies of messages: a long conversation is read row by row
until its next block is written, every 32 messages.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("DELETE FROM history_blocks")
    _rename("ends", "sizes")


def downgrade() -> None:
    op.execute("DELETE FROM history_blocks")
    _rename("sizes", "ends")


def _rename(old: str, new: str) -> None:
    # A database adopted from before migrations may have been made from models that
    # already had the new name (0004 made the table only if it did not exist).
    columns = {c["name"] for c in sa.inspect(op.get_bind()).get_columns("history_blocks")}
    if old in columns:
        op.alter_column("history_blocks", old, new_column_name=new)
