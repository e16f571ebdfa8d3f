"""Keys from a JWKS URL, served by a real local aiohttp server."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from helpers import GatewayFactory, upstream_url
from jwt_keys import bearer, private_key, public_jwk, token

from chatmem.config import ConfigError, load_config

CLAIMS = {"team_id": "acme", "sub": "alice"}


@dataclass
class KeyServer:
    """What the JWKS endpoint serves, and how often it was asked."""

    keys: list[dict[str, Any]] = field(default_factory=list)
    status: int = 200
    fetches: int = 0
    url: str = ""
    delay: float = 0.0
    """Seconds the endpoint takes to answer."""
    body: bytes | None = None
    """A document of its own, served instead of ``keys``."""


@pytest.fixture
async def key_server(aiohttp_server: Any) -> KeyServer:
    state = KeyServer(keys=[public_jwk("rsa", "k1", "RS256"), public_jwk("ec", "e1")])

    async def jwks(_request: web.Request) -> web.StreamResponse:
        state.fetches += 1
        await asyncio.sleep(state.delay)
        if state.status != 200:
            return web.Response(status=state.status, text="down")
        if state.body is not None:  # in two writes, as a large document comes
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            await response.prepare(_request)
            half = len(state.body) // 2
            await response.write(state.body[:half])
            await asyncio.sleep(0.05)
            await response.write(state.body[half:])
            await response.write_eof()
            return response
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


async def test_requests_during_a_fetch_wait_for_it(
    gateway_factory: GatewayFactory, upstream: TestServer, key_server: KeyServer
) -> None:
    """Item 151: the first token sets a fetch off; those that came while it ran were
    refused at once (the refetch interval had begun), 49 of 50 valid tokens a 401. They
    wait for that fetch now, and it is still the only one."""
    key_server.delay = 0.3
    client = await make(gateway_factory, upstream, key_server)  # the default interval
    es = bearer(token(CLAIMS, private_key("ec"), "ES256", headers={"kid": "e1"}))
    statuses = await asyncio.gather(*(status(client, rs("k1") if i % 2 else es) for i in range(20)))
    assert statuses == [200] * 20
    assert key_server.fetches == 1


async def test_a_document_larger_than_one_read_is_read_whole(
    gateway_factory: GatewayFactory, upstream: TestServer, key_server: KeyServer
) -> None:
    """Item 151: only what the first read brought was parsed (64 KiB here), and a
    document larger than that never loaded."""
    padding = [public_jwk("rsa", f"pad{i}", "RS256") for i in range(250)]
    key_server.body = json.dumps({"keys": [*padding, *key_server.keys]}).encode()
    assert len(key_server.body) > 100_000
    client = await make(gateway_factory, upstream, key_server)
    assert await status(client, rs("k1")) == 200


async def test_a_document_nested_too_deep_is_a_failed_fetch(
    gateway_factory: GatewayFactory,
    upstream: TestServer,
    key_server: KeyServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Item 151: the parser's RecursionError was no failed fetch: a 500 with a traceback
    for the request, again after every refetch interval."""
    key_server.body = b"[" * 200_000
    client = await make(gateway_factory, upstream, key_server)
    assert await status(client, rs("k1")) == 401
    assert not [r for r in caplog.records if r.exc_info is not None or r.levelno >= 40]
    [warning] = [r.getMessage() for r in caplog.records if r.name == "chatmem.auth"]
    assert warning.endswith("failed (RecursionError); keeping 0 cached keys")


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:99999/jwks.json", "http://[::1/jwks.json"], ids=["port", "ipv6"]
)
def test_a_url_that_cannot_be_fetched_is_a_config_error(url: str) -> None:
    """Item 151: it passed the config's check, and every request was a 500 whose log line
    quoted the URL whole."""
    with pytest.raises(ConfigError) as caught:
        load_config(None, overrides={"auth": {"jwks_url": url, "algorithms": ["RS256"]}}, env={})
    assert str(caught.value) == "auth.jwks_url: not a valid URL (its host or port)"
