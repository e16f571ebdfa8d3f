"""Storage on a real SQLite file and a real PostgreSQL database (the same tests on both):
turns, history windows, concurrency, retries, retention; SQLite pragmas."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from helpers import EVERY_FIELD_TURN, TOOL_CALL, open_store
from sqlalchemy import event, text

from chatmem.storage import Owner, Store
from chatmem.storage.items import INLINE_ITEMS

ALICE = Owner("team-a", "alice")


def turn(i: int) -> list[dict[str, object]]:
    return [
        {"role": "user", "content": f"q{i}"},
        {"role": "assistant", "content": f"a{i}", "finish_reason": "stop"},
    ]


THREE_TURNS = [(1, '"q1"'), (2, '"a1"'), (3, '"q2"'), (4, '"a2"'), (5, '"q3"'), (6, '"a3"')]
"""The rows (seq, content) of ``turn(1)`` to ``turn(3)`` stored in order."""


async def all_rows(store: Store, query: str) -> list[tuple[Any, ...]]:
    async with store.engine.connect() as conn:
        return [tuple(row) for row in await conn.execute(text(query))]


@pytest.fixture
async def store(storage_url: str) -> AsyncIterator[Store]:
    store = await open_store(storage_url)
    yield store
    await store.close()


async def test_turn_and_history(store: Store) -> None:
    await store.commit_turn(ALICE, "c", system=[{"role": "system", "content": "s"}], turn=turn(1))
    await store.commit_turn(ALICE, "c", system=None, turn=turn(2))
    history = await store.load_history(ALICE, "c", limit=10)
    assert history.system == [{"role": "system", "content": "s"}]
    assert [m["content"] for m in history.messages] == ["q1", "a1", "q2", "a2"]
    assert history.messages[1] == {"role": "assistant", "content": "a1"}
    newest = await store.load_history(ALICE, "c", limit=3)
    assert [m["content"] for m in newest.messages] == ["a1", "q2", "a2"]
    turned = await store.load_history(ALICE, "c", limit=3, start_at_user=True)
    assert [m["content"] for m in turned.messages] == ["q2", "a2"]  # from a turn's start


async def test_owners_are_separate(store: Store) -> None:
    await store.commit_turn(ALICE, "same", system=None, turn=turn(1))
    for other in (Owner("team-a", "bob"), Owner("team-b", "alice"), Owner("team-a")):
        assert (await store.load_history(other, "same", limit=10)).messages == []
    await store.commit_turn(Owner("team-b", "alice"), "same", system=None, turn=turn(9))
    assert [m["content"] for m in (await store.load_history(ALICE, "same", 10)).messages] == [
        "q1",
        "a1",
    ]


async def test_concurrent_writers_on_one_database(storage_url: str) -> None:
    """Two engines (as two processes would have) write 2 x 40 turns of one conversation
    at once: no "database is locked", unique gap-free sequence numbers, adjacent turns."""
    stores = [await open_store(storage_url), await open_store(storage_url)]
    try:
        await asyncio.gather(
            *(
                stores[i % 2].commit_turn(ALICE, "busy", system=None, turn=turn(i))
                for i in range(80)
            )
        )
        rows = await all_rows(stores[0], "SELECT seq, role, content FROM messages ORDER BY seq")
        last_seq = (await all_rows(stores[0], "SELECT last_seq FROM conversations"))[0][0]
    finally:
        for s in stores:
            await s.close()
    assert [r[0] for r in rows] == list(range(1, 161)) and last_seq == 160
    for user_row, assistant_row in zip(rows[::2], rows[1::2], strict=True):
        assert user_row[1] == "user" and assistant_row[1] == "assistant"
        assert user_row[2].replace("q", "a") == assistant_row[2]
    assert len({r[2] for r in rows}) == 160


async def test_delete_cascades_to_messages(store: Store) -> None:
    await store.commit_turn(ALICE, "gone", system=None, turn=turn(1))
    await store.commit_turn(ALICE, "kept", system=None, turn=turn(2))
    assert await store.delete_conversation(ALICE, "gone")
    assert not await store.delete_conversation(ALICE, "gone")
    query = "SELECT c.id, m.seq FROM messages m JOIN conversations c ON c.pk = m.conversation_pk"
    assert sorted(await all_rows(store, query)) == [("kept", 1), ("kept", 2)]
    assert await all_rows(store, "SELECT count(*) FROM messages") == [(2,)]


async def test_sqlite_pragmas(sqlite_store: Store) -> None:
    async with sqlite_store.engine.connect() as conn:
        assert (await conn.exec_driver_sql("PRAGMA journal_mode")).scalar() == "wal"
        assert (await conn.exec_driver_sql("PRAGMA foreign_keys")).scalar() == 1
        assert (await conn.exec_driver_sql("PRAGMA busy_timeout")).scalar() == 30000
        limit = (await conn.exec_driver_sql("PRAGMA journal_size_limit")).scalar()
        assert limit == 64 * 1024 * 1024


async def test_history_query_uses_the_index(sqlite_store: Store, db_path: Path) -> None:
    await sqlite_store.commit_turn(ALICE, "c", system=None, turn=turn(1))
    with sqlite3.connect(db_path) as conn:
        plan = conn.execute(
            "EXPLAIN QUERY PLAN SELECT role, content FROM messages WHERE conversation_pk = 1 "
            "ORDER BY seq DESC LIMIT 200"
        ).fetchall()
    detail = " ".join(row[-1] for row in plan)
    assert "USING INDEX" in detail and "TEMP B-TREE" not in detail


@pytest.mark.parametrize("writer_one_hop", [True, False])
async def test_one_hop_and_sqlalchemy_paths_agree(db_path: Path, writer_one_hop: bool) -> None:
    """The SQLite one-hop path and the SQLAlchemy path write identical rows and read each
    other's: the schema and the JSON encoding are the same."""
    writer = await open_store(db_path, one_hop=writer_one_hop)
    reader = await open_store(db_path, one_hop=not writer_one_hop)
    messages = EVERY_FIELD_TURN
    try:
        await writer.commit_turn(
            ALICE, "x", system=[{"role": "system", "content": "s"}], turn=messages
        )
        await writer.commit_turn(ALICE, "x", system=None, turn=turn(2))
        for store in (writer, reader):
            history = await store.load_history(ALICE, "x", limit=10)
            assert history.system == [{"role": "system", "content": "s"}]
            assert history.messages[:3] == [
                {"role": "user", "content": [{"type": "text", "text": "é \u2028"}], "name": "ann"},
                # A tool call's reasoning goes again (memory.resend_reasoning's default).
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": TOOL_CALL,
                    "reasoning_content": "r",
                },
                {"role": "tool", "content": "42", "tool_call_id": "t"},
            ]
            assert len(history.messages) == 5
    finally:
        await writer.close()
        await reader.close()
    with sqlite3.connect(db_path) as conn:
        row = conn.execute(
            "SELECT usage, reasoning, name, tool_calls FROM messages WHERE seq = 2"
        ).fetchone()
        nulls = conn.execute(
            "SELECT count(*) FROM messages WHERE tool_calls IS NULL AND usage IS NULL"
        ).fetchone()[0]
    assert json.loads(row[0]) == {"total_tokens": 3} and row[1] == "r" and row[2] is None
    assert isinstance(row[0], str)  # TEXT, as SQLAlchemy's JSON type stores it
    assert nulls == 4  # SQL NULL, never the JSON text "null"


async def test_writer_waits_off_the_loop_for_another_process_lock(
    sqlite_store: Store, db_path: Path
) -> None:
    store = sqlite_store
    """Another connection (as another process would) holds the write lock: the commit
    waits for it on the writer thread while the event loop and reads go on, then lands."""
    await store.commit_turn(ALICE, "c", system=None, turn=turn(1))
    other = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    try:
        pending = asyncio.create_task(store.commit_turn(ALICE, "c", system=None, turn=turn(2)))
        for _ in range(5):  # the loop keeps turning while the commit waits
            await asyncio.sleep(0.01)
        assert not pending.done()
        history = await store.load_history(ALICE, "c", limit=10)  # WAL: readers never wait
        assert [m["content"] for m in history.messages] == ["q1", "a1"]
    finally:
        other.execute("COMMIT")
        other.close()
    await asyncio.wait_for(pending, 10)
    history = await store.load_history(ALICE, "c", limit=10)
    assert [m["content"] for m in history.messages] == ["q1", "a1", "q2", "a2"]


async def test_a_turn_never_overtakes_one_waiting_for_the_lock(
    sqlite_store: Store, db_path: Path
) -> None:
    """A turn that waits for another connection's lock on the writer thread is stored
    before a turn that comes to commit after it.  Written on the loop's connection the
    moment the lock came free, the later turn won the race against SQLite's busy handler,
    which only tries again after its next sleep."""
    store = sqlite_store
    await store.commit_turn(ALICE, "c", system=None, turn=turn(1))
    other = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    try:
        earlier = asyncio.create_task(store.commit_turn(ALICE, "c", system=None, turn=turn(2)))
        await asyncio.sleep(0.2)  # the busy handler is in its longer sleeps by now
        assert not earlier.done()
    finally:
        other.execute("COMMIT")
        other.close()
    await store.commit_turn(ALICE, "c", system=None, turn=turn(3))
    await asyncio.wait_for(earlier, 10)
    assert await all_rows(store, "SELECT seq, content FROM messages ORDER BY seq") == THREE_TURNS


class _ApiWriteFailed(Exception):
    pass


@pytest.mark.parametrize("api_write_fails", [False, True])
async def test_turns_wait_for_the_gateways_own_api_write_and_are_not_lost(
    db_path: Path, api_write_fails: bool
) -> None:
    """The Conversations API's writes (SQLAlchemy, in ``Store._write``) hold the write lock
    over several passes of the event loop.  Turns that finish meanwhile wait for the
    transaction, and are committed after it in the order they came, however long it
    takes: before, each went to the writer thread, whose busy handler slept between
    tries and gave up after ``busy_timeout`` (here 50 ms), and the turn was lost.  A
    transaction that fails (rolled back) lets them go on as well."""
    store = await open_store(db_path, busy_timeout_ms=50)
    try:
        await store.commit_turn(ALICE, "c", system=None, turn=turn(1))
        failing = pytest.raises(_ApiWriteFailed) if api_write_fails else contextlib.nullcontext()
        with failing:
            async with store._write() as conn:
                await conn.execute(
                    text(
                        "INSERT INTO conversations (id, tenant, user_id, last_seq, created_at,"
                        " updated_at) VALUES ('api', 'team-a', 'alice', 0, 0, 0)"
                    )
                )
                second = asyncio.ensure_future(
                    store.commit_turn(ALICE, "c", system=None, turn=turn(2))
                )
                third = asyncio.ensure_future(
                    store.commit_turn(ALICE, "c", system=None, turn=turn(3))
                )
                await asyncio.sleep(0.2)  # four busy timeouts
                assert not second.done() and not third.done()
                if api_write_fails:
                    raise _ApiWriteFailed
        await asyncio.wait_for(asyncio.gather(second, third), 10)
        stored = await all_rows(store, "SELECT id FROM conversations ORDER BY pk")
        assert stored == ([("c",)] if api_write_fails else [("c",), ("api",)])
        assert await all_rows(store, "SELECT seq, content FROM messages ORDER BY pk") == THREE_TURNS
        history = await store.load_history(ALICE, "c", limit=10)
        assert [m["content"] for m in history.messages] == ["q1", "a1", "q2", "a2", "q3", "a3"]
    finally:
        await store.close()


async def _age(store: Store, conversation_id: str, days: float) -> None:
    async with store.engine.begin() as conn:
        await conn.execute(
            text("UPDATE conversations SET updated_at = :t WHERE id = :id"),
            {"t": int(time.time() - days * 86400), "id": conversation_id},
        )


async def test_prune_deletes_whole_old_conversations_in_batches(store: Store) -> None:
    for i in range(7):
        await store.commit_turn(ALICE, f"old{i}", system=None, turn=turn(i))
        await _age(store, f"old{i}", 31 + i)
    await store.commit_turn(ALICE, "recent", system=None, turn=turn(8))
    await store.commit_turn(ALICE, "touched", system=None, turn=turn(9))
    await _age(store, "touched", 29)
    statements: list[str] = []

    def count_deletes(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().upper().startswith("DELETE FROM CONVERSATIONS"):
            statements.append(statement)

    event.listen(store.engine.sync_engine, "before_cursor_execute", count_deletes)
    try:
        assert await store.prune(30 * 86400, batch_size=3) == 7
    finally:
        event.remove(store.engine.sync_engine, "before_cursor_execute", count_deletes)
    assert len(statements) == 3  # 3 + 3 + 1: one short transaction per batch
    assert await all_rows(store, "SELECT id FROM conversations ORDER BY id") == [
        ("recent",),
        ("touched",),
    ]
    # The messages went with their conversations.
    assert await all_rows(store, "SELECT count(*) FROM messages") == [(4,)]
    assert await store.prune(30 * 86400) == 0


async def test_a_page_of_large_items_ends_at_8_mib(store: Store) -> None:
    """100 items of 3 MB were one page of 300 MB: read whole, then sent."""
    big = "z" * (3 * 1024 * 1024)
    for n in range(4):
        await store.commit_turn(
            ALICE, "big", system=None, turn=[{"role": "user", "content": f"{n}{big}"}]
        )
    await store.commit_turn(ALICE, "big", system=None, turn=turn(1))  # two small ones
    seen: list[int] = []
    after = None
    for _ in range(5):  # bounded: two pages
        page = await store.list_items(ALICE, "big", limit=100, after_seq=after, newest_first=False)
        assert page is not None and page.data
        seen.append(len(page.data))
        after = page.data[-1]["seq"]
        if not page.has_more:
            break
    assert seen == [2, 4]  # 3 MB, 3 MB | 3 MB, 3 MB, q1, a1


async def test_a_page_counts_the_reasoning_of_its_items(store: Store) -> None:
    """A reasoning model's answers carry their reasoning apart from their content: 12 of
    3 MB each were one page of 37 MB, as only content and tool calls were counted."""
    big = "r" * (3 * 1024 * 1024)
    for n in range(4):
        answer = {"role": "assistant", "content": "ok", "reasoning": f"{n}{big}"}
        await store.commit_turn(
            ALICE, "thinks", system=None, turn=[{"role": "user", "content": "q"}, answer]
        )
    page = await store.list_items(ALICE, "thinks", limit=100, after_seq=None, newest_first=False)
    assert page is not None and page.has_more
    # 3 MB, 3 MB, then the question before the third: its answer would pass 8 MiB.
    assert [item["role"] for item in page.data] == ["user", "assistant"] * 2 + ["user"]


async def test_an_in_memory_database_takes_concurrent_turns_of_one_conversation() -> None:
    """``:memory:`` lives in one connection, shared by every task: a read that ended (and
    rolled back) while a write's transaction was open on it cut that write short, a 503
    or a 500 (a seq stored twice) for concurrent turns of one conversation."""
    store = await open_store("sqlite+aiosqlite:///:memory:")
    owner = Owner("t", "u")
    try:

        async def turn(i: int) -> None:
            history = await store.load_history(owner, "c", 200)
            await asyncio.sleep(0)
            turn = [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]
            await store.commit_turn(owner, "c", system=None, turn=turn, after=history.read_at)

        for _ in range(5):  # bounded: a few rounds of racing reads and writes
            await asyncio.gather(*(turn(i) for i in range(8)))
        stored = (await store.load_history(owner, "c", 1000)).messages
        assert len(stored) == 5 * 8 * 2
    finally:
        await store.close()


async def test_an_in_memory_database_survives_requests_cancelled_while_they_read() -> None:
    """A client that hung up while its request read an in-memory database had the pool
    throw away the one connection that held the database: every later request was a 503."""
    store = await open_store("sqlite+aiosqlite:///:memory:")
    owner = Owner("t", "u")
    turn = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    try:
        await store.commit_turn(owner, "c", system=None, turn=turn)
        for passes in range(12):  # cancelled at each point of the read, in turn
            reading = asyncio.ensure_future(
                store.list_items(owner, "c", limit=20, after_seq=None, newest_first=True)
            )
            for _ in range(passes):
                await asyncio.sleep(0)
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reading
        assert (await store.load_history(owner, "c", 200)).messages == turn
    finally:
        await store.close()


class _Passes:
    """Counts the passes of the event loop while it is on (a callback that schedules
    itself again on every pass)."""

    def __init__(self) -> None:
        self.count = 0
        self._handle: asyncio.Handle | None = None

    def _tick(self) -> None:
        self.count += 1
        self._handle = asyncio.get_running_loop().call_soon(self._tick)

    def __enter__(self) -> _Passes:
        self._handle = asyncio.get_running_loop().call_soon(self._tick)
        return self

    def __exit__(self, *_: object) -> None:
        assert self._handle is not None
        self._handle.cancel()


def _count_aiosqlite_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The calls that go to aiosqlite's thread from now on, by name."""
    import aiosqlite

    calls: list[str] = []
    execute = aiosqlite.Connection._execute

    async def counted(self: aiosqlite.Connection, fn: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(getattr(fn, "__name__", ""))
        return await execute(self, fn, *args, **kwargs)

    monkeypatch.setattr(aiosqlite.Connection, "_execute", counted)
    return calls


async def test_api_queries_take_no_pass_of_the_event_loop(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On SQLite the Conversations API's queries run on the loop's own connection, each
    within one step of the loop: no call on aiosqlite's thread, no pass of the loop in
    between (under load each pass takes milliseconds, and a write held the lock across
    all of them).  Deleting a whole conversation, whose size nothing bounds, still takes
    the thread."""
    store = await open_store(db_path)
    calls = _count_aiosqlite_calls(monkeypatch)
    items = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    try:
        with _Passes() as passes:
            await store.create_conversation(
                ALICE, "c", metadata={"k": "v"}, system=None, items=items
            )
            await store.append_items(ALICE, "c", system=None, items=items)
            await store.update_metadata(ALICE, "c", {"k": "w"})
            deleted = await store.delete_item(ALICE, "c", 4)
            info = await store.get_conversation(ALICE, "c")
            listed = await store.list_conversations(ALICE, limit=10, after=None, newest_first=True)
            page = await store.list_items(ALICE, "c", limit=10, after_seq=None, newest_first=False)
            assert (calls, passes.count) == ([], 0)
            assert deleted is not None and deleted.seqs == [4]
            assert info is not None and info.metadata == {"k": "w"}
            assert listed is not None and [c.id for c in listed.data] == ["c"]
            assert page is not None and [i["content"] for i in page.data] == ["q", "a", "q"]
            assert await store.delete_conversation(ALICE, "c")
            assert calls and passes.count > 0
        assert await all_rows(store, "SELECT count(*) FROM messages") == [(0,)]
    finally:
        await store.close()


async def test_a_large_import_is_written_on_the_thread(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Up to ``INLINE_ITEMS`` items are written within one step of the loop; more would
    hold every stream up (20,000 short items: 140 ms), so they go to aiosqlite's thread
    and the loop goes on meanwhile."""
    store = await open_store(db_path)
    calls = _count_aiosqlite_calls(monkeypatch)
    many = [{"role": "user", "content": str(i)} for i in range(INLINE_ITEMS + 1)]
    try:
        with _Passes() as passes:
            await store.create_conversation(
                ALICE, "small", metadata={}, system=None, items=many[:INLINE_ITEMS]
            )
            await store.append_items(ALICE, "small", system=None, items=many[:INLINE_ITEMS])
            assert (calls, passes.count) == ([], 0)
            await store.create_conversation(ALICE, "large", metadata={}, system=None, items=many)
            assert "commit" in calls and passes.count > 0
            calls.clear()
            await store.append_items(ALICE, "large", system=None, items=many)
            assert "commit" in calls
        counted = "SELECT c.id, count(*) FROM messages m JOIN conversations c"
        rows = await all_rows(store, counted + " ON c.pk = m.conversation_pk GROUP BY c.id")
        assert sorted(rows) == [("large", 2 * len(many)), ("small", 2 * INLINE_ITEMS)]
    finally:
        await store.close()


async def test_an_api_write_waits_on_the_thread_when_the_lock_is_taken(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop's own connection never waits for SQLite's lock: with another process's
    write open, an API write takes the thread path, whose connection waits for it
    (``busy_timeout_ms``), and the loop goes on meanwhile."""
    store = await open_store(db_path)
    calls = _count_aiosqlite_calls(monkeypatch)
    other = sqlite3.connect(db_path, timeout=0, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        with _Passes() as passes:
            creating = asyncio.ensure_future(
                store.create_conversation(ALICE, "c", metadata={}, system=None, items=[])
            )
            await asyncio.sleep(0.2)
            assert not creating.done() and passes.count > 10
        other.execute("COMMIT")
        info = await asyncio.wait_for(creating, 10)
        assert info.id == "c" and "commit" in calls
        assert await all_rows(store, "SELECT id FROM conversations") == [("c",)]
        calls.clear()
        await store.create_conversation(ALICE, "d", metadata={}, system=None, items=[])
        assert calls == []  # the lock is free again: the loop's connection
    finally:
        other.close()
        await store.close()


async def test_an_api_write_waits_a_moment_for_the_lock_on_the_loop(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process's commit holds SQLite's lock for a fraction of a millisecond: an
    API write that meets it tries again a few times on the loop's connection before it
    takes the thread path, which held the turns back while it waited.  With two workers
    at 300 API writes a second, their p99 went from 23-50 ms to 10-12 ms (and chat's from
    13-22 to 12-14 ms, ``benchmarks.api_writes --workers 2``)."""
    store = await open_store(db_path)
    calls = _count_aiosqlite_calls(monkeypatch)
    other = sqlite3.connect(db_path, timeout=0, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        creating = asyncio.ensure_future(
            store.create_conversation(ALICE, "c", metadata={}, system=None, items=[])
        )
        await asyncio.sleep(0)  # it met the lock, and waits to try again
        assert not creating.done()
        other.execute("COMMIT")
        await asyncio.wait_for(creating, 10)
        assert calls == []  # not on the thread
        assert await all_rows(store, "SELECT id FROM conversations") == [("c",)]
    finally:
        other.close()
        await store.close()


async def test_turns_held_by_a_write_on_the_thread_survive_an_api_write_on_the_loop(
    db_path: Path,
) -> None:
    """An API write that finds another process's lock takes the thread path, and holds
    the turns back until it is done.  When the lock came free, the next API write, on
    the loop's connection, got it before the waiting one's next try, began holding turns
    anew and dropped those already held: their chat requests waited for good (all 16
    chat clients of ``benchmarks.api_writes --workers 2`` at 300 writes a second).  The
    held turn is committed once both writes are done."""
    store = await open_store(db_path)
    other = sqlite3.connect(db_path, timeout=0, isolation_level=None)
    try:
        await store.commit_turn(ALICE, "c", system=None, turn=turn(1))
        other.execute("BEGIN IMMEDIATE")
        waiting = asyncio.ensure_future(
            store.create_conversation(ALICE, "thread", metadata={}, system=None, items=[])
        )
        await asyncio.sleep(0.3)  # SQLite's busy handler now sleeps up to 100 ms a try
        held = asyncio.ensure_future(store.commit_turn(ALICE, "c", system=None, turn=turn(2)))
        await asyncio.sleep(0.05)
        assert not held.done() and not waiting.done()
        other.execute("COMMIT")
        await store.create_conversation(ALICE, "loop", metadata={}, system=None, items=[])
        await asyncio.wait_for(asyncio.gather(waiting, held), 10)
        history = await store.load_history(ALICE, "c", limit=10)
        assert [m["content"] for m in history.messages] == ["q1", "a1", "q2", "a2"]
        ids = await all_rows(store, "SELECT id FROM conversations ORDER BY id")
        assert ids == [("c",), ("loop",), ("thread",)]
    finally:
        other.close()
        await store.close()


async def test_api_writes_on_the_loop_are_seen_by_the_next_turn(db_path: Path) -> None:
    """A window the turns' connection keeps (``window_cache``) is checked against what
    other connections committed, the loop's API connection among them."""
    store = await open_store(db_path)
    try:
        await store.commit_turn(ALICE, "c", system=None, turn=turn(1))
        assert len((await store.load_history(ALICE, "c", limit=10)).messages) == 2  # cached
        await store.append_items(
            ALICE, "c", system=None, items=[{"role": "user", "content": "from the API"}]
        )
        history = await store.load_history(ALICE, "c", limit=10)
        assert [m["content"] for m in history.messages] == ["q1", "a1", "from the API"]
        assert (await store.delete_item(ALICE, "c", 3)) is not None
        history = await store.load_history(ALICE, "c", limit=10)
        assert [m["content"] for m in history.messages] == ["q1", "a1"]
    finally:
        await store.close()


async def test_a_connection_is_rolled_back_when_given_back_only_if_it_is_in_a_transaction(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On SQLite every call on a pooled connection is a pass of the event loop (aiosqlite's
    thread), and the pool rolled back every connection given back, after a COMMIT too:
    one pass more for each query, which a busy loop makes long.  Now only a connection
    still in a transaction is rolled back, and that one is: it would hold the write lock
    for every other writer."""
    from sqlalchemy.util import greenlet_spawn

    calls = _count_aiosqlite_calls(monkeypatch)
    # Every query on SQLAlchemy's pool (the Conversations API's take the loop's own
    # connection otherwise, see test_api_queries_take_no_pass_of_the_event_loop).
    store = await open_store(db_path, one_hop=False)
    try:
        calls.clear()
        await store.create_conversation(ALICE, "c", metadata={}, system=None, items=[])
        assert calls[-1] == "commit" and "rollback" not in calls
        assert await store.get_conversation(ALICE, "c") is not None
        pooled = await store.engine.raw_connection()
        await pooled.driver_connection.execute("BEGIN IMMEDIATE")  # given back in it
        calls.clear()
        await greenlet_spawn(pooled.close)
        assert calls == ["rollback"]
        other = sqlite3.connect(db_path, timeout=0, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")  # "database is locked" if it were still held
            other.execute("ROLLBACK")
        finally:
            other.close()
    finally:
        await store.close()
