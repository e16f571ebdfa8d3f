"""PostgreSQL-only storage behaviour: retried conflicts, statement and pool timeouts,
cancelled queries that leave no connection behind, and pruning that never waits."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import random
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from helpers import EVERY_FIELD_TURN, TOOL_CALL, open_store
from pg import connect, fetch, sqlalchemy_url
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DisconnectionError

from chatmem.config import StorageConfig
from chatmem.errors import StorageUnavailable
from chatmem.storage import Owner, Store, create_engine
from chatmem.storage.queries import WRITE_ATTEMPTS

ALICE = Owner("team-a", "alice")


def turn(i: int) -> list[dict[str, Any]]:
    return [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]


@pytest.fixture
async def store(pg_url: str) -> AsyncIterator[Store]:
    store = await open_store(pg_url)
    yield store
    await store.close()


async def inject_failures(url: str, code: str, times: int) -> None:
    """The next ``times`` turn commits fail with SQLSTATE ``code``.  A sequence
    counts them: nextval is not rolled back with the failed transaction."""
    conn = await connect(url)
    try:
        await conn.execute(f"""
            CREATE SEQUENCE injected_failures;
            CREATE FUNCTION fail_insert() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF nextval('injected_failures') <= {times} THEN
                    RAISE EXCEPTION 'injected' USING ERRCODE = '{code}';
                END IF;
                RETURN NEW;
            END $$;
            CREATE TRIGGER fail_insert BEFORE INSERT ON conversations
                FOR EACH STATEMENT EXECUTE FUNCTION fail_insert();
        """)
    finally:
        await conn.close()


async def test_a_caller_that_stops_waiting_does_not_stop_the_commit(
    store: Store, pg_url: str
) -> None:
    """On PostgreSQL a turn commits in a task of its own; the future a caller awaits only
    reports on it, so cancelling that future (a handler cancelled while it waits, with no
    ``asyncio.shield``) leaves the commit to finish, and ``decided`` is still told."""
    told: list[BaseException | None] = []
    decided = asyncio.get_running_loop().create_future()

    def tell(failure: BaseException | None) -> None:
        told.append(failure)
        decided.set_result(None)

    waiter = store.commit_turn_soon(ALICE, "c", system=None, turn=turn(1), decided=tell)
    waiter.cancel()
    await asyncio.wait_for(decided, 20)
    assert told == [None]
    assert await fetch(pg_url, "SELECT seq, content FROM messages ORDER BY seq") == [
        {"seq": 1, "content": '"q1"'},
        {"seq": 2, "content": '"a1"'},
    ]
    assert not store._committing


@pytest.mark.parametrize("code", ["40001", "40P01"])  # serialization failure, deadlock
async def test_conflicts_are_retried(store: Store, pg_url: str, code: str) -> None:
    await inject_failures(pg_url, code, WRITE_ATTEMPTS - 1)
    await store.commit_turn(ALICE, "c", system=None, turn=turn(1))
    rows = await fetch(pg_url, "SELECT seq, role FROM messages ORDER BY seq")
    assert rows == [{"seq": 1, "role": "user"}, {"seq": 2, "role": "assistant"}]
    assert await fetch(pg_url, "SELECT last_seq FROM conversations") == [{"last_seq": 2}]
    calls = await fetch(pg_url, "SELECT last_value FROM injected_failures")
    assert calls == [{"last_value": WRITE_ATTEMPTS}]


async def test_endless_conflicts_are_a_503_and_store_nothing(store: Store, pg_url: str) -> None:
    await inject_failures(pg_url, "40001", 1000)
    with pytest.raises(StorageUnavailable, match="busy"):
        await store.commit_turn(ALICE, "c", system=None, turn=turn(1))
    assert await fetch(pg_url, "SELECT last_value FROM injected_failures") == [
        {"last_value": WRITE_ATTEMPTS}
    ]
    assert await fetch(pg_url, "SELECT count(*) AS n FROM conversations") == [{"n": 0}]


async def lock_conversation(url: str, conversation_id: str) -> asyncpg.Connection:
    """Another client holding the conversation's row lock in an open transaction."""
    conn = await connect(url)
    await conn.execute("BEGIN")
    await conn.execute("SELECT 1 FROM conversations WHERE id = $1 FOR UPDATE", conversation_id)
    return conn


async def busy_backends(url: str) -> list[dict[str, Any]]:
    return await fetch(
        url,
        "SELECT state, wait_event_type FROM pg_stat_activity "
        "WHERE application_name = 'chatmem' AND datname = current_database() "
        "AND state <> 'idle'",
    )


async def wait_until_blocked(url: str) -> None:
    for _ in range(600):
        rows = await busy_backends(url)
        if any(r["wait_event_type"] == "Lock" for r in rows):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the commit never waited for the lock")


async def test_cancelled_mid_query_leaves_no_connection_behind(pg_url: str) -> None:
    store = await open_store(pg_url, pool_size=2, max_overflow=0)
    try:
        await store.commit_turn(ALICE, "c", system=None, turn=turn(1))
        holder = await lock_conversation(pg_url, "c")
        for i in range(5):  # more cancellations than the pool has connections
            task = asyncio.create_task(store.commit_turn(ALICE, "c", system=None, turn=turn(i)))
            await wait_until_blocked(pg_url)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        await holder.execute("ROLLBACK")
        await holder.close()
        pool: Any = store.engine.pool
        assert pool.checkedout() == 0
        for _ in range(600):  # the server side ends too: nothing active, nothing idle in tx
            if not await busy_backends(pg_url):
                break
            await asyncio.sleep(0.05)
        assert await busy_backends(pg_url) == []
        # No cancelled turn was committed, and the store still works.
        await store.commit_turn(ALICE, "c", system=None, turn=turn(9))
        rows = await fetch(pg_url, "SELECT seq FROM messages ORDER BY seq")
        assert [r["seq"] for r in rows] == [1, 2, 3, 4]
    finally:
        await store.close()


async def test_statement_timeout_is_a_503(pg_url: str) -> None:
    store = await open_store(pg_url, statement_timeout=0.3)
    try:
        await store.commit_turn(ALICE, "c", system=None, turn=turn(1))
        holder = await lock_conversation(pg_url, "c")
        try:
            with pytest.raises(StorageUnavailable, match="unavailable"):
                await store.commit_turn(ALICE, "c", system=None, turn=turn(2))
        finally:
            await holder.close()
        pool: Any = store.engine.pool
        assert pool.checkedout() == 0
        await store.commit_turn(ALICE, "c", system=None, turn=turn(3))
        assert len((await store.load_history(ALICE, "c", 10)).messages) == 4
    finally:
        await store.close()


async def test_pool_exhaustion_is_a_503(pg_url: str) -> None:
    store = await open_store(pg_url, pool_size=1, max_overflow=0, pool_timeout=0.2)
    try:
        await store.commit_turn(ALICE, "c", system=None, turn=turn(1))
        holder = await lock_conversation(pg_url, "c")
        blocked = asyncio.create_task(store.commit_turn(ALICE, "c", system=None, turn=turn(2)))
        await wait_until_blocked(pg_url)
        with pytest.raises(StorageUnavailable):
            await store.load_history(ALICE, "c", 10)
        await holder.execute("ROLLBACK")
        await holder.close()
        await blocked  # released: the waiting turn commits
        assert len((await store.load_history(ALICE, "c", 10)).messages) == 4
    finally:
        await store.close()


async def test_prune_skips_a_conversation_a_live_turn_holds(store: Store, pg_url: str) -> None:
    for name in ("a", "b", "c"):
        await store.commit_turn(ALICE, name, system=None, turn=turn(1))
    conn = await connect(pg_url)
    await conn.execute("UPDATE conversations SET updated_at = 0")
    await conn.close()
    holder = await lock_conversation(pg_url, "b")
    try:
        # Would wait forever for the lock without SKIP LOCKED; the guard only stops a hang.
        assert await asyncio.wait_for(store.prune(86400, batch_size=1), 60) == 2
    finally:
        await holder.close()
    assert await fetch(pg_url, "SELECT id FROM conversations") == [{"id": "b"}]
    assert await store.prune(86400) == 1


async def test_history_and_retention_queries_have_their_indexes(store: Store, pg_url: str) -> None:
    """The plans PostgreSQL would use once tables are big (seq scans are disabled so the
    tiny test tables do not make a scan look cheaper)."""
    await store.commit_turn(ALICE, "c", system=None, turn=turn(1))
    conn = await connect(pg_url)
    try:
        await conn.execute("SET enable_seqscan = off")
        history = await conn.fetch(
            "EXPLAIN SELECT role, content FROM messages WHERE conversation_pk = 1 "
            "ORDER BY seq DESC LIMIT 200"
        )
        old = await conn.fetch(
            "EXPLAIN SELECT pk FROM conversations WHERE updated_at < 100 "
            "ORDER BY updated_at LIMIT 200"
        )
    finally:
        await conn.close()
    history_plan = " ".join(row[0] for row in history)
    assert "Index Scan Backward using uq_messages_seq" in history_plan
    assert "Sort" not in history_plan
    assert "ix_conversations_updated" in " ".join(row[0] for row in old)


@pytest.mark.parametrize("writer_direct", [True, False], ids=["asyncpg", "sqlalchemy"])
@pytest.mark.parametrize("limit", [1, 3, 200])
async def test_asyncpg_and_sqlalchemy_paths_agree(
    pg_url: str, writer_direct: bool, limit: int
) -> None:
    """The per-request queries on asyncpg itself and SQLAlchemy's statements write the
    same rows, byte for byte, and read each other's: windows, the system prompt kept and
    replaced, NULLs, tool calls and results."""
    writer = await open_store(pg_url, one_hop=writer_direct)
    reader = await open_store(pg_url, one_hop=not writer_direct)
    first = EVERY_FIELD_TURN
    stored = [*first, *turn(2), *turn(3)]
    try:
        await writer.commit_turn(
            ALICE, "x", system=[{"role": "system", "content": "s"}], turn=first
        )
        await writer.commit_turn(ALICE, "x", system=None, turn=turn(2))  # keeps "s"
        for store in (writer, reader):
            history = await store.load_history(ALICE, "x", limit=limit)
            assert history.system == [{"role": "system", "content": "s"}]
        await writer.commit_turn(
            ALICE, "x", system=[{"role": "system", "content": "t"}], turn=turn(3)
        )
        expected = [
            {"role": m["role"], "content": m.get("content")}
            | {k: m[k] for k in ("name", "tool_calls", "tool_call_id") if k in m}
            # A tool call's reasoning goes again (memory.resend_reasoning's default).
            | ({"reasoning_content": m["reasoning"]} if "tool_calls" in m else {})
            for m in stored[-limit:]
        ]
        while expected and expected[0]["role"] == "tool":  # a result without its call
            expected.pop(0)
        for store in (writer, reader):
            history = await store.load_history(ALICE, "x", limit=limit)
            assert history.system == [{"role": "system", "content": "t"}]
            assert history.messages == expected
            assert (await store.load_history(ALICE, "nobody", limit=limit)).messages == []
    finally:
        await writer.close()
        await reader.close()
    rows = await fetch(
        pg_url,
        "SELECT seq, role, content::text, name, tool_calls::text, tool_call_id, reasoning,"
        " model, finish_reason, usage::text FROM messages ORDER BY seq",
    )
    assert [r["seq"] for r in rows] == list(range(1, len(stored) + 1))
    assert rows[1] == {
        "seq": 2,
        "role": "assistant",
        "content": None,
        "name": None,
        "tool_calls": json.dumps(TOOL_CALL),
        "tool_call_id": None,
        "reasoning": "r",
        "model": "m",
        "finish_reason": "tool_calls",
        "usage": '{"total_tokens": 3}',
    }
    assert rows[0]["content"] == json.dumps([{"type": "text", "text": "é \u2028"}])


async def in_transaction(url: str) -> list[dict[str, Any]]:
    return await fetch(
        url,
        "SELECT state FROM pg_stat_activity WHERE application_name = 'chatmem'"
        " AND datname = current_database() AND state LIKE 'idle in transaction%'",
    )


async def test_a_write_cancelled_at_any_point_leaves_no_transaction_behind(pg_url: str) -> None:
    # Cancelled while its BEGIN is on the way, asyncpg and the server both keep a
    # transaction open on the pooled connection; every later turn on it then ran inside
    # that transaction, looked committed and was not, holding the conversation's lock.
    for iterations in range(1, 16):
        store = await open_store(pg_url, pool_size=1, max_overflow=0)
        conversation = f"c{iterations}"
        try:
            await store.commit_turn(ALICE, conversation, system=None, turn=turn(1))
            task = asyncio.ensure_future(
                store.commit_turn(ALICE, conversation, system=None, turn=turn(2))
            )
            for _ in range(iterations):
                await asyncio.sleep(0)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await store.commit_turn(ALICE, conversation, system=None, turn=turn(3))
            assert await in_transaction(pg_url) == []
            # Seen by another session: committed, not inside a transaction left open.
            rows = await fetch(
                pg_url,
                "SELECT m.content::text AS content FROM messages m JOIN conversations c"
                " ON c.pk = m.conversation_pk WHERE c.id = $1 ORDER BY m.seq",
                conversation,
            )
            assert [json.loads(r["content"]) for r in rows][-2:] == [
                m["content"] for m in turn(3)
            ], iterations
        finally:
            await store.close()


async def test_a_write_cancelled_twice_while_it_waits_leaves_a_usable_pool(pg_url: str) -> None:
    # The second cancel came while asyncpg waited to send its ROLLBACK: the connection
    # went back "idle in transaction (aborted)" and every later query on it failed.
    for iterations in range(4):
        store = await open_store(pg_url, pool_size=1, max_overflow=0, pool_timeout=5)
        conversation = f"d{iterations}"
        try:
            await store.commit_turn(ALICE, conversation, system=None, turn=turn(1))
            holder = await lock_conversation(pg_url, conversation)
            task = asyncio.ensure_future(
                store.commit_turn(ALICE, conversation, system=None, turn=turn(2))
            )
            await wait_until_blocked(pg_url)
            task.cancel()
            for _ in range(iterations):
                await asyncio.sleep(0)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await holder.execute("ROLLBACK")
            await holder.close()
            await store.commit_turn(ALICE, conversation, system=None, turn=turn(3))
            history = await store.load_history(ALICE, conversation, 10)
            assert [m["content"] for m in history.messages] == [
                m["content"] for m in (*turn(1), *turn(3))
            ]
            await store.update_metadata(ALICE, conversation, {"after": "cancel"})
        finally:
            await store.close()


async def test_halves_of_a_surrogate_pair_in_text_columns_are_stored_as_text(
    store: Store, pg_url: str
) -> None:
    # Streamed reasoning can hold an emoji's two halves, each from its own chunk, and a
    # lone half; PostgreSQL cannot store them as they are, and the whole turn was lost.
    answer = {
        "role": "assistant",
        "content": "smile \ud83d\ude00",
        "reasoning": "thought \ud83d\ude00 and \udc00",
        "model": "m\ud800",
    }
    await store.commit_turn(ALICE, "s", system=None, turn=[*turn(1)[:1], answer])
    rows = await fetch(
        pg_url, "SELECT content::text AS content, reasoning, model FROM messages WHERE seq = 2"
    )
    assert json.loads(rows[0]["content"]) == "smile \U0001f600"
    assert rows[0]["reasoning"] == "thought \U0001f600 and \ufffd"
    assert rows[0]["model"] == "m\ufffd"


async def test_nul_in_the_upstreams_text_fields_is_stored_as_u_fffd(
    store: Store, pg_url: str
) -> None:
    # PostgreSQL's text columns refuse NUL (a client's NUL is a 400 before the upstream
    # is asked); the upstream's model and reasoning may hold one, and the turn was lost.
    answer = {
        "role": "assistant",
        "content": "nul \x00 kept",
        "reasoning": "a\x00b",
        "model": "m\x00x",
        "finish_reason": "st\x00op",
    }
    await store.commit_turn(ALICE, "n", system=None, turn=[*turn(1)[:1], answer])
    rows = await fetch(
        pg_url,
        "SELECT content::text AS content, reasoning, model, finish_reason FROM messages"
        " WHERE seq = 2",
    )
    assert json.loads(rows[0]["content"]) == "nul \x00 kept"  # JSON escapes it
    assert (rows[0]["reasoning"], rows[0]["model"]) == ("a\ufffdb", "m\ufffdx")
    assert rows[0]["finish_reason"] == "st\ufffdop"


async def test_a_server_that_closes_every_new_connection_is_a_503(store: Store) -> None:
    # While PostgreSQL shuts down it may accept a connection and close it at once: the
    # pool then gives up after three tries with an error of its own, which reached the
    # client as a 500.
    @event.listens_for(store.engine.sync_engine, "checkout")
    def closed_again(*_args: Any) -> None:
        raise DisconnectionError("closed as soon as it was made")

    with pytest.raises(StorageUnavailable):
        await store.load_history(ALICE, "c", 10)
    with pytest.raises(StorageUnavailable):
        await store.commit_turn(ALICE, "c", system=None, turn=turn(1))
    # And on SQLAlchemy's paths (the Conversations API, readiness, retention).
    with pytest.raises(StorageUnavailable):
        await store.ping()
    with pytest.raises(StorageUnavailable):
        await store.update_metadata(ALICE, "c", {"k": "v"})


async def turns_are_unavailable(store: Store) -> None:
    """A turn's read and its commit both say the store is unavailable (a 503)."""
    with pytest.raises(StorageUnavailable):
        await store.load_history(ALICE, "c1", 10)
    with pytest.raises(StorageUnavailable):
        await store.commit_turn(ALICE, "c1", system=None, turn=turn(1))


async def test_a_peer_that_is_not_postgresql_is_unavailable() -> None:
    """Something else answers on the database's port (a broken pooler, a wrong port):
    asyncpg fails to connect with errors of its own (an ``AttributeError`` for a
    ReadyForQuery before any authentication).  The turn's checkout says the store is
    unavailable (a 503), not an internal error."""

    async def not_postgresql(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)  # the startup message
        writer.write(b"Z\x00\x00\x00\x05I")  # ReadyForQuery, out of turn
        await writer.drain()
        await reader.read(100)  # until the client gives up
        writer.close()

    server = await asyncio.start_server(not_postgresql, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    engine = create_engine(
        StorageConfig(
            # No SSL request first: the startup message is what the peer answers out of turn.
            url=f"postgresql+asyncpg://chatmem@127.0.0.1:{port}/chatmem?ssl=disable",
            connect_timeout=5,
        )
    )
    store = Store(engine)
    try:
        await turns_are_unavailable(store)
    finally:
        await store.close()
        server.close()
        await server.wait_closed()


async def test_a_database_dropped_under_the_gateway_is_unavailable_quietly(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The database is dropped while the gateway runs: every turn's checkout fails with
    the driver's own error (``database ... does not exist``), raised by the dialect's
    adapter since the fast path checks raw connections out.  A 503 each, and no
    traceback in the log for every request (the README: the class of the cause, never
    its text)."""
    store = await open_store(pg_url)
    try:
        await store.load_history(ALICE, "c", 10)  # the pool holds a connection now
        name = make_url(pg_url).database
        admin = await connect(sqlalchemy_url("postgres"))
        try:
            await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        finally:
            await admin.close()
        for _ in range(3):
            await turns_are_unavailable(store)
    finally:
        await store.close()
    assert not [r for r in caplog.records if r.exc_info is not None or r.levelno >= 40]


async def test_row_numbers_and_times_go_past_32_bits(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Item 141: ``integer`` row numbers, never given back, stopped every commit after
    2**31 of them (a turn takes one of each sequence, a deleted item or a readiness probe
    one too), once the model had answered; the Unix times would have ended in 2038.
    Migration 0006 makes them ``bigint``: upgraded from 0005 with rows in it, the rows
    are kept and the numbers go on past 2**31."""
    from chatmem.storage.migrate import downgrade, upgrade

    store = await open_store(pg_url)
    try:
        await store.commit_turn(ALICE, "before", system=None, turn=turn(0))
        await downgrade(store.engine, "0005")
        conn = await connect(pg_url)
        try:
            assert await column_types(conn) == {"integer"}
            await upgrade(store.engine)
            assert await column_types(conn) == {"bigint"}
            for table in ("conversations", "messages"):
                await conn.execute(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'pk'), 3000000000)"
                )
        finally:
            await conn.close()
        later = 2**32 + 5  # a time past January 2038, as Unix seconds
        monkeypatch.setattr("chatmem.storage.queries.time.time", lambda: float(later))
        for i in (1, 2):
            await store.commit_turn(ALICE, "after", system=None, turn=turn(i))
        history = await store.load_history(ALICE, "after", 10)
        assert [m["content"] for m in history.messages] == ["q1", "a1", "q2", "a2"]
        kept = await store.load_history(ALICE, "before", 10)
        assert [m["content"] for m in kept.messages] == ["q0", "a0"]
        rows = await fetch(pg_url, "SELECT pk, created_at FROM messages ORDER BY pk")
        assert [row["pk"] > 3_000_000_000 for row in rows] == [False, False, True, True, True, True]
        assert {row["created_at"] for row in rows[2:]} == {later}
    finally:
        await store.close()


async def column_types(conn: asyncpg.Connection) -> set[str]:
    """The types of the row numbers, what points at them, and the times."""
    rows = await conn.fetch(
        "SELECT data_type FROM information_schema.columns WHERE table_name IN"
        " ('conversations', 'messages', 'history_blocks') AND column_name IN"
        " ('pk', 'conversation_pk', 'created_at', 'updated_at')"
    )
    sequences = await conn.fetch("SELECT data_type FROM information_schema.sequences")
    return {row["data_type"] for row in [*rows, *sequences]}


async def test_tables_dropped_under_the_gateway_are_unavailable(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The schema taken away while the gateway runs (``chatmem db downgrade base``, a
    database made anew): a 503 for every turn, as SQLite's "no such table" is, where it
    was a 500 with a traceback for every request (item 140)."""
    store = await open_store(pg_url)
    try:
        await store.commit_turn(ALICE, "c", system=None, turn=turn(0))
        conn = await connect(pg_url)
        try:
            await conn.execute("DROP TABLE history_blocks, messages, conversations CASCADE")
        finally:
            await conn.close()
        for _ in range(2):
            await turns_are_unavailable(store)
        with pytest.raises(StorageUnavailable):
            await store.check_ready()
    finally:
        await store.close()
    assert not [r for r in caplog.records if r.exc_info is not None or r.levelno >= 40]


async def test_connections_given_back_while_cancelled_are_given_back_whole(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Reads and commits cancelled at random points, some twice, with overflow
    connections (which are closed when given back, and that close waits on the server).
    A cancel that lands while a connection is given back must not cut the giving back
    short: SQLAlchemy then logs "Exception closing connection" and tidies up after it.
    Afterwards the pool holds its connections, none checked out or in a transaction."""
    store = await open_store(pg_url, pool_size=2, max_overflow=2, pool_timeout=5)
    pool = store.engine.sync_engine.pool
    shuffle = random.Random(8)
    try:
        for round_ in range(150):  # bounded
            conversation = f"g{round_ % 5}"

            async def read(conversation: str = conversation) -> None:
                await store.load_history(ALICE, conversation, 50)

            async def write(conversation: str = conversation) -> None:
                await store.commit_turn(ALICE, conversation, system=None, turn=turn(1))

            tasks = [asyncio.ensure_future(work()) for work in (read, write, read, read)]
            await asyncio.sleep(shuffle.uniform(0, 0.004))
            for task in tasks:
                if shuffle.random() < 0.7:
                    task.cancel()
            await asyncio.sleep(shuffle.uniform(0, 0.002))
            for task in tasks:
                if shuffle.random() < 0.3:
                    task.cancel()  # a second cancel, maybe while the connection goes back
            await asyncio.gather(*tasks, return_exceptions=True)
        assert "Exception closing connection" not in caplog.text
        assert pool.checkedout() == 0  # type: ignore[attr-defined]
        await store.load_history(ALICE, "g0", 5)  # the pool still serves
        assert await in_transaction(pg_url) == []
    finally:
        await store.close()


async def test_connections_the_server_ends_under_traffic_are_503s(pg_url: str) -> None:
    """The server ends the gateway's connections (pg_terminate_backend, as an admin or a
    failover does) while turns run.  One that waited in the pool can reach a request
    before asyncpg has seen its socket close: its next statement fails with
    InternalClientError ("cannot switch to state ..."), which was a 500.  Every failure
    is a 503 now, the pool recovers by itself, and every stored turn is whole."""
    store = await open_store(pg_url, pool_size=4)
    admin = await connect(pg_url)
    outcomes: dict[str, int] = {}
    stop = asyncio.Event()

    async def client(k: int) -> None:
        i = 0
        while not stop.is_set():  # bounded: stop is set after the terminations below
            i += 1
            try:
                if i % 2:
                    await store.load_history(ALICE, f"t{k}", 50)
                else:
                    await store.commit_turn(ALICE, f"t{k}", system=None, turn=turn(i))
                outcome = "ok"
            except StorageUnavailable:
                outcome = "503"
            except Exception as exc:  # what else arrives is the finding
                outcome = type(exc).__name__
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            await asyncio.sleep(0)

    clients = [asyncio.create_task(client(k)) for k in range(8)]
    terminated = 0
    try:
        for _ in range(10):
            await asyncio.sleep(0.2)
            terminated += await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE application_name = 'chatmem' AND datname = current_database()"
            )
        await asyncio.sleep(0.3)
    finally:
        stop.set()
        await asyncio.gather(*clients)
    try:
        assert terminated > 0
        assert set(outcomes) <= {"ok", "503"}, outcomes
        await store.load_history(ALICE, "t0", 5)  # and the pool serves again
        rows = await admin.fetch(
            "SELECT c.id, m.seq, m.role FROM messages m JOIN conversations c"
            " ON c.pk = m.conversation_pk ORDER BY c.id, m.seq"
        )
        by_conversation: dict[str, list[str]] = {}
        for row in rows:
            by_conversation.setdefault(row["id"], []).append(row["role"])
        for roles in by_conversation.values():
            assert roles == ["user", "assistant"] * (len(roles) // 2)
    finally:
        await admin.close()
        await store.close()


async def test_deleting_a_tool_call_takes_its_results_on_postgresql(store: Store) -> None:
    """tool_calls is JSONB here: the call ids are read from it as from SQLite's JSON."""
    owner = Owner("t")
    calls = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    items = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "tool_call_id": "c1", "content": "r"},
    ]
    info = await store.create_conversation(owner, "tools", metadata={}, system=None, items=items)
    refused = await store.delete_item(owner, info.id, 3)
    assert refused is not None and (refused.seqs, refused.call_seq) == ([], 2)
    deleted = await store.delete_item(owner, info.id, 2)
    assert deleted is not None and deleted.seqs == [2, 3]
    page = await store.list_items(owner, info.id, limit=10, after_seq=None, newest_first=False)
    assert page is not None and [row["seq"] for row in page.data] == [1]


async def test_a_delete_racing_an_append_of_the_results_leaves_no_orphan(store: Store) -> None:
    """The delete locks the conversation's row as the append does, and the append checks
    the call its result answers under that lock: never a result stored without its call.
    Two deletes of one item: one deletes it, the other finds nothing (None, a 404)."""
    from chatmem.errors import InvalidRequest
    from chatmem.proxy.conversation_shapes import check_tool_results

    owner = Owner("t")
    calls = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    result = [{"role": "tool", "tool_call_id": "c1", "content": "r"}]
    for attempt in range(12):  # bounded
        items = [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": None, "tool_calls": calls},
        ]
        info = await store.create_conversation(
            owner, f"race-{attempt}", metadata={}, system=None, items=items
        )
        outcomes = await asyncio.gather(
            store.delete_item(owner, info.id, 2),
            store.delete_item(owner, info.id, 2),
            store.append_items(
                owner,
                info.id,
                system=None,
                items=result,
                check_results=functools.partial(check_tool_results, result),
            ),
            return_exceptions=True,
        )
        assert sorted(o is None for o in outcomes[:2]) == [False, True], outcomes
        assert isinstance(outcomes[2], list | InvalidRequest), outcomes[2]  # appended, or refused
        page = await store.list_items(owner, info.id, limit=10, after_seq=None, newest_first=False)
        assert page is not None and [row["role"] for row in page.data] == ["user"]


async def test_deletes_of_a_conversation_and_of_its_items_do_not_deadlock(store: Store) -> None:
    """Both take the conversation's row before its messages, as turns do: run together,
    neither fails (a deadlock would be a 503) and the conversation is gone."""
    owner = Owner("t")
    for attempt in range(12):  # bounded
        items = [{"role": "user", "content": f"q{i}"} for i in range(4)]
        info = await store.create_conversation(
            owner, f"gone-{attempt}", metadata={}, system=None, items=items
        )
        outcomes = await asyncio.gather(
            store.delete_item(owner, info.id, 2),
            store.delete_conversation(owner, info.id),
            store.delete_item(owner, info.id, 3),
        )
        assert outcomes[1] is True
        assert await store.get_conversation(owner, info.id) is None


async def test_a_read_whose_prepared_plan_a_migration_invalidated_runs_again(
    pg_url: str,
) -> None:
    """``chatmem db downgrade``/``upgrade`` under a running gateway changes a column's
    type; asyncpg then refuses each pooled connection's cached plan of a statement over it
    once (``InvalidCachedStatementError``), and ``/v1/ready``'s read was a 500 with a
    traceback (found by a review).  SQLAlchemy's adapter drops its caches on it: the read
    runs again, and answers."""
    store = await open_store(pg_url, pool_size=1)
    admin = await connect(pg_url)
    try:
        await store.ping()  # the statement is prepared and cached on the one connection
        await admin.execute("ALTER TABLE conversations ALTER COLUMN pk TYPE integer")
        await store.ping()
    finally:
        await admin.close()
        await store.close()
