"""``/v1/ready`` when the database answers reads but refuses writes: a SQLite file that
cannot grow (the gateway's file size limit, as on a full disk) and a PostgreSQL database
made read-only.  A real ``chatmem serve`` on each, asked over HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import signal
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp.test_utils import TestServer
from helpers import Process, free_port, open_store, upstream_url
from pg import connect, fetch
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from chatmem.errors import StorageUnavailable
from chatmem.mock_upstream import create_mock_app
from chatmem.storage import queries, sqlite_turns
from chatmem.storage.write_health import WriteHealth

REFUSED = {
    "message": "the conversation store refuses writes",
    "type": "server_error",
    "param": None,
    "code": "storage_unavailable",
}


@pytest.fixture
async def upstream(aiohttp_server: Any) -> TestServer:
    server: TestServer = await aiohttp_server(create_mock_app(tokens=4))
    return server


async def turn(session: aiohttp.ClientSession, base: str, words: str) -> tuple[int, Any]:
    body = {"model": "m", "messages": [{"role": "user", "content": words}]}
    headers = {"X-Conversation-Id": "c1"}
    async with session.post(base + "/v1/chat/completions", json=body, headers=headers) as resp:
        return resp.status, await resp.json()


async def ready(session: aiohttp.ClientSession, base: str) -> tuple[int, Any]:
    async with session.get(base + "/v1/ready") as resp:
        return resp.status, await resp.json()


async def ready_until(session: aiohttp.ClientSession, base: str, want: int) -> tuple[int, Any]:
    """``/v1/ready`` asked until its status is ``want`` (it probes a write at most once a
    second), for up to 10 s; its last answer."""
    for _ in range(100):
        status, body = await ready(session, base)
        if status == want:
            break
        await asyncio.sleep(0.1)
    return status, body


async def refuses_and_recovers(
    base: str,
    refuse: Callable[[], Awaitable[None]],
    allow: Callable[[], Awaitable[None]],
) -> None:
    """Ready, then a turn refused by the database makes ``/v1/ready`` 503 until writes are
    allowed again, when it and the turns are back without a restart."""
    async with aiohttp.ClientSession() as session:
        assert (await turn(session, base, "stored"))[0] == 200
        assert await ready(session, base) == (200, {"status": "ok", "database": "ok"})
        await refuse()
        status, body = await turn(session, base, "refused")
        assert (status, body["error"]["code"]) == (503, "storage_unavailable")
        assert await ready(session, base) == (503, {"error": REFUSED})
        assert await ready(session, base) == (503, {"error": REFUSED})  # read still works
        assert (await turn(session, base, "refused again"))[0] == 503
        async with session.post(base + "/v1/conversations", json={"items": []}) as resp:
            assert (resp.status, (await resp.json())["error"]["code"]) == (
                503,
                "storage_unavailable",
            )
        await allow()
        assert await ready_until(session, base, 200) == (200, {"status": "ok", "database": "ok"})
        assert (await turn(session, base, "stored again"))[0] == 200


def logged(process: Process) -> str:
    process.proc.send_signal(signal.SIGINT)
    _, err = process.proc.communicate(timeout=20)
    assert process.proc.returncode == 0
    return err.decode()


def file_size_limit(pid: int, size: int | None) -> None:
    """The largest file process ``pid`` may write (``RLIMIT_FSIZE``): ``size`` bytes, or no
    limit; a write past it fails as on a full disk (Python ignores ``SIGXFSZ``)."""
    soft = resource.RLIM_INFINITY if size is None else size
    with contextlib.suppress(ProcessLookupError):  # it exited: nothing left to limit
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (soft, resource.RLIM_INFINITY))


def gateway(db: str, upstream: TestServer) -> tuple[Process, str]:
    port = free_port()
    process = Process(
        ["serve", "--port", str(port), "--db", db, "--upstream", upstream_url(upstream)]
    )
    process.wait_ready(f"http://127.0.0.1:{port}/v1/health")
    return process, f"http://127.0.0.1:{port}"


async def test_sqlite_file_that_cannot_grow(upstream: TestServer, tmp_path: Path) -> None:
    """The gateway's file size limit (``RLIMIT_FSIZE``) at 4 KiB: SQLite's writes to its WAL
    and its file fail as on a full disk, its reads still work."""
    db = tmp_path / "chat.db"
    process, base = gateway(f"sqlite+aiosqlite:///{db}", upstream)

    async def refuse() -> None:
        file_size_limit(process.proc.pid, 4096)

    async def allow() -> None:
        file_size_limit(process.proc.pid, None)

    try:
        await refuses_and_recovers(base, refuse, allow)
    finally:
        file_size_limit(process.proc.pid, None)
        log = logged(process)
    url = f"sqlite+aiosqlite:///{db}"
    await assert_stored(url, "sqlite", ["stored", "stored again"])
    assert "the conversation store refuses writes (OperationalError: " in log
    assert "the conversation store takes writes again" in log


async def test_a_probe_that_finds_the_lock_taken_answers_at_once(
    upstream: TestServer, tmp_path: Path
) -> None:
    """Writes were refused, the disk has room again, but another connection holds the
    write lock: ``/v1/ready`` answers 503 while the lock is held, without waiting for it
    (``busy_timeout_ms`` is 30 s: a probe that waited would not answer before the lock
    is let go, and ``wait_for`` would give up), and 200 once it is free."""
    db = tmp_path / "chat.db"
    process, base = gateway(f"sqlite+aiosqlite:///{db}", upstream)
    try:
        async with aiohttp.ClientSession() as session:
            assert (await turn(session, base, "stored"))[0] == 200
            file_size_limit(process.proc.pid, 4096)
            assert (await turn(session, base, "refused"))[0] == 503
            file_size_limit(process.proc.pid, None)
            other = sqlite3.connect(db, isolation_level=None)
            other.execute("BEGIN IMMEDIATE")
            try:
                for _ in range(3):  # the probe runs in the first, or a second later
                    answer = await asyncio.wait_for(ready(session, base), 10)
                    assert answer == (503, {"error": REFUSED})
                    await asyncio.sleep(0.6)
            finally:
                other.execute("ROLLBACK")
                other.close()
            assert await ready_until(session, base, 200) == (
                200,
                {"status": "ok", "database": "ok"},
            )
    finally:
        file_size_limit(process.proc.pid, None)
        logged(process)


async def test_an_idle_gateway_sees_a_disk_that_filled(
    upstream: TestServer, tmp_path: Path
) -> None:
    """No turn went through since the last look: ``/v1/ready`` probes a write itself (at most
    once a second), so a disk that filled while the gateway was idle is a 503 before a
    turn is lost to it.  It used to stay 200 until the first turn failed."""
    db = tmp_path / "chat.db"
    process, base = gateway(f"sqlite+aiosqlite:///{db}", upstream)
    try:
        async with aiohttp.ClientSession() as session:
            assert await ready(session, base) == (200, {"status": "ok", "database": "ok"})
            file_size_limit(process.proc.pid, 4096)
            assert await ready_until(session, base, 503) == (503, {"error": REFUSED})
            assert await ready(session, base) == (503, {"error": REFUSED})
            file_size_limit(process.proc.pid, None)
            assert await ready_until(session, base, 200) == (
                200,
                {"status": "ok", "database": "ok"},
            )
            assert (await turn(session, base, "after"))[0] == 200
    finally:
        file_size_limit(process.proc.pid, None)
        log = logged(process)
    await assert_stored(f"sqlite+aiosqlite:///{db}", "sqlite", ["after"])
    assert "the conversation store refuses writes (OperationalError: " in log


async def test_an_idle_probe_that_finds_the_lock_taken_is_ready(
    upstream: TestServer, tmp_path: Path
) -> None:
    """Idle, and another connection holds the write lock: the probe cannot tell whether the
    database takes writes, so ``/v1/ready`` stays 200, at once (``busy_timeout_ms`` is
    30 s: a probe that waited would not answer, and ``wait_for`` would give up)."""
    db = tmp_path / "chat.db"
    process, base = gateway(f"sqlite+aiosqlite:///{db}", upstream)
    other = sqlite3.connect(db, isolation_level=None)
    try:
        async with aiohttp.ClientSession() as session:
            other.execute("BEGIN IMMEDIATE")
            for _ in range(3):  # the probe runs in the first, or a second later
                answer = await asyncio.wait_for(ready(session, base), 10)
                assert answer == (200, {"status": "ok", "database": "ok"})
                await asyncio.sleep(0.6)
            other.execute("ROLLBACK")
            assert (await turn(session, base, "after"))[0] == 200
    finally:
        other.close()
        logged(process)
    await assert_stored(f"sqlite+aiosqlite:///{db}", "sqlite", ["after"])


async def test_the_probes_of_an_idle_gateway_do_not_grow_the_wal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On SQLite the probes run on the loop's connection, which never checkpoints: they
    count towards the checkpoint every ``_CHECKPOINT_EVERY`` commits as turns do, and
    the next write after it starts the WAL over.  The WAL grew by every probe before
    (some 20 KiB each: 1.7 GB a day for a gateway asked ``/v1/ready`` every second and
    never given a turn)."""
    monkeypatch.setattr(queries, "_PROBE_EVERY", 0.0)  # a probe on every check
    store = await open_store(tmp_path / "chat.db")
    wal = tmp_path / "chat.db-wal"

    def started_over() -> bytes:
        return wal.read_bytes()[12:24]  # the checkpoint sequence and salts of its header

    try:
        for _ in range(sqlite_turns._CHECKPOINT_EVERY):
            await store.check_ready()
        grown = wal.stat().st_size
        assert grown > sqlite_turns._CHECKPOINT_EVERY * 4096  # a probe writes pages to it
        before = started_over()
        for _ in range(500):  # bounded: 10 s for the checkpoint on its thread
            await asyncio.sleep(0.02)
            await store.check_ready()
            if started_over() != before:
                break
        assert started_over() != before
        assert wal.stat().st_size <= grown
    finally:
        await store.close()


async def test_every_worker_sees_a_disk_that_filled(upstream: TestServer, tmp_path: Path) -> None:
    """``--workers 2``: each worker checks the database itself, not only its own last write;
    a request on a new connection, whichever worker takes it, is 503 while the disk is
    full and 200 again after."""
    port = free_port()
    db = f"sqlite+aiosqlite:///{tmp_path / 'chat.db'}"
    args = ["serve", "--workers", "2", "--port", str(port), "--db", db]
    process = Process([*args, "--upstream", upstream_url(upstream)], cwd=tmp_path)
    base = f"http://127.0.0.1:{port}"
    stdout = process.proc.stdout
    assert stdout is not None
    pids: list[int] = []
    try:
        for _ in range(2):  # each prints its pid once it listens; EOF (b"") fails, not hangs
            line = await asyncio.to_thread(stdout.readline)
            assert b"chatmem listening" in line, line
            pids.append(int(line.rsplit(b"(pid ", 1)[1].split(b")", 1)[0]))

        async def each_new_connection() -> set[int]:
            await asyncio.sleep(1.1)  # every worker's last probe is a second old
            statuses = set()
            for _ in range(10):
                async with aiohttp.ClientSession() as session:
                    statuses.add((await ready(session, base))[0])
            return statuses

        for pid in pids:
            file_size_limit(pid, 4096)
        async with aiohttp.ClientSession() as session:
            assert await ready_until(session, base, 503) == (503, {"error": REFUSED})
        assert await each_new_connection() == {503}
        for pid in pids:
            file_size_limit(pid, None)
        assert await each_new_connection() == {200}
    finally:
        for pid in pids:
            file_size_limit(pid, None)
        assert process.stop(signal.SIGTERM) == 0


async def test_postgresql_database_made_read_only(upstream: TestServer, pg_url: str) -> None:
    """``default_transaction_read_only`` on the database, and the gateway's sessions ended
    so that its new ones take it up: every write fails (25006), reads go on."""
    process, base = gateway(pg_url, upstream)
    admin = await connect(pg_url)
    database = await admin.fetchval("SELECT current_database()")

    async def read_only(setting: str) -> None:
        await admin.execute(f'ALTER DATABASE "{database}" {setting}')
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )

    try:
        await refuses_and_recovers(
            base,
            lambda: read_only("SET default_transaction_read_only = on"),
            lambda: read_only("RESET default_transaction_read_only"),
        )
    finally:
        await admin.close()
        log = logged(process)
    await assert_stored(pg_url, "postgresql", ["stored", "stored again"])
    assert "the conversation store refuses writes (" in log
    assert "the conversation store takes writes again" in log


async def assert_stored(url: str, kind: str, questions: list[str]) -> None:
    """Only the turns that were answered 200 are stored, and the probe left no row."""
    query = (
        "SELECT c.tenant, c.id, m.role, m.content FROM conversations c"
        " JOIN messages m ON m.conversation_pk = c.pk ORDER BY m.seq"
    )
    if kind == "sqlite":
        with sqlite3.connect(url.split("///", 1)[1]) as conn:
            rows = conn.execute(query).fetchall()
            conversations = conn.execute("SELECT count(*) FROM conversations").fetchone()[0]
    else:
        rows = [tuple(row.values()) for row in await fetch(url, query)]
        conversations = (await fetch(url, "SELECT count(*) AS n FROM conversations"))[0]["n"]
    assert conversations == 1
    users = [content for _, _, role, content in rows if role == "user"]
    assert [str(content).strip('"') for content in users] == questions
    assert {(tenant, conv) for tenant, conv, _, _ in rows} == {("default", "c1")}
    assert len(rows) == 2 * len(questions)


def test_only_the_databases_refusal_counts() -> None:
    """Another writer in the way (SQLite's lock past busy_timeout, PostgreSQL's
    serialization failure or lock_timeout, a pool with no connection free) leaves the
    store ready; a full disk, a read-only file or database does not, and the next write
    that goes through makes it ready again."""

    def wrapped(orig: Exception) -> StorageUnavailable:
        error = StorageUnavailable("the conversation store is unavailable")
        error.__cause__ = DBAPIError("INSERT ...", ("private words",), orig)
        error.__cause__.__cause__ = orig
        return error

    def pg(code: str) -> Exception:
        error = Exception("pg")
        error.sqlstate = code  # type: ignore[attr-defined]
        return error

    busy = sqlite3.OperationalError("database is locked")
    busy.sqlite_errorcode = sqlite3.SQLITE_BUSY  # type: ignore[attr-defined]
    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorcode = sqlite3.SQLITE_FULL  # type: ignore[attr-defined]
    read_only = sqlite3.OperationalError("attempt to write a readonly database")
    read_only.sqlite_errorcode = sqlite3.SQLITE_READONLY  # type: ignore[attr-defined]
    # A connection the server ended under the write (pg_terminate_backend): the next one
    # writes (item 149; it made /v1/ready say the store refused writes).
    ended = asyncpg.AdminShutdownError("terminating connection due to administrator command")
    others = (wrapped(pg("40001")), wrapped(pg("55P03")), PoolTimeout(), wrapped(ended))
    for error in (busy, wrapped(busy), *others):
        health = WriteHealth()
        health.failed(error)
        assert health.refusing is None, error
    health = WriteHealth()
    for error, said in (
        (wrapped(full), "OperationalError: database or disk is full"),
        (read_only, "OperationalError: attempt to write a readonly database"),
        (wrapped(pg("25006")), "Exception"),  # other drivers' words may quote values
    ):
        health.failed(error)
        assert health.refusing == said
    health.wrote()
    assert health.refusing is None


async def test_a_sqlite_file_read_only_when_the_gateway_started_is_written_once_it_can_be(
    gateway_factory: Any, upstream: TestServer, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite opens a file it cannot write (a read-only mount, the wrong owner) read-only,
    and the connection stays so: a gateway started then answered 503 to every write
    until it was restarted, long after the file could be written.  Each connection is
    opened again at its next use once the database refused a write as read-only.

    The file's refusal is SQLite's own: while ``read_only`` holds, every connection the
    gateway opens to it (its three kinds: the loop's and threads' own, SQLAlchemy's
    engine, the Conversations API's) is opened ``mode=ro``, as SQLite opens a file whose
    write access the system refuses (which a test running as root cannot make it do)."""
    store = await open_store(db_path)  # the schema, made while the file could be written
    await store.close()
    read_only = True
    real_connect = sqlite3.connect

    def connect(database: Any, *args: Any, **kwargs: Any) -> sqlite3.Connection:
        if read_only and str(database) == str(db_path):
            kwargs["uri"] = True
            return real_connect(f"file:{database}?mode=ro", *args, **kwargs)
        return real_connect(database, *args, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", connect)
    monkeypatch.setattr(sqlite3.dbapi2, "connect", connect)  # SQLAlchemy's pysqlite's
    client = await gateway_factory(upstream_url(upstream))
    turn = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    refused = await client.post(
        "/v1/chat/completions", json=turn, headers={"X-Conversation-Id": "r"}
    )
    assert refused.status == 503
    assert (await refused.json())["error"]["code"] == "storage_unavailable"
    api = await client.post("/v1/conversations", json={"items": [{"role": "user", "content": "x"}]})
    assert api.status == 503
    assert (await client.get("/v1/ready")).status == 503
    read_only = False  # the file can be written now: remounted, its owner changed
    for _ in range(60):  # bounded: the probe runs at most once a second
        if (await client.get("/v1/ready")).status == 200:
            break
        await asyncio.sleep(0.1)
    assert (await client.get("/v1/ready")).status == 200
    stored = await client.post(
        "/v1/chat/completions", json=turn, headers={"X-Conversation-Id": "r"}
    )
    assert stored.status == 200
    api = await client.post("/v1/conversations", json={"items": [{"role": "user", "content": "x"}]})
    assert api.status == 200
    items = await client.get("/v1/conversations/r/items?order=asc")
    assert [item["role"] for item in (await items.json())["data"]] == ["user", "assistant"]
