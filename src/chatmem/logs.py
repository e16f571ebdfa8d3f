"""Logging: text or JSON lines, one access line per request, and request ids.

A request id is accepted from the client's ``X-Request-Id`` when it is a short token of
safe characters, generated otherwise; it is returned on the response, sent upstream and
put on every log line written while the request is handled (through a context variable,
which detached tasks inherit).  Nothing here logs headers, bodies or query strings:
secrets and message content stay out of the logs unless ``log.debug_content`` is on, and
then only the content, at debug level (see :func:`log_content`).
"""

from __future__ import annotations

import json
import logging
import random
import re
import sys
import time
from contextvars import ContextVar
from time import perf_counter
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import BadHttpMessage

from .config import LogConfig
from .forwarded import client_address

__all__ = [
    "ACCESS_STARTED",
    "CLIENT_GONE",
    "CLIENT_LEFT",
    "REQUEST_ID_HEADER",
    "UPGRADED",
    "AccessLogger",
    "JsonFormatter",
    "accept_request_id",
    "configure_logging",
    "current_request_id",
    "log_access",
    "log_content",
    "request_id_var",
]

REQUEST_ID_HEADER = "X-Request-Id"
_VALID_ID = re.compile(r"[A-Za-z0-9._:+/=-]{1,128}")

request_id_var: ContextVar[str | None] = ContextVar("chatmem_request_id", default=None)
"""The id of the request being handled by the current task (None outside requests)."""

content_log = logging.getLogger("chatmem.content")

# LogRecord attributes that are not "extra" fields given by the caller.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "request_id"}


def accept_request_id(value: str | None) -> str:
    """The client's id if it is safe to echo and log, else a new random one."""
    if value is not None and _VALID_ID.fullmatch(value):
        return value
    # An id tells requests apart; it guards nothing, so it needs no system call for
    # random bytes on every request, as ``secrets`` makes.
    return f"{random.getrandbits(128):032x}"


def current_request_id() -> str | None:
    return request_id_var.get()


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, pid, request id, extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            entry["request_id"] = request_id
        for key, value in record.__dict__.items():
            if key not in _STANDARD:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


JsonFormatter.converter = time.gmtime


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        request_id = getattr(record, "request_id", None)
        return f"{line} [{request_id}]" if request_id else line


def configure_logging(config: LogConfig) -> None:
    """Set up the root logger for ``chatmem serve`` (an embedding app does its own)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestIdFilter())
    if config.format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            _TextFormatter("%(asctime)s %(process)d %(levelname)s %(name)s %(message)s")
        )
    # Other libraries stay at WARNING whatever ``log.level`` says: at debug level some of
    # them (aiosqlite, asyncio) log the SQL parameters, i.e. message content.
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)
    logging.getLogger("chatmem").setLevel(config.level.upper())
    # `log.access = true` means a line per request, whatever `log.level` (warning, say).
    logging.getLogger("chatmem.access").setLevel(logging.INFO if config.access else logging.NOTSET)
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _MalformedRequestFilter) for f in server_log.filters):
        server_log.addFilter(_MalformedRequestFilter())


def _bad_message(exc: BaseException | None) -> BadHttpMessage | None:
    """The client's mistake behind ``exc``, if any: a request the parser refused, also
    where it is the cause of another error (a body in a ``Content-Encoding`` it is not in,
    which aiohttp meets while it reads on past a handler that did not read it: h57)."""
    for _ in range(4):  # bounded: a short chain of causes
        if exc is None or isinstance(exc, BadHttpMessage):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


class _MalformedRequestFilter(logging.Filter):
    """aiohttp logs a request its parser refused (answered 400) at ERROR, with a traceback
    that quotes up to 100 bytes of what the client sent (a header: maybe its token).
    A client's mistake is one warning line, with the kind of mistake and nothing it sent."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = _bad_message(record.exc_info[1] if record.exc_info else None)
        if exc is not None:
            record.msg = f"{record.getMessage()}: malformed request ({type(exc).__name__})"
            record.args = ()
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def log_content(enabled: bool, what: str, content: Any) -> None:
    """Message content, only when ``log.debug_content`` asks for it."""
    if enabled and content_log.isEnabledFor(logging.DEBUG):
        content_log.debug("%s: %s", what, json.dumps(content, ensure_ascii=False, default=str))


CLIENT_GONE = 499
"""The status in the access line of a request whose client left before its answer was
complete (nginx's "client closed request"): no response status was sent."""


CLIENT_LEFT = web.ResponseKey("chatmem.client_left", bool)
"""Set on a response whose client left while it was being written: the handler that
found it out on a write ends as usual, and its access line says 499, as it does when the
handler is cancelled first (which of the two happens first is a matter of timing)."""


UPGRADED = web.RequestKey("chatmem.upgraded", bool)
"""Set on a request answered with ``101 Switching Protocols`` (a relayed WebSocket): its
access line says 101 however the socket ended, as its close code tells the rest."""

ACCESS_STARTED = web.RequestKey("chatmem.access_started", float)
"""``time.perf_counter()`` when chatmem's middleware took the request (with ``log.access``)."""


class AccessLogger(AbstractAccessLogger):
    """One line per request: no query string, no headers, nothing a client sent as content."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        status = CLIENT_GONE if response.get(CLIENT_LEFT) else response.status
        started = request.get(ACCESS_STARTED)
        if started is not None:  # aiohttp's own time is in whole milliseconds under uvloop
            time = perf_counter() - started
        log_access(self.logger, request, status, time, response.headers.get(REQUEST_ID_HEADER))

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


def log_access(
    logger: logging.Logger,
    request: web.BaseRequest,
    status: int,
    seconds: float,
    request_id: str | None,
) -> None:
    client = client_address(request)
    # As it was sent, percent-encoded: decoded, a %0a in it started a line of the client's.
    path = request.rel_url.raw_path
    logger.info(
        "%s %s %s %.1fms %s",
        request.method,
        path,
        status,
        seconds * 1000,
        client,
        extra={
            "method": request.method,
            "path": path,
            "status": status,
            "duration_ms": round(seconds * 1000, 3),
            "client": client,
            "request_id": request_id,
        },
    )
