"""Half of a UTF-16 surrogate pair escaped alone (``"\\ud800"``) is valid JSON grammar but
not text: it cannot be encoded to UTF-8, so it can be neither stored nor sent again.

From a client it is a 400 on every route that takes JSON, with nothing stored and nothing
sent upstream.  From the upstream, whose bytes are relayed to the client as they came,
the stored turn keeps text: a pair escaped as two halves is one character again, and a
lone half becomes U+FFFD.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from helpers import GatewayFactory, Rows, chunk, received, sse
from scripted_upstream import Script, scripted_upstream

from chatmem import jsonio

Client = TestClient[Any, Any]
LONE = '{"role": "user", "content": "bad \\ud800 half"}'  # the escape, as a client sends it


def body(template: str) -> bytes:
    return template.replace("MESSAGE", LONE).encode()


REQUESTS = [
    ("/v1/chat/completions", body('{"model": "m", "messages": [MESSAGE]}')),
    ("/v1/chat/completions", body('{"model": "m", "stream": true, "messages": [MESSAGE]}')),
    ("/v1/conversations", body('{"items": [MESSAGE]}')),
    ("/v1/conversations", b'{"metadata": {"k": "\\udfff"}}'),
    ("/v1/ask", b'{"question": "\\ud800", "client_id": "c", "user_id": "u"}'),
    ("/conversation/m", b'{"text": "x \\udc00"}'),
]


@pytest.mark.parametrize(("path", "raw"), REQUESTS)
async def test_a_client_sending_one_gets_a_400_and_nothing_is_stored(
    gateway: Client, upstream: TestServer, rows: Rows, path: str, raw: bytes
) -> None:
    resp = await gateway.post(path, data=raw, headers={"Content-Type": "application/json"})
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["type"] == "invalid_request_error"
    assert "lone UTF-16 surrogate" in error["message"]
    assert received(upstream) == []
    assert rows.messages() == [] and rows.conversations() == []


async def test_appending_one_to_a_conversation_is_a_400(gateway: Client, rows: Rows) -> None:
    made = await gateway.post(
        "/v1/conversations", json={"items": [{"role": "user", "content": "ok"}]}
    )
    conv = (await made.json())["id"]
    resp = await gateway.post(f"/v1/conversations/{conv}/items", data=body('{"items": [MESSAGE]}'))
    assert resp.status == 400
    assert [json.loads(m["content"]) for m in rows.messages(conv)] == ["ok"]
    listed = await gateway.get(f"/v1/conversations/{conv}/items")
    assert listed.status == 200


def test_text_is_made_whole_when_encoded() -> None:
    assert jsonio.loads(b'["\\ud83d\\ude00"]') == ["\U0001f600"]  # a pair escaped as such
    with pytest.raises(jsonio.LoneSurrogate):
        jsonio.loads(b'{"a": ["\\ud83d"]}')
    kept = jsonio.loads(b'{"\\udc00": ["\\ud83d", 1]}', lone_surrogates="keep")
    assert kept == {"\udc00": ["\ud83d", 1]}
    assert jsonio.dumps(kept) == '{"\ufffd":["\ufffd",1]}'.encode()
    assert jsonio.dumps(["\ud83d" + "\ude00"]) == '["\U0001f600"]'.encode()
    assert jsonio.utf8("a\udfff") == "a\ufffd".encode()


async def test_a_streamed_answer_keeps_text_and_reaches_the_client_unchanged(
    gateway_factory: GatewayFactory, rows: Rows
) -> None:
    # An emoji split between two chunks as two escaped halves, and a lone half.
    events = [
        sse(chunk("", role="assistant")),
        b'data: {"choices": [{"index": 0, "delta": {"content": "smile \\ud83d"}}]}\n\n',
        b'data: {"choices": [{"index": 0, "delta": {"content": "\\ude00 and \\udc00"}}]}\n\n',
        sse(chunk(finish="stop")),
        sse("[DONE]"),
    ]
    async with scripted_upstream(Script(chunks=list(events))) as upstream:
        gateway = await gateway_factory(upstream.url)
        resp = await gateway.post(
            "/v1/chat/completions",
            json={"model": "m", "stream": True, "messages": [{"role": "user", "content": "q"}]},
            headers={"X-Conversation-Id": "s"},
        )
        assert resp.status == 200
        assert await resp.read() == b"".join(events)
    stored = rows.messages("s")
    assert [m["role"] for m in stored] == ["user", "assistant"]
    assert json.loads(stored[1]["content"]) == "smile \U0001f600 and \ufffd"


async def test_a_whole_answer_is_relayed_unchanged_and_stored_as_text(
    gateway_factory: GatewayFactory, rows: Rows
) -> None:
    answer = (
        b'{"id": "x", "object": "chat.completion", "model": "m", "choices": [{"index": 0,'
        b' "message": {"role": "assistant", "content": "a \\udfff b"}, "finish_reason": "stop"}]}'
    )
    script = Script(headers={"Content-Type": "application/json"}, chunks=[answer], framing="length")
    async with scripted_upstream(script) as upstream:
        gateway = await gateway_factory(upstream.url)
        resp = await gateway.post(
            "/v1/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "q"}]},
            headers={"X-Conversation-Id": "w"},
        )
        assert resp.status == 200
        assert await resp.read() == answer
    assert json.loads(rows.messages("w")[1]["content"]) == "a \ufffd b"


async def test_plain_text_replies_show_a_lone_half_as_a_replacement_character(
    gateway_factory: GatewayFactory, rows: Rows
) -> None:
    events = [
        b'data: {"choices": [{"index": 0, "delta": {"content": "x \\ud800 y"}}]}\n\n',
        sse(chunk(finish="stop")),
        sse("[DONE]"),
    ]
    async with scripted_upstream(Script(chunks=events)) as upstream:
        gateway = await gateway_factory(upstream.url)
        resp = await gateway.post("/conversation/m", json={"text": "hi"})
        assert resp.status == 200
        assert (await resp.read()).decode() == "x \ufffd y"
    assert json.loads(rows.messages()[1]["content"]) == "x \ufffd y"
