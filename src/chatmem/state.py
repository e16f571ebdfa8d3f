"""What a running chatmem holds, stored on the aiohttp app under one typed key."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from aiohttp import web

from .config import Config
from .metrics import Metrics
from .proxy.upstream import Upstream
from .shutdown import LiveRequests
from .storage import Store, create_engine
from .storage.retention import prune_periodically

__all__ = ["GATEWAY", "Gateway", "gateway_of"]

T = TypeVar("T")

PRUNE_TASK = "chatmem.retention"
CLIENT_WATCH_TASK = "chatmem.client_watch"


class Gateway:
    """The configuration and the resources built from it.

    It is stored on the app before the app starts; :meth:`start` and :meth:`stop` run in
    the app's ``cleanup_ctx`` because the database engine and the client session live
    exactly as long as the running app.
    """

    store: Store
    upstream: Upstream
    loop: asyncio.AbstractEventLoop
    """The event loop the app runs on, set by :meth:`start`: passed by name, it costs no
    ``getpid`` system call, which ``asyncio.get_running_loop`` and ``current_task()``
    make on Python 3.11 each time (3.07 a plain turn before, 2.04 since)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.background: set[asyncio.Task[Any]] = set()
        """Work that outlives its request (an answer finished after the client left)."""
        self.metrics = Metrics()
        self.live = LiveRequests(self.metrics)
        """Requests and streams in flight, drained on shutdown."""
        self.websockets: set[asyncio.Future[tuple[int, str]]] = set()
        """One future a relayed WebSocket open: set, it ends the socket with that close."""
        self.host_paths: tuple[web.AbstractResource, ...] | None = None
        """The host app's routes under chatmem's ``/v1/`` (see ``passthrough``), found at
        the first passthrough request: the router of a started app does not change."""

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        storage = self.config.storage
        self.store = Store(
            create_engine(storage),
            busy_timeout_ms=storage.busy_timeout_ms,
            resend_reasoning=self.config.memory.resend_reasoning,
            window_messages=self.config.memory.max_history_messages,
        )
        try:
            await self.store.check_schema()
        except BaseException:
            await self.store.close()
            raise
        self.upstream = Upstream(self.config.upstream, Upstream.create_session())
        self.detach(self.live.watch_clients(), CLIENT_WATCH_TASK)
        if self.config.memory.retention_days:
            days = self.config.memory.retention_days
            self.detach(prune_periodically(self.store, days * 86400.0), PRUNE_TASK)

    async def stop(self) -> None:
        for task in self.background:
            if task.get_name() in (PRUNE_TASK, CLIENT_WATCH_TASK):
                task.cancel()
        if self.background:
            await asyncio.wait(self.background, timeout=self.config.server.shutdown_grace)
        await self.upstream.close()
        await self.store.close()

    def detach(self, coro: Coroutine[Any, Any, T], name: str | None = None) -> asyncio.Task[T]:
        task = self.loop.create_task(coro, name=name)
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return task


GATEWAY = web.AppKey("chatmem.gateway", Gateway)


_CACHED = web.RequestKey("chatmem.gateway", Gateway)


def gateway_of(request: web.Request) -> Gateway:
    """The request's gateway, looked up once per request.

    ``request.config_dict`` builds a new chain of the app and its parents on every access
    (chatmem may be mounted in a sub-app), and a turn asks for the gateway several times.
    """
    try:
        return request[_CACHED]  # put there by chatmem's middleware
    except KeyError:
        gateway = request[_CACHED] = request.config_dict[GATEWAY]
        return gateway


def remember_gateway(request: web.Request, gateway: Gateway) -> None:
    """Spare :func:`gateway_of` its lookup for ``request``."""
    request[_CACHED] = gateway
