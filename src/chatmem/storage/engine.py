"""Creating the async engine: SQLite tuned for a gateway, or PostgreSQL."""

from __future__ import annotations

import atexit
import contextlib
import os
import tempfile
from typing import Any

from sqlalchemy import create_engine as sa_create_engine
from sqlalchemy import event
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import StaticPool

from .. import jsonio
from ..config import StorageConfig
from .write_health import WriteHealth

__all__ = ["WRITE", "create_engine", "create_inline_engine", "in_memory", "is_sqlite"]

# Execution option that marks a connection whose transaction will write.  On SQLite such a
# transaction starts with BEGIN IMMEDIATE: it takes the write lock up front (waiting up to
# busy_timeout for it) instead of failing with "database is locked" when a read
# transaction tries to upgrade while another process writes.
WRITE = "chatmem_write"


def is_sqlite(engine: AsyncEngine) -> bool:
    return engine.dialect.name == "sqlite"


def _json_text(value: Any) -> str:
    """On SQLite, JSON columns written through SQLAlchemy hold the same compact text as
    the fast path's (not ``json.dumps``' spaces and ASCII escapes): the fast path sends it
    upstream as stored, and ``memory.max_history_bytes`` counts it.  (On PostgreSQL the
    asyncpg path writes ``json.dumps``' text, as SQLAlchemy does, and reads re-encode.)"""
    return jsonio.dumps(value).decode()


def in_memory(url: URL) -> bool:
    """A SQLite database that lives in its connection (``:memory:``, ``?mode=memory``)."""
    return url.database in (None, "", ":memory:") or url.query.get("mode") == "memory"


def create_engine(config: StorageConfig) -> AsyncEngine:
    url = make_url(config.url)
    pool: dict[str, Any] = {
        "pool_size": config.pool_size,
        "max_overflow": config.max_overflow,
        "pool_timeout": config.pool_timeout,
    }
    if url.get_backend_name() != "sqlite":
        engine = create_async_engine(
            url,
            connect_args=_postgresql_args(config),
            hide_parameters=True,  # its errors would quote message content (in the logs)
            **pool,
        )
        _replace_dead_connections(engine)
        return engine
    if in_memory(url):
        url = _private_file(url)
    engine = create_async_engine(
        url,
        connect_args={"timeout": config.busy_timeout_ms / 1000},
        hide_parameters=True,  # its errors would quote message content (in the logs)
        json_serializer=_json_text,
        pool_reset_on_return=None,  # see _tune_sqlite's on_reset
        **pool,
    )
    _tune_sqlite(engine, config.busy_timeout_ms)
    return engine


def _private_file(url: URL) -> URL:
    """An in-memory database as a file of its own in the temporary directory, removed
    when the process ends: what the process stores is gone then, as it would be from
    memory.

    SQLite keeps an in-memory database in one connection, which every task would share:
    a request cancelled while it used that connection (a client that hung up) made the
    pool throw it away, and with it every conversation, and each later request was a
    503.  A file takes the same paths as any other (several connections, the fast path).
    """
    handle, path = tempfile.mkstemp(prefix="chatmem-memory-", suffix=".db")
    os.close(handle)
    atexit.register(_remove_database, path)
    return url.set(database=path, query={})


def _remove_database(path: str) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        with contextlib.suppress(OSError):
            os.remove(path + suffix)


def _replace_dead_connections(engine: AsyncEngine) -> None:
    """A connection that died with the server (restart, failover) is replaced at checkout,
    so the gateway recovers without a restart.

    asyncpg reads every pooled connection all along, so it has seen the server close one
    and can tell without a round trip.  SQLAlchemy's ``pool_pre_ping`` asks the server
    instead: ``BEGIN``, ``;``, ``ROLLBACK``, three round trips at every checkout, twice a
    turn (a turn's read and its commit each check a connection out).
    """

    @event.listens_for(engine.sync_engine, "checkout")
    def on_checkout(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        driver = dbapi_connection.driver_connection
        if driver.is_closed():
            raise DisconnectionError("the database closed this connection")
        if driver.is_in_transaction():  # given back inside one: it must not carry a turn
            raise DisconnectionError("the connection was given back inside a transaction")


def reopen_after_read_only_refusals(engine: AsyncEngine, health: WriteHealth) -> None:
    """A SQLite connection of ``engine``'s pool opened before SQLite last refused a write
    as read-only is replaced at checkout (see ``WriteHealth.reopen``)."""

    @event.listens_for(engine.sync_engine, "connect")
    def on_connect(_dbapi_connection: Any, record: Any) -> None:
        record.info[_OPENED_AT] = health.reopen

    @event.listens_for(engine.sync_engine, "checkout")
    def on_checkout(_dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        if record.info.get(_OPENED_AT, health.reopen) != health.reopen:
            raise DisconnectionError("opened before SQLite refused a write as read-only")


_OPENED_AT = "chatmem.opened_at"


def _postgresql_args(config: StorageConfig) -> dict[str, Any]:
    """asyncpg's connect() arguments: connect timeout and server-side settings, and a
    client-side limit a little past ``statement_timeout``: a connection that goes silent
    (a network partition, a stalled proxy) never answers with the server's timeout, and
    requests waited on it for as long as it stayed silent (minutes, in a probe)."""
    settings = {"application_name": "chatmem"}
    args: dict[str, Any] = {"timeout": config.connect_timeout, "server_settings": settings}
    if config.statement_timeout:
        settings["statement_timeout"] = str(int(config.statement_timeout * 1000))
        args["command_timeout"] = config.statement_timeout + _SILENCE_MARGIN
    return args


_SILENCE_MARGIN = 5.0
"""Seconds past ``statement_timeout`` before a statement is given up on the client side:
the server's own error, when it can send one, comes first."""


WAL_SIZE_LIMIT = 64 * 1024 * 1024
"""Bytes the ``-wal`` file is cut back to when it starts over (``journal_size_limit``)."""


def sqlite_pragmas(busy_timeout_ms: int) -> tuple[str, ...]:
    """What every connection to a SQLite file is set up with, the gateway's own and
    SQLAlchemy's alike."""
    return (
        "PRAGMA journal_mode=WAL",
        "PRAGMA synchronous=NORMAL",
        "PRAGMA foreign_keys=ON",
        f"PRAGMA busy_timeout={int(busy_timeout_ms)}",
        # A WAL that grew past this (a long read held its restart off) is cut back to it
        # when it starts over (under load it stays under 16 MiB and a checkpoint's commits,
        # see sqlite_turns._checkpoint_soon).
        f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}",
    )


def create_inline_engine(path: str) -> Engine:
    """A synchronous engine of one connection to the SQLite file at ``path``, for the
    event loop's thread (see ``inline_sqlite``): the async engine's JSON and pragmas, but
    a ``busy_timeout`` of 0, since the loop must never wait for a lock; and no BEGIN of
    SQLAlchemy's, as its user begins each transaction itself."""
    engine = sa_create_engine(
        URL.create("sqlite+pysqlite", database=path),
        poolclass=StaticPool,
        connect_args={"check_same_thread": False},  # closed from another thread at exit
        hide_parameters=True,
        json_serializer=_json_text,
        pool_reset_on_return=None,
    )
    _set_up_connections(engine, 0)
    return engine


def _set_up_connections(sync_engine: Engine, busy_timeout_ms: int) -> None:
    @event.listens_for(sync_engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let us emit BEGIN ourselves (pysqlite's implicit BEGIN is deferred and late).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        for pragma in sqlite_pragmas(busy_timeout_ms):
            cursor.execute(pragma)
        cursor.close()


def _tune_sqlite(engine: AsyncEngine, busy_timeout_ms: int) -> None:
    sync_engine = engine.sync_engine
    _set_up_connections(sync_engine, busy_timeout_ms)

    @event.listens_for(sync_engine, "reset")
    def on_reset(dbapi_connection: Any, record: Any, reset_state: Any) -> None:
        # A connection given back still in a transaction (a write cut short) is rolled
        # back; one whose transaction ended (committed, or rolled back by SQLAlchemy's
        # Connection) is not rolled back again: on aiosqlite that was one more pass of the
        # event loop for every query, 12 for creating a conversation (SQLAlchemy's
        # "custom reset" recipe; the driver's connection says whether it is in one).
        if not reset_state.terminate_only and record.driver_connection.in_transaction:
            dbapi_connection.rollback()

    @event.listens_for(sync_engine, "begin")
    def on_begin(connection: Any) -> None:
        immediate = connection.get_execution_options().get(WRITE, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")
