"""ChatRequest.upstream_body splices the stored history (already JSON) into the client's
body: the result must parse to exactly the body the dict path built, with one
``messages`` key holding the system prompt, the history, then the request's messages."""

from __future__ import annotations

import json
from typing import Any

import pytest
from helpers import sendable, strict_loads
from hypothesis import given
from hypothesis import strategies as st

from chatmem import jsonio
from chatmem.proxy.chat_request import ChatRequest, parse_chat_request
from chatmem.proxy.http import json_object
from chatmem.storage import History

SYSTEM = [{"role": "system", "content": "stored system é"}]
STORED = [
    {"role": "user", "content": 'a "quote" \\ \n 🦊'},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "t", "type": "function"}]},
    {"role": "tool", "tool_call_id": "t", "content": [{"type": "text", "text": "42"}]},
]


def dict_path(chat: ChatRequest, history: History) -> dict[str, Any]:
    """The body as it was built before the splice: decode everything, encode it once."""
    system = chat.system if chat.system is not None else (history.system or [])
    body = dict(chat.body)
    body["messages"] = [*system, *history.messages, *chat.messages]
    return body


def request(body: dict[str, Any]) -> ChatRequest:
    return parse_chat_request(json_object(jsonio.dumps(body)), "c")


histories = [
    History(system=None),
    History(system=SYSTEM),
    History.from_messages(None, STORED),
    History.from_messages(SYSTEM, STORED),
]


@pytest.mark.parametrize("history", histories)
@pytest.mark.parametrize(
    "body",
    [
        {"messages": []},
        {"messages": [{"role": "user", "content": "hi"}]},
        {"messages": [{"role": "system", "content": "mine"}]},
        {"messages": [{"role": "developer", "content": "d"}, {"role": "user", "content": "u"}]},
        {
            "model": "m",
            "messages": [{"role": "user", "content": "q"}],
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": 0.2,
            "stop": ["\n", "}"],
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
            "vendor_x": {"nested": [1, None, "é", {"messages": "not these"}]},
            "user": "u-1",
        },
        {"messages": [{"role": "user", "content": "q"}], "stream": False, "model": "m"},
    ],
)
def test_splice_equals_the_dict_path(body: dict[str, Any], history: History) -> None:
    chat = request(body)
    spliced = chat.upstream_body(history)
    assert strict_loads(spliced) == dict_path(chat, history)


@pytest.mark.parametrize("history", histories)
def test_body_without_messages(history: History) -> None:
    """/v1/ask builds its own body, which has no "messages" key, and may have no key at all."""
    for body in ({}, {"model": "m", "stream": False}):
        chat = ChatRequest(
            body=body,
            conversation_id="c",
            system=None,
            messages=[{"role": "user", "content": "q"}],
            stream=False,
        )
        assert strict_loads(chat.upstream_body(history)) == dict_path(chat, history)


def test_nothing_to_send_is_an_empty_array() -> None:
    chat = ChatRequest(body={}, conversation_id="c", system=None, messages=[], stream=False)
    assert chat.upstream_body(History(system=None)) == b'{"messages":[]}'


def test_history_as_stored_by_sqlalchemy() -> None:
    """Rows written through SQLAlchemy's JSON type hold json.dumps text (ASCII escapes,
    spaces); spliced as they are, they parse the same."""
    encoded = ",".join(json.dumps(m) for m in STORED).encode()
    assert b"\\u00e9" not in encoded and b'", "' in encoded
    chat = request({"model": "m", "messages": [{"role": "user", "content": "q"}]})
    assert strict_loads(chat.upstream_body(History(None, encoded))) == dict_path(
        chat, History.from_messages(None, STORED)
    )


def test_history_messages_decode_what_is_encoded() -> None:
    assert History.from_messages(SYSTEM, STORED).messages == STORED
    assert History(system=None).messages == []


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=10,
)


messages = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant", "tool"])},
    optional={"content": st.text() | st.none(), "extra": json_values},
).map(sendable)


@given(
    extra=st.dictionaries(st.text(max_size=10), json_values, max_size=6),
    sent=st.lists(messages, max_size=4),
    system=st.none() | st.lists(messages, max_size=2),
    stored=st.lists(messages, max_size=4),
)
def test_generated_bodies(
    extra: dict[str, Any],
    sent: list[dict[str, Any]],
    system: list[dict[str, Any]] | None,
    stored: list[dict[str, Any]],
) -> None:
    body = {key: value for key, value in extra.items() if key != "conversation"}
    chat = request({**body, "messages": sent, "stream": False})
    history = History.from_messages(system, stored)
    assert strict_loads(chat.upstream_body(history)) == dict_path(chat, history)
