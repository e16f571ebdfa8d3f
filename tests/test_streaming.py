"""The streaming tee: exact bytes to the client, the accumulated turn to the database."""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3
import struct
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from helpers import GatewayFactory, Rows, answer_events, chunk, sse
from scripted_upstream import Script, scripted_upstream

from chatmem.proxy import tee
from chatmem.state import GATEWAY

REQUEST = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}


async def run_stream(
    gateway_factory: GatewayFactory, script: Script, conv: str = "s1", **config: Any
) -> tuple[int, bytes, Any]:
    async with scripted_upstream(script) as up:
        client = await gateway_factory(up.url, **config)
        resp = await client.post(
            "/v1/chat/completions", json=REQUEST, headers={"X-Conversation-Id": conv}
        )
        body = await resp.read()
        return resp.status, body, resp


def split_every(data: bytes, size: int) -> list[bytes | float]:
    """Chunks of ``size`` bytes with a pause between, so each is its own read."""
    out: list[bytes | float] = []
    for start in range(0, len(data), size):
        out += [data[start : start + size], 0.001]
    return out


def stored_text(rows: Rows, conv: str = "s1") -> Any:
    stored = rows.messages(conv)
    assert [m["role"] for m in stored] == ["user", "assistant"]
    return json.loads(stored[1]["content"])


FRAMINGS = {
    "lf": b"".join(answer_events(newline=b"\n")),
    "crlf": b"".join(answer_events(newline=b"\r\n")),
    "cr": b"".join(answer_events(newline=b"\r")),
    "no-space": b"".join(
        sse(e, space=False)
        for e in [
            chunk("", role="assistant"),
            chunk("Hello "),
            chunk("world"),
            chunk(finish="stop"),
            "[DONE]",
        ]
    ),
    "comments-and-keepalives": b": keepalive\n\n"
    + b"".join(e + b": ping\n\n" for e in answer_events()),
    "multi-line-data": (
        b"data: "
        + json.dumps(chunk("Hello world")).replace(", ", ",\ndata: ").encode()
        + b"\n\n"
        + sse(chunk(finish="stop"))
        + sse("[DONE]")
    ),
    "event-and-id-fields": b"".join(b"event: message\nid: 7\n" + e for e in answer_events()),
    # An event whose data is empty carries nothing, as a keep-alive: it used to make the
    # whole answer "not a JSON object", unsaved, with an error event for the client.
    "empty-data-events": b"data:\n\n"
    + b"".join(e + b"data: \n\ndata\n\n" for e in answer_events()[:-1])
    + answer_events()[-1],
}


@pytest.mark.parametrize("framing", sorted(FRAMINGS))
@pytest.mark.parametrize("piece", [0, 5, 61])
async def test_framings_forwarded_exactly_and_remembered(
    gateway_factory: GatewayFactory, rows: Rows, framing: str, piece: int
) -> None:
    wire = FRAMINGS[framing]
    chunks = [wire] if piece == 0 else split_every(wire, piece)
    status, body, resp = await run_stream(gateway_factory, Script(chunks=chunks))
    assert status == 200
    assert body == wire
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    assert resp.headers["X-Conversation-Id"] == "s1"
    assert stored_text(rows) == "Hello world"


async def test_utf8_split_across_reads(gateway_factory: GatewayFactory, rows: Rows) -> None:
    text = "héllo wörld 🙂 日本"
    # Raw UTF-8 in the JSON (not \u escapes), cut inside the 4-byte emoji.
    raw_event = b"data: " + json.dumps(chunk(text), ensure_ascii=False).encode() + b"\n\n"
    wire = sse(chunk("", role="assistant")) + raw_event + sse(chunk(finish="stop")) + sse("[DONE]")
    emoji = raw_event.index("🙂".encode())
    cut = len(sse(chunk("", role="assistant"))) + emoji + 2  # inside the 4-byte emoji
    chunks: list[bytes | float] = [wire[:cut], 0.01, wire[cut:]]
    status, body, _ = await run_stream(gateway_factory, Script(chunks=chunks))
    assert status == 200 and body == wire
    assert stored_text(rows) == text


async def test_data_line_over_one_megabyte(gateway_factory: GatewayFactory, rows: Rows) -> None:
    big = "x" * (1536 * 1024)
    wire = b"".join(answer_events(big))
    status, body, _ = await run_stream(gateway_factory, Script(chunks=split_every(wire, 65536)))
    assert status == 200 and body == wire
    assert stored_text(rows) == big


async def test_include_usage_chunk(gateway_factory: GatewayFactory, rows: Rows) -> None:
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    events = answer_events()
    usage_event = sse(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "scripted",
            "choices": [],
            "usage": usage,
        }
    )
    wire = b"".join([*events[:-1], usage_event, events[-1]])
    _, body, _ = await run_stream(gateway_factory, Script(chunks=[wire]))
    assert body == wire
    assert json.loads(rows.messages("s1")[1]["usage"]) == usage
    assert rows.messages("s1")[1]["model"] == "scripted"


async def test_tool_call_fragments_merged(gateway_factory: GatewayFactory, rows: Rows) -> None:
    def call(index: int, **fields: Any) -> dict[str, Any]:
        return chunk(tool_calls=[{"index": index, **fields}])

    events = [
        chunk(role="assistant"),
        call(0, id="a", type="function", function={"name": "get", "arguments": ""}),
        call(1, id="b", type="function", function={"name": "put", "arguments": '{"k"'}),
        call(0, function={"name": "", "arguments": '{"x":'}),
        chunk(
            tool_calls=[
                {"index": 0, "function": {"arguments": " 1"}},
                {"index": 0, "function": {"name": "get", "arguments": "}"}},
            ]
        ),
        call(1, function={"arguments": ": 2}"}),
        chunk(finish="tool_calls"),
        "[DONE]",
    ]
    wire = b"".join(sse(e) for e in events)
    _, body, _ = await run_stream(gateway_factory, Script(chunks=[wire]))
    assert body == wire
    stored = rows.messages("s1")[1]
    assert json.loads(stored["tool_calls"]) == [
        {"id": "a", "type": "function", "function": {"name": "get", "arguments": '{"x": 1}'}},
        {"id": "b", "type": "function", "function": {"name": "put", "arguments": '{"k": 2}'}},
    ]
    assert stored["content"] is None
    assert stored["finish_reason"] == "tool_calls"


@pytest.mark.parametrize(
    ("deltas", "remembered"),
    [
        ([{"refusal": "I can't "}, {"refusal": "help."}], "I can't help."),
        # Some servers send content "" next to the refusal: it was stored as "" (h49).
        ([{"content": "", "refusal": "I can't "}, {"refusal": "help."}], "I can't help."),
        ([{"reasoning_content": "thinking..."}], ""),  # cut off by length before any content
    ],
)
async def test_an_answer_without_content_is_never_remembered_as_null(
    gateway_factory: GatewayFactory, rows: Rows, deltas: list[dict[str, Any]], remembered: str
) -> None:
    """OpenAI refuses an assistant message whose content is null without tool calls, so
    such a turn must not come back as history that way."""
    events = [chunk(role="assistant"), *(chunk(**d) for d in deltas), chunk(finish="length")]
    wire = b"".join(sse(e) for e in [*events, "[DONE]"])
    async with scripted_upstream(Script(chunks=[wire])) as up:
        client = await gateway_factory(up.url)
        for _ in range(2):
            resp = await client.post(
                "/v1/chat/completions", json=REQUEST, headers={"X-Conversation-Id": "r"}
            )
            assert await resp.read() == wire
        history = json.loads(up.requests[-1][3])["messages"]
    assert json.loads(rows.messages("r")[1]["content"]) == remembered
    assert history[1] == {"role": "assistant", "content": remembered}


async def test_a_turn_that_cannot_be_saved_ends_the_stream_with_a_server_error(
    gateway_factory: GatewayFactory, db_path: Path, rows: Rows, caplog: pytest.LogCaptureFixture
) -> None:
    """The write lock stays taken past storage.busy_timeout_ms: the events come through,
    then, instead of [DONE], an error event with the type and code a non-streamed
    answer failing the same way gets in its 503."""
    events = answer_events()
    async with scripted_upstream(Script(chunks=[b"".join(events)])) as up:
        client = await gateway_factory(up.url, storage={"busy_timeout_ms": 200})
        other = sqlite3.connect(db_path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            resp = await client.post(
                "/v1/chat/completions", json=REQUEST, headers={"X-Conversation-Id": "s1"}
            )
            body = await asyncio.wait_for(resp.read(), 10)
            # Another writer in the way is not a database that refuses writes: still ready.
            assert (await client.get("/v1/ready")).status == 200
        finally:
            other.execute("COMMIT")
            other.close()
    before_done = b"".join(events[:-1])
    assert body.startswith(before_done) and body.endswith(events[-1])
    error = json.loads(body[len(before_done) + len(b"data: ") : -len(events[-1])])["error"]
    assert error["message"].startswith("the answer could not be saved")
    assert (error["type"], error["code"]) == ("server_error", "storage_unavailable")
    assert rows.messages("s1") == []
    # And the operator hears of it (the message the client got, no content).
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert f"storage_unavailable: {error['message']}" in warnings


async def test_an_upstream_that_keeps_the_body_open_after_done_does_not_hold_the_client(
    gateway_factory: GatewayFactory, rows: Rows
) -> None:
    """The answer is complete and [DONE] sent, but the upstream never ends its body: the
    gateway ends the client's body after a short silence, not after read_timeout."""
    events = answer_events()
    async with scripted_upstream(Script(chunks=events, end="hang")) as up:
        client = await gateway_factory(up.url, upstream={"read_timeout": 120})
        resp = await client.post(
            "/v1/chat/completions", json=REQUEST, headers={"X-Conversation-Id": "s1"}
        )
        assert await asyncio.wait_for(resp.read(), 30) == b"".join(events)
        await asyncio.wait_for(up.disconnected.wait(), 5)  # and the upstream is let go
    assert stored_text(rows) == "Hello world"


async def test_what_follows_done_goes_on_as_it_comes_not_held(
    gateway_factory: GatewayFactory, rows: Rows
) -> None:
    """After [DONE] nothing is parsed: an unfinished event there is passed on as it comes,
    not held to its end (with no answer limit applying any more, an upstream that kept
    sending would have filled the gateway's memory)."""
    events = answer_events()
    tail = b"data: " + b"x" * 300_000  # never finished
    release = asyncio.Event()
    async with scripted_upstream(Script(chunks=[*events, 0.05, tail, release])) as up:
        client = await gateway_factory(up.url, upstream={"max_answer_bytes": 100_000})
        resp = await client.post(
            "/v1/chat/completions", json=REQUEST, headers={"X-Conversation-Id": "s1"}
        )
        wanted = b"".join(events) + tail
        body = b""
        try:
            while len(body) < len(wanted):  # bounded: each read waits 10 s at most
                piece = await asyncio.wait_for(resp.content.readany(), 10)
                assert piece, body[-100:]
                body += piece
            # All of it while the upstream still holds its body open (held, the tail
            # came only when the gateway gave up on the upstream's silence and ended).
            assert body == wanted
            assert not up.disconnected.is_set() and not resp.content.at_eof()
        finally:
            release.set()
    assert stored_text(rows) == "Hello world"


async def test_the_lf_of_a_crlf_split_from_its_cr_is_not_taken_for_a_new_event(
    gateway_factory: GatewayFactory, rows: Rows
) -> None:
    """``...\r\n\r`` then ``\n`` in the next read, then a break: the LF completes the blank
    line the CR already ended; held as the start of an event, it was dropped with it."""
    events = answer_events(newline=b"\r\n")
    first = events[1]
    script = Script(chunks=[events[0], first[:-1], 0.05, first[-1:]], end="reset")
    async with scripted_upstream(script) as up:
        client = await gateway_factory(up.url)
        resp = await client.post(
            "/v1/chat/completions", json=REQUEST, headers={"X-Conversation-Id": "s1"}
        )
        body = await asyncio.wait_for(resp.read(), 10)
    assert body.startswith(events[0] + first + b'data: {"error"')
    assert rows.messages("s1") == []


async def test_a_crlf_split_from_its_cr_before_done_or_a_break_keeps_its_lf(
    gateway_factory: GatewayFactory, rows: Rows
) -> None:
    """The CR that ends a read ends the event; the LF in the next read belongs to it, in
    front of the gateway's error event, whichever way the stream goes on.  A client that
    splits lines on LF alone otherwise read ``\rdata: {"error"...``, no data line."""
    events = answer_events(newline=b"\r\n")
    no_finish = events[1]  # a content chunk, then [DONE]: no finish_reason
    error = b'data: {"error"'
    for chunks, end, then in (
        ([events[0], no_finish[:-1], 0.05, no_finish[-1:] + events[-1]], "ok", events[-1]),
        ([events[0], no_finish[:-1]], "reset", b""),
    ):
        status, body, _ = await run_stream(gateway_factory, Script(chunks=chunks, end=end))
        assert status == 200
        assert body.startswith(events[0] + no_finish + error), body
        assert body.endswith(b"}}\n\n" + then)
    assert rows.messages("s1") == []


async def test_an_upstream_that_keeps_sending_after_done_is_cut_off(
    gateway_factory: GatewayFactory, rows: Rows
) -> None:
    """What follows [DONE] goes on for a little while, not for as long as the upstream
    trickles: the client has its answer."""
    events = answer_events()
    trickle: list[bytes | float] = [b": still here\n\n", 0.2] * 100  # 20 s of it
    async with scripted_upstream(Script(chunks=[*events, *trickle])) as up:
        client = await gateway_factory(up.url)
        resp = await client.post(
            "/v1/chat/completions", json=REQUEST, headers={"X-Conversation-Id": "s1"}
        )
        body = await asyncio.wait_for(resp.read(), 15)
    assert body.startswith(b"".join(events)) and body.endswith(b": still here\n\n")
    assert body.count(b": still here") < 100
    assert stored_text(rows) == "Hello world"


async def test_the_next_answer_on_the_streams_connection_gets_the_whole_read_timeout(
    gateway_factory: GatewayFactory, aiohttp_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a stream, the gateway waits a short while for the upstream's body to end,
    then reuses the connection: the next answer, slower than that short while, is no
    504 (a probe's 2 s-slow model failed after every stream whose body ended late)."""
    monkeypatch.setattr(tee, "_AFTER_DONE", 0.1)
    events = answer_events()

    async def answer(request: web.Request) -> web.StreamResponse:
        if (await request.json()).get("stream"):
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for event in events:
                await response.write(event)
            await asyncio.sleep(0.05)  # the body's end in a read of its own
            return response
        await asyncio.sleep(0.4)
        message = {"role": "assistant", "content": "slow"}
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        return web.json_response({"object": "chat.completion", "choices": [choice]})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    up = await aiohttp_server(app)
    client = await gateway_factory(f"http://127.0.0.1:{up.port}/v1")
    headers = {"X-Conversation-Id": "s1"}
    resp = await client.post("/v1/chat/completions", json=REQUEST, headers=headers)
    assert await resp.read() == b"".join(events)
    plain = {**REQUEST, "stream": False}
    resp = await client.post("/v1/chat/completions", json=plain, headers=headers)
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["choices"][0]["message"]["content"] == "slow"


async def test_an_upstream_model_name_longer_than_its_column_is_cut_not_fatal(
    gateway_factory: GatewayFactory, rows: Rows
) -> None:
    events = [chunk("Hi", role="assistant"), chunk(finish="stop"), "[DONE]"]
    wire = b"".join(sse(e) for e in events).replace(b'"scripted"', b'"' + b"m" * 300 + b'"')
    status, body, _ = await run_stream(gateway_factory, Script(chunks=[wire]))
    assert (status, body) == (200, wire)
    assert rows.messages("s1")[1]["model"] == "m" * 255


async def test_an_unforeseen_commit_failure_still_ends_the_stream(
    gateway_factory: GatewayFactory, rows: Rows, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever the store raises, a stream that has started gets an error event and the
    end of its body: a client is never left waiting on it."""
    events = answer_events()
    async with scripted_upstream(Script(chunks=[b"".join(events)])) as up:
        client = await gateway_factory(up.url)

        def broken(*_args: Any, **_kwargs: Any) -> Any:
            raise RuntimeError("an unforeseen failure")

        monkeypatch.setattr(client.server.app[GATEWAY].store, "commit_turn_soon", broken)
        resp = await client.post(
            "/v1/chat/completions", json=REQUEST, headers={"X-Conversation-Id": "s1"}
        )
        body = await asyncio.wait_for(resp.read(), 10)
    before_done = b"".join(events[:-1])
    assert body.startswith(before_done) and body.endswith(events[-1])
    error = json.loads(body[len(before_done) + len(b"data: ") : -len(events[-1])])["error"]
    assert (error["type"], error["code"]) == ("server_error", "internal_error")
    assert rows.messages("s1") == []


async def test_reasoning_content_separate(gateway_factory: GatewayFactory, rows: Rows) -> None:
    events = [
        chunk(role="assistant", reasoning_content="Let me "),
        chunk(reasoning="think."),
        chunk("Answer."),
        chunk(finish="stop"),
        "[DONE]",
    ]
    await run_stream(gateway_factory, Script(chunks=[b"".join(sse(e) for e in events)]))
    stored = rows.messages("s1")[1]
    assert stored["reasoning"] == "Let me think."
    assert json.loads(stored["content"]) == "Answer."


async def test_non_stream_body_forwarded_exactly(
    gateway_factory: GatewayFactory, rows: Rows
) -> None:
    body = (
        b'{ "id" : "x", "object": "chat.completion", "model": "scripted",\n'
        b' "choices": [ {"index": 0, "message": {"role": "assistant", "content": "Hi \xc3\xa9"},'
        b' "finish_reason": "stop"} ] }'
    )
    script = Script(headers={"Content-Type": "application/json"}, chunks=[body], framing="length")
    async with scripted_upstream(script) as up:
        client = await gateway_factory(up.url)
        resp = await client.post(
            "/v1/chat/completions",
            headers={"X-Conversation-Id": "s1"},
            json={**REQUEST, "stream": False},
        )
        assert resp.status == 200
        assert await resp.read() == body
    assert stored_text(rows) == "Hi é"


async def test_events_arrive_before_upstream_finishes(
    gateway_factory: GatewayFactory, rows: Rows
) -> None:
    """The upstream sends two events and then stays silent: a buffering gateway would
    never deliver them.  Nothing is committed for the unfinished answer."""
    events = answer_events()
    script = Script(chunks=[events[0], events[1]], end="hang")
    async with scripted_upstream(script) as up:
        client = await gateway_factory(up.url)
        resp = await client.post("/v1/chat/completions", json=REQUEST)
        first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 10)
        second = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 10)
        assert [first, second] == events[:2]
        resp.close()
    assert rows.messages() == []


async def test_head_is_not_held_for_a_slow_first_token(gateway_factory: GatewayFactory) -> None:
    """The response head waits for the first event only when that event is already at
    hand: an upstream that answers with its head and then thinks (a long prompt) must
    not keep the client from the status and headers until the first token."""
    events = answer_events()
    first_token = asyncio.Event()
    script = Script(chunks=[first_token, *events])
    async with scripted_upstream(script) as up:
        client = await gateway_factory(up.url)
        resp = await asyncio.wait_for(
            client.post(
                "/v1/chat/completions", json=REQUEST, headers={"X-Conversation-Id": "slow"}
            ),
            10,
        )
        assert resp.status == 200
        assert resp.headers["X-Conversation-Id"] == "slow"
        assert not first_token.is_set()
        first_token.set()
        assert await asyncio.wait_for(resp.read(), 10) == b"".join(events)


@pytest.mark.parametrize("reads", ["one read", "5-byte reads"])
async def test_only_done_waits_for_the_commit(
    gateway_factory: GatewayFactory, rows: Rows, db_path: Path, reads: str
) -> None:
    """Another connection holds SQLite's write lock, so the commit has to wait: every
    event in front of [DONE] reaches the client (whether the answer came in one read or
    with [DONE] itself split across reads), and [DONE] only once the turn is stored."""
    events = answer_events()
    before_done = b"".join(events[:-1])
    whole = b"".join(events)
    chunks = [whole] if reads == "one read" else split_every(whole, 5)
    async with scripted_upstream(Script(chunks=chunks)) as up:
        client = await gateway_factory(up.url)
        other = sqlite3.connect(db_path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            resp = await client.post(
                "/v1/chat/completions", json=REQUEST, headers={"X-Conversation-Id": "s1"}
            )
            assert await asyncio.wait_for(resp.content.readexactly(len(before_done)), 5) == (
                before_done
            )
            with pytest.raises(TimeoutError):  # [DONE] waits for the lock
                await asyncio.wait_for(resp.content.read(1), 0.3)
            assert rows.messages("s1") == []
        finally:
            other.execute("COMMIT")
            other.close()
        assert await asyncio.wait_for(resp.content.read(), 10) == events[-1]
    assert stored_text(rows) == "Hello world"


def _data_segments_in(sock: socket.socket) -> int:
    """The TCP segments with data this socket received (Linux ``tcpi_data_segs_in``)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 160)
    return int(struct.unpack_from("I", info, 152)[0])


async def test_head_and_first_token_reach_the_client_in_one_segment(
    gateway_factory: GatewayFactory,
) -> None:
    """The upstream's head came with its first event: the client gets chatmem's head and
    that event in one TCP segment, one wake-up instead of two (benchmarks/README.md).
    Counted by the client's own kernel, while the upstream holds the rest back."""
    release = asyncio.Event()
    first, *rest = answer_events("Hello world")
    script = Script(chunks=[first, release, *rest], head_with_first_chunk=True)
    async with scripted_upstream(script) as up:
        gateway = await gateway_factory(up.url)
        body = json.dumps(REQUEST).encode()
        request = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nX-Conversation-Id: seg\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        loop = asyncio.get_running_loop()
        with socket.create_connection(("127.0.0.1", gateway.server.port), timeout=10) as sock:
            sock.setblocking(False)
            await loop.sock_sendall(sock, request)
            received = b""
            for _ in range(100):  # bounded: until the first event is in
                received += await loop.sock_recv(sock, 65536)
                if received.endswith(b"%x\r\n%s\r\n" % (len(first), first)):
                    break
            assert received.startswith(b"HTTP/1.1 200 OK\r\n")
            assert received.endswith(b"\r\n\r\n%x\r\n%s\r\n" % (len(first), first))
            assert _data_segments_in(sock) == 1
            release.set()
            while chunk := await loop.sock_recv(sock, 65536):
                received += chunk
    assert received.endswith(b"0\r\n\r\n") and b"[DONE]" in received


async def test_head_is_not_held_for_a_first_token_that_has_not_come(
    gateway_factory: GatewayFactory,
) -> None:
    """The upstream sent its head alone (the model still reading the prompt): the client
    has chatmem's head at once, not when the first token comes."""
    release = asyncio.Event()
    script = Script(chunks=[release, *answer_events("Hello world")])
    async with scripted_upstream(script) as up:
        gateway = await gateway_factory(up.url)
        async with gateway.post(
            "/v1/chat/completions", json=REQUEST, headers={"X-Conversation-Id": "slow"}
        ) as resp:
            assert resp.status == 200 and not release.is_set()
            release.set()
            assert await resp.read() == b"".join(answer_events("Hello world"))


async def test_head_is_not_held_for_the_rest_of_an_unfinished_first_event(
    gateway_factory: GatewayFactory,
) -> None:
    """The upstream's head came with the start of its first event, and the rest waits
    (a slow first token): chatmem's head, held to go out with the first bytes, waited
    for the whole event, up to ``upstream.read_timeout`` (item 142). It goes at once
    now; the unfinished event is still held, as ever."""
    release = asyncio.Event()
    first, *rest = answer_events("Hello world")
    script = Script(chunks=[first[:20], release, first[20:], *rest], head_with_first_chunk=True)
    async with scripted_upstream(script) as up:
        gateway = await gateway_factory(up.url)
        async with await asyncio.wait_for(
            gateway.post("/v1/chat/completions", json=REQUEST, headers={"X-Conversation-Id": "h"}),
            10,
        ) as resp:
            assert resp.status == 200 and not release.is_set()
            with pytest.raises(TimeoutError):  # nothing of the event yet
                await asyncio.wait_for(resp.content.read(1), 0.2)
            release.set()
            assert await resp.read() == b"".join(answer_events("Hello world"))


@pytest.mark.parametrize(
    ("path", "body", "before_commit", "after_commit"),
    [
        ("/v1/chat/completions", REQUEST, b"".join(answer_events()[:-1]), answer_events()[-1]),
        ("/conversation/m", {"text": "hi"}, b"Hello world", b""),
    ],
)
async def test_a_slow_commit_holds_only_the_end_of_the_stream(
    gateway_factory: GatewayFactory,
    db_path: Path,
    rows: Rows,
    path: str,
    body: dict[str, Any],
    before_commit: bytes,
    after_commit: bytes,
) -> None:
    """The whole answer came with the upstream's head, and another process holds the
    database's lock: the client has the head and the answer at once (the plain-text
    /conversation stream used to hold its head until the commit returned); only the end
    of the body, the sign that the turn is saved, waits for the lock."""
    whole = b"".join(answer_events())
    async with scripted_upstream(Script(chunks=[whole], head_with_first_chunk=True)) as up:
        gateway = await gateway_factory(up.url)
        await gateway.get("/v1/ready")  # the schema exists before the file is locked
        locker = sqlite3.connect(db_path, isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        try:
            # Bounded waits: without the fix the head came only when the lock went.
            resp = await asyncio.wait_for(gateway.post(path, json=body), 10)
            assert resp.status == 200
            received = b""
            while len(received) < len(before_commit):
                received += await asyncio.wait_for(resp.content.readany(), 10)
            assert received == before_commit and not resp.content.at_eof()
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        received += await resp.read()
    assert received == before_commit + after_commit
    assert [m["role"] for m in rows.messages()] == ["user", "assistant"]
