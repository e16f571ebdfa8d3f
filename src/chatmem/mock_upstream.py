"""An OpenAI-compatible fake model server: deterministic, fast, and recording.

It serves ``chatmem serve --demo``, the test-suite and the benchmarks (where it is the
baseline, so the hot path builds each response once and writes pre-encoded events).

The reply to a chat completion is derived from the request alone: the tokens ``"Echo"``,
the words of the last user message and ``"(N messages)"``, cycled or cut to the token
budget. Headers ``X-Mock-Tokens`` and ``X-Mock-Delay-Ms`` override the budget and the
delay between tokens for one request. Every request except the ``/_mock/`` control routes
is recorded under ``app[RECEIVED]``; ``GET /_mock/requests`` lists them for tests that run
the mock out of process, ``DELETE /_mock/requests`` clears them.

It is deliberately independent of the gateway's own modules: it stands in for a foreign
server, so a bug in the gateway cannot hide behind the same bug in its fake.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import gc
import hashlib
import itertools
import json
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

__all__ = ["RECEIVED", "ReceivedRequest", "create_mock_app", "run_mock_upstream"]

MOCK_MODEL = "mock-model"
CREATED = 1_700_000_000
HISTORY_SIZE = 1000
REASONING_TOKENS = ("Thinking", " about", " it.")
TOOL_CALL_ID = "call_mock_0"
_TOOL_FRAGMENTS = 3
_MAX_BODY = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ReceivedRequest:
    """One request as the mock saw it; ``json`` is None when the body is not JSON."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    json: Any | None

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "headers": self.headers,
            "json": self.json,
        }


@dataclass(frozen=True, slots=True)
class _Settings:
    tokens: int
    delay_ms: float


RECEIVED: web.AppKey[collections.deque[ReceivedRequest]] = web.AppKey("RECEIVED")
_SETTINGS = web.AppKey("mock_settings", _Settings)
_RECORD = web.RequestKey("mock_record", ReceivedRequest)

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


_ENCODER = json.JSONEncoder(
    separators=(",", ":")
)  # built once: json.dumps(**kw) builds one per call


def _dumps(value: Any) -> str:
    return _ENCODER.encode(value)


def _json_response(value: Any) -> web.Response:
    return web.Response(body=_dumps(value).encode(), content_type="application/json")


class _BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def response(self) -> web.Response:
        error = {
            "message": self.message,
            "type": "invalid_request_error",
            "param": self.param,
            "code": None,
        }
        return web.Response(
            status=400, body=_dumps({"error": error}).encode(), content_type="application/json"
        )


# --- recording ------------------------------------------------------------------------


def _parse_json(body: bytes) -> Any | None:
    if not body:
        return None
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # also UnicodeDecodeError; deep nesting (h57)
        return None


@web.middleware
async def _record_middleware(request: web.Request, handler: _Handler) -> web.StreamResponse:
    body = await request.read()
    record = ReceivedRequest(
        method=request.method,
        path=request.path,
        query=request.rel_url.raw_query_string,  # as it came, escapes and all
        headers=dict(request.headers),
        body=body,
        json=_parse_json(body),
    )
    request[_RECORD] = record
    if not request.path.startswith("/_mock/"):
        request.app[RECEIVED].append(record)
    try:
        return await handler(request)
    except _BadRequest as exc:
        return exc.response()
    except (web.HTTPNotFound, web.HTTPMethodNotAllowed) as exc:
        # In OpenAI's shape, as a real server answers a route it lacks: the SDKs show
        # its message (aiohttp's "404: Not Found" left them only "Error code: 404").
        error = {
            "message": f"Unknown request URL: {request.method} {request.path}.",
            "type": "invalid_request_error",
            "param": None,
            "code": "unknown_url",
        }
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return web.Response(
            status=exc.status,
            body=_dumps({"error": error}).encode(),
            content_type="application/json",
            headers=allow,
        )


def _payload(request: web.Request) -> dict[str, Any]:
    record = request[_RECORD]
    if record.json is None:
        raise _BadRequest("We could not parse the JSON body of your request.")
    if not isinstance(record.json, dict):
        raise _BadRequest("The request body must be a JSON object.")
    return record.json


async def _list_requests(request: web.Request) -> web.Response:
    return _json_response([r.to_json() for r in request.app[RECEIVED]])


async def _clear_requests(request: web.Request) -> web.Response:
    request.app[RECEIVED].clear()
    return web.Response(status=204)


# --- request fields ---------------------------------------------------------------------


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            part["text"]
            for part in content
            if isinstance(part, dict)
            and part.get("type") == "text"
            and isinstance(part.get("text"), str)
        )
    return ""


def _messages(payload: dict[str, Any]) -> list[Any]:
    messages = payload.get("messages")
    if not isinstance(messages, list):
        raise _BadRequest("'messages' is a required array.", "messages")
    return messages


def _last_user_text(messages: list[Any]) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return _text_of(message.get("content"))
    return ""


def _word_count(messages: list[Any]) -> int:
    return sum(len(_text_of(m.get("content")).split()) for m in messages if isinstance(m, dict))


def _model(payload: dict[str, Any]) -> str:
    model = payload.get("model")
    return model if isinstance(model, str) and model else MOCK_MODEL


_MAX_TOKENS = 100_000
"""Tokens an answer (all its choices together): a client of ``--demo`` sets the headers,
and must not make the in-process mock build gigabytes."""
_MAX_DELAY_MS = 60_000.0
_MAX_CHOICES = 128  # OpenAI's own limit for n


def _number_header(request: web.Request, name: str, default: float, maximum: float) -> float:
    raw = request.headers.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value <= maximum:  # also NaN
        raise _BadRequest(f"{name} must be a number from 0 to {maximum:g}.")
    return value


def _int_field(payload: dict[str, Any], name: str, *, minimum: int) -> int | None:
    value = payload.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _BadRequest(f"'{name}' must be an integer >= {minimum}.", name)
    return value


def _budget(request: web.Request, payload: dict[str, Any]) -> tuple[int, str]:
    """How many content tokens to emit per choice, and the finish reason that implies."""
    wanted = int(
        _number_header(request, "X-Mock-Tokens", request.app[_SETTINGS].tokens, _MAX_TOKENS)
    )
    caps = [
        cap
        for cap in (
            _int_field(payload, "max_tokens", minimum=0),
            _int_field(payload, "max_completion_tokens", minimum=0),
        )
        if cap is not None
    ]
    if caps and min(caps) < wanted:
        return min(caps), "length"
    return wanted, "stop"


def _delay_s(request: web.Request) -> float:
    settings = request.app[_SETTINGS]
    return _number_header(request, "X-Mock-Delay-Ms", settings.delay_ms, _MAX_DELAY_MS) / 1000


def _function_name(tool: Any) -> Any:
    """``tool["function"]["name"]`` of a tool or a tool choice, None where it is missing."""
    function = tool.get("function") if isinstance(tool, dict) else None
    return function.get("name") if isinstance(function, dict) else None


def _tool_name(payload: dict[str, Any]) -> str | None:
    """The function to call when the request forces a tool call, else None."""
    tools = payload.get("tools")
    choice = payload.get("tool_choice")
    if not isinstance(tools, list) or not tools:
        return None
    chosen = _function_name(choice)
    if isinstance(chosen, str) and chosen:
        return chosen
    if choice != "required":
        return None
    name = _function_name(tools[0])
    if not isinstance(name, str) or not name:
        raise _BadRequest("The first tool has no function name to call.", "tools")
    return name


def _fragments(arguments: str) -> list[str]:
    """``arguments`` cut into ``_TOOL_FRAGMENTS`` consecutive parts, the last the longest."""
    step = len(arguments) // _TOOL_FRAGMENTS
    cuts = [i * step for i in range(_TOOL_FRAGMENTS)] + [len(arguments)]
    return [arguments[a:b] for a, b in itertools.pairwise(cuts)]


def _pieces(words: list[str], count: int) -> list[str]:
    """``count`` tokens cycled from ``words``; every token but the first is ' '-prefixed."""
    return [
        w if i == 0 else " " + w
        for i, w in enumerate(itertools.islice(itertools.cycle(words), count))
    ]


# --- chat completions -------------------------------------------------------------------


class _Schedule:
    """When a reply's steps are due: step ``k`` at ``k`` delays after the first, on the
    loop's clock, as a model server's tokens come at the pace it computes them, however
    late the previous one was written.  Sleeping one delay after each write instead adds
    every late wake-up to all the steps after it, so a busy machine slowed the upstream
    itself: the gateway's CPU, on the same two cores, lengthened the mock's streams as
    well as its own part of them (benchmarks, 256 streams x 20 ms)."""

    __slots__ = ("_delay_s", "_start")

    def __init__(self, delay_s: float, start: float | None = None) -> None:
        self._delay_s = delay_s
        self._start = asyncio.get_running_loop().time() if start is None else start

    def wait(self, k: int, now: float) -> float:
        """Seconds from ``now`` until step ``k`` is due (0 if it is already)."""
        return max(0.0, self._start + k * self._delay_s - now)

    async def step(self, k: int) -> None:
        """Return when step ``k`` is due."""
        if self._delay_s:
            wait = self.wait(k, asyncio.get_running_loop().time())
            if wait:
                await asyncio.sleep(wait)


@dataclass(frozen=True, slots=True)
class _Reply:
    id: str
    model: str
    n: int
    pieces: list[str]  # content tokens of choice 0; choice i > 0 adds "[i] " to the first
    finish_reason: str
    reasoning: bool
    tool_call: tuple[str, str] | None  # (function name, arguments JSON)
    prompt_tokens: int
    delay_s: float
    include_usage: bool

    def choice_pieces(self, index: int) -> list[str]:
        if index == 0 or not self.pieces:
            return self.pieces
        return [f"[{index}] {self.pieces[0]}", *self.pieces[1:]]

    def steps(self) -> int:
        """Deltas per choice after the role delta: reasoning, then content or tool call."""
        body = _TOOL_FRAGMENTS if self.tool_call else len(self.pieces)
        return (len(REASONING_TOKENS) if self.reasoning else 0) + body

    def usage(self) -> dict[str, int]:
        completion = self.steps() * self.n
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }


def _plan_reply(request: web.Request, payload: dict[str, Any]) -> _Reply:
    messages = _messages(payload)
    last_user = _last_user_text(messages)
    count, finish_reason = _budget(request, payload)
    n = _int_field(payload, "n", minimum=1) or 1
    if n > _MAX_CHOICES or n * count > _MAX_TOKENS:
        raise _BadRequest(f"'n' times the tokens must be at most {_MAX_TOKENS}.", "n")
    tool_name = _tool_name(payload)
    model = _model(payload)
    stream_options = payload.get("stream_options")
    words = ["Echo", *last_user.split(), f"({len(messages)} messages)"]
    return _Reply(
        id="chatcmpl-mock-" + hashlib.sha256(request[_RECORD].body).hexdigest()[:8],
        model=model,
        n=n,
        pieces=[] if tool_name else _pieces(words, count),
        finish_reason="tool_calls" if tool_name else finish_reason,
        reasoning="reason" in model.lower(),
        tool_call=(tool_name, _dumps({"echo": last_user})) if tool_name else None,
        prompt_tokens=_word_count(messages),
        delay_s=_delay_s(request),
        include_usage=isinstance(stream_options, dict)
        and stream_options.get("include_usage") is True,
    )


def _message(reply: _Reply, index: int) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": None}
    if reply.reasoning:
        message["reasoning_content"] = "".join(REASONING_TOKENS)
    if reply.tool_call:
        name, arguments = reply.tool_call
        function = {"name": name, "arguments": arguments}
        message["tool_calls"] = [{"id": TOOL_CALL_ID, "type": "function", "function": function}]
    else:
        message["content"] = "".join(reply.choice_pieces(index))
    return message


async def _complete(reply: _Reply) -> web.Response:
    if reply.delay_s and reply.steps() > 1:
        await asyncio.sleep(reply.delay_s * (reply.steps() - 1))
    choices = [
        {
            "index": i,
            "message": _message(reply, i),
            "logprobs": None,
            "finish_reason": reply.finish_reason,
        }
        for i in range(reply.n)
    ]
    return _json_response(
        {
            "id": reply.id,
            "object": "chat.completion",
            "created": CREATED,
            "model": reply.model,
            "choices": choices,
            "usage": reply.usage(),
        }
    )


class _Events:
    """Encodes the SSE events of one streamed reply from pre-rendered JSON templates."""

    def __init__(self, reply: _Reply) -> None:
        head = _dumps(
            {
                "id": reply.id,
                "object": "chat.completion.chunk",
                "created": CREATED,
                "model": reply.model,
            }
        )[:-1]
        self._choice_heads = [
            f'data: {head},"choices":[{{"index":{i},"delta":' for i in range(reply.n)
        ]
        self._usage_head = f'data: {head},"choices":[],"usage":'
        self.reply = reply

    def chunk(self, index: int, delta: str, finish_reason: str | None = None) -> bytes:
        """One choice's event; ``delta`` is already JSON."""
        finish = "null" if finish_reason is None else json.dumps(finish_reason)
        tail = f',"logprobs":null,"finish_reason":{finish}}}]}}\n\n'
        return f"{self._choice_heads[index]}{delta}{tail}".encode()

    def token(self, index: int, field: str, text: str) -> bytes:
        """The hot path: a delta with one string field, e.g. ``{"content":" word"}``."""
        return self.chunk(index, f'{{"{field}":{json.dumps(text)}}}')

    def usage(self) -> bytes:
        return f"{self._usage_head}{_dumps(self.reply.usage())}}}\n\n".encode()

    def token_steps(self) -> list[list[bytes]]:
        """One list per step, holding that step's event for every choice."""
        reply = self.reply
        choices = range(reply.n)
        steps: list[list[bytes]] = []
        if reply.reasoning:
            for text in REASONING_TOKENS:
                steps.append([self.token(i, "reasoning_content", text) for i in choices])
        if reply.tool_call:
            name, arguments = reply.tool_call
            for k, fragment in enumerate(_fragments(arguments)):
                call: dict[str, Any] = {"index": 0, "function": {"arguments": fragment}}
                if k == 0:
                    call = {"index": 0, "id": TOOL_CALL_ID, "type": "function"}
                    call["function"] = {"name": name, "arguments": fragment}
                delta = _dumps({"tool_calls": [call]})
                steps.append([self.chunk(i, delta) for i in choices])
            return steps
        per_choice = [reply.choice_pieces(i) for i in choices]
        for k in range(len(reply.pieces)):
            steps.append([self.token(i, "content", per_choice[i][k]) for i in choices])
        return steps


async def _stream(request: web.Request, reply: _Reply) -> web.StreamResponse:
    events = _Events(reply)
    opening = [events.chunk(i, '{"role":"assistant","content":""}') for i in range(reply.n)]
    steps = events.token_steps()
    closing = [events.chunk(i, "{}", reply.finish_reason) for i in range(reply.n)]
    if reply.include_usage:
        closing.append(events.usage())
    closing.append(b"data: [DONE]\n\n")

    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await resp.prepare(request)
    try:
        for event in opening:
            await resp.write(event)
        due = _Schedule(reply.delay_s)
        for k, step in enumerate(steps):
            await due.step(k)  # step 0 at once
            for event in step:
                await resp.write(event)
        for event in closing:
            await resp.write(event)
        await resp.write_eof()
    except ConnectionResetError:  # the client went away; nothing left to tell it
        pass
    return resp


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    payload = _payload(request)
    reply = _plan_reply(request, payload)
    if payload.get("stream") is True:
        return await _stream(request, reply)
    return await _complete(reply)


async def _stream_completion(
    request: web.Request,
    completion_id: str,
    payload: dict[str, Any],
    pieces: list[str],
    finish_reason: str,
) -> web.StreamResponse:
    """Legacy completions streamed: one ``text_completion`` event per token, then [DONE]."""
    head = {
        "id": completion_id,
        "object": "text_completion",
        "created": CREATED,
        "model": _model(payload),
    }
    delay_s = _delay_s(request)
    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    # Rendered from templates, as chat's events are (``_Events``): the fast mode's two
    # streaming endpoints cost the mock alike, so neither flatters what is put before it.
    opening = f'data: {_dumps(head)[:-1]},"choices":[{{"text":'
    middle = ',"index":0,"logprobs":null,"finish_reason":'
    await resp.prepare(request)
    try:
        due = _Schedule(delay_s)
        for k, piece in enumerate([*pieces, ""]):
            await due.step(k)  # the first piece at once
            finish = json.dumps(finish_reason) if k == len(pieces) else "null"
            await resp.write(f"{opening}{json.dumps(piece)}{middle}{finish}}}]}}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
    except ConnectionResetError:
        pass
    return resp


# --- other routes -----------------------------------------------------------------------


def _embedding(text: str) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    return [value / 2**31 - 1.0 for value in struct.unpack(">8I", digest)]


def _encoded(vector: list[float], encoding: str) -> list[float] | str:
    """``base64``, as OpenAI sends it (the SDKs ask for it by default): the vector's
    little-endian float32 values."""
    if encoding == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


async def _embeddings(request: web.Request) -> web.Response:
    payload = _payload(request)
    raw = payload.get("input")
    texts = [raw] if isinstance(raw, str) else raw
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise _BadRequest("'input' must be a string or a non-empty array of strings.", "input")
    encoding = payload.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise _BadRequest("'encoding_format' must be 'float' or 'base64'.", "encoding_format")
    words = sum(len(t.split()) for t in texts)
    data = [
        {"object": "embedding", "index": i, "embedding": _encoded(_embedding(t), encoding)}
        for i, t in enumerate(texts)
    ]
    return _json_response(
        {
            "object": "list",
            "data": data,
            "model": _model(payload),
            "usage": {"prompt_tokens": words, "total_tokens": words},
        }
    )


async def _completions(request: web.Request) -> web.StreamResponse:
    payload = _payload(request)
    prompt = payload.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise _BadRequest("'prompt' must be a string or an array of strings.", "prompt")
    count, finish_reason = _budget(request, payload)
    pieces = _pieces(["Echo", *prompt.split()], count)
    completion_id = "cmpl-mock-" + hashlib.sha256(request[_RECORD].body).hexdigest()[:8]
    if payload.get("stream") is True:
        return await _stream_completion(request, completion_id, payload, pieces, finish_reason)
    text = "".join(pieces)
    prompt_tokens = len(prompt.split())
    choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}
    return _json_response(
        {
            "id": completion_id,
            "object": "text_completion",
            "created": CREATED,
            "model": _model(payload),
            "choices": [choice],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": count,
                "total_tokens": prompt_tokens + count,
            },
        }
    )


_MODELS_BODY = _dumps(
    {
        "object": "list",
        "data": [{"id": MOCK_MODEL, "object": "model", "created": CREATED, "owned_by": "chatmem"}],
    }
).encode()


async def _models(request: web.Request) -> web.Response:
    return web.Response(body=_MODELS_BODY, content_type="application/json")


async def _model_object(request: web.Request) -> web.Response:
    """Any model name is served (the reply names the one asked for), so any exists."""
    model = request.match_info["model"]
    return _json_response(
        {"id": model, "object": "model", "created": CREATED, "owned_by": "chatmem"}
    )


# --- app --------------------------------------------------------------------------------


def create_mock_app(*, tokens: int = 16, delay_ms: float = 0.0) -> web.Application:
    """The mock server: ``tokens`` content tokens per reply, ``delay_ms`` between tokens."""
    if tokens < 0 or delay_ms < 0:
        raise ValueError("tokens and delay_ms must be >= 0")
    app = web.Application(middlewares=[_record_middleware], client_max_size=_MAX_BODY)
    app[_SETTINGS] = _Settings(tokens=tokens, delay_ms=delay_ms)
    app[RECEIVED] = collections.deque(maxlen=HISTORY_SIZE)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/v1/models/{model}", _model_object)
    app.router.add_post("/v1/chat/completions", _chat_completions)
    app.router.add_post("/v1/embeddings", _embeddings)
    app.router.add_post("/v1/completions", _completions)
    app.router.add_get("/_mock/requests", _list_requests)
    app.router.add_delete("/_mock/requests", _clear_requests)
    return app


async def run_mock_upstream(
    host: str,
    port: int,
    *,
    tokens: int,
    delay_ms: float,
    on_ready: Callable[[int], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve the mock on ``host:port`` until cancelled or ``stop`` is set; ``on_ready``
    with the port it listens on (the one the system chose for port 0)."""
    # A second to finish at a stop, not aiohttp's 60: a plain answer is made whole before
    # it is written, and one whose client went (the workers of `serve --demo --workers`,
    # stopped) kept the process up until it was done (item 143).
    runner = web.AppRunner(
        create_mock_app(tokens=tokens, delay_ms=delay_ms), access_log=None, shutdown_timeout=1.0
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, backlog=1024).start()
        if on_ready is not None:
            on_ready(runner.addresses[0][1])
        # As the gateway does (cli._serve): what exists now lives as long as the process,
        # and a full collection that walked it paused every stream for up to 60 ms.
        gc.freeze()
        await (stop or asyncio.Event()).wait()
    finally:
        await runner.cleanup()
