"""The two queries on every chat request, for SQLite: one thread hop per operation.

Through SQLAlchemy's async engine every statement is several hops to aiosqlite's thread
(execute, fetch, close, begin, rollback), and on this hot path that cost dominated the
gateway: 1.2 ms of CPU to read a history, 2.0 ms to commit a turn (measured with
``benchmarks``).  Here each operation is one function run on a database thread that owns
its ``sqlite3`` connection, with the same SQL the SQLAlchemy models define and the same
JSON encoding SQLAlchemy's ``JSON`` type uses, so both paths read each other's rows.
The event loop never waits on the file: a writer that waits for another process's lock
waits on the writer thread.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

__all__ = ["SQLiteTurns"]

T = TypeVar("T")

_FIND = "SELECT pk, system_prompt FROM conversations WHERE tenant = ? AND user_id = ? AND id = ?"
_WINDOW = (
    "SELECT role, content, name, tool_calls, tool_call_id FROM messages"
    " WHERE conversation_pk = ? ORDER BY seq DESC LIMIT ?"
)
_UPSERT = (
    "INSERT INTO conversations (id, tenant, user_id, system_prompt, last_seq, created_at,"
    " updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (tenant, user_id, id) DO UPDATE SET last_seq = last_seq + excluded.last_seq,"
    " updated_at = excluded.updated_at,"
    " system_prompt = coalesce(excluded.system_prompt, system_prompt)"
    " RETURNING pk, last_seq"
)
_INSERT = (
    "INSERT INTO messages (conversation_pk, seq, role, content, name, tool_calls, tool_call_id,"
    " reasoning, model, finish_reason, usage, created_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def _dump(value: Any) -> str | None:
    return None if value is None else json.dumps(value)


def _load(value: str | None) -> Any:
    return None if value is None else json.loads(value)


class SQLiteTurns:
    """``load_window`` and ``append_turn`` on one SQLite file.

    One reader thread and one writer thread, each with its own connection (WAL lets the
    reader run while the writer writes); the writer starts every transaction with
    ``BEGIN IMMEDIATE``, so concurrent writers in other processes wait for the lock
    (``busy_timeout``) instead of failing with "database is locked".
    """

    def __init__(self, path: str, busy_timeout_ms: int) -> None:
        self._path = path
        self._busy_timeout_ms = busy_timeout_ms
        self._local = threading.local()
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="chatmem-sqlite-read")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="chatmem-sqlite-write")

    def _connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(
                self._path,
                timeout=self._busy_timeout_ms / 1000,
                isolation_level=None,
                check_same_thread=False,
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute(f"PRAGMA busy_timeout={int(self._busy_timeout_ms)}")
            self._local.conn = conn
        return conn

    async def _run(self, executor: ThreadPoolExecutor, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)

    async def load_window(
        self, tenant: str, user: str, conversation_id: str, limit: int
    ) -> tuple[bool, Any, list[dict[str, Any]]]:
        """(found, system prompt, newest ``limit`` messages oldest first)."""
        return await self._run(
            self._reader, self._load_window, tenant, user, conversation_id, limit
        )

    def _load_window(
        self, tenant: str, user: str, conversation_id: str, limit: int
    ) -> tuple[bool, Any, list[dict[str, Any]]]:
        conn = self._connection()
        conn.execute("BEGIN")  # one snapshot for both statements
        try:
            found = conn.execute(_FIND, (tenant, user, conversation_id)).fetchone()
            if found is None:
                return False, None, []
            rows = conn.execute(_WINDOW, (found[0], limit)).fetchall()
        finally:
            conn.execute("COMMIT")
        window = []
        for role, content, name, tool_calls, tool_call_id in reversed(rows):
            message: dict[str, Any] = {"role": role, "content": _load(content)}
            if name is not None:
                message["name"] = name
            if tool_calls is not None:
                message["tool_calls"] = _load(tool_calls)
            if tool_call_id is not None:
                message["tool_call_id"] = tool_call_id
            window.append(message)
        return True, _load(found[1]), window

    async def append_turn(
        self,
        tenant: str,
        user: str,
        conversation_id: str,
        system: Any,
        turn: Sequence[dict[str, Any]],
        now: int,
    ) -> None:
        await self._run(
            self._writer, self._append_turn, tenant, user, conversation_id, system, turn, now
        )

    def _append_turn(
        self,
        tenant: str,
        user: str,
        conversation_id: str,
        system: Any,
        turn: Sequence[dict[str, Any]],
        now: int,
    ) -> None:
        conn = self._connection()
        count = len(turn)
        conn.execute("BEGIN IMMEDIATE")
        try:
            pk, last_seq = conn.execute(
                _UPSERT,
                (conversation_id, tenant, user, _dump(system), count, now, now),
            ).fetchone()
            first = last_seq - count + 1
            conn.executemany(
                _INSERT,
                [
                    (
                        pk,
                        first + offset,
                        m["role"],
                        _dump(m.get("content")),
                        m.get("name"),
                        _dump(m.get("tool_calls")),
                        m.get("tool_call_id"),
                        m.get("reasoning"),
                        m.get("model"),
                        m.get("finish_reason"),
                        _dump(m.get("usage")),
                        now,
                    )
                    for offset, m in enumerate(turn)
                ],
            )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        for executor in (self._reader, self._writer):
            executor.submit(self._close_connection).result()
            executor.shutdown(wait=True)

    def _close_connection(self) -> None:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
