"""PostgreSQL behind a proxy of the test's own that can go silent, or lose the answer
to a COMMIT: what a network between the gateway and its database can do."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from helpers import open_store
from pg import HOST, PORT, USER, fetch

from chatmem.errors import StorageUnavailable
from chatmem.storage import Owner
from chatmem.storage import engine as engine_module

ALICE = Owner("acme", "alice")
TURN = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


@dataclass
class Proxy:
    """127.0.0.1:port -> the cluster's unix socket.  ``flowing`` cleared: nothing is passed
    on either way (a partition).  ``lose_commit_answer``: the connection that sends COMMIT
    is cut once it has gone, before the server's answer comes back."""

    port: int = 0
    flowing: asyncio.Event = field(default_factory=asyncio.Event)
    lose_commit_answer: bool = False
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    ended: set[asyncio.StreamWriter] = field(default_factory=set)
    """Connections the server ended without the gateway seeing it (:meth:`end_open`)."""

    def end_open(self) -> None:
        """The connections open now are ended as a server that was restarted, or
        ``pg_terminate_backend``, ends them, but the gateway learns it only when it uses
        one: the bytes it sends next are answered with a reset."""
        self.ended.update(self.writers)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_unix_connection(f"{HOST}/.s.PGSQL.{PORT}")
        self.writers += [writer, server_writer]
        cut = asyncio.Event()

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, up: bool) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await src.read(65536):
                    await self.flowing.wait()
                    if cut.is_set():
                        return
                    if up and writer in self.ended:
                        cut.set()
                        writer.transport.abort()
                        server_writer.transport.abort()
                        return
                    dst.write(data)
                    await dst.drain()
                    if up and self.lose_commit_answer and b"COMMIT" in data:
                        cut.set()
                        writer.transport.abort()  # the gateway's side: no answer comes
                        return
                dst.close()  # one side closed: so does the other (asyncpg's close waits)

        await asyncio.gather(pipe(reader, server_writer, True), pipe(server_reader, writer, False))
        for each in (writer, server_writer):
            each.close()


@contextlib.asynccontextmanager
async def proxy() -> AsyncIterator[Proxy]:
    state = Proxy()
    state.flowing.set()
    server = await asyncio.start_server(state.handle, "127.0.0.1", 0)
    state.port = server.sockets[0].getsockname()[1]
    try:
        yield state
    finally:
        state.flowing.set()
        server.close()
        for writer in state.writers:
            writer.transport.abort()


def through(url: str, port: int) -> str:
    database = url.split("/")[3].split("?")[0]
    return f"postgresql+asyncpg://{USER}@127.0.0.1:{port}/{database}"


async def test_a_database_gone_silent_is_a_503_not_a_wait(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No bytes either way, no close: the server's statement_timeout never arrives.  A
    request waited for as long as the silence lasted (75 s in a probe)."""
    monkeypatch.setattr(engine_module, "_SILENCE_MARGIN", 0.3)
    async with proxy() as net:
        store = await open_store(
            through(pg_url, net.port), statement_timeout=0.2, connect_timeout=0.5
        )
        try:
            await store.commit_turn(ALICE, "c", system=None, turn=TURN)
            net.flowing.clear()
            with pytest.raises(StorageUnavailable):
                await asyncio.wait_for(store.load_history(ALICE, "c", 10), 20)
            with pytest.raises(StorageUnavailable):
                await asyncio.wait_for(store.commit_turn(ALICE, "c", system=None, turn=TURN), 20)
            net.flowing.set()
            history = await asyncio.wait_for(store.load_history(ALICE, "c", 10), 20)
            assert [m["content"] for m in history.messages] == ["q", "a"]  # and it recovers
        finally:
            await store.close()


async def test_a_read_on_a_connection_the_server_ended_runs_again_on_a_new_one(
    pg_url: str,
) -> None:
    """A pooled connection that the server ended while it waited (a restart,
    ``pg_terminate_backend``) fails only when it is used: asyncpg has not seen its socket
    close.  A probe killing the gateway's connections under load saw about six requests
    a 503 each time.  The read, or the write, runs again on the next connection, and the
    next, up to a new one: nothing it did on an ended one stays."""
    async with proxy() as net:
        store = await open_store(through(pg_url, net.port))
        try:
            await store.commit_turn(ALICE, "c", system=None, turn=TURN)
            # Three connections in the pool (three reads at once), all ended, as a
            # restart ends them: each is tried in turn, then a new one.
            await asyncio.gather(*(store.load_history(ALICE, "c", 10) for _ in range(3)))
            assert len(net.writers) >= 6  # the gateway's side and the server's, each
            net.end_open()
            history = await asyncio.wait_for(store.load_history(ALICE, "c", 10), 20)
            assert [m["content"] for m in history.messages] == ["q", "a"]
            net.end_open()  # a write too: nothing it did on the ended connection stays
            await asyncio.wait_for(store.commit_turn(ALICE, "c", system=None, turn=TURN), 20)
        finally:
            await store.close()
    rows = await fetch(pg_url, "SELECT seq, role FROM messages ORDER BY seq")
    assert [(r["seq"], r["role"]) for r in rows] == [
        (1, "user"),
        (2, "assistant"),
        (3, "user"),
        (4, "assistant"),
    ]


async def test_the_conversations_api_reads_run_again_on_a_new_connection(pg_url: str) -> None:
    """The Conversations API reads through SQLAlchemy, whose error for an ended connection
    wraps asyncpg's: they too run again on the next connection.  A probe killing the
    gateway's connections saw 3 of 120 item reads sent at a kill answered 503."""
    async with proxy() as net:
        store = await open_store(through(pg_url, net.port))
        try:
            await store.commit_turn(ALICE, "c", system=None, turn=TURN)
            await asyncio.gather(*(store.get_conversation(ALICE, "c") for _ in range(3)))
            net.end_open()
            info = await asyncio.wait_for(store.get_conversation(ALICE, "c"), 20)
            assert info is not None and info.id == "c"
            net.end_open()
            listed = store.list_conversations(ALICE, limit=10, after=None, newest_first=True)
            page = await asyncio.wait_for(listed, 20)
            assert page is not None and [each.id for each in page.data] == ["c"]
            net.end_open()
            items = store.list_items(ALICE, "c", limit=10, after_seq=None, newest_first=False)
            found = await asyncio.wait_for(items, 20)
            assert found is not None and [each["content"] for each in found.data] == ["q", "a"]
        finally:
            await store.close()


async def test_a_commit_whose_answer_is_lost_says_the_turn_may_be_stored(pg_url: str) -> None:
    """The COMMIT reached the server, its answer did not come back: "not saved" would be
    wrong (a probe found such turns stored, and a client sending them again stored them
    twice), so the client is told it may be stored."""
    async with proxy() as net:
        store = await open_store(through(pg_url, net.port))
        try:
            net.lose_commit_answer = True
            with pytest.raises(StorageUnavailable) as caught:
                await asyncio.wait_for(store.commit_turn(ALICE, "c", system=None, turn=TURN), 20)
        finally:
            net.lose_commit_answer = False
            await store.close()
    assert caught.value.code == "storage_outcome_unknown"
    assert "may be stored or not" in caught.value.message
    rows = await fetch(pg_url, "SELECT role, content FROM messages ORDER BY seq")
    assert [r["role"] for r in rows] == ["user", "assistant"]  # it was, in fact
