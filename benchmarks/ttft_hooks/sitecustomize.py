"""Timestamps inside a relay (and the mock), for ``benchmarks.ttft`` only.

Python imports ``sitecustomize`` at start-up from the path; ``benchmarks.ttft`` puts this
directory on the ``PYTHONPATH`` of the relays and the mock it starts, with
``CHATMEM_TTFT_TRACE`` set to a file prefix.  Without that variable this module does
nothing.  In the mock, the handler starts and the writes are what count: its last write
of an answer ends the burst the relays pass on.

It wraps a few aiohttp and chatmem functions to note, on the clock every process shares
(``perf_counter``): a request's handler starting (``h``), the POST upstream leaving
(``p``: chatmem's pool; ``w``: the first write of aiohttp's client), bytes from the
upstream arriving (``d``) and every write to a socket through aiohttp (``w``; ``W`` for
one that carries the response head and the first events together).  The list
is written as JSON when the process exits.
"""

from __future__ import annotations

import atexit
import json
import os
import time
from typing import Any

_PREFIX = os.environ.get("CHATMEM_TTFT_TRACE")


def _install(prefix: str) -> None:
    from aiohttp import client_proto, http_writer, web_protocol

    events: list[tuple[str, int]] = []
    now = time.perf_counter_ns

    def dump() -> None:
        with open(f"{prefix}.{os.getpid()}.json", "w") as out:
            json.dump(events, out)

    atexit.register(dump)

    def before(owner: Any, name: str, kind: str) -> None:
        original = getattr(owner, name)

        def noted(*args: Any, **kwargs: Any) -> Any:
            events.append((kind, now()))
            return original(*args, **kwargs)

        setattr(owner, name, noted)

    handle = web_protocol.RequestHandler._handle_request

    async def handle_request(*args: Any, **kwargs: Any) -> Any:
        events.append(("h", now()))
        return await handle(*args, **kwargs)

    web_protocol.RequestHandler._handle_request = handle_request  # type: ignore[method-assign]

    def written(owner: Any, name: str) -> None:
        """A write to a socket: ``W`` when it carries a response head and the first
        events together (chatmem sends them in one write when they arrived together),
        ``w`` otherwise."""
        original = getattr(owner, name)

        def noted(self: Any, data: Any, *args: Any, **kwargs: Any) -> Any:
            sent = data if isinstance(data, bytes | bytearray | memoryview) else b"".join(data)
            both = bytes(sent[:5]) == b"HTTP/" and b"\r\n\r\n" in sent and b"data:" in sent
            events.append(("W" if both else "w", now()))
            return original(self, data, *args, **kwargs)

        setattr(owner, name, noted)

    written(http_writer.StreamWriter, "_write")
    written(http_writer.StreamWriter, "_writelines")
    before(client_proto.ResponseHandler, "data_received", "d")
    try:
        from chatmem.proxy import pool
    except ImportError:  # the bare relay's path has no chatmem
        return
    before(pool._Connection, "send", "p")
    before(pool._Connection, "data_received", "d")


if _PREFIX:
    _install(_PREFIX)
