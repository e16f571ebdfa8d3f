"""``server.cors_origins``: browser preflights answered by the gateway, answers readable by
the pages of the listed origins, and nothing of it when CORS is off."""

from __future__ import annotations

import json
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from helpers import GatewayFactory, answer_events
from jwt_keys import SECRET, bearer, token
from scripted_upstream import Script, scripted_upstream

from chatmem.config import ConfigError, load_config

APP = "https://app.example.com"
CHAT = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
PREFLIGHT = {
    "Origin": APP,
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization, content-type, x-conversation-id",
}
# What an upstream with its own CORS policy (vLLM --allowed-origins, Ollama) sends.
UPSTREAM_CORS = {"Access-Control-Allow-Origin": "*", "Access-Control-Allow-Credentials": "true"}


def models_script() -> Script:
    return Script(
        headers={"Content-Type": "application/json", **UPSTREAM_CORS},
        chunks=[b'{"object": "list", "data": []}'],
        framing="length",
    )


def cors_headers(headers: Any) -> dict[str, list[str]]:
    """Every Access-Control-* and Vary header, each with all its values."""
    wanted = [name for name in headers if name.lower().startswith("access-control-")]
    return {
        name: headers.getall(name) for name in sorted({*wanted, *(["Vary"] * ("Vary" in headers))})
    }


async def preflight(client: TestClient[Any, Any], path: str, origin: str = APP) -> Any:
    resp = await client.options(path, headers={**PREFLIGHT, "Origin": origin})
    await resp.read()
    return resp


async def test_preflights_are_answered_by_the_gateway_without_a_token(
    gateway_factory: GatewayFactory,
) -> None:
    """Auth is on and no token is sent (browsers send none with a preflight); every kind
    of route gets the same answer, and nothing reaches the upstream."""
    async with scripted_upstream(models_script()) as up:
        client = await gateway_factory(
            up.url, server={"cors_origins": [APP]}, auth={"jwt_secret": SECRET}
        )
        paths = [
            "/v1/chat/completions",
            "/v1/models",
            "/v1/conversations",
            "/conversation/m",
            "/api/v1/health",
        ]
        for path in paths:
            resp = await preflight(client, path)
            assert resp.status == 204, path
            assert cors_headers(resp.headers) == {
                "Access-Control-Allow-Headers": [PREFLIGHT["Access-Control-Request-Headers"]],
                "Access-Control-Allow-Methods": ["POST"],
                "Access-Control-Allow-Origin": [APP],
                "Access-Control-Max-Age": ["600"],
                "Vary": ["Origin, Access-Control-Request-Method, Access-Control-Request-Headers"],
            }, path
        assert up.requests == []


async def test_an_origin_not_listed_gets_a_403_preflight_and_no_cors_headers(
    gateway_factory: GatewayFactory,
) -> None:
    async with scripted_upstream(models_script()) as up:
        client = await gateway_factory(up.url, server={"cors_origins": [APP]})
        resp = await client.options(
            "/v1/models", headers={**PREFLIGHT, "Origin": "https://evil.example"}
        )
        assert resp.status == 403
        assert (await resp.json())["error"]["type"] == "invalid_request_error"
        assert cors_headers(resp.headers) == {"Vary": ["Origin"]}
        # A request that is not a preflight is still served (CORS is not access control),
        # with no header that would let that page read it: not even the upstream's own.
        # Nor without an Origin, where a cache could keep the answer for any page.
        for origin in ({"Origin": "https://evil.example"}, {}):
            resp = await client.get("/v1/models", headers=origin)
            assert resp.status == 200
            assert cors_headers(resp.headers) == {"Vary": ["Origin"]}
        assert len(up.requests) == 2


async def test_answers_to_a_listed_origin_carry_the_gateways_policy(
    gateway_factory: GatewayFactory,
) -> None:
    exposed = ["X-Conversation-Id, X-Request-Id, X-Upstream-Request-Id"]
    async with scripted_upstream(models_script()) as up:
        client = await gateway_factory(
            up.url, server={"cors_origins": ["*"]}, auth={"jwt_secret": SECRET}
        )
        auth = bearer(token({"team_id": "t", "sub": "u"}))
        # The passthrough: the upstream's "*" and its credentials flag are replaced.
        resp = await client.get("/v1/models", headers={"Origin": APP, **auth})
        assert resp.status == 200
        assert cors_headers(resp.headers) == {
            "Access-Control-Allow-Origin": [APP],
            "Access-Control-Expose-Headers": exposed,
            "Vary": ["Origin"],
        }
        # An error of chatmem's own is readable too (the page can show why).
        resp = await client.get("/v1/models", headers={"Origin": APP})
        assert resp.status == 401
        assert resp.headers["Access-Control-Allow-Origin"] == APP
        # A streamed turn with memory, and the conversation's id the page reads back.
        up.script = Script(chunks=answer_events("Hello"))
        headers = {"Origin": "http://localhost:5173", "X-Conversation-Id": "web-1", **auth}
        resp = await client.post("/v1/chat/completions", json=CHAT, headers=headers)
        assert resp.status == 200
        assert await resp.read() == b"".join(answer_events("Hello"))
        assert cors_headers(resp.headers) == {
            "Access-Control-Allow-Origin": ["http://localhost:5173"],
            "Access-Control-Expose-Headers": exposed,
            "Vary": ["Origin"],
        }
        assert resp.headers["X-Conversation-Id"] == "web-1"
        sent = json.loads(up.requests[-1][3])
        assert sent["messages"] == CHAT["messages"]


async def test_with_cors_off_nothing_changes(gateway_factory: GatewayFactory) -> None:
    """The default: the upstream's own headers are relayed as they are, a preflight to a
    path the upstream serves goes upstream, and chatmem's own routes add nothing."""
    async with scripted_upstream(models_script()) as up:
        client = await gateway_factory(up.url)
        resp = await client.get("/v1/models", headers={"Origin": APP})
        assert cors_headers(resp.headers) == {
            name: [value] for name, value in sorted(UPSTREAM_CORS.items())
        }
        for path in ("/v1/models", "/v1/chat/completions"):  # the upstream's policy answers
            resp = await preflight(client, path)
            assert resp.status == 200 and up.requests[-1][:2] == ("OPTIONS", path)
        resp = await preflight(client, "/v1/conversations")
        assert resp.status == 405 and cors_headers(resp.headers) == {}


async def test_an_origin_is_matched_as_browsers_write_it(gateway_factory: GatewayFactory) -> None:
    async with scripted_upstream(models_script()) as up:
        config = {"cors_origins": ["HTTPS://App.Example.COM:443/"]}
        client = await gateway_factory(up.url, server=config)
        assert (await preflight(client, "/v1/models", APP)).status == 204
        assert (await preflight(client, "/v1/models", APP + ":8443")).status == 403


@pytest.mark.parametrize(
    "origin",
    [
        "app.example.com",
        "https://app.example.com/path",
        "*.example.com",
        "https://*.example.com",
        "https://user@app.example.com",
        "https://app.example.com:99999",
    ],
)
def test_an_origin_that_is_not_one_is_refused_at_start_up(origin: str) -> None:
    with pytest.raises(ConfigError, match=r"server.cors_origins: .* is not an origin"):
        load_config(None, overrides={"server": {"cors_origins": [origin]}}, env={})
