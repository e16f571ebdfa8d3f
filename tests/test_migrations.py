"""Alembic migrations on SQLite and PostgreSQL: they make exactly the models' schema, go
down and up again, and the start-up check migrates only an empty database."""

from __future__ import annotations

import sqlite3
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from helpers import run_chatmem
from sqlalchemy import MetaData, inspect, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from chatmem.config import StorageConfig
from chatmem.storage import Base, Owner, Store, create_engine
from chatmem.storage.migrate import (
    SchemaError,
    current_revision,
    describe_current,
    downgrade,
    ensure_schema,
    head_revision,
    upgrade,
)


@pytest.fixture
async def engine(storage_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(StorageConfig(url=storage_url))
    yield engine
    await engine.dispose()


def _diff(connection: Connection) -> list[object]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return list(compare_metadata(context, Base.metadata))


def _tables(connection: Connection) -> set[str]:
    return set(inspect(connection).get_table_names())


async def test_migrations_make_exactly_the_models_schema(engine: AsyncEngine) -> None:
    await upgrade(engine)
    async with engine.connect() as conn:
        assert await conn.run_sync(_diff) == []
        assert await conn.run_sync(_tables) == {
            "alembic_version",
            "conversations",
            "history_blocks",
            "messages",
        }
    assert await current_revision(engine) == head_revision() == "0006"


async def test_downgrade_to_base_and_up_again(engine: AsyncEngine) -> None:
    await upgrade(engine)
    store = Store(engine)
    await store.commit_turn(Owner("t"), "c", system=None, turn=[{"role": "user", "content": "x"}])
    await downgrade(engine, "0001")
    assert await current_revision(engine) == "0001"
    async with engine.connect() as conn:
        indexes = await conn.run_sync(
            lambda c: {i["name"] for i in inspect(c).get_indexes("conversations")}
        )
    assert "ix_conversations_updated" not in indexes
    await downgrade(engine, "base")
    assert await current_revision(engine) is None
    async with engine.connect() as conn:
        assert await conn.run_sync(_tables) == {"alembic_version"}
    await upgrade(engine)
    async with engine.connect() as conn:
        assert await conn.run_sync(_diff) == []


async def test_startup_creates_an_empty_database(engine: AsyncEngine) -> None:
    assert await ensure_schema(engine) == "0006"
    assert await ensure_schema(engine) is None  # already at head: nothing to do
    assert await current_revision(engine) == "0006"


async def test_startup_refuses_an_out_of_date_schema(engine: AsyncEngine) -> None:
    await upgrade(engine, "0001")
    with pytest.raises(SchemaError) as caught:
        await ensure_schema(engine)
    message = str(caught.value)
    assert "\n" not in message
    assert "revision 0001" in message and "needs 0006" in message
    assert "chatmem db upgrade" in message
    assert await current_revision(engine) == "0001"  # refused, not touched


async def test_startup_refuses_a_schema_newer_than_the_code(engine: AsyncEngine) -> None:
    await upgrade(engine)
    async with engine.begin() as conn:
        await conn.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    with pytest.raises(SchemaError, match="newer than this chatmem knows"):
        await ensure_schema(engine)


async def test_a_database_made_before_migrations_is_adopted(engine: AsyncEngine) -> None:
    """The core gateway made its tables with create_all (revision 0001's schema, without
    a version table): start-up refuses it, and `db upgrade` stamps and upgrades it."""
    before = MetaData()
    for table in Base.metadata.tables.values():
        if table.name != "history_blocks":
            table.to_metadata(before)
    before.tables["conversations"].indexes = {
        i for i in before.tables["conversations"].indexes if i.name != "ix_conversations_updated"
    }
    async with engine.begin() as conn:
        await conn.run_sync(before.create_all)
    with pytest.raises(SchemaError, match="made before migrations"):
        await ensure_schema(engine)
    assert await describe_current(engine) == (
        "none: made before migrations (newest is 0006; `chatmem db upgrade` adopts it)"
    )
    await upgrade(engine)
    assert await current_revision(engine) == "0006"
    async with engine.connect() as conn:
        assert await conn.run_sync(_diff) == []


def chatmem(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return run_chatmem(*args, cwd=cwd)


def test_db_commands_and_serve_refusal(storage_url: str, tmp_path: Path) -> None:
    db = ["--db", storage_url]
    if storage_url.startswith("sqlite"):
        # A read-only command on a SQLite file that is not there (a mistyped path, say)
        # must not create an empty one.
        path = make_url(storage_url).database
        assert path is not None and not Path(path).exists()
        for command in (["current"], ["check"], ["downgrade", "base"]):
            missing = chatmem("db", *command, *db, cwd=tmp_path)
            assert missing.returncode == 1
            assert missing.stderr == f"chatmem db: no database at {path} (db upgrade creates one)\n"
        assert not Path(path).exists()
        Path(path).touch()  # an empty file is a database without a schema
    assert chatmem("db", "current", *db, cwd=tmp_path).stdout == "none (newest is 0006)\n"
    upgraded = chatmem("db", "upgrade", "0001", *db, cwd=tmp_path)
    assert upgraded.returncode == 0 and upgraded.stdout == "schema at revision 0001\n"
    assert chatmem("db", "current", *db, cwd=tmp_path).stdout == "0001 (newest is 0006)\n"

    for workers in ("1", "2"):  # the master of several workers checks it too
        refused = chatmem("serve", "--port", "1", "--workers", workers, *db, cwd=tmp_path)
        assert refused.returncode == 1
        assert refused.stderr.strip().splitlines()[-1] == (
            "chatmem: database schema is at revision 0001, this chatmem needs 0006: "
            "run `chatmem db upgrade` (same --config/--db) first"
        )

    assert chatmem("db", "upgrade", *db, cwd=tmp_path).stdout == "schema at revision 0006\n"
    assert chatmem("db", "current", *db, cwd=tmp_path).stdout == "0006 (up to date)\n"
    down = chatmem("db", "downgrade", "base", *db, cwd=tmp_path)
    assert down.returncode == 0 and down.stdout == "schema at revision base\n"
    bad = chatmem("db", "downgrade", "nonsense", *db, cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == (
        "chatmem db: Can't locate revision identified by 'nonsense'"
    )


async def test_db_commands_leave_alone_a_schema_they_do_not_know(
    engine: AsyncEngine, storage_url: str, tmp_path: Path
) -> None:
    db = ["--db", storage_url]
    async with engine.begin() as conn:
        await conn.execute(text("SELECT 1"))  # on SQLite, makes the (empty) file
    # No schema yet: the commands that read or delete rows say so, and create nothing.
    for command in (["check"], ["prune", "--older-than", "1d"]):
        empty = chatmem("db", *command, *db, cwd=tmp_path)
        assert empty.returncode == 1
        assert empty.stderr.strip().splitlines()[-1] == (
            "chatmem db: the database has no chatmem schema yet: run `chatmem db upgrade`"
            " (same --config/--db) first"
        )
    assert await current_revision(engine) is None
    # A newer chatmem migrated it: this one says so and touches nothing.
    await upgrade(engine)
    async with engine.begin() as conn:
        await conn.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    current = chatmem("db", "current", *db, cwd=tmp_path)
    assert current.stdout == (
        "0099 (newer than this chatmem knows; its newest is 0006: upgrade chatmem)\n"
    )
    for command in (
        ["upgrade"],
        ["downgrade", "-1"],
        ["check"],
        ["prune", "--older-than", "1d"],
    ):
        refused = chatmem("db", *command, *db, cwd=tmp_path)
        assert refused.returncode == 1, command
        assert refused.stderr.strip().splitlines()[-1] == (
            "chatmem db: database schema is at revision 0099, newer than this chatmem knows"
            " (its newest is 0006): upgrade chatmem"
        )
    assert await current_revision(engine) == "0099"


def test_db_command_against_an_unreachable_database(tmp_path: Path) -> None:
    from helpers import free_port

    url = f"postgresql+asyncpg://nobody:secret-pw@127.0.0.1:{free_port()}/x"
    done = chatmem("db", "current", "--db", url, cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.startswith("chatmem db: the database failed: ")
    assert len(done.stderr.strip().splitlines()) == 1
    assert "secret-pw" not in done.stderr


def test_serve_with_an_unreachable_database_says_so_in_one_line(tmp_path: Path) -> None:
    from helpers import free_port

    url = f"postgresql+asyncpg://chatmem:secret-pw@127.0.0.1:{free_port()}/chatmem"
    done = chatmem("serve", "--port", str(free_port()), "--db", url, cwd=tmp_path)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("chatmem: the conversation store is unavailable: ")
    assert "secret-pw" not in done.stderr


async def test_adopting_tables_made_from_the_current_models(engine: AsyncEngine) -> None:
    """create_all from today's models (index included), no version table: upgrade
    stamps the baseline and the index migration does not trip over the existing index."""
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    await upgrade(engine)
    assert await current_revision(engine) == "0006"
    async with engine.connect() as conn:
        assert await conn.run_sync(_diff) == []


async def test_0003_keeps_every_row_and_never_gives_a_number_back(engine: AsyncEngine) -> None:
    """SQLite makes ``conversations`` anew for AUTOINCREMENT: the migration runs with
    foreign keys off, or dropping the old table would have deleted every message.  On
    PostgreSQL it changes nothing (a sequence never gives a number back)."""
    await upgrade(engine, "0002")
    store = Store(engine)
    for name in ("a", "b", "c"):
        turn = [{"role": "user", "content": name}, {"role": "assistant", "content": name * 2}]
        await store.commit_turn(
            Owner("t"), name, system=[{"role": "system", "content": name}], turn=turn
        )
    before = await _rows(engine)
    await upgrade(engine)
    assert await _rows(engine) == before
    async with engine.connect() as conn:
        assert await conn.run_sync(_diff) == []
    # The newest conversation deleted: the next one must not get its number.
    newest = max(pk for pk, *_ in before["conversations"])
    assert await store.delete_conversation(Owner("t"), "c")
    await store.commit_turn(Owner("t"), "d", system=None, turn=[{"role": "user", "content": "d"}])
    rows = await _rows(engine)
    assert [pk for pk, name, *_ in rows["conversations"] if name == "d"] == [newest + 1]


async def _rows(engine: AsyncEngine) -> dict[str, list[tuple[object, ...]]]:
    async with engine.connect() as conn:
        return {
            "conversations": [
                tuple(r)
                for r in await conn.execute(
                    text("SELECT pk, id, system_prompt, last_seq FROM conversations ORDER BY pk")
                )
            ],
            "messages": [
                tuple(r)
                for r in await conn.execute(
                    text("SELECT conversation_pk, seq, role, content FROM messages ORDER BY pk")
                )
            ],
        }


async def test_a_migration_after_which_rows_point_at_no_row_is_rolled_back(
    tmp_path: Path,
) -> None:
    """SQLite migrates with foreign keys off; ``PRAGMA foreign_key_check`` before the
    commit refuses what would leave a message without its conversation.  (PostgreSQL
    keeps its foreign keys on throughout.)"""
    database = tmp_path / "chatmem.db"
    engine = create_engine(StorageConfig(url=f"sqlite+aiosqlite:///{database}"))
    try:
        await upgrade(engine)
        with sqlite3.connect(database) as raw:  # foreign keys are off unless asked for
            raw.execute(
                "INSERT INTO messages (conversation_pk, seq, role, created_at)"
                " VALUES (99, 1, 'user', 0)"
            )
        with pytest.raises(SchemaError) as refused:
            await downgrade(engine, "0002")
        # Each row named: `chatmem db check` refuses a database at an older revision.
        assert str(refused.value) == (
            "after the migration 1 rows point at no row: messages row 1 (no conversations"
            " row); nothing was changed (delete those rows, or restore what they point at,"
            " and run it again)"
        )
        assert await current_revision(engine) == "0006"
    finally:
        await engine.dispose()
