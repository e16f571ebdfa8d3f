"""/v1/chat/completions with memory: what goes upstream, what is stored, what comes back."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp.test_utils import TestClient, TestServer
from helpers import COMPRESS, GatewayFactory, Rows, chat_completion, received, upstream_url
from scripted_upstream import Script, scripted_upstream
from yarl import URL

from chatmem.config import StorageConfig
from chatmem.proxy.chat_request import valid_conversation_id
from chatmem.state import GATEWAY
from chatmem.storage import Owner, Store, create_engine

Client = TestClient[Any, Any]


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


async def chat(
    client: Client, messages: list[dict[str, Any]], conv: str | None = "c1", **body: Any
) -> Any:
    headers = {"X-Conversation-Id": conv} if conv else {}
    resp = await client.post(
        "/v1/chat/completions",
        json={"model": "m", "messages": messages, **body},
        headers=headers,
    )
    return resp


def sent_messages(upstream: TestServer, index: int = -1) -> list[dict[str, Any]]:
    chats = [r for r in received(upstream) if r.path == "/v1/chat/completions"]
    messages: list[dict[str, Any]] = chats[index].json["messages"]
    return messages


async def test_history_is_prepended_in_order(gateway: Client, upstream: TestServer) -> None:
    first = await chat(gateway, [user("one")])
    assert first.status == 200
    answer1 = (await first.json())["choices"][0]["message"]["content"]
    second = await chat(gateway, [user("two")])
    assert second.status == 200
    answer2 = (await second.json())["choices"][0]["message"]["content"]
    await chat(gateway, [user("three")])
    assert sent_messages(upstream) == [
        user("one"),
        {"role": "assistant", "content": answer1},
        user("two"),
        {"role": "assistant", "content": answer2},
        user("three"),
    ]


async def test_a_trailing_slash_keeps_the_memory(
    gateway: Client, upstream: TestServer, rows: Rows
) -> None:
    """``/v1/chat/completions/``: the same turn, not a plain relay of its own (which would
    have forwarded ``conversation`` and remembered nothing)."""
    first = await chat(gateway, [user("one")])
    answers = [(await first.json())["choices"][0]["message"]["content"]]
    # A doubled slash too: a base URL ending in /v1/ joined to /chat/completions; and an
    # escaped one, which aiohttp's router keeps escaped and uvicorn decodes (item 134).
    paths = (
        "/v1/chat/completions/",
        "/v1//chat/completions",
        "/v1/chat//completions//",
        "/v1/chat%2Fcompletions",
    )
    for number, path in enumerate(paths):
        resp = await gateway.post(
            path, json={"model": "m", "messages": [user(path)], "conversation": "c1"}
        )
        assert resp.status == 200 and resp.headers["X-Conversation-Id"] == "c1"
        sent = received(upstream)[-1]
        assert sent.path == "/v1/chat/completions" and "conversation" not in sent.json
        history = [user("one"), {"role": "assistant", "content": answers[0]}]
        for earlier, answer in zip(paths[:number], answers[1:], strict=True):
            history += [user(earlier), {"role": "assistant", "content": answer}]
        assert sent_messages(upstream) == [*history, user(path)]
        answers.append((await resp.json())["choices"][0]["message"]["content"])
    assert [m["role"] for m in rows.messages("c1")] == ["user", "assistant"] * 5
    # And counted as the chat route's, not as relayed (h69).
    metrics = await (await gateway.get("/metrics")).text()
    assert 'chatmem_requests_total{route="chat",status="200"} 5.0' in metrics
    assert 'route="passthrough"' not in metrics


async def test_rows_hold_the_turn_in_order(gateway: Client, rows: Rows) -> None:
    resp = await chat(gateway, [user("hello")])
    body = await resp.json()
    stored = rows.messages("c1")
    assert [(m["seq"], m["role"]) for m in stored] == [(1, "user"), (2, "assistant")]
    assert json.loads(stored[0]["content"]) == "hello"
    assistant = stored[1]
    assert json.loads(assistant["content"]) == body["choices"][0]["message"]["content"]
    assert assistant["finish_reason"] == "stop"
    assert assistant["model"] == "m"
    assert json.loads(assistant["usage"]) == body["usage"]
    assert assistant["tool_calls"] is None
    assert stored[0]["tenant"] == "default"


async def test_conversation_from_body_is_stripped(gateway: Client, upstream: TestServer) -> None:
    for value in ("body-id", {"id": "body-id"}):
        resp = await chat(gateway, [user("x")], conv=None, conversation=value)
        assert resp.status == 200
        assert resp.headers["X-Conversation-Id"] == "body-id"
        assert "conversation" not in received(upstream)[-1].json
    assert len(sent_messages(upstream)) == 3  # the first exchange came back as history


async def test_a_null_conversation_field_names_none(gateway: Client, upstream: TestServer) -> None:
    resp = await chat(gateway, [user("x")], conv=None, conversation=None)
    assert resp.status == 200
    assert resp.headers["X-Conversation-Id"].startswith("conv_")
    assert "conversation" not in received(upstream)[-1].json


@pytest.mark.parametrize(
    ("header", "body", "named"),
    [
        ("h1", b"{not json", "h1"),
        ("h1", b'{"model": "m", "messages": [], "conversation": "b1"}', "h1"),
        (None, b"{not json", None),
        ("bad id!", b'{"model": "m", "messages": []}', None),
        # Named in the body, then a later field refused: under the body's id (item 135).
        (None, b'{"model": "m", "messages": "bad", "conversation": "b1"}', "b1"),
        (None, b'{"messages": [], "stream": "no", "conversation": {"id": "b2"}}', "b2"),
        ("b3", b'{"messages": [], "functions": [], "conversation": "b3"}', "b3"),
        (None, b'{"messages": [], "conversation": "bad id!"}', None),
    ],
    ids=[
        "bad-json",
        "body-names-another",
        "bad-json-no-header",
        "invalid-header",
        "body-names-then-bad-messages",
        "body-object-names-then-bad-stream",
        "both-name-then-deprecated-field",
        "invalid-body-id",
    ],
)
async def test_an_error_names_the_headers_conversation_or_a_fresh_one(
    gateway: Client, rows: Rows, header: str | None, body: bytes, named: str | None
) -> None:
    headers = {"Content-Type": "application/json"}
    if header is not None:
        headers["X-Conversation-Id"] = header
    resp = await gateway.post("/v1/chat/completions", data=body, headers=headers)
    assert resp.status == 400
    if named is None:
        assert resp.headers["X-Conversation-Id"].startswith("conv_")
    else:
        assert resp.headers["X-Conversation-Id"] == named
    assert rows.conversations() == []


async def test_a_number_too_large_for_a_float_is_a_400(
    gateway: Client, upstream: TestServer
) -> None:
    raw = b'{"model": "m", "messages": [], "seed": 123456789012345678901234, "top_p": 1e400}'
    resp = await gateway.post("/v1/chat/completions", data=raw)
    assert resp.status == 400
    assert (await resp.json())["error"]["message"] == "request body is not valid JSON"
    assert received(upstream) == []


async def test_integers_beyond_64_bits_go_upstream_unchanged(
    gateway: Client, upstream: TestServer
) -> None:
    # JSON allows them; the contract passes every other body field on unchanged.
    raw = (
        b'{"model": "m", "messages": [{"role": "user", "content": "x"}],'
        b' "seed": 123456789012345678901234567890, "low": -9223372036854775809,'
        b' "top": 18446744073709551615}'
    )
    resp = await gateway.post(
        "/v1/chat/completions", data=raw, headers={"X-Conversation-Id": "big"}
    )
    assert resp.status == 200
    sent = received(upstream)[-1].body
    assert b'"seed":123456789012345678901234567890' in sent
    assert b'"low":-9223372036854775809' in sent
    assert b'"top":18446744073709551615' in sent


async def test_two_conversation_headers_must_agree(
    gateway: Client, upstream: TestServer, rows: Rows
) -> None:
    body = {"model": "m", "messages": [user("x")]}
    name = "X-Conversation-Id"
    resp = await gateway.post(
        "/v1/chat/completions", json=body, headers=[(name, "d1"), (name, "d2")]
    )
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert (error["message"], error["param"]) == (
        "X-Conversation-Id headers name different conversations",
        "X-Conversation-Id",
    )
    assert received(upstream) == [] and rows.messages() == []
    resp = await gateway.post(
        "/v1/chat/completions", json=body, headers=[(name, "d1"), (name, "d1")]
    )
    assert resp.status == 200 and resp.headers[name] == "d1"


async def test_new_conversation_gets_an_id(gateway: Client, rows: Rows) -> None:
    resp = await chat(gateway, [user("x")], conv=None)
    conv = resp.headers["X-Conversation-Id"]
    assert conv.startswith("conv_") and len(conv) > 20
    other = await chat(gateway, [user("x")], conv=None)
    assert other.headers["X-Conversation-Id"] != conv
    assert [c["id"] for c in rows.conversations()] == [conv, other.headers["X-Conversation-Id"]]


async def test_a_conversation_the_gateway_names_is_not_read_first(
    gateway: Client, upstream: TestServer, rows: Rows
) -> None:
    """Nothing can be stored under a ``conv_`` id the gateway has just chosen: its first
    turn reads nothing and creates the conversation with a plain insert; the next turn,
    which names it, reads it as usual."""
    turns = gateway.server.app[GATEWAY].store._turns
    assert turns is not None
    statements: list[str] = []
    turns._loop_connection().set_trace_callback(statements.append)
    first = await chat(gateway, [user("one")], conv=None)
    assert first.status == 200
    conv = first.headers["X-Conversation-Id"]
    assert not [s for s in statements if s.startswith("SELECT")]
    assert any(s.startswith("INSERT INTO conversations") for s in statements)
    assert not [s for s in statements if "ON CONFLICT" in s]
    answer = (await first.json())["choices"][0]["message"]["content"]
    statements.clear()
    second = await chat(gateway, [user("two")], conv=conv)
    assert second.status == 200
    assert any(s.startswith("SELECT pk, system_prompt, last_seq FROM") for s in statements)
    assert sent_messages(upstream) == [
        user("one"),
        {"role": "assistant", "content": answer},
        user("two"),
    ]
    assert [m["seq"] for m in rows.messages(conv)] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("reasoning", {"x": 1}, "reasoning must be a string"),
        # Stored as reasoning: it was dropped without a word (item 145).
        ("reasoning_content", {"x": 1}, "reasoning_content must be a string"),
        ("model", "m" * 256, "model must be a string of at most 255 characters"),
        ("finish_reason", "s" * 65, "finish_reason must be a string of at most 64"),
        ("name", ["n"], "name must be a string of at most 255"),
        ("name", "a\x00b", "name must not contain NUL characters"),  # PostgreSQL refuses it
        ("tool_call_id", "c\x00", "tool_call_id must not contain NUL characters"),
    ],
)
async def test_a_message_field_the_store_cannot_take_is_a_400_before_the_model_is_asked(
    gateway: Client, upstream: TestServer, rows: Rows, field: str, value: Any, fragment: str
) -> None:
    earlier = {"role": "assistant", "content": "earlier", field: value}
    for path, body in (
        ("/v1/chat/completions", {"model": "m", "messages": [earlier, user("now")]}),
        ("/v1/conversations", {"items": [earlier]}),
    ):
        resp = await gateway.post(path, json=body)
        assert resp.status == 400, path
        error = (await resp.json())["error"]
        assert fragment in error["message"] and error["param"].endswith(f"[0].{field}")
    assert received(upstream) == [] and rows.conversations() == []


CALL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}


@pytest.mark.parametrize(
    ("message", "param", "fragment"),
    [
        ({"role": "assistant", "tool_calls": "x"}, "tool_calls", "must be an array of objects"),
        ({"role": "assistant", "tool_calls": [5]}, "tool_calls", "must be an array of objects"),
        ({"role": "assistant", "tool_calls": [{**CALL, "id": 5}]}, "tool_calls[0].id", "id"),
        (
            {"role": "assistant", "tool_calls": [{**CALL, "function": {"name": "f"}}]},
            "tool_calls[0].function",
            "string name and string arguments",
        ),
        ({"role": "tool", "content": "r"}, "tool_call_id", "required for a tool message"),
        ({"role": "user"}, "content", "only an assistant message, or an older history's"),
        ({"role": "system", "content": None}, "content", "only an assistant message"),
        ({"role": "user", "content": []}, "content", "must not be an empty array"),
        ({"role": "user", "content": [5]}, "content[0]", "must be a content part"),
        ({"role": "user", "content": [{"text": "a"}]}, "content[0].type", "must be a string"),
    ],
)
async def test_a_message_no_later_turn_could_send_is_a_400(
    gateway: Client,
    upstream: TestServer,
    rows: Rows,
    message: dict[str, Any],
    param: str,
    fragment: str,
) -> None:
    """What a turn stores goes up again with every later turn, and the store pairs tool
    results with their calls by these fields: a lenient server answering once must not
    leave a conversation that a strict one (or the store) cannot read."""
    resp = await chat(gateway, [user("before"), message])
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["param"] == f"messages[1].{param}" and fragment in error["message"]
    assert received(upstream) == [] and rows.conversations() == []


async def test_messages_every_chat_server_takes_still_pass(gateway: Client, rows: Rows) -> None:
    turn = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        user("hi"),
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "42"},
        {"role": "assistant", "content": None, "refusal": "no"},  # the server judges this one
        {"role": "function", "name": "f", "content": None},  # OpenAI's type: Optional[str]
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]},
    ]
    resp = await chat(gateway, turn)
    assert resp.status == 200
    assert [m["role"] for m in rows.messages("c1")] == [
        *("user", "assistant", "tool", "assistant", "function", "user", "assistant")
    ]


@pytest.mark.parametrize("encoding", ["gzip", "br", "zstd"])
async def test_a_compressed_request_body_is_read_and_sent_on_as_plain_json(
    gateway: Client, upstream: TestServer, encoding: str
) -> None:
    raw = json.dumps({"model": "m", "messages": [user("zipped")]}).encode()
    resp = await gateway.post(
        "/v1/chat/completions",
        data=COMPRESS[encoding](raw),
        headers={"Content-Encoding": encoding, "Content-Type": "application/json"},
    )
    assert resp.status == 200
    sent = received(upstream)[-1]
    assert sent.json["messages"] == [user("zipped")]
    assert "content-encoding" not in {k.lower() for k in sent.headers}


async def test_invalid_ids_are_400(gateway: Client, upstream: TestServer, rows: Rows) -> None:
    for bad in ("", "a" * 129, "has space", "slash/id", "ünïcode", ".", ".."):
        resp = await gateway.post(
            "/v1/chat/completions",
            json={"model": "m", "messages": [user("x")], "conversation": bad},
        )
        assert resp.status == 400, bad
        error = (await resp.json())["error"]
        assert error["type"] == "invalid_request_error"
        assert error["param"] == "conversation"
    resp = await chat(gateway, [user("x")], conv="bad id")
    assert resp.status == 400
    assert (await resp.json())["error"]["param"] == "X-Conversation-Id"
    assert received(upstream) == []
    assert rows.messages() == []


async def test_errors_before_an_id_is_known_still_name_a_conversation(
    gateway_factory: GatewayFactory, upstream: TestServer, rows: Rows
) -> None:
    """Every response carries X-Conversation-Id: a request that fails before naming one
    gets the id a new conversation would have had, under which nothing is stored."""
    client = await gateway_factory(
        upstream_url(upstream), server={"max_body_bytes": 1000}, auth={"jwt_secret": "s" * 32}
    )
    token = jwt.encode({"team_id": "t"}, "s" * 32)
    authorized = {"Authorization": f"Bearer {token}"}
    failures = [
        (401, b'{"messages": []}', {}),
        (400, b"not json", authorized),
        (400, b"[1]", authorized),
        (400, b'{"messages": "hi"}', authorized),
        (400, b'{"messages": []}', {**authorized, "X-Conversation-Id": "bad id"}),
        (413, b'{"messages": [], "pad": "' + b"x" * 2000 + b'"}', authorized),
    ]
    seen = set()
    for status, raw, headers in failures:
        resp = await client.post("/v1/chat/completions", data=raw, headers=headers)
        assert resp.status == status, raw
        conv = resp.headers["X-Conversation-Id"]
        assert conv.startswith("conv_") and valid_conversation_id(conv, "") == conv
        seen.add(conv)
    assert len(seen) == len(failures)
    named = await client.post(
        "/v1/chat/completions", data=b"not json", headers={**authorized, "X-Conversation-Id": "c"}
    )
    assert named.status == 400 and named.headers["X-Conversation-Id"] == "c"
    assert received(upstream) == [] and rows.conversations() == []


async def test_header_and_body_disagree_is_400(gateway: Client) -> None:
    resp = await chat(gateway, [user("x")], conv="a", conversation="b")
    assert resp.status == 400
    assert resp.headers["X-Conversation-Id"] == "a"


async def test_max_length_id_accepted(gateway: Client) -> None:
    conv = "A-z0.9_:" * 16
    resp = await chat(gateway, [user("x")], conv=conv)
    assert resp.status == 200
    assert resp.headers["X-Conversation-Id"] == conv


async def test_system_prompt_kept_and_replaced(
    gateway: Client, upstream: TestServer, rows: Rows
) -> None:
    system = {"role": "system", "content": "be brief"}
    await chat(gateway, [system, user("one")])
    assert [m["role"] for m in rows.messages("c1")] == ["user", "assistant"]
    await chat(gateway, [user("two")])
    assert sent_messages(upstream)[0] == system
    assert [m["role"] for m in sent_messages(upstream)] == ["system", "user", "assistant", "user"]
    developer = {"role": "developer", "content": "be verbose"}
    await chat(gateway, [developer, user("three")])
    assert sent_messages(upstream)[0] == developer
    await chat(gateway, [user("four")])
    assert sent_messages(upstream)[0] == developer
    assert sum(m["role"] in ("system", "developer") for m in sent_messages(upstream)) == 1


async def test_history_window_is_newest_n(
    gateway_factory: GatewayFactory, upstream: TestServer
) -> None:
    client = await gateway_factory(upstream_url(upstream), memory={"max_history_messages": 3})
    for word in ("a", "b", "c"):
        await chat(client, [user(word)])
    history = sent_messages(upstream)[:-1]
    # Four stored messages (a, A, b, B); the newest three go upstream.
    assert [m["role"] for m in history] == ["assistant", "user", "assistant"]
    assert history[1] == user("b")
    assert sent_messages(upstream)[-1] == user("c")


async def test_start_at_user_starts_a_cut_history_at_a_turn(
    gateway_factory: GatewayFactory, upstream: TestServer
) -> None:
    """Of the newest three of (a, A, b, B), A is the second half of a turn whose question
    was left out: chat templates such as Mistral's refuse a history that does not
    alternate from a user message, so with memory.start_at_user it starts at b."""
    memory = {"max_history_messages": 3, "start_at_user": True}
    client = await gateway_factory(upstream_url(upstream), memory=memory)
    for word in ("a", "b", "c"):
        await chat(client, [user(word)])
    history = sent_messages(upstream)[:-1]
    assert [m["role"] for m in history] == ["user", "assistant"]
    assert history[0] == user("b")


async def test_window_never_starts_with_orphan_tool_result(
    gateway_factory: GatewayFactory, upstream: TestServer
) -> None:
    client = await gateway_factory(upstream_url(upstream), memory={"max_history_messages": 2})
    call = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "t1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        ],
    }
    tool = {"role": "tool", "tool_call_id": "t1", "content": "42"}
    await chat(client, [user("q"), call, tool])
    # stored: user, assistant(call), tool, assistant(answer); newest 2 = tool, answer
    await chat(client, [user("next")])
    history = sent_messages(upstream)[:-1]
    assert [m["role"] for m in history] == ["assistant"]


async def test_window_never_starts_with_orphan_function_result(
    gateway_factory: GatewayFactory, upstream: TestServer
) -> None:
    # A result of the deprecated "function" role (older histories hold them), cut the
    # same way as a tool result.
    client = await gateway_factory(upstream_url(upstream), memory={"max_history_messages": 2})
    result = {"role": "function", "name": "f", "content": "42"}
    await chat(client, [user("q"), result])
    await chat(client, [user("next")])
    history = sent_messages(upstream)[:-1]
    assert [m["role"] for m in history] == ["assistant"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (
            {"messages": [{"role": "assistant", "content": None, "function_call": {"name": "f"}}]},
            "messages[0].function_call",
        ),
        ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
        ({"function_call": "auto"}, "function_call"),
    ],
)
async def test_the_deprecated_function_call_api_is_refused(
    gateway: Client, upstream: TestServer, rows: Rows, body: dict[str, Any], param: str
) -> None:
    """Its function_call has no column: stored, the call was lost and every later turn
    sent an assistant message with null content and nothing else, which servers refuse."""
    resp = await chat(gateway, [user("q")], **body) if "messages" not in body else None
    if resp is None:
        resp = await gateway.post(
            "/v1/chat/completions",
            json={"model": "m", **body},
            headers={"X-Conversation-Id": "c1"},
        )
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["param"] == param and "send tools, and tool_calls" in error["message"]
    assert received(upstream) == [] and rows.messages() == []


async def test_tool_calls_round_trip(gateway: Client, upstream: TestServer, rows: Rows) -> None:
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]
    resp = await chat(gateway, [user("find it")], tools=tools, tool_choice="required", stream=True)
    await resp.read()
    stored = rows.messages("c1")[-1]
    calls = json.loads(stored["tool_calls"])
    assert calls == [
        {
            "id": "call_mock_0",
            "type": "function",
            "function": {"name": "lookup", "arguments": '{"echo":"find it"}'},
        }
    ]
    assert stored["finish_reason"] == "tool_calls"
    tool = {"role": "tool", "tool_call_id": "call_mock_0", "content": "found"}
    await chat(gateway, [tool])
    assert sent_messages(upstream) == [
        user("find it"),
        {"role": "assistant", "content": "", "tool_calls": calls},
        tool,
    ]


async def test_reasoning_kept_apart(gateway: Client, upstream: TestServer, rows: Rows) -> None:
    for stream in (False, True):
        resp = await gateway.post(
            "/v1/chat/completions",
            json={"model": "reasoner", "messages": [user("why")], "stream": stream},
            headers={"X-Conversation-Id": f"r{stream}"},
        )
        await resp.read()
        stored = rows.messages(f"r{stream}")[-1]
        assert stored["reasoning"] == "Thinking about it."
        assert "Thinking" not in json.loads(stored["content"])
    await chat(gateway, [user("again")], conv="rTrue")
    assert all("reasoning" not in m for m in sent_messages(upstream))


@pytest.mark.parametrize("mode", ["tool_turns", "always", "never"])
async def test_the_reasoning_of_a_tool_turn_goes_upstream_again(
    gateway_factory: GatewayFactory, upstream: TestServer, db_path: Path, mode: str
) -> None:
    """DeepSeek's thinking mode answers 400 to a history whose tool calls lost their
    reasoning (h58).  ``memory.resend_reasoning``: "tool_turns" (the default) sends the
    reasoning of the assistant messages that made tool calls or answer tool results
    again, as ``reasoning_content``; "always" every assistant message's; "never" none.
    Four turns: the later ones read the window from the window cache, extended at each
    commit, which must hold what a read of the rows gives (the SQLAlchemy path's)."""
    memory = {} if mode == "tool_turns" else {"memory": {"resend_reasoning": mode}}
    gateway = await gateway_factory(upstream_url(upstream), **memory)
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]
    asked = {"model": "reasoner", "tools": tools, "stream": True}
    called = await chat(gateway, [user("find it")], tool_choice="required", **asked)
    await called.read()
    tool = {"role": "tool", "tool_call_id": "call_mock_0", "content": "found"}
    await (await chat(gateway, [tool], **asked)).read()
    await (await chat(gateway, [user("thanks")], model="reasoner")).read()
    await (await chat(gateway, [user("again")])).read()

    thought = "Thinking about it."
    calls = [
        {
            "id": "call_mock_0",
            "type": "function",
            "function": {"name": "lookup", "arguments": '{"echo":"find it"}'},
        }
    ]
    with_calls = {"role": "assistant", "content": "", "tool_calls": calls}
    answer = sent_messages(upstream)[3]["content"]
    thanked = sent_messages(upstream)[5]
    kept = {"tool_turns": thought, "always": thought, "never": None}[mode]
    expected = [
        user("find it"),
        {**with_calls, "reasoning_content": kept},
        tool,
        {"role": "assistant", "content": answer, "reasoning_content": kept},
        user("thanks"),
        {**thanked, "reasoning_content": thought if mode == "always" else None},
        user("again"),
    ]
    expected = [{k: v for k, v in m.items() if v is not None} for m in expected]
    assert sent_messages(upstream) == expected
    assert sent_messages(upstream, 1) == expected[:3]  # the tool result's turn
    reader = Store(
        create_engine(StorageConfig(url=f"sqlite+aiosqlite:///{db_path}")),
        direct=False,
        resend_reasoning=mode,
    )
    try:
        history = await reader.load_history(Owner("default"), "c1", 200)
        assert history.messages[:-1] == expected  # and the last turn's plain answer
    finally:
        await reader.close()


async def test_an_answers_empty_tool_calls_are_no_calls(
    gateway_factory: GatewayFactory, rows: Rows
) -> None:
    """vLLM's non-streamed answers say ``"tool_calls": []``: stored as none, so that a
    later turn neither sends ``[]`` (OpenAI refuses it) nor takes the answer for a tool
    turn and sends its reasoning again (h60)."""
    message = {"role": "assistant", "content": "hi", "reasoning_content": "r", "tool_calls": []}
    answer = json.dumps(chat_completion(message)).encode()
    script = Script(headers={"Content-Type": "application/json"}, chunks=[answer], framing="length")
    said = {"role": "assistant", "content": "earlier", "reasoning_content": "q", "tool_calls": []}
    async with scripted_upstream(script) as up:
        gateway = await gateway_factory(up.url)
        assert (await chat(gateway, [user("a"), said, user("b")])).status == 200
        assert (await chat(gateway, [user("c")])).status == 200
        sent = json.loads(up.requests[-1][3])["messages"]
    assert sent == [
        user("a"),
        {"role": "assistant", "content": "earlier"},
        user("b"),
        {"role": "assistant", "content": "hi"},
        user("c"),
    ]
    assert [m["tool_calls"] for m in rows.messages("c1")] == [None] * 6


async def test_a_clients_assistant_message_without_content_is_stored_as_an_answer_is(
    gateway: Client, upstream: TestServer
) -> None:
    """OpenAI's typed assistant message may carry a ``refusal``, or ``audio: {"id"}``
    naming an earlier audio answer, and no content.  Stored as ``content: null``, both
    went up on every later turn as a message OpenAI refuses; they are stored as an
    answer is: the refusal as what was said, else ""."""
    refused = {"role": "assistant", "content": None, "refusal": "I can't help with that"}
    spoken = {"role": "assistant", "audio": {"id": "audio_abc123"}}
    turn = [user("a"), refused, user("b"), spoken, user("c")]
    assert (await chat(gateway, turn)).status == 200
    assert sent_messages(upstream)[:5] == turn  # this turn's go up as they came
    assert (await chat(gateway, [user("d")])).status == 200
    assert sent_messages(upstream)[:5] == [
        user("a"),
        {"role": "assistant", "content": "I can't help with that"},
        user("b"),
        {"role": "assistant", "content": ""},
        user("c"),
    ]


async def test_a_clients_reasoning_content_is_stored_as_reasoning(
    gateway: Client, upstream: TestServer, rows: Rows
) -> None:
    """A client's assistant message with DeepSeek's ``reasoning_content`` (an imported
    transcript, h50): stored as ``reasoning``, as an answer's is (it was lost); upstream,
    the message goes as it came, in that request only."""
    said = {"role": "assistant", "content": "a", "reasoning_content": "because"}
    both = {"role": "assistant", "content": "b", "reasoning": "kept", "reasoning_content": "x"}
    # (One that is not text is a 400, as a reasoning that is not: item 145.)
    await (await chat(gateway, [user("q"), said, both, user("next")], conv="rc")).read()
    assert sent_messages(upstream) == [user("q"), said, both, user("next")]
    stored = [m["reasoning"] for m in rows.messages("rc")]
    assert stored[:4] == [None, "because", "kept", None] and len(stored) == 5
    await (await chat(gateway, [user("again")], conv="rc")).read()
    assert all(
        "reasoning" not in m and "reasoning_content" not in m for m in sent_messages(upstream)
    )


async def test_a_chat_request_holds_at_most_2048_messages(
    gateway: Client, upstream: TestServer, rows: Rows
) -> None:
    """100,000 tiny messages (4 MB) held every other request for 0.37 s (h51): each is
    checked, sent and stored on the event loop. The conversation's are stored already."""
    many = [user(str(i)) for i in range(2049)]
    refused = await chat(gateway, many, conv="many")
    assert refused.status == 400
    error = (await refused.json())["error"]
    assert (error["param"], error["message"]) == (
        "messages",
        "messages must hold at most 2048 messages (the conversation's are stored: send the"
        " new ones)",
    )
    assert received(upstream) == [] and rows.messages("many") == []
    await (await chat(gateway, many[:2048], conv="many")).read()
    assert len(rows.messages("many")) == 2049  # with the answer


async def test_n_choices_remembers_choice_zero(gateway: Client, rows: Rows) -> None:
    for stream in (False, True):
        resp = await chat(gateway, [user("pick")], conv=f"n{stream}", n=2, stream=stream)
        await resp.read()
        content = json.loads(rows.messages(f"n{stream}")[-1]["content"])
        assert content.startswith("Echo") and not content.startswith("[1]")


async def test_the_query_string_goes_upstream_as_it_came(
    gateway: Client, upstream: TestServer
) -> None:
    """Azure-style servers take ``?api-version=`` on the chat path too."""
    query = "api-version=2024-10-21&q=a%26b%20c&k=%2F&flag"
    resp = await gateway.post(
        URL("/v1/chat/completions?" + query, encoded=True),
        json={"model": "m", "messages": [user("x")]},
        headers={"X-Conversation-Id": "q1"},
    )
    assert resp.status == 200
    (sent,) = received(upstream)
    assert (sent.path, sent.query) == ("/v1/chat/completions", query)
    await chat(gateway, [user("y")], conv="q1")
    assert received(upstream)[-1].query == ""


async def test_other_fields_pass_through(gateway: Client, upstream: TestServer) -> None:
    extra = {
        "temperature": 0.25,
        "top_p": 0.5,
        "seed": 7,
        "vendor_x": {"a": [1, 2]},
        "stream_options": None,
    }
    await chat(gateway, [user("x")], **extra)
    body = received(upstream)[-1].json
    for key, value in extra.items():
        assert body[key] == value
    assert body["model"] == "m"


async def test_by_default_a_turn_sends_at_most_8_mib_of_history(
    gateway_factory: GatewayFactory, upstream: TestServer
) -> None:
    """Items appended through the Conversations API (4 MiB a request) can make a history
    of any size; without a bound every turn read, held and sent all of it (a probe: 120
    MB a turn, 2.8 GB with 8 turns at once)."""
    client = await gateway_factory(upstream_url(upstream))
    big = "y" * (3 * 1024 * 1024)

    async def post(path: str, items: list[dict[str, Any]]) -> Any:
        body = io.BytesIO(json.dumps({"items": items}).encode())  # aiohttp: large, not bytes
        response = await client.post(path, data=body, headers={"Content-Type": "application/json"})
        assert response.status == 200
        return await response.json()

    conversation = (await post("/v1/conversations", [user("first " + big)]))["id"]
    for n in range(2):
        await post(f"/v1/conversations/{conversation}/items", [user(f"{n} " + big)])
    assert (await chat(client, [user("and now?")], conv=conversation)).status == 200
    sent = [m["content"][:8] for m in sent_messages(upstream)]
    assert sent == ["0 " + "y" * 6, "1 " + "y" * 6, "and now?"]  # the oldest left out


async def test_max_history_bytes_sends_the_newest_history_that_fits(
    gateway_factory: GatewayFactory, upstream: TestServer
) -> None:
    """A conversation that outgrew the model's context keeps working: only the newest
    history that fits in ``memory.max_history_bytes`` goes upstream."""
    budget = 400
    client = await gateway_factory(upstream_url(upstream), memory={"max_history_bytes": budget})
    for turn in range(10):
        assert (
            await chat(client, [user(f"question {turn} " + "x" * 40)], conv="long")
        ).status == 200
    history = sent_messages(upstream)[:-1]
    store = client.server.app[GATEWAY].store
    everything = (await store.load_history(Owner("default"), "long", 200)).messages
    assert len(everything) == 20  # everything is kept; only what is sent is cut
    stored = everything[:-2]  # what was stored when the last turn was sent

    def size(messages: list[dict[str, Any]]) -> int:
        return sum(len(json.dumps(m, separators=(",", ":")).encode()) for m in messages)

    assert history == stored[len(stored) - len(history) :]  # the newest, in order
    assert size(history) <= budget < size(stored[len(stored) - len(history) - 1 :])
