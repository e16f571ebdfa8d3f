"""Helpers shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from chatmem.config import Config, load_config
from chatmem.mock_upstream import RECEIVED, ReceivedRequest

GatewayFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


def upstream_url(server: TestServer) -> str:
    return str(server.make_url("/v1"))


def received(server: TestServer) -> list[ReceivedRequest]:
    """What the mock upstream received, oldest first."""
    return list(server.app[RECEIVED])


def make_config(db_path: Path, upstream: str, **sections: dict[str, Any]) -> Config:
    overrides: dict[str, dict[str, Any]] = {
        "upstream": {"url": upstream},
        "storage": {"url": f"sqlite+aiosqlite:///{db_path}"},
    }
    for name, values in sections.items():
        overrides[name] = {**overrides.get(name, {}), **values}
    return load_config(None, overrides=overrides, env={})


@dataclasses.dataclass
class Rows:
    path: Path

    def messages(self, conversation_id: str | None = None) -> list[dict[str, Any]]:
        query = (
            "SELECT c.id AS conversation, c.tenant, c.user_id, m.* FROM messages m "
            "JOIN conversations c ON c.pk = m.conversation_pk"
        )
        params: tuple[str, ...] = ()
        if conversation_id is not None:
            query += " WHERE c.id = ?"
            params = (conversation_id,)
        return self._all(query + " ORDER BY c.pk, m.seq", params)

    def conversations(self) -> list[dict[str, Any]]:
        return self._all("SELECT * FROM conversations ORDER BY pk", ())

    def _all(self, query: str, params: tuple[str, ...]) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with sqlite3.connect(self.path) as conn:
            conn.row_factory = sqlite3.Row
            return [dict(row) for row in conn.execute(query, params)]
