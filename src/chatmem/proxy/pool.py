"""A lean HTTP/1.1 client for the one request every turn makes, the POST upstream, and for
the passthrough's requests whose body is in memory.

Why not aiohttp's client, which chatmem uses for the rest: a profile of the gateway
showed aiohttp's ``ClientSession.post`` spending about 140 us of CPU per request (URL and
cookie handling, tracing signals, timeout contexts, generic payload writers), a fifth of
what a whole remembered turn costs.  The chat path needs none of that: one origin, a body
already in memory, a keep-alive connection; nor does a passthrough request with a small
body or none (0.13 -> 0.08 ms of the gateway's CPU a request at 32 clients).  This module
keeps idle connections in a stack, writes head and body in one ``write``, and parses the
answer with httptools (the llhttp parser uvicorn uses); the same POST costs about 45 us.

Failures keep aiohttp's vocabulary, so the relay code handles both clients alike:
:class:`UpstreamBroken` is an ``aiohttp.ClientConnectionError`` and a read that waits
longer than ``read_timeout`` raises :class:`UpstreamReadTimeout`, a ``TimeoutError``.
"""

from __future__ import annotations

import asyncio
import base64
import re
import ssl
from collections import deque
from collections.abc import Coroutine, Iterable, Mapping
from types import TracebackType

import aiohttp
import httptools
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from ..errors import InvalidRequest

__all__ = [
    "MAX_RESPONSE_HEAD",
    "MAX_RESPONSE_HEADERS",
    "BodyTooLarge",
    "HeadRefused",
    "UpstreamBroken",
    "UpstreamConnectTimeout",
    "UpstreamPool",
    "UpstreamReadTimeout",
    "UpstreamResponse",
    "head_refused",
    "writable",
]

_HIGH_WATER = 64 * 1024
"""Unread body bytes at which the upstream socket stops being read (the client is slow).

At 256 KiB, 40 clients that stopped reading 30,000-token streams took the gateway's RSS
up by 108 MB; at 64 KiB by 60 MB, and 32 KiB gains nothing more (``benchmarks.stalled``).
An answer flowing normally never comes near it: every read of the tee takes all that has
arrived."""
_MAX_IDLE = 512
"""Idle keep-alive connections kept; more are closed when they come back."""
_IDLE_FOR = 60.0
"""Seconds a connection is kept idle by default: then it is closed, so that the
connections of a burst do not hold descriptors here and sockets on the upstream for good."""
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
"""What a header value must not hold (RFC 9110, 5.5): no server writes it on."""
MAX_RESPONSE_HEAD = 64 * 1024
"""The largest response header line, name and value (aiohttp's client takes 8 KiB), and
by default the largest head in all."""
MAX_RESPONSE_HEADERS = 1024
"""Header lines a response may have (aiohttp's client takes 128)."""
_UNPARSED = 2 * MAX_RESPONSE_HEAD
"""Bytes fed to the parser with none of its callbacks between them, at most: httptools
keeps a header line, a trailer or the reason phrase until it ends, and the limits above
are checked only then, so an upstream that never ended a line would fill the memory."""


def writable(value: str) -> bool:
    """Whether a header value holds no control byte (a tab is none): what a server writes
    on (aiohttp's fails the request with a 500 otherwise).  Most values are all
    printable, which is quick to tell; a tab is not printable, nor a control byte."""
    return value.isprintable() or _CONTROL.search(value) is None


def head_refused(max_head: int | None) -> str:
    """Why an answer's head is refused, for the client: the limits named, never the head
    quoted (it may hold the key).  ``max_head`` None: the limits are a line's."""
    bounds = (
        f"{max_head} bytes in all" if max_head is not None else f"{MAX_RESPONSE_HEAD} bytes a line"
    )
    return (
        "the upstream's answer is not valid HTTP/1.1, or its head is larger than the"
        f" gateway takes ({bounds}, {MAX_RESPONSE_HEADERS} header lines)"
    )


class UpstreamBroken(aiohttp.ClientConnectionError):
    """The upstream could not be reached, broke the connection or sent invalid HTTP."""


class HeadRefused(UpstreamBroken):
    """The response head is not valid HTTP/1.1, or larger than the pool takes; the message
    says so for the client (it never quotes the head, which may hold the key)."""


class UpstreamReadTimeout(aiohttp.ServerTimeoutError):
    """Nothing arrived from the upstream for ``read_timeout`` seconds (a TimeoutError)."""


class UpstreamConnectTimeout(aiohttp.ServerTimeoutError):
    """No connection within ``connect_timeout`` seconds (a TimeoutError)."""


class BodyTooLarge(Exception):
    """A body read whole was larger than the limit it was read with."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection and the response being read on it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, max_head: int | None) -> None:
        self.loop = loop
        self.max_head = max_head
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        # What aiohttp's client takes of a response, so that an answer is relayed or refused
        # alike by either client: a folded header line, a line ended by LF alone, spaces
        # after a chunk's size.
        self.parser.set_dangerous_leniencies(
            lenient_headers=True,
            lenient_optional_cr_before_lf=True,
            lenient_spaces_after_chunk_size=True,
        )
        self.closed = False
        self.idle = False
        """In the pool between two requests."""
        self.last_activity = loop.time()
        self.timer: asyncio.TimerHandle | None = None
        self.timer_within: float | None = None
        """The silence ``timer`` is armed for: a connection's next request may wait longer
        than its last (a stream's end is awaited for 2 s, the next answer for
        ``read_timeout``)."""
        self._reset()

    def _reset(self) -> None:
        self.raw_headers: list[tuple[str, str]] = []
        self.unparsed = 0
        """Bytes fed since the parser last called back (see ``_UNPARSED``)."""
        self.head_size = 0
        """Header bytes so far, when ``max_head`` bounds them."""
        self.reason = ""
        self.status = 0
        self.framed = False  # Content-Length or chunked: the body does not end with the socket
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self.received = False  # any byte of a response arrived
        self.error: BaseException | None = None
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.paused = False
        self.waiter: asyncio.Future[None] | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.idle:  # bytes nobody asked for: the next answer could not be told from them
            self.close()
            return
        self.received = True
        self.last_activity = self.loop.time()
        self.unparsed += len(data)  # each callback sets it to 0 (they run inside feed_data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # a 101 to a request that asked for none
            self._fail(HeadRefused(self._refusal()))
            self.close()
        except httptools.HttpParserError as exc:  # HttpParserCallbackError: one of ours
            # After a whole response, bytes nobody asked for (garbage, or a second
            # response) are not part of it: only the connection cannot be reused.
            if not self.complete:
                ours = isinstance(exc, httptools.HttpParserCallbackError)
                cause = (exc.__cause__ or exc.__context__) if ours else None
                if cause is None and not self.headers_done:
                    cause = HeadRefused(self._refusal())
                self._fail(cause or UpstreamBroken(f"the upstream sent invalid HTTP: {exc}"))
            self.close()
        else:
            if self.unparsed > _UNPARSED:  # this read and the ones before: no callback
                self._fail(
                    HeadRefused(self._refusal())
                    if not self.headers_done
                    else UpstreamBroken(
                        f"the upstream sent a trailer or chunk line over {_UNPARSED // 1024} KiB"
                    )
                )
                self.close()

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.complete:
            return
        if self.headers_done and not self.framed and exc is None:
            self.complete = True  # a body delimited by the end of the connection
            self._wake()
        else:
            # A reset (exc) is no end, even of a body the end of the connection delimits.
            self._fail(UpstreamBroken("the upstream closed the connection"))

    # httptools callbacks

    def on_message_begin(self) -> None:
        if self.complete:  # a second response in the same bytes: nobody asked for it
            raise UpstreamBroken("the upstream sent a response nobody asked for")

    def on_status(self, reason: bytes) -> None:
        self.unparsed = 0
        self.reason += reason.decode("latin-1")
        if len(self.reason) > MAX_RESPONSE_HEAD:
            raise HeadRefused(self._refusal())

    def on_header(self, name: bytes, value: bytes) -> None:
        self.unparsed = 0
        if self.headers_done:
            return  # a trailer: not a header of the answer (nor relayed, as by aiohttp)
        size = len(name) + len(value)
        limit = MAX_RESPONSE_HEAD
        if self.max_head is not None:
            self.head_size += size
            size, limit = self.head_size, self.max_head
        if size > limit or (len(self.raw_headers) >= MAX_RESPONSE_HEADERS):
            raise HeadRefused(self._refusal())
        self.raw_headers.append((name.decode("latin-1"), value.decode("utf-8", "surrogateescape")))

    def _refusal(self) -> str:
        return head_refused(self.max_head)

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if 100 <= self.status < 200:
            return  # an interim response: the real one follows
        if not writable(self.reason):
            raise HeadRefused(self._refusal())
        framed = False
        for name, value in self.raw_headers:
            # A control byte, which the lenient parser lets through and no server writes
            # on (aiohttp's would fail the request with a 500).
            if not writable(value):
                raise HeadRefused(self._refusal())
            if not framed and name.lower() in ("content-length", "transfer-encoding"):
                framed = True
        self.framed = framed
        self.headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.unparsed = 0
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if not self.headers_done:  # the end of an interim response
            self.raw_headers, self.reason, self.head_size = [], "", 0
            return
        self.keep_alive = self.parser.should_keep_alive()  # only known inside the callback
        self.complete = True
        self._wake()

    # the reading side

    def _wake(self) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self._wake()

    async def wait(self, within: float | None) -> None:
        """Until something happens on the connection; ``within`` seconds at most after the
        last bytes arrived (or the request went out).

        A stream waits once per chunk, so the deadline is not a timer per wait: one timer
        per connection, armed for the last activity plus ``within``, which when it fires
        either ends a wait that has been silent that long or arms itself again.
        """
        waiter = self.waiter = self.loop.create_future()
        if within != self.timer_within:  # a timer armed for another wait's silence
            self._disarm()
            self.timer_within = within
        if within is not None and self.timer is None:
            self.timer = self.loop.call_at(self.last_activity + within, self._deadline, within)
        await waiter

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _deadline(self, within: float) -> None:
        self.timer = None
        waiter = self.waiter
        if waiter is None or waiter.done() or self.closed:
            return  # nobody waits: the next wait arms it again
        silent_until = self.last_activity + within
        if self.loop.time() >= silent_until:
            self.waiter = None
            waiter.set_exception(UpstreamReadTimeout("the upstream sent nothing in time"))
        else:
            self.timer = self.loop.call_at(silent_until, self._deadline, within)

    def take(self) -> bytes:
        data = self.chunks.popleft() if len(self.chunks) == 1 else b"".join(self.chunks)
        self.chunks.clear()
        self.buffered = 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return data

    @property
    def reusable(self) -> bool:
        return (
            self.complete
            and self.error is None
            and not self.closed
            and not self.chunks
            and self.keep_alive
        )

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.last_activity = self.loop.time()
        self.transport.write(data)

    def close(self) -> None:
        self.closed = True
        self._disarm()
        if self.transport is not None:
            self.transport.abort()


class _Body:
    """The response body as it arrives; the shape of aiohttp's ``StreamReader`` that the
    relays use (``iter_any``, ``set_exception``).

    An async iterator object rather than an async generator: the event loop registers
    every async generator in a ``WeakSet`` (pure Python on 3.11) when it starts and
    removes it when it is collected, a cost each request paid for its one read.
    """

    def __init__(self, response: UpstreamResponse) -> None:
        self._response = response

    def iter_any(self) -> _Body:
        return self

    def __aiter__(self) -> _Body:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self.next_chunk()
        if chunk is None:
            raise StopAsyncIteration
        return chunk

    async def next_chunk(self) -> bytes | None:
        """The bytes that arrived since the last call (waiting for some); None at the end."""
        response = self._response
        if response.released:  # its connection may carry another request's answer now
            return None
        conn = response.conn
        while True:
            if conn.chunks:  # what arrived before a failure still goes on
                return conn.take()
            if conn.error is not None:
                response.close()
                raise conn.error
            if conn.complete:
                response.release()
                return None
            await conn.wait(response.read_timeout)

    def set_exception(self, exc: BaseException) -> None:
        """End the body with ``exc``: the next read raises it (used on shutdown)."""
        self._response.conn._fail(exc)


class UpstreamResponse:
    """Status and headers of an answer, and its body to be read once."""

    def __init__(self, pool: UpstreamPool, conn: _Connection) -> None:
        self.pool = pool
        self.conn = conn
        self.read_timeout = pool.read_timeout
        self.status = conn.status
        self.reason: str | None = conn.reason or None
        self.headers = CIMultiDictProxy(CIMultiDict(conn.raw_headers))
        self.content = _Body(self)
        self._done = False
        self.released = False
        """The body was read whole and the connection went back to the pool: it is no
        longer this response's to read."""

    @property
    def content_type(self) -> str:
        value = self.headers.get("Content-Type")
        if not value:
            return "application/octet-stream"
        return value.partition(";")[0].strip().lower()

    @property
    def buffered(self) -> bool:
        """Whether body bytes have arrived that the next read returns without waiting."""
        return bool(self.conn.chunks)

    @property
    def arrived_whole(self) -> bool:
        """Whether all of the body has arrived: reading it waits for nothing."""
        return not self.released and self.conn.complete and self.conn.error is None

    async def read(self, limit: int | None = None) -> bytes:
        """The whole body; :class:`BodyTooLarge` (and the connection closed) as soon as
        more than ``limit`` bytes arrived."""
        parts = []
        size = 0
        while (chunk := await self.content.next_chunk()) is not None:
            parts.append(chunk)
            size += len(chunk)
            if limit is not None and size > limit:
                self.close()
                raise BodyTooLarge(f"the upstream's answer is larger than {limit} bytes")
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def expect_end(self, within: float) -> None:
        """The answer is complete: what may still follow must end within ``within``
        seconds of silence (instead of ``read_timeout``), or the read times out."""
        if self.read_timeout is None or within < self.read_timeout:
            self.read_timeout = within  # the next wait arms the connection's timer for it

    def release(self) -> None:
        """No more of the body is wanted: the connection goes back to the pool if it can
        (the body was read whole), else it is closed."""
        if not self._done:
            self._done = True
            self.released = True
            self.pool._put_back(self.conn)

    def close(self) -> None:
        """Stop reading: the connection is closed, never reused."""
        if not self._done:
            self._done = True
            self.conn.close()

    async def __aenter__(self) -> UpstreamResponse:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()  # a body not read to its end leaves the connection unusable


class UpstreamPool:
    """Keep-alive connections to one origin, and requests with their body in memory on them."""

    def __init__(
        self,
        base: URL,
        *,
        connect_timeout: float | None,
        read_timeout: float | None,
        idle_for: float = _IDLE_FOR,
        max_head: int | None = MAX_RESPONSE_HEAD,
    ) -> None:
        if base.scheme not in ("http", "https") or not base.host:
            raise ValueError(f"not an http(s) URL: {base}")
        self.host = base.host
        self.port = base.port or (443 if base.scheme == "https" else 80)
        self.ssl: ssl.SSLContext | None = (
            ssl.create_default_context() if base.scheme == "https" else None
        )
        self.host_header = base.host_port_subcomponent or self.host
        self.authorization: str | None = None
        """Credentials in the URL (``http://user:password@host``), sent as aiohttp did."""
        if base.user is not None:
            pair = f"{base.user}:{base.password or ''}".encode("latin-1")
            self.authorization = "Basic " + base64.b64encode(pair).decode("ascii")
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.idle_for = idle_for
        """Seconds a connection is used again after its last request, at most."""
        self.max_head = max_head
        """The largest response head in all; None: :data:`MAX_RESPONSE_HEAD` a line (as
        aiohttp's client is set for the passthrough's other requests)."""
        self._idle: list[_Connection] = []
        """Oldest first (about: a connection goes back when its answer was read)."""
        self._sweep: asyncio.TimerHandle | None = None
        self._closed = False

    def post(
        self, target: str, headers: Mapping[str, str], body: bytes
    ) -> Coroutine[None, None, UpstreamResponse]:
        """POST ``body`` to ``target`` (path and query): :meth:`request`, sent once more on
        a new connection when a reused one ends before a byte of answer.  That is the chat
        route's turn: it asks for an answer and stores nothing upstream, so at worst an
        answer is made twice, where a 502 would cost the client its turn (the pool keeps
        connections for 60 s, past the 5 s after which many servers close theirs).  (Not
        a coroutine of its own: one frame fewer on every turn.)"""
        return self.request("POST", target, headers, body, again=True)

    async def request(
        self,
        method: str,
        target: str,
        headers: Mapping[str, str],
        body: bytes | None,
        *,
        again: bool,
    ) -> UpstreamResponse:
        """Send ``method`` with ``body`` to ``target`` (path and query) and wait for the
        response head.  ``body`` None is a request without one that says nothing of its
        length (a GET's); ``b""`` says ``Content-Length: 0``.  Not for ``HEAD``: the parser
        would wait for the body its answer's ``Content-Length`` announces.

        A connection taken from the pool may have been closed by the upstream while it was
        idle.  With ``again``, when such a connection ends without a byte of answer, the
        request goes once more, on a new connection (not on another idle one, which may be
        as dead: the upstream would get it once per idle connection): the upstream most
        likely closed it before it read the request, but it may have read it, so ``again``
        is for requests that can be repeated (RFC 9110, 9.2.2).
        """
        items: list[tuple[str, str]] = list(headers.items())
        if self.authorization is not None and "Authorization" not in headers:
            items.append(("Authorization", self.authorization))
        length = None if body is None else len(body)
        head = _request_head(method, target, self.host_header, items, length)
        take_idle = True
        while True:
            conn = self._take_idle() if take_idle else None
            reused = conn is not None
            if conn is None:
                conn = await self._connect()
            conn.send(head + body if body else head)
            try:
                while not conn.headers_done:
                    if conn.error is not None:
                        raise conn.error
                    await conn.wait(self.read_timeout)
            except UpstreamBroken:
                conn.close()
                if again and reused and not conn.received:
                    take_idle = False
                    continue
                raise
            except BaseException:
                conn.close()
                raise
            return UpstreamResponse(self, conn)

    def _take_idle(self) -> _Connection | None:
        """The idle connection put back last that is still open and idle for less than
        ``idle_for``; the older ones met on the way are closed.  (The stack is in the
        order connections came back, not of their last activity: one whose answer was
        read slowly comes back old, and the sweep, which stops at the first connection
        still young, may not have closed it.)"""
        while self._idle:
            conn = self._idle.pop()
            if conn.closed:
                continue
            if conn.loop.time() - conn.last_activity >= self.idle_for:
                conn.close()
                continue
            conn.idle = False
            conn._reset()
            return conn
        return None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                transport, conn = await loop.create_connection(
                    lambda: _Connection(loop, self.max_head),
                    self.host,
                    self.port,
                    ssl=self.ssl,
                    server_hostname=self.host if self.ssl else None,
                )
        except TimeoutError:  # before OSError, of which it is a subclass: a 504, not a 502
            raise UpstreamConnectTimeout(
                "the upstream did not accept a connection in time"
            ) from None
        except OSError as exc:
            raise UpstreamBroken(f"cannot connect to the upstream: {exc.strerror or exc}") from exc
        conn.transport = transport  # uvloop calls connection_made a little later
        return conn

    def _put_back(self, conn: _Connection) -> None:
        if conn.reusable and not self._closed and len(self._idle) < _MAX_IDLE:
            conn.idle = True
            self._idle.append(conn)
            if self._sweep is None:
                self._sweep_after(conn)
        else:
            conn.close()

    def _sweep_after(self, oldest: _Connection) -> None:
        when = oldest.last_activity + self.idle_for
        self._sweep = oldest.loop.call_at(when, self._close_expired)

    def _close_expired(self) -> None:
        """Close the connections idle for ``idle_for`` (the least recently used)."""
        self._sweep = None
        if not self._idle:
            return
        cutoff = self._idle[0].loop.time() - self.idle_for
        expired = 0
        for conn in self._idle:
            if conn.last_activity > cutoff:
                break
            conn.close()
            expired += 1
        del self._idle[:expired]
        if self._idle:
            self._sweep_after(self._idle[0])

    async def close(self) -> None:
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for conn in self._idle:
            conn.close()
        self._idle.clear()


def _request_head(
    method: str, target: str, host: str, headers: Iterable[tuple[str, str]], length: int | None
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    for name, value in headers:
        lines.append(f"{name}: {value}")
    lines.append("\r\n" if length is None else f"Content-Length: {length}\r\n\r\n")
    head = "\r\n".join(lines)
    breaks = len(lines) + 1 if length is not None else len(lines)
    if head.count("\n") != breaks or head.count("\r") != breaks:  # inside a name or value
        raise InvalidRequest("header names and values must not contain line breaks")
    return head.encode("utf-8", "surrogateescape")
