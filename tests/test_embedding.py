"""chatmem embedded in a host aiohttp app (examples/embedded_app.py): both keep working."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

from aiohttp.test_utils import TestServer
from helpers import make_config, received, upstream_url

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "embedded_app.py"


def _example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("embedded_app", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_host_routes_and_middleware_work_next_to_chatmem(
    aiohttp_client: Any, upstream: TestServer, db_path: Path
) -> None:
    app = _example().build_app(make_config(db_path, upstream_url(upstream)))
    client = await aiohttp_client(app)

    index = await client.get("/")
    assert await index.json() == {"app": "my-host-app", "chat": "/v1/chat/completions"}
    assert "X-Host-Time-Ms" in index.headers  # the host middleware ran

    # The host's own 404 stays aiohttp's plain text: chatmem does not rewrite host errors.
    missing = await client.get("/not-a-route")
    assert missing.status == 404
    assert missing.content_type == "text/plain"

    # Memory works inside the host app, and the host middleware sees chatmem's requests.
    for text in ("my name is Ada", "what is my name"):
        reply = await client.post(
            "/v1/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": text}]},
            headers={"X-Conversation-Id": "embedded-1"},
        )
        assert reply.status == 200
        assert "X-Host-Time-Ms" in reply.headers
        assert reply.headers["X-Conversation-Id"] == "embedded-1"
    second = received(upstream)[-1].json
    assert second is not None
    assert second["messages"][0]["content"] == "my name is Ada"
    assert len(second["messages"]) == 3

    # Streams through the host app, and chatmem's errors are OpenAI-style JSON.
    stream = await client.post(
        "/v1/chat/completions",
        json={"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]},
    )
    assert (await stream.read()).endswith(b"data: [DONE]\n\n")
    bad = await client.post("/v1/chat/completions", data=b"not json")
    assert bad.status == 400
    assert json.loads(await bad.read())["error"]["type"] == "invalid_request_error"
    assert (await client.get("/metrics")).status == 200


async def test_an_error_in_a_host_route_is_the_host_s_business(
    aiohttp_client: Any, upstream: TestServer, db_path: Path
) -> None:
    module = _example()
    app = module.build_app(make_config(db_path, upstream_url(upstream)))

    async def broken(_request: Any) -> Any:
        raise RuntimeError("host bug")

    app.router.add_get("/broken", broken)
    client = await aiohttp_client(app)
    response = await client.get("/broken")
    assert response.status == 500
    assert response.content_type == "text/plain"  # aiohttp's, not chatmem's JSON
