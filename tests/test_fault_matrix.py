"""Every upstream fault, three guarantees: a clear error for the client, no half turn in the
database, and a next turn whose history is exactly the turns that completed.

Each case runs a conversation of three turns through one gateway: a good turn, the faulty
turn, and a good probe turn.  The probe's request as the upstream received it is the proof
of the third guarantee: it must carry exactly the first turn and the probe's own message.
(test_failures.py checks single faults in more detail: exact bytes, disconnects.)
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest
from helpers import GatewayFactory, Rows, answer_events, chat_completion, chunk, sse
from scripted_upstream import Framing, Script, ScriptedUpstream, scripted_upstream

from chatmem.proxy.sse import SSEParser

FAST_TIMEOUTS = {"connect_timeout": 2, "read_timeout": 0.3}
CONV = "fm-1"


def good_stream(text: str) -> Script:
    return Script(chunks=[b"".join(answer_events(text))])


def completion(text: str | None, finish: str | None = "stop") -> bytes:
    return json.dumps(chat_completion(text, finish)).encode()


def json_reply(body: bytes, **script: Any) -> Script:
    return Script(
        headers={"Content-Type": "application/json"}, chunks=[body], framing="length", **script
    )


@dataclass
class Fault:
    """One fault; ``script`` None means nothing listens (connection refused)."""

    script: Script | None
    stream: bool
    status: int
    code: str | None = None
    """For a stream that failed after its headers: the code of the final error event."""
    body: bytes | None = None
    """For an upstream error status: the body the client must get unchanged."""
    upstream_bytes: list[bytes] = field(default_factory=list)


def status_fault(status: int, content_type: str, body: bytes, stream: bool) -> Fault:
    script = Script(
        status=status, headers={"Content-Type": content_type}, chunks=[body], framing="length"
    )
    return Fault(script, stream, status, body=body)


def stream_fault(
    chunks: list[bytes | float], code: str, end: Literal["ok", "reset", "hang"] = "ok", **kw: Any
) -> Fault:
    script = Script(chunks=chunks, end=end, **kw)
    sent = [c for c in chunks if isinstance(c, bytes)]
    return Fault(script, True, 200, code=code, upstream_bytes=sent)


EVENTS = answer_events()
BROKEN_JSON = b'data: {"id": "chatcmpl-1", "choices": [{"index": 0, "delta": {"content": "x\n\n'

FAULTS: dict[str, Fault] = {
    # Before any response.
    **{
        f"{name}-{kind}": Fault(script, kind == "stream", status)
        for kind in ("stream", "plain")
        for name, script, status in [
            ("refused", None, 502),
            ("reset-before-headers", Script(before_headers="reset"), 502),
            ("garbage-before-headers", Script(before_headers="garbage"), 502),
            ("silence-before-headers", Script(before_headers="hang"), 504),
        ]
    },
    # The upstream answers with an error status, with and without a JSON body.
    **{
        f"{status}-{label}-{kind}": status_fault(status, ctype, body, kind == "stream")
        for kind in ("stream", "plain")
        for status, label, ctype, body in [
            (400, "json", "application/json", b'{"error": {"message": "bad", "type": "x"}}'),
            (404, "json", "application/json", b'{"error": {"message": "no model"}}'),
            (429, "text", "text/plain", b"slow down"),
            (500, "json", "application/json", b'{"error": {"message": "boom"}}'),
            (500, "html", "text/html", b"<h1>oops</h1>"),
            (502, "empty", "application/json", b""),
            (503, "text", "text/plain", b"overloaded"),
        ]
    },
    # A stream that fails after its headers.
    "reset-mid-stream": stream_fault(EVENTS[:2], "upstream_broken", end="reset"),
    "reset-mid-json-event": stream_fault([*EVENTS[:2], EVENTS[2][:20]], "upstream_broken", "reset"),
    # Without framing the end of the connection ends the body, but a reset is no end.
    "reset-mid-stream-close-framing": stream_fault(
        EVENTS[:3], "upstream_broken", end="reset", framing="close"
    ),
    # ... not even after the finish reason (h60: it was kept, as a whole body).
    "reset-after-finish-reason-close-framing": stream_fault(
        EVENTS[:4], "upstream_broken", end="reset", framing="close"
    ),
    # A large event (over 4 KiB, what the gateway once held back at most) cut off: it is
    # held to its end like any other, so none of it reaches the client.
    "reset-mid-large-event": stream_fault(
        [EVENTS[0], sse(chunk("x" * 10_000))[:6000]], "upstream_broken", end="reset"
    ),
    "silence-mid-stream": stream_fault(EVENTS[:2], "upstream_timeout", end="hang"),
    "silence-mid-json-event": stream_fault([EVENTS[0], EVENTS[1][:9]], "upstream_timeout", "hang"),
    # Without [DONE] and without a finish_reason (with one, the answer is kept: below).
    "eof-without-done": stream_fault(EVENTS[:3], "upstream_incomplete"),
    "eof-without-done-close-framing": stream_fault(
        EVENTS[:3], "upstream_incomplete", framing="close"
    ),
    # A finished answer, but the body did not end whole (the chunked body cut off).
    "reset-after-finish-reason": stream_fault(EVENTS[:4], "upstream_broken", end="reset"),
    "eof-mid-json-event": stream_fault([*EVENTS[:2], EVENTS[2][:20]], "upstream_incomplete"),
    "done-without-finish-reason": stream_fault([*EVENTS[:3], sse("[DONE]")], "upstream_incomplete"),
    "done-without-any-choice": stream_fault([sse("[DONE]")], "upstream_incomplete"),
    # [DONE] split across reads or doubled, the answer incomplete: the error still goes in
    # front of the first [DONE] (found by test_hostile_upstream).
    "done-split-without-finish-reason": stream_fault(
        [*EVENTS[:3], b"data: [DO", 0.01, b"NE]\n\n"], "upstream_incomplete"
    ),
    "done-blank-line-late-without-finish-reason": stream_fault(
        [*EVENTS[:3], b"data: [DONE]\n", 0.01, b"\n"], "upstream_incomplete"
    ),
    "two-done-events-without-finish-reason": stream_fault(
        [*EVENTS[:3], sse("[DONE]") + sse("[DONE]")], "upstream_incomplete"
    ),
    "eof-inside-done-event": stream_fault([*EVENTS[:3], b"data: [DONE]"], "upstream_incomplete"),
    "garbage-bytes-only": stream_fault([b"\x00\xffgarbage\n\n\x9c"], "upstream_incomplete"),
    "garbage-data-mid-stream": stream_fault(
        [*EVENTS[:2], b"data: \x00\xff{not json\n\n", *EVENTS[2:]], "upstream_incomplete"
    ),
    "unterminated-json-then-done": stream_fault(
        [*EVENTS[:2], BROKEN_JSON, *EVENTS[3:]], "upstream_incomplete"
    ),
    "empty-stream": stream_fault([], "upstream_incomplete"),
    # A non-streaming answer that fails after its headers or is not a finished completion.
    "plain-reset-mid-body": Fault(
        Script(
            headers={"Content-Type": "application/json", "Content-Length": "400"},
            chunks=[completion("cut")[:15]],
            framing="length",
            end="reset",
        ),
        False,
        502,
    ),
    "plain-silence-mid-body": Fault(
        Script(
            headers={"Content-Type": "application/json", "Content-Length": "400"},
            chunks=[completion("cut")[:15]],
            framing="length",
            end="hang",
        ),
        False,
        504,
    ),
    "plain-eof-mid-body": Fault(
        Script(
            headers={"Content-Type": "application/json"},
            chunks=[completion("cut")[:15]],
            framing="close",
        ),
        False,
        502,
    ),
    "plain-reset-after-a-whole-answer-close-framing": Fault(
        Script(
            headers={"Content-Type": "application/json"},
            chunks=[completion("whole")],
            framing="close",
            end="reset",
        ),
        False,
        502,
    ),
    "plain-not-json": Fault(json_reply(b"\x00\xff garbage"), False, 502),
    "plain-no-finish-reason": Fault(json_reply(completion("half", finish=None)), False, 502),
    "plain-no-choices": Fault(json_reply(b'{"id": "x", "choices": []}'), False, 502),
}


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def request(text: str, stream: bool) -> dict[str, Any]:
    return {"model": "m", "stream": stream, "messages": [{"role": "user", "content": text}]}


async def post(client: Any, body: dict[str, Any]) -> Any:
    return await client.post("/v1/chat/completions", json=body, headers={"X-Conversation-Id": CONV})


def split_error_event(body: bytes) -> tuple[bytes, dict[str, Any], bytes] | None:
    """(bytes before, the gateway's error, bytes after) or None without an error event."""
    start = body.find(b'data: {"error"')
    if start < 0:
        return None
    end = body.index(b"\n\n", start) + 2
    return body[:start], json.loads(body[start + 6 : end])["error"], body[end:]


def assert_clear_stream_error(body: bytes, fault: Fault) -> None:
    """Every whole upstream event reached the client, then one error event on an event
    boundary (before the [DONE] event if one came, since a client stops reading there)."""
    parts = split_error_event(body)
    assert parts is not None, body
    before, error, after = parts
    assert error["code"] == fault.code
    assert split_error_event(after) is None
    assert before == b"" or before.endswith((b"\n\n", b"\r\r", b"\r\n\r\n"))
    assert "[DONE]" not in SSEParser().feed(before)
    # After it: the [DONE] event, or nothing. An event the upstream never finished is
    # not passed on: a client reading line by line would take its data line for one.
    assert set(SSEParser().feed(after)) <= {"[DONE]"}
    upstream = b"".join(fault.upstream_bytes)
    assert upstream.startswith(before + after), (body, upstream)
    assert SSEParser().feed(upstream[len(before + after) :]) == []


async def assert_history_is_completed_turns(
    client: Any, up: ScriptedUpstream, rows: Rows, completed: list[tuple[str, str]]
) -> None:
    """The database holds exactly ``completed`` (user, answer) turns, in order, with
    sequence numbers 1..n; and the next turn is sent upstream with exactly that history."""
    stored = rows.messages(CONV)
    flat = [("user", u) if i % 2 == 0 else ("assistant", a) for u, a in completed for i in (0, 1)]
    assert [(m["role"], json.loads(m["content"])) for m in stored] == flat
    assert [m["seq"] for m in stored] == list(range(1, len(stored) + 1))
    last_seq = [c["last_seq"] for c in rows.conversations() if c["id"] == CONV]
    assert last_seq == [len(stored)] or (not stored and last_seq == [])
    up.script = good_stream("probe answer")
    seen = len(up.requests)
    resp = await post(client, request("probe", True))
    assert resp.status == 200
    assert (await resp.read()).endswith(sse("[DONE]"))
    sent = json.loads(up.requests[seen][3])["messages"]
    assert sent == [
        *({"role": role, "content": text} for role, text in flat),
        {"role": "user", "content": "probe"},
    ]
    assert len(rows.messages(CONV)) == len(stored) + 2


@pytest.mark.parametrize("name", sorted(FAULTS))
async def test_fault_gives_clear_error_and_keeps_history_exact(
    gateway_factory: GatewayFactory, rows: Rows, name: str
) -> None:
    fault = FAULTS[name]
    async with scripted_upstream(good_stream("first answer")) as up:
        client = await gateway_factory(up.url, upstream=FAST_TIMEOUTS)
        first = await post(client, request("first", False))
        assert first.status == 200
        await first.read()

        if fault.script is None:
            refused = await gateway_factory(
                f"http://127.0.0.1:{closed_port()}/v1", upstream=FAST_TIMEOUTS
            )
            resp = await post(refused, request("faulty", fault.stream))
        else:
            up.script = fault.script
            resp = await post(client, request("faulty", fault.stream))
        body = await resp.read()
        assert resp.status == fault.status, body
        assert resp.headers["X-Conversation-Id"] == CONV
        if fault.body is not None:
            assert body == fault.body  # the upstream's own error, unchanged
        elif fault.code is not None:
            assert_clear_stream_error(body, fault)
        else:
            error = json.loads(body)["error"]
            assert error["type"] == "upstream_error" and error["message"]

        await assert_history_is_completed_turns(client, up, rows, [("first", "first answer")])


async def test_sse_comment_and_unknown_field_lines_are_not_faults(
    gateway_factory: GatewayFactory, rows: Rows
) -> None:
    """Lines that are not ``data:`` (garbage field names included) are ignored by the SSE
    rules, so an answer carrying them is complete: forwarded as is and remembered."""
    wire = [EVENTS[0], b"\x00\xff garbage line\n\n", b": comment\n\n", *EVENTS[1:]]
    async with scripted_upstream(Script(chunks=wire)) as up:
        client = await gateway_factory(up.url)
        resp = await post(client, request("hi", True))
        assert await resp.read() == b"".join(wire)
        await assert_history_is_completed_turns(client, up, rows, [("hi", "Hello world")])


@pytest.mark.parametrize(
    ("wire", "framing"),
    [
        (EVENTS[:4], "chunked"),  # older llama.cpp servers: no [DONE] at all
        (EVENTS[:4], "close"),  # ... and a body that ends with the connection
        ([*EVENTS[:4], b"data: [DONE]\n"], "chunked"),  # [DONE] without its blank line
        ([*EVENTS[:4], b"data: [DONE]"], "length"),
    ],
    ids=["no-done", "no-done-close-framing", "done-unfinished", "done-without-newline"],
)
async def test_a_finished_answer_whose_body_ends_without_done_is_kept(
    gateway_factory: GatewayFactory, rows: Rows, wire: list[bytes], framing: Framing
) -> None:
    """A body that ends whole after choice 0's finish_reason, without a whole ``[DONE]``
    event: the answer is complete (the OpenAI SDKs take it so), so it is remembered and
    the client gets the upstream's bytes as they came, with no error event (h58).  It
    was an ``upstream_incomplete`` error, and the turn was lost."""
    async with scripted_upstream(Script(chunks=list(wire), framing=framing)) as up:
        client = await gateway_factory(up.url)
        resp = await post(client, request("hi", True))
        assert await resp.read() == b"".join(wire)
        await assert_history_is_completed_turns(client, up, rows, [("hi", "Hello world")])


async def test_two_faults_in_a_row_between_good_turns(
    gateway_factory: GatewayFactory, rows: Rows
) -> None:
    async with scripted_upstream(good_stream("one")) as up:
        client = await gateway_factory(up.url, upstream=FAST_TIMEOUTS)
        await (await post(client, request("u1", True))).read()
        for script in (Script(chunks=EVENTS[:2], end="reset"), Script(before_headers="garbage")):
            up.script = script
            await (await post(client, request("lost", True))).read()
        up.script = good_stream("two")
        await (await post(client, request("u2", False))).read()
        await assert_history_is_completed_turns(client, up, rows, [("u1", "one"), ("u2", "two")])


def test_fault_table_covers_the_issue() -> None:
    """The issue's list of faults, each with a stream and (where it applies) a plain case."""
    names = set(FAULTS)
    for required in [
        "refused-stream",
        "refused-plain",
        "reset-before-headers-stream",
        "reset-before-headers-plain",
        "reset-mid-stream",
        "reset-mid-json-event",
        "silence-mid-stream",
        "silence-before-headers-plain",
        "400-json-stream",
        "500-html-plain",
        "eof-without-done",
        "done-without-finish-reason",
        "garbage-bytes-only",
        "garbage-data-mid-stream",
    ]:
        assert required in names


async def test_events_after_done_do_not_change_the_outcome(
    gateway_factory: GatewayFactory, rows: Rows
) -> None:
    """An incomplete answer whose [DONE] is followed, in the same read, by an upstream
    error event: the client still gets our error in front of [DONE] (found by
    test_hostile_upstream; the trailing event used to suppress it)."""
    late_error = sse({"error": {"message": "late"}})
    wire = [*EVENTS[:3], sse("[DONE]") + late_error]
    async with scripted_upstream(Script(chunks=wire)) as up:
        client = await gateway_factory(up.url)
        body = await (await post(client, request("q", True))).read()
        parts = split_error_event(body)
        assert parts is not None
        before, error, after = parts
        assert before == b"".join(EVENTS[:3])
        assert error["code"] == "upstream_incomplete"
        assert after == sse("[DONE]") + late_error
        await assert_history_is_completed_turns(client, up, rows, [])
