"""Failure semantics: a clear error for the client, and no half turn in the database."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import logging
import socket
import sqlite3
import struct
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    GatewayFactory,
    Rows,
    answer_events,
    chunk,
    make_config,
    received,
    sse,
    upstream_url,
)
from scripted_upstream import Script, scripted_upstream
from test_workers import sample

from chatmem.app import create_app
from chatmem.proxy.sse import SSEParser
from chatmem.state import GATEWAY
from chatmem.storage import Owner

STREAM = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
PLAIN = {**STREAM, "stream": False}
FAST_TIMEOUTS = {"connect_timeout": 2, "read_timeout": 0.3}


def error_events(body: bytes) -> list[dict[str, Any]]:
    events = [e for e in body.split(b"\n\n") if e.startswith(b'data: {"error"')]
    return [json.loads(e[6:])["error"] for e in events]


async def hello_world_is_committed(rows: Rows) -> None:
    """Wait (bounded: up to 5 s) for a detached answer to finish; check what it stored."""
    for _ in range(100):
        if rows.messages():
            break
        await asyncio.sleep(0.05)
    assert [m["role"] for m in rows.messages("f1")] == ["user", "assistant"]
    assert json.loads(rows.messages("f1")[1]["content"]) == "Hello world"


async def post(client: Any, body: dict[str, Any], conv: str = "f1") -> Any:
    return await client.post("/v1/chat/completions", json=body, headers={"X-Conversation-Id": conv})


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_unreachable_upstream_is_502(gateway_factory: GatewayFactory, rows: Rows) -> None:
    client = await gateway_factory(f"http://127.0.0.1:{closed_port()}/v1")
    for body in (PLAIN, STREAM):
        resp = await post(client, body)
        assert resp.status == 502
        error = (await resp.json())["error"]
        assert error["type"] == "upstream_error" and error["code"] == "upstream_unavailable"
        assert resp.headers["X-Conversation-Id"] == "f1"
    passthrough = await client.get("/v1/models")
    assert passthrough.status == 502
    assert rows.messages() == []


_NOT_HTTP = (
    "the upstream's answer is not valid HTTP/1.1, or its head is larger than the gateway"
    " takes ({}, 1024 header lines)"
)


@pytest.mark.parametrize(
    ("fault", "status", "chat_says", "passthrough_says"),
    [
        ("reset", 502, "the upstream is unreachable or broke the connection", None),
        ("garbage", 502, _NOT_HTTP.format("65536 bytes in all"), "65536 bytes a line"),
        ("hang", 504, "the upstream did not answer in time", None),
    ],
)
async def test_fault_before_headers(
    gateway_factory: GatewayFactory,
    rows: Rows,
    fault: Any,
    status: int,
    chat_says: str,
    passthrough_says: str | None,
) -> None:
    """The client is told what went wrong: an answer that is not HTTP is not a broken
    connection (the passthrough's limits are those of a line, the chat route's of the
    whole head)."""
    async with scripted_upstream(Script(before_headers=fault)) as up:
        client = await gateway_factory(up.url, upstream=FAST_TIMEOUTS)
        for body in (PLAIN, STREAM):
            resp = await post(client, body)
            assert resp.status == status
            assert (await resp.json())["error"]["message"] == chat_says
        passthrough = await client.get("/v1/models")
        assert passthrough.status == status
        said = _NOT_HTTP.format(passthrough_says) if passthrough_says else chat_says
        assert (await passthrough.json())["error"]["message"] == said
    assert rows.messages() == []


@pytest.mark.parametrize(
    ("status", "content_type", "body"),
    [
        (400, "application/json", b'{"error": {"message": "bad model", "type": "x"}}'),
        (401, "application/json", b'{"error": "nope"}'),
        (429, "text/plain", b"slow down"),
        (500, "text/html", b"<h1>oops</h1>"),
        (503, "application/json", b""),
    ],
)
async def test_upstream_error_status_passes_through(
    gateway_factory: GatewayFactory, rows: Rows, status: int, content_type: str, body: bytes
) -> None:
    script = Script(
        status=status, headers={"Content-Type": content_type}, chunks=[body], framing="length"
    )
    async with scripted_upstream(script) as up:
        client = await gateway_factory(up.url)
        for request in (PLAIN, STREAM):
            resp = await post(client, request)
            assert resp.status == status
            assert await resp.read() == body
            assert resp.headers["Content-Type"].startswith(content_type)
            assert resp.headers["X-Conversation-Id"] == "f1"
    assert rows.messages() == []


@pytest.mark.parametrize("status", [201, 203])
async def test_a_completed_answer_of_another_2xx_is_remembered(
    gateway_factory: GatewayFactory, rows: Rows, status: int
) -> None:
    """203 (a proxy on the way transformed the answer) or 201: a chat completion all the
    same, relayed with its status and remembered like a 200's."""
    choice = {"index": 0, "message": {"role": "assistant", "content": "J"}, "finish_reason": "stop"}
    plain = json.dumps({"choices": [choice]}).encode()
    for request, script in (
        (
            PLAIN,
            Script(
                status=status,
                headers={"Content-Type": "application/json"},
                chunks=[plain],
                framing="length",
            ),
        ),
        (STREAM, Script(status=status, chunks=answer_events("K"))),
    ):
        async with scripted_upstream(script) as up:
            client = await gateway_factory(up.url)
            resp = await post(client, request)
            assert resp.status == status
            assert await resp.read() == b"".join(c for c in script.chunks if isinstance(c, bytes))
    assert [(m["role"], json.loads(m["content"])) for m in rows.messages("f1")] == [
        ("user", "hi"),
        ("assistant", "J"),
        ("user", "hi"),
        ("assistant", "K"),
    ]


@pytest.mark.parametrize("status", [202, 204])
async def test_a_2xx_that_is_no_answer_is_relayed_and_forgotten(
    gateway_factory: GatewayFactory, rows: Rows, status: int
) -> None:
    body = b"" if status == 204 else b'{"id": "job-1", "status": "queued"}'
    script = Script(
        status=status, headers={"Content-Type": "application/json"}, chunks=[body], framing="length"
    )
    async with scripted_upstream(script) as up:
        client = await gateway_factory(up.url)
        resp = await post(client, PLAIN)
        assert resp.status == status and await resp.read() == body
        assert resp.headers["X-Conversation-Id"] == "f1"
    assert rows.messages() == []


def cut_inside_event() -> list[bytes | float]:
    events = answer_events()
    return [events[0], events[1], events[2][:17]]


def long_event(pad: int = 5000) -> bytes:
    """A whole chunk event of more than 4 KiB (a server that sends much in one event)."""
    return sse(chunk("x" * pad))


def cut_after_a_long_event() -> list[bytes | float]:
    # Its blank line split across two reads, the second holding the start of the next
    # event: the gateway must still see that the next one is unfinished.
    events = answer_events()
    long = long_event()
    return [events[0], long[:-1], 0.05, long[-1:] + events[1][:8]]


def cut_inside_a_long_event() -> list[bytes | float]:
    events = answer_events()
    return [events[0], long_event()[:4500], 0.05, long_event()[4500:4800]]


@pytest.mark.parametrize(
    ("chunks", "end", "code"),
    [
        (answer_events()[:2], "reset", "upstream_broken"),
        (cut_inside_event(), "reset", "upstream_broken"),
        (cut_after_a_long_event(), "reset", "upstream_broken"),
        (cut_inside_a_long_event(), "reset", "upstream_broken"),
        (answer_events()[:3], "ok", "upstream_incomplete"),  # no [DONE], no finish_reason
        ([*answer_events()[:3], sse("[DONE]")], "ok", "upstream_incomplete"),  # no finish
        (answer_events()[:2], "hang", "upstream_timeout"),
        ([b"\x00\xffgarbage\n\n\x9c"], "ok", "upstream_incomplete"),
    ],
    ids=[
        "reset-mid-stream",
        "reset-mid-event",
        "reset-after-a-long-event",
        "reset-inside-a-long-event",
        "no-done",
        "no-finish-reason",
        "silence",
        "garbage",
    ],
)
async def test_stream_failure_ends_with_error_event(
    gateway_factory: GatewayFactory, rows: Rows, chunks: list[bytes | float], end: Any, code: str
) -> None:
    async with scripted_upstream(Script(chunks=chunks, end=end)) as up:
        client = await gateway_factory(up.url, upstream=FAST_TIMEOUTS)
        resp = await post(client, STREAM)
        assert resp.status == 200
        body = await resp.read()
    upstream_bytes = b"".join(c for c in chunks if isinstance(c, bytes))
    errors = error_events(body)
    assert len(errors) == 1 and errors[0]["code"] == code
    # Every whole upstream event reached the client, plus one error event on an event
    # boundary (before [DONE] if there was one, so that a client reading up to [DONE]
    # sees it); an event the upstream left unfinished did not.
    start = body.index(b'data: {"error"')
    end = body.index(b"\n\n", start) + 2
    before, after = body[:start], body[end:]
    assert before.endswith(b"\n\n")
    assert after in (sse("[DONE]"), b"")
    assert upstream_bytes.startswith(before + after)
    assert SSEParser().feed(upstream_bytes[len(before + after) :]) == []
    assert rows.messages() == []


@pytest.mark.parametrize(
    ("chunks", "says"),
    [
        (answer_events()[:3], "ended before the answer completed"),  # nor finish_reason
        ([*answer_events()[:3], sse("[DONE]")], "without a finish_reason"),
        ([*answer_events()[:2], b"data: {not json\n\n", *answer_events()[2:]], "not a JSON object"),
        ([*answer_events()[:2], sse([1, 2]), *answer_events()[2:]], "not a JSON object"),
    ],
    ids=["no-done", "no-finish-reason", "broken-json", "json-array"],
)
async def test_stream_failure_says_what_went_wrong(
    gateway_factory: GatewayFactory, rows: Rows, chunks: list[bytes | float], says: str
) -> None:
    async with scripted_upstream(Script(chunks=chunks)) as up:
        client = await gateway_factory(up.url)
        body = await (await post(client, STREAM)).read()
    (error,) = error_events(body)
    assert says in error["message"], error
    assert error["code"] == "upstream_incomplete"
    assert rows.messages() == []


async def test_error_object_inside_stream(gateway_factory: GatewayFactory, rows: Rows) -> None:
    events = [
        *answer_events()[:2],
        sse({"error": {"message": "model crashed", "code": 500}}),
        sse("[DONE]"),
    ]
    async with scripted_upstream(Script(chunks=events)) as up:
        client = await gateway_factory(up.url)
        body = await (await post(client, STREAM)).read()
    assert body == b"".join(events)  # the upstream's own error, and no second one
    assert rows.messages() == []


async def test_error_object_then_the_end_of_the_body(
    gateway_factory: GatewayFactory, rows: Rows
) -> None:
    """The upstream's error event is the last thing it sends: no [DONE], and no second
    error event from the gateway (the reads before the end are parsed when it ends)."""
    events = [*answer_events()[:2], sse({"error": {"message": "model crashed", "code": 500}})]
    async with scripted_upstream(Script(chunks=events)) as up:
        client = await gateway_factory(up.url)
        body = await (await post(client, STREAM)).read()
    assert body == b"".join(events)
    assert rows.messages() == []


async def test_non_stream_invalid_body_is_502(gateway_factory: GatewayFactory, rows: Rows) -> None:
    for payload in (b"not json", b'{"choices": []}', b'{"choices": [{"message": {}}]}'):
        script = Script(
            headers={"Content-Type": "application/json"}, chunks=[payload], framing="length"
        )
        async with scripted_upstream(script) as up:
            client = await gateway_factory(up.url)
            resp = await post(client, PLAIN)
            assert resp.status == 502, payload
            assert (await resp.json())["error"]["type"] == "upstream_error"
    assert rows.messages() == []


async def test_non_stream_silence_mid_body_is_504(
    gateway_factory: GatewayFactory, rows: Rows
) -> None:
    script = Script(
        headers={"Content-Type": "application/json", "Content-Length": "500"},
        chunks=[b'{"id": "x", '],
        framing="length",
        end="hang",
    )
    async with scripted_upstream(script) as up:
        client = await gateway_factory(up.url, upstream=FAST_TIMEOUTS)
        resp = await post(client, PLAIN)
        assert resp.status == 504
    assert rows.messages() == []


async def test_failed_turn_leaves_history_exact(
    gateway_factory: GatewayFactory, upstream: Any
) -> None:
    """A failed turn in between: the next turn's history is exactly the completed turns."""
    good = await gateway_factory(upstream_url(upstream))
    await post(good, {**PLAIN, "messages": [{"role": "user", "content": "first"}]})
    async with scripted_upstream(Script(chunks=answer_events()[:2], end="reset")) as up:
        broken_gateway = await gateway_factory(up.url)
        await (await post(broken_gateway, STREAM)).read()
    await post(good, {**PLAIN, "messages": [{"role": "user", "content": "third"}]})
    sent = received(upstream)[-1].json["messages"]
    assert [m["content"] for m in sent if m["role"] == "user"] == ["first", "third"]
    assert len(sent) == 3


@pytest.mark.parametrize("body", [STREAM, PLAIN])
async def test_a_redirect_is_a_502_and_its_location_stays_behind(
    gateway_factory: GatewayFactory, rows: Rows, body: dict[str, Any]
) -> None:
    moved = {"Location": "http://10.0.0.1:8000/v1/chat/completions", "Content-Length": "0"}
    async with scripted_upstream(Script(status=307, headers=moved, framing="length")) as up:
        client = await gateway_factory(up.url)
        resp = await post(client, body)
        assert resp.status == 502
        assert "Location" not in resp.headers
        error = (await resp.json())["error"]
        assert "redirect (307)" in error["message"] and "10.0.0.1" not in error["message"]
    assert rows.messages() == []


@pytest.mark.parametrize("body", [STREAM, PLAIN])
async def test_an_answer_encoded_although_identity_was_asked_is_a_502(
    gateway_factory: GatewayFactory, rows: Rows, body: dict[str, Any]
) -> None:
    headers = {"Content-Type": "text/event-stream", "Content-Encoding": "gzip"}
    script = Script(headers=headers, chunks=[gzip.compress(b"".join(answer_events()))])
    async with scripted_upstream(script) as up:
        client = await gateway_factory(up.url)
        resp = await post(client, body)
        assert resp.status == 502
        assert "Content-Encoding 'gzip'" in (await resp.json())["error"]["message"]
        assert up.requests[0][2]["Accept-Encoding"] == "identity"
    assert rows.messages() == []


async def test_client_disconnect_closes_upstream(
    gateway_factory: GatewayFactory, rows: Rows
) -> None:
    script = Script(chunks=answer_events()[:2], end="hang")
    async with scripted_upstream(script) as up:
        client = await gateway_factory(up.url)
        resp = await post(client, STREAM)
        await resp.content.readuntil(b"\n\n")
        resp.close()  # the client goes away while the upstream is silent
        await asyncio.wait_for(up.disconnected.wait(), 1.0)
    assert rows.messages() == []


async def test_client_disconnect_with_finish_commits(
    gateway_factory: GatewayFactory, rows: Rows
) -> None:
    events = answer_events()
    script = Script(chunks=[events[0], 0.3, *events[1:]])
    async with scripted_upstream(script) as up:
        client = await gateway_factory(up.url, memory={"on_client_disconnect": "finish"})
        resp = await post(client, STREAM)
        await resp.content.readuntil(b"\n\n")
        resp.close()
        await hello_world_is_committed(rows)


async def test_with_finish_a_turn_sent_while_the_left_ones_answer_runs_is_concurrent_with_it(
    gateway_factory: GatewayFactory, rows: Rows
) -> None:
    """With "finish", the turn of a client that left stays in flight until its answer
    ends.  A turn the client sends on the same conversation meanwhile runs next to it, as
    concurrent turns do: it does not see the unfinished turn, and the two are stored
    whole, each next to its answer, in the order they complete (README, "How turns stay
    in order")."""
    events = answer_events("first answer")
    gate = asyncio.Event()
    first = {**STREAM, "messages": [{"role": "user", "content": "first"}]}
    second = {**STREAM, "messages": [{"role": "user", "content": "second"}]}
    async with scripted_upstream(Script(chunks=[events[0], gate, *events[1:]])) as up:
        client = await gateway_factory(up.url, memory={"on_client_disconnect": "finish"})
        resp = await post(client, first)
        await resp.content.readuntil(b"\n\n")
        resp.close()  # the client leaves; its answer is still being read
        up.script = Script(chunks=answer_events("second answer"))
        resp = await post(client, second)
        assert (await resp.read()).endswith(b"data: [DONE]\n\n")
        assert [m["content"] for m in json.loads(up.requests[1][3])["messages"]] == ["second"]
        gate.set()  # the first answer ends
        for _ in range(100):  # bounded: up to 5 s for the detached turn to commit
            if len(rows.messages("f1")) == 4:
                break
            await asyncio.sleep(0.05)
    stored = [(m["role"], json.loads(m["content"])) for m in rows.messages("f1")]
    assert stored == [
        ("user", "second"),
        ("assistant", "second answer"),
        ("user", "first"),
        ("assistant", "first answer"),
    ]


async def test_with_finish_a_client_gone_before_the_upstream_answers_still_gets_its_turn(
    aiohttp_client: Any, db_path: Path, rows: Rows
) -> None:
    """The client leaves while the upstream has not even sent its headers: with "finish"
    the answer is still read to its end and committed (the response to the client, which
    cannot be started any more, is skipped)."""
    head = asyncio.Event()
    async with scripted_upstream(Script(chunks=answer_events(), release_head=head)) as up:
        config = make_config(db_path, up.url, memory={"on_client_disconnect": "finish"})
        app = create_app(config)
        client = await aiohttp_client(app, server_kwargs={"handler_cancellation": True})
        request = asyncio.create_task(post(client, STREAM))
        for _ in range(100):  # bounded: up to 5 s for the request to reach the upstream
            if up.requests:
                break
            await asyncio.sleep(0.05)
        request.cancel()  # the client leaves: its connection is closed
        with contextlib.suppress(asyncio.CancelledError):
            await request
        for _ in range(100):  # bounded: up to 5 s for aiohttp to cancel the handler
            if not app[GATEWAY].live.tasks:
                break
            await asyncio.sleep(0.05)
        assert not app[GATEWAY].live.tasks
        head.set()
        await hello_world_is_committed(rows)


async def test_with_finish_a_client_that_leaves_at_once_still_gets_its_turn(
    aiohttp_client: Any, db_path: Path, storage_url: str
) -> None:
    """A client that sends its whole request and closes at once (fire and forget, or
    ``nc -N``): the handler is cancelled at its first wait.  On PostgreSQL that was the
    history's read, before "finish" took over, so the turn never went upstream (found by
    a review: 9 of 10), where on SQLite, whose read does not wait, it was committed."""
    async with scripted_upstream(Script(chunks=answer_events())) as up:
        finish = {"on_client_disconnect": "finish"}
        app = create_app(make_config(db_path, up.url, memory=finish, storage={"url": storage_url}))
        client = await aiohttp_client(app, server_kwargs={"handler_cancellation": True})
        body = json.dumps(STREAM).encode()
        _, writer = await asyncio.open_connection("127.0.0.1", client.port)
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Conversation-Id: gone"
            b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body)
        )
        writer.close()  # the whole request, then gone
        store = app[GATEWAY].store
        for _ in range(100):  # bounded: up to 5 s for the turn to be committed
            history = await store.load_history(Owner("default"), "gone", 10)
            if len(history.messages) == 2:
                break
            await asyncio.sleep(0.05)
    assert len(up.requests) == 1
    assert len(history.messages) == 2


async def test_a_client_leaving_during_the_commit_does_not_stop_it(
    aiohttp_client: Any, db_path: Path, rows: Rows
) -> None:
    """As ``chatmem serve`` runs, with aiohttp cancelling the handler of a client that
    left: the answer is complete and its commit waits for SQLite's write lock when the
    client goes.  The handler ends; the turn is still committed, once, and counted."""
    events = answer_events()
    async with scripted_upstream(Script(chunks=[b"".join(events)])) as up:
        app = create_app(make_config(db_path, up.url))
        client = await aiohttp_client(app, server_kwargs={"handler_cancellation": True})
        live = app[GATEWAY].live
        other = sqlite3.connect(db_path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            resp = await post(client, STREAM)
            await resp.content.readexactly(len(b"".join(events[:-1])))  # all but [DONE]
            resp.close()
            for _ in range(100):  # bounded: up to 5 s for aiohttp to cancel the handler
                if not live.tasks:
                    break
                await asyncio.sleep(0.05)
            assert not live.tasks
            assert rows.messages() == []  # the commit still waits for the lock
        finally:
            other.execute("COMMIT")
            other.close()
        for _ in range(100):  # bounded: up to 5 s for the writer thread
            if rows.messages():
                break
            await asyncio.sleep(0.05)
        assert [m["role"] for m in rows.messages("f1")] == ["user", "assistant"]
        scrape = await (await client.get("/metrics")).text()
    assert sample(scrape, "chatmem_turns_committed_total") == 1


async def test_disconnect_with_discard_commits_nothing(
    gateway_factory: GatewayFactory, rows: Rows
) -> None:
    events = answer_events()
    script = Script(chunks=[events[0], 0.3, *events[1:]])
    async with scripted_upstream(script) as up:
        client = await gateway_factory(up.url)
        resp = await post(client, STREAM)
        await resp.content.readuntil(b"\n\n")
        resp.close()
        await asyncio.wait_for(up.disconnected.wait(), 1.0)
    assert rows.messages() == []


@pytest.mark.parametrize(
    "path", ["/v1/chat/completions", "/v1/conversations", "/v1/ask", "/v1/files"]
)
async def test_a_body_that_cannot_be_decoded_is_a_400(
    gateway_factory: GatewayFactory, rows: Rows, caplog: pytest.LogCaptureFixture, path: str
) -> None:
    """Content-Encoding: gzip over bytes that are not gzip: a 400 in the OpenAI shape, not
    a 500 (or, passed through, a 502), and no traceback in the log (aiohttp logged one
    more as it read the rest of the body after the answer).  The answer ends its
    connection; the gateway goes on serving on new ones."""
    async with scripted_upstream(Script(chunks=answer_events())) as up:
        client = await gateway_factory(up.url)
        headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
        for encoding, body in (
            ("gzip", b"\x1f\x8b\x08\x00garbagegarbage"),
            ("deflate", b"garbage"),
            ("br", b"garbage"),
            ("zstd", b"garbage"),
        ):
            headers["Content-Encoding"] = encoding
            resp = await client.post(path, data=body, headers=headers)
            assert resp.status == 400
            error = (await resp.json())["error"]
            assert (
                error["message"] == "request body could not be decoded (see its Content-Encoding)"
            )
        assert (await client.get("/v1/health")).status == 200
        assert up.requests == []
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert rows.messages() == []


@pytest.mark.parametrize("stream", [False, True])
async def test_a_body_nested_too_deep_is_a_400_before_the_upstream_is_asked(
    gateway_factory: GatewayFactory, rows: Rows, stream: bool
) -> None:
    """orjson reads 1,024 levels, but writing such a body failed past about 970: a 500,
    after the model had answered when the depth was in a message.  Over 254 levels
    (what orjson writes) is a 400; 254 still goes."""
    flag = b"true" if stream else b"false"

    def field(levels: int) -> bytes:  # the body's object is one level, the field the rest
        n = levels - 1
        return (
            b'{"model": "m", "stream": %s, "messages": [{"role": "user", "content": "x"}],'
            b' "x": %s}' % (flag, b"[" * n + b"]" * n)
        )

    def part(levels: int) -> bytes:  # body, messages, message, content, part: five levels
        n = levels - 5
        deep = b'[{"type": "text", "text": "x", "deep": ' + b"[" * n + b"]" * n + b"}]"
        return b'{"model": "m", "stream": %s, "messages": [{"role": "user", "content": %s}]}' % (
            flag,
            deep,
        )

    async with scripted_upstream(Script(chunks=answer_events())) as up:
        client = await gateway_factory(up.url)
        for raw in (field(255), part(255), field(990)):
            resp = await post_raw(client, "/v1/chat/completions", raw)
            assert resp.status == 400
            assert (
                "nests arrays and objects over 254 deep" in (await resp.json())["error"]["message"]
            )
        items = (
            b'{"items": [{"role": "user", "content": [{"type": "text", "text": "x", "d": %s}]}]}'
        )
        resp = await post_raw(client, "/v1/conversations", items % (b"[" * 300 + b"]" * 300))
        assert resp.status == 400
        assert up.requests == []
        resp = await post_raw(client, "/v1/chat/completions", field(254))
        assert resp.status == 200  # the limit itself still goes
        await resp.read()


async def post_raw(client: Any, path: str, raw: bytes) -> Any:
    return await client.post(path, data=raw, headers={"Content-Type": "application/json"})


async def test_with_finish_a_client_that_stopped_reading_and_left_still_gets_its_turn(
    gateway_factory: GatewayFactory, rows: Rows
) -> None:
    """The client stops reading, so the gateway's writes back up and aiohttp waits for
    them to drain; then the client resets the connection.  aiohttp fails that wait with a
    plain ``ConnectionError`` ('Connection lost'), which the tee did not take for a client
    that left: with "finish" the detached answer died and the turn was lost, silently."""
    pieces = ["x" * 60_000] * 60  # 3.6 MB of answer: far more than the socket buffers hold
    events = [sse(chunk("", role="assistant")), *(sse(chunk(p)) for p in pieces)]
    script = Script(chunks=[*events, sse(chunk(finish="stop")), sse("[DONE]")])
    async with scripted_upstream(script) as up:
        client = await gateway_factory(up.url, memory={"on_client_disconnect": "finish"})
        port = client.server.port
        body = json.dumps(STREAM).encode()
        head = (
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"X-Conversation-Id: backed-up\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        await asyncio.get_running_loop().sock_sendall(sock, head + body)
        await asyncio.sleep(0.5)  # reads nothing: the gateway's writes back up
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # a reset while aiohttp waits for its writes to drain
        for _ in range(100):  # bounded: up to 5 s for the detached answer to be committed
            if rows.messages("backed-up"):
                break
            await asyncio.sleep(0.05)
    stored = rows.messages("backed-up")
    assert [m["role"] for m in stored] == ["user", "assistant"]
    assert json.loads(stored[1]["content"]) == "".join(pieces)


async def test_a_streamed_answer_over_max_answer_bytes_ends_with_an_error(
    gateway_factory: GatewayFactory, rows: Rows
) -> None:
    """The answer is not held to its end: at the read that crosses the limit the
    upstream is hung up on, the client gets an error event, and nothing is stored."""
    events = answer_events("x" * 300)
    limit = len(b"".join(events[:3])) - 1
    # The upstream would go on (it waits for the gateway to hang up).
    script = Script(chunks=[events[0], 0.01, events[1], 0.01, events[2]], end="hang")
    async with scripted_upstream(script) as up:
        client = await gateway_factory(up.url, upstream={"max_answer_bytes": limit})
        body = await asyncio.wait_for((await post(client, STREAM)).read(), 5.0)
        await asyncio.wait_for(up.disconnected.wait(), 1.0)
    (error,) = error_events(body)
    assert error["code"] == "upstream_answer_too_large"
    assert "upstream.max_answer_bytes" in error["message"]
    # What arrived before the limit was crossed went on as it came, then only the error.
    sent = events[0] + events[1]
    assert body.startswith(sent)
    assert body[len(sent) :].startswith(b'data: {"error"') and body.count(b"\n\n") == 3
    assert rows.messages() == []


async def test_a_streamed_answer_of_exactly_max_answer_bytes_is_stored(
    gateway_factory: GatewayFactory, rows: Rows
) -> None:
    events = answer_events()
    async with scripted_upstream(Script(chunks=events)) as up:
        client = await gateway_factory(up.url, upstream={"max_answer_bytes": len(b"".join(events))})
        body = await (await post(client, STREAM)).read()
    assert body == b"".join(events)
    await hello_world_is_committed(rows)


@pytest.mark.parametrize(("over", "status"), [(0, 200), (1, 502)])
async def test_a_plain_answer_over_max_answer_bytes_is_a_502(
    gateway_factory: GatewayFactory, rows: Rows, over: int, status: int
) -> None:
    completion = json.dumps(
        {
            "id": "c1",
            "object": "chat.completion",
            "model": "m",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hello world"},
                    "finish_reason": "stop",
                }
            ],
        }
    ).encode()
    script = Script(
        headers={"Content-Type": "application/json"},
        chunks=[completion[:40], 0.01, completion[40:]],
    )
    async with scripted_upstream(script) as up:
        limit = len(completion) - over
        client = await gateway_factory(up.url, upstream={"max_answer_bytes": limit})
        resp = await post(client, PLAIN)
        assert resp.status == status
        if status == 200:
            assert await resp.read() == completion
            await hello_world_is_committed(rows)
            return
        error = (await resp.json())["error"]
    assert error["code"] == "upstream_answer_too_large"
    assert error["message"] == (
        f"the upstream's answer is larger than upstream.max_answer_bytes ({limit})"
    )
    assert rows.messages() == []
