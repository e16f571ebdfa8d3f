"""/metrics counters against the requests made, and request ids end to end."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import jwt
from aiohttp.test_utils import TestClient, TestServer
from helpers import GatewayFactory, received, upstream_url
from multidict import CIMultiDict
from scripted_upstream import Script, scripted_upstream
from test_workers import sample


async def _scrape(gateway: TestClient[Any, Any]) -> str:
    response = await gateway.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    return await response.text()


def _chat(content: str, stream: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": content}]}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    return body


async def test_metrics_match_the_requests_made(
    gateway: TestClient[Any, Any], upstream: TestServer, db_path: Path
) -> None:
    for i in range(2):
        response = await gateway.post("/v1/chat/completions", json=_chat(f"plain {i}"))
        assert response.status == 200
        await response.read()
    response = await gateway.post("/v1/chat/completions", json=_chat("streamed", stream=True))
    assert (await response.read()).endswith(b"data: [DONE]\n\n")
    for _ in range(3):
        assert (await gateway.get("/v1/health")).status == 200
    assert (await gateway.get("/v1/models")).status == 200
    bad = await gateway.post("/v1/chat/completions", data=b"{not json")
    assert bad.status == 400

    scrape = await _scrape(gateway)

    def requests(route: str, status: str) -> float:
        return sample(scrape, "chatmem_requests_total", {"route": route, "status": status})

    assert requests("chat", "200") == 3
    assert requests("chat", "400") == 1
    assert requests("health", "200") == 3
    assert requests("passthrough", "200") == 1
    assert sample(scrape, "chatmem_turns_committed_total") == 3
    assert sample(scrape, "chatmem_commits_failed_total") == 0
    assert sample(scrape, "chatmem_streams_in_flight") == 0
    assert sample(scrape, "chatmem_time_to_first_token_seconds_count") == 1
    latency = "chatmem_upstream_latency_seconds_count"
    assert sample(scrape, latency, {"route": "chat"}) == 3
    assert sample(scrape, latency, {"route": "passthrough"}) == 1
    # Token counters add up the usage stored with the three answers.
    with sqlite3.connect(db_path) as conn:
        usages = [json.loads(u) for (u,) in conn.execute("SELECT usage FROM messages") if u]
    assert len(usages) == 3
    for field, kind in (("prompt_tokens", "prompt"), ("completion_tokens", "completion")):
        expected = sum(u[field] for u in usages)
        assert expected > 0
        labels = {"tenant": "default", "kind": kind}
        assert sample(scrape, "chatmem_upstream_tokens_total", labels) == expected
    assert len(received(upstream)) == 4  # three chats and /v1/models


async def test_failed_commits_are_counted(
    gateway: TestClient[Any, Any], db_path: Path, upstream: TestServer
) -> None:
    assert (await gateway.post("/v1/chat/completions", json=_chat("first"))).status == 200
    with sqlite3.connect(db_path) as conn:  # the store breaks under the running gateway
        conn.execute("DROP TABLE messages")
    failed = await gateway.post("/v1/chat/completions", json=_chat("second"))
    assert failed.status == 503
    scrape = await _scrape(gateway)
    assert sample(scrape, "chatmem_turns_committed_total") == 1
    assert sample(scrape, "chatmem_commits_failed_total") == 1
    assert sample(scrape, "chatmem_requests_total", {"route": "chat", "status": "503"}) == 1


async def test_request_id_is_accepted_sent_upstream_and_returned(
    gateway: TestClient[Any, Any], upstream: TestServer
) -> None:
    given = await gateway.post(
        "/v1/chat/completions", json=_chat("a"), headers={"X-Request-Id": "req-42.a:b"}
    )
    assert given.headers["X-Request-Id"] == "req-42.a:b"
    streamed = await gateway.post(
        "/v1/chat/completions", json=_chat("b", stream=True), headers={"X-Request-Id": "s-1"}
    )
    await streamed.read()
    assert streamed.headers["X-Request-Id"] == "s-1"
    invalid = await gateway.get("/v1/models", headers={"X-Request-Id": "bad id\twith spaces"})
    generated = invalid.headers["X-Request-Id"]
    assert len(generated) == 32 and int(generated, 16) >= 0
    none = await gateway.post("/v1/chat/completions", json=_chat("c"))
    other = none.headers["X-Request-Id"]
    assert len(other) == 32 and other != generated
    too_long = await gateway.get("/v1/health", headers={"X-Request-Id": "x" * 129})
    assert too_long.headers["X-Request-Id"] != "x" * 129
    sent = [CIMultiDict(r.headers).get("X-Request-Id") for r in received(upstream)]
    assert sent == ["req-42.a:b", "s-1", generated, other]


async def test_errors_and_unknown_paths_carry_a_request_id(
    gateway_factory: GatewayFactory, upstream: TestServer
) -> None:
    gateway = await gateway_factory(upstream_url(upstream), auth={"jwt_secret": "s"})
    unauthorized = await gateway.get("/v1/models", headers={"X-Request-Id": "e-1"})
    assert unauthorized.status == 401 and unauthorized.headers["X-Request-Id"] == "e-1"
    missing = await gateway.get("/nowhere", headers={"X-Request-Id": "e-2"})
    assert missing.status == 404 and missing.headers["X-Request-Id"] == "e-2"
    assert received(upstream) == []


async def test_metrics_path_is_configurable_and_can_be_off(
    gateway_factory: GatewayFactory, upstream: TestServer
) -> None:
    moved = await gateway_factory(upstream_url(upstream), metrics={"path": "/internal/m"})
    assert (await moved.get("/internal/m")).status == 200
    assert (await moved.get("/metrics")).status == 404
    off = await gateway_factory(upstream_url(upstream), metrics={"path": ""})
    assert (await off.get("/metrics")).status == 404


async def test_with_auth_on_metrics_need_a_token(
    gateway_factory: GatewayFactory, upstream: TestServer
) -> None:
    """Its labels name tenants: only health is open to anyone."""
    secret = "m" * 32
    client = await gateway_factory(upstream_url(upstream), auth={"jwt_secret": secret})
    refused = await client.get("/metrics")
    assert refused.status == 401
    assert (await refused.json())["error"]["type"] == "authentication_error"
    scraper = {"Authorization": "Bearer " + jwt.encode({"team_id": "ops"}, secret)}
    scraped = await client.get("/metrics", headers=scraper)
    assert scraped.status == 200 and "chatmem_requests_total" in await scraped.text()
    assert (await client.get("/v1/health")).status == 200


async def test_metrics_tenant_keeps_the_metrics_from_the_other_tenants(
    gateway_factory: GatewayFactory, upstream: TestServer
) -> None:
    """Any tenant's token read which tenants there are and what each used."""
    secret = "m" * 32
    client = await gateway_factory(
        upstream_url(upstream), auth={"jwt_secret": secret}, metrics={"tenant": "ops"}
    )

    def token(tenant: str) -> dict[str, str]:
        return {"Authorization": "Bearer " + jwt.encode({"team_id": tenant}, secret)}

    refused = await client.get("/metrics", headers=token("acme"))
    assert refused.status == 403
    assert (await refused.json())["error"]["code"] == "not_allowed"
    assert (await client.get("/metrics", headers=token("ops"))).status == 200


async def test_the_upstream_s_own_request_id_is_kept_under_another_name(
    gateway_factory: GatewayFactory,
) -> None:
    script = Script(
        headers={"Content-Type": "application/json", "X-Request-Id": "upstream-77"},
        chunks=[b'{"object": "list", "data": []}'],
        framing="length",
    )
    async with scripted_upstream(script) as upstream:
        gateway = await gateway_factory(upstream.url)
        response = await gateway.get("/v1/models", headers={"X-Request-Id": "mine-1"})
        assert await response.read() == b'{"object": "list", "data": []}'
    assert response.headers.getall("X-Request-Id") == ["mine-1"]
    assert response.headers["X-Upstream-Request-Id"] == "upstream-77"
    assert CIMultiDict(upstream.requests[0][2])["X-Request-Id"] == "mine-1"
