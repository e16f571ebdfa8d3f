"""chatmem inside an existing aiohttp application.

The host app keeps its own routes and middlewares; ``chatmem.setup`` adds chatmem's routes
(``/v1/...``, ``/api/v1/health``, ``/metrics``), its error handling (only for its own
routes), the request-id and shutdown bookkeeping, and the lifecycle of its database engine
and upstream client session (``cleanup_ctx``).  Run it with::

    python examples/embedded_app.py            # reads ./chatmem.toml or $CHATMEM_CONFIG
"""

from __future__ import annotations

import time

from aiohttp import web
from aiohttp.typedefs import Handler

import chatmem
from chatmem.config import find_config_file

SERVED_BY = web.AppKey("served_by", str)


@web.middleware
async def timing(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The host's own middleware: it sees chatmem's requests too (a header added here
    must be added before the response is prepared, so use on_response_prepare for
    streams; this one only touches responses that are not prepared yet)."""
    started = time.perf_counter()
    response = await handler(request)
    if not response.prepared:
        response.headers["X-Host-Time-Ms"] = f"{(time.perf_counter() - started) * 1000:.1f}"
    return response


async def index(request: web.Request) -> web.Response:
    return web.json_response({"app": request.app[SERVED_BY], "chat": "/v1/chat/completions"})


def build_app(config: chatmem.Config) -> web.Application:
    app = web.Application(middlewares=[timing])
    app[SERVED_BY] = "my-host-app"
    app.router.add_get("/", index)
    chatmem.setup(app, config)
    return app


if __name__ == "__main__":
    config = chatmem.load_config(find_config_file(None))
    # handler_cancellation=True would let chatmem learn at once that a client left; without
    # it chatmem looks twice a second (memory.on_client_disconnect = "discard").
    web.run_app(build_app(config), host=config.server.host, port=config.server.port)
