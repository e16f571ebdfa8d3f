"""Graceful shutdown: the requests in flight, and ending them when the grace period is over.

aiohttp stops accepting connections, then runs ``on_shutdown`` (where :meth:`drain` runs),
then waits ``shutdown_timeout`` for handlers and cancels them.  Left to aiohttp alone a
stream would be cut mid-event, so chatmem drains first, in the shape of aiohttp-sse's
graceful-shutdown example: every chatmem request is registered while it runs, and every
stream with the upstream response it relays.  :meth:`drain` waits up to
``server.shutdown_grace`` for all of them (finished answers are committed as usual); a
stream still running then has :class:`GatewayStopping` set on its upstream body, so the tee
ends it the way it ends any broken upstream: one error event, proper end of the body,
nothing committed.  Other requests still running are cancelled (before their commit, which
is shielded, so a turn is either whole or absent).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

import aiohttp
from aiohttp.base_protocol import BaseProtocol

from .metrics import Metrics
from .proxy.upstream import Answer

__all__ = ["GatewayStopping", "LiveRequests"]

log = logging.getLogger("chatmem")
T = TypeVar("T")

# Once the grace period is over: how long ended streams get to write their last event.
_END_WAIT = 5.0


class GatewayStopping(aiohttp.ClientConnectionError):
    """Set on the upstream body of a stream still running when the grace period ends."""


_CLIENT_CHECK = 0.5
"""Seconds between two looks for requests whose client has left (see ``watch_clients``)."""


class LiveRequests:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.tasks: dict[asyncio.Task[object], BaseProtocol] = {}
        """The tasks of chatmem's requests in flight, each with its client connection's
        protocol (``tracking.track`` keeps it)."""
        self.streams: dict[asyncio.Task[object], Answer] = {}
        self.waiting: dict[asyncio.Task[object], asyncio.Task[object]] = {}
        """Handlers whose work runs in a task of its own (``finish``), with that task."""

    async def watch_clients(self) -> None:
        """Cancel the handler of a request whose client has gone, within ``_CLIENT_CHECK``
        seconds, as aiohttp does itself only when run with ``handler_cancellation=True``.

        A handler that is not cancelled learns that its client left only when it next
        writes, so with ``on_client_disconnect = "discard"`` the upstream would be asked
        for an answer nobody reads until the upstream's next byte, or, for an answer that
        is not streamed, to its end, and that answer would be committed.  aiohttp's default,
        what ``web.run_app(app)`` does in an app chatmem is embedded in, is not to cancel.
        """
        while True:
            await asyncio.sleep(_CLIENT_CHECK)
            try:
                for task, protocol in list(self.tasks.items()):
                    # A connection's protocol drops its transport when the connection is lost.
                    if protocol.transport is None and not task.done() and not task.cancelling():
                        task.cancel()
            except Exception:  # never expected; the watch must not end with it
                log.exception("looking for requests whose client left failed")

    @contextmanager
    def stream(self, upstream: Answer) -> Iterator[None]:
        """Around relaying ``upstream``'s stream: counted, and endable at the deadline."""
        task = asyncio.current_task()
        if task is not None:
            self.streams[task] = upstream
        self.metrics.stream_started()
        try:
            yield
        finally:
            self.metrics.stream_ended()
            if task is not None:
                self.streams.pop(task, None)

    async def detached(self, work: asyncio.Task[T]) -> T:
        """The result of ``work``, a task the handler's cancellation cannot reach; while the
        handler waits, shutdown knows which work it waits for (see ``drain``)."""
        handler = asyncio.current_task(work.get_loop())
        if handler is not None:
            self.waiting[handler] = work
        try:
            return await asyncio.shield(work)
        finally:
            if handler is not None:
                self.waiting.pop(handler, None)

    async def drain(self, grace: float) -> None:
        """Wait up to ``grace`` seconds for requests in flight, then end the rest."""
        pending = {task for task in (*self.tasks, *self.streams) if not task.done()}
        if not pending:
            return
        requests = pending - set(self.waiting.values())
        count = len(requests)
        log.info("waiting up to %ss for %d request%s in flight", grace, count, "s"[count == 1 :])
        _, pending = await asyncio.wait(pending, timeout=grace)
        if not pending:
            return
        requests = pending - set(self.waiting.values())  # a handler and its work are one
        log.warning("shutdown grace period over: ending %d requests", len(requests))
        for upstream in list(self.streams.values()):
            upstream.content.set_exception(GatewayStopping("the gateway is shutting down"))
        # The streams end with an error event and a proper end of the body. A handler
        # waiting on a stream that runs in a task of its own ("finish") then returns on
        # its own: cancelled now, it would drop the connection before that end.  Every
        # other request is cancelled now, not after the streams have ended.
        relaying = self.streams.keys() | {
            handler for handler, work in self.waiting.items() if work in self.streams
        }
        for task in pending - relaying:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=_END_WAIT)
        for task in pending:
            task.cancel()
