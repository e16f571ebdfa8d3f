"""The two tables every query reads (conversations and messages; SQLite's history blocks
are ``blocks``'s alone) and what those queries share: whose a conversation is, a message
as a row, and a walk over a conversation's messages."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import CursorResult, Executable, Text, and_, cast, func, select

from ..config import ResendReasoning
from .schema import Base, Conversation, Message

__all__ = [
    "RESULT_ROLES",
    "Executes",
    "Owner",
    "conversations",
    "item_size",
    "messages",
    "owned",
    "resends_reasoning",
    "resent_reasoning",
    "stored_size",
    "tail_before",
    "to_row",
    "walk",
]


class Executes(Protocol):
    """What the Conversations API's work asks of a connection: SQLAlchemy's
    ``AsyncConnection``, or an :class:`InlineConnection`."""

    async def execute(
        self, statement: Executable, parameters: Any = None
    ) -> CursorResult[*tuple[Any, ...]]:
        """Run ``statement``; its rows come back buffered."""


conversations = Base.metadata.tables[Conversation.__tablename__]
messages = Base.metadata.tables[Message.__tablename__]

stored_size = func.coalesce(func.length(cast(messages.c.content, Text)), 0) + func.coalesce(
    func.length(cast(messages.c.tool_calls, Text)), 0
)
"""A message's size in SQL: its content's and tool calls' JSON text (a lower bound of its
text as sent), so that pages and budgets read sizes before rows."""

item_size = stored_size + func.coalesce(func.length(messages.c.reasoning), 0)
"""A message's size as an item of the Conversations API, which shows its reasoning too (a
reasoning model's answer can hold far more of that than of content)."""


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


RESULT_ROLES = frozenset({"tool", "function"})  # "function": the deprecated function_call's


_RESULT_ROLES_SQL = "(" + ", ".join(f"'{role}'" for role in sorted(RESULT_ROLES)) + ")"


def resends_reasoning(
    mode: ResendReasoning, role: str, has_calls: bool, previous_role: str | None
) -> bool:
    """Whether a stored message's reasoning goes upstream again with it, as
    ``reasoning_content`` (``memory.resend_reasoning``): an assistant message's, with
    "tool_turns" when it made tool calls or answers tool results (the message before it,
    ``previous_role``, is one).  :func:`resent_reasoning` says the same in SQL."""
    if role != "assistant" or mode == "never":
        return False
    return mode == "always" or has_calls or previous_role in RESULT_ROLES


def resent_reasoning(mode: ResendReasoning) -> str:
    """:func:`resends_reasoning` as a column of a query of ``messages`` (not aliased):
    the reasoning to send with the row's message, or NULL.  The message before it is
    looked up only for an assistant message with reasoning and no tool calls."""
    if mode == "never":
        return "NULL"
    if mode == "always":
        return "CASE WHEN role = 'assistant' THEN reasoning END"
    return (
        "CASE WHEN reasoning IS NOT NULL AND role = 'assistant' AND (tool_calls IS NOT NULL"
        " OR (SELECT earlier.role FROM messages AS earlier"
        " WHERE earlier.conversation_pk = messages.conversation_pk"
        " AND earlier.seq < messages.seq ORDER BY earlier.seq DESC LIMIT 1)"
        f" IN {_RESULT_ROLES_SQL}) THEN reasoning END"
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
    conn: Executes, columns: Sequence[Any], ours: Any, seq: int | None, *, newer: bool
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


async def tail_before(conn: Executes, ours: Any, seq: int) -> tuple[int | None, list[Any]]:
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
