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

_CUT_OFF = error_event(
    "the upstream stream ended before the answer completed", code="upstream_incomplete"
)
_TIMEOUT = error_event(
    "the upstream sent nothing for longer than upstream.read_timeout", code="upstream_timeout"
)
_BROKEN = error_event("the upstream connection broke during the answer", code="upstream_broken")


class _Client:
    """The client side of the tee; remembers when the client has gone away."""

    def __init__(self, response: web.StreamResponse) -> None:
        self.response = response
        self.gone = False

    async def write(self, data: bytes) -> None:
        if self.gone:
            return
        try:
            await self.response.write(data)
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            self.gone = True

    async def finish(self) -> None:
        if not self.gone:
            try:
                await self.response.write_eof()
            except (ConnectionResetError, aiohttp.ClientConnectionResetError):
                self.gone = True


async def tee_stream(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    headers: CIMultiDict[str],
    commit: Callable[[AssistantTurn], Awaitable[None]],
    *,
    finish_without_client: bool,
) -> web.StreamResponse:
    """Relay ``upstream``'s event stream and ``commit`` choice 0 once it completed.

    The chunk that carries ``[DONE]`` is written only after the commit returned, so a
    client that has seen the end of the answer can rely on its next request seeing the
    turn.  If the commit fails, that chunk is replaced by an error event.
    """
    response = web.StreamResponse(status=upstream.status, headers=headers)
    response.headers["X-Accel-Buffering"] = "no"
    await response.prepare(request)
    client = _Client(response)
    parser = SSEParser()
    answer = StreamAccumulator()
    try:
        async for chunk in upstream.content.iter_any():
            if not answer.done:
                for data in parser.feed(chunk):
                    answer.add(data)
                if answer.done:
                    chunk = await _settle(answer, chunk, commit)
            await client.write(chunk)
            if client.gone and not finish_without_client:
                upstream.close()
                return response
    except (TimeoutError, aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
        # Timeouts first: aiohttp's read timeout is also a ClientConnectionError.
        if not answer.done:
            await client.write(_TIMEOUT if isinstance(exc, asyncio.TimeoutError) else _BROKEN)
        return response
    if not answer.done and answer.error is None:
        await client.write(_CUT_OFF)
    await client.finish()
    return response


async def _settle(
    answer: StreamAccumulator, chunk: bytes, commit: Callable[[AssistantTurn], Awaitable[None]]
) -> bytes:
    """``[DONE]`` arrived in ``chunk``: commit a completed answer; return what to write."""
    turn = answer.turn(0)
    if not answer.completed or turn is None:
        return chunk if answer.error is not None else _CUT_OFF + chunk
    try:
        await commit(turn)
    except ChatmemError as exc:
        return error_event(f"the answer could not be saved: {exc.message}", code=exc.code)
    return chunk
