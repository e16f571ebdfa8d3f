"""Group commit on SQLite: turns that finish together share a transaction.

A real SQLite file; the transactions are counted with sqlite3's statement trace on the
gateway's own connection, the rows read back from a separate connection.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest
from helpers import open_store

from chatmem.errors import StorageUnavailable
from chatmem.storage import Owner, Store, sqlite_turns
from chatmem.storage.sqlite_turns import _GATHER_PASSES

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


async def one_turn_per_pass(sqlite_store: Store, passes: int) -> list[int]:
    """A new turn finishes in each of ``passes`` passes of the event loop (a callback
    that schedules itself runs once per pass); returns, for each pass, how many of those
    turns were committed when it began.  Returns once all are committed."""
    loop = asyncio.get_running_loop()
    saving: list[asyncio.Future[None]] = []
    committed_at_pass: list[int] = []
    all_queued = loop.create_future()

    def next_pass() -> None:
        committed_at_pass.append(sum(future.done() for future in saving))
        if len(saving) == passes:
            all_queued.set_result(None)
            return
        i = len(saving)
        saving.append(
            sqlite_store.commit_turn_soon(ALICE, f"c{i}", system=None, turn=turn(i), together=True)
        )
        loop.call_soon(next_pass)

    next_pass()
    await all_queued
    await asyncio.gather(*saving)
    return committed_at_pass


async def test_turns_that_keep_finishing_wait_for_each_other_a_few_passes(
    sqlite_store: Store, db_path: Path
) -> None:
    """Under load turns finish in every pass of the loop: a transaction gathers those of
    a few passes (``_GATHER_PASSES``), then commits, however many more keep coming."""
    trace = commits_on_the_loop_connection(sqlite_store)
    await one_turn_per_pass(sqlite_store, passes=3)
    assert trace.count("COMMIT") == 1  # three passes: one transaction
    assert len(rows(db_path)) == 6

    trace.clear()
    committed_at_pass = await one_turn_per_pass(sqlite_store, passes=20)
    # The first turn waited _GATHER_PASSES passes, then the batch committed.
    assert committed_at_pass[_GATHER_PASSES] == 0
    assert committed_at_pass[_GATHER_PASSES + 1] > 0
    assert 20 // (_GATHER_PASSES + 1) <= trace.count("COMMIT") <= 20 // _GATHER_PASSES
    assert len(rows(db_path)) == 6 + 40


async def test_a_closing_store_commits_the_turns_still_gathering(
    sqlite_store: Store, db_path: Path
) -> None:
    """``Store.close`` first commits a group commit that is still gathering turns, on the
    loop, before its connections close on a thread."""
    turns = sqlite_store._turns
    assert turns is not None
    trace = commits_on_the_loop_connection(sqlite_store)
    saving = sqlite_store.commit_turn_soon(ALICE, "c", system=None, turn=turn(1), together=True)
    turns.commit_queued()  # what close() does first; no pass of the loop in between
    assert saving.done() and saving.exception() is None
    assert rows(db_path) == [("c", 1, '"q1"'), ("c", 2, '"a1"')]
    await asyncio.sleep(0.01)  # the group commit's pending pass finds nothing to do
    assert trace.count("COMMIT") == 1


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


async def test_every_turn_is_told_how_it_went_its_waiter_gone_or_not(
    sqlite_store: Store, db_path: Path
) -> None:
    """``decided`` comes from the store, not from the future a caller awaits: the waiter
    of one turn is cancelled while its group gathers (the handler's cancellation goes on
    to the future it awaits, now that no shield stands between), and it is still told
    its turn was committed; a turn that fails is told why."""
    told: dict[str, BaseException | None] = {}

    def soon(cid: str, messages: list[dict[str, object]]) -> asyncio.Future[None]:
        return sqlite_store.commit_turn_soon(
            ALICE,
            cid,
            system=None,
            turn=messages,
            together=True,
            decided=lambda failure: told.__setitem__(cid, failure),
        )

    async def waiting(future: asyncio.Future[None]) -> None:
        await future

    leaving = asyncio.ensure_future(waiting(soon("left", turn(1))))
    broken = soon("broken", [{"role": None, "content": "no role"}])  # NOT NULL fails
    staying = soon("stayed", turn(3))
    await asyncio.sleep(0)  # the three are gathering, the first one's waiter awaits
    leaving.cancel()
    await asyncio.wait_for(staying, 10)
    with pytest.raises(StorageUnavailable):
        await broken
    assert leaving.cancelled()
    assert told["left"] is None and told["stayed"] is None
    assert isinstance(told["broken"], StorageUnavailable)
    assert {cid for cid, _, _ in rows(db_path)} == {"left", "stayed"}
    assert sqlite_store._turns is not None and not sqlite_store._turns._deciders


async def test_a_turn_alone_is_told_before_its_future_comes_back(sqlite_store: Store) -> None:
    """A turn committed alone is decided before ``commit_turn_soon`` returns, so the
    metrics count it before the handler answers (a scrape of another worker could miss
    a count that came a pass of the loop later)."""
    told: list[BaseException | None] = []
    saving = sqlite_store.commit_turn_soon(
        ALICE, "c", system=None, turn=turn(1), decided=told.append
    )
    assert told == [None]
    assert saving.done()


async def test_a_conversation_read_as_new_is_created_with_a_plain_insert(
    sqlite_store: Store, db_path: Path
) -> None:
    trace = commits_on_the_loop_connection(sqlite_store)
    assert (await sqlite_store.load_history(ALICE, "new", 10)).messages == []
    await sqlite_store.commit_turn(ALICE, "new", system=None, turn=turn(1))
    await sqlite_store.commit_turn(ALICE, "new", system=None, turn=turn(2))
    creates = [s for s in trace if s.startswith("INSERT INTO conversations")]
    # The first turn creates it; the second one upserts (no read found it missing).
    assert ["ON CONFLICT" in s for s in creates] == [False, True]
    assert [seq for _, seq, _ in rows(db_path)] == [1, 2, 3, 4]


async def test_a_conversation_created_after_its_read_still_gets_the_turn(
    sqlite_store: Store, db_path: Path
) -> None:
    """Read as missing, then created by another process before the turn commits: the
    plain insert fails on the unique key and the upsert appends after what is there."""
    assert (await sqlite_store.load_history(ALICE, "raced", 10)).messages == []
    other = await open_store(db_path)  # its own connections, as another process has
    try:
        await other.commit_turn(ALICE, "raced", system=None, turn=turn(1))
    finally:
        await other.close()
    await sqlite_store.commit_turn(ALICE, "raced", system=None, turn=turn(2))
    assert rows(db_path) == [
        ("raced", 1, '"q1"'),
        ("raced", 2, '"a1"'),
        ("raced", 3, '"q2"'),
        ("raced", 4, '"a2"'),
    ]
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("SELECT last_seq FROM conversations").fetchall() == [(4,)]


async def test_a_conversation_found_after_a_miss_is_not_inserted_again(
    sqlite_store: Store, db_path: Path
) -> None:
    """A miss whose turn never came, then the conversation created elsewhere and read:
    its next turn upserts at once, with no insert bound to fail."""
    assert (await sqlite_store.load_history(ALICE, "later", 10)).messages == []
    other = await open_store(db_path)
    try:
        await other.commit_turn(ALICE, "later", system=None, turn=turn(1))
    finally:
        await other.close()
    assert len((await sqlite_store.load_history(ALICE, "later", 10)).messages) == 2
    trace = commits_on_the_loop_connection(sqlite_store)
    await sqlite_store.commit_turn(ALICE, "later", system=None, turn=turn(2))
    creates = [s for s in trace if s.startswith("INSERT INTO conversations")]
    assert len(creates) == 1 and "ON CONFLICT" in creates[0]
    assert [seq for _, seq, _ in rows(db_path)] == [1, 2, 3, 4]


def wal_pages(db_path: Path) -> int:
    return Path(f"{db_path}-wal").stat().st_size // 4096


async def test_the_wal_starts_over_while_turns_keep_coming(
    sqlite_store: Store, db_path: Path
) -> None:
    """Checkpoints run on the writer thread while turns keep being committed: the WAL must
    still start over, or it grows by every commit for as long as the load lasts (with the
    loop's connection committing during each checkpoint, none found it wholly copied)."""
    sizes: list[int] = []

    async def client(n: int) -> None:
        for i in range(2000):
            await sqlite_store.commit_turn_soon(
                ALICE, f"c{n}-{i}", system=None, turn=turn(i), together=True
            )
            if n == 0 and i % 250 == 249:
                sizes.append(wal_pages(db_path))

    await asyncio.gather(*(client(n) for n in range(4)))
    # 8,000 turns, some 2,000 commits, ten checkpoints.  Before, the WAL grew all along,
    # to some 23,000 pages; now it starts over once it holds _RESTART_AFTER_FRAMES pages
    # after a checkpoint (here at 7,000 at most: the 4,096 and a checkpoint's commits).
    assert len(rows(db_path)) == 16_000
    assert max(sizes) <= 3 * sqlite_turns._RESTART_AFTER_FRAMES, sizes


async def test_a_failing_checkpoint_is_logged_and_the_turns_go_on(
    sqlite_store: Store,
    db_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def full(conn: sqlite3.Connection) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(sqlite_turns, "_checkpoint", full)
    for i in range(sqlite_turns._CHECKPOINT_EVERY + 1):
        await sqlite_store.commit_turn(ALICE, f"c{i}", system=None, turn=turn(i))
    turns = sqlite_store._turns
    assert turns is not None
    # The checkpoint runs on the writer thread, the turns go on meanwhile: wait for it.
    await asyncio.get_running_loop().run_in_executor(turns._writer, lambda: None)
    await asyncio.sleep(0)
    assert len(rows(db_path)) == 2 * (sqlite_turns._CHECKPOINT_EVERY + 1)
    assert [r.getMessage() for r in caplog.records if r.name == "chatmem.storage"] == [
        "SQLite WAL checkpoint failed: database or disk is full"
    ]


async def test_a_checkpoint_that_ends_after_the_store_closed_is_let_be(
    db_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The second checkpoint, holding the writes back, is not started on a closed store
    (its writer thread has closed its connection, or is gone)."""
    monkeypatch.setattr(sqlite_turns, "_RESTART_AFTER_FRAMES", 0)  # always a second one
    store = await open_store(db_path)
    turns = store._turns
    assert turns is not None
    checkpointing, closing_started = threading.Event(), threading.Event()
    checkpoints: list[bool] = []
    real = sqlite_turns._checkpoint

    def checkpoint(conn: sqlite3.Connection) -> int:
        checkpoints.append(turns._inline is None)
        checkpointing.set()
        closing_started.wait(10)  # the first one ends once the store is closing
        return real(conn)

    monkeypatch.setattr(sqlite_turns, "_checkpoint", checkpoint)
    for i in range(sqlite_turns._CHECKPOINT_EVERY):
        await store.commit_turn(ALICE, f"c{i}", system=None, turn=turn(i))
    await asyncio.get_running_loop().run_in_executor(None, checkpointing.wait, 10)
    closing = asyncio.create_task(store.close())
    for _ in range(1000):
        if turns._inline is None:
            break
        await asyncio.sleep(0.001)
    closing_started.set()
    await closing
    for _ in range(3):
        await asyncio.sleep(0)
    assert checkpoints == [False]
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == []
    assert len(rows(db_path)) == 2 * sqlite_turns._CHECKPOINT_EVERY
