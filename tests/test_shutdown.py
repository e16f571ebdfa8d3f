"""Graceful shutdown of a real ``chatmem serve`` process on real signals.

The upstream is the scripted one, held at an ``asyncio.Event`` the test releases, so "the
stream is still running when the signal arrives" is a fact, not a matter of timing.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
from pathlib import Path

import aiohttp
import pytest
from deploy_helpers import ServedGateway, serve
from helpers import answer_events, chunk, sse
from scripted_upstream import Script, scripted_upstream


def _messages(db: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT role, content FROM messages ORDER BY seq")
        return [(role, json.loads(content)) for role, content in rows]


async def _refused(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except (ConnectionRefusedError, ConnectionResetError):
        return True  # reset: the connection was queued on the listener as it closed
    writer.close()
    await writer.wait_closed()
    return False


async def _until_refused(port: int) -> None:
    for _ in range(400):  # bounded: the gateway closes its listener right after the signal
        if await _refused(port):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the gateway kept accepting connections after the signal")


async def _signal(gateway: ServedGateway, sig: int) -> asyncio.Future[tuple[int, str]]:
    """Send ``sig`` now; the future is the exit (``stop`` repeats the signal, which a
    gateway already shutting down ignores)."""
    gateway.process.proc.send_signal(sig)
    return asyncio.ensure_future(asyncio.to_thread(gateway.stop, sig))


BODY = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
async def test_in_flight_stream_finishes_and_is_committed(tmp_path: Path, sig: int) -> None:
    release = asyncio.Event()
    first, *rest = answer_events("Hello world")
    script = Script(chunks=[first, release, *rest])
    async with scripted_upstream(script) as upstream:
        gateway = serve(tmp_path, upstream.url, "[server]\nshutdown_grace = 60\n")
        async with (
            aiohttp.ClientSession() as client,
            client.post(
                gateway.url + "/v1/chat/completions",
                json=BODY,
                headers={"X-Conversation-Id": "c1"},
            ) as response,
        ):
            received = await response.content.readuntil(b"\n\n")
            assert received == first
            exited = await _signal(gateway, sig)
            await _until_refused(gateway.port)  # stopped accepting, stream still open
            assert not exited.done()
            release.set()
            received += await response.content.read()
        code, _ = await exited
    assert received == b"".join(answer_events("Hello world"))
    assert code == 0
    assert _messages(gateway.db) == [("user", "hi"), ("assistant", "Hello world")]


@pytest.mark.parametrize("on_disconnect", ["discard", "finish"])
async def test_stream_still_running_at_the_deadline_ends_cleanly(
    tmp_path: Path, on_disconnect: str
) -> None:
    """With "finish" the stream runs in a task of its own, which the handler waits for:
    the handler must not be cancelled before the stream has ended its body."""
    first = sse(chunk("", role="assistant"))
    second = sse(chunk("Hel"))
    script = Script(chunks=[first, second], end="hang")  # never finishes
    toml = f'[server]\nshutdown_grace = 0.5\n\n[memory]\non_client_disconnect = "{on_disconnect}"\n'
    async with scripted_upstream(script) as upstream:
        gateway = serve(tmp_path, upstream.url, toml)
        async with (
            aiohttp.ClientSession() as client,
            client.post(gateway.url + "/v1/chat/completions", json=BODY) as response,
        ):
            assert await response.content.readuntil(b"\n\n") == first
            assert await response.content.readuntil(b"\n\n") == second
            exited = await _signal(gateway, signal.SIGTERM)
            # The rest of the body: one error event, then a proper end (no exception).
            rest = await response.content.read()
        code, stderr = await exited
        await upstream.disconnected.wait()  # the upstream request was closed
    assert rest.startswith(b"data: ") and rest.endswith(b"\n\n")
    error = json.loads(rest[len(b"data: ") :])["error"]
    assert error["code"] == "gateway_shutting_down"
    assert b"[DONE]" not in rest
    assert code == 0, stderr
    assert _messages(gateway.db) == []  # nothing half-written


async def test_idle_gateway_exits_zero_on_sigterm(tmp_path: Path) -> None:
    async with scripted_upstream() as upstream:
        gateway = serve(tmp_path, upstream.url)
        code, stderr = await asyncio.to_thread(gateway.stop, signal.SIGTERM)
    assert code == 0, stderr
    assert "Traceback" not in stderr


async def test_at_the_deadline_other_requests_are_cancelled_at_once(tmp_path: Path) -> None:
    """A stream and a plain answer are both still running when the grace period ends
    (the demo model, slowed by its X-Mock-* headers).  The stream gets its error event;
    the plain request is cancelled then, not once the streams have ended: it used to run
    on for up to 5 s more, long enough for its answer (3 s) to be committed after the
    deadline."""
    gateway = serve(
        tmp_path, "http://unused.invalid/v1", "[server]\nshutdown_grace = 0.5\n", "--demo"
    )
    slow = {"X-Mock-Delay-Ms": "100"}
    async with aiohttp.ClientSession() as client:
        stream = await client.post(
            gateway.url + "/v1/chat/completions",
            json=BODY,
            headers={**slow, "X-Mock-Tokens": "60", "X-Conversation-Id": "streamed"},
        )
        await stream.content.readuntil(b"\n\n")  # under way
        plain = asyncio.ensure_future(
            client.post(
                gateway.url + "/v1/chat/completions",
                json={**BODY, "stream": False},
                headers={**slow, "X-Mock-Tokens": "30", "X-Conversation-Id": "plain"},
            )
        )
        await asyncio.sleep(0.2)  # both in flight (the plain answer takes 3 s)
        exited = await _signal(gateway, signal.SIGTERM)
        rest = await stream.content.read()
        try:
            answered: int | None = (await plain).status
        except aiohttp.ClientError:
            answered = None  # the connection was closed: the request was cancelled
        code, stderr = await exited
    assert b"gateway_shutting_down" in rest
    assert answered is None
    assert code == 0, stderr
    assert _messages(gateway.db) == []


async def test_an_idle_kept_alive_connection_is_closed_at_the_signal(tmp_path: Path) -> None:
    """aiohttp (3.14) cancels an idle connection's wait for its next request at shutdown
    but leaves the connection open: a request sent on it (an SDK's next call on its
    pooled connection) was never answered, and the connection closed only when the drain
    ended, up to ``shutdown_grace`` later (found by a review).  It is closed at once now,
    while a stream on another connection is still being drained, so the client's next
    request goes on a new connection, which is refused."""
    release = asyncio.Event()
    first, *rest = answer_events("Hello world")
    async with scripted_upstream(Script(chunks=[first, release, *rest])) as upstream:
        gateway = serve(tmp_path, upstream.url, "[server]\nshutdown_grace = 60\n")
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        writer.write(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"keep-alive" not in head.lower()
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)  # the answer whole: the connection is idle now
        async with (
            aiohttp.ClientSession() as client,
            client.post(gateway.url + "/v1/chat/completions", json=BODY) as response,
        ):
            assert await response.content.readuntil(b"\n\n") == first
            exited = await _signal(gateway, signal.SIGTERM)
            # bounded: the drain goes on until the stream is released, which is after this
            closed = await asyncio.wait_for(reader.read(), 30)
            assert closed == b""  # closed by the gateway, with nothing more sent
            assert not exited.done() and not response.content.at_eof()  # still draining
            release.set()
            await response.content.read()
        writer.close()
        await writer.wait_closed()
        code, stderr = await exited
    assert code == 0, stderr
