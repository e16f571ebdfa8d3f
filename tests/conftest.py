"""Shared fixtures: the real mock upstream, a real gateway on a real SQLite file."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from helpers import GatewayFactory, Rows, make_config, open_store, upstream_url

from chatmem import create_app
from chatmem.errors import failures
from chatmem.mock_upstream import create_mock_app
from chatmem.storage import Store

# PostgreSQL fixtures (pg_url, private_postgres, storage_url) live in tests/pg.py.
pytest_plugins = ["pg"]


@pytest.fixture(autouse=True)
def quiet_failure_log() -> None:
    """Each test starts with no failure reported yet (the log reports one per code and
    interval, process-wide)."""
    failures.reset()


@pytest.fixture
async def upstream(aiohttp_server: Any) -> TestServer:
    """The real mock model server (``chatmem mock-upstream``) on 127.0.0.1."""
    server: TestServer = await aiohttp_server(create_mock_app(tokens=6))
    return server


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "chatmem.db"


@pytest.fixture
async def sqlite_store(db_path: Path) -> AsyncIterator[Store]:
    """A Store on a fresh SQLite file, with its schema."""
    store = await open_store(db_path)
    yield store
    await store.close()


@pytest.fixture
def gateway_factory(aiohttp_client: Any, db_path: Path) -> GatewayFactory:
    """``await gateway_factory(upstream_url, memory={...})`` -> a client of a real gateway."""

    async def make(url: str, /, **sections: dict[str, Any]) -> TestClient[Any, Any]:
        config = make_config(db_path, url, **sections)
        client: TestClient[Any, Any] = await aiohttp_client(create_app(config))
        return client

    return make


@pytest.fixture
async def gateway(gateway_factory: GatewayFactory, upstream: TestServer) -> TestClient[Any, Any]:
    return await gateway_factory(upstream_url(upstream))


@pytest.fixture
def rows(db_path: Path) -> Iterator[Rows]:
    yield Rows(db_path)
