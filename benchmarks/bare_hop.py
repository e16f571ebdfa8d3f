"""A bare aiohttp relay (aiohttp's server and client): the issue's "bare aiohttp hop".

    python -m benchmarks.bare_hop http://127.0.0.1:8000 7003

It reads the request, posts it to the same path upstream and streams the answer back:
no parsing, no storage, no headers but the content type, on uvloop like chatmem.  The
benchmark runs it as its ``bare`` target so that what chatmem adds can be told apart from
what such a hop costs on the same machine.  It is not a floor for chatmem, whose chat
route posts upstream with a leaner client than aiohttp's (``chatmem.proxy.pool``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import sys

import aiohttp
import uvloop
from aiohttp import web

SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)
_FORWARDED = ("Content-Type", "X-Mock-Tokens", "X-Mock-Delay-Ms")


async def relay(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    headers = {name: request.headers[name] for name in _FORWARDED if name in request.headers}
    url = request.app[UPSTREAM] + request.path
    async with request.app[SESSION].post(url, data=body, headers=headers) as upstream:
        response = web.StreamResponse(
            status=upstream.status, headers={"Content-Type": upstream.headers["Content-Type"]}
        )
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        return response


async def health(_request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def serve(upstream: str, port: int) -> None:
    app = web.Application()
    app[UPSTREAM] = upstream.rstrip("/")
    app[SESSION] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    app.router.add_post("/{tail:.*}", relay)
    app.router.add_get("/health", health)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    # As chatmem does: no full collection walks the imports, and the youngest generation
    # is collected every 10,000 allocations.
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)
    try:
        await asyncio.Event().wait()
    finally:
        await app[SESSION].close()
        await runner.cleanup()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve(sys.argv[1], int(sys.argv[2])))
