"""A byte-exact scripted HTTP/1.1 upstream for failure tests.

Built on a bare listening socket and asyncio streams rather than aiohttp, so that every
response byte and every connection fault is under the test's control. Each connection
serves one request and the response always says ``Connection: close``.

    async with scripted_upstream(Script(chunks=[b"data: 1\\n\\n", 0.5], end="reset")) as up:
        ...  # point the gateway at up.url; inspect up.requests and up.disconnected
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["BeforeHeaders", "End", "Framing", "Script", "ScriptedUpstream", "scripted_upstream"]

GARBAGE = b"THIS IS NOT HTTP\r\n\r\n"


Framing = Literal["chunked", "length", "close"]
End = Literal["ok", "reset", "hang"]
BeforeHeaders = Literal["none", "reset", "hang", "garbage"]


@dataclass
class Script:
    """What to answer, and how to fail.

    ``chunks``: bytes are written (then drained), a float sleeps that many seconds, an
    ``asyncio.Event`` is waited for (the test sets it: no timing involved).
    ``framing``: chunked transfer-encoding, Content-Length, or a body ended by closing.
    With "length" the declared length is the sum of the chunks unless ``headers`` sets
    Content-Length itself (set it larger to cut the body short).
    ``end``: after the chunks, finish, reset (TCP RST), or stay silent until the client leaves.
    ``before_headers``: a fault instead of any response: reset, hang, or a non-HTTP reply.
    """

    status: int = 200
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": "text/event-stream"})
    chunks: list[bytes | float | asyncio.Event] = field(default_factory=list)
    framing: Framing = "chunked"
    end: End = "ok"
    before_headers: BeforeHeaders = "none"
    release_head: asyncio.Event | None = None
    """If set, the response head waits for it (the request has been read by then)."""
    head_with_first_chunk: bool = False
    """The head and the first bytes chunk go out in one write (one TCP segment)."""
    reason: str | None = None
    """The status line's reason phrase; None: the status's usual one."""
    more_head_lines: list[str] = field(default_factory=list)
    """Header lines as written, after ``headers`` (a name twice, say)."""


RequestRecord = tuple[str, str, dict[str, str], bytes]


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                pass
            return bytes(body)
        body += await reader.readexactly(size)
        await reader.readexactly(2)


async def _read_request(reader: asyncio.StreamReader) -> RequestRecord:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    request_line, *header_lines = head.split("\r\n")[:-2]
    method, target, _version = request_line.split(" ", 2)
    headers: dict[str, str] = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip()] = value.strip()
    lowered = {k.lower(): v for k, v in headers.items()}
    if lowered.get("transfer-encoding", "").lower() == "chunked":
        body = await _read_chunked(reader)
    else:
        body = await reader.readexactly(int(lowered.get("content-length", "0")))
    return method, target, headers, body


def _reset(writer: asyncio.StreamWriter) -> None:
    """Abort with a TCP RST (SO_LINGER 0), so even ``framing="close"`` sees a fault."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _head(script: Script) -> bytes:
    try:
        reason = script.reason or http.HTTPStatus(script.status).phrase
    except ValueError:
        reason = "Unknown"
    lines = [f"HTTP/1.1 {script.status} {reason}"]
    lines += [f"{name}: {value}" for name, value in script.headers.items()]
    lines += script.more_head_lines
    if script.framing == "chunked":
        lines.append("Transfer-Encoding: chunked")
    elif script.framing == "length" and "content-length" not in map(str.lower, script.headers):
        length = sum(len(c) for c in script.chunks if isinstance(c, bytes))
        lines.append(f"Content-Length: {length}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class ScriptedUpstream:
    """A listening socket whose connections each get a tracked task.

    Connections are accepted in a plain reader callback, so each one is registered in the
    same step it is accepted: ``close()`` finds them all, none can slip in half-accepted.
    """

    def __init__(self) -> None:
        self.script = Script()
        self.requests: list[RequestRecord] = []
        self.disconnected = asyncio.Event()
        self.url = ""
        self._arrived = asyncio.Event()
        self._listener: socket.socket | None = None
        self._connections: dict[asyncio.Task[None], socket.socket] = {}

    async def start(self) -> None:
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        asyncio.get_running_loop().add_reader(listener, self._accept, listener)
        self._listener = listener
        self.url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1"

    async def close(self) -> None:
        """Stop listening and end every connection; no task or socket outlives this."""
        if self._listener is not None:
            asyncio.get_running_loop().remove_reader(self._listener)
            self._listener.close()
            self._listener = None
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def wait_for_requests(self, count: int) -> None:
        """Return once ``count`` requests in all have been read."""
        while len(self.requests) < count:
            self._arrived.clear()
            await self._arrived.wait()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            conn.setblocking(False)
            task = asyncio.get_running_loop().create_task(self._serve(conn))
            self._connections[task] = conn
            task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._connections.pop(task).close()  # already closed unless cancelled before it ran

    async def _serve(self, conn: socket.socket) -> None:
        reader, writer = await asyncio.open_connection(sock=conn)
        try:
            await self._answer(reader, writer)
        except (
            ConnectionError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ValueError,
        ):
            pass  # the client went away or sent no HTTP; _answer noted what matters
        finally:
            writer.transport.abort()  # a no-op after a graceful close
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.requests.append(await _read_request(reader))
        self._arrived.set()
        script = self.script
        if script.before_headers == "reset":
            _reset(writer)
            return
        if script.before_headers == "hang":
            await self._hang(reader)
            return
        if script.before_headers == "garbage":
            writer.write(GARBAGE)
            await writer.drain()
            await _close(writer)
            return
        client_gone = asyncio.create_task(_until_client_closes(reader))
        try:
            await self._write_response(script, writer, client_gone)
        finally:
            client_gone.cancel()

    async def _write_response(
        self, script: Script, writer: asyncio.StreamWriter, client_gone: asyncio.Task[None]
    ) -> None:
        try:
            if script.release_head is not None:
                await script.release_head.wait()
            head = _head(script)
            if not script.head_with_first_chunk:
                writer.write(head)
                await writer.drain()
                head = b""
            for chunk in script.chunks:
                if client_gone.done():
                    break
                if isinstance(chunk, asyncio.Event):
                    released = asyncio.create_task(chunk.wait())
                    await asyncio.wait([client_gone, released], return_when=asyncio.FIRST_COMPLETED)
                    released.cancel()
                elif not isinstance(chunk, bytes):
                    await asyncio.wait([client_gone], timeout=chunk)
                elif chunk:
                    chunked = script.framing == "chunked"
                    framed = b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk
                    writer.write(head + framed)
                    await writer.drain()
                    head = b""
        except ConnectionError:
            self.disconnected.set()
            raise
        if client_gone.done():
            self.disconnected.set()
        elif script.end == "reset":
            _reset(writer)
        elif script.end == "hang":
            await client_gone
            self.disconnected.set()
        else:
            if script.framing == "chunked":
                writer.write(b"0\r\n\r\n")
            await _close(writer)

    async def _hang(self, reader: asyncio.StreamReader) -> None:
        await _until_client_closes(reader)
        self.disconnected.set()


async def _until_client_closes(reader: asyncio.StreamReader) -> None:
    """Return once the client has closed (EOF) or reset its side of the connection."""
    with contextlib.suppress(ConnectionError):
        while await reader.read(65536):
            pass


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


@contextlib.asynccontextmanager
async def scripted_upstream(script: Script | None = None) -> AsyncIterator[ScriptedUpstream]:
    """A started ``ScriptedUpstream`` (answering with ``script``), closed on exit."""
    upstream = ScriptedUpstream()
    if script is not None:
        upstream.script = script
    await upstream.start()
    try:
        yield upstream
    finally:
        await upstream.close()
