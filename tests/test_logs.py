"""What a real ``chatmem serve`` writes to its log: JSON lines, request ids, the client's
address (believed from X-Forwarded-For only from a trusted proxy), and no secrets, tokens
or message content unless ``log.debug_content`` asks for content."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from deploy_helpers import json_lines, serve
from helpers import answer_events, make_config
from scripted_upstream import Script, scripted_upstream

from chatmem import create_app, shutdown
from chatmem.logs import AccessLogger, log_access

JWT_SECRET = "jwt-secret-9f2c-long-enough-for-hs256-0123"
UPSTREAM_KEY = "sk-upstream-key-77aa"
CONTENT = "private words 5e1d"
ANSWER_WORD = "5e1d"  # the demo model echoes the message back
QUERY_SECRET = "query-secret-1b3c"


def _requests(base: str) -> str:
    token = jwt.encode({"team_id": "acme", "sub": "ada"}, JWT_SECRET, algorithm="HS256")
    headers = {
        "Authorization": f"Bearer {token}",
        "Content-Type": "application/json",
        "X-Forwarded-For": "203.0.113.7",
        "X-Request-Id": "log-test-1",
    }
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": CONTENT}]}
    chat = urllib.request.Request(
        base + "/v1/chat/completions", data=json.dumps(body).encode(), headers=headers
    )
    with urllib.request.urlopen(chat, timeout=20) as response:
        assert response.read().endswith(b"data: [DONE]\n\n")
    models = urllib.request.Request(base + f"/v1/models?key={QUERY_SECRET}", headers=headers)
    with urllib.request.urlopen(models, timeout=20) as response:
        assert response.status == 200
    # A header past aiohttp's 8190-byte limit, the token at its start: a 400 from the parser,
    # whose error quotes the first 100 bytes of the line.
    with socket.create_connection((urlsplit(base).hostname, urlsplit(base).port)) as raw:
        raw.sendall(
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + token.encode()
            + b"x" * 9000
            + b"\r\n\r\n"
        )
        assert raw.recv(100).startswith(b"HTTP/1.0 400 ")
    # A body "in gzip" that is not, to a route that reads no body: aiohttp meets it while
    # it reads on after the answer, and logged an ERROR with a traceback (h57).
    with socket.create_connection((urlsplit(base).hostname, urlsplit(base).port)) as raw:
        raw.sendall(
            b"GET /v1/health HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\n"
            b'Content-Length: 7\r\nConnection: close\r\n\r\n{"a":1}'
        )
        assert raw.recv(100).startswith(b"HTTP/1.1 200 ")
    return token


def _run(tmp_path: Path, log: str, server: str = "") -> tuple[str, str]:
    toml = f'[auth]\njwt_secret = "{JWT_SECRET}"\n\n[log]\nformat = "json"\naccess = true\n{log}\n'
    toml += f"\n[server]\n{server}\n"
    gateway = serve(
        tmp_path,
        "http://unused.invalid/v1",  # --demo replaces it with the built-in mock model
        toml,
        "--demo",
        upstream_toml=f'api_key = "{UPSTREAM_KEY}"\n',
    )
    try:
        token = _requests(gateway.url)
    finally:
        code, stderr = gateway.stop(signal.SIGTERM)
    assert code == 0, stderr
    return stderr, token


def _access(lines: list[dict[str, Any]], path: str) -> dict[str, Any]:
    [line] = [x for x in lines if x["logger"] == "chatmem.access" and x["path"] == path]
    return line


def test_logs_hold_no_secrets_tokens_or_content(tmp_path: Path) -> None:
    stderr, token = _run(tmp_path, 'level = "debug"')
    lines = json_lines(stderr)  # every line is one JSON object
    for secret in (JWT_SECRET, UPSTREAM_KEY, token, CONTENT, ANSWER_WORD, QUERY_SECRET):
        assert secret not in stderr
    chat = _access(lines, "/v1/chat/completions")
    assert chat["status"] == 200 and chat["method"] == "POST"
    assert chat["request_id"] == "log-test-1"
    assert chat["client"] == "127.0.0.1"  # X-Forwarded-For from an untrusted peer: ignored
    assert _access(lines, "/v1/models")["request_id"] == "log-test-1"
    # Timed finer than aiohttp's own time, which is whole milliseconds under uvloop (h48:
    # a quick request logged 0.0); at 1 us, three durations all whole are 1 in 10^9.
    durations = [x["duration_ms"] for x in lines if x["logger"] == "chatmem.access"]
    assert any(d != int(d) for d in durations), durations
    malformed = [x for x in lines if x["logger"] == "aiohttp.server"]
    assert [x["level"] for x in malformed] == ["warning", "warning"], malformed
    assert "Traceback" not in stderr
    assert malformed[0]["message"].endswith("malformed request (LineTooLong)")
    assert malformed[1]["message"].endswith("malformed request (ContentEncodingError)")
    assert token[:20] not in stderr


def test_debug_content_logs_content_but_still_no_secrets(tmp_path: Path) -> None:
    stderr, token = _run(
        tmp_path,
        'level = "debug"\ndebug_content = true',
        'trusted_proxies = ["127.0.0.1/32"]',
    )
    lines = json_lines(stderr)
    for secret in (JWT_SECRET, UPSTREAM_KEY, token, QUERY_SECRET):
        assert secret not in stderr
    content = [x for x in lines if x["logger"] == "chatmem.content"]
    assert [x["request_id"] for x in content] == ["log-test-1", "log-test-1"]
    assert CONTENT in content[0]["message"] and ANSWER_WORD in content[1]["message"]
    # The peer is a trusted proxy now, so the address it forwarded for is the client.
    assert _access(lines, "/v1/chat/completions")["client"] == "203.0.113.7"


def _leave_early(port: int, request_id: str, stream: bool) -> None:
    """Ask for a slow answer (the demo model's X-Mock-* headers) and hang up mid-way."""
    body = json.dumps(
        {"model": "m", "stream": stream, "messages": [{"role": "user", "content": "a b c"}]}
    ).encode()
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"X-Request-Id: {request_id}\r\nX-Mock-Tokens: 40\r\nX-Mock-Delay-Ms: 50\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
        raw.sendall(head.encode() + body)
        if stream:
            assert raw.recv(65536).startswith(b"HTTP/1.1 200 ")  # the answer has started
        else:
            raw.settimeout(0.3)
            with contextlib.suppress(TimeoutError):
                raw.recv(65536)  # the answer takes about 2 s: nothing comes in time


def test_access_lines_whatever_the_log_level(tmp_path: Path) -> None:
    """Access lines are at INFO; `log.access = true` asked for them, and `log.level =
    "warning"` (found by a probe) used to drop every one."""
    gateway = serve(
        tmp_path,
        "http://unused.invalid/v1",
        '[log]\nformat = "json"\naccess = true\nlevel = "warning"\n',
        "--demo",
    )
    try:
        asked = urllib.request.Request(
            gateway.url + "/v1/health", headers={"X-Request-Id": "at-warning-level"}
        )
        with urllib.request.urlopen(asked, timeout=20) as response:
            assert response.status == 200
        assert gateway.process.proc.stdout is not None
        ready = json.loads(gateway.process.proc.stdout.readline())  # stdout is JSON too
    finally:
        code, stderr = gateway.stop(signal.SIGTERM)
    assert code == 0, stderr
    assert ready["message"].startswith(f"chatmem listening on http://127.0.0.1:{gateway.port}/v1")
    assert (ready["level"], ready["logger"]) == ("info", "chatmem")
    lines = json_lines(stderr)
    access = [x for x in lines if x["logger"] == "chatmem.access"]
    assert "at-warning-level" in [x["request_id"] for x in access]
    # The level still holds for the rest: no INFO line but the access line.
    assert all(x["level"] != "INFO" for x in lines if x["logger"] != "chatmem.access")


def test_a_client_that_leaves_gets_an_access_line(tmp_path: Path) -> None:
    """aiohttp writes no access line for a request whose handler was cancelled: the
    requests whose clients left, streamed or not, are logged with status 499."""
    gateway = serve(
        tmp_path, "http://unused.invalid/v1", '[log]\nformat = "json"\naccess = true\n', "--demo"
    )
    try:
        _leave_early(gateway.port, "left-mid-stream", stream=True)
        _leave_early(gateway.port, "left-before-the-answer", stream=False)
        with urllib.request.urlopen(gateway.url + "/v1/health", timeout=20) as response:
            assert response.status == 200
    finally:
        code, stderr = gateway.stop(signal.SIGTERM)
    assert code == 0, stderr
    access = {
        line["request_id"]: line
        for line in json_lines(stderr)
        if line["logger"] == "chatmem.access"
    }
    for request_id in ("left-mid-stream", "left-before-the-answer"):
        line = access[request_id]
        assert (line["status"], line["path"], line["client"]) == (
            499,
            "/v1/chat/completions",
            "127.0.0.1",
        )
        assert line["message"].startswith("POST /v1/chat/completions 499 ")
        assert line["message"].endswith("ms 127.0.0.1")  # the text line names the client too


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
async def test_a_client_found_gone_by_a_write_is_logged_499(
    path: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The client hangs up mid-stream and the gateway learns it from its next write, not
    by the handler's cancellation (which one comes first is timing: a probe saw 1-3 % of
    such lines say 200).  The handler then ends as usual, and its line says 499 too."""
    monkeypatch.setattr(shutdown, "_CLIENT_CHECK", 3600.0)  # no cancellation by the gateway
    caplog.set_level(logging.INFO, logger="chatmem.access")  # before aiohttp looks (once)
    events = answer_events()
    release = asyncio.Event()
    trickle: list[bytes | float | asyncio.Event] = [events[1], 0.05] * 100  # 5 s at most
    script = Script(chunks=[events[0], release, *trickle], end="hang")
    async with scripted_upstream(script) as up:
        runner = web.AppRunner(
            create_app(make_config(tmp_path / "x.db", up.url)),
            access_log_class=AccessLogger,
            access_log=logging.getLogger("chatmem.access"),
            handler_cancellation=False,  # nor by aiohttp (aiohttp's TestServer forces it)
        )
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = runner.addresses[0][1]
        body = b'{"model": "m", "stream": true, "messages": [{"role": "user", "content": "x"}]}'
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nX-Request-Id: left-{path[4:8]}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        received = b""
        while events[0] not in received:  # bounded: each read waits 10 s at most
            piece = await asyncio.wait_for(reader.read(65536), 10)
            assert piece, received
            received += piece
        writer.close()
        await writer.wait_closed()
        release.set()
        await asyncio.wait_for(up.disconnected.wait(), 10)
        for _ in range(100):  # the line comes once the handler has ended
            lines = [r for r in caplog.records if r.name == "chatmem.access"]
            if lines:
                break
            await asyncio.sleep(0.05)
        await runner.cleanup()
    assert [(r.getMessage().split()[:3], r.request_id) for r in lines] == [
        (["POST", path, "499"], f"left-{path[4:8]}")
    ]


def test_an_access_line_is_one_line_whatever_the_path(caplog: pytest.LogCaptureFixture) -> None:
    """The path as sent, percent-encoded: decoded, ``/v1/x%0aFORGED`` wrote a line of the
    client's own into a text log (and ``%00`` a NUL byte), before any authentication."""
    request = make_mocked_request("GET", "/v1/x%0aFORGED%00?key=secret")
    logger = logging.getLogger("chatmem.access")
    with caplog.at_level(logging.INFO, logger="chatmem.access"):
        log_access(logger, request, 404, 0.001, "r1")
    (record,) = caplog.records
    assert record.getMessage().startswith("GET /v1/x%0AFORGED%00 404 1.0ms")
    assert record.path == "/v1/x%0AFORGED%00"  # type: ignore[attr-defined]
