"""Everything else under /v1/ is relayed to the upstream origin, unchanged."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient, TestServer
from helpers import GatewayFactory, make_config, realtime_upstream, received, upstream_url
from multidict import CIMultiDict, CIMultiDictProxy
from scripted_upstream import Framing, Script, scripted_upstream
from yarl import URL

import chatmem
from chatmem.mock_upstream import RECEIVED
from chatmem.proxy import upstream as upstream_module


async def test_models_and_embeddings(gateway: TestClient[Any, Any], upstream: TestServer) -> None:
    models = await gateway.get("/v1/models")
    assert models.status == 200
    direct = await gateway.session.get(upstream.make_url("/v1/models"))
    assert await models.read() == await direct.read()
    emb = await gateway.post("/v1/embeddings", json={"model": "e", "input": ["a", "b"]})
    assert emb.status == 200
    assert [d["index"] for d in (await emb.json())["data"]] == [0, 1]
    assert received(upstream)[-1].json == {"model": "e", "input": ["a", "b"]}


HEADERS_SEEN = web.AppKey("headers_seen", list[CIMultiDictProxy[str]])
"""The headers of each request the echo upstream received."""


@pytest.fixture
async def echo_upstream(aiohttp_server: Any) -> TestServer:
    """An upstream that answers with what it received, to inspect the forwarded request."""

    async def echo(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        request.app[HEADERS_SEEN].append(request.headers.copy())
        headers = {
            "X-Echo": "1",
            "Connection": "close, X-Secret-Hop",
            "X-Secret-Hop": "no",
            "Keep-Alive": "timeout=5",
            "Set-Cookie": "up=1",
            "Set-Cookie2": "up2=1; Version=1",  # RFC 2965's, obsolete but still sent
        }
        if request.path.endswith("/gzip"):
            payload = gzip.compress(b"compressed body")
            return web.Response(body=payload, headers={**headers, "Content-Encoding": "gzip"})
        if request.path.endswith("/status"):
            return web.Response(status=418, text="teapot", headers=headers)
        return web.json_response(
            {
                "method": request.method,
                "path": request.raw_path,
                "headers": dict(request.headers),
                "body": body.decode(errors="replace"),
            },
            headers=headers,
        )

    app = web.Application()
    app[RECEIVED] = __import__("collections").deque()
    app[HEADERS_SEEN] = []
    app.router.add_route("*", "/{tail:.*}", echo)
    server: TestServer = await aiohttp_server(app)
    return server


@pytest.fixture
async def echo_gateway(
    gateway_factory: GatewayFactory, echo_upstream: TestServer
) -> TestClient[Any, Any]:
    return await gateway_factory(
        upstream_url(echo_upstream), upstream={"api_key": "sk-upstream-secret"}
    )


async def test_method_query_body_status_unchanged(echo_gateway: TestClient[Any, Any]) -> None:
    for method in ("GET", "POST", "PUT", "PATCH", "DELETE"):
        resp = await echo_gateway.request(
            method, "/v1/files/abc?limit=3&q=a%20b", data=b"raw \x00 body"
        )
        assert resp.status == 200
        seen = await resp.json()
        assert seen["method"] == method
        assert seen["path"] == "/v1/files/abc?limit=3&q=a%20b"
        assert seen["body"] == "raw \x00 body"
    teapot = await echo_gateway.get("/v1/x/status")
    assert teapot.status == 418 and await teapot.text() == "teapot"


async def test_every_body_and_method_is_relayed_whichever_client_carries_it(
    echo_gateway: TestClient[Any, Any], echo_upstream: TestServer
) -> None:
    """A body of up to 64 KiB with its length goes by the lean pool, read whole; a larger
    or chunked one streams by aiohttp's client, as does a HEAD: each arrives as sent, with
    the framing the client gave it (a length, or chunks), and its answer comes back."""

    async def chunks() -> AsyncIterator[bytes]:
        yield b"first "
        yield b"second"

    small, large = b"s" * 65536, b"L" * 65537
    cases: list[tuple[str, Any, str, str | None, dict[str, str]]] = [
        ("POST", small, small.decode(), "65536", {}),
        ("POST", large, large.decode(), "65537", {}),
        ("PUT", chunks(), "first second", None, {}),
        ("GET", None, "", None, {}),
        ("GET", None, "", "0", {"Content-Length": "0"}),  # as the client said
        ("OPTIONS", None, "", None, {}),
        ("DELETE", None, "", "0", {}),  # aiohttp's client says 0, the upstream sees it
        ("POST", None, "", "0", {}),
    ]
    for method, data, echoed, length, sent in cases:
        resp = await echo_gateway.request(method, "/v1/files/f?x=1", data=data, headers=sent)
        assert resp.status == 200, method
        seen = await resp.json()
        assert (seen["method"], seen["path"], seen["body"]) == (method, "/v1/files/f?x=1", echoed)
        upstream_saw = echo_upstream.app[HEADERS_SEEN][-1]
        assert upstream_saw.get("Content-Length") == length, method
        chunked = upstream_saw.get("Transfer-Encoding") == "chunked"
        assert chunked == (length is None and data is not None), method
    head = await echo_gateway.head("/v1/files/f")
    assert head.status == 200 and await head.read() == b""
    assert int(head.headers["Content-Length"]) > 0  # the GET's answer would have that length
    assert echo_upstream.app[HEADERS_SEEN][-1].get("Content-Length") is None


async def test_a_small_body_that_does_not_arrive_in_time_is_a_408(
    gateway_factory: GatewayFactory, echo_upstream: TestServer
) -> None:
    """A body read whole before it goes upstream must arrive within
    ``server.idle_timeout``: a client that sends part of it and stops gets a 408, and the
    upstream never sees a request cut short."""
    client = await gateway_factory(upstream_url(echo_upstream), server={"idle_timeout": 0.5})
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(b"POST /v1/files HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 408 ")
    writer.close()
    assert echo_upstream.app[HEADERS_SEEN] == []


async def test_headers_filtered_and_key_injected(
    echo_gateway: TestClient[Any, Any], echo_upstream: TestServer
) -> None:
    resp = await echo_gateway.get(
        "/v1/models",
        headers={
            "Authorization": "Bearer client-token",
            "Cookie": "session=client",
            "Connection": "keep-alive, X-Drop-Me",
            "X-Drop-Me": "1",
            "Keep-Alive": "timeout=1",
            "TE": "trailers",
            "Proxy-Authorization": "Basic abc",
            "X-Custom": "kept",
            "OpenAI-Organization": "org-1",
        },
    )
    [upstream_saw] = echo_upstream.app[HEADERS_SEEN]
    assert upstream_saw["Authorization"] == "Bearer sk-upstream-secret"
    seen = {k.lower(): v for k, v in (await resp.json())["headers"].items()}
    # The echo hands the key back in a 200 body: the client gets it masked.
    assert seen["authorization"] == "Bearer " + "*" * len("sk-upstream-secret")
    for name in ("cookie", "x-drop-me", "keep-alive", "te", "proxy-authorization"):
        assert name not in seen, name
    assert seen["x-custom"] == "kept" and seen["openai-organization"] == "org-1"
    # ... and in the other direction:
    assert resp.headers["X-Echo"] == "1"
    assert "X-Secret-Hop" not in resp.headers and "Keep-Alive" not in resp.headers
    # The upstream's cookies are its session with the gateway, never the client's.
    assert "Set-Cookie" not in resp.headers and "Set-Cookie2" not in resp.headers


async def test_trace_and_other_upgrades_are_not_relayed(
    echo_gateway: TestClient[Any, Any],
) -> None:
    """TRACE: an upstream that echoes it (as this one does, and as TRACE is meant to) would
    hand the client the key the gateway adds.  An upgrade to another protocol than a
    WebSocket (h2c): its headers are hop-by-hop, so it would reach the upstream as a
    plain request, and the answer would come back as if it were the upgrade's."""
    trace = await echo_gateway.request("TRACE", "/v1/models")
    assert trace.status == 405
    assert "sk-upstream-secret" not in await trace.text()
    assert (await trace.json())["error"]["code"] == "method_not_allowed"
    assert "GET" in trace.headers["Allow"] and "TRACE" not in trace.headers["Allow"]
    # The token alone, in a list, or in a second Connection header: an upgrade all the same.
    for connection in (["Upgrade"], ["HTTP2-Settings, Upgrade"], ["keep-alive", "upgrade"]):
        headers = CIMultiDict([("Connection", value) for value in connection])
        headers["Upgrade"] = "h2c"
        resp = await echo_gateway.get("/v1/models", headers=headers)
        assert resp.status == 501, connection
        error = (await resp.json())["error"]
        assert error["code"] == "upgrade_not_relayed" and "WebSocket" in error["message"]
    # An Upgrade header without Connection: upgrade is no upgrade: relayed as ever.
    plain = await echo_gateway.get("/v1/models", headers={"Upgrade": "h2c"})
    assert plain.status == 200 and (await plain.json())["method"] == "GET"


async def test_a_websocket_is_relayed_both_ways(
    gateway_factory: GatewayFactory, aiohttp_server: Any
) -> None:
    """A Realtime-style WebSocket: the upstream gets the gateway's key (never the
    client's token), the path and query, and the client's subprotocol; text, binary,
    pings and the close code go through both ways, as they come."""
    handshakes: list[web.Request] = []
    upstream_saw: list[Any] = []

    async def realtime(request: web.Request) -> web.WebSocketResponse:
        handshakes.append(request)
        ws = web.WebSocketResponse(protocols=["realtime"], autoping=False)
        await ws.prepare(request)
        await ws.send_str('{"type": "session.created"}')
        async for message in ws:
            upstream_saw.append((message.type, message.data))
            if message.type is WSMsgType.TEXT and message.data == "bye":
                await ws.close(code=4001, message=b"done")
            elif message.type is WSMsgType.TEXT:
                await ws.send_str("echo " + message.data)
            elif message.type is WSMsgType.BINARY:
                await ws.send_bytes(message.data[::-1])
            elif message.type is WSMsgType.PING:
                await ws.pong(message.data)
        upstream_saw.append(("closed", ws.close_code))
        return ws

    app = web.Application()
    app.router.add_get("/v1/realtime", realtime)
    server: TestServer = await aiohttp_server(app)
    gateway = await gateway_factory(upstream_url(server), upstream={"api_key": "sk-up"})
    async with gateway.ws_connect(
        "/v1/realtime?model=gpt-realtime",
        headers={"Authorization": "Bearer client-token"},
        protocols=["realtime", "other"],
        autoping=False,
    ) as ws:
        assert ws.protocol == "realtime"
        assert (await ws.receive_str()) == '{"type": "session.created"}'
        await ws.send_str("hello")
        assert (await ws.receive_str()) == "echo hello"
        await ws.send_bytes(b"\x00\x01\x02")
        assert (await ws.receive_bytes()) == b"\x02\x01\x00"
        await ws.ping(b"p1")
        pong = await ws.receive()
        assert (pong.type, pong.data) == (WSMsgType.PONG, b"p1")
        await ws.send_str("bye")
        closing = await ws.receive()
        assert (closing.type, closing.data, closing.extra) == (WSMsgType.CLOSE, 4001, "done")
    (handshake,) = handshakes
    assert handshake.path_qs == "/v1/realtime?model=gpt-realtime"
    assert handshake.headers["Authorization"] == "Bearer sk-up"
    offered = handshake.headers["Sec-WebSocket-Protocol"].split(",")
    assert [protocol.strip() for protocol in offered] == ["realtime", "other"]
    assert upstream_saw[:3] == [
        (WSMsgType.TEXT, "hello"),
        (WSMsgType.BINARY, b"\x00\x01\x02"),
        (WSMsgType.PING, b"p1"),
    ]
    # The client closes first: the upstream gets its close code.
    async with gateway.ws_connect("/v1/realtime", autoping=False) as ws:
        assert (await ws.receive_str()) == '{"type": "session.created"}'
        await ws.close(code=4002)
    for _ in range(100):  # bounded: up to 5 s for the close to reach the upstream
        if upstream_saw[-1] == ("closed", 4002):
            break
        await asyncio.sleep(0.05)
    assert upstream_saw[-1] == ("closed", 4002)
    # A handshake the gateway cannot answer is a 400 before the upstream opens a socket.
    bad = await gateway.get(
        "/v1/realtime", headers={"Connection": "Upgrade", "Upgrade": "websocket"}
    )
    assert bad.status == 400 and len(handshakes) == 2
    # The gateway stopping: the socket ends at once with 1001 on both sides (its server
    # stops reading from clients, so one kept through the grace would lose their messages).
    async with gateway.ws_connect("/v1/realtime", autoping=False) as ws:
        assert (await ws.receive_str()) == '{"type": "session.created"}'
        stopping = asyncio.ensure_future(gateway.app.shutdown())
        closing = await ws.receive()
        assert (closing.type, closing.data) == (WSMsgType.CLOSE, 1001)
    await stopping
    for _ in range(100):  # bounded: up to 5 s for the close to reach the upstream
        if upstream_saw[-1] == ("closed", 1001):
            break
        await asyncio.sleep(0.05)
    assert upstream_saw[-1] == ("closed", 1001)


async def test_the_subprotocols_a_client_offers_are_not_logged(
    gateway_factory: GatewayFactory, aiohttp_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """OpenAI's browser Realtime clients send their key as a subprotocol; aiohttp logs the
    ones a server does not take, which for a relayed socket is every handshake."""
    picked: list[tuple[str, str | None]] = []

    async def realtime(request: web.Request) -> web.WebSocketResponse:
        offer = request.headers["Sec-WebSocket-Protocol"]
        take = request.query.getall("take", [])
        if not take:  # takes none, without aiohttp's warning in this process's log
            headers = {k: v for k, v in request.headers.items() if k != "Sec-WebSocket-Protocol"}
            request = request.clone(headers=headers)
        ws = web.WebSocketResponse(protocols=take)
        await ws.prepare(request)
        picked.append((offer, ws.ws_protocol))
        await ws.close()
        return ws

    up = await realtime_upstream(aiohttp_server, realtime)
    gateway = await gateway_factory(up)
    offered = ["realtime", "openai-insecure-api-key.sk-live-123"]
    caplog.set_level(logging.DEBUG)
    for path in ("/v1/realtime", "/v1/realtime?take=realtime"):
        async with gateway.ws_connect(path, protocols=offered) as ws:
            await ws.receive()
    assert picked == [(",".join(offered), None), (",".join(offered), "realtime")]
    assert "sk-live-123" not in caplog.text


async def test_a_close_frame_without_a_code_goes_upstream_as_1000(
    gateway_factory: GatewayFactory, aiohttp_server: Any
) -> None:
    """RFC 6455 lets a close frame carry no code; relayed as it was read, it went upstream
    as code 0, which no endpoint may send. aiohttp's client always sends a code, so the
    client here is a raw socket."""
    closed: list[int | None] = []

    async def realtime(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for _ in ws:
            pass
        closed.append(ws.close_code)
        return ws

    app = web.Application()
    app.router.add_get("/v1/realtime", realtime)
    server: TestServer = await aiohttp_server(app)
    gateway = await gateway_factory(upstream_url(server))
    assert gateway.server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.server.port)
    writer.write(
        b"GET /v1/realtime HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\n"
        b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 ")
    writer.write(b"\x88\x80" + b"\x01\x02\x03\x04")  # FIN + close, masked, no payload
    echoed = await reader.readexactly(2)  # the gateway's close back to the client
    assert echoed[0] == 0x88
    writer.close()
    for _ in range(100):  # bounded: up to 5 s for the close to reach the upstream
        if closed:
            break
        await asyncio.sleep(0.05)
    assert closed == [1000]


async def test_a_websocket_message_over_the_body_limit_ends_the_socket(
    gateway_factory: GatewayFactory, aiohttp_server: Any
) -> None:
    seen: list[Any] = []

    async def realtime(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            seen.append(message.data)
        seen.append(("closed", ws.close_code))
        return ws

    up = await realtime_upstream(aiohttp_server, realtime)
    gateway = await gateway_factory(up, server={"max_body_bytes": 1000})
    async with gateway.ws_connect("/v1/realtime") as ws:
        await ws.send_str("a" * 1000)
        await ws.send_str("b" * 1001)
        closing = await ws.receive()
        assert closing.type is WSMsgType.CLOSE and closing.data == 1009
    for _ in range(100):  # bounded: up to 5 s for the close to reach the upstream
        if seen and seen[-1] == ("closed", 1009):
            break
        await asyncio.sleep(0.05)
    assert seen == ["a" * 1000, ("closed", 1009)]


async def test_an_upstream_websocket_message_over_the_body_limit_is_a_1009(
    gateway_factory: GatewayFactory, aiohttp_server: Any
) -> None:
    """Item 152: the other way, the upstream's message over the limit closed the client's
    socket with 1014 (aiohttp's client hands the error over in the message, where its
    server keeps it for ``exception()``). A 1009 for both sides now."""
    closed: list[int | None] = []

    async def realtime(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str("a" * 1000)
        await ws.send_str("b" * 1001)
        async for _ in ws:
            pass
        closed.append(ws.close_code)
        return ws

    up = await realtime_upstream(aiohttp_server, realtime)
    gateway = await gateway_factory(up, server={"max_body_bytes": 1000})
    async with gateway.ws_connect("/v1/realtime") as ws:
        assert await ws.receive_str() == "a" * 1000
        closing = await ws.receive()
        assert closing.type is WSMsgType.CLOSE and closing.data == 1009
    for _ in range(100):  # bounded: up to 5 s for the close to reach the upstream
        if closed:
            break
        await asyncio.sleep(0.05)
    assert closed == [1009]


async def test_an_upstream_websocket_that_drops_without_a_close_is_a_1014(
    gateway_factory: GatewayFactory, aiohttp_server: Any
) -> None:
    """An upstream whose connection drops mid-socket (its process killed, say) sends no
    close frame: the client gets 1014 (bad gateway, WebSocket's 502), not 1001 (going
    away), which says an endpoint chose to leave."""

    async def realtime(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str("partial")
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.abort()
        return ws

    up = await realtime_upstream(aiohttp_server, realtime)
    gateway = await gateway_factory(up)
    async with gateway.ws_connect("/v1/realtime") as ws:
        first = await ws.receive(timeout=5)
        closing = await ws.receive(timeout=5)
    assert (first.type, first.data) == (WSMsgType.TEXT, "partial")
    assert (closing.type, closing.data) == (WSMsgType.CLOSE, 1014)


async def test_a_websocket_handshake_the_upstream_does_not_answer_is_a_504(
    gateway_factory: GatewayFactory, aiohttp_server: Any
) -> None:
    async def slow(request: web.Request) -> web.WebSocketResponse:
        await asyncio.sleep(1.5)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        return ws

    up = await realtime_upstream(aiohttp_server, slow)
    gateway = await gateway_factory(up, upstream={"connect_timeout": 0.3, "read_timeout": 0.3})
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await gateway.ws_connect("/v1/realtime")
    assert refused.value.status == 504


async def test_a_websocket_the_upstream_refuses_is_a_502(
    echo_gateway: TestClient[Any, Any],
) -> None:
    """The echo upstream answers the handshake with a plain 200: no WebSocket, and the
    client's handshake is not answered as if there were one."""
    resp = await echo_gateway.get(
        "/v1/realtime",
        headers={
            "Connection": "Upgrade",
            "Upgrade": "websocket",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        },
    )
    assert resp.status == 502
    error = (await resp.json())["error"]
    assert "refused the WebSocket handshake (200)" in error["message"]


@pytest.mark.parametrize("key", [None, "sk-upstream-secret"])
async def test_headers_the_client_did_not_send_are_not_added(
    gateway_factory: GatewayFactory, echo_upstream: TestServer, key: str | None
) -> None:
    """aiohttp's client adds these when they are missing; the passthrough relays the
    client's.  With a key, the upstream is asked for no coding, whatever the client
    accepts (the key is looked for in the answer: see test_redaction.py)."""
    upstream = {"api_key": key} if key else {}
    gateway = await gateway_factory(upstream_url(echo_upstream), upstream=upstream)
    mine = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")
    resp = await gateway.post("/v1/x/echo", data=b"raw", skip_auto_headers=mine)
    seen = {k.lower(): v for k, v in (await resp.json())["headers"].items()}
    if key:
        assert seen.pop("accept-encoding") == "identity"
    assert not seen.keys() & {name.lower() for name in mine}, seen
    sent = dict(zip(mine, ("text/plain", "br", "my-agent/1", "application/x-thing"), strict=True))
    resp = await gateway.post("/v1/x/echo", data=b"raw", headers=sent)
    seen_values = (await resp.json())["headers"]
    expected = {**sent, "Accept-Encoding": "identity"} if key else sent
    assert {name: seen_values[name] for name in mine} == expected


async def test_a_compressed_request_body_goes_up_decoded_and_labelled_so(
    echo_gateway: TestClient[Any, Any],
) -> None:
    """aiohttp's server decodes the body; sent on with the client's Content-Encoding and
    compressed length it reached the upstream cut short and mislabelled."""
    body = b'{"input": "hello world, ' + b"x" * 500 + b'"}'
    resp = await echo_gateway.post(
        "/v1/embeddings", data=gzip.compress(body), headers={"Content-Encoding": "gzip"}
    )
    seen = await resp.json()
    assert seen["body"] == body.decode()
    assert "content-encoding" not in {k.lower() for k in seen["headers"]}


async def test_no_double_decompression(
    gateway_factory: GatewayFactory, echo_upstream: TestServer
) -> None:
    """Without an upstream key a compressed answer goes on as it came (with one it is
    decoded to look for the key in it: test_redaction.py)."""
    gateway = await gateway_factory(upstream_url(echo_upstream))
    resp = await gateway.get(
        "/v1/x/gzip", headers={"Accept-Encoding": "gzip"}, auto_decompress=False
    )
    assert resp.headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(await resp.read()) == b"compressed body"


@pytest.mark.parametrize("path", ["/v1//evil.example/x", "/v1//127.0.0.2:1/x", "/v1/%2F%2Fevil/x"])
async def test_odd_paths_stay_on_the_upstream(
    echo_gateway: TestClient[Any, Any], path: str
) -> None:
    resp = await echo_gateway.get(path)
    assert resp.status == 200
    assert (await resp.json())["path"] == path


@pytest.mark.parametrize(
    "path", ["/v1/%2e%2e/admin", "/v1/a/%2E./b", "/v1/%2e/models", "/v1/%2e%2e%2fadmin"]
)
async def test_encoded_dot_segments_are_refused(
    echo_gateway: TestClient[Any, Any], path: str
) -> None:
    # %2e is ".", and an upstream may decode it before resolving the path: /admin.
    # Sent as raw bytes: aiohttp's client would resolve the segments itself. (The echo
    # upstream would have answered 200 with the path it was asked for.)
    reader, writer = await asyncio.open_connection(echo_gateway.host, echo_gateway.port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), head
    assert json.loads(body)["error"]["message"] == "path must not contain '.' or '..' segments"


@pytest.mark.parametrize("path", ["/v1/../admin", "/v1/./models", "/v1/a/%2e%2e/b"])
async def test_dot_segments_never_leave_v1(echo_gateway: TestClient[Any, Any], path: str) -> None:
    resp = await echo_gateway.get(path)
    if resp.status == 200:  # normalised by the server before routing: still under /v1
        assert (await resp.json())["path"].startswith("/v1/")
        assert ".." not in (await resp.json())["path"]
    else:
        assert resp.status in (400, 404)
        assert "error" in await resp.json()


async def test_absolute_form_target_goes_to_upstream(
    echo_gateway: TestClient[Any, Any], echo_upstream: TestServer
) -> None:
    import asyncio

    reader, writer = await asyncio.open_connection(echo_gateway.host, echo_gateway.port)
    writer.write(
        b"GET http://evil.example/v1/models HTTP/1.1\r\nHost: evil.example\r\n"
        b"Connection: close\r\n\r\n"
    )
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    seen = json.loads(body)
    assert seen["path"] == "/v1/models"
    assert seen["headers"]["Host"] == f"127.0.0.1:{echo_upstream.port}"


async def test_body_over_limit_is_413(
    gateway_factory: GatewayFactory, echo_upstream: TestServer
) -> None:
    client = await gateway_factory(upstream_url(echo_upstream), server={"max_body_bytes": 100})
    resp = await client.post("/v1/embeddings", data=b"x" * 101)
    assert resp.status == 413
    assert (await resp.json())["error"]["code"] == "request_too_large"

    async def chunks() -> Any:
        for _ in range(5):
            yield b"x" * 50

    resp = await client.post("/v1/embeddings", data=chunks())
    assert resp.status == 413
    ok = await client.post("/v1/embeddings", data=b"x" * 100)
    assert ok.status == 200


async def test_streamed_passthrough_is_byte_exact(
    gateway: TestClient[Any, Any], upstream: TestServer
) -> None:
    body = {"model": "m", "prompt": "one two three", "stream": True}
    via_gateway = await gateway.post("/v1/completions", json=body)
    assert via_gateway.headers["Content-Type"].startswith("text/event-stream")
    direct = await gateway.session.post(upstream.make_url("/v1/completions"), json=body)
    assert await via_gateway.read() == await direct.read()


@pytest.mark.parametrize("lines", [300, 1030])
async def test_an_answer_with_a_large_head_is_relayed_up_to_the_limits(
    gateway_factory: GatewayFactory, lines: int
) -> None:
    """300 header lines and one of 20,000 bytes: a valid answer, over aiohttp's own
    limits (128 lines, 8190 bytes), which made it a 502 "unreachable or broke the
    connection". Past the gateway's limits (1,024 lines) the 502 says what it is."""
    headers = {"Content-Type": "application/json", "X-Big": "b" * 20_000}
    headers |= {f"X-H{i}": str(i) for i in range(lines)}
    script = Script(headers=headers, chunks=[b'{"data": []}'], framing="length")
    async with (
        scripted_upstream(script) as up,
        aiohttp.ClientSession(max_field_size=65536, max_headers=2048) as ours,
    ):
        client = await gateway_factory(up.url)
        # The test client's own limits are aiohttp's: a client of ours takes the head.
        async with ours.get(client.make_url("/v1/models")) as response:
            body = await response.read()
    if lines < 1024:
        assert response.status == 200 and body == b'{"data": []}'
        assert response.headers["X-Big"] == "b" * 20_000
        assert [response.headers[f"X-H{i}"] for i in range(lines)] == [str(i) for i in range(lines)]
    else:
        assert response.status == 502
        assert json.loads(body)["error"] == {
            "message": "the upstream's answer is not valid HTTP/1.1, or its head is larger than"
            " the gateway takes (65536 bytes a line, 1024 header lines)",
            "type": "upstream_error",
            "param": None,
            "code": "upstream_unavailable",
        }


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_an_answer_without_a_content_type_gets_none(
    gateway_factory: GatewayFactory, framing: Framing
) -> None:
    """aiohttp gives a body without a type ``application/octet-stream``: a relayed answer
    keeps the upstream's headers, none added."""
    script = Script(headers={"X-Kind": "raw"}, chunks=[b"\x00\x01 raw"], framing=framing)
    async with scripted_upstream(script) as up:
        client = await gateway_factory(up.url)
        response = await client.get("/v1/files/f1/content")
        assert await response.read() == b"\x00\x01 raw"
    assert response.status == 200 and response.headers["X-Kind"] == "raw"
    assert "Content-Type" not in response.headers


async def test_an_idle_connection_is_not_used_once_an_upstream_may_be_closing_it(
    gateway_factory: GatewayFactory, aiohttp_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Servers close idle connections after a while (uvicorn, so vLLM, after 5 s): a
    request sent as one closes fails before the upstream saw it, and a POST is not sent
    again.  So the passthrough uses an idle connection again only for less than that."""
    monkeypatch.setattr(upstream_module, "_PASSTHROUGH_IDLE", 0.3)
    peers: list[int] = []

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        peers.append(request.transport.get_extra_info("peername")[1])  # type: ignore[union-attr]
        return web.json_response({"object": "list", "data": []})

    app = web.Application()
    app.router.add_route("*", "/v1/{tail:.*}", answer)
    up = await aiohttp_server(app)
    client = await gateway_factory(upstream_url(up))
    for pause in (0.0, 0.0, 0.6):
        await asyncio.sleep(pause)
        response = await client.post("/v1/embeddings", json={"model": "m", "input": "x"})
        assert response.status == 200
    assert peers[0] == peers[1] != peers[2]  # kept alive, then not used after 0.3 s idle


async def test_only_the_paths_upstream_passthrough_names_are_relayed(
    gateway_factory: GatewayFactory, upstream: TestServer
) -> None:
    """Every tenant reaches the upstream with the one key, so what the upstream keeps under
    it (OpenAI's stored completions, which hold the history chatmem sent) is everyone's:
    a gateway for several tenants relays only what it names."""
    client = await gateway_factory(
        upstream_url(upstream), upstream={"passthrough": ["/models", "/embeddings"]}
    )
    override = {"X-HTTP-Method-Override": "DELETE", "X-Original-URL": "/v1/files"}
    assert (await client.get("/v1/models", headers=override)).status == 200
    assert not {"x-http-method-override", "x-original-url"} & {
        name.lower() for name in received(upstream)[-1].headers
    }  # which some frameworks would take for another method or path
    assert (await client.get("/v1/models/m")).status == 200
    assert (await client.post("/v1/embeddings", json={"model": "m", "input": "x"})).status == 200
    relayed = len(received(upstream))
    for method, path in (
        ("GET", "/v1/chat/completions"),  # the upstream's stored completions
        ("GET", "/v1/chat/completions/chatcmpl-1"),
        ("GET", "/v1/files"),
        ("GET", "/v1/modelsx"),
        ("POST", "/v1/embeddingsx"),
        ("GET", "/v1/models/%5c..%5cfiles"),  # "/files" to servers that take \\ for /
        ("GET", "/v1/models/..;/files"),  # and to those that take ..; for ..
    ):
        response = await client.request(method, path)
        assert response.status == 403, path
        error = (await response.json())["error"]
        assert error["code"] == "passthrough_not_allowed"
        assert error["message"].startswith("the gateway does not relay /v1/")
    assert len(received(upstream)) == relayed
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert (await client.post("/v1/chat/completions", json=chat)).status == 200  # memory


async def test_a_websocket_the_client_closes_is_logged_as_its_101(
    aiohttp_server: Any, aiohttp_client: Any, db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Its handler is cancelled when the connection goes, also after a clean close: the
    access line said 499, "client closed request", for every ordinary Realtime session
    (h55). Its answer was the 101, given in full; the close code tells the rest."""

    async def realtime(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for _ in ws:
            pass
        return ws

    upstream_app = web.Application()
    upstream_app.router.add_get("/v1/realtime", realtime)
    server: TestServer = await aiohttp_server(upstream_app)
    caplog.set_level(logging.INFO, logger="chatmem.access")
    app = chatmem.create_app(make_config(db_path, upstream_url(server), log={"access": True}))
    ours = TestServer(app)
    await ours.start_server(
        access_log_class=chatmem.AccessLogger, access_log=logging.getLogger("chatmem.access")
    )
    client = await aiohttp_client(ours)
    async with client.ws_connect("/v1/realtime") as ws:
        await ws.send_str("hello")
        await ws.close(code=1000)
    for _ in range(200):  # bounded: the line comes once the handler ends, 2 s at most
        lines = [r for r in caplog.records if r.name == "chatmem.access"]
        if lines:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)  # and no second line after it
    lines = [r for r in caplog.records if r.name == "chatmem.access"]
    assert [(r.path, r.status) for r in lines] == [("/v1/realtime", 101)]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("DELETE", "/v1//conversations/{id}"),
        ("GET", "/v1//conversations/{id}"),
        ("POST", "/v1//conversations"),
        ("GET", "/v1/Conversations/{id}"),
        ("POST", "/v1/ask/"),
        ("POST", "/v1//ask"),
        ("GET", "/v1/health/"),
        ("GET", "/v1/READY"),
        # An escaped slash, which servers such as uvicorn decode before they route, and
        # what follows the name to some servers (item 134).
        ("GET", "/v1/conversations%2F{id}"),
        ("DELETE", "/v1/conversations%2f{id}"),
        ("GET", "/v1/conversations%2F{id}%2Fitems"),
        ("POST", "/v1/conversations%2F"),
        ("GET", "/v1/conversations.json"),
        ("GET", "/v1/conversations;x"),
        ("GET", "/v1/conversations%20"),
        ("POST", "/v1/ask%2F"),
    ],
)
async def test_a_misspelt_path_of_the_gateways_own_is_not_relayed(
    gateway_factory: GatewayFactory, method: str, path: str
) -> None:
    """h74: a doubled or trailing slash, or another case, on one of the gateway's own paths
    was relayed with the upstream key (a delete the client took for done reached the
    upstream's own Conversations API instead): a 404 now, and the upstream sees nothing."""
    script = Script(headers={"Content-Type": "application/json"}, chunks=[b"{}"])
    async with scripted_upstream(script) as up:
        client = await gateway_factory(up.url, upstream={"api_key": "sk-h74-0123456789"})
        async with client.post("/v1/conversations", json={"items": []}) as made:
            conversation = (await made.json())["id"]
        url = URL(str(client.make_url("/"))).with_path(path.format(id=conversation), encoded=True)
        async with client.session.request(method, url, json={}) as response:
            assert response.status == 404
            assert (await response.json())["error"]["code"] == "not_found"
        async with client.get(f"/v1/conversations/{conversation}") as kept:
            assert kept.status == 200
        for theirs in ("/v1/asks", "/v1/health-check"):  # not the gateway's: relayed
            async with client.get(theirs) as relayed:
                assert relayed.status == 200
    assert [request[1] for request in up.requests] == ["/v1/asks", "/v1/health-check"]


@pytest.mark.parametrize("body", [b"small", b"x" * 70_000], ids=["pool", "aiohttp"])
async def test_a_header_value_with_a_control_byte_is_a_502_by_either_client(
    gateway_factory: GatewayFactory, body: bytes
) -> None:
    """aiohttp's server refuses to write such a value: relayed, it was a 500 "internal
    error in the gateway" (a body over 64 KiB goes by aiohttp's client, a small one by
    the pool)."""
    script = Script(
        headers={"Content-Type": "text/plain"},
        more_head_lines=["X-Odd: a\x01b"],
        chunks=[b"ok"],
        framing="length",
    )
    async with scripted_upstream(script) as up:
        client = await gateway_factory(up.url)
        response = await client.post("/v1/files", data=body)
        assert response.status == 502
        assert (await response.json())["error"]["message"] == (
            "the upstream's answer is not valid HTTP/1.1, or its head is larger than the"
            " gateway takes (65536 bytes a line, 1024 header lines)"
        )


@pytest.mark.parametrize("size", [10, 70_000], ids=["pool", "aiohttp"])
async def test_a_header_repeated_in_other_letter_cases_goes_up_whole(
    gateway_factory: GatewayFactory, echo_upstream: TestServer, size: int
) -> None:
    """``X-R: 1``, ``X-R: 2``, ``x-r: 3`` (aiohttp's client kept only the last, and the
    test client would too: the request is written by hand)."""
    client = await gateway_factory(upstream_url(echo_upstream))
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(
        b"POST /v1/files HTTP/1.1\r\nHost: x\r\nX-R: 1\r\nX-R: 2\r\nx-r: 3\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (size, b"b" * size)
    )
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert echo_upstream.app[HEADERS_SEEN][-1].getall("X-R") == ["1", "2", "3"]


async def test_a_streamed_body_that_stops_coming_is_a_408(gateway_factory: GatewayFactory) -> None:
    """A chunked upload is streamed upstream as it comes: a client that sent a piece and
    went silent held its connection and the upstream's for as long as the upstream
    waited (found by a review: 40 s and more with ``idle_timeout = 5``).  The body may not
    pause longer than ``server.idle_timeout`` between two pieces."""
    async with scripted_upstream(Script(chunks=[b"{}"], framing="length")) as up:
        client = await gateway_factory(up.url, server={"idle_timeout": 0.5})
        reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
        writer.write(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Transfer-Encoding: chunked\r\n\r\n5\r\n{"a":\r\n'
        )
        await writer.drain()
        # bounded: the gateway answers once the body paused for idle_timeout
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
        rest = await asyncio.wait_for(reader.read(), 20)
        writer.close()
        await writer.wait_closed()
    assert head.startswith(b"HTTP/1.1 408 ")
    error = json.loads(rest)["error"]
    assert error["code"] == "request_timeout"
    assert "within 0.5 seconds of its last piece" in error["message"]
