"""Requests from web pages on other origins (``server.cors_origins``).

Off by default: then chatmem adds no CORS header of its own, and on the passthrough the
upstream's are relayed as they are.  On, chatmem answers the browser's preflight
(``OPTIONS`` with ``Access-Control-Request-Method``) for every one of its routes itself,
passthrough included, and gives its answers to an allowed origin the headers that let
the page read them: one policy for the whole gateway, not the upstream's on some paths
and none on chatmem's own.

Hand-written rather than aiohttp-cors: that library refuses routes registered for every
method (``"*"``, aio-libs/aiohttp-cors#241), which is what the passthrough is, and it
works through the router's protected internals.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

from .logs import REQUEST_ID_HEADER
from .proxy.http import HostMethodNotAllowed
from .tracking import PASSTHROUGH_ROUTE, UPSTREAM_REQUEST_ID_HEADER, OwnRoutes, ResponseHook

HostMethods = Callable[[web.Request], Awaitable[list[str] | None]]

__all__ = ["Cors"]

_EXPOSED = ", ".join(("X-Conversation-Id", REQUEST_ID_HEADER, UPSTREAM_REQUEST_ID_HEADER))
_MAX_AGE = "600"  # seconds a browser may reuse a preflight answer
_PREFLIGHT_VARY = "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"
_ANSWERED = web.RequestKey("chatmem.cors_preflight", bool)
"""Set on a request whose preflight the middleware answered (its headers are final)."""


def _serialized(origin: str) -> str:
    """An origin as browsers send it: lower case, no trailing slash, no default port."""
    origin = origin.rstrip("/").lower()
    for scheme, port in (("https://", ":443"), ("http://", ":80")):
        if origin.startswith(scheme) and origin.endswith(port):
            return origin[: -len(port)]
    return origin


class Cors:
    """The allowed origins (``"*"``: any) and the two pieces that apply them, to the
    gateway's own routes (see ``tracking.OwnRoutes``).  ``host_methods`` tells a host
    app's path under ``/v1/`` that reached the passthrough's catch-all (the host's route
    does not take the method): not chatmem's, so its preflight and its 405 are the host's
    (``passthrough.host_methods``)."""

    def __init__(self, origins: tuple[str, ...], own: OwnRoutes, host_methods: HostMethods) -> None:
        self.own = own
        self.host_methods = host_methods
        self.any = "*" in origins
        self.origins = frozenset(_serialized(origin) for origin in origins)

    def allows(self, origin: str) -> bool:
        return self.any or origin.lower() in self.origins

    def preflight(self) -> Middleware:
        """Answers a preflight to one of chatmem's routes (204, or 403 for an origin
        not allowed) without authentication, as browsers send it without credentials."""

        @web.middleware
        async def answer_preflight(request: web.Request, handler: Handler) -> web.StreamResponse:
            headers = request.headers
            origin = headers.get(hdrs.ORIGIN)
            method = headers.get(hdrs.ACCESS_CONTROL_REQUEST_METHOD)
            route = self.own.get(request.match_info.route)
            if (
                request.method != hdrs.METH_OPTIONS
                or origin is None
                or method is None
                or route is None
                or (route == PASSTHROUGH_ROUTE and await self.host_methods(request) is not None)
            ):
                return await handler(request)
            if not self.allows(origin):
                raise web.HTTPForbidden(reason="Origin Not Allowed")
            allowed = {
                hdrs.ACCESS_CONTROL_ALLOW_ORIGIN: origin,
                hdrs.ACCESS_CONTROL_ALLOW_METHODS: method,
                hdrs.ACCESS_CONTROL_MAX_AGE: _MAX_AGE,
                hdrs.VARY: _PREFLIGHT_VARY,
            }
            request[_ANSWERED] = True
            asked = headers.get(hdrs.ACCESS_CONTROL_REQUEST_HEADERS)
            if asked:
                allowed[hdrs.ACCESS_CONTROL_ALLOW_HEADERS] = asked
            return web.Response(status=204, headers=allowed)

        return answer_preflight

    def response_headers(self) -> ResponseHook:
        """The ``on_response_prepare`` hook: an allowed origin may read the answer and
        chatmem's headers; an upstream's own CORS headers are replaced, not doubled."""

        async def add_headers(request: web.Request, response: web.StreamResponse) -> None:
            if (
                request.get(_ANSWERED)
                or request.match_info.route not in self.own
                or isinstance(response, HostMethodNotAllowed)
            ):
                return  # our own preflight answer, or the host app's route (or path)
            headers = response.headers
            for name in [name for name in headers if name.lower().startswith("access-control-")]:
                del headers[name]
            # Whatever the Origin, or none: a cache must not give this answer to a page of
            # another origin (the Fetch standard's "CORS protocol and HTTP caches").
            vary = ",".join(headers.getall(hdrs.VARY, ())).lower()
            if "origin" not in (value.strip() for value in vary.split(",")):
                headers.add(hdrs.VARY, hdrs.ORIGIN)
            origin = request.headers.get(hdrs.ORIGIN)
            if origin is not None and self.allows(origin):
                headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = origin
                headers[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = _EXPOSED

        return add_headers
