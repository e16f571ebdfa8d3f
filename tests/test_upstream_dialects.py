"""Answers from servers that bend the OpenAI shape: what is stored, and what the next turn
sends upstream.

Each upstream here is the scripted one (exact bytes); the gateway stores the turn in a real
SQLite file.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from helpers import GatewayFactory, Rows, chat_completion, chunk, sse
from scripted_upstream import Script, scripted_upstream

STREAM = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "do two"}]}


def call(call_id: str, name: str, arguments: str, index: int | None = 0) -> dict[str, Any]:
    fragment: dict[str, Any] = {
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }
    if index is not None:
        fragment["index"] = index
    return fragment


def tool_call_stream(*fragments: dict[str, Any]) -> list[bytes | float]:
    return [
        sse(chunk(role="assistant")),
        *(sse(chunk(tool_calls=[fragment])) for fragment in fragments),
        sse(chunk(finish="tool_calls")),
        sse("[DONE]"),
    ]


async def stored_then_sent(
    gateway_factory: GatewayFactory, rows: Rows, chunks: list[bytes | float], follow_up: Any
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Stream ``chunks`` as the answer to one turn, then send ``follow_up`` as the next;
    return the stored assistant message and the messages the upstream got next."""
    async with scripted_upstream(Script(chunks=chunks)) as up:
        client = await gateway_factory(up.url)
        headers = {"X-Conversation-Id": "d1"}
        first = await client.post("/v1/chat/completions", json=STREAM, headers=headers)
        assert first.status == 200
        assert await first.read() == b"".join(c for c in chunks if isinstance(c, bytes))
        stored = rows.messages("d1")[-1]
        nxt = {**STREAM, "messages": follow_up}
        second = await client.post("/v1/chat/completions", json=nxt, headers=headers)
        assert second.status == 200, await second.text()
        await second.read()
        sent = json.loads(up.requests[-1][3])["messages"]
    return stored, sent


def completion(message: dict[str, Any], finish_reason: str) -> bytes:
    """A non-streamed answer of one choice."""
    return json.dumps(chat_completion(message, finish_reason)).encode()


def json_answer(body: bytes) -> Script:
    return Script(headers={"Content-Type": "application/json"}, chunks=[body], framing="length")


async def post_plain(
    client: Any, conversation: str, messages: list[dict[str, Any]] | None = None
) -> Any:
    """A non-streamed chat turn (the STREAM request's messages unless given)."""
    body = {**STREAM, "stream": False, **({} if messages is None else {"messages": messages})}
    return await client.post(
        "/v1/chat/completions", json=body, headers={"X-Conversation-Id": conversation}
    )


TWO_WHOLE_CALLS = [
    {"id": "call_A", "type": "function", "function": {"name": "f1", "arguments": '{"a": 1}'}},
    {"id": "call_B", "type": "function", "function": {"name": "f1", "arguments": '{"b": 2}'}},
]


@pytest.mark.parametrize(
    "index",
    [0, None],
    ids=["every-call-index-0 (Ollama)", "no-index (Gemini)"],
)
async def test_whole_calls_under_one_index_stay_apart(
    gateway_factory: GatewayFactory, rows: Rows, index: int | None
) -> None:
    chunks = tool_call_stream(
        call("call_A", "f1", '{"a": 1}', index), call("call_B", "f1", '{"b": 2}', index)
    )
    results = [
        {"role": "tool", "tool_call_id": "call_A", "content": "r1"},
        {"role": "tool", "tool_call_id": "call_B", "content": "r2"},
    ]
    stored, sent = await stored_then_sent(gateway_factory, rows, chunks, results)
    assert json.loads(stored["tool_calls"]) == TWO_WHOLE_CALLS
    # Both results answer a call the upstream is shown: a strict server accepts the turn.
    assistant = {"role": "assistant", "content": None, "tool_calls": TWO_WHOLE_CALLS}
    assert sent[1:] == [assistant, *results]


async def test_a_fresh_id_on_every_fragment_is_still_one_call(
    gateway_factory: GatewayFactory, rows: Rows
) -> None:
    chunks = tool_call_stream(
        call("call_1", "lookup", '{"city":'), call("call_2", "lookup", ' "Paris"}')
    )
    results = [{"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    stored, _ = await stored_then_sent(gateway_factory, rows, chunks, results)
    assert json.loads(stored["tool_calls"]) == [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "lookup", "arguments": '{"city": "Paris"}'},
        }
    ]


async def test_content_streamed_as_parts_is_stored_as_its_text(
    gateway_factory: GatewayFactory, rows: Rows
) -> None:
    chunks: list[bytes | float] = [
        sse(chunk(role="assistant")),
        sse(chunk([{"type": "text", "text": "Part one. "}])),  # type: ignore[arg-type]
        sse(chunk([{"type": "text", "text": "Part two."}], finish="stop")),  # type: ignore[arg-type]
        sse("[DONE]"),
    ]
    follow_up = [{"role": "user", "content": "and?"}]
    stored, sent = await stored_then_sent(gateway_factory, rows, chunks, follow_up)
    assert json.loads(stored["content"]) == "Part one. Part two."
    assert sent[1] == {"role": "assistant", "content": "Part one. Part two."}


async def test_a_completion_with_content_parts_is_stored_as_its_text(
    gateway_factory: GatewayFactory, rows: Rows
) -> None:
    body = json.dumps(chat_completion([{"type": "text", "text": "Whole answer."}])).encode()
    script = Script(headers={"Content-Type": "application/json"}, chunks=[body], framing="length")
    async with scripted_upstream(script) as up:
        client = await gateway_factory(up.url)
        resp = await post_plain(client, "d2")
        assert await resp.read() == body
    assert json.loads(rows.messages("d2")[-1]["content"]) == "Whole answer."


@pytest.mark.parametrize(
    ("path", "body", "stream"),
    [
        ("/v1/chat/completions", {**STREAM, "stream": False}, False),
        ("/v1/chat/completions", STREAM, True),
        ("/v1/ask", {"question": "q", "client_id": "c", "user_id": "u"}, False),
        ("/v1/models", None, False),  # the passthrough
    ],
    ids=["chat", "chat-stream", "ask", "passthrough"],
)
async def test_the_upstreams_cookies_stay_with_the_gateway(
    gateway_factory: GatewayFactory, path: str, body: Any, stream: bool
) -> None:
    # A Cloudflare-style cookie of the upstream's session went on to every client (found by
    # a probe); its other headers still do.
    if stream:
        chunks: list[bytes | float] = [
            sse(chunk(role="assistant")),
            sse(chunk("hi", finish="stop")),
            sse("[DONE]"),
        ]
        content_type = "text/event-stream"
    else:
        chunks, content_type = [json.dumps(chat_completion("hi")).encode()], "application/json"
    headers = {
        "Content-Type": content_type,
        "Set-Cookie": "__cf_bm=upstream-session; domain=.llm.example",
        "OpenAI-Processing-Ms": "12",
    }
    script = Script(headers=headers, chunks=chunks, framing="length" if not stream else "chunked")
    async with scripted_upstream(script) as up:
        client = await gateway_factory(up.url)
        if body is None:
            resp = await client.get(path)
        else:
            resp = await client.post(path, json=body, headers={"X-Conversation-Id": "k1"})
        await resp.read()
    assert resp.status == 200
    assert "Set-Cookie" not in resp.headers
    assert resp.headers["OpenAI-Processing-Ms"] == "12"


# What a server sent that the history could not carry (a probe of real servers' shapes).

CALL_ID = re.compile(r"call_[0-9a-f]{24}")


@pytest.mark.parametrize(
    "fragment",
    [
        {"index": 0, "type": "function", "function": {"name": "f", "arguments": "{}"}},
        {"index": 0, "id": "", "type": "function", "function": {"name": "f", "arguments": "{}"}},
        # No tool result can name it: chatmem refuses a NUL in a tool_call_id.
        {
            "index": 0,
            "id": "c\x001",
            "type": "function",
            "function": {"name": "f", "arguments": "{}"},
        },
    ],
    ids=["no id (llama.cpp b4761)", "empty id", "an id with a NUL"],
)
async def test_a_streamed_call_without_an_id_is_stored_with_one(
    gateway_factory: GatewayFactory, rows: Rows, fragment: dict[str, Any]
) -> None:
    """Stored with "id": null it went upstream with every later turn, which llama.cpp
    (a 500) and LM Studio refuse; the client still gets the upstream's bytes."""
    stored, sent = await stored_then_sent(
        gateway_factory, rows, tool_call_stream(fragment), [{"role": "user", "content": "q"}]
    )
    (stored_call,) = json.loads(stored["tool_calls"])
    assert CALL_ID.fullmatch(stored_call["id"])
    assert stored_call["function"] == {"name": "f", "arguments": "{}"}
    assert sent[1]["tool_calls"] == [stored_call]


@pytest.mark.parametrize(
    "function",
    [{"name": "now"}, {"name": "now", "arguments": ""}, {"name": "now", "arguments": " "}],
    ids=["no arguments", "empty", "blank"],
)
async def test_a_call_with_no_arguments_is_stored_with_the_empty_object(
    gateway_factory: GatewayFactory, rows: Rows, function: dict[str, Any]
) -> None:
    """A tool without parameters called with no arguments, or "": stored so, it went
    upstream with every later turn, and servers that parse a history's arguments (vLLM)
    refuse "", which is no JSON (item 145). The client still gets the upstream's bytes."""
    fragment = {"index": 0, "id": "e1", "type": "function", "function": function}
    stored, sent = await stored_then_sent(
        gateway_factory, rows, tool_call_stream(fragment), [{"role": "user", "content": "q"}]
    )
    (stored_call,) = json.loads(stored["tool_calls"])
    assert stored_call == {
        "id": "e1",
        "type": "function",
        "function": {"name": "now", "arguments": "{}"},
    }
    assert sent[1]["tool_calls"] == [stored_call]


async def test_a_call_without_an_id_or_name_in_a_completion_gets_both(
    gateway_factory: GatewayFactory, rows: Rows
) -> None:
    calls = [{"type": "function", "function": {"arguments": '{"q": 1}'}}]
    message = {"role": "assistant", "content": None, "tool_calls": calls}
    body = completion(message, "tool_calls")
    script = json_answer(body)
    async with scripted_upstream(script) as up:
        client = await gateway_factory(up.url)
        resp = await post_plain(client, "i")
        assert await resp.read() == body
    (stored_call,) = json.loads(rows.messages("i")[-1]["tool_calls"])
    assert CALL_ID.fullmatch(stored_call["id"])
    assert stored_call["function"] == {"name": "", "arguments": '{"q": 1}'}


async def test_a_call_cut_off_by_length_is_not_stored(
    gateway_factory: GatewayFactory, rows: Rows
) -> None:
    """vLLM parses the arguments of every call in a history: a half-written one would
    fail every later turn.  The rest of the answer is kept."""
    chunks: list[bytes | float] = [
        sse(chunk("Looking it up.", role="assistant")),
        sse(chunk(tool_calls=[call("c1", "weather", '{"city": "Par')])),
        sse(chunk(finish="length")),
        sse("[DONE]"),
    ]
    stored, sent = await stored_then_sent(
        gateway_factory, rows, chunks, [{"role": "user", "content": "again"}]
    )
    assert stored["tool_calls"] is None
    assert stored["finish_reason"] == "length"
    assert sent[1] == {"role": "assistant", "content": "Looking it up."}


async def test_an_aborted_stream_is_not_stored(gateway_factory: GatewayFactory, rows: Rows) -> None:
    """vLLM ends a request its engine aborted with finish_reason "abort", then [DONE]:
    half an answer, which must not become history."""
    chunks: list[bytes | float] = [
        sse(chunk("The answer is", role="assistant")),
        sse(chunk("", finish="abort")),
        sse("[DONE]"),
    ]
    async with scripted_upstream(Script(chunks=chunks)) as up:
        client = await gateway_factory(up.url)
        resp = await client.post(
            "/v1/chat/completions", json=STREAM, headers={"X-Conversation-Id": "a"}
        )
        body = await resp.read()
    events = [event for event in body.split(b"\n\n") if event]
    assert b"\n\n".join(events[:2]) + b"\n\n" == b"".join(chunks[:2])  # type: ignore[arg-type]
    error = json.loads(events[2].removeprefix(b"data: "))["error"]
    assert error["code"] == "upstream_incomplete"
    assert (
        error["message"]
        == "the upstream ended the answer with finish_reason 'abort'; it was not saved"
    )
    assert events[3:] == [b"data: [DONE]"]
    assert rows.messages("a") == []


@pytest.mark.parametrize("reason", ["abort", "error"])
async def test_an_aborted_completion_is_a_502_and_not_stored(
    gateway_factory: GatewayFactory, rows: Rows, reason: str
) -> None:
    message = {"role": "assistant", "content": "The answer is"}
    script = json_answer(completion(message, reason))
    async with scripted_upstream(script) as up:
        client = await gateway_factory(up.url)
        resp = await post_plain(client, "b")
        assert resp.status == 502
        error = (await resp.json())["error"]
    assert (
        error["message"]
        == f"the upstream ended the answer with finish_reason {reason!r}; it was not saved"
    )
    assert rows.messages("b") == []


@pytest.mark.parametrize("stream", [False, True], ids=["completion", "stream"])
async def test_a_legacy_function_call_answer_is_not_stored(
    gateway_factory: GatewayFactory, rows: Rows, stream: bool
) -> None:
    """A call of the deprecated functions API has no place in the store: it was committed
    as ``content: ""``, the call gone, and the client's ``function`` result then went up
    after an assistant message that called nothing."""
    call = {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    if stream:
        chunks: list[bytes | float] = [
            sse(chunk(role="assistant", function_call=call)),
            sse(chunk(finish="function_call")),
            sse("[DONE]"),
        ]
        script = Script(chunks=chunks)  # type: ignore[arg-type]
    else:
        message = {"role": "assistant", "content": None, "function_call": call}
        script = json_answer(completion(message, "function_call"))
    async with scripted_upstream(script) as up:
        client = await gateway_factory(up.url)
        if stream:
            resp = await client.post(
                "/v1/chat/completions", json=STREAM, headers={"X-Conversation-Id": "f"}
            )
            events = [e for e in (await resp.read()).split(b"\n\n") if e]
            assert events[-1] == b"data: [DONE]"
            error = json.loads(events[-2].removeprefix(b"data: "))["error"]
        else:
            resp = await post_plain(client, "f")
            assert resp.status == 502
            error = (await resp.json())["error"]
    assert error["code"] == ("upstream_incomplete" if stream else "upstream_unavailable")
    assert "deprecated functions API" in error["message"] and "send tools" in error["message"]
    assert rows.messages("f") == []


@pytest.mark.parametrize("content_type", ["text/html", "application/xml"])
async def test_a_200_of_another_type_to_a_stream_is_a_502(
    gateway_factory: GatewayFactory, rows: Rows, content_type: str
) -> None:
    """A proxy's or a login page's 200 in HTML: relayed as a stream, the client got a 200
    labelled text/html holding one SSE error event that said the stream had ended too
    soon, and the page was lost."""
    page = b"<html><body>Please log in</body></html>"
    script = Script(headers={"Content-Type": content_type}, chunks=[page], framing="length")
    async with scripted_upstream(script) as up:
        client = await gateway_factory(up.url)
        resp = await client.post(
            "/v1/chat/completions", json=STREAM, headers={"X-Conversation-Id": "h"}
        )
        assert resp.status == 502
        assert resp.content_type == "application/json"
        error = (await resp.json())["error"]
    assert error["message"] == "the upstream answered with an invalid chat completion"
    assert rows.messages("h") == []


@pytest.mark.parametrize("content_type", [None, "text/plain"])
async def test_a_stream_without_its_content_type_is_still_a_stream(
    gateway_factory: GatewayFactory, rows: Rows, content_type: str | None
) -> None:
    """Starlette's StreamingResponse without a media_type sends no Content-Type; the SDKs
    parse by the request's "stream" flag, and so does the gateway.  The client gets the
    upstream's type, or none, not aiohttp's application/octet-stream (item 144)."""
    headers = {} if content_type is None else {"Content-Type": content_type}
    chunks: list[bytes | float] = [
        sse(chunk("Hi", role="assistant")),
        sse(chunk(finish="stop")),
        sse("[DONE]"),
    ]
    async with scripted_upstream(Script(headers=headers, chunks=chunks)) as up:
        client = await gateway_factory(up.url)
        resp = await client.post(
            "/v1/chat/completions", json=STREAM, headers={"X-Conversation-Id": "s"}
        )
        assert resp.status == 200
        assert resp.headers.getall("Content-Type", []) == (
            [] if content_type is None else [content_type]
        )
        assert await resp.read() == b"".join(chunks)  # type: ignore[arg-type]
    assert json.loads(rows.messages("s")[-1]["content"]) == "Hi"


@pytest.mark.parametrize(
    ("error", "said"),
    [
        (
            {"message": "model overloaded, key sk-gateway-0123456789"},
            "model overloaded, key [upstream key]",
        ),
        ("CUDA out of memory", "CUDA out of memory"),  # TGI's errors are strings
        ({"code": 1}, None),
    ],
)
async def test_an_error_answered_with_a_200_keeps_its_message(
    gateway_factory: GatewayFactory, rows: Rows, error: Any, said: str | None
) -> None:
    """Some servers answer an error with a 200: the client's 502 says what the upstream
    said (the gateway's key masked), not only that it was no chat completion; vLLM's
    error is the object itself, {"object": "error", "message": ...} (item 148)."""
    body = {"object": "error", **error} if isinstance(error, dict) else {"error": error}
    for answer in ({"error": error}, body):
        await _answered_with_a_200(gateway_factory, rows, answer, said)


async def _answered_with_a_200(
    gateway_factory: GatewayFactory, rows: Rows, error: Any, said: str | None
) -> None:
    script = json_answer(json.dumps(error).encode())
    async with scripted_upstream(script) as up:
        client = await gateway_factory(up.url, upstream={"api_key": "sk-gateway-0123456789"})
        resp = await post_plain(client, "e")
        assert resp.status == 502
        message = (await resp.json())["error"]["message"]
    expected = "the upstream answered with an invalid chat completion"
    assert message == (expected if said is None else f"the upstream answered with an error: {said}")
    assert rows.messages("e") == []


@pytest.mark.parametrize("done", [True, False], ids=["then [DONE]", "then the end"])
async def test_llama_cpp_s_error_field_is_quoted(
    gateway_factory: GatewayFactory, rows: Rows, done: bool
) -> None:
    """llama.cpp's server says why a stream failed in an ``error:`` field, which an SSE
    client passes over, then sends [DONE]: the gateway's own error event said only that
    no finish_reason came. It quotes the upstream now (the key masked; item 148)."""
    said = json.dumps(
        {"code": 500, "message": "context shift disabled, sk-gateway-0123456789", "type": "e"}
    )
    chunks: list[bytes | float] = [
        sse(chunk("a", role="assistant")),
        b"error: " + said.encode() + b"\n\n",
        *([sse("[DONE]")] if done else []),
    ]
    async with scripted_upstream(Script(chunks=chunks)) as up:
        client = await gateway_factory(up.url, upstream={"api_key": "sk-gateway-0123456789"})
        resp = await client.post(
            "/v1/chat/completions", json=STREAM, headers={"X-Conversation-Id": "l"}
        )
        body = await resp.read()
    assert b"sk-gateway" not in body  # nor in the upstream's own field, relayed
    events = [event for event in body.split(b"\n\n") if event]
    error = json.loads(events[2].removeprefix(b"data: "))["error"]
    assert (error["message"], error["code"]) == (
        "the upstream reported an error: context shift disabled, [upstream key]",
        "upstream_error",
    )
    assert events[3:] == ([b"data: [DONE]"] if done else [])
    assert rows.messages("l") == []


CUSTOM = {"id": "call_c1", "type": "custom", "custom": {"name": "shell", "input": "ls -la"}}


async def test_a_streamed_custom_tool_call_is_stored_as_one(
    gateway_factory: GatewayFactory, rows: Rows
) -> None:
    """OpenAI's free-form ("custom") tools: the call was dropped from the stored answer,
    so the result the client sent next went upstream without its call."""
    fragments = [
        {"index": 0, "id": "call_c1", "type": "custom", "custom": {"name": "shell", "input": ""}},
        {"index": 0, "custom": {"input": "ls "}},
        {"index": 0, "custom": {"input": "-la"}},
    ]
    result = {"role": "tool", "tool_call_id": "call_c1", "content": "total 0"}
    stored, sent = await stored_then_sent(
        gateway_factory, rows, tool_call_stream(*fragments), [result]
    )
    assert json.loads(stored["tool_calls"]) == [CUSTOM]
    assert sent[1:] == [{"role": "assistant", "content": None, "tool_calls": [CUSTOM]}, result]


async def test_custom_tool_calls_in_a_completion_and_from_a_client(
    gateway_factory: GatewayFactory, rows: Rows
) -> None:
    message = {"role": "assistant", "content": None, "tool_calls": [CUSTOM]}
    body = completion(message, "tool_calls")
    script = json_answer(body)
    async with scripted_upstream(script) as up:
        client = await gateway_factory(up.url)
        resp = await post_plain(client, "u")
        assert await resp.read() == body
        # A client that sends such a call itself (a whole chat, in a new conversation).
        resp = await post_plain(client, "v", [{"role": "user", "content": "q"}, message])
        assert resp.status == 200
        broken = {**CUSTOM, "custom": {"name": "shell"}}
        resp = await post_plain(client, "w", [{**message, "tool_calls": [broken]}])
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert error["param"] == "messages[0].tool_calls[0].custom"
    assert (
        error["message"]
        == "messages[0].tool_calls[0].custom must have a string name and string input"
    )
    assert json.loads(rows.messages("u")[-1]["tool_calls"]) == [CUSTOM]
    assert json.loads(rows.messages("v")[1]["tool_calls"]) == [CUSTOM]
