"""The Conversations API's statements on a SQLite connection of the event loop's own,
answered within one step of the loop.

Through SQLAlchemy's async engine every statement is a hop to aiosqlite's thread and back,
and each hop waits for the next pass of the event loop: creating a conversation with its
items took 11, deleting an item 14.  Under chat that keeps the loop's core busy a pass
takes milliseconds, and a write holds SQLite's lock across all of its passes, one write
at a time: at 300 API writes a second beside such chat they queued for a second and more
(README, "The gateway's own writes and its turns").  SQLite answers these statements in
microseconds, so here the same statements run on a synchronous connection in the loop's
thread: a write is one step of the loop, with no pass, no thread and no lock held
between steps, as a turn's commit already is (``sqlite_turns``).

Only for work small enough for one step: up to ``items.INLINE_ITEMS`` items written, a
page of a list, one item deleted.  A larger import, deleting a whole conversation (all
its messages) and retention's batches stay on aiosqlite's thread, where a long
statement does not hold up every stream (20,000 items inserted held the loop for
140 ms).  When SQLite's write lock is taken (another process, or a write of
the thread path still open in this one) the work takes the thread path, whose
connection waits for the lock (``storage.busy_timeout_ms``): the loop never does.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from sqlalchemy import Connection, CursorResult, Executable

from .engine import create_inline_engine
from .write_health import WriteHealth

__all__ = ["InlineConnection", "InlineSQLite"]


class InlineConnection:
    """``AsyncConnection.execute`` answered by a synchronous connection: awaiting it
    never leaves the loop's step."""

    __slots__ = ("_conn",)

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    async def execute(
        self, statement: Executable, parameters: Any = None
    ) -> CursorResult[*tuple[Any, ...]]:
        return self._conn.execute(statement, parameters)


class InlineSQLite:
    """One synchronous connection to the SQLite file at ``path``, for the event loop's
    thread, with one transaction at a time on it."""

    def __init__(self, path: str, health: WriteHealth) -> None:
        self._engine = create_inline_engine(path)
        self._health = health
        self._opened_at = 0
        """``health.reopen`` when the connection was opened (see ``WriteHealth.reopen``)."""
        self._conn: Connection | None = None
        self._driver: sqlite3.Connection | None = None
        self._open = False
        """A transaction is open: its work awaited something that left the loop's step
        (nothing does today), and another caller takes the thread path meanwhile."""

    def begin(self, *, write: bool) -> InlineConnection | None:
        """A transaction (``BEGIN IMMEDIATE`` to ``write``, which takes SQLite's write
        lock, else ``BEGIN``), to be ended with :meth:`end`; None when there can be none
        now: one is open already, or the write lock is taken.  Any other failure to begin
        is also None: the thread path meets it again and reports it as it always has."""
        if self._open:
            return None
        try:
            if self._conn is not None and self._opened_at != self._health.reopen:
                self.close()  # opened read-only, perhaps: again (the engine opens anew)
            if self._conn is None:
                self._opened_at = self._health.reopen
                self._conn = self._engine.connect()
                self._driver = self._conn.connection.driver_connection
            assert self._driver is not None
            if self._driver.in_transaction:  # left open by an end that failed
                self._driver.rollback()
            # The transaction is the driver's (SQLAlchemy's pysqlite emits no BEGIN).
            self._driver.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        except Exception:  # the lock is taken, or the file cannot be opened
            return None
        self._open = True
        return InlineConnection(self._conn)

    def end(self, *, commit: bool) -> None:
        """Commit the open transaction, or roll it back (also when its commit failed,
        whose failure is then raised, as SQLAlchemy's error like the thread path's)."""
        assert self._conn is not None and self._driver is not None and self._open
        try:
            if commit:
                self._conn.exec_driver_sql("COMMIT")
        finally:
            try:
                self._conn.rollback()  # SQLAlchemy's own account of the transaction
                self._driver.rollback()  # one that nothing ended (no SQL after a COMMIT)
            finally:
                self._open = False

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
            self._driver = None
        self._engine.dispose()
