"""Hostile requests against a running gateway: generated bodies, headers and conversation
ids never get a 5xx, never crash it, and never leave anything in the store but the exact
messages of a turn that completed."""

from __future__ import annotations

import json
import string
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import sendable
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from live import LiveGateway

from chatmem.proxy.chat_request import valid_conversation_id

EXAMPLES = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ROLES = ["system", "developer", "user", "assistant", "tool", "function"]
FIELDS = ["model", "messages", "stream", "conversation", "role", "content", "tool_calls", "id"]
ID_CHARS = string.ascii_letters + string.digits + "._:-"


@pytest.fixture
def live(tmp_path: Path) -> Iterator[LiveGateway]:
    with LiveGateway(tmp_path / "hostile.db") as gateway:
        yield gateway


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(ROLES),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
conversation_ids = (
    st.text(alphabet=ID_CHARS, min_size=1, max_size=128)
    | st.text(max_size=140)
    | st.builds(lambda s: {"id": s}, st.text(alphabet=ID_CHARS, min_size=1, max_size=10))
    | json_values
)
# Plausible: what a client sends and the gateway takes (no lone surrogates, no NUL in the
# fields that pair messages, content as chat servers want it); hostile_messages are the rest.
plain_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
identifier = st.text(st.characters(exclude_characters="\x00", exclude_categories=("Cs",)))
text_parts = st.lists(
    st.fixed_dictionaries({"type": st.just("text"), "text": plain_text}), min_size=1
)
plausible_messages = st.fixed_dictionaries(
    {"role": st.sampled_from(ROLES), "content": plain_text | text_parts},
    optional={"name": identifier.filter(lambda s: len(s) <= 10), "tool_call_id": identifier},
).map(sendable)
hostile_messages = st.fixed_dictionaries(
    {"role": st.sampled_from(ROLES) | json_values},
    optional={"content": json_values, "tool_calls": json_values, "name": json_values},
)
plausible_bodies = st.fixed_dictionaries(
    {"model": st.text(max_size=10), "messages": st.lists(plausible_messages, max_size=4)},
    optional={
        "stream": st.booleans(),
        "conversation": st.text(alphabet=ID_CHARS, min_size=1, max_size=128),
        "temperature": st.floats(allow_nan=False),
        "unknown_field": json_values,
    },
)
hostile_bodies = st.fixed_dictionaries(
    {"messages": st.lists(hostile_messages | plausible_messages, max_size=4) | json_values},
    optional={
        "model": json_values,
        "stream": json_values,
        "conversation": conversation_ids,
        "max_tokens": st.integers(min_value=-3, max_value=5) | json_values,
        "n": st.integers(min_value=-1, max_value=3),
    },
)


def safe_header_value(value: str) -> bool:
    return all(32 <= ord(c) < 127 for c in value) and value == value.strip()


def test_generated_json_bodies(live: LiveGateway) -> None:
    statuses: Counter[int] = Counter()
    generated_json_body(live, statuses)
    # Not vacuous: many generated requests got through to the model and into the store
    # (20-67 of the 120 in eight runs: a plausible body also meets a header naming
    # another conversation, a 400).
    assert statuses[200] >= 10, statuses
    assert statuses[400] >= 20, statuses


@EXAMPLES
@given(
    body=plausible_bodies | hostile_bodies | json_values,
    header_id=st.none() | st.text(alphabet=ID_CHARS, max_size=130) | st.text(max_size=20),
)
def generated_json_body(
    live: LiveGateway, statuses: Counter[int], body: Any, header_id: str | None
) -> None:
    headers = {"Content-Type": "application/json"}
    if header_id is not None and safe_header_value(header_id):
        headers["X-Conversation-Id"] = header_id
    before = live.message_count()

    async def send() -> tuple[int, bytes, str | None]:
        resp = await live.mocked.post(
            "/v1/chat/completions", data=json.dumps(body), headers=headers
        )
        return resp.status, await resp.read(), resp.headers.get("X-Conversation-Id")

    status, raw, conversation_id = live.run(send())
    statuses[status] += 1
    assert status < 500, raw
    if status != 200:
        assert "error" in json.loads(raw)
        assert live.message_count() == before  # a refused request stores nothing
        return
    assert conversation_id is not None
    valid_conversation_id(conversation_id, "X-Conversation-Id")
    # Exactly the turn: the request's non-system messages as sent, then the answer.
    sent = [m for m in body["messages"] if m["role"] not in ("system", "developer")]
    assert live.message_count() == before + len(sent) + 1
    turn = live.stored(conversation_id)[-len(sent) - 1 :]
    assert [m["role"] for m in turn] == [*(m["role"] for m in sent), "assistant"]
    for row, message in zip(turn, sent, strict=False):
        content = None if row["content"] is None else json.loads(row["content"])
        assert content == message.get("content")


def test_generated_raw_bodies(live: LiveGateway) -> None:
    generated_raw_body(live)


@EXAMPLES
@given(raw=st.binary(max_size=300) | st.builds(lambda n: b"[" * n, st.integers(900, 200_000)))
def generated_raw_body(live: LiveGateway, raw: bytes) -> None:
    async def send() -> tuple[int, Any]:
        resp = await live.mocked.post("/v1/chat/completions", data=raw)
        return resp.status, await resp.json()

    before = live.message_count()
    status, body = live.run(send())
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    assert live.message_count() == before


def test_deeply_nested_json_is_400_not_500(live: LiveGateway) -> None:
    """Found by the generated bodies: json.loads raises RecursionError, not ValueError."""

    async def send(raw: bytes) -> tuple[int, Any]:
        resp = await live.mocked.post("/v1/chat/completions", data=raw)
        return resp.status, await resp.json()

    nested = b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    for raw in (b"[" * 100_000, nested):
        status, body = live.run(send(raw))
        assert status == 400
        assert body["error"]["message"] == "request body is not valid JSON"
