"""The streaming tee: upstream SSE bytes go to the client as they arrive, byte for byte,
while a copy is parsed into the assistant turn that is committed when the answer completes.

A :class:`Renderer` replaces the byte-exact relay with another view of the same answer (the
older conversation service streams plain text); parsing, committing and failing stay here.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from .. import jsonio
from ..errors import ChatmemError, failures
from ..logs import CLIENT_LEFT
from ..shutdown import GatewayStopping
from .accumulate import AssistantTurn, StreamAccumulator, failed_finish_message
from .http import AsItCame, error_event, upstream_says
from .redact import mask_bytes
from .sse import SSEParser, only_data_events
from .upstream import StreamedAnswer

__all__ = ["Renderer", "tee_stream"]

log = logging.getLogger("chatmem")

Commit = Callable[[AssistantTurn], Awaitable[None]]
Failure = tuple[str, str | None, str]
"""Why a stream failed: a message safe to show the client, an error code, and the error
type (the one a non-streamed answer failing the same way has)."""

_CUT_OFF: Failure = (
    "the upstream stream ended before the answer completed",
    "upstream_incomplete",
    "upstream_error",
)
_NOT_A_CHUNK: Failure = (
    "the upstream sent an event that is not a JSON object; the answer was not saved",
    "upstream_incomplete",
    "upstream_error",
)
_NO_FINISH: Failure = (
    "the upstream ended the stream without a finish_reason for the answer",
    "upstream_incomplete",
    "upstream_error",
)
_TIMEOUT: Failure = (
    "the upstream sent nothing for longer than upstream.read_timeout",
    "upstream_timeout",
    "upstream_error",
)
_BROKEN: Failure = (
    "the upstream connection broke during the answer",
    "upstream_broken",
    "upstream_error",
)
_TOO_LARGE: Failure = (
    "the upstream's answer is larger than upstream.max_answer_bytes; it was not saved",
    "upstream_answer_too_large",
    "upstream_error",
)
_STOPPING: Failure = (
    "the gateway shut down before the answer completed",
    "gateway_shutting_down",
    "server_error",
)
# Two line endings in a row (CRLF, CR or LF; a CR right before LF is half of one CRLF).
_BOUNDARY = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r(?!\n)|\n)")
_BOUNDARY_AT_END = re.compile(_BOUNDARY.pattern + rb"\Z")
_AFTER_DONE = 2.0
"""Seconds after ``[DONE]`` (of silence, or in all) before the gateway ends the body."""
_DONE = b"[DONE]"
"""In the bytes of every ``[DONE]`` event: a read without them cannot end the answer."""


def _whole_events(data: bytes | bytearray, start: int) -> int:
    """Where the last whole event of ``data`` ends (0: none), its boundaries looked for
    from ``start`` on."""
    if data[-2:] == b"\n\n" and data[-3:-2] not in (b"\n", b"\r"):
        return len(data)  # the usual read: whole events, nothing to hold
    end = 0
    for boundary in _BOUNDARY.finditer(data, start):
        end = boundary.end()
    return end


def _done_event_start(data: bytes) -> int:
    """Where the first ``[DONE]`` event of ``data`` starts (``data`` starts on a boundary)."""
    first = data.find(_DONE)
    start = first - len(b"data: ")
    if (
        start >= 0
        and data[start : first + len(_DONE) + 2] == b"data: [DONE]\n\n"
        and b"\r" not in data
        and (start == 0 or only_data_events(data, start))
    ):
        # The usual end of a stream: whole data events, then [DONE], the first one, since
        # no "[DONE]" comes before it (found without scanning every boundary).
        return start
    start = 0
    for boundary in _BOUNDARY.finditer(data):
        event = data[start : boundary.end()]
        if _DONE in event and [e.strip() for e in SSEParser().feed(event)] == ["[DONE]"]:
            return start
        start = boundary.end()
    return len(data)  # its start was already sent: too late to put anything in front


class Renderer(Protocol):
    """What the client reads instead of the upstream's SSE bytes (one instance per answer)."""

    content_type: str

    def progress(self, answer: StreamAccumulator) -> bytes:
        """The bytes for what ``answer`` gained since the previous call."""

    def failure(self, message: str) -> bytes:
        """The bytes that end an answer that failed with ``message``."""


class _HeadWithFirstBytes(AsItCame):
    """A response whose head is held at ``prepare`` and goes out in one send with the
    first body bytes: aiohttp's own switch, the one its ``web.Response`` uses."""

    _send_headers_immediately = False


class _SeedFraming:
    """Whole events as the old api-server's clients read them: its README promises
    events that start with ``data: `` and end with ``\n\n``, and they split the body on
    that.  So each event goes out as its data alone, a ``data: `` line for each of its
    lines, in LF framing; comments (keep-alives), other fields and events without data
    are left out.  Fed every write in order, so a CR that ended one write and the LF that
    starts the next are one line end."""

    __slots__ = ("_parser",)

    def __init__(self) -> None:
        self._parser = SSEParser()

    def events(self, data: bytes) -> bytes:
        return b"".join(
            b"".join(b"data: " + line + b"\n" for line in payload.encode().split(b"\n")) + b"\n"
            for payload in self._parser.feed(data)
        )


class _Client:
    """The client side of the tee: remembers whether the client is still there and
    whether the bytes sent so far end between two events.

    ``head_waits``: the response head was held back to go out with the first write
    (which then goes out even when it is empty).  ``chunks_only``: for the old
    api-server's clients, which also get its framing (:class:`_SeedFraming`).
    ``secret``: the upstream key, masked
    wherever the upstream quoted it (an error event that quotes the credential it
    refused); each write is whole events, so the key is never cut in two.
    """

    def __init__(
        self,
        response: web.StreamResponse,
        render: Renderer | None,
        *,
        head_waits: bool,
        chunks_only: bool,
        secret: bytes | None = None,
    ) -> None:
        self.response = response
        self.secret = secret
        self.render = render
        self.chunks_only = chunks_only
        self._seed = _SeedFraming() if chunks_only else None
        self.gone = False
        self.head_waits = head_waits
        self._tail = b"\n\n"  # the last bytes written, to tell whether an event is open
        self._held = bytearray()
        """An unfinished event, held until its blank line arrives (see ``relay``); grown in
        place, since a long one can come in many reads."""
        self._held_done = False
        """Whether ``[DONE]`` is in what is held, kept up as it grows (searched whole on
        every read, a long held event would cost its length each time)."""

    async def write(self, data: bytes) -> None:
        if self._seed is not None:
            data = self._seed.events(data)
        if self.gone or not (data or self.head_waits):
            return
        if self.secret is not None:
            data = mask_bytes(data, self.secret)
        self.head_waits = False
        try:
            await self.response.write(data)
        except ConnectionError:  # reset; or "Connection lost" while a write waited to drain
            self.gone = True
            self.response[CLIENT_LEFT] = True
        self._tail = (self._tail + data[-4:])[-4:]

    def may_end(self, chunk: bytes) -> bool:
        """Whether ``chunk``, after what is held, may finish a ``[DONE]`` event."""
        if _DONE in chunk or self._held_done:
            return True
        held = self._held
        return bool(held) and _DONE in held[-5:] + chunk[:5]

    def _take_held(self, chunk: bytes) -> bytes:
        """What is held, then ``chunk``; nothing is held any more."""
        if not self._held:
            return chunk
        data = bytes(self._held) + chunk
        self._held.clear()
        self._held_done = False
        return data

    async def _end_of_crlf(self, chunk: bytes) -> bytes:
        """``chunk`` without the LF of a CRLF whose CR ended the last write (a CR ends a
        line, so that write ended an event): it belongs to that boundary and goes now,
        ahead of anything the gateway may write next, such as its error event."""
        if chunk[:1] == b"\n" and not self._held and self._tail[-1:] == b"\r":
            await self.write(b"\n")
            return chunk[1:]
        return chunk

    async def send_before_done(self, chunk: bytes) -> bytes:
        """Write what is held and ``chunk`` up to the ``[DONE]`` event; return the rest."""
        data = self._take_held(await self._end_of_crlf(chunk))
        done_at = _done_event_start(data)
        await self.write(data[:done_at])
        return data[done_at:]

    def from_done(self, data: bytes) -> bytes:
        """``data``, which starts with the ``[DONE]`` event, as the client gets it."""
        return b"" if self.chunks_only else data

    def _on_boundary(self) -> bool:
        return _BOUNDARY_AT_END.search(self._tail) is not None

    async def relay(self, chunk: bytes, answer: StreamAccumulator) -> None:
        """Pass on ``chunk`` (already fed to ``answer``): as is, or rendered.

        An unfinished event at the end is held back until the read that finishes it: it
        could be ``[DONE]``, in front of which a failure must still be able to go, or an
        event the upstream never finishes, which must not reach the client cut short.
        Holding it delays nothing a client can see: an event is only dispatched once its
        blank line has arrived.  It is held whatever its size (``upstream.max_answer_bytes``
        bounds it, and the answer is held to be stored anyway).
        """
        if self.render is not None:
            await self.write(self.render.progress(answer))
            return
        held = self._held
        if not held and chunk[-2:] == b"\n\n" and chunk[-3:-2] not in (b"\n", b"\r"):
            # The usual read: whole events, nothing to hold.  ``_whole_events`` makes the
            # same check; made here first it saves 0.9 % of a stream's instructions
            # (2.677 M against 2.700 M, ``benchmarks.instructions --stream 64``).
            await self.write(chunk)
            return
        if not held:
            chunk = await self._end_of_crlf(chunk)
            end = _whole_events(chunk, 0)
            if end < len(chunk):
                held += chunk[end:]
                self._held_done = _DONE in held
            if end:
                await self.write(chunk if end == len(chunk) else chunk[:end])
            elif self.head_waits:
                # The head waited for these bytes, all held: it goes without them, or an
                # unfinished first event would hold it as long as the upstream (item 142).
                await self.write(b"")
            return
        grown_from = len(held)
        held += chunk
        # What was held has no boundary in it: the next one ends in ``chunk``.
        end = _whole_events(held, max(grown_from - 3, 0))
        if not end:
            self._held_done = self._held_done or _DONE in held[max(grown_from - 5, 0) :]
            return
        events = bytes(held[:end])
        del held[:end]
        self._held_done = _DONE in held  # what is left came in this read
        await self.write(events)

    async def pass_on(self, chunk: bytes) -> None:
        """After ``[DONE]``: whatever follows it, as it comes (none of it is parsed, nor
        held: an upstream that sent more would otherwise fill the gateway's memory)."""
        await self.write(self._take_held(chunk))

    async def flush(self) -> None:
        held = self._take_held(b"")
        await self.write(b"" if self.chunks_only else held)  # an unfinished event, there

    async def end_with(self, failure: Failure) -> None:
        """Send our own final event on an event boundary: the last the client reads.

        An unfinished event the upstream left, still held, is not sent: it is no event,
        and a client that reads line by line would take its ``data:`` line for one.
        (What was sent ends on a boundary; the check below only guards that.)
        """
        message, code, type_ = failure
        if code is not None:  # ours, not the upstream's own error event shown as text
            failures.note(code, message)
        if self.render is not None:
            await self.flush()
            await self.write(self.render.failure(message))
            return
        event = error_event(message, type_, code=code)
        self._take_held(b"")
        if not self._on_boundary():
            event = b"\n\n" + event
        elif self._tail[-1:] == b"\r":
            # An LF after that CR changes nothing for an SSE client (CRLF ends a line as
            # CR does), and one that splits lines on LF alone reads our event whole.
            event = b"\n" + event
        await self.write(event)

    async def upstream_error(self, error: dict[str, Any]) -> None:
        """The upstream's own error event: already relayed as SSE, shown when rendered."""
        if self.render is not None:
            message = error.get("message")
            shown = str(message) if message else "the upstream failed"
            await self.end_with((shown, None, "upstream_error"))

    async def end_before_done(
        self, chunk: bytes, answer: StreamAccumulator, failure: Failure
    ) -> None:
        """``chunk`` holds ``[DONE]``: put the failure in front of it (a client stops there)."""
        if self.render is not None:
            await self.relay(chunk, answer)
            await self.end_with(failure)
            return
        data = self._take_held(await self._end_of_crlf(chunk))
        done_at = _done_event_start(data)
        await self.write(data[:done_at])
        await self.end_with(failure)
        await self.write(self.from_done(data[done_at:]))


async def tee_stream(
    request: web.Request,
    upstream: StreamedAnswer,
    headers: CIMultiDict[str],
    commit: Commit,
    *,
    finish_without_client: bool,
    render: Renderer | None = None,
    chunks_only: bool = False,
    max_bytes: int | None = None,
    on_first_chunk: Callable[[], None] | None = None,
    secret: bytes | None = None,
) -> web.StreamResponse:
    """Relay ``upstream``'s event stream and ``commit`` choice 0 once it completed.

    An answer of more than ``max_bytes`` is not held in memory to the end: the stream
    ends there with an error event, and nothing is committed.  With ``chunks_only``
    the stream ends at ``[DONE]``, which is left out with anything after it, as is an
    unfinished event at a failure (the end of the body still waits for the commit).

    The ``[DONE]`` event is written only after the commit returned, so a
    client that has seen the end of the answer can rely on its next request seeing the
    turn.  A stream that fails, ends early or was not saved ends with one error event
    (or, with ``render``, the renderer's failure text).  ``secret``, the upstream key,
    is masked wherever the upstream quoted it.
    """
    # When the first bytes of the answer came in with the upstream's head, the client
    # gets our head and them in one send: one wake-up, not two.  When they did not, the
    # head goes now, so that a slow first token does not hold it.
    head_waits = upstream.buffered
    # An upstream's stream without a Content-Type goes on without one (aiohttp would add
    # application/octet-stream), as on the passthrough.
    response = (_HeadWithFirstBytes if head_waits else AsItCame)(
        status=upstream.status, headers=headers
    )
    response.headers["X-Accel-Buffering"] = "no"
    client = _Client(
        response, render, head_waits=head_waits, chunks_only=chunks_only, secret=secret
    )
    try:
        await response.prepare(request)
    except ConnectionError:
        client.gone = True  # left before the answer started
        response[CLIENT_LEFT] = True
        if not finish_without_client:
            upstream.close()
            return response
    parser = SSEParser()
    answer = StreamAccumulator(keep_pieces=render is not None)
    received = 0
    forward_until = math.inf  # once [DONE] came: how long what follows is passed on
    try:
        async for chunk in upstream.content.iter_any():
            if on_first_chunk is not None:  # metrics: time to first token
                on_first_chunk()
                on_first_chunk = None
            received += len(chunk)
            if max_bytes is not None and received > max_bytes and not answer.done:
                upstream.close()
                await client.end_with(_TOO_LARGE)
                return response
            if answer.done:
                left = forward_until - asyncio.get_running_loop().time()
                if left <= 0:
                    upstream.close()  # it kept sending: the client has had its answer
                    break
                await client.pass_on(chunk)  # whatever follows [DONE] is still forwarded
                upstream.expect_end(left)  # and its silence ends the body by then too
                continue
            # Bytes that cannot end the answer go to the client before they are parsed.
            ahead = render is None and not client.may_end(chunk)
            if ahead:
                await client.relay(chunk, answer)
            for data in parser.feed(chunk):
                if answer.done:
                    break  # events after [DONE] (in the same read) decide nothing
                answer.add(data)
            if answer.done:
                await _finish(client, answer, chunk, commit, parser)
                if client.chunks_only or render is not None:
                    # Nothing after [DONE] reaches these clients: done.  The connection
                    # goes back to the pool if the body has ended (as it usually has).
                    upstream.release()
                    break
                # What follows [DONE] still goes on, but an upstream that keeps the body
                # open, or keeps sending, must not keep a client that has its answer.
                upstream.expect_end(_AFTER_DONE)
                forward_until = asyncio.get_running_loop().time() + _AFTER_DONE
            elif not ahead:
                await client.relay(chunk, answer)
            if client.gone and not finish_without_client:
                upstream.close()
                return response
    except (TimeoutError, aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
        # Timeouts first: aiohttp's read timeout is also a ClientConnectionError.
        if answer.done:
            await client.flush()
        else:
            await client.end_with(_failure_event(exc))
        return response
    if not answer.done and answer.error is None:
        if answer.finished:
            # The body ended whole, without [DONE], after choice 0's finish_reason: older
            # llama.cpp servers end so, and the OpenAI SDKs take it as the end (so is an
            # unfinished "data: [DONE]" at the end of the body, which goes on as it came).
            failure = await _commit(answer, commit)
            if failure is None:
                await client.flush()
                return response
            await client.end_with(failure)
            return response
        await client.end_with(
            _said(parser, client.secret) or (_NOT_A_CHUNK if answer.malformed else _CUT_OFF)
        )
        return response
    await client.flush()
    if not answer.done and answer.error is not None:
        await client.upstream_error(answer.error)
    return response


def _failure_event(exc: Exception) -> Failure:
    if isinstance(exc, GatewayStopping):
        return _STOPPING
    return _TIMEOUT if isinstance(exc, asyncio.TimeoutError) else _BROKEN


async def _commit(answer: StreamAccumulator, commit: Commit) -> Failure | None:
    """``commit`` choice 0 of a finished answer; why it was not saved, if it was not."""
    turn = answer.turn(0)
    if turn is None:
        return _NO_FINISH
    try:
        await commit(turn)
    except ChatmemError as exc:
        saved = "may not have been" if exc.code == "storage_outcome_unknown" else "could not be"
        return (f"the answer {saved} saved: {exc.message}", exc.code, exc.type)
    except Exception:
        # Unforeseen, and logged as such (the engine hides statement parameters). The
        # stream has started, so no 500 can follow: the client gets an error event and
        # the end of the body, not a body that hangs.
        log.exception("the answer could not be saved")
        return ("the answer could not be saved", "internal_error", "server_error")
    return None


def _said(parser: SSEParser, secret: bytes | None) -> Failure | None:
    """The upstream's own ``error:`` field (llama.cpp's), quoted (the key masked), for a
    stream that did not complete: the client's SSE parser passes such a field over."""
    if parser.error_field is None:
        return None
    try:
        value: object = jsonio.loads(parser.error_field)
    except (UnicodeDecodeError, ValueError, RecursionError):
        value = parser.error_field.decode("utf-8", "replace")
    said = upstream_says(value, secret)
    if said is None:
        return None
    return f"the upstream reported an error: {said}", "upstream_error", "upstream_error"


async def _finish(
    client: _Client, answer: StreamAccumulator, chunk: bytes, commit: Commit, parser: SSEParser
) -> None:
    """``[DONE]`` arrived in ``chunk``: commit a completed answer, then release ``[DONE]``.

    When the answer is incomplete or cannot be saved, the error event goes in front of the
    ``[DONE]`` event (a client stops reading at ``[DONE]``).
    """
    if answer.error is not None:
        # The upstream's own error event is already in the stream.
        if client.chunks_only:
            chunk = client.from_done(await client.send_before_done(chunk))
        await client.relay(chunk, answer)
        await client.upstream_error(answer.error)
        return
    if client.render is None:
        # The events in front of [DONE] arrived like any other: they go out now; only the
        # [DONE] event waits for the commit.
        chunk = await client.send_before_done(chunk)
    else:
        # The text so far goes out now too (and with it a response head still held):
        # only the end of the body waits for the commit.
        await client.relay(chunk, answer)
    failure: Failure | None
    if answer.failed_finish is not None:
        message = failed_finish_message(answer.failed_finish)
        failure = (message, "upstream_incomplete", "upstream_error")
    elif not answer.completed:
        failure = _said(parser, client.secret) or (_NOT_A_CHUNK if answer.malformed else _NO_FINISH)
    else:
        failure = await _commit(answer, commit)
    if failure is None:
        await client.relay(client.from_done(chunk), answer)
    else:
        await client.end_before_done(chunk, answer, failure)
