"""An integrity check of the conversation store, for after a crash (``chatmem db check``).

What holds for every store, checked with plain queries:

- every message belongs to an existing conversation (no orphans);
- a conversation's sequence numbers are unique and lie in 1..last_seq (``last_seq`` only
  grows: a turn reserves its numbers by bumping it in the transaction that inserts them,
  and deleting an item bumps it by one).

On SQLite, every history block is an exact copy of the messages it holds (see
``blocks``): the window would otherwise go upstream as the block has it.

What holds besides for a store written by chat turns alone (``chat_only=True``,
``chatmem db check --chat-only``; the Conversations API may delete single items, leaving
gaps, and append items that end a conversation on any role):

- the sequence numbers run 1..last_seq without a gap;
- every turn is complete: the chat endpoint commits a turn's messages with the assistant
  message last, in one transaction, so a conversation's newest message is an assistant
  message (a half turn can only show at the end, where a crash would leave it).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3

from sqlalchemy import select

from . import blocks
from .engine import in_memory, is_sqlite
from .queries import Store
from .schema import Base, Conversation, Message

__all__ = ["check_integrity"]

conversations = Base.metadata.tables[Conversation.__tablename__]
messages = Base.metadata.tables[Message.__tablename__]


async def check_integrity(store: Store, *, chat_only: bool = False) -> list[str]:
    """Every problem found, one line each; an empty list means the store is consistent."""
    async with store.engine.connect() as conn:
        known: dict[int, tuple[str, int]] = {
            pk: (conversation_id, last_seq)
            for pk, conversation_id, last_seq in await conn.execute(
                select(conversations.c.pk, conversations.c.id, conversations.c.last_seq)
            )
        }
        rows = await conn.execute(
            select(messages.c.conversation_pk, messages.c.seq, messages.c.role).order_by(
                messages.c.conversation_pk, messages.c.seq, messages.c.pk
            )
        )
        found: dict[int, list[tuple[int, str]]] = {}
        for conversation_pk, seq, role in rows:
            found.setdefault(conversation_pk, []).append((seq, role))
    problems: list[str] = []
    for pk, orphans in found.items():
        if pk not in known:
            problems.append(f"{len(orphans)} orphan message(s) of missing conversation pk={pk}")
    copies: dict[int, list[str]] = {}
    if is_sqlite(store.engine) and store.engine.url.database and not in_memory(store.engine.url):
        for pk, problem in await asyncio.to_thread(_check_blocks, store.engine.url.database):
            copies.setdefault(pk, []).append(problem)
    for pk in copies.keys() - known.keys():
        problems.append(f"{len(copies[pk])} history block(s) of missing conversation pk={pk}")
    for pk, (conversation_id, last_seq) in known.items():
        name = f"conversation {conversation_id!r} (pk={pk})"
        found_here = _problems(last_seq, found.get(pk, []), chat_only) + copies.get(pk, [])
        problems += [f"{name}: {problem}" for problem in found_here]
    return problems


def _check_blocks(path: str) -> list[tuple[int, str]]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.text_factory = bytes  # as the gateway reads them
        return blocks.check(conn)


def _problems(last_seq: int, stored: list[tuple[int, str]], chat_only: bool) -> list[str]:
    """``stored``: the conversation's (seq, role) pairs in sequence order."""
    problems: list[str] = []
    seqs = [seq for seq, _ in stored]
    if len(set(seqs)) != len(seqs):
        problems.append("duplicate sequence numbers")
    if seqs and (seqs[0] < 1 or seqs[-1] > last_seq):
        problems.append(f"sequence numbers outside 1..last_seq ({last_seq})")
    if not chat_only:
        return problems
    if seqs != list(range(1, len(seqs) + 1)):
        problems.append(f"sequence numbers are not 1..{len(seqs)} without gaps")
    newest = seqs[-1] if seqs else 0
    if last_seq != newest:
        problems.append(f"last_seq is {last_seq}, newest message is {newest}")
    if stored and stored[-1][1] != "assistant":
        problems.append(f"ends with a {stored[-1][1]!r} message, not a complete turn")
    return problems
