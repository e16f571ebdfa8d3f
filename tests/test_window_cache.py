"""The window cache of the SQLite fast path: a conversation that goes on is not read again,
and every write the cache did not make itself (another connection, another process, the
Conversations API, the writer thread) is seen at the next read.

Real SQLite files; what the cache returns is compared with what the SQLAlchemy path reads
from the same rows, and the statements run are traced on the gateway's own connection.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from helpers import open_store

from chatmem.storage import Owner, Store
from chatmem.storage.texts import Texts
from chatmem.storage.window_cache import WindowCache, _size

ALICE = Owner("team-a", "alice")
SYSTEM = [{"role": "system", "content": "be brief"}]


def turn(i: int) -> list[dict[str, Any]]:
    return [
        {"role": "user", "content": f'q{i} \u00e9\U0001f600 "quoted"\n', "name": "al"},
        {"role": "assistant", "content": f"a{i}", "finish_reason": "stop", "model": "m"},
    ]


@pytest.fixture
async def reference(db_path: Path, sqlite_store: Store) -> AsyncIterator[Store]:
    """The SQLAlchemy path on the same file: what a read without any cache gives."""
    other = await open_store(db_path, one_hop=False)
    yield other
    await other.close()


def traced(sqlite_store: Store) -> list[str]:
    turns = sqlite_store._turns
    assert turns is not None
    statements: list[str] = []
    turns._loop_connection().set_trace_callback(statements.append)
    return statements


async def same_as_database(sqlite_store: Store, reference: Store, cid: str, limit: int) -> None:
    cached = await sqlite_store.load_history(ALICE, cid, limit)
    fresh = await reference.load_history(ALICE, cid, limit)
    assert (cached.system, cached.messages) == (fresh.system, fresh.messages)
    assert cached.last_seq == fresh.last_seq  # what a commit checks the turn against


async def test_a_conversation_that_goes_on_is_not_read_again(
    sqlite_store: Store, reference: Store
) -> None:
    statements = traced(sqlite_store)
    # As the gateway goes: read (a new conversation), commit, read, commit...
    assert (await sqlite_store.load_history(ALICE, "c", limit=10)).messages == []
    # A new conversation, the cache still empty: one statement, no pragma, in the read
    # transaction of the event loop's pass.
    assert statements == [
        "BEGIN",
        "SELECT pk, system_prompt, last_seq FROM conversations"
        " WHERE tenant = 'team-a' AND user_id = 'alice' AND id = 'c'",
    ]
    await sqlite_store.commit_turn(ALICE, "c", system=SYSTEM, turn=turn(1))
    for i in range(2, 5):
        history = await sqlite_store.load_history(ALICE, "c", limit=10)
        assert [m["content"] for m in history.messages][-1] == f"a{i - 1}"
        assert history.last_seq == 2 * (i - 1)
        # Nothing came between the read and the commit: the turn is not checked again.
        await sqlite_store.commit_turn(ALICE, "c", system=None, turn=turn(i), after=history.read_at)
    reads = [s for s in statements if s.startswith("SELECT")]
    # The first read, a miss; the second turn's, which caches the window (a conversation
    # is cached from its second turn on); none after.
    conversation = "SELECT pk, system_prompt, last_seq FROM conversations WHERE"
    window = "SELECT role, content, name, tool_calls, tool_call_id, "  # the reasoning to send
    assert [s[: len(conversation)] for s in reads[:2]] == [conversation] * 2
    assert len(reads) == 3 and reads[2].startswith(window) and "FROM messages" in reads[2]
    # Read in the transaction that cached the window, then checked before each hit.
    assert sum(s == "PRAGMA data_version" for s in statements) == 3
    await same_as_database(sqlite_store, reference, "c", 10)


async def test_a_conversation_of_one_turn_is_not_cached(sqlite_store: Store) -> None:
    """A flood of one-turn conversations must not push out the windows of those that go on."""
    turns = sqlite_store._turns
    assert turns is not None
    await sqlite_store.commit_turn(ALICE, "goes-on", system=None, turn=turn(1))
    await sqlite_store.load_history(ALICE, "goes-on", 10)  # its second turn: cached
    for i in range(5):
        assert (await sqlite_store.load_history(ALICE, f"once-{i}", 10)).messages == []
        await sqlite_store.commit_turn(ALICE, f"once-{i}", system=None, turn=turn(i))
    assert len(turns._windows) == 1 and ("team-a", "alice", "goes-on") in turns._windows


async def test_the_cached_window_keeps_to_its_limit(sqlite_store: Store, reference: Store) -> None:
    for i in range(1, 8):
        await sqlite_store.commit_turn(ALICE, "c", system=None, turn=turn(i))
        await same_as_database(sqlite_store, reference, "c", 5)  # odd: a window can start mid-turn


async def test_a_new_system_prompt_replaces_the_cached_one(
    sqlite_store: Store, reference: Store
) -> None:
    await sqlite_store.commit_turn(ALICE, "c", system=SYSTEM, turn=turn(1))
    await sqlite_store.load_history(ALICE, "c", 10)
    new = [{"role": "developer", "content": "be long"}]
    await sqlite_store.commit_turn(ALICE, "c", system=new, turn=turn(2))
    assert (await sqlite_store.load_history(ALICE, "c", 10)).system == new
    await same_as_database(sqlite_store, reference, "c", 10)


async def test_another_process_writing_is_seen(sqlite_store: Store, db_path: Path) -> None:
    await sqlite_store.commit_turn(ALICE, "c", system=None, turn=turn(1))
    await sqlite_store.load_history(ALICE, "c", 10)  # cached
    elsewhere = await open_store(db_path)  # its own connections, as another process has
    try:
        await elsewhere.commit_turn(ALICE, "c", system=None, turn=turn(2))
    finally:
        await elsewhere.close()
    history = await sqlite_store.load_history(ALICE, "c", 10)
    assert [m["content"] for m in history.messages][2:] == [turn(2)[0]["content"], "a2"]


async def test_a_miss_skips_the_pragma_and_a_write_elsewhere_is_still_seen(
    sqlite_store: Store, db_path: Path
) -> None:
    """A miss reads the database anyway, so only a cached window is checked against
    ``data_version``; a write elsewhere before the miss is still caught at the next hit."""
    await sqlite_store.commit_turn(ALICE, "a", system=None, turn=turn(1))
    await sqlite_store.load_history(ALICE, "a", 10)  # cached, and validated
    elsewhere = await open_store(db_path)
    try:
        await elsewhere.commit_turn(ALICE, "a", system=None, turn=turn(2))
    finally:
        await elsewhere.close()
    statements = traced(sqlite_store)
    assert (await sqlite_store.load_history(ALICE, "new", 10)).messages == []
    assert statements == [
        "BEGIN",
        "SELECT pk, system_prompt, last_seq FROM conversations"
        " WHERE tenant = 'team-a' AND user_id = 'alice' AND id = 'new'",
    ]
    history = await sqlite_store.load_history(ALICE, "a", 10)
    assert [m["content"] for m in history.messages][-1] == "a2"
    # Checked before the hit (it moved: a miss), then read with the window again.
    assert statements.count("PRAGMA data_version") == 2


async def test_the_reads_of_one_pass_share_one_transaction(sqlite_store: Store) -> None:
    """Each read transaction takes and gives back a lock on the ``-shm`` file, two system
    calls: the reads of one pass of the event loop share one, ended in the next pass."""
    statements = traced(sqlite_store)
    for cid in ("x", "y", "z"):  # none of these waits: all three in this pass
        assert (await sqlite_store.load_history(ALICE, cid, 10)).messages == []
    find = "SELECT pk, system_prompt, last_seq FROM conversations WHERE"
    assert [s[: len(find)] for s in statements] == ["BEGIN", find, find, find]
    await asyncio.sleep(0)
    assert statements[4:] == ["COMMIT"]
    await sqlite_store.load_history(ALICE, "x", 10)  # the next pass: a transaction anew
    assert statements[5] == "BEGIN" and statements[6].startswith(find)


async def test_the_pass_after_a_write_elsewhere_sees_it(sqlite_store: Store, db_path: Path) -> None:
    """The reads of a pass see the database as it was at the first of them: the requests
    they serve were received before it.  A commit of another connection during the pass
    is seen from the next, where the loop gets what came after it."""
    assert (await sqlite_store.load_history(ALICE, "c", 10)).messages == []
    other = sqlite3.connect(db_path, isolation_level=None)
    try:
        other.execute(
            "INSERT INTO conversations (id, tenant, user_id, last_seq, created_at, updated_at)"
            " VALUES ('c', 'team-a', 'alice', 0, 0, 0)"
        )
    finally:
        other.close()
    assert (await sqlite_store.load_history(ALICE, "c", 10)).pk == 0  # the same pass
    await asyncio.sleep(0)
    assert (await sqlite_store.load_history(ALICE, "c", 10)).pk != 0


async def test_a_commit_ends_the_pass_s_read(sqlite_store: Store, reference: Store) -> None:
    """A turn commits on the same connection in the pass that read it (``BEGIN IMMEDIATE``
    cannot start inside the read), and the next read, the same pass too, sees it."""
    statements = traced(sqlite_store)
    assert (await sqlite_store.load_history(ALICE, "c", 10)).messages == []
    await sqlite_store.commit_turn(ALICE, "c", system=None, turn=turn(1))
    assert statements[2:4] == ["COMMIT", "BEGIN IMMEDIATE"]
    assert len((await sqlite_store.load_history(ALICE, "c", 10)).messages) == 2
    await same_as_database(sqlite_store, reference, "c", 10)


async def test_a_read_on_the_reader_thread_begins_and_ends_its_own(sqlite_store: Store) -> None:
    """A read that finds the lock taken goes to the reader thread, whose connection is
    in no read of a pass: it reads in a transaction of its own, and ends it."""
    turns = sqlite_store._turns
    assert turns is not None
    await sqlite_store.commit_turn(ALICE, "c", system=SYSTEM, turn=turn(1))
    args = ("team-a", "alice", "c", 10, 0)
    on_loop = turns._load_window(turns._reading_connection(), *args)
    on_thread = await turns._run(turns._reader, turns._on_thread, turns._load_window, *args)
    pk, system, window, version, cut, last_seq = on_thread
    assert (pk, system, cut, last_seq) == (on_loop[0], SYSTEM, False, 2)
    assert window.body == on_loop[2].body and version is not None
    in_transaction = turns._reader.submit(lambda: turns._connection().in_transaction)
    assert in_transaction.result() is False


async def test_the_store_closes_with_the_pass_s_read_open(db_path: Path) -> None:
    """The loop's connection is closed on a thread: the read is ended on the loop before,
    so that its callback does not touch a connection being closed (it crashed Python)."""
    for _ in range(10):  # a race, were it there: the callback and the thread at once
        store = await open_store(db_path)
        await store.load_history(ALICE, "c", 10)
        await store.close()
        await asyncio.sleep(0)  # the read's callback runs: nothing left to end
    with sqlite3.connect(db_path) as conn:  # and the file is whole
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)


async def test_a_deleted_conversation_is_gone(sqlite_store: Store) -> None:
    await sqlite_store.commit_turn(ALICE, "c", system=None, turn=turn(1))
    assert (await sqlite_store.load_history(ALICE, "c", 10)).messages  # cached
    assert await sqlite_store.delete_conversation(ALICE, "c")  # the SQLAlchemy engine writes
    assert (await sqlite_store.load_history(ALICE, "c", 10)).messages == []


async def test_a_commit_that_waited_on_the_writer_thread_is_seen(
    sqlite_store: Store, reference: Store, db_path: Path
) -> None:
    await sqlite_store.commit_turn(ALICE, "c", system=None, turn=turn(1))
    await sqlite_store.load_history(ALICE, "c", 10)  # cached
    other = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    pending = asyncio.ensure_future(sqlite_store.commit_turn(ALICE, "c", system=None, turn=turn(2)))
    await asyncio.sleep(0.05)
    other.execute("COMMIT")
    other.close()
    await asyncio.wait_for(pending, 10)
    await same_as_database(sqlite_store, reference, "c", 10)


def test_the_cache_is_bounded() -> None:
    cache = WindowCache(max_bytes=1000, max_conversations=3)

    def user(text: bytes) -> Texts:
        return Texts.of([("user", text)])

    for i in range(5):
        cache.put(("t", "u", f"c{i}"), None, user(b"x" * 10), version=1, limit=10, last_seq=1, pk=1)
    assert len(cache) == 3 and cache.get(("t", "u", "c0")) is None
    cache.put(("t", "u", "big"), None, user(b"x" * 2000), version=1, limit=10, last_seq=1, pk=1)
    assert len(cache) == 0  # a window larger than the whole cache is not kept
    cache.put(("t", "u", "a"), None, user(b"1"), version=1, limit=10, last_seq=1, pk=1)
    # Read after another connection wrote: the windows read before may be stale.
    cache.put(("t", "u", "b"), None, user(b"2"), version=2, limit=10, last_seq=1, pk=1)
    assert cache.get(("t", "u", "a")) is None and cache.get(("t", "u", "b")) is not None
    cache.validate(sqlite3.connect(":memory:"), limit=20)  # another window size
    assert cache.get(("t", "u", "b")) is None


def test_the_cache_counts_its_bytes_as_windows_slide() -> None:
    """A commit adjusts the window's size by what came and what was cut off the front."""
    cache = WindowCache()
    key = ("t", "u", "c")
    first = Texts.of([("user", b"x" * 10), ("assistant", b"y" * 20)])
    cache.put(key, None, first, 1, 3, last_seq=2, pk=1)
    for i in range(5):
        turn = Texts.of([("user", b"q" * i), ("assistant", b"a" * (7 * i))])
        cache.committed(key, None, turn, last_seq=4 + 2 * i)
        window = cache._windows[key]
        assert len(window.messages) == 3
        assert window.size == cache._bytes == _size(window.messages)
    kept = cache.get(key)
    assert kept is not None and kept[0] is None and kept[2:] == (12, 1)
    assert kept[1].pairs() == [
        ("assistant", b"a" * 21),
        ("user", b"q" * 4),
        ("assistant", b"a" * 28),
    ]
    assert kept[1] == Texts(
        ["assistant", "user", "assistant"],
        b"a" * 21 + b"," + b"q" * 4 + b"," + b"a" * 28 + b",",
        [22, 5, 29],
    )


def test_a_window_cut_by_the_byte_budget_reads_no_further_rows() -> None:
    """A conversation of large items: the window is read newest first only until the
    budget is spent (read whole and cut afterwards, it held the event loop a second)."""
    from chatmem.storage.blocks import _AFTER, Window
    from chatmem.storage.rows import resent_reasoning

    db = sqlite3.connect(":memory:")
    db.execute(
        "CREATE TABLE messages (conversation_pk, seq, role, content, name, tool_calls,"
        " tool_call_id, reasoning)"
    )
    text = b'"' + b"x" * 998 + b'"'
    db.executemany(
        "INSERT INTO messages VALUES (1, ?, ?, ?, NULL, NULL, NULL, NULL)",
        [(seq, b"user", text) for seq in range(1, 51)],
    )
    query = _AFTER.format(reasoning=resent_reasoning("tool_turns"))
    rows = db.execute(query, (1, 0, 200))
    window = Window(200, 3500)
    window.add_rows(rows)
    assert window.cut and len(window.messages()) == 3  # the 3 newest of 1,027 bytes each
    assert window.messages().pairs()[0] == ("user", b'{"role":"user","content":' + text + b"}")
    with pytest.raises(sqlite3.ProgrammingError):  # closed: the other 46 were never read
        rows.fetchone()
    whole = Window(200, 0)
    whole.add_rows(db.execute(query, (1, 0, 200)))
    assert not whole.cut and len(whole.messages()) == 50
