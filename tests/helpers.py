"""Helpers shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import brotli  # type: ignore[import-untyped]
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from chatmem.config import Config, StorageConfig, load_config
from chatmem.mock_upstream import RECEIVED, ReceivedRequest
from chatmem.storage import Store, create_engine

GatewayFactory = Callable[..., Awaitable[TestClient[Any, Any]]]

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd

COMPRESS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": gzip.compress,
    "br": brotli.compress,
    "zstd": zstd.compress,
}
"""The ``Content-Encoding`` codings chatmem decodes, other than deflate, each one's
compressor."""

# This checkout's code, whichever copy of chatmem happens to be installed.
SRC = str(Path(__file__).resolve().parents[1] / "src")


def run_chatmem(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m chatmem <args>`` from this checkout, to completion."""
    return subprocess.run(
        [sys.executable, "-m", "chatmem", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={**(env if env is not None else os.environ), "PYTHONPATH": SRC},
    )


def upstream_url(server: TestServer) -> str:
    return str(server.make_url("/v1"))


async def realtime_upstream(aiohttp_server: Any, handler: Any) -> str:
    """The base URL of an upstream whose ``/v1/realtime`` is ``handler`` (a WebSocket's,
    for the relay's tests)."""
    app = web.Application()
    app.router.add_get("/v1/realtime", handler)
    server: TestServer = await aiohttp_server(app)
    return upstream_url(server)


def received(server: TestServer) -> list[ReceivedRequest]:
    """What the mock upstream received, oldest first."""
    return list(server.app[RECEIVED])


def make_config(db_path: Path, upstream_url: str, /, **sections: dict[str, Any]) -> Config:
    overrides: dict[str, dict[str, Any]] = {
        "upstream": {"url": upstream_url},
        "storage": {"url": f"sqlite+aiosqlite:///{db_path}"},
    }
    for name, values in sections.items():
        overrides[name] = {**overrides.get(name, {}), **values}
    return load_config(None, overrides=overrides, env={})


@dataclasses.dataclass
class Rows:
    path: Path

    def messages(self, conversation_id: str | None = None) -> list[dict[str, Any]]:
        query = (
            "SELECT c.id AS conversation, c.tenant, c.user_id, m.* FROM messages m "
            "JOIN conversations c ON c.pk = m.conversation_pk"
        )
        params: tuple[str, ...] = ()
        if conversation_id is not None:
            query += " WHERE c.id = ?"
            params = (conversation_id,)
        return self._all(query + " ORDER BY c.pk, m.seq", params)

    def conversations(self) -> list[dict[str, Any]]:
        return self._all("SELECT * FROM conversations ORDER BY pk", ())

    def _all(self, query: str, params: tuple[str, ...]) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with sqlite3.connect(self.path) as conn:
            conn.row_factory = sqlite3.Row
            return [dict(row) for row in conn.execute(query, params)]


def chunk(
    content: str | None = None,
    *,
    finish: str | None = None,
    role: str | None = None,
    index: int = 0,
    **delta: Any,
) -> dict[str, Any]:
    """One chat.completion.chunk object."""
    body: dict[str, Any] = dict(delta)
    if role is not None:
        body["role"] = role
    if content is not None:
        body["content"] = content
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "scripted",
        "choices": [{"index": index, "delta": body, "finish_reason": finish}],
    }


def chat_completion(
    message: dict[str, Any] | str | None, finish: str | None = "stop", **fields: Any
) -> dict[str, Any]:
    """A non-streamed answer of one choice: ``message``, or an assistant message of that
    text, finished with ``finish``; ``fields`` go beside ``choices`` (``usage``, say)."""
    if not isinstance(message, dict):
        message = {"role": "assistant", "content": message}
    choice = {"index": 0, "message": message, "finish_reason": finish}
    return {"id": "c", "object": "chat.completion", "model": "m", "choices": [choice], **fields}


def sse(payload: Any, newline: bytes = b"\n", space: bool = True) -> bytes:
    """One SSE event with the given line ending."""
    data = payload if isinstance(payload, str) else json.dumps(payload)
    prefix = b"data: " if space else b"data:"
    return prefix + data.encode() + newline + newline


def answer_events(text: str = "Hello world", newline: bytes = b"\n") -> list[bytes]:
    """A complete streamed answer: role, content in two pieces, finish, [DONE]."""
    half = len(text) // 2
    return [
        sse(chunk("", role="assistant"), newline),
        sse(chunk(text[:half]), newline),
        sse(chunk(text[half:]), newline),
        sse(chunk(finish="stop"), newline),
        sse("[DONE]", newline),
    ]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class Process:
    """A real ``python -m chatmem ...`` process, waited for until ``ready_url`` answers."""

    def __init__(
        self,
        args: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        prefix: tuple[str, ...] = (),
    ) -> None:
        self.args = args
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "chatmem", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": SRC, **(env or {})},
            cwd=cwd,
        )

    def wait_ready(self, url: str, timeout: float = 20.0) -> None:
        import time
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                _, err = self.proc.communicate()
                raise RuntimeError(f"{self.args} exited early: {err.decode()}")
            try:
                with urllib.request.urlopen(url, timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"{url} did not answer within {timeout}s")

    def stop(self, sig: int = 2, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except Exception:
            self.proc.kill()
            self.proc.wait(5)
            raise
        finally:
            for stream in (self.proc.stdout, self.proc.stderr):
                if stream is not None:
                    stream.close()


def strict_loads(body: bytes) -> Any:
    """Parse JSON, refusing a duplicate key (a wrong splice could add a second "messages")."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [key for key, _ in items]
        assert len(keys) == len(set(keys)), f"duplicate keys in {keys}"
        return dict(items)

    return json.loads(body, object_pairs_hook=pairs)


TOOL_CALL = [{"id": "t", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
EVERY_FIELD_TURN: list[dict[str, Any]] = [
    {"role": "user", "content": [{"type": "text", "text": "é \u2028"}], "name": "ann"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": TOOL_CALL,
        "reasoning": "r",
        "usage": {"total_tokens": 3},
        "model": "m",
        "finish_reason": "tool_calls",
    },
    {"role": "tool", "content": "42", "tool_call_id": "t"},
]
"""A turn that fills every stored column, for the tests that compare two storage paths."""


async def open_store(path_or_url: Path | str, *, one_hop: bool = True, **settings: Any) -> Store:
    """A Store on a SQLite file (a path) or any database URL, with its schema created."""
    url = path_or_url if isinstance(path_or_url, str) else f"sqlite+aiosqlite:///{path_or_url}"
    config = StorageConfig(url=url, **settings)
    # As the gateway builds it (state.py): the fast path's connections wait as long.
    store = Store(create_engine(config), busy_timeout_ms=config.busy_timeout_ms, direct=one_hop)
    await store.create_schema()
    return store


def sendable(message: dict[str, Any]) -> dict[str, Any]:
    """A generated ``message`` made one every chat server takes (a 400 otherwise, see
    test_chat_memory.py): content but for an assistant's, and a tool result names its
    call."""
    if message["role"] != "assistant" and message.get("content") is None:
        message["content"] = ""
    if message["role"] == "tool" and not message.get("tool_call_id"):
        message["tool_call_id"] = "call_0"
    return message
