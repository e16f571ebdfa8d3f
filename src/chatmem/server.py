"""The HTTP server ``chatmem serve`` runs: aiohttp's, with requests that are not valid
HTTP answered in the OpenAI error shape like every other failure.

aiohttp's parser refuses a malformed request before any handler or middleware sees it,
and its connection answers with a plain-text 400 that quotes the offending line, such as
``Invalid header value char: b'Authorization: Bearer sk-...'``: a credential of the client's
in a response body, where proxies and client logs keep it.  Here the answer is
``{"error": {...}}`` naming the kind of mistake and quoting nothing the client sent.

aiohttp offers no setting for this answer, so the runner's server hands out connections
of a subclass (:class:`_Connection`): the one place that ``serve`` controls and a host
app embedding chatmem does not (its server answers such requests itself).
"""

from __future__ import annotations

import json
import re
from http import HTTPStatus
from typing import cast

from aiohttp import web
from aiohttp.http_exceptions import (
    BadHttpMessage,
    BadHttpMethod,
    BadStatusLine,
    ContentEncodingError,
    InvalidHeader,
    LineTooLong,
)
from aiohttp.web_protocol import RequestHandler

from .errors import error_body
from .logs import REQUEST_ID_HEADER, accept_request_id
from .metrics import Metrics
from .proxy.http import UNSUPPORTED_ENCODING
from .state import GATEWAY

__all__ = ["GatewayRunner", "malformed_request_message"]

_WHAT_WAS_WRONG: tuple[tuple[type[BaseException], str], ...] = (
    (LineTooLong, "the request line or a header is too long"),
    (ContentEncodingError, UNSUPPORTED_ENCODING),
    (InvalidHeader, "a request header is malformed"),
    (BadHttpMethod, "the request method is not valid"),
    (BadStatusLine, "the request line is malformed"),
    (BadHttpMessage, "the request is not valid HTTP/1.1"),
)
"""Subclasses before the classes they derive from."""


_PARSER_SAYS = re.compile(r"([A-Z][A-Za-z -]{0,60}):\n\n  b")
"""llhttp's description of a mistake, which aiohttp puts in front of the line it quotes."""


def malformed_request_message(exc: BaseException | None) -> str:
    """What a client is told about HTTP that aiohttp could not parse: the kind of
    mistake, never the bytes (they may hold a token)."""
    said = _PARSER_SAYS.match(str(getattr(exc, "message", "")))
    if said is not None:  # letters and spaces only: nothing of the client's
        return f"the request is not valid HTTP/1.1: {said[1]}"
    for kind, message in _WHAT_WAS_WRONG:
        if isinstance(exc, kind):
            return message
    return "the request is not valid HTTP/1.1"


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Server Error"


class _Connection(RequestHandler):
    """aiohttp's connection handler with errors outside any handler answered as JSON, and
    closed at once at shutdown when it is idle."""

    __slots__ = ()

    def close(self) -> None:
        """Close once the request in flight is answered, or now when there is none.

        At shutdown aiohttp (3.14) closes every connection this way, which for an idle
        one cancels its wait for the next request and leaves it open: a request sent on it
        then (an SDK's next call on its pooled connection) was never answered, and the
        connection closed only when the drain ended, up to ``shutdown_grace`` later.
        Closed now, the client's next request goes on a new connection, which is refused,
        so it knows at once."""
        if self._waiter is not None:  # between requests: nothing to finish
            self.force_close()
            return
        super().close()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # aiohttp's own: logs the error (see logs.py) and refuses once a response started.
        super().handle_error(request, status, exc, message)
        if status >= 500:
            body = error_body(_phrase(status), "server_error")
        else:
            code = (
                "unsupported_content_encoding"  # as a coding aiohttp leaves encoded gets
                if isinstance(exc, ContentEncodingError)
                else "malformed_request"
            )
            body = error_body(malformed_request_message(exc), "invalid_request_error", code=code)
        response = web.Response(
            status=status, body=json.dumps(body).encode(), content_type="application/json"
        )
        response.force_close()  # the rest of the connection cannot be trusted
        if getattr(request, "_match_info", None) is None:  # no route's hook will see it
            # An id and a count like every other answer, as route "other" (item 147).
            response.headers[REQUEST_ID_HEADER] = accept_request_id(None)
            metrics = self._manager.metrics if isinstance(self._manager, _Server) else None
            if metrics is not None:
                metrics.response_started("other", status)
        return response


class _Server(web.Server):
    __slots__ = ()

    metrics: Metrics | None = None
    """The gateway's, which counts the answers of its connections to malformed HTTP."""

    def __call__(self) -> RequestHandler:
        connection = super().__call__()
        connection.__class__ = _Connection  # same layout: a subclass with no slots of its own
        return connection


class GatewayRunner(web.AppRunner):
    """``web.AppRunner`` whose server answers malformed HTTP in the OpenAI error shape."""

    __slots__ = ()

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _Server
        ours = cast(_Server, server)
        gateway = self.app.get(GATEWAY)
        if gateway is not None:
            ours.metrics = gateway.metrics
        return ours
