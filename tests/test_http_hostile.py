"""Hostile HTTP over raw sockets to a real ``chatmem serve``: smuggling attempts, oversized
heads and bodies, and slow or idle clients are refused or timed out, and the connections
they used are given back."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import COMPRESS, Process, free_port

IDLE_TIMEOUT = 1.0
BODY = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'
POST = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
SMUGGLED = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"


@dataclass
class Server:
    port: int
    pid: int
    db: Path

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        return sock

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("http-hostile")
    config = tmp / "chatmem.toml"
    config.write_text(f"[server]\nidle_timeout = {IDLE_TIMEOUT}\nmax_body_bytes = 65536\n")
    port = free_port()
    db = tmp / "chatmem.db"
    process = Process(
        [
            *("serve", "--demo", "--config", str(config), "--port", str(port)),
            *("--db", f"sqlite+aiosqlite:///{db}"),
        ],
        cwd=tmp,
    )
    process.wait_ready(f"http://127.0.0.1:{port}/v1/health")
    yield Server(port, process.proc.pid, db)
    assert process.stop(signal.SIGINT) == 0


def exchange(server: Server, raw: bytes) -> tuple[list[int], bool]:
    """Send ``raw``; return the statuses of every response and whether the server closed
    the connection (rather than keeping it open for more)."""
    statuses, closed, _ = exchange_bytes(server, raw)
    return statuses, closed


def exchange_bytes(server: Server, raw: bytes) -> tuple[list[int], bool, bytes]:
    """:func:`exchange`, and every byte the server sent."""
    with server.connect() as sock:
        sock.sendall(raw)
        sock.settimeout(IDLE_TIMEOUT * 5)
        received = b""
        closed = False
        try:
            while chunk := sock.recv(65536):
                received += chunk
            closed = True
        except TimeoutError:
            closed = False  # still open: the server waits for more
        except ConnectionResetError:
            closed = True
    statuses = [int(s) for s in re.findall(rb"HTTP/1\.[01] (\d{3}) ", received)]
    return statuses, closed, received


def json_error(response: bytes) -> dict[str, Any]:
    """The OpenAI-shaped error of one whole response."""
    head, _, body = response.partition(b"\r\n\r\n")
    assert b"\r\nContent-Type: application/json\r\n" in head
    error: dict[str, Any] = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


SMUGGLING = {
    "content-length-and-transfer-encoding": POST
    + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    + SMUGGLED,
    "duplicate-content-length": POST
    + b"Content-Length: %d\r\nContent-Length: 5\r\n\r\n" % len(BODY)
    + BODY
    + SMUGGLED,
    "duplicate-equal-content-length": POST
    + b"Content-Length: %d\r\nContent-Length: %d\r\n\r\n" % (len(BODY), len(BODY))
    + BODY,
    "transfer-encoding-twice": POST
    + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n"
    + SMUGGLED,
    "transfer-encoding-obfuscated": POST + b"Transfer-Encoding: xchunked\r\n\r\n" + SMUGGLED,
    "space-before-colon": POST + b"Content-Length : 4\r\n\r\nabcd" + SMUGGLED,
    "signed-content-length": POST + b"Content-Length: +4\r\n\r\nabcd" + SMUGGLED,
    "obs-fold": b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-A: a\r\n  folded\r\n\r\n" + SMUGGLED,
    "bare-cr-in-header": b"GET /v1/health HTTP/1.1\r\nHost: x\rX-A: b\r\n\r\n" + SMUGGLED,
    "bare-lf-line-endings": b"GET /v1/health HTTP/1.1\nHost: x\n\n" + SMUGGLED,
    "nul-in-header": b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n" + SMUGGLED,
    "oversized-header": b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Big: "
    + b"a" * 20_000
    + b"\r\n\r\n",
    "oversized-request-line": b"GET /v1/" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "too-many-headers": b"GET /v1/health HTTP/1.1\r\nHost: x\r\n"
    + b"".join(b"X-%d: a\r\n" % i for i in range(300))
    + b"\r\n",
}


@pytest.mark.parametrize("name", sorted(SMUGGLING))
def test_malformed_framing_is_refused_and_closed(server: Server, name: str) -> None:
    """One 400 in the OpenAI error shape, nothing smuggled behind it is answered, and the
    connection is closed."""
    statuses, closed, response = exchange_bytes(server, SMUGGLING[name])
    assert statuses == [400]
    assert closed
    error = json_error(response)
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "malformed_request"


def test_a_refused_request_has_its_id_and_is_counted(server: Server) -> None:
    """Answered by the connection before any route or middleware, such a 400 had no
    X-Request-Id and was in no count of /metrics, where every other answer has both
    (item 147): a flood of malformed requests did not show."""

    def refused() -> float:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            scrape = b""
            while chunk := sock.recv(65536):
                scrape += chunk
        line = re.search(rb'chatmem_requests_total\{route="other",status="400"\} (\S+)', scrape)
        return 0.0 if line is None else float(line[1])

    before = refused()
    for _ in range(3):
        _, _, response = exchange_bytes(server, SMUGGLING["nul-in-header"])
        head = response.partition(b"\r\n\r\n")[0]
        assert re.search(rb"\r\nX-Request-Id: [0-9a-f]{32}\r\n", head), head
    assert refused() == before + 3


TOKEN = "sk-token-of-the-client-0123456789"
QUOTING = {
    "bad-char-in-value": f"Authorization: Bearer {TOKEN}\x01".encode(),
    "space-in-name": f"X-My Auth: Bearer {TOKEN}".encode(),
    "over-8-kib": f"Authorization: Bearer {TOKEN}{'a' * 9000}".encode(),
}


@pytest.mark.parametrize("name", sorted(QUOTING))
def test_malformed_header_is_not_quoted_back(server: Server, name: str) -> None:
    """aiohttp's own answer quotes the line it refused, so a client's token would come
    back in a response body (where proxies and client logs keep it): the error names the
    kind of mistake and nothing the client sent."""
    raw = POST + QUOTING[name] + b"\r\nContent-Length: 2\r\n\r\n{}"
    statuses, _, response = exchange_bytes(server, raw)
    assert statuses == [400]
    assert TOKEN.encode() not in response and b"Bearer" not in response
    message = json_error(response)["message"]
    assert message.startswith(("the request is not valid HTTP/1.1", "the request line or"))


def test_body_over_limit_is_413_before_it_is_sent(server: Server) -> None:
    statuses, _ = exchange(server, POST + b"Content-Length: 99999999999\r\n\r\n")
    assert statuses == [413]


def test_expect_continue_over_limit_is_413_without_a_100(server: Server) -> None:
    """curl sends ``Expect: 100-continue`` for bodies over 1 MB: one over the limit is
    refused before the client uploads it (aiohttp's default said 100 Continue first)."""
    raw = POST + b"Expect: 100-continue\r\nContent-Length: 70000\r\n\r\n"
    statuses, closed, received = exchange_bytes(server, raw)
    assert statuses == [413] and closed
    assert json_error(received)["code"] == "request_too_large"
    assert b"\r\nX-Request-Id: " in received  # answered before the middleware, id all the same
    # Every chat answer names a conversation, this one too: a new conversation's id...
    assert re.search(rb"\r\nX-Conversation-Id: conv_[0-9a-f]{32}\r\n", received)
    # ... or the one the request named, as the handler's own 413 would.
    named = POST + b"X-Conversation-Id: trip-7\r\n" + raw[len(POST) :]
    statuses, _, received = exchange_bytes(server, named)
    assert statuses == [413] and b"\r\nX-Conversation-Id: trip-7\r\n" in received


def test_expect_continue_within_limit_gets_100_then_the_answer(server: Server) -> None:
    with server.connect() as sock:
        sock.sendall(
            POST + b"Expect: 100-continue\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(BODY)
        )
        assert sock.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(BODY)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert received.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b'"object":"chat.completion"' in received.replace(b" ", b"")


def test_an_unknown_expectation_is_a_json_417(server: Server) -> None:
    raw = POST + b"Expect: teapot\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY
    statuses, _, received = exchange_bytes(server, raw)
    assert statuses == [417]
    assert json_error(received)["code"] == "expectation_failed"
    assert b"\r\nX-Request-Id: " in received
    assert re.search(rb"\r\nX-Conversation-Id: conv_[0-9a-f]{32}\r\n", received)
    # The conversation a valid header names; an invalid one is not repeated back.
    for header, named in ((b"trip-7", b"trip-7"), (b"no way", None)):
        raw = (
            POST + b"X-Conversation-Id: %s\r\nExpect: teapot\r\nContent-Length: 0\r\n\r\n" % header
        )
        statuses, _, received = exchange_bytes(server, raw)
        assert statuses == [417]
        said = re.search(rb"\r\nX-Conversation-Id: ([^\r]*)\r\n", received)
        assert said is not None
        assert said[1] == named if named else said[1].startswith(b"conv_")
    # The chat route spelled with a trailing slash (the passthrough hands it over): the
    # same; any other path under /v1/ names no conversation.
    for path, named in ((b"/v1/chat/completions/", True), (b"/v1/completions", False)):
        raw = POST.replace(b"/v1/chat/completions", path, 1)
        raw += b"X-Conversation-Id: trip-8\r\nExpect: teapot\r\nContent-Length: 0\r\n\r\n"
        statuses, _, received = exchange_bytes(server, raw)
        assert statuses == [417]
        assert (b"\r\nX-Conversation-Id: trip-8\r\n" in received) == named


def test_chunked_body_over_limit_is_413(server: Server) -> None:
    chunk = b"%x\r\n%s\r\n" % (8192, b"a" * 8192)
    raw = (
        POST + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + chunk * 9 + b"0\r\n\r\n"
    )
    statuses, _ = exchange(server, raw)
    assert statuses == [413]


def test_well_formed_keepalive_requests_still_work(server: Server) -> None:
    """The control: two pipelined requests on one connection are both answered."""
    raw = b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n" + (
        b"GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert exchange(server, raw) == ([200, 200], True)


def closed_by_server(sock: socket.socket, trickle: bytes, limit_s: float) -> bool:
    """Send ``trickle`` a byte at a time every 50 ms; True once the server has closed."""
    sock.settimeout(0.05)
    deadline = time.monotonic() + limit_s
    position = 0
    while time.monotonic() < deadline:
        try:
            if position < len(trickle):
                sock.send(trickle[position : position + 1])
                position += 1
            if sock.recv(65536) == b"":
                return True
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            return True
    return False


def test_slow_headers_are_cut_off(server: Server) -> None:
    """A client trickling its request head is closed after server.idle_timeout, however
    steadily it sends (aiohttp alone would wait an hour: keepalive_timeout 3630 s)."""
    head = b"GET /v1/health HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 1000
    with server.connect() as sock:
        assert closed_by_server(sock, head, limit_s=IDLE_TIMEOUT * 10)


def test_slow_body_is_408(server: Server) -> None:
    """A client that sends its head and then trickles the body gets 408 once
    server.idle_timeout has passed since the head, however steadily it sends."""
    head = POST + b"Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n"
    with server.connect() as sock:
        sock.sendall(head + BODY[:10])
        sock.settimeout(0.05)
        received = b""
        deadline = time.monotonic() + IDLE_TIMEOUT * 10
        while b"request_timeout" not in received and time.monotonic() < deadline:
            try:
                sock.send(b" ")
                received += sock.recv(65536)
            except TimeoutError:
                continue
        # Then the connection ends: it is not kept for the rest of the body, which aiohttp
        # would go on reading for another 10 s (its lingering time) while the client waits.
        sock.settimeout(IDLE_TIMEOUT * 5)
        try:
            rest = sock.recv(65536)
        except ConnectionResetError:
            rest = b""
    assert received.startswith(b"HTTP/1.1 408 ")
    assert b'"code": "request_timeout"' in received
    assert b"\r\nConnection: close\r\n" in received
    assert rest == b""


def test_idle_connections_are_closed_and_given_back(server: Server) -> None:
    """200 connections that never send a full head (half of them start one): all closed
    by the server, their file descriptors freed, and serving goes on."""
    before = server.open_fds()
    socks = [server.connect() for _ in range(200)]
    for sock in socks[1::2]:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHo")
    waiting, peak = set(socks), before
    deadline = time.monotonic() + IDLE_TIMEOUT * 10
    try:
        while waiting and time.monotonic() < deadline:  # bounded
            peak = max(peak, server.open_fds())
            readable, _, _ = select.select(list(waiting), [], [], 0.01)
            for sock in readable:
                try:
                    if sock.recv(65536) == b"":
                        waiting.discard(sock)
                except ConnectionResetError:
                    waiting.discard(sock)
        assert not waiting  # every one was closed by the server
        assert peak >= before + 20  # and the server did hold them (many at a time) until then
    finally:
        for sock in socks:
            sock.close()
    for _ in range(100):  # bounded: up to 5 s for the server to drop its side
        if server.open_fds() <= before:
            break
        time.sleep(0.05)
    assert server.open_fds() <= before
    statuses, _ = exchange(
        server, b"GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert statuses == [200]


@pytest.mark.parametrize(
    "encodings",
    [[b"x-gzip"], [b"compress"], [b"gzip, br"], [b"gzip", b"gzip"], [b"snappy"]],
    ids=["x-gzip", "compress", "stacked", "two-headers", "unknown"],
)
@pytest.mark.parametrize("path", [b"/v1/chat/completions", b"/v1/embeddings", b"/v1/ask"])
def test_an_encoding_aiohttp_leaves_encoded_is_refused_too(
    server: Server, encodings: list[bytes], path: bytes
) -> None:
    """Any other coding aiohttp's server does not decode at all: the body would have been
    read as JSON still encoded ("not valid JSON", or for these plain bytes, a turn), or
    relayed encoded without the header that says so.  The same 400, and the connection
    ends: the body is not read."""
    head = b"POST %s HTTP/1.1\r\nHost: x\r\nX-Conversation-Id: enc-1\r\n" % path
    for encoding in encodings:
        head += b"Content-Encoding: %s\r\n" % encoding
    raw = head + b"Content-Length: %d\r\n\r\n" % len(BODY) + BODY
    statuses, closed, response = exchange_bytes(server, raw)
    assert statuses == [400] and closed
    error = json_error(response)
    assert error["message"] == (
        "the request body's Content-Encoding is not supported (gzip, deflate, br and zstd are)"
    )
    assert error["code"] == "unsupported_content_encoding"
    if path == b"/v1/chat/completions":
        assert b"\r\nX-Conversation-Id: enc-1\r\n" in response


@pytest.mark.parametrize("version", [b"1.1", b"1.0"])
def test_identity_gzip_brotli_and_zstd_bodies_are_read(server: Server, version: bytes) -> None:
    """Every coding aiohttp's server decodes (brotli and zstd with the modules chatmem
    depends on)."""
    codings = (
        (b"identity", BODY),
        (b"GZIP", COMPRESS["gzip"](BODY)),
        (b"br", COMPRESS["br"](BODY)),
        (b"zstd", COMPRESS["zstd"](BODY)),
    )
    post = POST.replace(b"HTTP/1.1", b"HTTP/" + version)
    for encoding, body in codings:
        raw = post + b"Content-Encoding: %s\r\nContent-Length: %d\r\n\r\n" % (encoding, len(body))
        raw = POST + b"Content-Encoding: %s\r\nContent-Length: %d\r\n\r\n" % (encoding, len(body))
        statuses, _, response = exchange_bytes(server, raw + body)
        assert statuses == [200], response
