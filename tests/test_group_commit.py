"""Group commit on SQLite: turns that finish in the same loop iteration share a transaction.

A real SQLite file; the transactions are counted with sqlite3's statement trace on the
gateway's own connection, the rows read back from a separate connection.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from chatmem.errors import StorageUnavailable
from chatmem.storage import Owner, Store

ALICE = Owner("team-a", "alice")


def turn(i: int) -> list[dict[str, object]]:
    return [
        {"role": "user", "content": f"q{i}"},
        {"role": "assistant", "content": f"a{i}", "finish_reason": "stop"},
    ]


def commits_on_the_loop_connection(sqlite_store: Store) -> list[str]:
    """Every COMMIT the Store runs on the event loop's connection, from now on."""
    turns = sqlite_store._turns
    assert turns is not None, "SQLite stores commit on their own connection"
    statements: list[str] = []
    turns._loop_connection().set_trace_callback(statements.append)
    return statements


def rows(db_path: Path) -> list[tuple[str, int, str]]:
    with sqlite3.connect(db_path) as conn:
        return conn.execute(
            "SELECT c.id, m.seq, m.content FROM messages m"
            " JOIN conversations c ON c.pk = m.conversation_pk ORDER BY c.id, m.seq"
        ).fetchall()


async def test_turns_finishing_together_commit_in_one_transaction(
    sqlite_store: Store, db_path: Path
) -> None:
    trace = commits_on_the_loop_connection(sqlite_store)
    # Twelve turns at once, four of them on one conversation: one transaction.
    await asyncio.gather(
        *(
            sqlite_store.commit_turn(
                ALICE, "shared" if i < 4 else f"c{i}", system=None, turn=turn(i), together=True
            )
            for i in range(12)
        )
    )
    assert trace.count("COMMIT") == 1
    assert trace.count("BEGIN IMMEDIATE") == 1
    stored = rows(db_path)
    shared = [(seq, content) for cid, seq, content in stored if cid == "shared"]
    assert shared == [
        (n + 1, f'"{t}{i}"') for i in range(4) for n, t in ((2 * i, "q"), (2 * i + 1, "a"))
    ]
    assert len(stored) == 24
    history = await sqlite_store.load_history(ALICE, "c7", limit=10)
    assert [m["content"] for m in history.messages] == ["q7", "a7"]


async def test_a_turn_alone_is_not_delayed_into_a_batch(sqlite_store: Store) -> None:
    trace = commits_on_the_loop_connection(sqlite_store)
    await sqlite_store.commit_turn(ALICE, "c", system=None, turn=turn(1))
    await sqlite_store.commit_turn(ALICE, "c", system=None, turn=turn(2))
    assert trace.count("COMMIT") == 2
    assert not any(statement.startswith("SAVEPOINT") for statement in trace)


async def test_a_failing_turn_leaves_the_others_of_its_batch(
    sqlite_store: Store, db_path: Path
) -> None:
    broken = [{"role": None, "content": "no role"}]  # NOT NULL: this turn's insert fails
    outcome = await asyncio.gather(
        sqlite_store.commit_turn(ALICE, "a", system=None, turn=turn(1), together=True),
        sqlite_store.commit_turn(ALICE, "b", system=None, turn=broken, together=True),
        sqlite_store.commit_turn(ALICE, "c", system=None, turn=turn(3), together=True),
        return_exceptions=True,
    )
    assert outcome[0] is None and outcome[2] is None
    assert isinstance(outcome[1], StorageUnavailable)
    assert {cid for cid, _, _ in rows(db_path)} == {"a", "c"}
    # Nothing of the failed turn: not even its conversation row.
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("SELECT count(*) FROM conversations WHERE id = 'b'").fetchone() == (0,)


async def test_a_batch_waits_on_the_writer_thread_while_another_process_writes(
    sqlite_store: Store, db_path: Path
) -> None:
    other = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    try:
        pending = asyncio.gather(
            *(
                sqlite_store.commit_turn(ALICE, f"c{i}", system=None, turn=turn(i), together=True)
                for i in range(5)
            )
        )
        for _ in range(5):  # the loop keeps turning while the batch waits for the lock
            await asyncio.sleep(0.01)
        assert not pending.done()
        assert rows(db_path) == []
    finally:
        other.execute("COMMIT")
        other.close()
    await asyncio.wait_for(pending, 10)
    assert len(rows(db_path)) == 10


async def test_a_caller_that_stops_waiting_does_not_lose_its_turn(
    sqlite_store: Store, db_path: Path
) -> None:
    leaving = asyncio.ensure_future(
        sqlite_store.commit_turn(ALICE, "left", system=None, turn=turn(1), together=True)
    )
    staying = asyncio.ensure_future(
        sqlite_store.commit_turn(ALICE, "stayed", system=None, turn=turn(2), together=True)
    )
    await asyncio.sleep(0)  # both are queued
    leaving.cancel()
    await asyncio.wait_for(staying, 10)
    assert {cid for cid, _, _ in rows(db_path)} == {"left", "stayed"}
