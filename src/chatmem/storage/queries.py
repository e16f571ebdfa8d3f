"""Every query chatmem makes, behind one small class."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row, delete, insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ..errors import StorageUnavailable
from .engine import WRITE, is_sqlite
from .schema import Base, Conversation, Message
from .sqlite_turns import SQLiteTurns

__all__ = ["History", "Owner", "Store"]

conversations = Base.metadata.tables[Conversation.__tablename__]
messages = Base.metadata.tables[Message.__tablename__]

# Fields of a chat message that are stored and sent back upstream as history.
_WIRE_FIELDS = ("name", "tool_calls", "tool_call_id")


@dataclass(frozen=True, slots=True)
class Owner:
    """Who a conversation belongs to.  ``user`` is "" when the identity has no user."""

    tenant: str
    user: str = ""


@dataclass(frozen=True, slots=True)
class History:
    """What is stored for a conversation, ready to be sent upstream."""

    system: list[dict[str, Any]] | None
    messages: list[dict[str, Any]]


def _to_wire(row: Row[Any]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": row.role, "content": row.content}
    for name in _WIRE_FIELDS:
        value = getattr(row, name)
        if value is not None:
            message[name] = value
    return message


def _to_row(message: dict[str, Any], now: int) -> dict[str, Any]:
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


def drop_orphan_tool_results(window: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A history window must not start with tool results whose call was cut off."""
    start = 0
    while start < len(window) and window[start]["role"] == "tool":
        start += 1
    return window[start:] if start else window


class Store:
    """The conversation store.  One instance per engine, safe to share between tasks:
    every method opens its own short connection and never holds one across a stream."""

    def __init__(
        self, engine: AsyncEngine, *, busy_timeout_ms: int = 30_000, sqlite_one_hop: bool = True
    ) -> None:
        self.engine = engine
        self._sqlite = is_sqlite(engine)
        # The per-request queries on a SQLite file take the one-hop path (see sqlite_turns).
        database = engine.url.database
        self._turns = (
            SQLiteTurns(database, busy_timeout_ms)
            if sqlite_one_hop and self._sqlite and database and database != ":memory:"
            else None
        )
        # One writer at a time per process on SQLite: waiting here is cheaper than
        # waiting on the file lock, which stays for writers in other processes.
        self._write_lock = asyncio.Lock() if self._sqlite else None
        self._insert = sqlite.insert if self._sqlite else postgresql.insert

    async def create_schema(self) -> None:
        async with self.engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)

    async def close(self) -> None:
        if self._turns is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._turns.close)
        await self.engine.dispose()

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[AsyncConnection]:
        try:
            async with self.engine.connect() as conn:
                yield conn
        except (OperationalError, InterfaceError, PoolTimeout, OSError) as exc:
            raise StorageUnavailable("the conversation store is unavailable") from exc

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncConnection]:
        try:
            if self._write_lock is None:
                async with self.engine.begin() as conn:
                    yield conn
                return
            async with self._write_lock, self.engine.connect() as conn:
                await conn.execution_options(**{WRITE: True})
                async with conn.begin():
                    yield conn
        except (OperationalError, InterfaceError, PoolTimeout, OSError) as exc:
            raise StorageUnavailable("the conversation store is unavailable") from exc
        except DBAPIError as exc:
            if exc.connection_invalidated:
                raise StorageUnavailable("the conversation store is unavailable") from exc
            raise

    async def ping(self) -> None:
        """Prove the database answers and holds our schema; :class:`StorageUnavailable` if not."""
        async with self._read() as conn:
            await conn.execute(select(conversations.c.pk).limit(1))

    async def load_history(self, owner: Owner, conversation_id: str, limit: int) -> History:
        """The stored system prompt and the newest ``limit`` messages, oldest first."""
        if self._turns is not None:
            try:
                exists, system, window = await self._turns.load_window(
                    owner.tenant, owner.user, conversation_id, limit
                )
            except sqlite3.Error as exc:
                raise StorageUnavailable("the conversation store is unavailable") from exc
            if not exists:
                return History(system=None, messages=[])
            return History(system=system, messages=drop_orphan_tool_results(window))
        async with self._read() as conn:
            found = (
                await conn.execute(
                    select(conversations.c.pk, conversations.c.system_prompt).where(
                        conversations.c.tenant == owner.tenant,
                        conversations.c.user_id == owner.user,
                        conversations.c.id == conversation_id,
                    )
                )
            ).first()
            if found is None:
                return History(system=None, messages=[])
            rows = (
                await conn.execute(
                    select(
                        messages.c.role,
                        messages.c.content,
                        *(messages.c[name] for name in _WIRE_FIELDS),
                    )
                    .where(messages.c.conversation_pk == found.pk)
                    .order_by(messages.c.seq.desc())
                    .limit(limit)
                )
            ).all()
        window = [_to_wire(row) for row in reversed(rows)]
        return History(system=found.system_prompt, messages=drop_orphan_tool_results(window))

    async def commit_turn(
        self,
        owner: Owner,
        conversation_id: str,
        *,
        system: list[dict[str, Any]] | None,
        turn: Sequence[dict[str, Any]],
    ) -> None:
        """Append one turn (the request's messages and the answer) in one transaction.

        The upsert creates the conversation if needed and reserves the turn's sequence
        numbers by bumping ``last_seq``; it locks the conversation row until commit, so
        concurrent turns of one conversation are serialised and never interleave.
        ``system``, when given, replaces the stored system prompt.
        """
        now = int(time.time())
        if self._turns is not None:
            try:
                await self._turns.append_turn(
                    owner.tenant, owner.user, conversation_id, system, turn, now
                )
            except sqlite3.Error as exc:
                raise StorageUnavailable("the conversation store is unavailable") from exc
            return
        count = len(turn)
        upsert = self._insert(conversations).values(
            id=conversation_id,
            tenant=owner.tenant,
            user_id=owner.user,
            system_prompt=system,
            last_seq=count,
            created_at=now,
            updated_at=now,
        )
        changes: dict[str, Any] = {
            "last_seq": conversations.c.last_seq + count,
            "updated_at": now,
        }
        if system is not None:
            changes["system_prompt"] = upsert.excluded.system_prompt
        stmt = upsert.on_conflict_do_update(
            index_elements=["tenant", "user_id", "id"], set_=changes
        ).returning(conversations.c.pk, conversations.c.last_seq)
        async with self._write() as conn:
            pk, last_seq = (await conn.execute(stmt)).one()
            first = last_seq - count + 1
            rows = [
                {**_to_row(message, now), "conversation_pk": pk, "seq": first + offset}
                for offset, message in enumerate(turn)
            ]
            if rows:
                await conn.execute(insert(messages), rows)

    async def delete_conversation(self, owner: Owner, conversation_id: str) -> bool:
        async with self._write() as conn:
            result = await conn.execute(
                delete(conversations).where(
                    conversations.c.tenant == owner.tenant,
                    conversations.c.user_id == owner.user,
                    conversations.c.id == conversation_id,
                )
            )
        return bool(result.rowcount)
