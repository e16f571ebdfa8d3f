"""The store's integrity check finds each kind of damage it names, and only that."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import SRC

from chatmem.config import StorageConfig
from chatmem.storage import Owner, Store, create_engine
from chatmem.storage.integrity import check_integrity

TURN = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


async def store_with_two_turns(db: Path) -> Store:
    store = Store(create_engine(StorageConfig(url=f"sqlite+aiosqlite:///{db}")))
    await store.create_schema()
    # Both made before either goes on: a turn of a stored conversation (an upsert) takes
    # a number from SQLite's AUTOINCREMENT too, and "b" is pk 2 this way.
    for _ in range(2):
        for conv in ("a", "b"):
            await store.commit_turn(Owner("t"), conv, system=None, turn=TURN)
    return store


A, B = "conversation 'a' (pk=1): ", "conversation 'b' (pk=2): "
# damage: (SQL, problems found by the general check, and the additional ones of chat_only)
DAMAGE = {
    "orphan": (
        "PRAGMA foreign_keys=OFF;"
        " UPDATE messages SET conversation_pk = 99 WHERE seq = 4 AND conversation_pk = 2",
        ["1 orphan message(s) of missing conversation pk=99"],
        [B + "last_seq is 4, newest message is 3", B + "ends with a 'user' message"],
    ),
    "seq-beyond-last-seq": (
        "UPDATE conversations SET last_seq = 2 WHERE pk = 1",
        [A + "sequence numbers outside 1..last_seq (2)"],
        [A + "last_seq is 2, newest message is 4"],
    ),
    "gap": (
        "DELETE FROM messages WHERE seq = 2 AND conversation_pk = 1",
        [],
        [A + "sequence numbers are not 1..3 without gaps"],
    ),
    "last-seq-ahead": (
        "UPDATE conversations SET last_seq = 6 WHERE pk = 1",
        [],
        [A + "last_seq is 6, newest message is 4"],
    ),
    "half-turn": (
        "DELETE FROM messages WHERE seq = 4 AND conversation_pk = 2;"
        " UPDATE conversations SET last_seq = 3 WHERE pk = 2",
        [],
        [B + "ends with a 'user' message"],
    ),
}


def assert_found(problems: list[str], expected: list[str]) -> None:
    assert len(problems) == len(expected), problems
    for problem, start in zip(sorted(problems), sorted(expected), strict=True):
        assert problem.startswith(start), problems


@pytest.mark.parametrize("damage", sorted(DAMAGE))
async def test_check_finds_damage(tmp_path: Path, damage: str) -> None:
    db = tmp_path / "chatmem.db"
    store = await store_with_two_turns(db)
    try:
        assert await check_integrity(store, chat_only=True) == []
        sql, general, chat_only = DAMAGE[damage]
        with sqlite3.connect(db) as conn:
            conn.executescript(sql)
        assert_found(await check_integrity(store), general)
        assert_found(await check_integrity(store, chat_only=True), general + chat_only)
    finally:
        await store.close()


async def test_conversations_api_edits_pass_the_general_check(tmp_path: Path) -> None:
    """Deleting an item and appending a user item are legitimate: only chat_only objects."""
    store = await store_with_two_turns(tmp_path / "chatmem.db")
    try:
        assert await store.delete_item(Owner("t"), "a", 2)
        await store.append_items(
            Owner("t"), "b", system=None, items=[{"role": "user", "content": "later"}]
        )
        assert await check_integrity(store) == []
        # A gap and a last_seq past the newest message (a delete takes a number), and a
        # conversation ending on a user item.
        assert len(await check_integrity(store, chat_only=True)) == 3
    finally:
        await store.close()


async def test_db_check_command_exit_status(tmp_path: Path) -> None:
    db = tmp_path / "chatmem.db"
    await (await store_with_two_turns(db)).close()

    async def db_check() -> tuple[int | None, str]:
        proc = await asyncio.create_subprocess_exec(
            *[sys.executable, "-m", "chatmem", "db", "check", "--chat-only"],
            *["--db", f"sqlite+aiosqlite:///{db}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={"PYTHONPATH": SRC},
            cwd=tmp_path,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        return proc.returncode, out.decode()

    assert await db_check() == (0, "")
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE conversations SET last_seq = 9 WHERE pk = 2")
    assert await db_check() == (1, B + "last_seq is 9, newest message is 4\n")
