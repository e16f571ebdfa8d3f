"""The chat path's HTTP/1.1 client (chatmem.proxy.pool) against a real keep-alive server.

The server is a bare asyncio server on 127.0.0.1 that answers each request with the next
scripted raw response, on as many requests per connection as the client sends, and records
which connection every request came on.  Failures of a single response (reset, garbage,
timeouts, every framing) are also covered through the whole gateway in test_upstream_faults.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from helpers import GatewayFactory
from yarl import URL

from chatmem.errors import InvalidRequest
from chatmem.proxy.pool import (
    _HIGH_WATER,
    HeadRefused,
    UpstreamBroken,
    UpstreamConnectTimeout,
    UpstreamPool,
    UpstreamReadTimeout,
)


def ok(body: bytes, *extra: str) -> bytes:
    head = ["HTTP/1.1 200 OK", f"Content-Length: {len(body)}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def chunked(*parts: bytes) -> bytes:
    out = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    for part in parts:
        out += f"{len(part):x}\r\n".encode() + part + b"\r\n"
    return out + b"0\r\n\r\n"


CLOSE = "close"  # a script entry: close the connection without answering


@dataclass
class KeepAliveServer:
    """Answers request n with ``script[n]`` (raw bytes), keeping connections open."""

    script: list[bytes | str | list[bytes | float]]
    requests: list[tuple[int, bytes]] = field(default_factory=list)
    connections: int = 0
    port: int = 0
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    closed: int = 0

    @property
    def url(self) -> URL:
        return URL(f"http://127.0.0.1:{self.port}/v1")

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        self.connections += 1
        number = self.connections
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    (
                        int(line.split(b":")[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ),
                    0,  # a GET, say
                )
                body = await reader.readexactly(length)
                answer = self.script[len(self.requests)]
                self.requests.append((number, head + body))
                if answer == CLOSE:
                    break
                for piece in answer if isinstance(answer, list) else [answer]:
                    if isinstance(piece, float):
                        await asyncio.sleep(piece)  # a float in the script: a pause
                    else:
                        assert isinstance(piece, bytes)
                        writer.write(piece)
                        await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.closed += 1
            writer.close()


@contextlib.asynccontextmanager
async def serving(*script: bytes | str | list[bytes | float]) -> AsyncIterator[KeepAliveServer]:
    server = KeepAliveServer(list(script))
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    server.port = listener.sockets[0].getsockname()[1]
    try:
        yield server
    finally:
        listener.close()
        for writer in server.writers:
            writer.close()  # the handler's read ends, and the handler with it
        await asyncio.sleep(0.01)


def pool_for(
    server: KeepAliveServer, read_timeout: float | None = 30.0, **options: Any
) -> UpstreamPool:
    return UpstreamPool(server.url, connect_timeout=5.0, read_timeout=read_timeout, **options)


async def post(pool: UpstreamPool, body: bytes = b"{}") -> tuple[int, bytes]:
    response = await pool.post("/v1/chat/completions", {"Content-Type": "application/json"}, body)
    async with response:
        return response.status, await response.read()


async def test_turns_share_one_keep_alive_connection_and_the_request_is_exact() -> None:
    async with serving(ok(b"one"), chunked(b"data: 2\n\n", b"data: [DONE]\n\n"), ok(b"")) as up:
        pool = pool_for(up)
        assert await post(pool, b'{"n":1}') == (200, b"one")
        assert await post(pool) == (200, b"data: 2\n\ndata: [DONE]\n\n")
        assert await post(pool) == (200, b"")
        await pool.close()
    assert [number for number, _ in up.requests] == [1, 1, 1]
    assert up.requests[0][1] == (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
        b"Content-Type: application/json\r\nContent-Length: 7\r\n\r\n"
        b'{"n":1}' % up.port
    )


async def test_a_connection_the_upstream_closed_while_idle_is_replaced() -> None:
    # The second request reaches a connection the server closes without answering, as a
    # server whose keep-alive timeout ran out does: it goes again on a new connection.
    async with serving(ok(b"first"), CLOSE, ok(b"second")) as up:
        pool = pool_for(up)
        assert await post(pool) == (200, b"first")
        assert await post(pool, b'{"again":1}') == (200, b"second")
        await pool.close()
    assert [number for number, _ in up.requests] == [1, 1, 2]
    assert up.requests[2][1].endswith(b'{"again":1}')


async def test_connections_idle_for_a_while_are_closed() -> None:
    # After a burst, its connections must not stay open (here and on the upstream) for
    # good: the upstream may never close them itself.
    async with serving(ok(b"a"), ok(b"b"), ok(b"c"), ok(b"d")) as up:
        pool = pool_for(up, idle_for=0.3)
        assert await asyncio.gather(post(pool), post(pool), post(pool)) == [
            (200, b"a"),
            (200, b"b"),
            (200, b"c"),
        ]
        assert (up.connections, up.closed) == (3, 0)
        for _ in range(100):  # bounded: 5 s
            if up.closed == 3:
                break
            await asyncio.sleep(0.05)
        assert up.closed == 3
        assert await post(pool) == (200, b"d")  # on a new connection
        assert up.connections == 4
        await pool.close()


async def test_a_request_that_cannot_be_repeated_does_not_go_again() -> None:
    """``again=False`` (the passthrough's POST): the upstream may have read the request
    before it closed the connection, so it is a 502, not a second request."""
    async with serving(ok(b"first"), CLOSE, ok(b"never")) as up:
        pool = pool_for(up)
        assert await post(pool) == (200, b"first")
        with pytest.raises(UpstreamBroken):
            await pool.request("POST", "/v1/files", {}, b"{}", again=False)
        response = await pool.request("GET", "/v1/models", {}, None, again=True)  # a new one
        async with response:
            assert await response.read() == b"never"
        await pool.close()
    assert [number for number, _ in up.requests] == [1, 1, 2]


async def test_the_passthrough_sends_again_only_what_can_be_repeated(
    gateway_factory: GatewayFactory,
) -> None:
    """Through the gateway: its passthrough's kept-alive connection is closed by the
    upstream after it read the next request.  A POST is a 502, sent once (the upstream may
    have acted on it); a GET goes again on a new connection."""
    answers = (ok(b"1"), CLOSE, ok(b"2"), CLOSE, ok(b"3"))
    async with serving(*answers) as up:
        client = await gateway_factory(str(up.url))
        assert await (await client.post("/v1/files", data=b"a")).read() == b"1"
        refused = await client.post("/v1/files", data=b"b")
        assert refused.status == 502
        assert (await refused.json())["error"]["code"] == "upstream_unavailable"
        assert await (await client.post("/v1/files", data=b"c")).read() == b"2"
        assert await (await client.get("/v1/models")).read() == b"3"
    assert [(number, request.split(b" ")[0]) for number, request in up.requests] == [
        (1, b"POST"),
        (1, b"POST"),  # read, then the connection closed: not sent again
        (2, b"POST"),
        (2, b"GET"),  # read, then closed: sent again on a new connection
        (3, b"GET"),
    ]


@pytest.mark.parametrize(
    ("method", "body", "length"),
    [
        ("GET", None, None),
        ("GET", b"", b"0"),
        ("DELETE", None, None),
        ("DELETE", b"{}", b"2"),
        ("PATCH", b"", b"0"),
    ],
)
async def test_a_request_says_its_length_unless_it_has_no_body(
    method: str, body: bytes | None, length: bytes | None
) -> None:
    """``body=None``: no body and no ``Content-Length`` (a GET's, which some servers
    refuse with one); ``b""`` is ``Content-Length: 0``."""
    async with serving(ok(b"x")) as up:
        pool = pool_for(up)
        response = await pool.request(method, "/v1/models?a=b%20c", {"X-A": "1"}, body, again=True)
        async with response:
            assert await response.read() == b"x"
        await pool.close()
    framing = b"" if length is None else b"Content-Length: " + length + b"\r\n"
    assert up.requests[0][1] == (
        b"%s /v1/models?a=b%%20c HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nX-A: 1\r\n%s\r\n%s"
        % (method.encode(), up.port, framing, body or b"")
    )


async def test_a_new_connection_closed_without_an_answer_is_an_error() -> None:
    async with serving(CLOSE) as up:
        pool = pool_for(up)
        with pytest.raises(UpstreamBroken):
            await post(pool)
        await pool.close()
    assert len(up.requests) == 1  # not sent twice


async def test_connection_close_from_the_upstream_is_respected() -> None:
    async with serving(ok(b"a", "Connection: close"), ok(b"b")) as up:
        pool = pool_for(up)
        assert await post(pool) == (200, b"a")
        assert await post(pool) == (200, b"b")
        await pool.close()
    assert [number for number, _ in up.requests] == [1, 2]


async def test_a_body_left_unread_closes_its_connection() -> None:
    async with serving(chunked(b"data: 1\n\n", b"data: 2\n\n"), ok(b"next")) as up:
        pool = pool_for(up)
        response = await pool.post("/v1/chat/completions", {}, b"{}")
        async with response:
            pass  # the client went away before the body was read
        assert await post(pool) == (200, b"next")
        await pool.close()
    assert [number for number, _ in up.requests] == [1, 2]


async def test_an_interim_response_is_skipped() -> None:
    async with serving(b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"real")) as up:
        pool = pool_for(up)
        assert await post(pool) == (200, b"real")
        await pool.close()


async def test_status_reason_and_headers_are_the_upstreams() -> None:
    raw = (
        b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 7\r\nX-A: 1\r\nX-A: 2\r\n"
        b"Content-Length: 2\r\n\r\n{}"
    )
    async with serving(raw) as up:
        pool = pool_for(up)
        response = await pool.post("/v1/chat/completions", {}, b"{}")
        async with response:
            assert (response.status, response.reason) == (429, "Too Many Requests")
            assert response.headers["retry-after"] == "7"
            assert response.headers.getall("X-A") == ["1", "2"]
            assert response.content_type == "application/octet-stream"
            assert await response.read() == b"{}"
        await pool.close()


async def test_a_large_body_for_a_slow_reader_arrives_whole() -> None:
    # Far above the high-water mark: reading pauses and resumes, nothing is lost.
    body = bytes(range(256)) * 8192  # 2 MiB
    async with serving(ok(body), ok(body)) as up:
        pool = pool_for(up)
        response = await pool.post("/v1/chat/completions", {}, b"{}")
        received = bytearray()
        async with response:
            async for data in response.content.iter_any():
                received += data
                await asyncio.sleep(0)  # a reader slower than the socket
        assert bytes(received) == body
        assert await post(pool) == (200, body)  # and the connection is still usable
        await pool.close()
    assert [number for number, _ in up.requests] == [1, 1]


async def test_a_reader_that_stops_stops_the_reading() -> None:
    # Back-pressure: the pool holds at most the high-water mark plus the one read that
    # crossed it (the event loop reads up to 256 KiB at once), not the whole answer.
    body = bytes(range(256)) * 32768  # 8 MiB
    async with serving(ok(body)) as up:
        pool = pool_for(up)
        response = await pool.post("/v1/chat/completions", {}, b"{}")
        async with response:
            await asyncio.sleep(0.3)  # the upstream writes as fast as it can meanwhile
            assert response.conn.paused
            assert response.conn.buffered <= _HIGH_WATER + 256 * 1024
            received = bytearray()
            async for data in response.content.iter_any():
                received += data
        assert bytes(received) == body
        await pool.close()


async def test_waiting_longer_than_read_timeout_is_a_timeout() -> None:
    async with serving(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345") as up:
        pool = pool_for(up, read_timeout=0.2)
        response = await pool.post("/v1/chat/completions", {}, b"{}")
        with pytest.raises(UpstreamReadTimeout):
            async with response:
                await response.read()
        await pool.close()
    assert issubclass(UpstreamReadTimeout, TimeoutError)  # what the relays catch


async def test_a_slow_but_steady_body_is_not_a_timeout() -> None:
    # Every piece comes well within read_timeout, the whole body takes longer than it.
    pieces = [b"data: %d\n\n" % i for i in range(12)]
    head = chunked()[: -len(b"0\r\n\r\n")]  # status line and headers, no chunk yet
    trickle: list[bytes | float] = [head]
    for piece in pieces:
        trickle += [0.05, f"{len(piece):x}\r\n".encode() + piece + b"\r\n"]
    trickle.append(b"0\r\n\r\n")
    async with serving(trickle) as up:
        pool = pool_for(up, read_timeout=0.5)
        assert await post(pool) == (200, b"".join(pieces))
        await pool.close()


async def test_a_short_wait_for_a_streams_end_is_not_the_next_requests_timeout() -> None:
    """After [DONE] the tee waits a short while for the body's end (``expect_end``); the
    connection then goes back to the pool, and the next answer on it gets the whole
    ``read_timeout`` again.  The short timer stayed armed: answers slower than 2 s failed
    as 504s after a stream."""
    done = b"data: [DONE]\n\n"
    stream = chunked(done)
    end = b"0\r\n\r\n"
    async with serving([stream[: -len(end)], 0.05, end], [0.5, ok(b"slow")]) as up:
        pool = pool_for(up, read_timeout=30.0)
        response = await pool.post("/v1/chat/completions", {}, b"{}")
        async with response:
            assert await response.content.next_chunk() == done
            response.expect_end(0.1)
            assert await response.content.next_chunk() is None  # waited for, within 0.1 s
        assert await post(pool) == (200, b"slow")
        assert up.connections == 1
        await pool.close()


async def test_a_refused_connection_is_broken() -> None:
    async with serving() as up:
        port = up.port
    pool = UpstreamPool(URL(f"http://127.0.0.1:{port}"), connect_timeout=5, read_timeout=5)
    with pytest.raises(UpstreamBroken, match="cannot connect"):
        await post(pool)


async def test_line_breaks_cannot_smuggle_headers() -> None:
    async with serving(ok(b"")) as up:
        pool = pool_for(up)
        with pytest.raises(InvalidRequest):
            await pool.post("/v1/x", {"X-A": "1\r\nX-Injected: 2"}, b"")
        with pytest.raises(InvalidRequest):
            await pool.post("/v1/x", {"X-A": "1\rX-Injected: 2"}, b"")
        await pool.close()
    assert up.requests == []


async def test_credentials_in_the_url_are_sent_as_basic_auth() -> None:
    async with serving(ok(b"a"), ok(b"b")) as up:
        url = URL(f"http://user:s%40cret@127.0.0.1:{up.port}/v1")
        pool = UpstreamPool(url, connect_timeout=5, read_timeout=5)
        assert await post(pool) == (200, b"a")
        # A configured key (upstream.api_key) goes instead, never both.
        response = await pool.post("/v1/x", {"Authorization": "Bearer k"}, b"")
        async with response:
            await response.read()
        await pool.close()
    first, second = (request for _, request in up.requests)
    assert b"\r\nAuthorization: Basic dXNlcjpzQGNyZXQ=\r\n" in first  # user:s@cret
    assert b"Authorization: Bearer k\r\n" in second and b"Basic" not in second


async def test_a_response_head_over_64_kib_is_refused() -> None:
    flood = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"y" * 1000) for i in range(70))
    async with serving(b"HTTP/1.1 200 OK\r\n" + flood + b"Content-Length: 0\r\n\r\n") as up:
        pool = pool_for(up)
        with pytest.raises(HeadRefused, match=r"\(65536 bytes in all, 1024 header lines\)"):
            await post(pool)
        await pool.close()


@pytest.mark.parametrize(
    ("lines", "size", "taken"),
    [(70, 1000, True), (1023, 10, True), (1024, 10, False), (1, 65536, True), (1, 65537, False)],
)
async def test_a_head_unbounded_in_all_takes_64_kib_a_line_and_1024_lines(
    lines: int, size: int, taken: bool
) -> None:
    """``max_head=None`` (the passthrough's pool): aiohttp's client's limits as the
    gateway sets them (its Content-Length the 1,024th line here), so a head is taken or
    refused alike whichever client relays it."""
    name = b"X-F-%04d: "
    flood = b"".join(name % i + b"y" * (size - len(name % i) + 2) + b"\r\n" for i in range(lines))
    assert all(len(line) - 2 == size for line in flood.split(b"\r\n")[:-1])  # name and value
    async with serving(b"HTTP/1.1 200 OK\r\n" + flood + b"Content-Length: 2\r\n\r\nok") as up:
        pool = pool_for(up, max_head=None)
        if taken:
            assert await post(pool) == (200, b"ok")
        else:
            with pytest.raises(HeadRefused, match=r"\(65536 bytes a line, 1024 header lines\)"):
                await post(pool)
        await pool.close()


async def test_bytes_sent_on_an_idle_connection_retire_it() -> None:
    """An answer followed, later, by bytes nobody asked for (a second head here): the
    next request must not read them as its answer."""
    stray = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n"
    async with serving([ok(b"first"), 0.05, stray], ok(b"second")) as up:
        pool = pool_for(up, read_timeout=5.0)
        assert await post(pool) == (200, b"first")
        await asyncio.sleep(0.2)  # the stray head arrives while the connection is idle
        assert await post(pool) == (200, b"second")
        await pool.close()
    assert [number for number, _ in up.requests] == [1, 2]  # on a new connection


@pytest.mark.parametrize(
    "after",
    [b"TRAILING-GARBAGE", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nXXXXX"],
    ids=["garbage", "a second response"],
)
async def test_bytes_in_the_same_read_after_a_whole_answer(after: bytes) -> None:
    """A whole answer, then in the same write bytes nobody asked for: the answer is
    read as it was (the second response's body used to be appended to it, and garbage
    made it a failure), and the connection is not used again."""
    async with serving(ok(b"the answer") + after, ok(b"next")) as up:
        pool = pool_for(up, read_timeout=5.0)
        assert await post(pool) == (200, b"the answer")
        assert await post(pool) == (200, b"next")
        await pool.close()
    assert [number for number, _ in up.requests] == [1, 2]  # on a new connection


async def test_what_arrived_before_invalid_framing_is_read_first() -> None:
    """The end of an answer and invalid chunk framing in one read: the answer's bytes
    come out, then the failure."""
    good = b"data: the end\n\ndata: [DONE]\n\n"
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    async with serving(head + f"{len(good):x}\r\n".encode() + good + b"\r\nzz\r\n") as up:
        pool = pool_for(up)
        response = await pool.post("/v1/chat/completions", {}, b"{}")
        async with response:
            assert await response.content.next_chunk() == good
            with pytest.raises(UpstreamBroken, match="invalid HTTP"):
                await response.content.next_chunk()
        await pool.close()


async def test_a_connect_timeout_is_a_timeout() -> None:
    """An upstream whose accept queue is full: the connect times out (a 504 upstream of
    the gateway), it is not a broken connection (a 502)."""
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        port = full.getsockname()[1]
        fillers = []
        try:
            for _ in range(8):  # fill the backlog: further SYNs are dropped
                filler = socket.socket()
                filler.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    filler.connect(("127.0.0.1", port))
                fillers.append(filler)
            pool = UpstreamPool(
                URL(f"http://127.0.0.1:{port}/v1"), connect_timeout=0.5, read_timeout=5
            )
            with pytest.raises(UpstreamConnectTimeout):
                await pool.post("/v1/chat/completions", {}, b"{}")
            assert isinstance(UpstreamConnectTimeout(), TimeoutError)
            await pool.close()
        finally:
            for filler in fillers:
                filler.close()


@pytest.mark.parametrize(
    ("answer", "headers", "body"),
    [
        (  # a folded header line: one value
            b"HTTP/1.1 200 OK\r\nX-Fold: a\r\n b\r\nContent-Length: 2\r\n\r\nok",
            [("X-Fold", "a b"), ("Content-Length", "2")],
            b"ok",
        ),
        (  # lines ended by LF alone, a tab in a value, a value not in ASCII
            b"HTTP/1.1 200 OK\nX-A: 1\t2\nX-B: caf\xc3\xa9\nContent-Length: 2\n\nok",
            [("X-A", "1\t2"), ("X-B", "caf\u00e9"), ("Content-Length", "2")],
            b"ok",
        ),
        (  # spaces after a chunk's size
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2 \r\nok\r\n0\r\n\r\n",
            [("Transfer-Encoding", "chunked")],
            b"ok",
        ),
        (  # trailers, in the same read as the head: not headers of the answer
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\nContent-Type: text/html\r\nLocation: http://elsewhere/\r\n\r\n",
            [("Content-Type", "text/plain"), ("Transfer-Encoding", "chunked")],
            b"hello",
        ),
    ],
)
async def test_an_answer_is_read_as_aiohttps_client_reads_it(
    answer: bytes, headers: list[tuple[str, str]], body: bytes
) -> None:
    """The passthrough relays by either client: what aiohttp's takes of a server that is
    a little off the standard, this one takes too, and a trailer is not a header."""
    async with serving(answer) as up:
        pool = pool_for(up)
        response = await pool.request("GET", "/v1/models", {}, None, again=False)
        async with response:
            assert list(response.headers.items()) == headers
            assert await response.read() == body
        await pool.close()


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nX-A: a\x01b\r\nContent-Length: 2\r\n\r\nok",  # a control byte
        b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nX-B: caf\xc3\xa9\r\nX-A: \x1b[2J\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 O\x01K\r\nContent-Length: 2\r\n\r\nok",  # in the reason phrase
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
        b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
    ],
)
async def test_an_answer_no_server_could_relay_is_refused(
    answer: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """A header value with a control byte (aiohttp's server would refuse to write it: a
    500), a protocol switch nobody asked for, or no HTTP at all: refused as an invalid
    head, and nothing logged as a fatal error of the transport."""
    async with serving(answer) as up:
        pool = pool_for(up)
        with pytest.raises(HeadRefused):
            await post(pool)
        await pool.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_request_goes_again_once_and_on_a_new_connection() -> None:
    """Two idle connections, the upstream closing the one taken after it read the
    request: the request goes once more, on a new connection, not on the other idle one
    (which may be as dead: with ten of them it went out eleven times)."""
    async with serving(ok(b"a"), ok(b"b"), CLOSE, ok(b"again")) as up:
        pool = pool_for(up)
        assert sorted(await asyncio.gather(post(pool), post(pool))) == [(200, b"a"), (200, b"b")]
        assert await post(pool) == (200, b"again")
        await pool.close()
    numbers = [number for number, _ in up.requests]
    assert len(numbers) == 4 and numbers[3] == 3  # the fourth on a third connection


async def test_a_connection_put_back_old_is_not_used_again() -> None:
    """An answer read slowly puts its connection back with its last activity long past:
    it is closed when it comes to be taken, not used after ``idle_for``."""
    async with serving(ok(b"slow"), ok(b"a"), ok(b"b")) as up:
        pool = pool_for(up, idle_for=30.0)
        slow = await pool.post("/v1/x", {}, b"")  # connection 1, its answer not read yet
        assert await post(pool) == (200, b"a")  # connection 2, back at once
        slow.conn.last_activity -= 60  # its last byte as if a minute ago (no sleeping)
        async with slow:  # connection 1 back now, on top of the stack
            assert await slow.read() == b"slow"
        assert await post(pool) == (200, b"b")  # on connection 2, not 1
        await pool.close()
    assert [number for number, _ in up.requests] == [1, 2, 2]


async def test_a_body_read_to_its_end_reads_nothing_more() -> None:
    """Once a body is read whole its connection is back in the pool, maybe carrying
    another request's answer: reading the first one again must not take those bytes
    (the passthrough's relay asks once more after a short body's end)."""
    async with serving(ok(b"first"), [0.05, ok(b"second")]) as up:
        pool = pool_for(up)
        first = await pool.post("/v1/x", {}, b"")
        assert await first.read() == b"first"
        second = asyncio.ensure_future(post(pool))  # on the same connection
        await asyncio.sleep(0)
        assert await first.content.next_chunk() is None
        assert await asyncio.wait_for(second, 5) == (200, b"second")
        await pool.close()
    assert [number for number, _ in up.requests] == [1, 1]


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nX-Endless: " + b"a" * 300_000,  # a header line never ended
        b"HTTP/1.1 200 " + b"O" * 70_000 + b"\r\n",  # a reason phrase over 64 KiB
    ],
    ids=["header", "reason"],
)
async def test_a_head_line_that_does_not_end_is_refused_before_it_fills_memory(
    head: bytes,
) -> None:
    """httptools keeps a header line until it ends, and the limits are checked only then:
    an upstream that never ended one would grow the gateway's memory until the read
    timeout.  Refused once more than 128 KiB came without an end."""
    async with serving([head, 30.0]) as up:
        pool = pool_for(up, max_head=None)
        with pytest.raises(HeadRefused):
            await asyncio.wait_for(post(pool), 10)
        await pool.close()


async def test_an_interim_answers_headers_do_not_count_toward_the_answers() -> None:
    """The chat pool's 64 KiB are the answer's head: a 103 before it with 40 KiB of hints
    is not part of it."""
    hints = b"".join(b"Link: </a%d>; rel=preload%s\r\n" % (i, b" " * 960) for i in range(40))
    interim = b"HTTP/1.1 103 Early Hints\r\n" + hints + b"\r\n"
    filler = b"".join(b"X-F-%d: %s\r\n" % (i, b"y" * 1000) for i in range(40))
    answer = b"HTTP/1.1 200 OK\r\n" + filler + b"Content-Length: 2\r\n\r\nok"
    async with serving(interim + answer) as up:
        pool = pool_for(up)
        assert await post(pool) == (200, b"ok")
        await pool.close()
