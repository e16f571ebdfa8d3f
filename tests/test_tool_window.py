"""Tool exchanges at the edge of the history window.

A request that starts with tool results answers the assistant's newest tool call: the
history sent with it must hold that call whatever the limits leave out, or every server
that checks pairing (OpenAI, vLLM) refuses the turn, and every retry is cut the same way.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from helpers import GatewayFactory, received, strict_loads, upstream_url

from chatmem.config import StorageConfig
from chatmem.errors import InvalidRequest
from chatmem.storage import Owner, Store, create_engine

Client = TestClient[Any, Any]
OWNER = Owner("default")


def call(*ids: str, arguments: str = "{}") -> dict[str, Any]:
    calls = [
        {"id": i, "type": "function", "function": {"name": "f", "arguments": arguments}}
        for i in ids
    ]
    return {"role": "assistant", "content": None, "tool_calls": calls}


def result(call_id: str, content: str = "r") -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "content": content}


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": text}


# Stored: a finished turn, then a question whose answer called two tools, one answered.
STORED = [user("q1"), assistant("a1"), user("q2"), call("c2", "c3"), result("c2")]


@pytest.fixture(params=["sqlite-fast", "sqlite-sqlalchemy", "postgresql"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, bool]:
    """The three ways a history is read: SQLite's own connection, SQLAlchemy, asyncpg."""
    if request.param == "postgresql":
        return request.getfixturevalue("pg_url"), True
    return f"sqlite+aiosqlite:///{tmp_path / 'chatmem.db'}", request.param == "sqlite-fast"


@pytest.fixture
async def store(where: tuple[str, bool]) -> AsyncIterator[Store]:
    url, direct = where
    made = Store(create_engine(StorageConfig(url=url)), direct=direct)
    await made.create_schema()
    await made.commit_turn(OWNER, "c", system=None, turn=STORED)
    yield made
    await made.close()


async def history(store: Store, limit: int, **options: Any) -> list[dict[str, Any]]:
    return (await store.load_history(OWNER, "c", limit, **options)).messages


async def test_the_call_a_request_answers_is_kept_past_the_limits(store: Store) -> None:
    # Without tool results in the request, the cut window loses its orphaned result...
    assert await history(store, 1) == []
    # ...with them, it reaches back to the call they answer, past max_history_messages.
    assert await history(store, 1, answering=True) == STORED[3:]
    assert await history(store, 2, answering=True) == STORED[3:]
    assert await history(store, 3, answering=True) == STORED[2:]
    # The byte budget reaches back too while the call fits in it.
    assert await history(store, 1, max_bytes=10_000, answering=True) == STORED[3:]
    # A window that holds the call already is read as before (once, from the cache).
    assert await history(store, 200, answering=True) == STORED
    assert await history(store, 200, answering=True) == STORED


async def test_start_at_user_keeps_the_call_and_nothing_before_a_user(store: Store) -> None:
    at_user = {"start_at_user": True}
    # A cut window with no user message: nothing (the alternation such templates want)...
    assert await history(store, 2, **at_user) == []
    # ...unless the request answers the call in it.
    assert await history(store, 2, **at_user, answering=True) == STORED[3:]
    assert await history(store, 1, **at_user, answering=True) == STORED[3:]
    # With a user message before the call, from that user message.
    assert await history(store, 4, **at_user, answering=True) == STORED[2:]


async def test_a_call_over_the_byte_budget_is_a_clear_error(store: Store) -> None:
    with pytest.raises(InvalidRequest) as refused:
        await history(store, 1, max_bytes=60, answering=True)
    assert refused.value.code == "context_length_exceeded"
    assert refused.value.param == "messages"
    assert "memory.max_history_bytes (60)" in refused.value.message


def chat_bodies(upstream: TestServer) -> list[Any]:
    return [strict_loads(r.body) for r in received(upstream) if r.path == "/v1/chat/completions"]


async def chat(client: Client, messages: list[dict[str, Any]]) -> Any:
    return await client.post(
        "/v1/chat/completions",
        json={"model": "m", "messages": messages},
        headers={"X-Conversation-Id": "t"},
    )


async def test_tool_results_go_upstream_with_their_call(
    gateway_factory: GatewayFactory, upstream: TestServer
) -> None:
    """The chat route, end to end: with max_history_messages = 1, the stored call and its
    first result go upstream before the client's second result."""
    client = await gateway_factory(upstream_url(upstream), memory={"max_history_messages": 1})
    created = await client.post(
        "/v1/conversations", json={"items": [user("q"), call("c2", "c3"), result("c2")]}
    )
    conversation = (await created.json())["id"]
    resp = await client.post(
        "/v1/chat/completions",
        json={"model": "m", "messages": [result("c3")]},
        headers={"X-Conversation-Id": conversation},
    )
    assert resp.status == 200, await resp.text()
    assert chat_bodies(upstream)[-1]["messages"] == [call("c2", "c3"), result("c2"), result("c3")]


async def test_a_call_over_the_byte_budget_is_a_400_and_nothing_is_stored(
    gateway_factory: GatewayFactory, upstream: TestServer
) -> None:
    memory = {"max_history_bytes": 400}
    client = await gateway_factory(upstream_url(upstream), memory=memory)
    big = call("cX", arguments='{"a": "' + "z" * 600 + '"}')
    created = await client.post("/v1/conversations", json={"items": [user("q"), big]})
    conversation = (await created.json())["id"]
    before = len(chat_bodies(upstream))
    resp = await client.post(
        "/v1/chat/completions",
        json={"model": "m", "messages": [result("cX")]},
        headers={"X-Conversation-Id": conversation},
    )
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "invalid_request_error",
        "context_length_exceeded",
        "messages",
    )
    assert len(chat_bodies(upstream)) == before  # the model was not asked
    items = await client.get(f"/v1/conversations/{conversation}/items")
    assert [item["role"] for item in (await items.json())["data"]] == ["assistant", "user"]
