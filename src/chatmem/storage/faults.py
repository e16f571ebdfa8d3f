"""Which database errors mean "unavailable" (503) and which mean "try the transaction again".

PostgreSQL reports most faults with a SQLSTATE that SQLAlchemy's asyncpg adapter does not
map to ``OperationalError`` (a cancelled statement, a server shutting down, too many
connections all arrive as a plain ``DBAPIError``), so the class of the code decides.
"""

from __future__ import annotations

import sqlite3

import asyncpg
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

__all__ = [
    "BROKEN_CONNECTION",
    "CONNECTION_ENDED",
    "is_connection_lost",
    "is_retryable",
    "is_stale_statement",
    "is_unavailable",
    "sqlite_busy",
    "sqlstate",
]

# 08 connection exception, 53 insufficient resources (too many connections, disk full),
# 57 operator intervention (statement_timeout, admin shutdown, cannot connect now),
# 58 system error (I/O), 55P03 lock not available (lock_timeout), 25006 read-only SQL
# transaction (a database set read-only, a hot standby after a failover: was a 500);
# 42P01 undefined table and 42703 undefined column (the schema was dropped or taken back
# under a running gateway, `chatmem db downgrade`: was a 500, where SQLite's "no such
# table" is a 503), 2200H a sequence at its end.
_UNAVAILABLE_CLASSES = ("08", "53", "57", "58")
_UNAVAILABLE_CODES = ("55P03", "25006", "42P01", "42703", "2200H")
# Serialization failure and deadlock: the transaction was rolled back and may be re-run.
_RETRYABLE_CODES = ("40001", "40P01")
BROKEN_CONNECTION = (asyncpg.InterfaceError, asyncpg.InternalClientError)
"""asyncpg's errors for a connection that cannot be used any more: closed under it, or,
when the server ended it while it waited in the pool and asyncpg has not yet seen the
socket close, "cannot switch to state ...; another operation is in progress"."""
CONNECTION_ENDED = (
    *BROKEN_CONNECTION,
    OSError,
    asyncpg.PostgresConnectionError,  # class 08, also for a socket closed under asyncpg
    asyncpg.AdminShutdownError,  # 57P01: the server ended the connection
)
"""asyncpg's errors for a connection that ended under the statement sent on it."""


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a SQLAlchemy error, or of asyncpg's own (the per-request queries
    on PostgreSQL use asyncpg directly, see ``postgres_turns``)."""
    code = getattr(exc, "sqlstate", None)
    if not isinstance(code, str):
        orig = getattr(exc, "orig", None)
        code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    return code if isinstance(code, str) else None


def is_retryable(exc: BaseException | None) -> bool:
    return isinstance(exc, DBAPIError | asyncpg.PostgresError) and sqlstate(exc) in _RETRYABLE_CODES


def is_connection_lost(exc: BaseException | None) -> bool:
    """Whether asyncpg's ``exc`` says the connection was gone when it was used: the server
    ended it while it waited in the pool (a restart, ``pg_terminate_backend``, a proxy's
    idle timeout), and asyncpg learns that only from the statement sent on it.  Nothing
    done on such a connection stays (a transaction cut short is rolled back by the
    server; a COMMIT without its answer is ``CommitUnconfirmed``, not this), so the work
    may run again on a new connection.  Not a timeout, nor a refused connect: a database
    gone silent would be waited for again, and one that is down refuses again.
    SQLAlchemy's error is looked through: its asyncpg adapter raises its own error from
    asyncpg's."""
    if isinstance(exc, DBAPIError):
        exc = None if exc.orig is None else exc.orig.__cause__
    if isinstance(exc, (TimeoutError, ConnectionRefusedError)):
        return False
    return isinstance(exc, CONNECTION_ENDED)


def is_stale_statement(exc: BaseException | None) -> bool:
    """Whether ``exc`` is asyncpg's refusal of a statement it prepared before the schema
    changed under it (``chatmem db downgrade`` or ``upgrade`` while the gateway runs):
    SQLAlchemy's adapter drops its caches on it, so the statement may simply run again.
    Left alone it was a 500 with a traceback (``/v1/ready``, once per pooled connection)."""
    if isinstance(exc, DBAPIError):
        exc = None if exc.orig is None else exc.orig.__cause__
    return isinstance(exc, asyncpg.InvalidCachedStatementError)


def is_unavailable(exc: BaseException) -> bool:
    """True when the database could not do the work, through no fault of the request."""
    if isinstance(
        exc, (OperationalError, InterfaceError, PoolTimeout, OSError, *BROKEN_CONNECTION)
    ):
        return True
    if not isinstance(exc, DBAPIError | asyncpg.PostgresError):
        return False
    if is_stale_statement(exc):
        return True
    if isinstance(exc, DBAPIError) and (
        exc.connection_invalidated or isinstance(exc.orig, OSError)  # a timeout, say
    ):
        return True
    code = sqlstate(exc)
    return code is not None and (
        code[:2] in _UNAVAILABLE_CLASSES or code in _UNAVAILABLE_CODES or code in _RETRYABLE_CODES
    )


def sqlite_busy(exc: BaseException | None) -> bool:
    """Whether sqlite3's ``exc`` (or SQLAlchemy's error around it) failed because another
    connection held a lock (``SQLITE_BUSY``, ``SQLITE_LOCKED``)."""
    exc = getattr(exc, "orig", exc)
    return isinstance(exc, sqlite3.OperationalError) and exc.sqlite_errorcode in (
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
    )
