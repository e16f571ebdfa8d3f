"""The upstream key never reaches a client in an error body that quotes it."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import logging
import zlib
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from helpers import (
    COMPRESS,
    GatewayFactory,
    Rows,
    chat_completion,
    chunk,
    realtime_upstream,
    sse,
)
from hypothesis import example, given, settings
from hypothesis import strategies as st
from scripted_upstream import Script, scripted_upstream

from chatmem.proxy import redact
from chatmem.proxy.redact import Redactor

KEY = "sk-test-SECRET-0123456789"
MASK = b"[upstream key]"

# A key some JSON encoders write another way: base64's "/", "+" and "=", HTML's "<>&'",
# and the '"' and "\" every encoder escapes (an HTTP header may hold both).
ODD_KEY = "cm-8f/Q+xY=<k&'9\"z\\w"


def _json_string(text: str, escapes: dict[str, str]) -> str:
    """``text`` as a JSON string's inside, as an encoder that escapes ``escapes`` writes it."""
    return "".join(escapes.get(c, {'"': '\\"', "\\": "\\\\"}.get(c, c)) for c in text)


_ENCODERS = {
    "python": {},  # json.dumps, JavaScript, serde: only '"' and "\"
    "php": {"/": "\\/"},
    "go": {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026"},
    "gson": {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "=": "\\u003d", "'": "\\u0027"},
    # System.Text.Json: upper-case hex, '"' too.
    "dotnet": {c: f"\\u{ord(c):04X}" for c in "<>&'+\"`"},
    "every": {c: f"\\u{ord(c):04x}" for c in ODD_KEY if not c.isalnum() and c not in "-_.~"},
    # No encoder's by itself, but JSON's all the same: any character as \u00XX.
    "all": {c: f"\\u{ord(c):04X}" for c in ODD_KEY if c.isalnum() or c in "-_.~"},
}
SPELLINGS = {name: _json_string(ODD_KEY, table).encode() for name, table in _ENCODERS.items()}


def _cut(body: bytes, cuts: list[int]) -> list[bytes]:
    """``body`` in pieces, cut at ``cuts`` (those inside it)."""
    pieces, start = [], 0
    for cut in sorted(c for c in cuts if c <= len(body)):
        pieces.append(body[start:cut])
        start = cut
    return [*pieces, body[start:]]


@given(
    parts=st.lists(st.sampled_from([b"a", b"sk-", b"sk-test-S", KEY.encode(), b"\n", b"x" * 30])),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8),
)
def test_the_key_is_masked_wherever_the_pieces_are_cut(parts: list[bytes], cuts: list[int]) -> None:
    pieces = _cut(b"".join(parts), cuts)
    redactor = Redactor(KEY.encode())
    out = b"".join(redactor.feed(p) for p in pieces) + redactor.end()
    assert out == b"".join(parts).replace(KEY.encode(), MASK)


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        (
            "POST",
            "/v1/chat/completions",
            {"model": "m", "messages": [{"role": "user", "content": "x"}]},
        ),
        ("POST", "/v1/embeddings", {"model": "m", "input": "x"}),
    ],
)
async def test_an_upstream_error_quoting_the_key_does_not_hand_it_on(
    gateway_factory: GatewayFactory, rows: Rows, method: str, path: str, body: dict[str, object]
) -> None:
    """Some servers quote the credential they refused; the key arrives split over reads."""
    error = json.dumps({"error": {"message": f"invalid key: Bearer {KEY}", "type": "auth"}})
    head, tail = error.encode().split(b"SECRET")
    script = Script(
        status=401,
        headers={"Content-Type": "application/json"},
        chunks=[head + b"SEC", 0.05, b"RET" + tail],
        framing="length",
    )
    async with scripted_upstream(script) as up:
        client = await gateway_factory(up.url, upstream={"api_key": KEY})
        response = await client.request(
            method, path, json=body, headers={"X-Conversation-Id": "r1"}
        )
        got = await response.read()
    assert response.status == 401
    assert json.loads(got)["error"]["message"] == "invalid key: Bearer [upstream key]"
    assert KEY.encode() not in got
    assert rows.messages("r1") == []


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/embeddings"])
async def test_a_compressed_error_body_goes_decoded_with_the_key_masked(
    gateway_factory: GatewayFactory, path: str
) -> None:
    """A client that asks for gzip gets the passthrough's bodies compressed, where the key
    cannot be looked for: an error body goes decoded instead; one in an encoding the
    gateway cannot decode is withheld."""
    error = json.dumps({"error": {"message": f"invalid key: Bearer {KEY}"}}).encode()
    for encoding, wire, expected in (
        ("gzip", gzip.compress(error), "invalid key: Bearer [upstream key]"),
        ("br", COMPRESS["br"](error), "invalid key: Bearer [upstream key]"),
        ("zstd", COMPRESS["zstd"](error), "invalid key: Bearer [upstream key]"),
        ("br", b"\x1b\x00 not brotli", None),
    ):
        script = Script(
            status=401,
            headers={"Content-Type": "application/json", "Content-Encoding": encoding},
            chunks=[wire],
            framing="length",
        )
        async with scripted_upstream(script) as up:
            client = await gateway_factory(up.url, upstream={"api_key": KEY})
            response = await client.post(
                path,
                json={"model": "m", "input": "x", "messages": [{"role": "user", "content": "x"}]},
                headers={"Accept-Encoding": encoding},
                auto_decompress=False,
            )
            got = await response.read()
        assert response.status == 401
        assert "Content-Encoding" not in response.headers
        message = json.loads(got)["error"]["message"]
        if expected is not None:
            assert message == expected
        else:
            assert message.startswith("the upstream answered 401 with a body in 'br'")
        assert KEY.encode() not in got


async def _chat_turn(
    gateway_factory: GatewayFactory, script: Script, *, stream: bool, conversation: str
) -> tuple[Any, bytes]:
    """One chat turn through a gateway whose upstream key is KEY, which logs content, the
    upstream answering with ``script``: the response and its body."""
    async with scripted_upstream(script) as up:
        client = await gateway_factory(
            up.url, upstream={"api_key": KEY}, log={"debug_content": True}
        )
        response = await client.post(
            "/v1/chat/completions",
            json={"model": "m", "stream": stream, "messages": [{"role": "user", "content": "x"}]},
            headers={"X-Conversation-Id": conversation},
        )
        return response, await response.read()


@pytest.mark.parametrize(
    "before", [[], [b'data: {"choices":[{"index":0,"delta":{"content":"Hi"}}]}\n\n']]
)
async def test_a_streamed_error_event_quoting_the_key_does_not_hand_it_on(
    gateway_factory: GatewayFactory, rows: Rows, before: list[bytes]
) -> None:
    """A 200 stream whose error event quotes the credential (at once, or after a token):
    the client gets the event with the key masked, and nothing is stored."""
    error = json.dumps({"error": {"message": f"stream failed, Bearer {KEY}"}}).encode()
    event = b"data: " + error + b"\n\n"
    script = Script(headers={"Content-Type": "text/event-stream"}, chunks=[*before, event])
    _, got = await _chat_turn(gateway_factory, script, stream=True, conversation="s1")
    assert KEY.encode() not in got
    assert b"".join([*before, event.replace(KEY.encode(), MASK)]) in got
    assert rows.messages("s1") == []


@pytest.mark.parametrize("stream", [False, True])
async def test_an_answer_quoting_the_key_is_masked_sent_and_stored(
    gateway_factory: GatewayFactory, rows: Rows, stream: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """An upstream that puts the key in its answer (and in a header): the client gets
    neither, and the stored turn, which goes upstream with every later turn and out
    through the Conversations API, holds the mask; so does ``log.debug_content``'s line
    (it logged the answer as it came, key and all)."""
    caplog.set_level(logging.DEBUG, logger="chatmem.content")
    said = f"the key is {KEY}."
    if stream:
        events = [
            sse(chunk(said[:11], role="assistant")),
            sse(chunk(said[11:])),
            sse(chunk(finish="stop")),
            sse("[DONE]"),
        ]
        script = Script(
            headers={"Content-Type": "text/event-stream", "X-Echo": f"Bearer {KEY}"}, chunks=events
        )
    else:
        answer = chat_completion(said)
        script = Script(
            headers={"Content-Type": "application/json", "X-Echo": f"Bearer {KEY}"},
            chunks=[json.dumps(answer).encode()],
            framing="length",
        )
    response, got = await _chat_turn(gateway_factory, script, stream=stream, conversation="k1")
    assert response.status == 200
    assert KEY.encode() not in got and MASK in got
    assert response.headers["X-Echo"] == "Bearer [upstream key]"
    stored = rows.messages("k1")[-1]
    assert json.loads(stored["content"]) == "the key is [upstream key]."
    logged = [r.getMessage() for r in caplog.records if r.name == "chatmem.content"]
    assert logged[-1] == 'turn committed: "the key is [upstream key]."'
    assert KEY not in caplog.text


@pytest.mark.parametrize(
    ("key", "spelling"), [(KEY, KEY.encode()), (ODD_KEY, SPELLINGS["php"])], ids=["as is", "php"]
)
async def test_a_passthrough_answer_quoting_the_key_keeps_its_length_with_the_key_masked(
    gateway_factory: GatewayFactory, key: str, spelling: bytes
) -> None:
    """A 200 answer of the passthrough (an upstream that echoes what it was sent, say):
    the key, cut in two by the reads, goes out as as many ``*`` as it has bytes, so the
    answer's ``Content-Length`` still holds; so does a PHP upstream's, ``/`` escaped."""
    body = b'{"you sent": "Bearer ' + spelling + b'", "data": []}'
    cut = body.index(spelling) + 6
    script = Script(
        headers={"Content-Type": "application/json"},
        chunks=[body[:cut], 0.05, body[cut:]],
        framing="length",
    )
    async with scripted_upstream(script) as up:
        client = await gateway_factory(up.url, upstream={"api_key": key})
        response = await client.get("/v1/models")
        got = await response.read()
    assert response.status == 200
    assert response.headers["Content-Length"] == str(len(body))
    assert got == body.replace(spelling, b"*" * len(spelling))


async def test_a_passthrough_stream_is_masked_and_not_held_back(
    gateway_factory: GatewayFactory,
) -> None:
    """A streamed passthrough answer (``/v1/completions``): an event that quotes the key
    in two reads goes out masked, and every whole event goes on before the upstream sends
    the next (the upstream waits for the client to have it: a gateway holding back the
    end of each piece, in case a key starts there, would never get it past here)."""
    first = b'data: {"text": "s"}\n\n'  # ends in an "s", not a key's start: goes on
    quoted = b'data: {"text": "' + KEY.encode() + b'"}\n\n'
    cut = quoted.index(KEY.encode()) + 3  # inside the key: "sk-" waits for the rest
    client_has_first = asyncio.Event()
    script = Script(
        headers={"Content-Type": "text/event-stream"},
        chunks=[first, client_has_first, quoted[:cut], 0.05, quoted[cut:], b"data: [DONE]\n\n"],
    )
    async with scripted_upstream(script) as up:
        client = await gateway_factory(up.url, upstream={"api_key": KEY})
        response = await client.post("/v1/completions", json={"stream": True})
        async with asyncio.timeout(10):  # bounded: a held-back event would wait forever
            assert await response.content.readexactly(len(first)) == first
        client_has_first.set()
        rest = await response.read()
    assert rest == quoted.replace(KEY.encode(), b"*" * len(KEY)) + b"data: [DONE]\n\n"


async def test_websocket_messages_quoting_the_key_are_masked(
    gateway_factory: GatewayFactory, aiohttp_server: Any
) -> None:
    """A relayed WebSocket (Realtime): the upstream's messages reach the client with the
    key masked, text and binary, and so do a ping's payload and its close frame's reason,
    free text too (h47, h53); the client's messages go upstream as they are."""
    heard: list[str] = []

    async def realtime(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str(f'{{"type": "error", "message": "bad key {KEY}"}}')
        await ws.send_bytes(b"key=" + KEY.encode())
        await ws.ping(b"ping " + KEY.encode())
        heard.append(await ws.receive_str())
        await ws.close(code=4000, message=f"closing, key {KEY}".encode())
        return ws

    up = await realtime_upstream(aiohttp_server, realtime)
    gateway = await gateway_factory(up, upstream={"api_key": KEY})
    async with gateway.ws_connect("/v1/realtime", autoping=False) as ws:
        assert await ws.receive_str() == '{"type": "error", "message": "bad key [upstream key]"}'
        assert await ws.receive_bytes() == b"key=[upstream key]"
        ping = await ws.receive()  # a ping's payload too (h53)
        assert (ping.type, ping.data) == (WSMsgType.PING, b"ping [upstream key]")
        await ws.send_str(f"my own text {KEY}")
        closing = await ws.receive()
    assert (closing.type, closing.data) == (WSMsgType.CLOSE, 4000)
    assert closing.extra == "closing, key [upstream key]"
    assert heard == [f"my own text {KEY}"]


@pytest.mark.parametrize("status", [200, 401])
async def test_the_key_in_a_passthrough_status_line_is_masked(
    gateway_factory: GatewayFactory, status: int
) -> None:
    """The reason phrase is free text an upstream may put the key in (h47)."""
    script = Script(
        status=status,
        reason=f"Said {KEY}",
        headers={"Content-Type": "application/json"},
        chunks=[b"{}"],
        framing="length",
    )
    async with scripted_upstream(script) as up:
        client = await gateway_factory(up.url, upstream={"api_key": KEY})
        response = await client.get("/v1/models")
        await response.read()
    assert response.status == status
    assert response.reason == "Said [upstream key]"


@pytest.mark.parametrize(
    ("lines", "body"),
    [
        # "identity" then "gzip": read from the first line, the gzip body went on untouched.
        (["Content-Encoding: identity", "Content-Encoding: gzip"], gzip.compress),
        # Gzipped twice: one layer came off, no key in what was left, and it went on.
        (
            ["Content-Encoding: gzip", "Content-Encoding: gzip"],
            lambda raw: gzip.compress(gzip.compress(raw)),
        ),
    ],
)
@pytest.mark.parametrize("path", ["/v1/models", "/v1/chat/completions"])
async def test_an_error_body_in_two_content_encoding_lines_does_not_hand_on_the_key(
    gateway_factory: GatewayFactory, lines: list[str], body: Any, path: str
) -> None:
    """Two ``Content-Encoding`` lines are two codings, as one line of both is (h53)."""
    raw = json.dumps({"error": {"message": f"bad key Bearer {KEY}"}}).encode()
    script = Script(
        status=401,
        headers={"Content-Type": "application/json", "X-Echo-" + KEY: "1"},
        more_head_lines=lines,
        chunks=[body(raw)],
        framing="length",
    )
    async with scripted_upstream(script) as up:
        client = await gateway_factory(up.url, upstream={"api_key": KEY})
        chat = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
        response = await client.post(path, json=chat, auto_decompress=False)
        got = await response.read()
    assert response.status == 401
    assert KEY.encode() not in got
    for decode in (gzip.decompress, lambda b: gzip.decompress(gzip.decompress(b))):
        with contextlib.suppress(OSError, EOFError):
            assert KEY.encode() not in decode(got)
    # A header whose name holds the key is left out (a name cannot hold the mask).
    assert not any(KEY.lower() in name.lower() for name in response.headers)


@pytest.mark.parametrize(("status", "path"), [(401, "/v1/models"), (200, "/v1/chat/completions")])
async def test_a_content_encoding_naming_the_key_is_not_quoted_back(
    gateway_factory: GatewayFactory, status: int, path: str
) -> None:
    """The gateway's errors named the upstream's coding, lower-cased past the mask: an
    upstream that put the key there had it quoted back to the client (h54)."""
    script = Script(
        status=status,
        headers={"Content-Type": "application/json"},
        more_head_lines=[f"Content-Encoding: {KEY.upper()}"],
        chunks=[b"{}"],
        framing="length",
    )
    async with scripted_upstream(script) as up:
        client = await gateway_factory(up.url, upstream={"api_key": KEY})
        chat = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
        response = await client.post(path, json=chat)
        message = (await response.json())["error"]["message"]
    assert response.status == (401 if status == 401 else 502)
    assert KEY.lower() not in message.lower()
    assert "a coding HTTP does not know" in message


async def test_an_error_body_of_two_gzip_members_goes_on_whole(
    gateway_factory: GatewayFactory,
) -> None:
    """A gzip body may be several members, one after another: the second was dropped,
    and the client got half an error body (h54)."""
    first, second = b'{"error": {"message": "bad key ', f'{KEY}"}}}}'.encode()
    script = Script(
        status=401,
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        chunks=[gzip.compress(first) + gzip.compress(second)],
        framing="length",
    )
    async with scripted_upstream(script) as up:
        client = await gateway_factory(up.url, upstream={"api_key": KEY})
        response = await client.get("/v1/models")
        got = await response.read()
    assert got == (first + second).replace(KEY.encode(), MASK)


async def test_the_key_as_an_object_name_in_the_answer_is_masked_where_stored(
    gateway_factory: GatewayFactory, rows: Rows
) -> None:
    """Values were masked, names were not: a name in ``usage`` was stored as the upstream
    sent it, and the Conversations API listed it back (h56)."""
    answer = chat_completion("ok", usage={"prompt_tokens": 1, KEY: KEY, "details": {KEY: 2}})
    script = Script(
        headers={"Content-Type": "application/json"},
        chunks=[json.dumps(answer).encode()],
        framing="length",
    )
    async with scripted_upstream(script) as up:
        client = await gateway_factory(up.url, upstream={"api_key": KEY})
        response = await client.post(
            "/v1/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "x"}]},
            headers={"X-Conversation-Id": "names"},
        )
        assert KEY.encode() not in await response.read()
        items = await (await client.get("/v1/conversations/names/items")).read()
    mask = MASK.decode()
    assert json.loads(rows.messages("names")[-1]["usage"]) == {
        "prompt_tokens": 1,
        mask: mask,
        "details": {mask: 2},
    }
    assert KEY.encode() not in items


async def test_an_empty_error_body_labelled_compressed_goes_on_empty(
    gateway_factory: GatewayFactory,
) -> None:
    """Nothing to look for the key in, so nothing is withheld (it got the gateway's
    "could not check" error, as a gzip body cut short does)."""
    script = Script(
        status=401,
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        chunks=[],
        framing="length",
    )
    async with scripted_upstream(script) as up:
        client = await gateway_factory(up.url, upstream={"api_key": KEY})
        response = await client.get("/v1/models", auto_decompress=False)
        assert (response.status, await response.read()) == (401, b"")


@pytest.mark.parametrize("key", [KEY, None])
async def test_with_a_key_the_passthrough_asks_for_an_uncompressed_answer(
    gateway_factory: GatewayFactory, key: str | None
) -> None:
    """The key cannot be looked for in compressed bytes: with one, the upstream is asked
    for ``identity`` whatever the client accepts; without, the client's header goes up."""
    script = Script(headers={"Content-Type": "application/json"}, chunks=[b"{}"])
    async with scripted_upstream(script) as up:
        upstream = {"api_key": key} if key else {}
        client = await gateway_factory(up.url, upstream=upstream)
        response = await client.get("/v1/models", headers={"Accept-Encoding": "br, gzip"})
        assert await response.read() == b"{}"
    sent = {name.lower(): value for name, value in up.requests[0][2].items()}
    assert sent["accept-encoding"] == ("identity" if key else "br, gzip")


def _gzip_members(body: bytes) -> bytes:
    """``body`` in two gzip members, cut inside the key: a member ends there."""
    cut = body.index(KEY.encode()) + 6
    return gzip.compress(body[:cut]) + gzip.compress(body[cut:])


def _raw_deflate(body: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-15)
    return compressor.compress(body) + compressor.flush()


_INCOMPRESSIBLE = b"".join(hashlib.sha256(bytes([i])).digest() for i in range(64))


def _zstd_frames(body: bytes) -> bytes:
    """``body`` in two zstd frames, cut inside the key, as ``_gzip_members``."""
    cut = body.index(KEY.encode()) + 6
    return COMPRESS["zstd"](body[:cut]) + COMPRESS["zstd"](body[cut:])


@pytest.mark.parametrize(
    ("encoding", "compress"),
    [
        ("gzip", _gzip_members),
        ("deflate", zlib.compress),
        ("deflate", _raw_deflate),
        ("br", COMPRESS["br"]),
        ("zstd", _zstd_frames),
    ],
)
@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_a_compressed_passthrough_answer_goes_on_decoded_with_the_key_masked(
    gateway_factory: GatewayFactory, encoding: str, compress: Any, framing: str
) -> None:
    """An upstream that compresses a 200 although asked not to, echoing the key: it
    reached the client as it came, and a client that decoded it read the key.  It goes on
    decoded now (its ``Content-Length`` no longer holds), the key masked, in reads cut
    anywhere; a body of 2 MiB of zeros (2 KiB compressed) whole."""
    body = json.dumps({"you sent": f"Bearer {KEY}", "pad": "0" * 2**21}).encode()
    wire = compress(body)
    cuts = [wire[:3], 0.01, wire[3 : len(wire) // 2], 0.01, wire[len(wire) // 2 :]]
    script = Script(
        headers={"Content-Type": "application/json", "Content-Encoding": encoding},
        chunks=cuts,
        framing=framing,  # type: ignore[arg-type]
    )
    async with scripted_upstream(script) as up:
        client = await gateway_factory(up.url, upstream={"api_key": KEY})
        response = await client.get("/v1/models", auto_decompress=False)
        got = await response.read()
    assert response.status == 200
    assert "Content-Encoding" not in response.headers
    assert response.headers.get("Content-Length") in (None, str(len(got)))
    assert got == body.replace(KEY.encode(), MASK)


@pytest.mark.parametrize("encoding", ["gzip", "br", "zstd"])
async def test_head_of_a_compressed_passthrough_answer_says_what_get_would(
    gateway_factory: GatewayFactory, encoding: str
) -> None:
    """HEAD answers with the headers GET would have: with a key, GET decodes a compressed
    answer (above), so HEAD relayed ``Content-Encoding`` and the compressed length where
    GET sends neither, and a cache that keeps HEAD's headers for GET's body got them
    wrong."""
    script = Script(
        headers={"Content-Type": "application/json", "Content-Encoding": encoding},
        more_head_lines=["Content-Length: 2048"],
        framing="close",  # a HEAD's answer has no body, whatever its length says
    )
    async with scripted_upstream(script) as up:
        client = await gateway_factory(up.url, upstream={"api_key": KEY})
        response = await client.head("/v1/models", auto_decompress=False)
        await response.read()
    assert response.status == 200
    assert "Content-Encoding" not in response.headers
    assert "Content-Length" not in response.headers
    assert response.headers["Content-Type"] == "application/json"


@pytest.mark.parametrize(
    ("encoding", "wire"),
    [
        ("gzip", gzip.compress(f"Bearer {KEY}".encode(), mtime=0)[:-8]),  # no trailer
        ("gzip", gzip.compress(b"{}", mtime=0) + b"not a second member"),
        ("br", COMPRESS["br"](f"Bearer {KEY}".encode() * 50)[:-4]),
        # A brotli stream has no second one (past the first KiB, which is checked
        # before the body is taken for brotli at all).
        ("br", COMPRESS["br"](_INCOMPRESSIBLE) + b"more"),
        ("zstd", COMPRESS["zstd"](f"Bearer {KEY}".encode())[:-4]),
        ("zstd", COMPRESS["zstd"](b"{}") + b"not a second frame"),
    ],
    ids=[
        *("gzip cut short", "not gzip after a member", "br cut short", "bytes after br"),
        *("zstd cut short", "not zstd after a frame"),
    ],
)
async def test_a_compressed_passthrough_answer_that_breaks_is_cut_off(
    gateway_factory: GatewayFactory, encoding: str, wire: bytes
) -> None:
    """Decoded as it goes, a body that turns out cut short or not gzip after all cannot
    end as a whole one: the client's connection is cut, as for any broken body."""
    script = Script(
        headers={"Content-Type": "application/json", "Content-Encoding": encoding},
        chunks=[wire],
        framing="close",
    )
    async with scripted_upstream(script) as up:
        client = await gateway_factory(up.url, upstream={"api_key": KEY})
        response = await client.get("/v1/models", auto_decompress=False)
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()


@pytest.mark.parametrize("encoding", ["br", "gzip", "deflate", "zstd"])
@pytest.mark.parametrize(
    "body",
    [f"echo: Bearer {KEY}".encode(), b'[{"id": 1}]' + b" " * 80 + f"{KEY}".encode()],
    ids=["text", "json"],
)
@pytest.mark.parametrize("first", [None, 1], ids=["one read", "a byte first"])
async def test_a_body_only_labelled_compressed_is_masked_as_it_came(
    gateway_factory: GatewayFactory, encoding: str, body: bytes, first: int | None
) -> None:
    """A 200 that says it is compressed but holds plain text (h47): the key in it went
    out as written, as compressed bodies did.  It goes on as it came (its first bytes are
    not in the coding, so it is not decoded), the key masked in place.  Also when the
    first read brings one byte: on ``[`` or ``{`` alone a deflate or brotli stream may
    start, and the body was decoded into garbage and then cut off; the gateway now looks
    at 64 bytes at least (or all of a shorter body)."""
    chunks: list[bytes | float] = [body] if first is None else [body[:first], 0.05, body[first:]]
    script = Script(
        headers={"Content-Type": "text/plain", "Content-Encoding": encoding},
        chunks=chunks,
        framing="length",
    )
    async with scripted_upstream(script) as up:
        client = await gateway_factory(up.url, upstream={"api_key": KEY})
        response = await client.get("/v1/models", auto_decompress=False)
        got = await response.read()
    assert got == body.replace(KEY.encode(), b"*" * len(KEY))
    assert response.headers["Content-Encoding"] == encoding
    assert response.headers["Content-Length"] == str(len(body))


def test_the_spellings_are_the_key_as_json() -> None:
    """The test's own spellings: each is the key, as JSON reads it, and they all differ."""
    for spelling in SPELLINGS.values():
        assert json.loads(b'"' + spelling + b'"') == ODD_KEY
    assert len(set(SPELLINGS.values())) == len(SPELLINGS)
    assert SPELLINGS["python"] == json.dumps(ODD_KEY)[1:-1].encode()


@given(
    parts=st.lists(
        st.sampled_from(
            [
                *SPELLINGS.values(),
                ODD_KEY.encode(),
                *(b"cm-", b"cm-8f\\/", b"\\u00", b"\\", b"\n", b'"x":', b"a" * 30),
            ]
        )
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=600), max_size=8),
)
def test_every_spelling_of_the_key_is_masked_wherever_the_pieces_are_cut(
    parts: list[bytes], cuts: list[int]
) -> None:
    """In whatever spelling the key comes, cut anywhere, it goes out masked, and nothing
    else is changed."""
    pieces = _cut(b"".join(parts), cuts)
    key = ODD_KEY.encode()
    redactor = Redactor(key)
    out = b"".join(redactor.feed(p) for p in pieces) + redactor.end()
    keys = {key, *SPELLINGS.values()}
    assert out == b"".join(MASK if part in keys else part for part in parts)
    stars = Redactor(key, keep_length=True)
    same_length = b"".join(stars.feed(p) for p in pieces) + stars.end()
    assert same_length == b"".join(b"*" * len(p) if p in keys else p for p in parts)


@st.composite
def _key_and_body(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    """A key of the characters JSON encoders escape, self-overlapping ones among them,
    and a body of its spellings (each character spelt as any encoder may), pieces of
    them and its characters, cut anywhere."""
    alphabet = '\\"u02cCf/<=*a'
    key = draw(st.text(alphabet, min_size=8, max_size=12)).encode()

    def spelling(chars: int = len(key)) -> bytes:
        forms = _escaped_forms(key)[:chars]
        return b"".join(draw(st.sampled_from(spellings)) for spellings in forms)

    parts = []
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["spelling", "all but the end", "part", "text"]))
        if kind == "spelling":
            parts.append(spelling())
        elif kind == "all but the end":
            parts.append(spelling(len(key) - draw(st.integers(1, 2))))
        elif kind == "part":
            whole = spelling()
            parts.append(whole[: draw(st.integers(1, len(whole) - 1))])
        else:
            parts.append(draw(st.text(alphabet + "\n", max_size=8)).encode())
    return key, _cut(b"".join(parts), draw(st.lists(st.integers(0, 300), max_size=6)))


def _escaped_forms(key: bytes) -> list[tuple[bytes, ...]]:
    escaped = redact._escaped(key)
    return list(escaped.spellings) if escaped else [(bytes([b]),) for b in key]


@settings(max_examples=400)
@given(case=_key_and_body(), keep_length=st.booleans())
@example(  # found by a review: the stars finished the spelling before them
    case=(b'c0cC0"<""u*', [b'0c""\nc0cC0\\"<\\u0022\\"uc0cC0\\"<\\"\\u0022u\\u002a']),
    keep_length=True,
)
def test_no_spelling_of_any_key_survives(
    case: tuple[bytes, list[bytes]], keep_length: bool
) -> None:
    """Keys that start as they end, with ``*`` (a length-keeping mask's own byte) or
    ``\\`` in them: whatever the cuts, no spelling is left, and the length is kept
    where it must be (found by a review: ``*`` finished a spelling the body held all
    but the end of, and the mask is ``#`` for such a key now)."""
    key, pieces = case
    redactor = Redactor(key, keep_length=keep_length)
    out = b"".join(redactor.feed(p) for p in pieces) + redactor.end()
    escaped = redact._escaped(key)
    assert key not in out
    assert escaped is None or escaped.pattern.search(out) is None
    if keep_length:
        assert len(out) == sum(map(len, pieces))


@pytest.mark.parametrize("stream", [False, True], ids=["completion", "stream"])
async def test_a_plain_key_written_with_json_escapes_is_masked(
    gateway_factory: GatewayFactory, rows: Rows, stream: bool
) -> None:
    """A key of letters, digits and ``-`` was taken to have one spelling, but JSON may
    write any character ``\\u00XX``: ``sk\\u002dtest...`` reached the client, which read
    the key from it, in an answer and in an error, through chat and the passthrough."""
    spelling = KEY.replace("-", "\\u002d").replace("S", "\\u0053").encode()
    said = b'{"error": {"message": "bad key ' + spelling + b'"}}'
    answer = json.dumps(chunk("x")).replace("x", "KEY").encode().replace(b"KEY", spelling)
    if stream:
        chunks: list[bytes | float] = [
            b"data: " + answer + b"\n\n",
            sse(chunk(finish="stop")),
            sse("[DONE]"),
        ]
        ok = Script(chunks=chunks)  # type: ignore[arg-type]
    else:
        body = json.dumps(chat_completion("KEY")).encode().replace(b"KEY", spelling)
        ok = Script(headers={"Content-Type": "application/json"}, chunks=[body], framing="length")
    cut = said.index(spelling) + 9  # inside the spelling, in two reads
    error = Script(
        status=401,
        headers={"Content-Type": "application/json"},
        chunks=[said[:cut], 0.05, said[cut:]],
        framing="length",
    )
    for script, path in (
        (ok, "/v1/chat/completions"),
        (error, "/v1/chat/completions"),
        (error, "/v1/embeddings"),
        (ok, "/v1/embeddings"),
    ):
        async with scripted_upstream(script) as up:
            client = await gateway_factory(up.url, upstream={"api_key": KEY})
            response = await client.post(
                path,
                json={
                    "model": "m",
                    "stream": stream,
                    "messages": [{"role": "user", "content": "q"}],
                },
                headers={"X-Conversation-Id": "u1"},
            )
            got = await response.read()
        assert spelling not in got and b"\\u002d" not in got, (path, got)
        assert KEY.encode() not in got
    assert KEY not in json.dumps(rows.messages("u1"))


def test_a_tab_in_the_key_is_found_as_json_writes_it() -> None:
    """A header value may hold a tab, which every JSON encoder writes ``\\t``."""
    key = b"sk-with\ttab-0123"
    body = b'{"error": "bad key sk-with\\ttab-0123"}'
    assert redact.mask_bytes(body, key) == b'{"error": "bad key [upstream key]"}'


def test_an_event_that_ends_is_not_held_back() -> None:
    """A piece that ends with a line break goes on whole: no spelling holds one."""
    redactor = Redactor(ODD_KEY.encode())
    event = b'data: {"text": "cm-8f\\/Q"}\n\n'
    assert redactor.feed(event) == event
    assert redactor.feed(b'data: {"text": "cm-8f\\/Q') == b'data: {"text": "'
    assert redactor.end() == b"cm-8f\\/Q"


@pytest.mark.parametrize("encoder", ["php", "go", "dotnet"])
async def test_an_upstream_error_quoting_the_key_as_json_escapes_it_does_not_hand_it_on(
    gateway_factory: GatewayFactory, rows: Rows, encoder: str
) -> None:
    """A PHP, Go or .NET upstream quotes the key with its own JSON escapes, across two
    reads: the client gets the mask, on the chat route as on the passthrough."""
    spelling = SPELLINGS[encoder]
    error = b'{"error": {"message": "invalid key: Bearer ' + spelling + b'"}}'
    cut = error.index(spelling) + 7
    script = Script(
        status=401,
        headers={"Content-Type": "application/json"},
        chunks=[error[:cut], 0.05, error[cut:]],
        framing="length",
    )
    for path in ("/v1/chat/completions", "/v1/embeddings"):
        async with scripted_upstream(script) as up:
            client = await gateway_factory(up.url, upstream={"api_key": ODD_KEY})
            response = await client.post(
                path,
                json={"model": "m", "input": "x", "messages": [{"role": "user", "content": "x"}]},
                headers={"X-Conversation-Id": "e1"},
            )
            got = await response.read()
        assert response.status == 401
        assert json.loads(got)["error"]["message"] == "invalid key: Bearer [upstream key]"
        assert spelling not in got
    assert rows.messages("e1") == []


async def test_a_streamed_answer_with_the_key_json_escaped_is_masked_sent_and_stored(
    gateway_factory: GatewayFactory, rows: Rows
) -> None:
    """A Go upstream streams the key in its answer, escaped in the event's JSON: the
    client gets the mask in that event and the stored turn holds it too."""
    said = f"the key is {ODD_KEY}."
    event = json.dumps(chunk(said, role="assistant"))
    go = event.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    assert go != event and json.loads(go) == json.loads(event)
    script = Script(
        headers={"Content-Type": "text/event-stream"},
        chunks=[b"data: " + go.encode() + b"\n\n", sse(chunk(finish="stop")), sse("[DONE]")],
    )
    async with scripted_upstream(script) as up:
        client = await gateway_factory(up.url, upstream={"api_key": ODD_KEY})
        response = await client.post(
            "/v1/chat/completions",
            json={"model": "m", "stream": True, "messages": [{"role": "user", "content": "x"}]},
            headers={"X-Conversation-Id": "e2"},
        )
        got = await response.read()
    assert SPELLINGS["go"] not in got
    first = got.split(b"\n\n")[0]
    assert json.loads(first.removeprefix(b"data: "))["choices"][0]["delta"]["content"] == (
        "the key is [upstream key]."
    )
    assert json.loads(rows.messages("e2")[-1]["content"]) == "the key is [upstream key]."


async def test_a_control_frame_masked_past_125_bytes_is_cut_to_fit(
    gateway_factory: GatewayFactory, aiohttp_server: Any
) -> None:
    """Item 152: ``[upstream key]`` is 14 bytes, and a key of 8 grows a ping's payload or
    a close reason past the 125 bytes a control frame holds: the client refused the
    frame ("Control frame payload cannot be larger than 125 bytes") and never got the
    close code. Masked, then cut to fit."""
    short = "sk-12345"

    async def realtime(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.ping(short.encode() + b"p" * 117)  # 125 bytes
        await ws.close(code=4001, message=short.encode() + b"r" * 115)  # 2 + 123 bytes
        return ws

    up = await realtime_upstream(aiohttp_server, realtime)
    gateway = await gateway_factory(up, upstream={"api_key": short})
    async with gateway.ws_connect("/v1/realtime", autoping=False) as ws:
        ping = await ws.receive()
        assert ping.type is WSMsgType.PING
        assert ping.data == (b"[upstream key]" + b"p" * 117)[:125]
        closing = await ws.receive()
    assert (closing.type, closing.data) == (WSMsgType.CLOSE, 4001)
    assert closing.extra == ("[upstream key]" + "r" * 115)[:123]


async def test_websocket_text_with_the_key_json_escaped_is_masked(
    gateway_factory: GatewayFactory, aiohttp_server: Any
) -> None:
    """A Realtime upstream in Go writes its error message's key with Go's escapes."""

    async def realtime(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str('{"message": "bad key ' + SPELLINGS["go"].decode() + '"}')
        await ws.close()
        return ws

    up = await realtime_upstream(aiohttp_server, realtime)
    gateway = await gateway_factory(up, upstream={"api_key": ODD_KEY})
    async with gateway.ws_connect("/v1/realtime") as ws:
        assert await ws.receive_str() == '{"message": "bad key [upstream key]"}'
