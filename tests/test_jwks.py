"""Keys from a JWKS URL, served by a real local aiohttp server."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from helpers import GatewayFactory, upstream_url
from jwt_keys import bearer, private_key, public_jwk, token

CLAIMS = {"team_id": "acme", "sub": "alice"}


@dataclass
class KeyServer:
    """What the JWKS endpoint serves, and how often it was asked."""

    keys: list[dict[str, Any]] = field(default_factory=list)
    status: int = 200
    fetches: int = 0
    url: str = ""


@pytest.fixture
async def key_server(aiohttp_server: Any) -> KeyServer:
    state = KeyServer(keys=[public_jwk("rsa", "k1", "RS256"), public_jwk("ec", "e1")])

    async def jwks(_request: web.Request) -> web.Response:
        state.fetches += 1
        if state.status != 200:
            return web.Response(status=state.status, text="down")
        return web.json_response({"keys": state.keys})

    app = web.Application()
    app.router.add_get("/.well-known/jwks.json", jwks)
    server: TestServer = await aiohttp_server(app)
    state.url = str(server.make_url("/.well-known/jwks.json"))
    return state


async def make(
    gateway_factory: GatewayFactory, upstream: TestServer, keys: KeyServer, **auth: Any
) -> TestClient[Any, Any]:
    settings = {"jwks_url": keys.url, "algorithms": ["RS256", "ES256"], **auth}
    return await gateway_factory(upstream_url(upstream), auth=settings)


def rs(kid: str, kind: str = "rsa") -> dict[str, str]:
    return bearer(token(CLAIMS, private_key(kind), "RS256", headers={"kid": kid}))


async def status(client: TestClient[Any, Any], headers: dict[str, str]) -> int:
    response = await client.get("/v1/conversations", headers=headers)
    await response.read()
    return response.status


async def test_keys_are_fetched_once_and_cached(
    gateway_factory: GatewayFactory, upstream: TestServer, key_server: KeyServer
) -> None:
    client = await make(gateway_factory, upstream, key_server)
    assert key_server.fetches == 0  # nothing is fetched before a token needs it
    for _ in range(3):
        assert await status(client, rs("k1")) == 200
    es = bearer(token(CLAIMS, private_key("ec"), "ES256", headers={"kid": "e1"}))
    assert await status(client, es) == 200
    assert key_server.fetches == 1


async def test_unknown_kid_refetch_is_rate_limited(
    gateway_factory: GatewayFactory, upstream: TestServer, key_server: KeyServer
) -> None:
    client = await make(gateway_factory, upstream, key_server, jwks_refetch_interval=3600)
    assert await status(client, rs("k1")) == 200
    key_server.keys.append(public_jwk("rsa2", "k2", "RS256"))
    for _ in range(5):
        assert await status(client, rs("k2", "rsa2")) == 401
    assert key_server.fetches == 1


async def test_unknown_kid_triggers_a_refetch_after_rotation(
    gateway_factory: GatewayFactory, upstream: TestServer, key_server: KeyServer
) -> None:
    client = await make(gateway_factory, upstream, key_server, jwks_refetch_interval=0)
    assert await status(client, rs("k1")) == 200
    key_server.keys = [public_jwk("rsa2", "k2", "RS256")]
    assert await status(client, rs("k2", "rsa2")) == 200
    assert key_server.fetches == 2
    # A token signed with the right key but a kid the set does not have stays out.
    assert await status(client, rs("k1")) == 401


async def test_failed_refetch_keeps_the_old_keys(
    gateway_factory: GatewayFactory, upstream: TestServer, key_server: KeyServer
) -> None:
    client = await make(
        gateway_factory, upstream, key_server, jwks_refetch_interval=0, jwks_cache_seconds=0
    )
    assert await status(client, rs("k1")) == 200
    key_server.status = 500
    assert await status(client, rs("k1")) == 200
    assert await status(client, rs("unknown")) == 401
    assert key_server.fetches == 3  # stale cache: a refetch was tried each time
    key_server.status = 200
    key_server.keys = [{"kty": "nonsense"}]  # a broken document is a failed refetch too
    assert await status(client, rs("k1")) == 200


async def test_unreachable_jwks_is_a_401_not_a_500(
    gateway_factory: GatewayFactory, upstream: TestServer, key_server: KeyServer
) -> None:
    key_server.status = 503
    client = await make(gateway_factory, upstream, key_server)
    response = await client.get("/v1/conversations", headers=rs("k1"))
    assert response.status == 401
    assert (await response.json())["error"]["message"] == (
        "invalid token: signed with an unknown key"
    )


async def test_a_failed_fetch_is_logged_without_the_urls_credentials(
    gateway_factory: GatewayFactory,
    upstream: TestServer,
    key_server: KeyServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A key server's URL may carry its credentials (a password, a token in the query):
    the warning of a failed fetch named the URL whole."""
    key_server.status = 503
    plain = key_server.url
    key_server.url = plain.replace("://", "://reader:PASS-4c1e@", 1) + "?token=QUERY-8d2f"
    client = await make(gateway_factory, upstream, key_server)
    assert await status(client, rs("k1")) == 401
    assert key_server.fetches == 1
    [warning] = [r.getMessage() for r in caplog.records if r.name == "chatmem.auth"]
    assert warning == f"JWKS fetch from {plain} failed (HTTP status 503); keeping 0 cached keys"
    assert "PASS-4c1e" not in caplog.text and "QUERY-8d2f" not in caplog.text


async def test_key_alg_must_match_the_token(
    gateway_factory: GatewayFactory, upstream: TestServer, key_server: KeyServer
) -> None:
    """k1 is declared RS256: a PS256 token naming it is refused even with the right key."""
    client = await make(gateway_factory, upstream, key_server, algorithms=["RS256", "PS256"])
    ps = bearer(token(CLAIMS, private_key("rsa"), "PS256", headers={"kid": "k1"}))
    assert await status(client, ps) == 401
    assert await status(client, rs("k1")) == 200


async def test_hs256_token_cannot_pass_as_a_jwks_key(
    gateway_factory: GatewayFactory, upstream: TestServer, key_server: KeyServer
) -> None:
    client = await make(gateway_factory, upstream, key_server)
    forged = bearer(token(CLAIMS, "k" * 64, "HS256", headers={"kid": "k1"}))
    assert await status(client, forged) == 401


async def test_key_of_the_wrong_type_is_a_401(
    gateway_factory: GatewayFactory, upstream: TestServer, key_server: KeyServer
) -> None:
    """e1 is an EC key without a declared alg: an RS256 token naming it must not crash."""
    client = await make(gateway_factory, upstream, key_server)
    response = await client.get("/v1/conversations", headers=rs("e1"))
    assert response.status == 401
    assert (await response.json())["error"]["message"] == (
        "invalid token: its algorithm does not fit the key"
    )


async def test_concurrent_requests_share_one_fetch(
    gateway_factory: GatewayFactory, upstream: TestServer, key_server: KeyServer
) -> None:
    client = await make(gateway_factory, upstream, key_server, jwks_refetch_interval=0)
    statuses = await asyncio.gather(*(status(client, rs("k1")) for _ in range(10)))
    assert statuses == [200] * 10
    assert key_server.fetches == 1
