"""The older services' endpoints that chatmem keeps working."""

from __future__ import annotations

from aiohttp import web

from .http import json_response

__all__ = ["health"]


async def health(_request: web.Request) -> web.Response:
    return json_response({"status": "ok"})
