"""The mock upstream speaks enough OpenAI for the official SDK, deterministically."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, unused_port

from chatmem.mock_upstream import (
    RECEIVED,
    ReceivedRequest,
    _Schedule,
    create_mock_app,
    run_mock_upstream,
)

Client = TestClient[web.Request, web.Application]
CHAT = "/v1/chat/completions"
TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "other", "parameters": {"type": "object"}}},
]


def _chat(text: str = "hello world", **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": text}], **extra}


def _events(body: bytes) -> list[Any]:
    """The data of every SSE event, checking the exact ``data: ...\\n\\n`` framing."""
    assert body.endswith(b"data: [DONE]\n\n")
    raw = body.split(b"\n\n")[:-1]
    assert all(event.startswith(b"data: ") and b"\n" not in event for event in raw)
    return [json.loads(event[6:]) for event in raw[:-1]]


@pytest.fixture
async def client(aiohttp_client: Any) -> Client:
    result: Client = await aiohttp_client(create_mock_app(tokens=6))
    return result


@pytest.fixture
async def sdk(aiohttp_server: Any) -> AsyncIterator[openai.AsyncOpenAI]:
    server: TestServer = await aiohttp_server(create_mock_app(tokens=6))
    async with openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key="x") as sdk:
        yield sdk


# --- with aiohttp's test client ---------------------------------------------------------


async def test_models(client: Client) -> None:
    resp = await client.get("/v1/models")
    assert await resp.json() == {
        "object": "list",
        "data": [
            {"id": "mock-model", "object": "model", "created": 1700000000, "owned_by": "chatmem"}
        ],
    }


async def test_chat_completion_echoes_the_last_user_message(client: Client) -> None:
    body = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "an answer"},
            {"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "image"}]},
        ],
    }
    raw = json.dumps(body).encode()
    resp = await client.post(CHAT, data=raw, headers={"Content-Type": "application/json"})
    assert resp.status == 200
    data = await resp.json()
    assert data["id"].startswith("chatcmpl-mock-") and len(data["id"]) == len("chatcmpl-mock-") + 8
    assert (data["object"], data["created"], data["model"]) == ("chat.completion", 1700000000, "m")
    # "Echo", the words, "(4 messages)", cycled to 6 tokens
    assert data["choices"] == [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Echo hello (4 messages) Echo hello (4 messages)",
            },
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    assert data["usage"] == {"prompt_tokens": 7, "completion_tokens": 6, "total_tokens": 13}
    again = await client.post(CHAT, data=raw, headers={"Content-Type": "application/json"})
    assert (await again.json())["id"] == data["id"]


async def test_token_budget_header_and_caps(client: Client) -> None:
    resp = await client.post(CHAT, json=_chat("a b c d e"), headers={"X-Mock-Tokens": "3"})
    data = await resp.json()
    assert data["choices"][0]["message"]["content"] == "Echo a b"
    assert data["choices"][0]["finish_reason"] == "stop"

    for cap in ("max_tokens", "max_completion_tokens"):
        resp = await client.post(CHAT, json=_chat("a b c d e", **{cap: 2}))
        data = await resp.json()
        assert data["choices"][0]["message"]["content"] == "Echo a"
        assert data["choices"][0]["finish_reason"] == "length"
        assert data["usage"]["completion_tokens"] == 2

    resp = await client.post(CHAT, json=_chat("a", max_tokens=100))
    assert (await resp.json())["choices"][0]["finish_reason"] == "stop"


async def test_stream_events(client: Client) -> None:
    resp = await client.post(CHAT, json=_chat("hi there", stream=True))
    assert resp.headers["Content-Type"] == "text/event-stream"
    events = _events(await resp.read())
    assert {e["object"] for e in events} == {"chat.completion.chunk"}
    assert len({e["id"] for e in events}) == 1
    deltas = [e["choices"][0]["delta"] for e in events]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert [d["content"] for d in deltas[1:-1]] == [
        "Echo",
        " hi",
        " there",
        " (1 messages)",
        " Echo",
        " hi",
    ]
    assert deltas[-1] == {}
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(e["choices"][0]["finish_reason"] is None for e in events[:-1])
    assert all("usage" not in e for e in events)


async def test_stream_include_usage(client: Client) -> None:
    body = _chat("hi", stream=True, stream_options={"include_usage": True}, max_tokens=2)
    events = _events(await (await client.post(CHAT, json=body)).read())
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert events[-1]["choices"] == []
    assert events[-1]["usage"] == {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}


async def test_stream_and_non_stream_agree(client: Client) -> None:
    whole = await (await client.post(CHAT, json=_chat("one two", n=2))).json()
    events = _events(
        await (await client.post(CHAT, json=_chat("one two", n=2, stream=True))).read()
    )
    for i in range(2):
        streamed = "".join(
            e["choices"][0]["delta"].get("content", "")
            for e in events
            if e["choices"][0]["index"] == i
        )
        assert streamed == whole["choices"][i]["message"]["content"]
    assert whole["choices"][1]["message"]["content"].startswith("[1] Echo one")
    assert whole["usage"]["completion_tokens"] == 12


async def test_delay_between_tokens(client: Client) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    headers = {"X-Mock-Delay-Ms": "60", "X-Mock-Tokens": "4"}
    resp = await client.post(CHAT, json=_chat(stream=True), headers=headers)
    arrivals = []
    async for _ in resp.content.iter_any():
        arrivals.append(loop.time() - started)
    assert arrivals[-1] >= 0.18  # three gaps between four tokens
    assert arrivals[0] < 0.15  # the role chunk is not delayed


async def test_a_late_token_does_not_delay_the_tokens_after_it() -> None:
    # Token k is due k delays after the first, as a model server paces them: a busy
    # machine that woke the mock late once must not slow the rest of its stream.
    schedule = _Schedule(0.02, start=100.0)
    assert schedule.wait(1, now=100.0) == pytest.approx(0.02)
    assert schedule.wait(2, now=100.05) == 0  # due at 100.04: written at once
    assert schedule.wait(3, now=100.05) == pytest.approx(0.01)  # not 0.02 after step 2
    assert _Schedule(0, start=100.0).wait(5, now=100.0) == 0


async def test_client_leaving_mid_stream_is_quiet(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    headers = {"X-Mock-Delay-Ms": "30", "X-Mock-Tokens": "5"}
    resp = await client.post(CHAT, json=_chat(stream=True), headers=headers)
    await resp.content.readuntil(b"\n\n")
    resp.close()
    await asyncio.sleep(0.2)  # the handler's next write finds the connection gone
    assert (await client.get("/v1/models")).status == 200
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError):
        create_mock_app(tokens=-1)


async def test_forced_tool_call(client: Client) -> None:
    body = _chat("weather in Paris", tools=TOOLS, tool_choice="required")
    data = await (await client.post(CHAT, json=body)).json()
    choice = data["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    assert (call["id"], call["type"], call["function"]["name"]) == (
        "call_mock_0",
        "function",
        "lookup",
    )
    assert json.loads(call["function"]["arguments"]) == {"echo": "weather in Paris"}

    named = {"type": "function", "function": {"name": "other"}}
    body = _chat("x", tools=TOOLS, tool_choice=named, stream=True)
    events = _events(await (await client.post(CHAT, json=body)).read())
    fragments = [e["choices"][0]["delta"]["tool_calls"][0] for e in events[1:-1]]
    assert len(fragments) == 3
    assert fragments[0]["id"] == "call_mock_0" and fragments[0]["function"]["name"] == "other"
    assert all(set(f) == {"index", "function"} for f in fragments[1:])
    arguments = "".join(f["function"]["arguments"] for f in fragments)
    assert json.loads(arguments) == {"echo": "x"}
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"

    for choice in ("auto", {"type": "allowed_tools"}):
        body = _chat("x", tools=TOOLS, tool_choice=choice)
        unforced = await (await client.post(CHAT, json=body)).json()
        assert unforced["choices"][0]["finish_reason"] == "stop"


async def test_reasoning_model(client: Client) -> None:
    body = _chat("hi", model="mock-reasoner", max_tokens=1)
    message = (await (await client.post(CHAT, json=body)).json())["choices"][0]["message"]
    assert message == {
        "role": "assistant",
        "content": "Echo",
        "reasoning_content": "Thinking about it.",
    }
    events = _events(await (await client.post(CHAT, json={**body, "stream": True})).read())
    deltas = [e["choices"][0]["delta"] for e in events[1:-1]]
    assert deltas == [
        {"reasoning_content": "Thinking"},
        {"reasoning_content": " about"},
        {"reasoning_content": " it."},
        {"content": "Echo"},
    ]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b"", None),
        (b"[1, 2]", None),
        (b"[" * 100_000, None),  # a RecursionError, which was a 500 (h57)
        (b'{"model": "m"}', "messages"),
        (b'{"messages": "hi"}', "messages"),
        (b'{"messages": [], "n": 0}', "n"),
        (b'{"messages": [], "max_tokens": -1}', "max_tokens"),
    ],
)
async def test_bad_requests(client: Client, body: bytes, param: str | None) -> None:
    resp = await client.post(CHAT, data=body, headers={"Content-Type": "application/json"})
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"]) == ("invalid_request_error", param)


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("POST", "/v1/responses", 404), ("GET", "/nowhere", 404), ("DELETE", "/v1/models", 405)],
)
async def test_a_route_the_mock_lacks_is_an_openai_error(
    client: Client, method: str, path: str, status: int
) -> None:
    """As a real server's: the SDKs show its message (h61: "Error code: 404", no more)."""
    resp = await client.request(method, path)
    assert resp.status == status
    assert resp.headers.get("Allow") == ("GET,HEAD" if status == 405 else None)
    assert (await resp.json())["error"] == {
        "message": f"Unknown request URL: {method} {path}.",
        "type": "invalid_request_error",
        "param": None,
        "code": "unknown_url",
    }


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        ({"X-Mock-Tokens": "many"}, {}),
        # A client of --demo sets these: it must not make the mock build gigabytes
        # (1e9 tokens took all the memory) or hold a request for days.
        ({"X-Mock-Tokens": "1e9"}, {}),
        ({"X-Mock-Tokens": "100001"}, {}),
        ({"X-Mock-Tokens": "1000"}, {"n": 101}),
        ({"X-Mock-Tokens": "1"}, {"n": 129}),
        ({"X-Mock-Delay-Ms": "1e12"}, {}),
    ],
)
async def test_bad_mock_header(
    client: Client, headers: dict[str, str], body: dict[str, Any]
) -> None:
    resp = await client.post(CHAT, json={**_chat(), **body}, headers=headers)
    assert resp.status == 400
    assert (await resp.json())["error"]["type"] == "invalid_request_error"


async def test_the_largest_mock_answer_is_served(client: Client) -> None:
    headers = {"X-Mock-Tokens": "50000"}
    resp = await client.post(CHAT, json={**_chat(), "n": 2}, headers=headers)
    assert resp.status == 200
    answer = await resp.json()
    assert [c["finish_reason"] for c in answer["choices"]] == ["stop", "stop"]


async def test_embeddings(client: Client) -> None:
    resp = await client.post("/v1/embeddings", json={"model": "e", "input": ["a b", "c"]})
    data = await resp.json()
    assert (data["object"], data["model"]) == ("list", "e")
    assert data["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    assert [d["index"] for d in data["data"]] == [0, 1]
    vectors = [d["embedding"] for d in data["data"]]
    assert all(len(v) == 8 and all(-1 <= x < 1 for x in v) for v in vectors)
    assert vectors[0] != vectors[1]
    single = await (await client.post("/v1/embeddings", json={"input": "c"})).json()
    assert single["data"][0]["embedding"] == vectors[1]
    assert single["model"] == "mock-model"
    bad = await client.post("/v1/embeddings", json={"input": [1, 2]})
    assert bad.status == 400
    # base64, as the SDKs ask by default (the Node one decodes whatever comes back).
    body = {"input": "c", "encoding_format": "base64"}
    packed = (await (await client.post("/v1/embeddings", json=body)).json())["data"][0]
    decoded = struct.unpack("<8f", base64.b64decode(packed["embedding"]))
    assert decoded == pytest.approx(vectors[1], abs=1e-6)
    other = {"input": "c", "encoding_format": "int8"}
    assert (await client.post("/v1/embeddings", json=other)).status == 400


async def test_legacy_completions(client: Client) -> None:
    body = {"model": "m", "prompt": "say this", "max_tokens": 2}
    data = await (await client.post("/v1/completions", json=body)).json()
    assert data["object"] == "text_completion"
    assert data["choices"] == [
        {"text": "Echo say", "index": 0, "logprobs": None, "finish_reason": "length"}
    ]


async def test_legacy_completions_stream(client: Client) -> None:
    body = {"model": "m", "prompt": "say this", "max_tokens": 2, "stream": True}
    raw = await (await client.post("/v1/completions", json=body)).read()
    events = [e.removeprefix(b"data: ") for e in raw.split(b"\n\n") if e]
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == "Echo say"
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, "length"]


async def test_every_request_is_recorded(client: Client) -> None:
    headers = {"Authorization": "Bearer sk-upstream"}
    await client.post(CHAT, json=_chat("recorded"), headers=headers)
    await client.get("/v1/models?limit=1")
    await client.get("/nope")
    records = client.app[RECEIVED]
    received = list(records)
    assert [(r.method, r.path, r.query) for r in received] == [
        ("POST", CHAT, ""),
        ("GET", "/v1/models", "limit=1"),
        ("GET", "/nope", ""),
    ]
    first = received[0]
    assert isinstance(first, ReceivedRequest)
    assert first.headers["Authorization"] == "Bearer sk-upstream"
    assert first.json == _chat("recorded") and json.loads(first.body) == first.json

    listed = await (await client.get("/_mock/requests")).json()
    assert listed[0] == {
        "method": "POST",
        "path": CHAT,
        "query": "",
        "headers": first.headers,
        "json": first.json,
    }
    assert len(listed) == 3  # the control routes are not recorded
    assert (await client.delete("/_mock/requests")).status == 204
    assert await (await client.get("/_mock/requests")).json() == []


async def test_record_keeps_the_last_thousand(client: Client) -> None:
    for _ in range(1005):
        client.app[RECEIVED].append(ReceivedRequest("GET", "/x", "", {}, b"", None))
    await client.get("/v1/models")
    assert len(client.app[RECEIVED]) == 1000
    assert client.app[RECEIVED][-1].path == "/v1/models"


# --- with the official openai SDK ------------------------------------------------------


async def test_sdk_chat(sdk: openai.AsyncOpenAI) -> None:
    completion = await sdk.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hello sdk"}]
    )
    assert completion.choices[0].message.content == "Echo hello sdk (1 messages) Echo hello"
    assert completion.usage is not None and completion.usage.completion_tokens == 6


async def test_sdk_stream_with_usage(sdk: openai.AsyncOpenAI) -> None:
    stream = await sdk.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "hello sdk"}],
        stream=True,
        stream_options={"include_usage": True},
        max_tokens=3,
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Echo hello sdk"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 5


async def test_sdk_n_choices(sdk: openai.AsyncOpenAI) -> None:
    completion = await sdk.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], n=2, max_tokens=2
    )
    assert [c.message.content for c in completion.choices] == ["Echo hi", "[1] Echo hi"]


async def test_sdk_stream_tool_call(sdk: openai.AsyncOpenAI) -> None:
    stream = await sdk.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "find it"}],
        tools=TOOLS,
        tool_choice="required",
        stream=True,
    )
    calls = [
        call
        async for chunk in stream
        for call in (chunk.choices[0].delta.tool_calls or [] if chunk.choices else [])
    ]
    assert calls[0].id == "call_mock_0" and calls[0].function is not None
    assert calls[0].function.name == "lookup"
    arguments = "".join(c.function.arguments or "" for c in calls if c.function)
    assert json.loads(arguments) == {"echo": "find it"}


async def test_sdk_reasoning(sdk: openai.AsyncOpenAI) -> None:
    stream = await sdk.chat.completions.create(
        model="reasoner", messages=[{"role": "user", "content": "q"}], stream=True
    )
    reasoning = [
        (chunk.choices[0].delta.model_extra or {}).get("reasoning_content")
        async for chunk in stream
        if chunk.choices
    ]
    assert "".join(r for r in reasoning if r) == "Thinking about it."


async def test_sdk_embeddings_and_models(sdk: openai.AsyncOpenAI) -> None:
    embeddings = await sdk.embeddings.create(model="e", input=["x", "y"])
    assert [len(d.embedding) for d in embeddings.data] == [8, 8]
    models = [m.id async for m in sdk.models.list()]
    assert models == ["mock-model"]
    assert (await sdk.models.retrieve("demo")).id == "demo"  # it answers to any name
    direct = await sdk.embeddings.create(model="e", input=["x"], encoding_format="float")
    assert embeddings.data[0].embedding == pytest.approx(direct.data[0].embedding, abs=1e-6)


async def test_sdk_bad_request(sdk: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.chat.completions.create(model="m", messages="nope")  # type: ignore[arg-type]
    assert caught.value.param == "messages"


# --- run_mock_upstream -------------------------------------------------------------------


async def test_run_mock_upstream_serves_until_cancelled() -> None:
    port = unused_port()
    task = asyncio.create_task(run_mock_upstream("127.0.0.1", port, tokens=2, delay_ms=0))
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    async with aiohttp.ClientSession() as session:
        for _ in range(100):
            try:
                async with session.post(url, json=_chat("up")) as resp:
                    data = await resp.json()
                break
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.02)
        assert data["choices"][0]["message"]["content"] == "Echo up"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        with pytest.raises(aiohttp.ClientConnectionError):
            await session.get(f"http://127.0.0.1:{port}/v1/models")
