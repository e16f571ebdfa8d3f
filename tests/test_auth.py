"""JWT verification: every attack gets a token built for it and a 401, never a 500."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from helpers import GatewayFactory, Rows, received, upstream_url
from jwt_keys import (
    OTHER_SECRET,
    SECRET,
    b64,
    bearer,
    private_key,
    public_pem,
    raw_token,
    token,
)

from chatmem.config import ConfigError, load_config

SEED_CLAIMS = {"team_id": "tenstorrent", "token_id": "debug-test"}


@pytest.fixture
async def hs_gateway(gateway_factory: GatewayFactory, upstream: TestServer) -> TestClient[Any, Any]:
    return await gateway_factory(upstream_url(upstream), auth={"jwt_secret": SECRET})


async def assert_401(response: Any, fragment: str) -> None:
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    body = await response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "authentication_error"
    assert fragment in body["error"]["message"]
    assert SECRET not in body["error"]["message"]


async def whoami(client: TestClient[Any, Any], rows: Rows, headers: dict[str, str]) -> Any:
    """Create a conversation as the caller; the stored (tenant, user) of it."""
    created = await client.post("/v1/conversations", json={}, headers=headers)
    assert created.status == 200, await created.text()
    conversation_id = (await created.json())["id"]
    (row,) = [c for c in rows.conversations() if c["id"] == conversation_id]
    return row["tenant"], row["user_id"]


async def test_seed_token_without_exp_works(hs_gateway: TestClient[Any, Any], rows: Rows) -> None:
    assert await whoami(hs_gateway, rows, bearer(token(SEED_CLAIMS))) == ("tenstorrent", "")


async def test_tenant_and_user_come_from_the_claims(
    hs_gateway: TestClient[Any, Any], rows: Rows
) -> None:
    headers = bearer(token({"team_id": "acme", "sub": "alice"}))
    assert await whoami(hs_gateway, rows, headers) == ("acme", "alice")


async def test_claim_names_are_configurable(
    gateway_factory: GatewayFactory, upstream: TestServer, rows: Rows
) -> None:
    client = await gateway_factory(
        upstream_url(upstream),
        auth={"jwt_secret": SECRET, "tenant_claim": "org", "user_claim": "email"},
    )
    headers = bearer(token({"org": "o1", "email": "a@o1", "team_id": "ignored"}))
    assert await whoami(client, rows, headers) == ("o1", "a@o1")
    await assert_401(
        await client.get("/v1/conversations", headers=bearer(token(SEED_CLAIMS))), "'org'"
    )


def tampered() -> str:
    header, _, signature = token({"team_id": "acme"}).split(".")
    payload = b64(b'{"team_id": "victim"}')
    return f"{header}.{payload}.{signature}"


ATTACKS: dict[str, tuple[dict[str, str], str]] = {
    "no header": ({}, "missing bearer token"),
    "empty bearer": ({"Authorization": "Bearer "}, "missing bearer token"),
    "basic scheme": ({"Authorization": "Basic dXNlcjpwYXNz"}, "missing bearer token"),
    "not a jwt": (bearer("not.a.jwt"), "not a well-formed JWT"),
    "garbage": (bearer("%%%.&&&.\u00e9\u00e9"), "not a well-formed JWT"),
    "wrong secret": (bearer(token(SEED_CLAIMS, OTHER_SECRET)), "Signature verification failed"),
    "alg none": (bearer(raw_token({"alg": "none", "typ": "JWT"}, SEED_CLAIMS, None)), "algorithm"),
    "alg None": (bearer(raw_token({"alg": "None"}, SEED_CLAIMS, None)), "algorithm"),
    "alg missing": (bearer(raw_token({"typ": "JWT"}, SEED_CLAIMS, SECRET.encode())), "algorithm"),
    "HS384 not configured": (bearer(token(SEED_CLAIMS, alg="HS384")), "algorithm"),
    "expired": (
        bearer(token({**SEED_CLAIMS, "exp": int(time.time()) - 3600})),
        "invalid token: it has expired (its exp claim)",  # pyjwt: "Signature has expired"
    ),
    "not yet valid": (
        bearer(token({**SEED_CLAIMS, "nbf": int(time.time()) + 3600})),
        "not yet valid",
    ),
    "exp not a number": (bearer(token({**SEED_CLAIMS, "exp": "tomorrow"})), "exp"),
    "no tenant claim": (bearer(token({"token_id": "x", "sub": "u"})), "'team_id'"),
    "empty tenant": (bearer(token({"team_id": ""})), "'team_id'"),
    "numeric tenant": (bearer(token({"team_id": 42})), "'team_id'"),
    "list tenant": (bearer(token({"team_id": ["a", "b"]})), "'team_id'"),
    "object user": (bearer(token({"team_id": "a", "sub": {"id": 1}})), "must be a string"),
    "huge tenant": (bearer(token({"team_id": "t" * 300})), "claim 'team_id' is too long"),
    "huge user": (bearer(token({"team_id": "t", "sub": "u" * 300})), "claim 'sub' is too long"),
    "lone surrogate tenant": (bearer(token({"team_id": "a\ud800"})), "must be text"),
    "lone surrogate user": (bearer(token({"team_id": "a", "sub": "\udfff"})), "must be text"),
    "NUL in tenant": (bearer(token({"team_id": "a\x00b"})), "must be text"),
    "NUL in user": (bearer(token({"team_id": "a", "sub": "\x00"})), "must be text"),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
async def test_attacks_get_401(
    hs_gateway: TestClient[Any, Any], upstream: TestServer, rows: Rows, attack: str
) -> None:
    headers, fragment = ATTACKS[attack]
    for method, path in (("GET", "/v1/conversations"), ("POST", "/v1/chat/completions")):
        body = {"messages": [{"role": "user", "content": "hi"}]}
        response = await hs_gateway.request(method, path, headers=headers, json=body)
        await assert_401(response, fragment)
    assert rows.conversations() == []
    assert received(upstream) == []


@pytest.mark.parametrize(
    "value", [b"Bearer \xe9\xff", b"Bearer " + token(SEED_CLAIMS).encode()[:-2] + b"\xe9"]
)
async def test_an_authorization_header_that_is_not_ascii_is_a_401(
    hs_gateway: TestClient[Any, Any], rows: Rows, value: bytes
) -> None:
    """Sent as raw bytes (not UTF-8): aiohttp keeps them as surrogate escapes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", hs_gateway.server.port)
    try:
        writer.write(
            b"GET /v1/conversations HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Authorization: " + value + b"\r\n\r\n"
        )
        response = await reader.read()
    finally:
        writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401 ")
    error = json.loads(body)["error"]
    assert (error["type"], error["message"]) == (
        "authentication_error",
        "invalid token: not a well-formed JWT",
    )
    assert rows.conversations() == []


async def test_two_authorization_headers_are_a_401(
    hs_gateway: TestClient[Any, Any], upstream: TestServer, rows: Rows
) -> None:
    """Which of two would count is a guess, and a proxy on the way may guess the other:
    neither counts, even when both are valid."""
    from multidict import CIMultiDict

    good = bearer(token(SEED_CLAIMS))["Authorization"]
    other = bearer(token({"team_id": "someone-else"}))["Authorization"]
    for pair in ((good, other), (good, good), (good, "Basic x")):
        headers = CIMultiDict([("Authorization", pair[0]), ("Authorization", pair[1])])
        for method, path in (("GET", "/v1/conversations"), ("POST", "/v1/chat/completions")):
            body = {"messages": [{"role": "user", "content": "hi"}]}
            response = await hs_gateway.request(method, path, headers=headers, json=body)
            await assert_401(response, "more than one Authorization header")
    assert rows.conversations() == [] and received(upstream) == []


async def test_an_expiry_too_large_for_a_float_is_as_good_as_never(
    hs_gateway: TestClient[Any, Any], rows: Rows
) -> None:
    headers = bearer(token({"team_id": "acme", "exp": 10**400}))
    for _ in range(2):  # verified, then from the cache of verified tokens
        assert await whoami(hs_gateway, rows, headers) == ("acme", "")


async def test_tampered_payload(hs_gateway: TestClient[Any, Any]) -> None:
    response = await hs_gateway.get("/v1/conversations", headers=bearer(tampered()))
    await assert_401(response, "Signature verification failed")


async def test_leeway_accepts_a_just_expired_token(
    gateway_factory: GatewayFactory, upstream: TestServer
) -> None:
    client = await gateway_factory(
        upstream_url(upstream), auth={"jwt_secret": SECRET, "leeway": 600}
    )
    just_expired = token({**SEED_CLAIMS, "exp": int(time.time()) - 60})
    assert (await client.get("/v1/conversations", headers=bearer(just_expired))).status == 200
    long_expired = token({**SEED_CLAIMS, "exp": int(time.time()) - 3600})
    response = await client.get("/v1/conversations", headers=bearer(long_expired))
    await assert_401(response, "expired")


async def test_require_audience_and_issuer(
    gateway_factory: GatewayFactory, upstream: TestServer
) -> None:
    client = await gateway_factory(
        upstream_url(upstream),
        auth={
            "jwt_secret": SECRET,
            "audience": "chatmem",
            "issuer": "https://idp.example",
            "require": ["exp", "iss", "aud"],
        },
    )
    later = int(time.time()) + 600
    good = {**SEED_CLAIMS, "aud": "chatmem", "iss": "https://idp.example", "exp": later}
    assert (await client.get("/v1/conversations", headers=bearer(token(good)))).status == 200
    cases = {
        "wrong aud": ({**good, "aud": "other-service"}, "udience"),
        "wrong iss": ({**good, "iss": "https://evil.example"}, "issuer"),
        "no exp": ({k: v for k, v in good.items() if k != "exp"}, '"exp"'),
        "no aud": ({k: v for k, v in good.items() if k != "aud"}, '"aud"'),
    }
    for claims, fragment in cases.values():
        response = await client.get("/v1/conversations", headers=bearer(token(claims)))
        await assert_401(response, fragment)


async def test_audience_is_ignored_unless_configured(hs_gateway: TestClient[Any, Any]) -> None:
    headers = bearer(token({**SEED_CLAIMS, "aud": "anything"}))
    assert (await hs_gateway.get("/v1/conversations", headers=headers)).status == 200


@pytest.mark.parametrize(
    ("kind", "alg"), [("rsa", "RS256"), ("ec", "ES256"), ("ed", "EdDSA"), ("rsa", "PS256")]
)
async def test_public_key_algorithms(
    gateway_factory: GatewayFactory, upstream: TestServer, kind: str, alg: str
) -> None:
    client = await gateway_factory(
        upstream_url(upstream), auth={"public_key": public_pem(kind), "algorithms": [alg]}
    )
    good = token(SEED_CLAIMS, private_key(kind), alg)
    assert (await client.get("/v1/conversations", headers=bearer(good))).status == 200
    other = "rsa2" if kind == "rsa" else "rsa"
    forged = token(SEED_CLAIMS, private_key(other), "RS256" if other.startswith("rsa") else alg)
    await assert_401(await client.get("/v1/conversations", headers=bearer(forged)), "")
    await assert_401(
        await client.get("/v1/conversations", headers=bearer(token(SEED_CLAIMS))), "algorithm"
    )


async def test_public_key_from_a_file(
    gateway_factory: GatewayFactory, upstream: TestServer, tmp_path: Path
) -> None:
    path = tmp_path / "key.pem"
    path.write_text(public_pem("rsa"))
    client = await gateway_factory(
        upstream_url(upstream), auth={"public_key": str(path), "algorithms": ["RS256"]}
    )
    good = token(SEED_CLAIMS, private_key("rsa"), "RS256")
    assert (await client.get("/v1/conversations", headers=bearer(good))).status == 200


async def test_hs256_signed_with_the_public_key_is_refused(
    gateway_factory: GatewayFactory, upstream: TestServer
) -> None:
    """The classic key confusion: the RSA public key (which is public) as an HMAC secret."""
    pem = public_pem("rsa").encode()
    forged = raw_token({"alg": "HS256", "typ": "JWT"}, SEED_CLAIMS, pem)
    rs_only = await gateway_factory(
        upstream_url(upstream), auth={"public_key": public_pem("rsa"), "algorithms": ["RS256"]}
    )
    await assert_401(await rs_only.get("/v1/conversations", headers=bearer(forged)), "algorithm")
    both = await gateway_factory(
        upstream_url(upstream),
        auth={
            "public_key": public_pem("rsa"),
            "jwt_secret": SECRET,
            "algorithms": ["RS256", "HS256"],
        },
    )
    response = await both.get("/v1/conversations", headers=bearer(forged))
    await assert_401(response, "Signature verification failed")
    # ... while both kinds of real tokens pass on that gateway.
    for good in (token(SEED_CLAIMS), token(SEED_CLAIMS, private_key("rsa"), "RS256")):
        assert (await both.get("/v1/conversations", headers=bearer(good))).status == 200


async def test_an_rs256_token_cannot_use_the_secret(
    gateway_factory: GatewayFactory, upstream: TestServer
) -> None:
    client = await gateway_factory(upstream_url(upstream), auth={"jwt_secret": SECRET})
    response = await client.get(
        "/v1/conversations", headers=bearer(token(SEED_CLAIMS, private_key("rsa"), "RS256"))
    )
    await assert_401(response, "algorithm")


async def test_long_token_is_refused_before_parsing(
    gateway_factory: GatewayFactory, upstream: TestServer
) -> None:
    client = await gateway_factory(
        upstream_url(upstream), auth={"jwt_secret": SECRET, "max_token_bytes": 512}
    )
    padded = token({**SEED_CLAIMS, "pad": "x" * 600})
    await assert_401(await client.get("/v1/conversations", headers=bearer(padded)), "longer than")


async def test_oversized_header_is_a_clean_4xx(hs_gateway: TestClient[Any, Any]) -> None:
    huge = token({**SEED_CLAIMS, "pad": "x" * 20000})
    response = await hs_gateway.get("/v1/conversations", headers=bearer(huge))
    assert 400 <= response.status < 500
    assert "Traceback" not in await response.text()
    many = {f"X-Filler-{i}": "y" * 100 for i in range(200)}
    response = await hs_gateway.get("/v1/conversations", headers={**many, **bearer(huge[:100])})
    assert 400 <= response.status < 500


async def test_health_needs_no_token(hs_gateway: TestClient[Any, Any]) -> None:
    for path in ("/v1/health", "/api/v1/health"):
        response = await hs_gateway.get(path)
        assert response.status == 200
        assert await response.json() == {"status": "ok"}


async def test_auth_off_is_tenant_default(gateway: TestClient[Any, Any], rows: Rows) -> None:
    headers = bearer(token({"team_id": "ignored-when-auth-is-off"}))
    assert await whoami(gateway, rows, headers) == ("default", "")
    assert await whoami(gateway, rows, {}) == ("default", "")


@pytest.mark.parametrize(
    ("auth", "message"),
    [
        ({"algorithms": ["none"]}, "auth.algorithms: unsupported algorithm 'none'"),
        ({"algorithms": []}, "auth.algorithms: must name at least one"),
        (
            {
                "public_key": "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----",
                "algorithms": ["RS256"],
            },
            "auth.public_key: not a valid PEM public key",
        ),
        (
            {"public_key": "/nonexistent/key.pem", "algorithms": ["RS256"]},
            "not the path of a readable file",
        ),
        ({"jwt_secret": "s", "algorithms": ["RS256"]}, "need auth.public_key or auth.jwks_url"),
        ({"jwks_url": "ftp://x/keys", "algorithms": ["RS256"]}, "auth.jwks_url"),
        ({"leeway": -1}, "auth.leeway: must not be negative"),
    ],
)
def test_auth_config_errors(auth: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        load_config(None, overrides={"auth": auth}, env={})
    assert "\n" not in str(info.value)


def test_hs_with_only_a_public_key_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=re.escape("HS* algorithms need auth.jwt_secret")):
        load_config(None, overrides={"auth": {"public_key": public_pem("rsa")}}, env={})


async def test_algorithm_that_does_not_fit_the_public_key(
    gateway_factory: GatewayFactory, upstream: TestServer
) -> None:
    client = await gateway_factory(
        upstream_url(upstream),
        auth={"public_key": public_pem("rsa"), "algorithms": ["RS256", "ES256", "EdDSA"]},
    )
    for kind, alg in (("ec", "ES256"), ("ed", "EdDSA")):
        forged = token(SEED_CLAIMS, private_key(kind), alg)
        response = await client.get("/v1/conversations", headers=bearer(forged))
        await assert_401(response, "its algorithm does not fit the key")
