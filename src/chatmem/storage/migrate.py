"""Schema versions: upgrade, downgrade and the start-up check, with Alembic run in code.

The migrations live in ``chatmem/storage/migrations`` inside the package, so an installed
chatmem needs no ``alembic.ini``.  Every run holds a lock (PostgreSQL: an advisory lock;
SQLite: ``BEGIN IMMEDIATE``), so instances that start together on an empty database do
not migrate it twice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from .engine import WRITE, is_sqlite
from .schema import Base

__all__ = [
    "SchemaError",
    "current_revision",
    "describe_current",
    "downgrade",
    "ensure_schema",
    "head_revision",
    "upgrade",
]

# The revision whose schema equals what chatmem created with create_all before it had
# migrations: such a database is adopted (stamped) instead of being created again.
_BASELINE = "0001"
_VERSION_TABLE = "alembic_version"
# Any constant works; it only has to be the same in every chatmem instance.
_ADVISORY_LOCK = 0x63686174_6D656D  # "chatmem"


T = TypeVar("T")


class SchemaError(Exception):
    """The database schema is not the one this chatmem needs; ``str()`` is one line."""


def _alembic_config(connection: Connection | None = None) -> AlembicConfig:
    config = AlembicConfig()
    config.set_main_option("script_location", "chatmem.storage:migrations")
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    if head is None:
        raise RuntimeError("chatmem's migrations are missing from the installed package")
    return head


def _current(connection: Connection) -> str | None:
    # Read directly rather than through a MigrationContext, which logs two lines of
    # Alembic chatter on every start.
    if _VERSION_TABLE not in inspect(connection).get_table_names():
        return None
    versions = connection.execute(text(f"SELECT version_num FROM {_VERSION_TABLE}")).scalars()
    return next(iter(versions), None)


def _has_tables(connection: Connection) -> bool:
    names = set(inspect(connection).get_table_names())
    return bool(names & set(Base.metadata.tables))


def _known_revisions() -> set[str]:
    script = ScriptDirectory.from_config(_alembic_config())
    return {revision.revision for revision in script.walk_revisions()}


def _newer(current: str | None) -> bool:
    """Whether a newer chatmem migrated the database to ``current``."""
    return current is not None and current not in _known_revisions()


def _refuse_unknown(current: str | None) -> None:
    """A database a newer chatmem migrated: no command of this one may touch it."""
    if _newer(current):
        raise SchemaError(
            f"database schema is at revision {current}, newer than this chatmem knows "
            f"(its newest is {head_revision()}): upgrade chatmem"
        )


def _upgrade(connection: Connection, revision: str) -> None:
    current = _current(connection)
    _refuse_unknown(current)
    if current is None and _has_tables(connection):
        command.stamp(_alembic_config(connection), _BASELINE)
    command.upgrade(_alembic_config(connection), revision)


def _downgrade(connection: Connection, revision: str) -> None:
    _refuse_unknown(_current(connection))
    command.downgrade(_alembic_config(connection), revision)


def _check(connection: Connection, create: bool) -> str | None:
    """Bring an empty database to head if ``create``; refuse one at another revision."""
    head = head_revision()
    current = _current(connection)
    if current == head:
        return None
    if current is None and not _has_tables(connection):
        if not create:
            raise SchemaError(
                "the database has no chatmem schema yet: run `chatmem db upgrade` "
                "(same --config/--db) first"
            )
        command.upgrade(_alembic_config(connection), "head")
        return head
    _refuse_unknown(current)
    raise SchemaError(
        f"database schema is at revision {current or 'none (made before migrations)'}, "
        f"this chatmem needs {head}: run `chatmem db upgrade` (same --config/--db) first"
    )


async def _locked(engine: AsyncEngine, work: Callable[..., T], *args: Any) -> T:
    async with engine.connect() as conn:
        if not is_sqlite(engine):
            async with conn.begin():
                await conn.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": _ADVISORY_LOCK}
                )
                return await conn.run_sync(work, *args)
        await conn.execution_options(**{WRITE: True})
        # SQLite changes a table by making it anew and dropping the old one, and with
        # foreign keys on, dropping `conversations` would delete every message (ON DELETE
        # CASCADE).  The pragma is a no-op inside a transaction: it is set before.
        await conn.run_sync(_foreign_keys, False)
        try:
            async with conn.begin():
                before = await conn.run_sync(_current)
                result = await conn.run_sync(work, *args)
                if await conn.run_sync(_current) != before:  # a start-up check: no scan
                    await conn.run_sync(_check_foreign_keys)
                return result
        finally:
            await conn.run_sync(_foreign_keys, True)
    raise AssertionError("unreachable")


def _foreign_keys(connection: Connection, on: bool) -> None:
    """SQLite's foreign key checks on or off for ``connection``, outside a transaction."""
    cursor = connection.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.execute(f"PRAGMA foreign_keys={'ON' if on else 'OFF'}")
    finally:
        cursor.close()


def _check_foreign_keys(connection: Connection) -> None:
    """Refuse (roll back) a migration after which a row points at no row, naming the first
    few: ``chatmem db check``, which lists such rows too, refuses a database that is not
    at the newest revision, which this one then never reaches (item 146)."""
    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
    if broken:
        named = ", ".join(
            f"{table} row {row} (no {parent} row)" for table, row, parent, _ in broken[:5]
        )
        more = f" and {len(broken) - 5} more" if len(broken) > 5 else ""
        raise SchemaError(
            f"after the migration {len(broken)} rows point at no row: {named}{more};"
            " nothing was changed (delete those rows, or restore what they point at, and"
            " run it again)"
        )


async def upgrade(engine: AsyncEngine, revision: str = "head") -> None:
    await _locked(engine, _upgrade, revision)


async def downgrade(engine: AsyncEngine, revision: str) -> None:
    await _locked(engine, _downgrade, revision)


async def current_revision(engine: AsyncEngine) -> str | None:
    async with engine.connect() as conn:
        revision: str | None = await conn.run_sync(_current)
        return revision


async def ensure_schema(engine: AsyncEngine) -> str | None:
    """The start-up check.  A brand-new (empty) database is migrated to the newest
    revision, so a first ``chatmem serve`` just works; a database at any other revision
    raises :class:`SchemaError` saying what to run.  Returns the revision it upgraded to,
    if it did."""
    result: str | None = await _locked(engine, _check, True)
    return result


async def require_schema(engine: AsyncEngine) -> None:
    """:class:`SchemaError` unless the database is at this chatmem's newest revision
    (for the commands that read and delete rows: nothing is migrated)."""
    async with engine.connect() as conn:
        await conn.run_sync(_check, False)


async def describe_current(engine: AsyncEngine) -> str:
    """``db current``'s answer: the revision and how it stands to this chatmem's."""
    async with engine.connect() as conn:
        description: str = await conn.run_sync(_describe)
        return description


def _describe(connection: Connection) -> str:
    head = head_revision()
    current = _current(connection)
    if current == head:
        return f"{current} (up to date)"
    if _newer(current):
        return f"{current} (newer than this chatmem knows; its newest is {head}: upgrade chatmem)"
    if current is None and _has_tables(connection):
        return f"none: made before migrations (newest is {head}; `chatmem db upgrade` adopts it)"
    return f"{current or 'none'} (newest is {head})"
