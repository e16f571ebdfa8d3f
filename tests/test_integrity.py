"""The store's integrity check finds each kind of damage it names, and only that."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from chatmem.config import StorageConfig
from chatmem.storage import Owner, Store, create_engine
from chatmem.storage.integrity import check_integrity

SRC = str(Path(__file__).resolve().parents[1] / "src")
TURN = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


async def store_with_two_turns(db: Path) -> Store:
    store = Store(create_engine(StorageConfig(url=f"sqlite+aiosqlite:///{db}")))
    await store.create_schema()
    for conv in ("a", "b"):
        for _ in range(2):
            await store.commit_turn(Owner("t"), conv, system=None, turn=TURN)
    return store


DAMAGE = {
    "orphan": (
        "PRAGMA foreign_keys=OFF; UPDATE messages SET conversation_pk = 99 WHERE seq = 4"
        " AND conversation_pk = 2",
        [
            "1 orphan message(s) of missing conversation pk=99",
            "conversation 'b' (pk=2): last_seq is 4, newest message is 3",
            "conversation 'b' (pk=2): ends with a 'user' message",
        ],
    ),
    "gap": (
        "DELETE FROM messages WHERE seq = 2 AND conversation_pk = 1",
        ["conversation 'a' (pk=1): sequence numbers are not 1..3 without gaps"],
    ),
    "last-seq": (
        "UPDATE conversations SET last_seq = 6 WHERE pk = 1",
        ["conversation 'a' (pk=1): last_seq is 6, newest message is 4"],
    ),
    "half-turn": (
        "DELETE FROM messages WHERE seq = 4 AND conversation_pk = 2;"
        " UPDATE conversations SET last_seq = 3 WHERE pk = 2",
        ["conversation 'b' (pk=2): ends with a 'user' message"],
    ),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
async def test_check_finds_damage(tmp_path: Path, damage: str) -> None:
    db = tmp_path / "chatmem.db"
    store = await store_with_two_turns(db)
    try:
        assert await check_integrity(store) == []
        sql, expected = DAMAGE[damage]
        with sqlite3.connect(db) as conn:
            conn.executescript(sql)
        problems = await check_integrity(store)
    finally:
        await store.close()
    assert len(problems) == len(expected)
    for problem, start in zip(sorted(problems), sorted(expected), strict=True):
        assert problem.startswith(start), problems


async def test_check_db_command_exit_status(tmp_path: Path) -> None:
    db = tmp_path / "chatmem.db"
    await (await store_with_two_turns(db)).close()

    async def check_db() -> tuple[int | None, str]:
        proc = await asyncio.create_subprocess_exec(
            *[sys.executable, "-m", "chatmem", "check-db", "--db", f"sqlite+aiosqlite:///{db}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={"PYTHONPATH": SRC},
            cwd=tmp_path,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        return proc.returncode, out.decode()

    assert await check_db() == (0, "")
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE conversations SET last_seq = 9 WHERE pk = 2")
    assert await check_db() == (1, "conversation 'b' (pk=2): last_seq is 9, newest message is 4\n")
