"""The two queries of every turn on PostgreSQL, each one statement.

Everything else goes through SQLAlchemy's Core statements; these two go to asyncpg itself,
on a connection of the same pool (``Store`` checks it out in autocommit).  Through
SQLAlchemy a turn was five round trips (BEGIN, the read, the upsert, the insert, COMMIT)
and about 1.8 ms of the gateway's CPU, most of it SQLAlchemy's work per statement; as the
two statements below it is four round trips (the read alone; BEGIN, the write, COMMIT)
and about 0.6 ms.

The write is one statement: the upsert of the conversation takes its row lock and
reserves the turn's sequence numbers (``last_seq``), and the insert of the messages
numbers them from what it returned; concurrent turns of one conversation, from any
instance, queue on that row lock.  It runs in a transaction of its own although one
statement is atomic anyway: a write whose caller is cancelled while it waits for the
lock must be rolled back, not committed once the lock is free (asyncpg's cancel request
can arrive after the statement has finished).

The JSON columns go in as ``json.dumps`` text, as SQLAlchemy's ``JSON`` type writes them,
and come back decoded by the codec SQLAlchemy's asyncpg dialect installs on every
connection.  ``None`` is SQL NULL (the columns are ``none_as_null``).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from typing import Any

import asyncpg

from .. import jsonio
from ..config import ResendReasoning
from .faults import CONNECTION_ENDED
from .pairing import check_still_there, check_turn, overtaken
from .rows import resent_reasoning

__all__ = ["CommitUnconfirmed", "append_turn", "load_window"]

_READ = """
SELECT c.pk, c.system_prompt, c.last_seq, m.role, m.content, m.name, m.tool_calls, m.tool_call_id,
    m.reasoning_content
FROM conversations AS c
LEFT JOIN LATERAL (
    SELECT role, content, name, tool_calls, tool_call_id, {reasoning} AS reasoning_content, seq
    FROM messages
    WHERE conversation_pk = c.pk
    ORDER BY seq DESC
    LIMIT $4
) AS m ON true
WHERE c.tenant = $1 AND c.user_id = $2 AND c.id = $3
ORDER BY m.seq DESC
"""

_WRITE = """
WITH c AS (
    INSERT INTO conversations AS c
        (id, tenant, user_id, system_prompt, last_seq, created_at, updated_at)
    VALUES ($1, $2, $3, $4::json, $5, $6, $6)
    ON CONFLICT (tenant, user_id, id) DO UPDATE
    SET last_seq = c.last_seq + EXCLUDED.last_seq, updated_at = EXCLUDED.updated_at{system}
    RETURNING c.pk, c.last_seq
), m AS (
INSERT INTO messages (conversation_pk, seq, role, content, name, tool_calls, tool_call_id,
                      reasoning, model, finish_reason, usage, created_at)
SELECT c.pk, c.last_seq - $5 + m.n, m.role, m.content, m.name, m.tool_calls,
       m.tool_call_id, m.reasoning, m.model, m.finish_reason, m.usage, $6
FROM c, unnest($7::varchar[], $8::json[], $9::varchar[], $10::json[], $11::varchar[],
               $12::text[], $13::varchar[], $14::varchar[], $15::json[])
     WITH ORDINALITY AS m(role, content, name, tool_calls, tool_call_id,
                          reasoning, model, finish_reason, usage, n)
)
SELECT pk, last_seq FROM c
"""
_TAIL = """
SELECT role, tool_calls, tool_call_id FROM messages
WHERE conversation_pk = $1 AND seq <= $2 AND seq >= coalesce(
    (SELECT max(seq) FROM messages WHERE conversation_pk = $1 AND seq <= $2 AND role <> 'tool'),
    0
)
ORDER BY seq DESC
"""
_KEEP_SYSTEM = _WRITE.format(system="")
_REPLACE_SYSTEM = _WRITE.format(system=", system_prompt = EXCLUDED.system_prompt")


@functools.cache
def _read(resend_reasoning: ResendReasoning) -> str:
    return _READ.format(reasoning=resent_reasoning(resend_reasoning))


async def load_window(
    conn: asyncpg.Connection,
    tenant: str,
    user: str,
    conversation_id: str,
    limit: int,
    resend_reasoning: ResendReasoning,
) -> tuple[int, Any, list[asyncpg.Record], int]:
    """(the conversation's pk, its system prompt, its newest ``limit`` messages oldest
    first: ``role``, ``content``, ``name``, ``tool_calls``, ``tool_call_id`` and
    ``reasoning_content`` (:func:`rows.resent_reasoning`), its ``last_seq``; pk and
    ``last_seq`` 0 if it does not exist)."""
    rows = await conn.fetch(_read(resend_reasoning), tenant, user, conversation_id, limit)
    if not rows:
        return 0, None, [], 0
    # A conversation without messages is one row whose message columns are NULL.
    window = [row for row in reversed(rows) if row["role"] is not None]
    return rows[0]["pk"], rows[0]["system_prompt"], window, rows[0]["last_seq"]


async def append_turn(
    conn: asyncpg.Connection,
    tenant: str,
    user: str,
    conversation_id: str,
    system: list[dict[str, Any]] | None,
    turn: Sequence[dict[str, Any]],
    now: int,
    after: tuple[int, int] | None = None,
) -> None:
    """Create the conversation if needed (with ``system``; an existing one keeps its system
    prompt unless ``system`` is given) and append ``turn``, in one statement in its own
    transaction.  :class:`CommitUnconfirmed` if the connection failed while the COMMIT
    was on its way: the turn may be stored or not.  When another write came after
    ``after`` (the conversation's pk and ``last_seq`` when its history was read, see
    :func:`pairing.overtaken`), the turn is checked against what it now follows
    (:func:`pairing.check_turn`), under the conversation row's lock, which the upsert
    holds."""
    # Not ``async with``: a failed COMMIT must be told from a failed statement.  A write
    # that fails is never rolled back here: the caller closes the connection (see
    # ``Store._driver``), and the server rolls the transaction back.
    transaction = conn.transaction()
    await transaction.start()
    written = await conn.fetchrow(
        _KEEP_SYSTEM if system is None else _REPLACE_SYSTEM,
        conversation_id,
        tenant,
        user,
        _json(system),
        len(turn),
        now,
        [_text(message["role"]) for message in turn],
        [_json(message.get("content")) for message in turn],
        [_text(message.get("name")) for message in turn],
        [_json(message.get("tool_calls")) for message in turn],
        [_text(message.get("tool_call_id")) for message in turn],
        [_text(message.get("reasoning")) for message in turn],
        [_text(message.get("model")) for message in turn],
        [_text(message.get("finish_reason")) for message in turn],
        [_json(message.get("usage")) for message in turn],
    )
    assert written is not None  # the upsert returns its row
    before = written["last_seq"] - len(turn)
    if overtaken(after, written["pk"], before):
        check_still_there(after, written["pk"], before)
        check_turn(turn, await conn.fetch(_TAIL, written["pk"], before))
    try:
        await transaction.commit()
    # No answer: committed, or not.  (asyncpg reports a connection closed under it as a
    # PostgresConnectionError, class 08, which no server sent; a server that ends the
    # connection says 57P01, admin shutdown, and may have committed before it did.)
    except CONNECTION_ENDED as exc:  # a timeout too (an OSError): as unknown an outcome
        raise CommitUnconfirmed("the conversation store did not confirm the commit") from exc


class CommitUnconfirmed(Exception):
    """The connection failed after COMMIT was sent: whether the turn is stored is unknown."""


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value)


def _text(value: Any) -> Any:
    """A string for a text column.  What the upstream streamed may hold halves of a
    surrogate pair that arrived in two chunks (``reasoning``), which PostgreSQL cannot
    store: made text first, the pair its character and a lone half U+FFFD, as on SQLite.
    Nor can it store NUL: U+FFFD too (a client's ``name`` and ``tool_call_id`` with one
    are refused with a 400 instead: they pair a tool result with its call).
    (The JSON columns need nothing: ``json.dumps`` escapes them.)"""
    if not isinstance(value, str):
        return value
    if not jsonio.is_text(value):
        value = jsonio.utf8(value).decode()
    return value.replace("\x00", "\ufffd")
