"""The streaming tee: upstream SSE bytes go to the client as they arrive, byte for byte,
while a copy is parsed into the assistant turn that is committed when the answer completes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from ..errors import ChatmemError
from .accumulate import AssistantTurn, StreamAccumulator
from .http import error_event
from .sse import SSEParser

__all__ = ["tee_stream"]

Commit = Callable[[AssistantTurn], Awaitable[None]]

_CUT_OFF = error_event(
    "the upstream stream ended before the answer completed", code="upstream_incomplete"
)
_TIMEOUT = error_event(
    "the upstream sent nothing for longer than upstream.read_timeout", code="upstream_timeout"
)
_BROKEN = error_event("the upstream connection broke during the answer", code="upstream_broken")
_EVENT_ENDS = (b"\n\n", b"\r\r", b"\r\n\r\n")


class _Client:
    """The client side of the tee: remembers whether the client is still there and
    whether the bytes sent so far end between two events."""

    def __init__(self, response: web.StreamResponse) -> None:
        self.response = response
        self.gone = False
        self._tail = b"\n\n"

    async def write(self, data: bytes) -> None:
        if self.gone or not data:
            return
        try:
            await self.response.write(data)
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            self.gone = True
        self._tail = data[-4:]

    async def end_with(self, event: bytes) -> None:
        """Send our own final event, first closing any event the upstream left open."""
        open_event = not self._tail.endswith(_EVENT_ENDS)
        await self.write(b"\n\n" + event if open_event else event)


async def tee_stream(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    headers: CIMultiDict[str],
    commit: Commit,
    *,
    finish_without_client: bool,
) -> web.StreamResponse:
    """Relay ``upstream``'s event stream and ``commit`` choice 0 once it completed.

    The chunk that carries ``[DONE]`` is written only after the commit returned, so a
    client that has seen the end of the answer can rely on its next request seeing the
    turn.  A stream that fails, ends early or was not saved ends with one error event.
    """
    response = web.StreamResponse(status=upstream.status, headers=headers)
    response.headers["X-Accel-Buffering"] = "no"
    await response.prepare(request)
    client = _Client(response)
    parser = SSEParser()
    answer = StreamAccumulator()
    try:
        async for chunk in upstream.content.iter_any():
            if answer.done:
                await client.write(chunk)  # whatever follows [DONE] is still forwarded
            else:
                for data in parser.feed(chunk):
                    answer.add(data)
                if answer.done:
                    await _finish(client, answer, chunk, commit)
                else:
                    await client.write(chunk)
            if client.gone and not finish_without_client:
                upstream.close()
                return response
    except (TimeoutError, aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
        # Timeouts first: aiohttp's read timeout is also a ClientConnectionError.
        if not answer.done:
            await client.end_with(_TIMEOUT if isinstance(exc, asyncio.TimeoutError) else _BROKEN)
        return response
    if not answer.done and answer.error is None:
        await client.end_with(_CUT_OFF)
    return response


async def _finish(client: _Client, answer: StreamAccumulator, chunk: bytes, commit: Commit) -> None:
    """``[DONE]`` arrived in ``chunk``: commit a completed answer, then release the chunk.

    When the answer is incomplete or cannot be saved, the error event goes in front of the
    ``[DONE]`` event (a client stops reading at ``[DONE]``).
    """
    turn = answer.turn(0)
    failure: bytes | None = None
    if answer.error is not None:
        pass  # the upstream's own error event is already in the stream
    elif not answer.completed or turn is None:
        failure = _CUT_OFF
    else:
        try:
            await commit(turn)
        except ChatmemError as exc:
            failure = error_event(f"the answer could not be saved: {exc.message}", code=exc.code)
    if failure is None:
        await client.write(chunk)
        return
    done_at = chunk.rfind(b"data:", 0, max(chunk.rfind(b"[DONE]"), 0))
    await client.write(chunk[: max(done_at, 0)])
    await client.end_with(failure)
    await client.write(chunk[max(done_at, 0) :])
