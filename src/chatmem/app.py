"""Wiring chatmem onto an aiohttp application."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.typedefs import Handler

from .auth import setup_auth
from .config import Config
from .cors import Cors
from .forwarded import TRUSTED_PROXIES, parse_networks
from .proxy.chat import chat_completions, early_headers
from .proxy.compat import add_compat_routes, health
from .proxy.conversations import add_conversation_routes
from .proxy.http import ChatmemRoutes, http_error_as_json, method_not_allowed
from .proxy.passthrough import (
    close_websockets,
    host_methods,
    keep_offered_subprotocols_out_of_logs,
    passthrough,
    passthrough_early_headers,
)
from .state import GATEWAY, Gateway
from .tracking import (
    PASSTHROUGH_ROUTE,
    ROUTE_PREFIX,
    OwnRoutes,
    drain,
    metrics_endpoint,
    own_routes,
    response_counter,
    tracker,
)

__all__ = ["create_app", "setup"]

log = logging.getLogger("chatmem")


def _check_config(config: object, call: str) -> None:
    if not isinstance(config, Config):
        raise TypeError(
            f"chatmem.{call}: config must be a chatmem.Config, such as"
            f" chatmem.load_config('chatmem.toml'), not {type(config).__name__}"
        )


def setup(app: web.Application, config: Config) -> None:
    """Add chatmem's routes, error handling and lifecycle to an existing application."""
    _check_config(config, "setup(app, config)")
    if GATEWAY in app:
        raise RuntimeError("chatmem.setup(app, config) was already called on this app")
    if app.frozen:
        raise RuntimeError("chatmem.setup(app, config) must be called before the app starts")
    if app.pre_frozen:  # its router and middlewares can no longer change
        raise RuntimeError(
            "chatmem.setup(app, config) must be called before app is added to another app"
            " (add_subapp)"
        )
    gateway = Gateway(config)
    app[GATEWAY] = gateway
    hosts = {_shape(resource.canonical): resource.canonical for resource in app.router.resources()}

    async def lifecycle(_app: web.Application) -> AsyncIterator[None]:
        await gateway.start()
        yield
        await gateway.stop()

    app.cleanup_ctx.append(lifecycle)
    app[TRUSTED_PROXIES] = parse_networks(config.server.trusted_proxies)
    own: OwnRoutes = {}  # filled below, once they are all added
    app.on_response_prepare.append(response_counter(gateway, own, app))
    app.on_shutdown.append(close_websockets)  # before the drain waits for them
    keep_offered_subprotocols_out_of_logs()
    app.on_shutdown.append(drain)
    app.middlewares.append(tracker(gateway, own))
    if config.server.cors_origins:
        cors = Cors(config.server.cors_origins, own, host_methods)
        app.middlewares.append(cors.preflight())
        app.on_response_prepare.append(cors.response_headers())
    setup_auth(app, config.auth)
    routes = ChatmemRoutes(app.router, config.server.max_body_bytes)
    if config.metrics.path:
        routes.add_get(config.metrics.path, metrics_endpoint, name=ROUTE_PREFIX + "metrics")
    routes.add_get("/v1/health", health, name=ROUTE_PREFIX + "health")
    routes.add_route("*", "/v1/health", method_not_allowed, name=ROUTE_PREFIX + "health.other")
    routes.add_get("/api/v1/health", health, name=ROUTE_PREFIX + "health_api")
    routes.add_route(
        "*", "/api/v1/health", method_not_allowed, name=ROUTE_PREFIX + "health_api.other"
    )
    add_compat_routes(app, routes, config, ROUTE_PREFIX)
    # (Spelled with a trailing or doubled slash, the passthrough hands it here.)
    routes.add_post(
        "/v1/chat/completions",
        chat_completions,
        name=ROUTE_PREFIX + "chat",
        early_headers=early_headers,
    )
    add_conversation_routes(routes, ROUTE_PREFIX)
    routes.add_route(
        "*",
        "/v1/{tail:.*}",
        passthrough,
        name=ROUTE_PREFIX + PASSTHROUGH_ROUTE,
        early_headers=passthrough_early_headers,
    )
    # Its own router's routes: aiohttp holds a sub-app added before this setup as one resource,
    # whose routes ``router.routes()`` lists too, and those are the sub-app's gateway's.
    own.update(
        own_routes(
            route
            for resource in app.router.resources()
            if not isinstance(resource, web.PrefixedSubAppResource)
            for route in resource
        )
    )
    for resource in app.router.resources():
        if not (resource.name or "").startswith(ROUTE_PREFIX):
            continue
        theirs = hosts.pop(_shape(resource.canonical), None)  # once per path
        if theirs is not None:
            log.warning(
                "chatmem.setup: the host app's route %s was added first and answers"
                " instead of chatmem's",
                theirs,
            )


_VARIABLE = re.compile(r"\{[^}]*\}")


def _shape(canonical: str) -> str:
    """A route's path with its variables unnamed: ``/v1/conversations/{cid}`` takes the
    requests of chatmem's ``/v1/conversations/{conversation_id}`` all the same."""
    return _VARIABLE.sub("{}", canonical)


def create_app(config: Config) -> web.Application:
    """The standalone gateway (what ``chatmem serve`` runs)."""
    _check_config(config, "create_app(config)")
    app = web.Application(
        client_max_size=config.server.max_body_bytes, middlewares=[_http_errors_as_json]
    )
    setup(app, config)
    return app


@web.middleware
async def _http_errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Standalone only: aiohttp's own 404/405/413 answers in the OpenAI error shape."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return http_error_as_json(exc)
