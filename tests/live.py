"""A real gateway on 127.0.0.1 driven from synchronous code, for hypothesis tests.

Hypothesis calls its test function once per example, synchronously, so the servers live
on a private event loop (an ``asyncio.Runner``) that each example re-enters with ``run``.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from aiohttp.test_utils import TestClient, TestServer
from helpers import make_config
from scripted_upstream import ScriptedUpstream

from chatmem import create_app
from chatmem.mock_upstream import RECEIVED, ReceivedRequest, create_mock_app

T = TypeVar("T")


class LiveGateway:
    """A gateway in front of the real mock model, and one in front of a scripted upstream,
    on one SQLite file."""

    def __init__(self, db: Path, **sections: dict[str, Any]) -> None:
        self.db = db
        self._sections = sections
        self._runner = asyncio.Runner()
        self.scripted = ScriptedUpstream()
        self._servers: list[TestServer] = []
        self.mocked: TestClient[Any, Any]
        self.direct: TestClient[Any, Any]
        """The gateway in front of the scripted upstream."""

    def __enter__(self) -> LiveGateway:
        self.run(self._start())
        return self

    def __exit__(self, *_exc: object) -> None:
        try:
            self.run(self._stop())
        finally:
            self._runner.close()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._runner.run(coro)

    async def _client(self, upstream_url: str) -> TestClient[Any, Any]:
        config = make_config(self.db, upstream_url, **self._sections)
        client: TestClient[Any, Any] = TestClient(TestServer(create_app(config)))
        await client.start_server()
        return client

    async def _start(self) -> None:
        mock = TestServer(create_mock_app(tokens=4))
        await mock.start_server()
        self._servers.append(mock)
        await self.scripted.start()
        self.mocked = await self._client(str(mock.make_url("/v1")))
        self.direct = await self._client(self.scripted.url)

    async def _stop(self) -> None:
        await self.mocked.close()
        await self.direct.close()
        await self.scripted.close()
        for server in self._servers:
            await server.close()

    def received(self) -> list[ReceivedRequest]:
        """What the mock model received, oldest first."""
        return list(self._servers[0].app[RECEIVED])

    def message_count(self) -> int:
        with sqlite3.connect(self.db) as conn:
            count: int = conn.execute("SELECT count(*) FROM messages").fetchone()[0]
        return count

    def stored(self, conversation_id: str, tenant: str | None = None) -> list[dict[str, Any]]:
        query = (
            "SELECT m.* FROM messages m JOIN conversations c ON c.pk = m.conversation_pk"
            " WHERE c.id = ?"
        )
        params: tuple[str, ...] = (conversation_id,)
        if tenant is not None:
            query += " AND c.tenant = ?"
            params += (tenant,)
        with sqlite3.connect(self.db) as conn:
            conn.row_factory = sqlite3.Row
            return [dict(row) for row in conn.execute(query + " ORDER BY m.seq", params)]

    def owner_of(self, conversation_id: str) -> list[tuple[str, str]]:
        """The (tenant, user) of every conversation with this id."""
        with sqlite3.connect(self.db) as conn:
            rows = conn.execute(
                "SELECT tenant, user_id FROM conversations WHERE id = ?", (conversation_id,)
            )
            return [(tenant, user) for tenant, user in rows]
