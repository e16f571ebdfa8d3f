"""The older services' endpoints that chatmem keeps working, and the readiness check."""

from __future__ import annotations

from aiohttp import web

from ..config import Config
from ..state import gateway_of
from .ask import ask
from .conversation import COOKIE_SESSIONS, CookieSessions, conversation
from .http import ChatmemRoutes, json_response, method_not_allowed

__all__ = ["add_compat_routes", "health", "ready"]


async def health(_request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    """Ready when the database answers and takes writes; 503 (``storage_unavailable``)
    when it does not (see ``Store.check_ready``)."""
    await gateway_of(request).store.check_ready()
    return json_response({"status": "ok", "database": "ok"})


def add_compat_routes(
    app: web.Application, routes: ChatmemRoutes, config: Config, prefix: str
) -> None:
    """``/v1/ready``, ``/v1/ask`` and ``/conversation/{model}`` (before the /v1 catch-all)."""
    app[COOKIE_SESSIONS] = CookieSessions(config.compat)
    routes.add_get("/v1/ready", ready, name=prefix + "ready")
    routes.add_post("/v1/ask", ask, name=prefix + "ask")
    # The api-server's README shows its health check under /api (/api/v1/health): a
    # client whose base URL ends in /api must find /v1/ask there too.
    routes.add_post("/api/v1/ask", ask, name=prefix + "ask_api")
    # A model name may hold slashes (meta-llama/Llama-3.1-8B-Instruct); an empty one is
    # the handler's 400 naming the model, not a 404 that says nothing of it.
    routes.add_post("/conversation/{model:.*}", conversation, name=prefix + "conversation")
    paths = (
        ("ready", "/v1/ready"),
        ("ask", "/v1/ask"),
        ("ask_api", "/api/v1/ask"),
        ("conversation", "/conversation/{model:.*}"),
    )
    for name, path in paths:
        # Other methods on the gateway's own paths must not fall through to the upstream.
        routes.add_route("*", path, method_not_allowed, name=f"{prefix}{name}.other")
