"""The two tables and what every query of them shares: whose a conversation is, a
message as a row, and a walk over a conversation's messages."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Text, and_, cast, func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from .schema import Base, Conversation, Message

__all__ = [
    "Owner",
    "conversations",
    "messages",
    "owned",
    "stored_size",
    "tail_before",
    "to_row",
    "walk",
]

conversations = Base.metadata.tables[Conversation.__tablename__]
messages = Base.metadata.tables[Message.__tablename__]

stored_size = func.coalesce(func.length(cast(messages.c.content, Text)), 0) + func.coalesce(
    func.length(cast(messages.c.tool_calls, Text)), 0
)
"""A message's size in SQL: its content's and tool calls' JSON text (a lower bound of its
text as sent), so that pages and budgets read sizes before rows."""


@dataclass(frozen=True, slots=True)
class Owner:
    """Who a conversation belongs to.  ``user`` is "" when the identity has no user."""

    tenant: str
    user: str = ""


def owned(owner: Owner, conversation_id: str) -> Any:
    return and_(
        conversations.c.tenant == owner.tenant,
        conversations.c.user_id == owner.user,
        conversations.c.id == conversation_id,
    )


def to_row(message: dict[str, Any], now: int) -> dict[str, Any]:
    return {
        "role": message["role"],
        "content": message.get("content"),
        "name": message.get("name"),
        "tool_calls": message.get("tool_calls"),
        "tool_call_id": message.get("tool_call_id"),
        "reasoning": message.get("reasoning"),
        "model": message.get("model"),
        "finish_reason": message.get("finish_reason"),
        "usage": message.get("usage"),
        "created_at": now,
    }


_PAGE = 256
"""Stored messages read at a time while walking a run of tool results."""


async def walk(
    conn: AsyncConnection, columns: Sequence[Any], ours: Any, seq: int | None, *, newer: bool
) -> AsyncGenerator[Any, None]:
    """The messages after ``seq`` (``newer``, oldest first) or before it (newest first;
    ``seq`` None: from the end), read ``_PAGE`` at a time."""
    m = messages.c
    while True:
        page = select(m.seq, *columns).where(ours)
        if seq is not None:
            page = page.where(m.seq > seq if newer else m.seq < seq)
        order = m.seq if newer else m.seq.desc()
        rows = (await conn.execute(page.order_by(order).limit(_PAGE))).all()
        for row in rows:
            yield row
        if len(rows) < _PAGE:
            return
        seq = int(rows[-1].seq)


async def tail_before(conn: AsyncConnection, ours: Any, seq: int) -> tuple[int | None, list[Any]]:
    """The messages before ``seq``, newest first, back to the last that is not a tool
    result, as (role, tool_calls, tool_call_id), what :func:`pairing.open_calls` reads;
    and the seq of that last one (None: the run of results starts the conversation)."""
    m = messages.c
    tail: list[Any] = []
    columns = (m.role, m.tool_calls, m.tool_call_id)
    async with aclosing(walk(conn, columns, ours, seq, newer=False)) as rows:
        async for row in rows:
            tail.append(tuple(row[1:]))
            if row.role != "tool":
                return int(row.seq), tail
    return None, tail
