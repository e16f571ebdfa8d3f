"""Generated upstream SSE streams through the real gateway (scripted upstream, real tee):
every whole upstream event reaches the client byte for byte (an event the upstream left
unfinished when it failed does not), the gateway adds at most one error event and only
on an event boundary before ``[DONE]``, it never fails, and it stores the turn exactly
when the client saw no error."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import chunk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from live import LiveGateway
from scripted_upstream import Script

from chatmem.proxy.sse import SSEParser

REQUEST = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "q"}]}


@pytest.fixture
def live(tmp_path: Path) -> Iterator[LiveGateway]:
    with LiveGateway(tmp_path / "sse.db", upstream={"read_timeout": 5}) as gateway:
        yield gateway


def data_event(payload: Any, newline: bytes) -> bytes:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return b"data: " + data + newline + newline


newlines = st.sampled_from([b"\n", b"\r\n", b"\r"])
texts = st.text(max_size=12)
events = st.one_of(
    st.builds(lambda t, n: data_event(chunk(t), n), texts, newlines),
    st.builds(lambda t, n: data_event(chunk(t, role="assistant"), n), texts, newlines),
    st.builds(
        lambda r, n: data_event(chunk(finish=r), n), st.sampled_from(["stop", "length"]), newlines
    ),
    st.builds(lambda n: data_event(b"[DONE]", n), newlines),
    st.builds(lambda n: b": keepalive" + n + n, newlines),
    st.builds(lambda n: data_event({"error": {"message": "model died"}}, n), newlines),
    st.builds(lambda n: b"data: {broken" + n + n, newlines),
    st.binary(max_size=16),
    st.builds(lambda n: data_event(chunk("x" * 20_000), n), newlines),  # too big to hold back
)
complete_answers = st.builds(
    lambda text, n: [
        data_event(chunk("", role="assistant"), n),
        data_event(chunk(text), n),
        data_event(chunk(finish="stop"), n),
        data_event(b"[DONE]", n),
    ],
    texts,
    newlines,
)


@st.composite
def upstream_streams(draw: st.DrawFn) -> tuple[bytes, list[bytes | float], str]:
    """A stream (often nearly a whole answer), cut into reads at random places."""
    pieces = draw(complete_answers | st.lists(events, max_size=6))
    if draw(st.booleans()):  # mutate a complete answer: drop, insert or truncate
        pieces = list(pieces)
        for _ in range(draw(st.integers(0, 2))):
            at = draw(st.integers(0, len(pieces)))
            if draw(st.booleans()):
                pieces.insert(at, draw(events))
            else:
                del pieces[at : at + 1]
    wire = b"".join(pieces)
    if wire and draw(st.booleans()):
        wire = wire[: draw(st.integers(0, len(wire)))]
    cuts = sorted(set(draw(st.lists(st.integers(0, len(wire)), max_size=6))))
    chunks: list[bytes | float] = []
    for start, end in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        if wire[start:end]:
            chunks += [wire[start:end], 0.002]
    end = draw(st.sampled_from(["ok", "ok", "reset"]))
    return wire, chunks, end


EXAMPLES = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
GATEWAY_ERROR = b'"type": "upstream_error", "param": null, "code": "upstream_'


def dispatched(body: bytes) -> list[str]:
    return SSEParser().feed(body)


def on_event_boundary(sent: bytes) -> bool:
    """True when an event written after ``sent`` reaches a client's parser intact."""
    probe = b"data: probe\n\n"
    return dispatched(sent + probe) == [*dispatched(sent), "probe"]


def completed(events: list[str], whole: bool) -> bool:
    """An independent reading of "the answer completed": [DONE] came, or the body ended
    ``whole`` without it; every event before is a JSON object without an error, and one
    of them finished choice 0."""
    if "[DONE]" not in events and not whole:
        return False
    finished = False
    for data in events[: events.index("[DONE]")] if "[DONE]" in events else events:
        try:
            parsed = json.loads(data)
        except ValueError:
            return False
        if not isinstance(parsed, dict) or parsed.get("error") is not None:
            return False
        for choice in parsed.get("choices") or []:
            finished = finished or bool(choice.get("index") == 0 and choice.get("finish_reason"))
    return finished


def is_error_event(data: str) -> bool:
    try:
        parsed = json.loads(data)
    except ValueError:
        return False
    return isinstance(parsed, dict) and parsed.get("error") is not None


def test_generated_streams_through_the_gateway(
    live: LiveGateway, caplog: pytest.LogCaptureFixture
) -> None:
    outcomes: Counter[str] = Counter()
    generated_stream(live, outcomes)
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    # Not vacuous: both kinds of outcome were generated many times.
    assert outcomes["stored"] >= 15 and outcomes["gateway error"] >= 15, outcomes


@EXAMPLES
@given(stream=upstream_streams())
def generated_stream(
    live: LiveGateway, outcomes: Counter[str], stream: tuple[bytes, list[bytes | float], str]
) -> None:
    wire, chunks, end = stream
    live.scripted.script = Script(chunks=chunks, end=end)
    conversation = f"sse-{sum(outcomes.values())}"

    async def send() -> tuple[int, bytes]:
        resp = await live.direct.post(
            "/v1/chat/completions", json=REQUEST, headers={"X-Conversation-Id": conversation}
        )
        return resp.status, await resp.read()

    status, body = live.run(send())
    assert status == 200
    stored = live.stored(conversation)
    marker = body.find(GATEWAY_ERROR)
    if marker < 0:
        assert body == wire  # every byte, nothing else
        events = dispatched(body)
        until_done = events[: events.index("[DONE]")] if "[DONE]" in events else events
        upstream_error = any(is_error_event(d) for d in until_done)  # after [DONE]: too late
        # With no error shown, the answer must really have completed, and is stored.
        assert upstream_error or completed(events, whole=end == "ok"), body
        outcomes["upstream error" if upstream_error else "stored"] += 1
        assert [m["role"] for m in stored] == ([] if upstream_error else ["user", "assistant"])
        return
    outcomes["gateway error"] += 1
    assert stored == []
    start = body.rindex(b"data: ", 0, marker)
    stop = body.index(b"\n\n", marker) + 2
    before, after = body[:start], body[stop:]
    assert after.find(GATEWAY_ERROR) < 0  # one error event at most
    assert on_event_boundary(before)
    assert "[DONE]" not in dispatched(before)  # before [DONE]: a client stops reading there
    if not wire.startswith(before + after) and before.endswith(b"\r\n"):
        # The last event ended on a CR, and an LF went after it before the error event
        # (CRLF ends a line as CR does; clients that split on LF read the error whole).
        before = before[:-1]
        assert on_event_boundary(before)
    # What did not reach the client is an event the upstream never finished.
    assert wire.startswith(before + after)
    assert dispatched(wire[len(before + after) :]) == []
