"""Bad input gets an OpenAI-style error with the right status, and nothing is stored."""

from __future__ import annotations

import sqlite3
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from helpers import GatewayFactory, Rows, received, upstream_url
from sqlalchemy.exc import DBAPIError

from chatmem.errors import FailureLog
from chatmem.proxy.pool import UpstreamBroken


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b"\xff\xfe", None),
        (b"[1, 2]", None),
        (b'{"model": "m"}', "messages"),
        (b'{"model": "m", "messages": "hi"}', "messages"),
        (b'{"model": "m", "messages": [42]}', "messages[0]"),
        (b'{"model": "m", "messages": [{"content": "x"}]}', "messages[0].role"),
        (b'{"model": "m", "messages": [{"role": "wizard", "content": "x"}]}', "messages[0].role"),
        (b'{"model": "m", "messages": [{"role": "user", "content": 5}]}', "messages[0].content"),
        (b'{"model": "m", "messages": [], "stream": "yes"}', "stream"),
        (b'{"model": "m", "messages": [], "conversation": 7}', "conversation"),
        (b'{"model": "m", "messages": [], "conversation": {"id": ""}}', "conversation.id"),
    ],
)
async def test_bad_chat_bodies_are_400(
    gateway: TestClient[Any, Any], upstream: TestServer, rows: Rows, body: bytes, param: str | None
) -> None:
    resp = await gateway.post(
        "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
    )
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert "Traceback" not in error["message"]
    assert received(upstream) == []
    assert rows.messages() == []


async def test_chat_body_over_limit_is_413(
    gateway_factory: GatewayFactory, upstream: TestServer, rows: Rows
) -> None:
    client = await gateway_factory(upstream_url(upstream), server={"max_body_bytes": 200})
    big = {"model": "m", "messages": [{"role": "user", "content": "x" * 300}]}
    resp = await client.post("/v1/chat/completions", json=big)
    assert resp.status == 413
    assert (await resp.json())["error"]["type"] == "invalid_request_error"

    async def trickle() -> Any:
        for _ in range(4):
            yield b"x" * 100

    resp = await client.post("/v1/chat/completions", data=trickle())
    assert resp.status == 413
    assert received(upstream) == []
    assert rows.messages() == []


async def test_unknown_route_is_json_404(gateway: TestClient[Any, Any]) -> None:
    resp = await gateway.get("/nothing-here")
    assert resp.status == 404
    assert (await resp.json())["error"]["type"] == "invalid_request_error"


async def test_health(gateway: TestClient[Any, Any]) -> None:
    for path in ("/v1/health", "/api/v1/health"):
        resp = await gateway.get(path)
        assert resp.status == 200
        assert await resp.json() == {"status": "ok"}


def test_failures_are_logged_once_per_code_and_interval(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [100.0]
    monkeypatch.setattr("chatmem.errors.time.monotonic", lambda: now[0])
    log = FailureLog(every=10.0)
    cause = ValueError("INSERT ... parameters: ('private words',)")
    for _ in range(5):
        log.note("storage_unavailable", "the conversation store is unavailable", cause)
    log.note("upstream_timeout", "the upstream did not answer in time")
    now[0] += 11
    log.note("storage_unavailable", "the conversation store is unavailable", cause)
    assert [r.getMessage() for r in caplog.records] == [
        "storage_unavailable: the conversation store is unavailable (ValueError)",
        "upstream_timeout: the upstream did not answer in time",
        "storage_unavailable: the conversation store is unavailable (ValueError);"
        " 4 more since the last report",
    ]
    assert "private words" not in caplog.text


def test_a_database_failure_is_logged_with_sqlites_own_words(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A full disk says so in the log (the client gets the usual 503): SQLite's messages
    name no data.  Through SQLAlchemy the driver's error is the one described, never the
    wrapper's text, which quotes the statement's values."""
    full = sqlite3.OperationalError("database or disk is full")
    wrapped = DBAPIError("INSERT ...", ("private words",), full)
    log = FailureLog(every=0.0)
    for cause in (full, wrapped):
        log.note("storage_unavailable", "the conversation store is unavailable", cause)
    assert [r.getMessage() for r in caplog.records] == [
        "storage_unavailable: the conversation store is unavailable"
        " (OperationalError: database or disk is full)"
    ] * 2
    assert "private words" not in caplog.text


def test_an_upstream_failure_is_logged_with_the_class_under_chatmems_own(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The pool's ``UpstreamBroken`` says no more than the message the client got; the
    error it was raised from does (h69: "(UpstreamBroken)" for a refused connection)."""
    refused = ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 9)")
    try:
        raise UpstreamBroken("cannot connect to the upstream") from refused
    except UpstreamBroken as exc:
        broken = exc
    closed = UpstreamBroken("the upstream closed the connection")  # nothing under it
    log = FailureLog(every=0.0)
    for cause in (broken, closed):
        log.note("upstream_unavailable", "the upstream is unreachable", cause)
    assert [r.getMessage() for r in caplog.records] == [
        "upstream_unavailable: the upstream is unreachable (ConnectionRefusedError)",
        "upstream_unavailable: the upstream is unreachable (UpstreamBroken)",
    ]
    assert "127.0.0.1" not in caplog.text
