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

__all__ = ["GATEWAY", "Gateway"]

T = TypeVar("T")


class Gateway:
    """The configuration and the resources built from it.

    It is stored on the app before the app starts; :meth:`start` and :meth:`stop` run in
    the app's ``cleanup_ctx`` because the database engine and the client session live
    exactly as long as the running app.
    """

    store: Store
    upstream: Upstream

    def __init__(self, config: Config) -> None:
        self.config = config
        self.background: set[asyncio.Task[Any]] = set()
        """Work that outlives its request (an answer finished after the client left)."""
        self.metrics = Metrics()
        self.live = LiveRequests(self.metrics)
        """Requests and streams in flight, drained on shutdown."""

    async def start(self) -> None:
        storage = self.config.storage
        self.store = Store(create_engine(storage), busy_timeout_ms=storage.busy_timeout_ms)
        await self.store.create_schema()
        self.upstream = Upstream(self.config.upstream, Upstream.create_session())

    async def stop(self) -> None:
        if self.background:
            await asyncio.wait(self.background, timeout=self.config.server.shutdown_grace)
        await self.upstream.session.close()
        await self.store.close()

    def detach(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.get_running_loop().create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return task


GATEWAY = web.AppKey("chatmem.gateway", Gateway)
