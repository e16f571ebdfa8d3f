"""The one upstream server: its URL, its client session, and which headers cross."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Protocol
from urllib.parse import quote, unquote

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy, MultiMapping
from yarl import URL

from ..config import UpstreamConfig
from ..errors import InvalidRequest
from ..logs import REQUEST_ID_HEADER, current_request_id
from .pool import MAX_RESPONSE_HEAD, MAX_RESPONSE_HEADERS, UpstreamPool, UpstreamResponse
from .redact import masked

__all__ = [
    "HOP_BY_HOP",
    "Answer",
    "Upstream",
    "content_encoding",
    "filter_headers",
    "response_headers",
    "shown_coding",
]

# RFC 9110 section 7.6.1 plus the de-facto ones; never forwarded in either direction.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

# Client headers that never go upstream: framing is ours, credentials are the client's.
_NOT_UPSTREAM = ("host", "content-length", "authorization", "cookie", "x-conversation-id", "expect")


_SKIPPED: dict[tuple[str, ...], frozenset[str]] = {}
"""The names each call site drops, with the hop-by-hop ones (a few call sites, computed once)."""


_QUERY_SAFE = "!$%&'()*+,/:;=?@[]~"
"""What stays as it is in a query sent upstream (with letters, digits and ``-._``; ``%``
too, so an escape the client made is not escaped again)."""


_NOT_OURS_TO_ADD = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")
"""Headers aiohttp's client adds when they are missing; passthrough relays the client's."""


_NOT_TO_THE_CLIENT = ("set-cookie", "set-cookie2")
"""The upstream's cookies belong to the gateway's session with it (a client's ``Cookie``
never goes upstream): passed on, they would only hand that session to every client.
``Set-Cookie2`` is RFC 2965's, obsolete, but a browser or client that still reads it
would take the same session."""
_SHORTEST_SECRET = 8
"""A key shorter than this is not looked for in what the upstream sends: masking every
``abc`` of a body would garble it, and such a key protects nothing anyway."""
_PASSTHROUGH_IDLE = 4.0
"""Seconds an idle passthrough connection is used again: less than the 5 s after which
uvicorn (vLLM), llama.cpp's server and Node close theirs.  A request sent as the upstream
closes its connection fails, and a proxy must not send a POST again (RFC 9110, 9.2.2):
it could have been applied.  aiohttp's default, 15 s, made some of them 502s."""


def response_headers(
    headers: MultiMapping[str], drop: tuple[str, ...] = (), secret: bytes | None = None
) -> CIMultiDict[str]:
    """The upstream's response headers that go on to the client, ``secret`` masked in
    their values (an upstream that echoes the credential it was sent); a header whose
    name holds it is left out (a name cannot hold the mask)."""
    out = filter_headers(headers, (*_NOT_TO_THE_CLIENT, *drop))
    if secret is None:
        return out
    lowered = secret.decode("utf-8", "replace").lower()
    if lowered in "\n".join(out.keys()).lower():  # one look at them all
        out = CIMultiDict((n, v) for n, v in out.items() if lowered not in n.lower())
    return CIMultiDict((name, masked(value, secret)) for name, value in out.items())


def filter_headers(headers: MultiMapping[str], drop: tuple[str, ...] = ()) -> CIMultiDict[str]:
    """Copy ``headers`` without hop-by-hop ones, those named in ``Connection``, and ``drop``."""
    skip = _SKIPPED.get(drop)
    if skip is None:
        skip = _SKIPPED[drop] = HOP_BY_HOP | {name.lower() for name in drop}
    if "Connection" in headers:
        skip = skip | {
            token.strip().lower()
            for value in headers.getall("Connection", ())
            for token in value.split(",")
        }
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name.lower() not in skip:
            out.add(name, value)
    return out


class Body(Protocol):
    def iter_any(self) -> AsyncIterator[bytes]: ...

    def set_exception(self, exc: BaseException) -> None: ...


class Answer(Protocol):
    """An upstream response being relayed: aiohttp's, or the lean client's (:mod:`.pool`)."""

    @property
    def status(self) -> int: ...

    @property
    def reason(self) -> str | None: ...

    @property
    def headers(self) -> CIMultiDictProxy[str]: ...

    @property
    def content(self) -> Body: ...

    def close(self) -> None: ...


class StreamedAnswer(Answer, Protocol):
    """The chat path's answer (:mod:`.pool`), which the tee reads."""

    @property
    def buffered(self) -> bool: ...

    def expect_end(self, within: float) -> None: ...

    def release(self) -> None: ...


class Upstream:
    """Builds upstream URLs and headers; owns the connections to the upstream.

    ``pool`` carries the POST of every chat turn (see :mod:`.pool` for why it is not
    aiohttp's client), ``relay_pool`` what is passed through with a small body or none, and
    ``session`` the rest of it: large and chunked bodies, bodies aiohttp's server decoded,
    ``HEAD`` and the methods the pool does not take, and WebSockets
    (``passthrough._in_memory`` decides).
    """

    def __init__(self, config: UpstreamConfig, session: aiohttp.ClientSession) -> None:
        self.config = config
        self.session = session
        key = config.api_key.encode() if config.api_key else b""
        self.secret: bytes | None = key if len(key) >= _SHORTEST_SECRET else None
        """The upstream key as it may come back in an error body (see ``Redactor``)."""
        self.base = URL(config.url.rstrip("/"))
        self._prefix = str(self.base)
        self._path = self.base.raw_path.rstrip("/")
        self.timeout = aiohttp.ClientTimeout(
            total=None, connect=config.connect_timeout, sock_read=config.read_timeout
        )
        self.pool = UpstreamPool(
            self.base, connect_timeout=config.connect_timeout, read_timeout=config.read_timeout
        )
        self.relay_pool = UpstreamPool(
            self.base,
            connect_timeout=config.connect_timeout,
            read_timeout=config.read_timeout,
            idle_for=_PASSTHROUGH_IDLE,
            max_head=None,  # the limits of ``session``'s
        )
        """The passthrough's requests whose body is in memory (see ``passthrough``)."""
        self._auth: tuple[str, str] | None = None
        if config.api_key:
            scheme = config.auth_scheme.strip()
            value = f"{scheme} {config.api_key}" if scheme else config.api_key
            self._auth = (config.auth_header, value)

    @classmethod
    def create_session(cls) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=0, enable_cleanup_closed=True, keepalive_timeout=_PASSTHROUGH_IDLE
        )
        # Cookies from the upstream are the client's business, never the gateway's; and
        # the headers aiohttp would add of its own are the client's to send or not (an
        # Accept-Encoding the client never sent got it a compressed body).
        return aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            skip_auto_headers=_NOT_OURS_TO_ADD,
            # aiohttp's own limits (8190 bytes a line, 128 headers) made a valid answer
            # with more a 502; the chat route's pool takes a head of up to 64 KiB.
            max_line_size=MAX_RESPONSE_HEAD,
            max_field_size=MAX_RESPONSE_HEAD,
            max_headers=MAX_RESPONSE_HEADERS,
        )

    async def close(self) -> None:
        await self.pool.close()
        await self.relay_pool.close()
        await self.session.close()

    async def post(
        self, tail: str, headers: Mapping[str, str], body: bytes, query: str = ""
    ) -> UpstreamResponse:
        """POST ``body`` to ``tail`` (a fixed path of ours, after ``/v1``) on the pool,
        with the client's raw ``query`` (Azure-style servers want ``?api-version=``)."""
        target = self._path + tail
        if query:
            # Percent-encoded as it came; anything a request line cannot carry is encoded.
            target += "?" + quote(query, safe=_QUERY_SAFE)
        return await self.pool.post(target, headers, body)

    def url_for(self, tail: str, query_string: str = "") -> URL:
        """``tail`` is the part of the client's path after ``/v1``; the origin is fixed.

        Dot segments are refused rather than resolved: ``/v1/../admin`` must not reach
        a path outside the upstream's ``/v1`` either, nor ``/v1/%2e%2e/admin`` or
        ``/v1/%2e%2e%2fadmin`` (an upstream may decode ``%2e`` and ``%2f`` before it
        resolves the path).
        """
        if any(segment in (".", "..") for segment in unquote(tail).split("/")):
            raise InvalidRequest("path must not contain '.' or '..' segments")
        # The origin comes first in the string, so no tail can change the host.
        query = "?" + query_string if query_string else ""
        return URL(self._prefix + tail + query, encoded=True)

    def request_headers(
        self, client_headers: CIMultiDictProxy[str], drop: tuple[str, ...] = ()
    ) -> CIMultiDict[str]:
        headers = filter_headers(client_headers, (*_NOT_UPSTREAM, *drop))
        request_id = current_request_id()
        if request_id is not None:  # the validated or generated one, never the raw header
            headers[REQUEST_ID_HEADER] = request_id
        if self._auth is not None:
            headers[self._auth[0]] = self._auth[1]
        return headers


def content_encoding(headers: MultiMapping[str]) -> str:
    """The codings of a body, lower case, from every ``Content-Encoding`` line ("identity"
    when there are none): two lines are two codings, as one line ``gzip, gzip`` is.  Read
    from the first line alone, ``identity`` then ``gzip`` passed a gzip body for plain
    text, and ``gzip`` twice one that was gzipped twice (h53)."""
    lines = headers.getall("Content-Encoding", None)
    if not lines:
        return "identity"
    codings = [c.strip().lower() for line in lines for c in line.split(",")]
    return ", ".join(c for c in codings if c not in ("", "identity")) or "identity"


_KNOWN_CODINGS = frozenset({"gzip", "x-gzip", "deflate", "br", "zstd", "compress", "x-compress"})


def shown_coding(encoding: str) -> str:
    """``encoding`` (:func:`content_encoding`'s) fit for an error message: quoted when it
    is codings HTTP knows, else not at all.  The upstream writes the header, and one that
    put the key in it had it quoted back to the client, lower-cased past the mask (h54)."""
    if all(coding in _KNOWN_CODINGS for coding in encoding.split(", ")):
        return repr(encoding)
    return "a coding HTTP does not know"
