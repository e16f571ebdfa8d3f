"""Small HTTP helpers shared by the handlers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import HttpVersion11, hdrs, web
from aiohttp.typedefs import Handler

from .. import jsonio
from ..errors import (
    ChatmemError,
    InvalidRequest,
    PayloadTooLarge,
    RequestTimeout,
    error_body,
    error_response,
)
from ..state import GATEWAY
from .redact import masked

__all__ = [
    "AsItCame",
    "ChatmemRoutes",
    "HostMethodNotAllowed",
    "already_read",
    "check_content_encoding",
    "error_event",
    "http_error_as_json",
    "json_object",
    "json_response",
    "method_not_allowed",
    "read_body",
    "undecodable_body",
    "upstream_says",
]


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole request body, refusing (413) anything over ``limit`` bytes early, (408) a
    body that has not fully arrived ``server.idle_timeout`` seconds after the request
    head: a client trickling its body must not hold the handler forever, and (400) one
    that cannot be decoded (``Content-Encoding: gzip`` over bytes that are not gzip)."""
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit)
    check_content_encoding(request)
    try:
        return await _read_body(request, limit)
    except web.RequestPayloadError:
        raise undecodable_body(request) from None


_QUOTED = 1000
"""Characters of an upstream's error message quoted in the gateway's."""


def upstream_says(value: object, secret: bytes | None) -> str | None:
    """An upstream's error as the gateway quotes it, from the shapes servers send: a
    string, or an object with a string ``message`` (OpenAI's ``error``, vLLM's
    ``{"object": "error", ...}``, llama.cpp's ``error:`` field); None when it says
    nothing.  ``secret`` is masked in it before it is cut to its first 1,000 characters
    (cut first, half a key would show)."""
    if isinstance(value, dict):
        value = value.get("message")
    if not isinstance(value, str) or not value.strip():
        return None
    return masked(value, secret)[:_QUOTED]


UNSUPPORTED_ENCODING = (
    "the request body's Content-Encoding is not supported (gzip, deflate, br and zstd are)"
)

_DECODED = frozenset({"gzip", "deflate", "br", "zstd"})
"""What aiohttp's server decodes (brotli and zstd with their modules, which chatmem
depends on)."""


def check_content_encoding(request: web.Request) -> None:
    """400 for a body aiohttp's server left encoded.

    It decodes a body whose one ``Content-Encoding`` is exactly a coding it knows, and
    passes any other (``x-gzip``, ``compress``, ``gzip, br``, two headers) on as it
    came: read as JSON it would be "not valid JSON", and relayed, it would reach the
    upstream encoded but without the header that says so."""
    if hdrs.CONTENT_ENCODING not in request.headers or not request.body_exists:
        return
    codings = request.headers.getall(hdrs.CONTENT_ENCODING)
    if len(codings) == 1 and codings[0].lower() in _DECODED | {"identity"}:
        return
    request.content.feed_eof()  # nothing more is read of a body that cannot be
    error = InvalidRequest(UNSUPPORTED_ENCODING, code="unsupported_content_encoding")
    error.headers = {"Connection": "close"}
    raise error


def undecodable_body(request: web.Request) -> InvalidRequest:
    """The 400 for a body aiohttp could not decode (``Content-Encoding``), which also ends
    the connection: after such a body aiohttp cannot tell where the next request starts.
    Left to itself, aiohttp would first read on in the body, meet the error again and log
    it with a traceback (a line any client could add)."""
    request.content.feed_eof()
    request.protocol.close()
    error = InvalidRequest("request body could not be decoded (see its Content-Encoding)")
    error.headers = {"Connection": "close"}
    return error


async def _read_body(request: web.Request, limit: int) -> bytes:
    content = request.content
    if content.is_eof():  # all of it has arrived (a small body usually has): no timer
        body = content.read_nowait()
        if not body and request.body_exists:
            body = await already_read(request)
        if len(body) > limit:
            raise _too_large(limit)
        return body
    gateway = request.config_dict.get(GATEWAY)
    deadline = gateway.config.server.idle_timeout if gateway is not None else None
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(deadline):
            while chunk := await request.content.read(65536):
                size += len(chunk)
                if size > limit:
                    raise _too_large(limit)
                chunks.append(chunk)
    except TimeoutError:
        # Not read past, nor waited for any longer: aiohttp would go on reading the rest
        # of the body for up to 10 s after the 408 ("lingering"), the client trickling.
        request.content.feed_eof()
        raise RequestTimeout(
            f"the request body did not arrive within {deadline:g} seconds"
        ) from None
    return b"".join(chunks)


async def already_read(request: web.Request) -> bytes:
    """The body a host app's middleware read before chatmem's handler (``await
    request.read()`` is usual in aiohttp, and keeps the body for the handler), or b"".

    ``request.post()`` of a multipart body reads it without keeping a copy: that is a
    500 that says so, where the upstream got the client's headers and an empty body."""
    body = await request.read()  # aiohttp's copy; its stream is at its end by now
    if not body and request.content.total_bytes:
        raise BodyNotKept(
            "the request body was read before chatmem's handler and not kept (a host"
            " app's request.post() of a multipart body); nothing was sent upstream"
        )
    return body


class BodyNotKept(ChatmemError):
    """A host app read the body and kept no copy: the host's mistake, not the client's."""

    status = 500
    type = "server_error"
    code = "internal_error"


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"request body is larger than {limit} bytes")


MAX_DEPTH = 254
"""Levels of arrays and objects a request body may nest: what orjson writes.  orjson
reads 1,024, but what is read is also written (upstream, to the store), and past about
970 levels even the standard library's writer failed with a RecursionError: a 500, after
the model had answered.  No request of an OpenAI-compatible API comes near it."""


def json_object(raw: bytes) -> dict[str, Any]:
    """A request body that must be a JSON object; 400 otherwise."""
    try:
        body = jsonio.loads(raw)
    except jsonio.LoneSurrogate as exc:
        raise InvalidRequest(f"request body is not valid text: {exc}") from None
    except (ValueError, RecursionError):  # nested too deep
        raise InvalidRequest("request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    # Brackets counted first: a body with fewer cannot nest deeper (most bodies).
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and _too_deep(body):
        raise InvalidRequest(f"request body nests arrays and objects over {MAX_DEPTH} deep")
    return body


def _too_deep(body: dict[str, Any]) -> bool:
    try:
        orjson.dumps(body)  # 9 us for 20 tools, where walking the body took 240
    except orjson.JSONEncodeError:  # too deep, or an integer beyond 64 bits
        return _nests_deeper(body, MAX_DEPTH)
    return False


def _nests_deeper(value: object, limit: int) -> bool:
    """Whether ``value`` holds arrays and objects more than ``limit`` levels deep."""
    stack: list[tuple[dict[str, Any] | list[Any], int]] = []
    if isinstance(value, dict | list):
        stack.append((value, 1))
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def json_response(
    payload: Any, *, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status,
        body=jsonio.utf8(json.dumps(payload, ensure_ascii=False)),
        content_type="application/json",
        headers=headers,
    )


def error_event(message: str, type_: str = "upstream_error", code: str | None = None) -> bytes:
    """The SSE event that ends a stream which failed after the response had started."""
    payload = json.dumps(error_body(message, type_, code=code))
    return b"data: " + payload.encode() + b"\n\n"


async def method_not_allowed(request: web.Request) -> web.Response:
    """For the other methods on the gateway's own paths: they must not fall through to
    the ``/v1/`` passthrough (405, in the OpenAI shape like every aiohttp error), with
    the methods the path does take in ``Allow`` (the routes of its other resources)."""
    this = request.match_info.route.resource
    path = this.canonical if this is not None else request.path
    allowed = {
        route.method
        for resource in request.app.router.resources()
        if resource.canonical == path
        for route in resource
        if route.method != "*"  # this resource's own route, the one that got here
    }
    raise web.HTTPMethodNotAllowed(request.method, sorted(allowed))


def http_error_as_json(exc: web.HTTPException) -> web.Response:
    """aiohttp's error ``exc`` (404, 405, 413, ...) in the OpenAI error shape, with its
    ``Allow`` header."""
    kind = "invalid_request_error" if exc.status < 500 else "server_error"
    body = error_body(exc.reason, kind, code=exc.reason.lower().replace(" ", "_"))
    kept = {k: v for k, v in exc.headers.items() if k.lower() not in _REPLACED}
    return json_response(body, status=exc.status, headers=kept)


_REPLACED = frozenset({"content-type", "content-length"})
"""Headers of aiohttp's plain-text error that the JSON answer sets itself."""


ExpectHandler = Callable[[web.Request], Awaitable[web.StreamResponse | None]]
EarlyHeaders = Callable[[web.Request], dict[str, str]]
"""A route's headers for an answer given before its handler runs (``X-Conversation-Id``)."""


def expect_handler(limit: int, early_headers: EarlyHeaders | None = None) -> ExpectHandler:
    """The answer to ``Expect`` on chatmem's routes.

    aiohttp's default sends ``100 Continue`` whatever the declared length, so a client
    uploads a body that is then refused with a 413, and it refuses any other expectation
    with a plain-text 417 before any middleware can give it the OpenAI shape.  A refusal
    here carries the route's ``early_headers``, as its handler's answers do.
    """

    async def expect(request: web.Request) -> web.StreamResponse | None:
        if request.version != HttpVersion11:
            return None  # HTTP/1.0 has no 100 Continue: the client sends its body anyway
        headers = early_headers(request) if early_headers is not None else {}
        if request.headers.get(hdrs.EXPECT, "").lower() != "100-continue":
            return http_error_as_json(web.HTTPExpectationFailed(headers=headers))
        if request.content_length is not None and request.content_length > limit:
            # The body was not sent, so nothing is read past (aiohttp would wait up to
            # 10 s for it) and the connection ends with the answer.
            request.content.feed_eof()
            error = _too_large(limit)
            error.headers = {"Connection": "close"}
            return error_response(error, headers)
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # as aiohttp does: the 100 is not the response
        return None

    return expect


class ChatmemRoutes:
    """``app.router`` for chatmem's own routes: each gets :func:`expect_handler`."""

    def __init__(self, router: web.UrlDispatcher, max_body_bytes: int) -> None:
        self.router = router
        self._limit = max_body_bytes
        self._expect = expect_handler(max_body_bytes)

    def add_route(
        self,
        method: str,
        path: str,
        handler: Handler,
        *,
        early_headers: EarlyHeaders | None = None,
        **kwargs: Any,
    ) -> web.AbstractRoute:
        expect = self._expect
        if early_headers is not None:
            expect = expect_handler(self._limit, early_headers)
        return self.router.add_route(method, path, handler, expect_handler=expect, **kwargs)

    def add_get(self, path: str, handler: Handler, **kwargs: Any) -> web.AbstractRoute:
        return self.router.add_get(path, handler, expect_handler=self._expect, **kwargs)

    def add_post(self, path: str, handler: Handler, **kwargs: Any) -> web.AbstractRoute:
        return self.add_route(hdrs.METH_POST, path, handler, **kwargs)

    def add_delete(self, path: str, handler: Handler, **kwargs: Any) -> web.AbstractRoute:
        return self.add_route(hdrs.METH_DELETE, path, handler, **kwargs)


class AsItCame(web.StreamResponse):
    """aiohttp's ``StreamResponse`` without the ``Content-Type:
    application/octet-stream`` it gives a body that has none: a relayed answer's headers
    are the upstream's (a client may sniff an untyped body, or take its absence to mean
    something)."""

    async def _prepare_headers(self) -> None:
        typed = "Content-Type" in self.headers
        await super()._prepare_headers()
        if not typed:
            self.headers.popall("Content-Type", None)


class HostMethodNotAllowed(web.HTTPMethodNotAllowed):
    """The 405 of a host app's route under ``/v1/`` asked with another method (the
    passthrough finds it): answered and counted as the host's, in aiohttp's own shape, as
    it is without chatmem, not as an OpenAI error of the passthrough's."""
