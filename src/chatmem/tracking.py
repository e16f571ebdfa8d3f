"""Per-request bookkeeping that every chatmem request shares, kept deliberately cheap:
the request id, the in-flight registry used by graceful shutdown, failures as
OpenAI-style errors, the request counter, and the ``/metrics`` endpoint."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.typedefs import Handler, Middleware

from .errors import ChatmemError, NotAllowed, error_body, error_response
from .logs import (
    ACCESS_STARTED,
    CLIENT_GONE,
    REQUEST_ID_HEADER,
    UPGRADED,
    accept_request_id,
    request_id_var,
)
from .proxy.http import HostMethodNotAllowed, http_error_as_json, json_response
from .state import GATEWAY, Gateway, gateway_of, remember_gateway

ResponseHook = Callable[[web.Request, web.StreamResponse], Awaitable[None]]

__all__ = [
    "COUNTED_AS",
    "PASSTHROUGH_ROUTE",
    "REQUEST_ID",
    "ROUTE_PREFIX",
    "UPSTREAM_REQUEST_ID_HEADER",
    "OwnRoutes",
    "drain",
    "is_chatmem_route",
    "is_chatmem_route_name",
    "metrics_endpoint",
    "own_routes",
    "response_counter",
    "tracker",
]

log = logging.getLogger("chatmem")

ROUTE_PREFIX = "chatmem."
REQUEST_ID = web.RequestKey("chatmem.request_id", str)
COUNTED_AS = web.RequestKey("chatmem.counted_as", str)
"""The route a request's response is counted under when it is not the one that matched:
the chat route's, for a spelling of its path the passthrough's catch-all hands it
(``/v1/chat/completions/``)."""
# The upstream's own request id (OpenAI and vLLM send one), kept under another name.
UPSTREAM_REQUEST_ID_HEADER = "X-Upstream-Request-Id"


def is_chatmem_route(request: web.Request) -> bool:
    """Whether ``request`` matched one of chatmem's routes (not the host app's; a sub-app
    with a gateway of its own included: see ``OwnRoutes`` for one gateway's)."""
    return is_chatmem_route_name(request.match_info.route.name)


def is_chatmem_route_name(name: str | None) -> bool:
    return name is not None and name.startswith(ROUTE_PREFIX)


OwnRoutes = dict[web.AbstractRoute, str]
"""The routes one ``setup`` added to its app: what that gateway answers, each with the
name its responses are counted under (see :func:`own_routes`).  A host app's routes are
not in it, nor are those of a sub-app with a gateway of its own (``setup`` on both): the
host's middlewares and hooks also see the sub-app's requests, and leave them to the
sub-app's gateway.  Filled once ``setup`` added them all."""


def own_routes(routes: Iterable[web.AbstractRoute]) -> OwnRoutes:
    """chatmem's routes among ``routes``, each with its name without ``chatmem.``, the
    route its responses are counted under (looked up once, not on every response)."""
    return {
        route: route.name[len(ROUTE_PREFIX) :]
        for route in routes
        if route.name is not None and is_chatmem_route_name(route.name)
    }


PASSTHROUGH_ROUTE = "passthrough"
"""The passthrough's route name (after ``chatmem.``): the one route whose requests may be
counted under another's (``COUNTED_AS``)."""


def tracker(gateway: Gateway, own: OwnRoutes) -> Middleware:
    """The middleware of ``gateway``'s app, whose routes are ``own``.

    It gives each request its id (for logs, upstream and the response) and its gateway
    (for :func:`~chatmem.state.gateway_of`).  A request to one of chatmem's routes is also
    registered as in flight, so that shutdown waits for it, and its failures become
    OpenAI-style errors; the host app's routes are left alone, and so are the routes of
    a sub-app with a gateway of its own (``setup`` on both): its middleware, which runs
    after this one, does all of it, and its shutdown waits for them with its own grace.

    One middleware for all of it, with the gateway at hand: each middleware more is a
    coroutine and two calls on every request, and looking the gateway up in the request's
    chain of apps is several more.
    """
    in_flight = gateway.live.tasks

    @web.middleware
    async def track(request: web.Request, handler: Handler) -> web.StreamResponse:
        request_id = accept_request_id(request.headers.get(REQUEST_ID_HEADER))
        request[REQUEST_ID] = request_id
        remember_gateway(request, gateway)
        token = request_id_var.set(request_id)
        try:
            if request.match_info.route not in own:
                return await handler(request)
            task = asyncio.current_task(gateway.loop)
            if task is not None:  # handlers always run in a task
                in_flight[task] = request.protocol
            # The server's access logger, if it writes access lines: chatmem's under
            # ``chatmem serve`` with ``log.access``, the host's own when embedded.
            logger = request.protocol.access_logger
            if logger is not None:
                request[ACCESS_STARTED] = time.perf_counter()
            try:
                return await handler(request)
            except asyncio.CancelledError:
                # The client left (or shutdown's grace ran out): aiohttp logs no line for
                # a cancelled handler, and these are the requests one looks for.
                if logger is not None and logger.enabled:
                    _log_cancelled(logger, request, request_id)
                raise
            except ChatmemError as exc:
                return error_response(exc)
            except web.HTTPException as exc:
                if exc.status < 400 or isinstance(exc, HostMethodNotAllowed):
                    raise
                return http_error_as_json(exc)  # chatmem's routes answer in one shape
            except Exception:
                log.exception("unhandled error in %s %s", request.method, request.rel_url.raw_path)
                body = error_body(
                    "internal error in the gateway", "server_error", code="internal_error"
                )
                return json_response(body, status=500)
            finally:
                if task is not None:
                    in_flight.pop(task, None)
        finally:
            request_id_var.reset(token)

    return track


def _log_cancelled(logger: AbstractAccessLogger, request: web.Request, request_id: str) -> None:
    """The access line of a request whose handler was cancelled, in the server's own
    format: 499, or 101 for a WebSocket, whose handler is cancelled when its connection
    goes, also after a clean close (h55): its answer was the 101, given in full."""
    status = 101 if request.get(UPGRADED) else CLIENT_GONE
    answer = web.Response(status=status, headers={REQUEST_ID_HEADER: request_id})
    logger.log(request, answer, time.perf_counter() - request[ACCESS_STARTED])


def _counted_elsewhere(request: web.Request, app: web.Application) -> bool:
    """Whether a response that is not one of ``app``'s gateway's routes belongs to another
    gateway: one of its routes, or any route of its app or of an app inside that (the
    innermost app with a gateway on the request's way counts it)."""
    if is_chatmem_route_name(request.match_info.route.name):
        return True
    for on_the_way in reversed(request.match_info.apps):
        if on_the_way is app:
            return False
        if GATEWAY in on_the_way:
            return True
    return False


def response_counter(gateway: Gateway, own: OwnRoutes, app: web.Application) -> ResponseHook:
    """The ``on_response_prepare`` hook of ``gateway``'s app: return the request id and
    count the response by route (``own``'s; a host route's is "other", and one of
    another gateway's, in a sub-app, is that gateway's to count)."""
    metrics = gateway.metrics

    async def count_response(request: web.Request, response: web.StreamResponse) -> None:
        matched = request.match_info.route
        route = own.get(matched)
        if route is None and _counted_elsewhere(request, app):
            return
        request_id = request.get(REQUEST_ID)
        if request_id is None:  # answered before the middleware (an Expect refused)
            request_id = accept_request_id(request.headers.get(REQUEST_ID_HEADER))
        else:
            theirs = response.headers.get(REQUEST_ID_HEADER)
            if theirs is not None and theirs != request_id:
                if route is None:  # a host route's own id: its own, as without chatmem
                    request_id = theirs
                else:  # relayed from the upstream
                    response.headers[UPSTREAM_REQUEST_ID_HEADER] = theirs
        response.headers[REQUEST_ID_HEADER] = request_id
        if route is None or (response.status == 405 and isinstance(response, HostMethodNotAllowed)):
            route = "other"  # a host route's (or one asked with another method)
        elif route == PASSTHROUGH_ROUTE:  # a request it handed to another route is counted there
            # (looked up here only: ``get`` of a key a request does not hold raises and
            # catches a KeyError inside aiohttp's mapping, 0.8 % of a chat turn's cost)
            route = request.get(COUNTED_AS) or route
        metrics.response_started(route, response.status)

    return count_response


async def metrics_endpoint(request: web.Request) -> web.Response:
    from .auth import authenticate
    from .metrics import CONTENT_TYPE_LATEST

    owner = authenticate(request)  # with auth on, a valid token (a scraper sends one)
    gateway = gateway_of(request)
    reader = gateway.config.metrics.tenant
    if reader and gateway.config.auth.enabled and owner.tenant != reader:
        # Their labels name every tenant and what it used: not for the other tenants.
        raise NotAllowed("the metrics are for the metrics.tenant's tokens", code="not_allowed")
    body = gateway.metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def drain(app: web.Application) -> None:
    """``on_shutdown``: let requests in flight finish within ``server.shutdown_grace``."""
    gateway = app[GATEWAY]
    await gateway.live.drain(gateway.config.server.shutdown_grace)
