"""Everything else under /v1/: relayed to the upstream origin, streamed both ways."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

import aiohttp
from aiohttp import web

from ..auth import authenticate
from ..errors import NotRelayed, PayloadTooLarge, UpstreamError
from ..state import gateway_of
from ..tracking import ROUTE_PREFIX
from .http import already_read, check_content_encoding, undecodable_body
from .upstream import Answer, response_headers

__all__ = ["passthrough", "relay"]

_DECODED = ("content-encoding",)
"""Dropped from a request whose body aiohttp's server decoded."""


async def passthrough(request: web.Request) -> web.StreamResponse:
    from .chat import chat_completions, upstream_failures  # they share the failure mapping

    if request.method == "POST" and _names_chat(request):
        return await chat_completions(request)
    gateway = gateway_of(request)
    authenticate(request)
    upstream = gateway.upstream
    limit = gateway.config.server.max_body_bytes
    length = request.content_length
    if length is not None and length > limit:
        raise PayloadTooLarge(f"request body is larger than {limit} bytes")
    _refuse_what_cannot_be_relayed(request)
    check_content_encoding(request)
    path = _upstream_path(request)
    await _refuse_host_paths(request)
    url = upstream.url_for(path, request.rel_url.raw_query_string)
    # aiohttp's server decodes a compressed body: it goes up decoded, chunked (its length
    # is not the one the client sent).
    decoded = "Content-Encoding" in request.headers
    headers = upstream.request_headers(request.headers, drop=_DECODED if decoded else ())
    if length is not None and not decoded:
        headers["Content-Length"] = str(length)
    body = _LimitedBody(request.content, limit)
    data: AsyncIterator[bytes] | bytes | None = None
    if request.body_exists and request.content.at_eof():
        data = await already_read(request)  # by a host app's middleware, say
        if len(data) > limit:
            raise PayloadTooLarge(f"request body is larger than {limit} bytes")
    elif request.body_exists:
        data = body.stream()
    timer = gateway.metrics.upstream_timer("passthrough")
    try:
        with upstream_failures():
            async with upstream.session.request(
                request.method,
                url,
                data=data,
                headers=headers,
                timeout=upstream.timeout,
                allow_redirects=False,
            ) as response:
                timer.answered()
                return await relay(request, response)
    except UpstreamError:
        # The client library reports a failed upload as a broken upstream.
        if body.exceeded:
            raise PayloadTooLarge(f"request body is larger than {limit} bytes") from None
        if body.undecodable:
            raise undecodable_body(request) from None
        raise


_RELAYED_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")
"""What ``Allow`` names when TRACE is refused: the methods an HTTP API is asked with."""


def _refuse_what_cannot_be_relayed(request: web.Request) -> None:
    """TRACE: the upstream's echo of it would hold the key the gateway adds.  A protocol
    upgrade (WebSocket, such as a Realtime API): its headers are hop-by-hop, so the
    upstream would get a plain GET and the client its answer, as if it were the
    upgrade's; said plainly instead."""
    if request.method in ("TRACE", "CONNECT"):
        raise web.HTTPMethodNotAllowed(request.method, _RELAYED_METHODS)
    connection = ",".join(request.headers.getall("Connection", ())).lower()
    if "Upgrade" in request.headers and "upgrade" in connection:
        raise NotRelayed(
            "protocol upgrades (WebSocket) are not relayed to the upstream: only HTTP requests are",
            code="upgrade_not_relayed",
        )


def _upstream_path(request: web.Request) -> str:
    """The request's path after chatmem's ``/v1``, as the client wrote it (escapes kept).

    In a sub-app mounted at ``/ai/`` the route is ``/ai/v1/{tail}``: the mount prefix is
    not the upstream's.
    """
    raw = request.rel_url.raw_path
    mount = _mount(request)
    if not raw.startswith(mount + "/v1/"):  # the prefix written with escapes
        raise web.HTTPNotFound()
    return raw[len(mount) + len("/v1") :]


def _names_chat(request: web.Request) -> bool:
    """``/v1//chat/completions``, ``/v1/chat//completions/``: the chat route with a slash
    doubled (a base URL ending in ``/v1/`` joined to ``/chat/completions``).  Relayed, such
    a turn would have had no memory, and its ``conversation`` field would have gone up."""
    path = request.rel_url.raw_path
    start = len(_mount(request)) + len("/v1/")
    return "chat" in path and [part for part in path[start:].split("/") if part] == _CHAT


_CHAT = ["chat", "completions"]


def _mount(request: web.Request) -> str:
    resource = request.match_info.route.resource
    canonical = resource.canonical if resource is not None else _PASSTHROUGH
    return canonical.removesuffix(_PASSTHROUGH)


_PASSTHROUGH = "/v1/{tail}"


async def _refuse_host_paths(request: web.Request) -> None:
    """A host app's own route under ``/v1/`` asked with another method: aiohttp's router
    went on to chatmem's catch-all, but the path is the host's, not the upstream's (405,
    as without chatmem)."""
    gateway = gateway_of(request)
    host = gateway.host_paths
    if host is None:
        under = _mount(request) + "/v1/"
        host = gateway.host_paths = tuple(
            resource
            for resource in request.app.router.resources()
            if not (resource.name or "").startswith(ROUTE_PREFIX)
            and resource.canonical.startswith(under)
        )
    for resource in host:
        match, allowed = await resource.resolve(request)
        if match is None and allowed:
            raise web.HTTPMethodNotAllowed(request.method, sorted(allowed))


class _LimitedBody:
    """The client's body streamed upstream, cut off past ``limit`` bytes."""

    def __init__(self, content: aiohttp.StreamReader, limit: int) -> None:
        self.content = content
        self.limit = limit
        self.exceeded = False
        self.undecodable = False
        """The body's ``Content-Encoding`` could not be decoded."""

    async def stream(self) -> AsyncIterator[bytes]:
        size = 0
        try:
            async for chunk in self.content.iter_any():
                size += len(chunk)
                if size > self.limit:
                    self.exceeded = True
                    raise PayloadTooLarge(f"request body is larger than {self.limit} bytes")
                yield chunk
        except web.RequestPayloadError:
            self.undecodable = True
            raise


async def relay(
    request: web.Request,
    upstream: Answer,
    extra_headers: Mapping[str, str] | None = None,
) -> web.StreamResponse:
    """Copy ``upstream``'s status, end-to-end headers and raw body to the client."""
    headers = response_headers(upstream.headers)
    if extra_headers:
        headers.update(extra_headers)
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
    await response.prepare(request)
    try:
        async for chunk in upstream.content.iter_any():
            try:
                await response.write(chunk)
            except ConnectionError:  # the client left (also while a write waited to drain)
                upstream.close()
                return response
    except (TimeoutError, aiohttp.ClientPayloadError, aiohttp.ClientConnectionError):
        # The body is incomplete: cut the client's connection so it cannot take the
        # truncated body for a whole one.
        if request.transport is not None:
            request.transport.abort()
        return response
    await response.write_eof()
    return response
