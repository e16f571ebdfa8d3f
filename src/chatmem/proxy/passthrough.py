"""Everything else under /v1/: relayed to the upstream origin, streamed both ways."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from urllib.parse import unquote

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from .. import jsonio
from ..auth import authenticate
from ..errors import (
    InvalidRequest,
    NotAllowed,
    NotFound,
    NotRelayed,
    PayloadTooLarge,
    RequestTimeout,
    UpstreamError,
    UpstreamTimeout,
    error_body,
)
from ..logs import CLIENT_LEFT, UPGRADED
from ..state import GATEWAY, gateway_of
from ..tracking import COUNTED_AS, ROUTE_PREFIX
from .http import (
    AsItCame,
    HostMethodNotAllowed,
    already_read,
    check_content_encoding,
    read_body,
    undecodable_body,
)
from .inflate import INFLATABLE, SNIFF, Inflater, NotInItsCoding
from .pool import UpstreamResponse, head_refused, writable
from .redact import Redactor, mask_bytes, masked
from .upstream import Answer, Upstream, content_encoding, response_headers, shown_coding

__all__ = [
    "host_methods",
    "keep_offered_subprotocols_out_of_logs",
    "passthrough",
    "passthrough_early_headers",
    "relay",
]

_DECODED = ("content-encoding",)
"""Dropped from a request whose body aiohttp's server decoded."""


async def passthrough(request: web.Request) -> web.StreamResponse:
    from .chat import chat_completions, upstream_failures  # they share the failure mapping

    if request.method == "POST" and _names_chat(request):
        request[COUNTED_AS] = "chat"
        return await chat_completions(request)
    if _names_own_path(request):
        raise NotFound(
            f"{request.rel_url.raw_path} is not a path of the gateway's: its own are written"
            " without a doubled or trailing slash, in lower case, and are never relayed"
        )
    # The host's before the token: its path answers as it does without chatmem (item 138).
    await _refuse_host_paths(request)
    gateway = gateway_of(request)
    authenticate(request)
    upstream = gateway.upstream
    limit = gateway.config.server.max_body_bytes
    length = request.content_length
    if length is not None and length > limit:
        raise PayloadTooLarge(f"request body is larger than {limit} bytes")
    upgrade = _upgrade(request)
    _refuse_what_cannot_be_relayed(request, upgrade)
    check_content_encoding(request)
    path = _upstream_path(request)
    allowed = upstream.config.passthrough
    if not relayed(path, allowed):
        raise NotAllowed(f"the gateway does not relay /v1{path} (see upstream.passthrough)")
    url = upstream.url_for(path, request.rel_url.raw_query_string)
    if upgrade is not None:  # a WebSocket's: any other was refused above
        return await relay_websocket(request, upstream, url)
    # aiohttp's server decodes a compressed body: it goes up decoded, chunked (its length
    # is not the one the client sent).
    decoded = "Content-Encoding" in request.headers
    drop = _DECODED if decoded else ()
    if "/" not in allowed:  # headers some frameworks take for another method or path
        drop = (*drop, *_REROUTING)
    headers = upstream.request_headers(request.headers, drop=drop)
    if upstream.secret is not None:
        # The key is looked for in the answer, which it cannot be in compressed bytes.
        headers["Accept-Encoding"] = "identity"
    if _in_memory(request, length, decoded):
        return await _relay_in_memory(request, upstream, url, headers, limit, length)
    if length is not None and not decoded:
        headers["Content-Length"] = str(length)
    body = _LimitedBody(request.content, limit, gateway.config.server.idle_timeout)
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
                headers=_one_spelling(headers),
                timeout=upstream.timeout,
                allow_redirects=False,
            ) as response:
                timer.answered()
                if not writable(response.reason or "") or not all(
                    writable(value) for value in response.headers.values()
                ):
                    raise UpstreamError(head_refused(None))  # as the pool refuses it
                return await relay(request, response, secret=upstream.secret)
    except UpstreamError:
        # The client library reports a failed upload as a broken upstream.
        if body.exceeded:
            raise PayloadTooLarge(f"request body is larger than {limit} bytes") from None
        if body.undecodable:
            raise undecodable_body(request) from None
        if body.timed_out:
            raise RequestTimeout(
                f"the request body did not arrive within {body.idle:g} seconds of its last piece"
            ) from None
        raise


def _one_spelling(headers: CIMultiDict[str]) -> CIMultiDict[str]:
    """``headers`` with each name written as it first came: aiohttp's client keeps only
    the last of a header repeated in other letter cases (``X-R: 1``, ``x-r: 2``)."""
    spelled: dict[str, str] = {}
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        out.add(spelled.setdefault(name.lower(), name), value)
    return out


_IN_MEMORY_BODY = 64 * 1024
"""The largest body relayed by :func:`_relay_in_memory`: a request of an API (a list of
models, embeddings, a completion) has one of a few KiB or none; uploads stream."""
_IN_MEMORY_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_SAY_NO_LENGTH = frozenset({"GET", "OPTIONS"})
"""Methods sent without ``Content-Length`` when they have no body and the client gave
none (aiohttp's client sends ``0`` for the others)."""
_REPEATABLE = frozenset({"GET", "PUT", "DELETE", "OPTIONS"})
"""Idempotent methods (RFC 9110, 9.2.2): sent again on a new connection when a kept-alive
one closed before a byte of answer."""


def _in_memory(request: web.Request, length: int | None, decoded: bool) -> bool:
    """Whether the request goes by the lean client (:mod:`.pool`), its body read whole
    first: no body or a small one that says its length, not decoded by aiohttp's server
    (sent on as it decoded, its length is not known in advance), and a method whose
    answer is framed like any other (not ``HEAD``)."""
    if request.method not in _IN_MEMORY_METHODS or decoded:
        return False
    if not request.body_exists:
        return True
    return length is not None and length <= _IN_MEMORY_BODY


async def _relay_in_memory(
    request: web.Request,
    upstream: Upstream,
    url: URL,
    headers: CIMultiDict[str],
    limit: int,
    length: int | None,
) -> web.StreamResponse:
    """The request relayed by the pool of :mod:`.pool` (0.08 ms of the gateway's CPU a
    request at 32 clients against 0.13 by aiohttp's client); its answer streams back as
    the client's does.  The body is read whole first, within ``server.idle_timeout`` (a
    408 otherwise: the upstream never gets a request cut short).

    A kept-alive connection is used for 4 s at most (``_PASSTHROUGH_IDLE``) and a request
    the upstream may have read before it closed one is sent again only when repeating it
    is harmless: a ``POST`` is not (aiohttp's client does the same)."""
    from .chat import upstream_failures

    method = request.method
    body: bytes | None = None  # no Content-Length: a GET's or an OPTIONS' that gave none
    if request.body_exists:
        body = await read_body(request, limit)
    elif length is not None or method not in _SAY_NO_LENGTH:
        body = b""  # Content-Length: 0, as the client said or aiohttp's client would
    timer = gateway_of(request).metrics.upstream_timer("passthrough")
    with upstream_failures():
        response = await upstream.relay_pool.request(
            method, url.raw_path_qs, headers, body, again=method in _REPEATABLE
        )
        async with response:
            timer.answered()
            return await relay(request, response, secret=upstream.secret)


_RELAYED_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")
"""What ``Allow`` names when TRACE is refused: the methods an HTTP API is asked with."""


def _upgrade(request: web.Request) -> str | None:
    """The protocol the request asks to upgrade to, if it asks (the token may be in any
    ``Connection`` header)."""
    connection = ",".join(request.headers.getall("Connection", ())).lower()
    if "upgrade" not in connection:
        return None
    return request.headers.get("Upgrade")


def _refuse_what_cannot_be_relayed(request: web.Request, upgrade: str | None) -> None:
    """TRACE: the upstream's echo of it would hold the key the gateway adds.  A protocol
    upgrade other than a WebSocket's (``h2c``): its headers are hop-by-hop, so the
    upstream would get a plain request and the client its answer, as if it were the
    upgrade's; said plainly instead."""
    if request.method in ("TRACE", "CONNECT"):
        raise web.HTTPMethodNotAllowed(request.method, _RELAYED_METHODS)
    websocket = request.method == "GET" and (upgrade or "").lower() == "websocket"
    if upgrade is not None and not websocket:
        raise NotRelayed(
            "protocol upgrades other than a WebSocket's are not relayed to the upstream",
            code="upgrade_not_relayed",
        )


_WEBSOCKET_HANDSHAKE = (
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-extensions",
    "sec-websocket-protocol",
)
"""The client's handshake with the gateway; the gateway makes its own with the upstream."""


async def relay_websocket(request: web.Request, upstream: Upstream, url: URL) -> web.StreamResponse:
    """A WebSocket (a Realtime API, say): one to the upstream, with the upstream key and
    the client's subprotocols, then every message relayed as it comes, both ways, until
    either side closes (its close code and reason go to the other).  A client handshake
    that is not valid is a 400 before the upstream is asked; an upstream that refuses the
    handshake is a 502 naming its status, one that does not answer in time a 504."""
    gateway = gateway_of(request)
    limit = gateway.config.server.max_body_bytes
    with _quiet_handshake():
        valid = web.WebSocketResponse().can_prepare(request).ok
    if not valid:  # refused before the upstream's socket is made
        raise InvalidRequest("not a valid WebSocket handshake")
    offered = request.headers.get("Sec-WebSocket-Protocol", "")
    protocols = [p.strip() for p in offered.split(",") if p.strip()]
    headers = upstream.request_headers(request.headers, drop=_WEBSOCKET_HANDSHAKE)
    config = gateway.config.upstream
    try:
        # The handshake is a request like any other: the same time to connect and answer.
        async with asyncio.timeout(config.connect_timeout + config.read_timeout):
            theirs = await upstream.session.ws_connect(
                url,
                headers=_one_spelling(headers),
                protocols=protocols,
                autoping=False,  # pings and pongs are relayed like any other frame
                max_msg_size=limit + 1,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=10.0),
            )
    except TimeoutError:
        raise UpstreamTimeout(
            "the upstream did not answer the WebSocket handshake in time"
        ) from None
    except aiohttp.WSServerHandshakeError as exc:
        raise UpstreamError(
            f"the upstream refused the WebSocket handshake ({exc.status})"
        ) from None
    except (aiohttp.ClientError, OSError) as exc:
        raise UpstreamError(f"the upstream is unreachable ({type(exc).__name__})") from None
    async with theirs:
        ours = web.WebSocketResponse(
            protocols=[theirs.protocol] if theirs.protocol else (),  # the upstream's choice
            autoping=False,
            max_msg_size=limit + 1,  # as for bodies: max_body_bytes is allowed, not more
        )
        with _quiet_handshake():
            await ours.prepare(request)
        request[UPGRADED] = True
        stop: asyncio.Future[tuple[int, str]] = asyncio.get_running_loop().create_future()
        gateway.websockets.add(stop)  # the gateway stopping ends it (see close_websockets)
        pumps = [
            asyncio.ensure_future(_pump(ours, theirs)),
            asyncio.ensure_future(_pump(theirs, ours, upstream.secret)),
        ]
        try:
            # The first side to close ends both: the other gets its close code.
            await asyncio.wait([*pumps, stop], return_when=asyncio.FIRST_COMPLETED)
        finally:
            # Also when the handler is cancelled, as it is once the client's connection
            # is gone: often right after the client's close, which must still get through.
            gateway.websockets.discard(stop)
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            ended = [p.result() for p in pumps if not p.cancelled() and p.exception() is None]
            if stop.done():
                ended.insert(0, stop.result())
            code, reason = ended[0] if ended else (aiohttp.WSCloseCode.GOING_AWAY, "")
            await theirs.close(code=code, message=reason.encode())
            await ours.close(code=code, message=reason.encode())
    return ours


_HANDSHAKING: ContextVar[bool] = ContextVar("chatmem_websocket_handshake", default=False)


@contextmanager
def _quiet_handshake() -> Iterator[None]:
    token = _HANDSHAKING.set(True)
    try:
        yield
    finally:
        _HANDSHAKING.reset(token)


class _OfferedSubprotocols(logging.Filter):
    """aiohttp logs the subprotocols a client offered when the server takes none of them
    (a warning on every relayed handshake, since the upstream chooses): offered values
    are the client's, and OpenAI's browser Realtime clients offer their API key as one."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not _HANDSHAKING.get()


def keep_offered_subprotocols_out_of_logs() -> None:
    """Drop aiohttp's warning for the relay's own handshakes (the host's are untouched)."""
    logger = logging.getLogger("aiohttp.websocket")
    if not any(isinstance(f, _OfferedSubprotocols) for f in logger.filters):
        logger.addFilter(_OfferedSubprotocols())


async def close_websockets(app: web.Application) -> None:
    """``on_shutdown``: end the relayed WebSockets with 1001 (going away) at once.  The
    server stops reading from its clients when it stops, so a socket kept through the
    grace would carry the upstream's messages but lose the client's."""
    for stop in app[GATEWAY].websockets:
        if not stop.done():
            stop.set_result((aiohttp.WSCloseCode.GOING_AWAY, "the gateway is stopping"))


_Socket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse

_NOT_SENT = frozenset({1005, 1006, 1015})
"""Close codes that say what happened to a connection and are never sent in a frame."""


_CONTROL = 125
"""The most bytes a control frame's payload holds (a close frame's: its code's two and its
reason's).  A key masked in one can grow it (``[upstream key]`` is 14 bytes): it is cut
to fit, where the frame was refused by the other side (item 152)."""


async def _pump(source: _Socket, sink: _Socket, secret: bytes | None = None) -> tuple[int, str]:
    """Every message of ``source`` to ``sink``, as it comes, with ``secret`` masked in it,
    until ``source`` closes; the close to give the other side: ``source``'s own code and
    reason, 1009 for a message over the limit, 1000 for a close without a code; for a
    connection that went without a close frame, 1001 (going away) if it was the client's,
    1014 (bad gateway, WebSocket's 502) if it was the upstream's."""
    while True:
        message = await source.receive()
        kind = message.type
        if kind is aiohttp.WSMsgType.TEXT:
            await sink.send_str(masked(message.data, secret))
        elif kind is aiohttp.WSMsgType.BINARY:
            await sink.send_bytes(mask_bytes(message.data, secret))
        elif kind is aiohttp.WSMsgType.PING:
            await sink.ping(mask_bytes(message.data, secret)[:_CONTROL])
        elif kind is aiohttp.WSMsgType.PONG:
            await sink.pong(mask_bytes(message.data, secret)[:_CONTROL])
        elif kind is aiohttp.WSMsgType.CLOSE:
            code = message.data
            if not isinstance(code, int) or code < 1000 or code in _NOT_SENT:
                code = aiohttp.WSCloseCode.OK  # a close frame without a code
            reason = masked(message.extra or "", secret).encode()[: _CONTROL - 2]
            return code, reason.decode("utf-8", "ignore")  # not a character cut in two
        else:  # CLOSING, CLOSED, ERROR: this side is done
            # aiohttp's client hands its error over in the message, its server keeps it.
            error = message.data if kind is aiohttp.WSMsgType.ERROR else None
            error = error if isinstance(error, BaseException) else source.exception()
            if isinstance(error, aiohttp.WebSocketError):
                return error.code, ""  # 1009 for a message over the limit
            if isinstance(source, aiohttp.ClientWebSocketResponse):
                return aiohttp.WSCloseCode.BAD_GATEWAY, ""
            return aiohttp.WSCloseCode.GOING_AWAY, ""


def passthrough_early_headers(request: web.Request) -> dict[str, str]:
    """An ``Expect`` refused on a spelling of the chat route's path that the passthrough
    hands it (``/v1/chat/completions/``) names a conversation, as the route's own does."""
    from .chat import early_headers

    if request.method != "POST" or not _names_chat(request):
        return {}
    request[COUNTED_AS] = "chat"
    return early_headers(request)


def _masked_reason(reason: str | None, secret: bytes | None) -> str | None:
    """The upstream's status line's reason phrase, ``secret`` masked (it is free text)."""
    return None if reason is None else masked(reason, secret)


_ERROR_BODY_LIMIT = 1024 * 1024
"""The largest compressed error body decoded to look for the upstream key, and the
largest decoded one: error bodies are a few hundred bytes."""


async def _inflating(
    body: AsyncIterator[bytes], encoding: str
) -> tuple[AsyncIterator[bytes], bool]:
    """``body``, labelled ``encoding``, decoded as it comes if its first bytes are in that
    coding, and whether they are; else as it came.  A body that turns out not to be
    whole, or not in the coding after all, ends in ``ClientPayloadError``, as a body cut
    short does."""
    first = await _first_bytes(body)
    inflater = Inflater.for_body(encoding, first) if first else None
    if inflater is None:
        return _after(first, body), False
    return _inflated(inflater, first, body), True


async def _first_bytes(body: AsyncIterator[bytes]) -> bytes:
    """The first :data:`.inflate.SNIFF` bytes of ``body`` or more (what came in the
    reads that brought them), or all of a shorter one."""
    pieces: list[bytes] = []
    size = 0
    while size < SNIFF:
        piece = await anext(body, None)
        if piece is None:
            break
        pieces.append(piece)
        size += len(piece)
    return b"".join(pieces)


async def _after(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    if first:
        yield first
    async for chunk in rest:
        yield chunk


async def _inflated(
    inflater: Inflater, first: bytes, rest: AsyncIterator[bytes]
) -> AsyncIterator[bytes]:
    try:
        for piece in inflater.feed(first):
            yield piece
        async for chunk in rest:
            for piece in inflater.feed(chunk):
                yield piece
    except NotInItsCoding:
        raise aiohttp.ClientPayloadError("the upstream's body is not in its coding") from None
    if not inflater.complete:
        raise aiohttp.ClientPayloadError("the upstream's compressed body was cut short")


async def _decoded_error(
    upstream: Answer, headers: CIMultiDict[str], encoding: str, redactor: Redactor
) -> web.Response:
    """An error body in a ``Content-Encoding`` (the client asked for gzip, say): the key
    cannot be looked for in compressed bytes, so the body goes decoded, with it masked.
    One that cannot be decoded here (not in its coding, a bomb, too large) is withheld:
    the status goes on with an error body of the gateway's own."""
    del headers["Content-Encoding"]
    raw = bytearray()
    async for chunk in upstream.content.iter_any():
        raw += chunk
        if len(raw) > _ERROR_BODY_LIMIT:
            upstream.close()
            break
    body = b"" if not raw else None  # nothing to look at: nothing to withhold
    inflater = None
    if raw and len(raw) <= _ERROR_BODY_LIMIT and encoding in INFLATABLE:
        inflater = Inflater.for_body(encoding, bytes(raw))
    if inflater is not None:
        decoded = inflater.whole(bytes(raw), _ERROR_BODY_LIMIT)
        if decoded is not None:
            body = redactor.feed(decoded) + redactor.end()
    if body is None:
        message = (
            f"the upstream answered {upstream.status} with a body in {shown_coding(encoding)}"
            " that the gateway could not check for the upstream key, so it is not passed on"
        )
        headers["Content-Type"] = "application/json"
        body = jsonio.dumps(error_body(message, "upstream_error", code="upstream_body_withheld"))
    reason = _masked_reason(upstream.reason, redactor.secret)
    return web.Response(status=upstream.status, reason=reason, body=body, headers=headers)


_REROUTING = (
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-original-url",
    "x-rewrite-url",
)
_PLAIN_PATH = re.compile(r"[A-Za-z0-9._~:@!$&'()*+,=/-]*")
"""What a path may hold to be matched against ``upstream.passthrough``: no escapes, no
backslash, no ``;`` (which some servers read as ``/``, ``..`` or a parameter)."""


def relayed(path: str, prefixes: tuple[str, ...]) -> bool:
    """Whether ``upstream.passthrough`` names ``path`` (after ``/v1``, as sent): one of
    ``prefixes`` is it, or a folder of it (``/files`` covers ``/files/abc``).  Only a plain
    path is matched: ``/models/%5c..%5cfiles`` is ``/files`` to some servers."""
    if "/" in prefixes:
        return True
    if not _PLAIN_PATH.fullmatch(path):
        return False
    for prefix in prefixes:
        if path == prefix or path.startswith(prefix if prefix.endswith("/") else prefix + "/"):
            return True
    return False


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
    """``/v1//chat/completions``, ``/v1/chat//completions/``, ``/v1/chat%2Fcompletions``:
    the chat route with a slash doubled (a base URL ending in ``/v1/`` joined to
    ``/chat/completions``) or escaped.  Relayed, such a turn would have had no memory, and
    its ``conversation`` field would have gone up."""
    raw = request.rel_url.raw_path
    return ("chat" in raw or "%" in raw) and _segments(request) == _CHAT


_CHAT = ["chat", "completions"]
_OWN = frozenset({"conversations", "ask", "health", "ready"})
"""The gateway's own paths under ``/v1/``, by their first segment."""
_NOT_WORD = re.compile(r"[^\w-]", re.ASCII)
_SLASH = re.compile("/|%2[Ff]")


def _names_own_path(request: web.Request) -> bool:
    """``/v1//conversations``, ``/v1/ask/``, ``/v1/Conversations/x``,
    ``/v1/conversations%2Fx``, ``/v1/conversations.json``: a spelling of one of the
    gateway's own paths that its routes do not match (h74, and RELIABILITY.md's item 134).
    Relayed, a Conversations API call would reach the upstream's API of that name with
    the gateway's key (shared by every tenant), and a delete the client believes done
    would not be.  The first segment counts by the word it starts with: what follows a
    ``.`` or a ``;`` is a format or a parameter to some servers, and a space is trimmed
    by others."""
    segments = _segments(request)
    return bool(segments) and _NOT_WORD.split(segments[0], 1)[0].lower() in _OWN


def _segments(request: web.Request) -> list[str]:
    """The path's segments after chatmem's ``/v1/``, decoded, empty ones left out.  An
    escaped slash (``%2F``) separates them too: aiohttp's router keeps it escaped, and
    servers such as uvicorn (vLLM's) decode it before they route."""
    tail = request.rel_url.raw_path[len(_mount(request)) + len("/v1/") :]
    return [unquote(part) for part in _SLASH.split(tail) if part]


def _mount(request: web.Request) -> str:
    resource = request.match_info.route.resource
    canonical = resource.canonical if resource is not None else _PASSTHROUGH
    return canonical.removesuffix(_PASSTHROUGH)


_PASSTHROUGH = "/v1/{tail}"


async def _refuse_host_paths(request: web.Request) -> None:
    """A host app's own route under ``/v1/`` asked with another method: aiohttp's router
    went on to chatmem's catch-all, but the path is the host's, not the upstream's (405,
    as without chatmem)."""
    allowed = await host_methods(request)
    if allowed is not None:
        raise HostMethodNotAllowed(request.method, allowed)


async def host_methods(request: web.Request) -> list[str] | None:
    """The methods a host app's route takes on this path, a request to the passthrough's
    catch-all (the host's route under ``/v1/`` does not take its method); None when the
    path is not the host's."""
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
            return sorted(allowed)
    return None


class _LimitedBody:
    """The client's body streamed upstream, cut off past ``limit`` bytes, or when the
    client sends nothing of it for ``idle`` seconds (``server.idle_timeout``): one that
    sent a piece and went silent held its connection and the upstream's for as long as
    the upstream waited (found by a review)."""

    def __init__(self, content: aiohttp.StreamReader, limit: int, idle: float) -> None:
        self.content = content
        self.limit = limit
        self.idle = idle
        self.exceeded = False
        self.undecodable = False
        """The body's ``Content-Encoding`` could not be decoded."""
        self.timed_out = False

    async def stream(self) -> AsyncIterator[bytes]:
        size = 0
        try:
            while True:
                async with asyncio.timeout(self.idle):
                    chunk = await self.content.readany()
                if not chunk:
                    return
                size += len(chunk)
                if size > self.limit:
                    self.exceeded = True
                    raise PayloadTooLarge(f"request body is larger than {self.limit} bytes")
                yield chunk
        except web.RequestPayloadError:
            self.undecodable = True
            raise
        except TimeoutError:
            self.timed_out = True
            self.content.feed_eof()  # nothing more is read of it (aiohttp would linger)
            raise


class _WholeAsItCame(AsItCame):
    """An answer whose body has all arrived: its head is held at ``prepare`` and goes out
    in one send with the body (aiohttp's own switch, the one ``web.Response`` uses), so
    the client is woken once, and the gateway makes one system call, not two."""

    _send_headers_immediately = False


async def relay(
    request: web.Request,
    upstream: Answer,
    extra_headers: Mapping[str, str] | None = None,
    *,
    secret: bytes | None = None,
) -> web.StreamResponse:
    """Copy ``upstream``'s status, end-to-end headers and raw body to the client, with
    ``secret`` masked: in an error's body (status 400 or more) as :data:`MASK`, decoded
    from a ``Content-Encoding`` if need be; in another's body, as it comes, as as many
    ``*`` as it has bytes, so that its ``Content-Length`` still holds.  Such a body in
    gzip, deflate, br or zstd indeed (asked for none, an upstream may compress all the
    same) goes on decoded as it comes, the key as :data:`MASK`; one only labelled so is
    masked as it came.  A ``HEAD`` answer says what ``GET``'s would: decoded."""
    encoding = content_encoding(upstream.headers)
    error = upstream.status >= 400
    redactor = None
    if secret is not None and error:
        redactor = Redactor(secret)
    elif secret is not None:  # in whatever encoding it says it is in: it may not be
        redactor = Redactor(secret, keep_length=True)
    dropped = ("content-length",) if redactor is not None and error else ()
    headers = response_headers(upstream.headers, dropped, secret)
    if extra_headers:
        headers.update(extra_headers)
    if redactor is not None and error and encoding != "identity":
        return await _decoded_error(upstream, headers, encoding, redactor)
    body: AsyncIterator[bytes] = upstream.content.iter_any()
    if secret is not None and not error and encoding in INFLATABLE:
        if request.method == "HEAD":  # no body to look at: the headers GET's would have
            inflated = True
        else:
            body, inflated = await _inflating(body, encoding)
        if inflated:
            del headers["Content-Encoding"]
            headers.popall("Content-Length", None)
            redactor = Redactor(secret)
    reason = _masked_reason(upstream.reason, secret)
    whole = isinstance(upstream, UpstreamResponse) and upstream.arrived_whole
    response = (_WholeAsItCame if whole else AsItCame)(
        status=upstream.status, reason=reason, headers=headers
    )
    try:
        await response.prepare(request)
    except ConnectionError:  # the client left before the answer started
        upstream.close()
        response[CLIENT_LEFT] = True
        return response
    try:
        async for chunk in body:
            try:
                await response.write(chunk if redactor is None else redactor.feed(chunk))
            except ConnectionError:  # the client left (also while a write waited to drain)
                upstream.close()
                response[CLIENT_LEFT] = True
                return response
    except (TimeoutError, aiohttp.ClientPayloadError, aiohttp.ClientConnectionError):
        # The body is incomplete: cut the client's connection so it cannot take the
        # truncated body for a whole one.
        if request.transport is not None:
            request.transport.abort()
        return response
    try:
        if redactor is not None:
            await response.write(redactor.end())
        await response.write_eof()
    except ConnectionError:
        response[CLIENT_LEFT] = True
    return response
