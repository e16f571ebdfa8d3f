"""Per-request bookkeeping that every chatmem request shares, kept deliberately cheap:
the request id, the in-flight registry used by graceful shutdown, the request counter,
and the ``/metrics`` endpoint."""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler

from .logs import REQUEST_ID_HEADER, accept_request_id, request_id_var
from .state import GATEWAY, gateway_of

__all__ = [
    "REQUEST_ID",
    "ROUTE_PREFIX",
    "UPSTREAM_REQUEST_ID_HEADER",
    "count_response",
    "drain",
    "is_chatmem_route",
    "metrics_endpoint",
    "track",
]

ROUTE_PREFIX = "chatmem."
REQUEST_ID = web.RequestKey("chatmem.request_id", str)
# The upstream's own request id (OpenAI and vLLM send one), kept under another name.
UPSTREAM_REQUEST_ID_HEADER = "X-Upstream-Request-Id"


def is_chatmem_route(request: web.Request) -> bool:
    """Whether ``request`` matched one of chatmem's routes (not the host app's)."""
    name = request.match_info.route.name
    return name is not None and name.startswith(ROUTE_PREFIX)


@web.middleware
async def track(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Give the request its id (for logs, upstream and the response) and, for chatmem's
    routes, register it as in flight so that shutdown waits for it."""
    request_id = accept_request_id(request.headers.get(REQUEST_ID_HEADER))
    request[REQUEST_ID] = request_id
    token = request_id_var.set(request_id)
    try:
        if is_chatmem_route(request):
            with gateway_of(request).live.request():
                return await handler(request)
        return await handler(request)
    finally:
        request_id_var.reset(token)


async def count_response(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: return the request id and count the response by route."""
    request_id = request.get(REQUEST_ID)
    if request_id is not None:
        theirs = response.headers.get(REQUEST_ID_HEADER)
        if theirs is not None and theirs != request_id:  # relayed from the upstream
            response.headers[UPSTREAM_REQUEST_ID_HEADER] = theirs
        response.headers[REQUEST_ID_HEADER] = request_id
    name = request.match_info.route.name
    route = name[len(ROUTE_PREFIX) :] if name and name.startswith(ROUTE_PREFIX) else "other"
    gateway_of(request).metrics.response_started(route, response.status)


async def metrics_endpoint(request: web.Request) -> web.Response:
    from .metrics import CONTENT_TYPE_LATEST

    body = gateway_of(request).metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def drain(app: web.Application) -> None:
    """``on_shutdown``: let requests in flight finish within ``server.shutdown_grace``."""
    gateway = app[GATEWAY]
    await gateway.live.drain(gateway.config.server.shutdown_grace)
