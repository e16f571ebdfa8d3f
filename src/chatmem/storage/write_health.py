"""Whether the database takes the gateway's writes: what ``/v1/ready`` checks besides a read.

A database can answer reads and refuse every write: a full disk, a file made read-only,
a PostgreSQL server out of space.  ``/v1/ready`` used to read and say ready, while every
turn got a 503 after the model had answered it.  The store now notes how its write
transactions end (turns, Conversations API writes, retention), and once one was refused
``/v1/ready`` answers 503 until a write goes through again: its own probe (a row written
and deleted in one transaction, :meth:`Store.check_ready`) or a turn.

Only the database's refusal counts.  A write that found another writer in its way (a lock
held past ``busy_timeout``, a serialization failure) says nothing about the database, nor
does one whose connection the server ended under it (a restart, ``pg_terminate_backend``:
the next connection writes), nor a turn refused for what it holds (its conversation
deleted meanwhile).
"""

from __future__ import annotations

import logging
import sqlite3

from sqlalchemy.exc import TimeoutError as PoolTimeout

from ..errors import described
from .faults import is_connection_lost, is_retryable, sqlstate

__all__ = ["WriteHealth"]

log = logging.getLogger("chatmem.storage")

_SQLITE_CONTENTION = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
_LOCK_NOT_AVAILABLE = "55P03"  # PostgreSQL's lock_timeout


def _contention(exc: BaseException) -> bool:
    """Whether ``exc``, or an error it was raised from, is another writer in the way, or
    a connection that ended under the write (item 149)."""
    seen: BaseException | None = exc
    for _ in range(8):  # a chain of causes is short; never loop on a cycle
        if seen is None:
            return False
        if isinstance(seen, sqlite3.OperationalError) and (
            seen.sqlite_errorcode in _SQLITE_CONTENTION
        ):
            return True
        if isinstance(seen, PoolTimeout) or is_retryable(seen):
            return True
        if sqlstate(seen) == _LOCK_NOT_AVAILABLE or is_connection_lost(seen):
            return True
        seen = seen.__cause__
    return False


def _read_only(exc: BaseException) -> bool:
    """Whether ``exc``, or an error it was raised from, is SQLite's refusal of a write to
    a connection that opened the file read-only."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, sqlite3.Error) and (
            (seen.sqlite_errorcode or 0) & 0xFF == sqlite3.SQLITE_READONLY
        ):
            return True
        seen = seen.__cause__
    return False


def _root(exc: BaseException) -> BaseException:
    """The first cause of ``exc``: the driver's own error, which :func:`described` names."""
    for _ in range(8):
        if exc.__cause__ is None:
            break
        exc = exc.__cause__
    return exc


class WriteHealth:
    """How the store's latest write transaction ended: ``refusing`` holds why the database
    refused it (for the log), None while writes go through; ``writes`` counts those that
    committed (``/v1/ready`` probes only when none did since it last looked)."""

    __slots__ = ("refusing", "reopen", "writes")

    def __init__(self) -> None:
        self.refusing: str | None = None
        self.writes = 0
        self.reopen = 0
        """Counts SQLite's refusals of a write as read-only.  SQLite opens a file it cannot
        write (a read-only mount, the wrong owner) read-only, and such a connection stays
        so after the file can be written: each of the store's connections opened before
        the latest refusal is opened again at its next use."""

    def wrote(self) -> None:
        """A write transaction committed."""
        self.writes += 1
        if self.refusing is not None:
            self.refusing = None
            log.warning("the conversation store takes writes again: /v1/ready is ready")

    def failed(self, exc: BaseException) -> None:
        """A write transaction failed with ``exc``: noted unless it was contention."""
        if _contention(exc):
            return
        if _read_only(exc):
            self.reopen += 1
        first = self.refusing is None
        self.refusing = described(_root(exc))
        if first:
            log.warning(
                "the conversation store refuses writes (%s): /v1/ready answers 503 until"
                " a write goes through",
                self.refusing,
            )
