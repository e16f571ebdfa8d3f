"""chatmem embedded in a host aiohttp app (examples/embedded_app.py): both keep working."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import socket
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from helpers import Rows, answer_events, make_config, received, upstream_url
from scripted_upstream import Script, scripted_upstream

from chatmem.state import GATEWAY

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
    # A 405 on chatmem's own paths too (aiohttp's plain text before), naming what is allowed.
    wrong = await client.put("/v1/conversations")
    assert (wrong.status, wrong.headers["Allow"]) == (405, "GET,POST")
    assert json.loads(await wrong.read())["error"]["code"] == "method_not_allowed"


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


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "plain"])
async def test_a_client_that_leaves_is_noticed_without_handler_cancellation(
    db_path: Path, rows: Rows, stream: bool
) -> None:
    """The contract's snippet runs ``web.run_app(app)``, whose handlers aiohttp never
    cancels (aiohttp's test server always does, so this one is run as ``run_app`` runs
    it).  A client that leaves while the upstream is silent, mid-stream or before a
    non-streamed answer, still has its upstream request closed within a second, and
    nothing is committed ("discard", the default)."""
    if stream:
        script = Script(chunks=answer_events()[:2], end="hang")
    else:
        script = Script(before_headers="hang")
    async with scripted_upstream(script) as up:
        app = _example().build_app(make_config(db_path, up.url))
        runner = web.AppRunner(app)  # handler_cancellation=False, as web.run_app
        await runner.setup()
        listening = socket.create_server(("127.0.0.1", 0))
        port = listening.getsockname()[1]
        await web.SockSite(runner, listening).start()
        body = {"model": "m", "stream": stream, "messages": [{"role": "user", "content": "hi"}]}
        try:
            async with aiohttp.ClientSession() as session:
                url = f"http://127.0.0.1:{port}/v1/chat/completions"
                request = asyncio.create_task(session.post(url, json=body))
                if stream:
                    response = await request
                    await response.content.readuntil(b"\n\n")  # the answer has started
                    response.close()  # the client goes away while the upstream is silent
                else:
                    for _ in range(100):  # bounded: up to 5 s for the request to arrive
                        if up.requests:
                            break
                        await asyncio.sleep(0.05)
                    request.cancel()  # the client goes away: its connection is closed
                    with contextlib.suppress(asyncio.CancelledError):
                        await request
                await asyncio.wait_for(up.disconnected.wait(), 1.0)
                for _ in range(100):  # bounded: up to 5 s for the handler to end
                    if not app[GATEWAY].live.tasks:
                        break
                    await asyncio.sleep(0.05)
                assert not app[GATEWAY].live.tasks
        finally:
            await runner.cleanup()
    assert rows.messages() == []


async def test_a_host_can_answer_malformed_http_in_the_openai_shape(
    db_path: Path, upstream: TestServer
) -> None:
    """A request aiohttp cannot parse reaches no app: with ``web.AppRunner`` the host's
    server answers in plain text quoting the refused line (a token); with chatmem's
    ``GatewayRunner`` it is the OpenAI-shaped 400 that ``chatmem serve`` gives, and the
    host's routes are served as before."""
    from chatmem.server import GatewayRunner

    app = _example().build_app(make_config(db_path, upstream_url(upstream)))
    runner = GatewayRunner(app)
    await runner.setup()
    listening = socket.create_server(("127.0.0.1", 0))
    port = listening.getsockname()[1]
    await web.SockSite(runner, listening).start()
    token = b"sk-host-client-token"

    def ask(raw: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(raw)
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
            return received

    try:
        bad = b"GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token + b"\x01\r\n\r\n"
        response = await asyncio.to_thread(ask, bad)
        head, _, body = response.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 400 ") and token not in response
        assert json.loads(body)["error"]["code"] == "malformed_request"
        index = await asyncio.to_thread(
            ask, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        assert index.startswith(b"HTTP/1.1 200 ") and b'"app": "my-host-app"' in index
    finally:
        await runner.cleanup()


async def test_a_host_middleware_that_reads_the_body_first(
    aiohttp_client: Any, upstream: TestServer, db_path: Path, rows: Rows
) -> None:
    """``await request.read()`` in a middleware is ordinary aiohttp (the handler gets the
    same bytes again).  chatmem read the stream itself and found it spent: a chat turn
    was a 400 'not valid JSON', a new conversation lost its metadata, and a passthrough
    upload hung until read_timeout (its Content-Length promised bytes never sent)."""
    import chatmem

    @web.middleware
    async def reads_first(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.body_exists:
            await request.read()
        return await handler(request)

    app = web.Application(middlewares=[reads_first])
    chatmem.setup(app, make_config(db_path, upstream_url(upstream)))
    client = await aiohttp_client(app)
    turn = {"model": "m", "messages": [{"role": "user", "content": "hello there"}]}
    chat = await client.post(
        "/v1/chat/completions", json=turn, headers={"X-Conversation-Id": "read"}
    )
    assert chat.status == 200
    assert [m["role"] for m in rows.messages("read")] == ["user", "assistant"]
    made = await client.post("/v1/conversations", json={"metadata": {"team": "a"}})
    assert (await made.json())["metadata"] == {"team": "a"}
    embedded = await asyncio.wait_for(
        client.post("/v1/embeddings", json={"model": "e", "input": "x"}), 10
    )
    assert embedded.status == 200
    assert received(upstream)[-1].json == {"model": "e", "input": "x"}


async def test_chatmem_in_a_sub_app_and_host_routes_under_v1(
    aiohttp_client: Any, upstream: TestServer, db_path: Path
) -> None:
    """``setup`` on a sub-app mounted at /ai/: the passthrough sends the path after
    /ai/v1 (it sent /v1/ai/v1/models).  And a host route under /v1/ asked with another
    method is the host's 405, not a request to the model server."""
    import chatmem

    async def host_thing(_request: web.Request) -> web.Response:
        return web.json_response({"host": True})

    sub = web.Application()
    chatmem.setup(sub, make_config(db_path, upstream_url(upstream)))
    app = web.Application()
    app.add_subapp("/ai/", sub)
    client = await aiohttp_client(app)
    models = await client.get("/ai/v1/models?x=1")
    assert models.status == 200
    assert [(r.method, r.path, r.query) for r in received(upstream)] == [
        ("GET", "/v1/models", "x=1")
    ]

    host = web.Application()
    host.router.add_get("/v1/host-thing", host_thing)
    chatmem.setup(host, make_config(db_path, upstream_url(upstream)))
    client = await aiohttp_client(host)
    assert await (await client.get("/v1/host-thing")).json() == {"host": True}
    refused = await client.post("/v1/host-thing", json={})
    assert (refused.status, refused.headers["Allow"]) == (405, "GET,HEAD")
    assert len(received(upstream)) == 1  # nothing more reached the model server
    # In the host's shape, as without chatmem, and counted as the host's (h52: it was an
    # OpenAI error counted as the passthrough's).
    assert await refused.text() == "405: Method Not Allowed"
    metrics = await (await client.get("/metrics")).text()
    assert 'route="passthrough",status="405"' not in metrics
    assert 'route="other",status="405"' in metrics


async def test_a_host_path_under_v1_is_the_host_s_with_auth_cors_and_its_own_request_id(
    aiohttp_client: Any, upstream: TestServer, db_path: Path
) -> None:
    """Item 138, three ways a host route under /v1/ came to be answered as chatmem's: with
    auth on, asked with another method, it was chatmem's 401 (the token was checked
    before the path was found to be the host's); with CORS on, its preflight was answered
    by chatmem (204 for whatever method was asked, then the host's 405 with chatmem's CORS
    headers); and the X-Request-Id the host set on its answer was replaced by chatmem's,
    the host's relabelled X-Upstream-Request-Id."""
    from jwt_keys import SECRET

    import chatmem

    async def host_thing(_request: web.Request) -> web.Response:
        return web.json_response({"host": True}, headers={"X-Request-Id": "host-trace-1"})

    host = web.Application()
    host.router.add_get("/v1/host-thing", host_thing)
    config = make_config(
        db_path,
        upstream_url(upstream),
        auth={"jwt_secret": SECRET},
        server={"cors_origins": ["https://a.example"]},
    )
    chatmem.setup(host, config)
    client = await aiohttp_client(host)
    answer = await client.get("/v1/host-thing")  # no token: the host's route needs none
    assert await answer.json() == {"host": True}
    assert answer.headers["X-Request-Id"] == "host-trace-1"
    assert "X-Upstream-Request-Id" not in answer.headers
    refused = await client.post("/v1/host-thing", json={})  # no token either
    assert (refused.status, refused.headers["Allow"]) == (405, "GET,HEAD")
    assert await refused.text() == "405: Method Not Allowed"
    preflight = {"Origin": "https://a.example", "Access-Control-Request-Method": "POST"}
    asked = await client.options("/v1/host-thing", headers=preflight)
    assert (asked.status, asked.headers["Allow"]) == (405, "GET,HEAD")
    assert not [name for name in asked.headers if name.lower().startswith("access-control-")]
    refused = await client.post("/v1/host-thing", headers={"Origin": "https://a.example"})
    assert refused.status == 405 and "Access-Control-Allow-Origin" not in refused.headers
    # chatmem's own paths keep all three: the token, the preflight and its id.
    assert (await client.get("/v1/models")).status == 401
    ours = await client.options("/v1/models", headers=preflight)
    assert ours.status == 204 and ours.headers["Access-Control-Allow-Origin"] == "https://a.example"
    assert received(upstream) == []  # nothing reached the model server


async def test_setup_says_what_is_wrong(
    upstream: TestServer, db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import chatmem

    config = make_config(db_path, upstream_url(upstream))
    for wrong in ({"upstream": {"url": upstream_url(upstream)}}, "chatmem.toml", None):
        with pytest.raises(TypeError, match=r"config must be a chatmem\.Config, such as"):
            chatmem.setup(web.Application(), wrong)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"create_app\(config\): config must be a chatmem"):
            chatmem.create_app(wrong)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"path must be a file path, not dict \(settings"):
        chatmem.load_config({"server": {"port": 1}})  # type: ignore[arg-type]
    twice = web.Application()
    chatmem.setup(twice, config)
    with pytest.raises(RuntimeError, match="already called on this app"):
        chatmem.setup(twice, config)
    started = web.Application()
    started.freeze()
    with pytest.raises(RuntimeError, match="must be called before the app starts"):
        chatmem.setup(started, config)
    # Once added, a sub-app's router is frozen: refused before anything of it changed
    # (it used to fail half-way, with aiohttp's "Cannot modify frozen list").
    added = web.Application()
    web.Application().add_subapp("/chat", added)
    with pytest.raises(RuntimeError, match=r"before app is added to another app \(add_subapp\)"):
        chatmem.setup(added, config)
    assert GATEWAY not in added and not added.cleanup_ctx

    async def mine(_request: web.Request) -> web.Response:
        return web.Response(text="the host's")

    first = web.Application()
    first.router.add_post("/v1/chat/completions", mine)
    # Its variable named otherwise, the same path all the same (item 139).
    first.router.add_get("/v1/conversations/{cid}", mine)
    chatmem.setup(first, config)
    warnings = [r.getMessage() for r in caplog.records if "chatmem.setup" in r.getMessage()]
    assert warnings == [
        f"chatmem.setup: the host app's route {path} was added first and answers instead"
        " of chatmem's"
        for path in ("/v1/chat/completions", "/v1/conversations/{cid}")
    ]


async def test_a_sub_app_with_its_own_setup_drains_with_its_own_grace(tmp_path: Path) -> None:
    """``setup`` on the host app and on a sub-app: at shutdown the sub-app's stream is
    waited for with the sub-app's grace, not cut at the host's (whose middleware also
    sees the sub-app's requests)."""
    import chatmem

    release = asyncio.Event()
    first, *rest = answer_events("Hello world")
    async with scripted_upstream(Script(chunks=[first, release, *rest])) as up:
        host = web.Application()
        chatmem.setup(
            host, make_config(tmp_path / "host.db", up.url, server={"shutdown_grace": 0.05})
        )
        sub = web.Application()
        chatmem.setup(sub, make_config(tmp_path / "sub.db", up.url, server={"shutdown_grace": 30}))
        host.add_subapp("/ai/", sub)
        server = TestServer(host)
        await server.start_server()
        async with (
            aiohttp.ClientSession() as client,
            client.post(
                server.make_url("/ai/v1/chat/completions"),
                json={"model": "m", "stream": True, "messages": [{"role": "user", "content": "q"}]},
                headers={"X-Conversation-Id": "c1"},
            ) as response,
        ):
            got = await response.content.readuntil(b"\n\n")
            closing = asyncio.ensure_future(server.close())
            await asyncio.sleep(0.3)  # six times the host's grace
            release.set()
            got += await response.content.read()
            await closing
    assert got == b"".join(answer_events("Hello world"))
    assert [m["role"] for m in Rows(tmp_path / "sub.db").messages("c1")] == ["user", "assistant"]


@pytest.mark.parametrize("host_first", [True, False], ids=["host first", "sub-app first"])
async def test_a_sub_app_with_its_own_setup_answers_preflights_with_its_own_origins(
    aiohttp_client: Any, upstream: TestServer, tmp_path: Path, host_first: bool
) -> None:
    """The host's CORS middleware also sees the sub-app's preflights: it leaves them to
    the sub-app's gateway, whose origins they are.  With the sub-app added before the
    host's ``setup``, the host took the sub-app's routes for its own (aiohttp lists them
    among the host's): it answered their preflights with its origins and counted their
    responses too (found by a review)."""
    import chatmem

    url = upstream_url(upstream)
    host = web.Application()
    host_config = make_config(
        tmp_path / "h.db", url, server={"cors_origins": ["https://a.example"]}
    )
    if host_first:
        chatmem.setup(host, host_config)
    sub = web.Application()

    async def own_page(_request: web.Request) -> web.Response:
        return web.Response(text="the host's, on the sub-app")

    sub.router.add_get("/page", own_page)
    chatmem.setup(
        sub, make_config(tmp_path / "s.db", url, server={"cors_origins": ["https://b.example"]})
    )
    host.add_subapp("/ai/", sub)
    if not host_first:
        chatmem.setup(host, host_config)
    client = await aiohttp_client(host)
    assert (await client.get("/ai/page")).status == 200
    for path, origin, status in (
        ("/ai/v1/chat/completions", "https://b.example", 204),
        ("/ai/v1/chat/completions", "https://a.example", 403),
        ("/v1/chat/completions", "https://a.example", 204),
    ):
        headers = {"Origin": origin, "Access-Control-Request-Method": "POST"}
        response = await client.options(path, headers=headers)
        assert (path, origin, response.status) == (path, origin, status)
        if status == 204:
            assert response.headers["Access-Control-Allow-Origin"] == origin
    # Each gateway counts its own responses, and the host none of the sub-app's (nor its
    # plain routes: the innermost gateway on the way counts them, as "other").
    counted = {}
    for prefix in ("", "/ai"):
        text = await (await client.get(f"{prefix}/metrics")).text()
        counted[prefix] = sorted(
            line for line in text.splitlines() if line.startswith("chatmem_requests_total{")
        )
    assert counted == {
        "": ['chatmem_requests_total{route="passthrough",status="204"} 1.0'],
        "/ai": [
            'chatmem_requests_total{route="other",status="200"} 1.0',
            'chatmem_requests_total{route="passthrough",status="204"} 1.0',
            'chatmem_requests_total{route="passthrough",status="403"} 1.0',
        ],
    }


async def test_a_host_server_writes_chatmem_access_lines_when_given_its_logger(
    aiohttp_client: Any, upstream: TestServer, db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Embedded, the access lines are the host server's to write (h52: with
    ``log.access`` on, chatmem wrote only its 499 lines there); the README's way to have
    chatmem's: its ``AccessLogger`` and logger, given to the host's runner."""
    import logging

    import chatmem

    caplog.set_level(logging.INFO, logger="chatmem.access")
    app = web.Application()
    chatmem.setup(app, make_config(db_path, upstream_url(upstream), log={"access": True}))
    server = TestServer(app)
    await server.start_server(
        access_log_class=chatmem.AccessLogger, access_log=logging.getLogger("chatmem.access")
    )
    client = await aiohttp_client(server)
    reply = await client.post(
        "/v1/chat/completions",
        json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
        headers={"X-Request-Id": "embedded-access-1"},
    )
    await reply.read()
    for _ in range(100):  # bounded: aiohttp logs once the response is written, 1 s at most
        lines = [r for r in caplog.records if r.name == "chatmem.access"]
        if lines:
            break
        await asyncio.sleep(0.01)
    [line] = lines
    assert (line.method, line.path, line.status, line.request_id) == (  # type: ignore[attr-defined]
        "POST",
        "/v1/chat/completions",
        200,
        "embedded-access-1",
    )


@pytest.mark.parametrize("chatmem_format", [True, False], ids=["chatmem's", "aiohttp's"])
async def test_a_host_server_logs_a_client_that_left_as_499(
    db_path: Path, caplog: pytest.LogCaptureFixture, chatmem_format: bool
) -> None:
    """A request whose client left before a plain answer came has its handler cancelled,
    and aiohttp writes no access line for that: embedded, with the host writing access
    lines (chatmem's ``AccessLogger``, or aiohttp's own) and ``log.access`` off, such a
    request left no line at all.  It is the host server's logger that writes the 499."""
    import logging

    import chatmem

    name = "chatmem.access" if chatmem_format else "aiohttp.access"
    caplog.set_level(logging.INFO, logger=name)
    hold = asyncio.Event()
    async with scripted_upstream(Script(chunks=[hold])) as up:
        app = web.Application()
        chatmem.setup(app, make_config(db_path, up.url))
        server = TestServer(app)
        logger: dict[str, Any] = {"access_log": logging.getLogger(name)}
        if chatmem_format:
            logger["access_log_class"] = chatmem.AccessLogger
        await server.start_server(**logger)
        try:
            body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
            _, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Request-Id: left-embedded"
                b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (len(body), body.encode())
            )
            await writer.drain()
            await asyncio.sleep(0.3)
            writer.close()  # the client leaves before the answer
            for _ in range(300):  # bounded: the gateway looks for gone clients every second
                lines = [r for r in caplog.records if r.name == name]
                if lines:
                    break
                await asyncio.sleep(0.01)
        finally:
            hold.set()
            await server.close()
    [line] = lines
    if chatmem_format:
        assert (line.status, line.request_id) == (499, "left-embedded")  # type: ignore[attr-defined]
    assert '"POST /v1/chat/completions HTTP/1.1" 499' in line.getMessage() or (
        chatmem_format and line.getMessage().startswith("POST /v1/chat/completions 499 ")
    )


async def test_a_body_a_host_middleware_read_and_did_not_keep_is_not_relayed_empty(
    aiohttp_client: Any, db_path: Path
) -> None:
    """aiohttp's ``request.post()`` reads a multipart body without keeping a copy: an
    upload behind a host middleware that called it went upstream with its headers and an
    empty body, and the upstream's answer came back as if nothing were wrong (found by a
    review).  It is a 500 that says why, and the upstream is not asked."""
    import chatmem

    @web.middleware
    async def reads_forms(request: web.Request, handler: Any) -> web.StreamResponse:
        await request.post()
        return await handler(request)

    async with scripted_upstream(Script(chunks=[b"{}"], framing="length")) as up:
        app = web.Application(middlewares=[reads_forms])
        chatmem.setup(app, make_config(db_path, up.url))
        client = await aiohttp_client(app)
        form = aiohttp.FormData()
        form.add_field("model", "whisper-1")
        form.add_field("file", b"RIFF....WAVE", filename="a.wav", content_type="audio/wav")
        response = await client.post("/v1/audio/transcriptions", data=form)
        error = (await response.json())["error"]
        assert up.requests == []
    assert response.status == 500
    assert error["message"].startswith("the request body was read before chatmem's handler")


async def test_a_sub_app_gateways_conversation_cookie_is_its_own(
    aiohttp_client: Any, upstream: TestServer, tmp_path: Path
) -> None:
    """With a gateway on the host and one on a sub-app, both set ``chatmem_session`` at
    ``Path=/``: a turn on one replaced the other's cookie, whose conversation the next
    turn there then lost (found by a review).  The sub-app's cookie has a name and a
    path of its own; the host's is as it always was."""
    import chatmem

    url = upstream_url(upstream)
    host = web.Application()
    sub = web.Application()
    chatmem.setup(sub, make_config(tmp_path / "s.db", url, compat={"session_secret": "s" * 32}))
    host.add_subapp("/ai/", sub)
    chatmem.setup(host, make_config(tmp_path / "h.db", url, compat={"session_secret": "h" * 32}))
    client = await aiohttp_client(host)  # its cookie jar keeps both, as curl's would

    async def turn(prefix: str) -> str:
        response = await client.post(f"{prefix}/conversation/m", json={"text": "hi"})
        await response.read()
        assert response.status == 200
        return response.headers["X-Conversation-Id"]

    first = await turn("")
    sub_first = await turn("/ai")
    assert await turn("") == first  # the host's conversation goes on
    assert await turn("/ai") == sub_first  # and so does the sub-app's
    cookies = {cookie.key: cookie["path"] for cookie in client.session.cookie_jar}
    assert cookies == {"chatmem_session": "/", "chatmem_session_ai": "/ai/"}
