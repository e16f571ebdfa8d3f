"""chatmem's exceptions and the one place they become OpenAI-style JSON errors.

ChatmemError                 status, type, code; ``message`` is safe to show a client
├── InvalidRequest           400 invalid_request_error (bad JSON, wrong field, bad id)
├── Unauthorized             401 authentication_error
├── NotFound                 404 not_found_error (also for other tenants' objects)
├── RequestTimeout           408 invalid_request_error (the body did not arrive in time)
├── PayloadTooLarge          413 invalid_request_error
├── StorageUnavailable       503 the database did not answer
└── UpstreamError            502 upstream unreachable or broken
    ├── UpstreamTimeout      504 upstream did not answer in time
    └── UpstreamAuthFailed   503 upstream refused the gateway's key (older services' routes)
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

__all__ = [
    "ChatmemError",
    "InvalidRequest",
    "NotFound",
    "PayloadTooLarge",
    "RequestTimeout",
    "StorageUnavailable",
    "Unauthorized",
    "UpstreamAuthFailed",
    "UpstreamError",
    "UpstreamTimeout",
    "error_body",
    "error_response",
]


class ChatmemError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None
    headers: dict[str, str] = {}

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class InvalidRequest(ChatmemError):
    status = 400
    type = "invalid_request_error"


class Unauthorized(ChatmemError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"
    headers = {"WWW-Authenticate": "Bearer"}


class NotFound(ChatmemError):
    status = 404
    type = "not_found_error"
    code = "not_found"


class RequestTimeout(ChatmemError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"
    headers = {"Connection": "close"}


class PayloadTooLarge(ChatmemError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class StorageUnavailable(ChatmemError):
    status = 503
    type = "server_error"
    code = "storage_unavailable"


class UpstreamError(ChatmemError):
    status = 502
    type = "upstream_error"
    code = "upstream_unavailable"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


class UpstreamAuthFailed(UpstreamError):
    status = 503
    code = "upstream_auth_failed"


def error_body(
    message: str, type_: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(exc: ChatmemError, headers: dict[str, str] | None = None) -> web.Response:
    body = error_body(exc.message, exc.type, param=exc.param, code=exc.code)
    return web.Response(
        status=exc.status,
        body=json.dumps(body).encode(),
        content_type="application/json",
        headers={**exc.headers, **(headers or {})},
    )
