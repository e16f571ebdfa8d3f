"""chatmem's exceptions and the one place they become OpenAI-style JSON errors.

ChatmemError                 status, type, code; ``message`` is safe to show a client
├── InvalidRequest           400 invalid_request_error (bad JSON, wrong field, bad id)
├── Unauthorized             401 authentication_error
├── NotFound                 404 not_found_error (also for other tenants' objects)
├── RequestTimeout           408 invalid_request_error (the body did not arrive in time)
├── PayloadTooLarge          413 invalid_request_error
├── NotRelayed               501 what the passthrough cannot carry (a protocol upgrade)
├── StorageUnavailable       503 the database did not answer
└── UpstreamError            502 upstream unreachable or broken
    ├── UpstreamTimeout      504 upstream did not answer in time
    └── UpstreamAuthFailed   503 upstream refused the gateway's key (older services' routes)
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from typing import Any

from aiohttp import web

log = logging.getLogger("chatmem")

__all__ = [
    "ChatmemError",
    "FailureLog",
    "InvalidRequest",
    "NotAllowed",
    "NotFound",
    "NotRelayed",
    "PayloadTooLarge",
    "RequestTimeout",
    "StorageUnavailable",
    "Unauthorized",
    "UpstreamAuthFailed",
    "UpstreamError",
    "UpstreamTimeout",
    "error_body",
    "error_response",
    "failures",
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


class NotAllowed(ChatmemError):
    status = 403
    type = "invalid_request_error"
    code = "passthrough_not_allowed"


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


class NotRelayed(ChatmemError):
    status = 501
    type = "invalid_request_error"
    code = "not_relayed"


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


class FailureLog:
    """The gateway's own failures (5xx, failed streams) in the log, which only the metrics
    counted before: one warning per error code every ``every`` seconds at most, with how
    many more there were since, so an outage is a few lines, not one per request.

    A line holds the code, the message the client got and the class of the cause: never
    the cause's text, which for a database error can quote a statement's parameters
    (message content).
    """

    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self._last: dict[str | None, float] = {}
        self._since: dict[str | None, int] = {}

    def reset(self) -> None:
        """Forget what was reported (tests start from a quiet log)."""
        self._last.clear()
        self._since.clear()

    def note(self, code: str | None, message: str, cause: BaseException | None = None) -> None:
        now = time.monotonic()
        last = self._last.get(code)
        if last is not None and now - last < self.every:
            self._since[code] = self._since.get(code, 0) + 1
            return
        self._last[code] = now
        more = self._since.pop(code, 0)
        because = f" ({described(cause)})" if cause is not None else ""
        also = f"; {more} more since the last report" if more else ""
        log.warning("%s: %s%s%s", code, message, because, also)


def described(cause: BaseException) -> str:
    """A failure's cause for the log: its class and, for SQLite's errors, its message
    ("database or disk is full"), which names no data, where other drivers' may quote
    the values of a statement (SQLAlchemy's own wrapper quotes them all).  One of
    chatmem's own errors raised from another is described by that one (the upstream
    pool's ``UpstreamBroken`` by the ``ConnectionRefusedError`` under it)."""
    for _ in range(4):
        if not type(cause).__module__.startswith("chatmem.") or cause.__cause__ is None:
            break
        cause = cause.__cause__
    driver = getattr(cause, "orig", None)  # SQLAlchemy's DBAPIError wraps the driver's
    if isinstance(driver, sqlite3.Error):
        cause = driver
    if isinstance(cause, sqlite3.Error):
        return f"{type(cause).__name__}: {cause}"
    return type(cause).__name__


failures = FailureLog()


def error_response(exc: ChatmemError, headers: dict[str, str] | None = None) -> web.Response:
    if exc.status >= 500:
        failures.note(exc.code, exc.message, exc.__cause__)
    body = error_body(exc.message, exc.type, param=exc.param, code=exc.code)
    response = web.Response(
        status=exc.status,
        body=json.dumps(body).encode(),
        content_type="application/json",
        headers={**exc.headers, **(headers or {})},
    )
    if response.headers.get("Connection") == "close":
        response.force_close()  # aiohttp decides by this, not by the header
    return response
