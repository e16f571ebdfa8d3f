"""Which X-Forwarded-For hop is the client: only a trusted peer is believed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from helpers import make_config

import chatmem
from chatmem.forwarded import client_address


async def _client_seen(
    aiohttp_client: Any, db_path: Path, trusted: list[str], xff: list[str]
) -> str:
    app = web.Application()

    async def who(request: web.Request) -> web.Response:
        return web.Response(text=str(client_address(request)))

    app.router.add_get("/who", who)
    chatmem.setup(
        app, make_config(db_path, "http://127.0.0.1:9/v1", server={"trusted_proxies": trusted})
    )
    client = await aiohttp_client(app)
    headers = [("X-Forwarded-For", value) for value in xff]
    response = await client.get("/who", headers=headers)
    return str(await response.text())


@pytest.mark.parametrize(
    ("trusted", "xff", "seen"),
    [
        ([], ["203.0.113.7"], "127.0.0.1"),  # untrusted peer: header ignored
        (["10.0.0.0/8"], ["203.0.113.7"], "127.0.0.1"),  # the peer is not in the list
        (["127.0.0.1"], [], "127.0.0.1"),  # trusted, nothing forwarded
        (["127.0.0.1"], ["203.0.113.7"], "203.0.113.7"),
        # The nearest hop that is not a trusted proxy; what the client wrote is further left.
        (["127.0.0.1", "10.0.0.0/8"], ["6.6.6.6, 203.0.113.7, 10.1.2.3"], "203.0.113.7"),
        (["127.0.0.1"], ["6.6.6.6", "203.0.113.8"], "203.0.113.8"),  # several headers
        (["127.0.0.1"], ["127.0.0.1"], "127.0.0.1"),  # only proxies: the peer
        # Not an address (no proxy writes that; it would go into the logs as it is).
        (["127.0.0.1"], ["1.2.3.4 [forged-request-id] admin-ok"], "127.0.0.1"),
        (["127.0.0.1"], ["garbage<>"], "127.0.0.1"),
        (["127.0.0.1"], ["2001:db8::1"], "2001:db8::1"),
        # An IPv6 scope may be any text: fake fields for the access line.
        (["127.0.0.1"], ["fe80::1%eth0 FAKE 200 1.0ms [deadbeef]"], "127.0.0.1"),
    ],
)
async def test_client_address(
    aiohttp_client: Any, db_path: Path, trusted: list[str], xff: list[str], seen: str
) -> None:
    assert await _client_seen(aiohttp_client, db_path, trusted, xff) == seen
