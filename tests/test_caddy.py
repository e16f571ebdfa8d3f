"""The repository's Caddyfile with a real Caddy in front of a real ``chatmem serve``.

Caddy runs with its own HOME and XDG dirs under tmp_path, bound to 127.0.0.1 on free high
ports, admin API off, serving ``localhost`` with its internal CA (``CHATMEM_TLS=internal``);
the client trusts that CA's root certificate and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sqlite3
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from deploy_helpers import json_lines, serve
from helpers import answer_events, free_port
from scripted_upstream import Script, scripted_upstream

CADDYFILE = Path(__file__).resolve().parents[1] / "Caddyfile"


def caddy_binary() -> str:
    path = shutil.which("caddy")
    if path is None:
        pytest.fail("caddy is not installed: run scripts/test.sh (or apt-get install caddy)")
    return path


def caddy_env(tmp_path: Path, **values: str) -> dict[str, str]:
    home = tmp_path / "caddy-home"
    home.mkdir(exist_ok=True)
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "XDG_DATA_HOME": str(home / "data"),
        "XDG_CONFIG_HOME": str(home / "config"),
        **values,
    }


@pytest.mark.parametrize("tls", ["public", "internal"])
def test_caddy_validates_the_caddyfile(tmp_path: Path, tls: str) -> None:
    env = caddy_env(tmp_path, CHATMEM_DOMAIN="chat.example.com", CHATMEM_TLS=tls)
    result = subprocess.run(
        [caddy_binary(), "validate", "--config", str(CADDYFILE), "--adapter", "caddyfile"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "Valid configuration" in result.stdout + result.stderr


class Caddy:
    def __init__(self, tmp_path: Path, upstream_port: int, **env: str) -> None:
        self.port = free_port()
        self.http_port = free_port()
        self.env = caddy_env(
            tmp_path,
            CHATMEM_DOMAIN="localhost",
            CHATMEM_TLS="internal",
            CHATMEM_UPSTREAM=f"127.0.0.1:{upstream_port}",
            CHATMEM_BIND="127.0.0.1",
            CHATMEM_HTTP_PORT=str(self.http_port),
            CHATMEM_HTTPS_PORT=str(self.port),
            CADDY_ADMIN="off",
            **env,
        )
        self.root = Path(self.env["XDG_DATA_HOME"]) / "caddy/pki/authorities/local/root.crt"
        self.log = tmp_path / "caddy.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [caddy_binary(), "run", "--config", str(CADDYFILE), "--adapter", "caddyfile"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def url(self, path: str) -> str:
        return f"https://127.0.0.1:{self.port}{path}"

    def post(
        self, session: aiohttp.ClientSession, path: str, context: ssl.SSLContext, **kwargs: Any
    ) -> Any:
        """``session.post`` to ``path`` over HTTPS, trusting ``context`` for localhost."""
        return session.post(self.url(path), ssl=context, server_hostname="localhost", **kwargs)

    @contextlib.asynccontextmanager
    async def chat_stream(
        self, context: ssl.SSLContext, headers: dict[str, str]
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """A streamed chat turn ("hi") through Caddy, its response as it comes."""
        body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        async with (
            self.session() as session,
            self.post(
                session, "/v1/chat/completions", context, json=body, headers=headers
            ) as response,
        ):
            yield response

    async def status(self, path: str, context: ssl.SSLContext) -> int:
        """The status of ``GET path`` over HTTPS."""
        async with (
            self.session() as session,
            session.get(self.url(path), ssl=context, server_hostname="localhost") as response,
        ):
            return response.status

    def session(self) -> aiohttp.ClientSession:
        """A client for ``https://localhost:PORT`` (connecting to 127.0.0.1 only)."""
        return aiohttp.ClientSession(headers={"Host": f"localhost:{self.port}"})

    async def client_ssl(self) -> ssl.SSLContext:
        """Trust only Caddy's internal root, once Caddy has made it and serves with it."""
        for _ in range(600):  # bounded: Caddy makes its CA and the certificate at start
            if self.proc.poll() is not None:
                raise RuntimeError(f"caddy exited: {self.log.read_text()}")
            if self.root.exists():
                context = ssl.create_default_context(cafile=str(self.root))
                try:
                    async with (
                        self.session() as session,
                        session.get(
                            self.url("/v1/health"), ssl=context, server_hostname="localhost"
                        ) as response,
                    ):
                        # Caddy answers an empty 200 for hosts it does not serve: insist
                        # on chatmem's own answer.
                        if response.status == 200 and await response.read() == b'{"status": "ok"}':
                            return context
                except (aiohttp.ClientError, ssl.SSLError):
                    pass
            await asyncio.sleep(0.05)
        raise TimeoutError(f"caddy did not serve HTTPS: {self.log.read_text()}")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
async def release() -> AsyncIterator[asyncio.Event]:
    event = asyncio.Event()
    yield event
    event.set()


async def test_streams_and_memory_through_caddy_over_https(
    tmp_path: Path, release: asyncio.Event
) -> None:
    caddy_binary()
    first, *rest = answer_events("Hello world")
    script = Script(chunks=[first, release, *rest])
    async with scripted_upstream(script) as upstream:
        gateway = serve(
            tmp_path,
            upstream.url,
            '[server]\ntrusted_proxies = ["127.0.0.1/32", "::1/128"]\n\n'
            '[log]\nformat = "json"\naccess = true\n',
        )
        caddy = Caddy(tmp_path, gateway.port)
        try:
            context = await caddy.client_ssl()
            headers = {
                "X-Conversation-Id": "via-caddy",
                "X-Request-Id": "caddy-1",
                "X-Forwarded-For": "198.51.100.9",  # forged by the client: must be ignored
                "Accept-Encoding": "gzip, br",
            }
            async with caddy.chat_stream(context, headers) as response:
                assert response.status == 200
                assert "Content-Encoding" not in response.headers  # never compressed
                assert response.headers["X-Request-Id"] == "caddy-1"
                # The upstream is still holding the rest of the answer: this event came
                # through Caddy on its own, unbuffered.
                assert await response.content.readuntil(b"\n\n") == first
                assert not release.is_set()
                release.set()
                streamed = first + await response.content.read()
            assert streamed == b"".join(answer_events("Hello world"))

            # Memory through Caddy: the next turn carries the first one as history.
            upstream.script = Script(
                headers={"Content-Type": "application/json"},
                chunks=[json.dumps(_completion("Fine")).encode()],
                framing="length",
            )
            async with (
                caddy.session() as session,
                caddy.post(
                    session,
                    "/v1/chat/completions",
                    context,
                    json={"model": "m", "messages": [{"role": "user", "content": "again"}]},
                    headers={"X-Conversation-Id": "via-caddy"},
                ) as second,
            ):
                assert second.status == 200
                assert (await second.json())["choices"][0]["message"]["content"] == "Fine"
            sent = json.loads(upstream.requests[-1][3])
            assert sent["messages"] == [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "Hello world"},
                {"role": "user", "content": "again"},
            ]

            # The metrics endpoint is not published through Caddy.
            assert await caddy.status("/metrics", context) == 404

            # A passthrough request without Accept-Encoding reaches the upstream without
            # one: Caddy's HTTP client added "gzip" of its own (h55), asking the upstream
            # for a compressed body no client asked for.
            async with (
                aiohttp.ClientSession(
                    headers={"Host": f"localhost:{caddy.port}"},
                    skip_auto_headers=("Accept-Encoding",),
                ) as session,
                session.get(
                    caddy.url("/v1/models"), ssl=context, server_hostname="localhost"
                ) as models,
            ):
                assert models.status == 200
            _, path, up_headers, _ = upstream.requests[-1]
            assert path == "/v1/models"
            got = {name.lower(): value for name, value in up_headers.items()}
            assert "accept-encoding" not in got, got

            # Plain HTTP is redirected to HTTPS on its own port, the method kept (308).
            async with (
                aiohttp.ClientSession() as session,
                session.post(
                    f"http://127.0.0.1:{caddy.http_port}/v1/chat/completions?a=1",
                    headers={"Host": f"localhost:{caddy.http_port}"},
                    allow_redirects=False,
                ) as redirected,
            ):
                assert redirected.status == 308
                location = f"https://localhost:{caddy.port}/v1/chat/completions?a=1"
                assert redirected.headers["Location"] == location
        finally:
            caddy.stop()
            code, stderr = gateway.stop()
    assert code == 0, stderr
    [access] = [
        line
        for line in json_lines(stderr)
        if line.get("logger") == "chatmem.access" and line.get("request_id") == "caddy-1"
    ]
    # chatmem believed Caddy (a trusted proxy) about the client, and Caddy did not pass on
    # the address the client forged.
    assert access["client"] == "127.0.0.1"


async def test_a_client_that_leaves_through_caddy_gets_its_turn_dropped(
    tmp_path: Path, release: asyncio.Event
) -> None:
    # With `flush_interval -1` Caddy kept its request to chatmem running after the client
    # left, so chatmem read the answer to the end and committed a turn nobody received
    # (found by a probe): the upstream request must end, and nothing be stored.
    caddy_binary()
    first, *rest = answer_events("Hello world")
    async with scripted_upstream(Script(chunks=[first, release, *rest])) as upstream:
        gateway = serve(tmp_path, upstream.url, '[metrics]\npath = "/internal/metrics"\n')
        caddy = Caddy(tmp_path, gateway.port, CHATMEM_METRICS_PATH="/internal/metrics")
        try:
            context = await caddy.client_ssl()
            # Metrics moved: chatmem serves them there, and Caddy still keeps them private.
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"{gateway.url}/internal/metrics") as direct,
            ):
                assert direct.status == 200
            assert await caddy.status("/internal/metrics", context) == 404
            async with caddy.chat_stream(context, {"X-Conversation-Id": "left"}) as response:
                assert await response.content.readuntil(b"\n\n") == first
            # The client is gone with the answer unfinished; Caddy must tell chatmem, and
            # chatmem the upstream (bounded wait: a hang fails the test, it does not time it).
            await asyncio.wait_for(upstream.disconnected.wait(), timeout=30)
        finally:
            release.set()
            caddy.stop()
            code, stderr = gateway.stop()
    assert code == 0, stderr
    with sqlite3.connect(gateway.db) as db:
        assert db.execute("SELECT count(*) FROM messages").fetchone() == (0,)


async def test_caddy_bounds_a_body_that_trickles(tmp_path: Path) -> None:
    """The passthrough streams a body upstream as it comes, so chatmem's own bound on
    reading bodies does not hold there: Caddy's ``read_body`` does (1 s here, 60 s by
    default).  Before it, a client sending a byte now and then held both connections."""
    caddy_binary()
    async with scripted_upstream(Script(status=200)) as upstream:
        gateway = serve(tmp_path, upstream.url)
        caddy = Caddy(tmp_path, gateway.port, CHATMEM_READ_BODY="1s")
        try:
            context = await caddy.client_ssl()
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", caddy.port, ssl=context, server_hostname="localhost"
            )
            writer.write(
                b"POST /v1/embeddings HTTP/1.1\r\nHost: localhost\r\n"
                b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
            )
            sent = 0
            answer = b""
            while sent < 100:  # a byte every 0.1 s: 10 s at most
                sent += 1
                with contextlib.suppress(ConnectionError):
                    writer.write(b" ")
                    await writer.drain()
                with contextlib.suppress(TimeoutError):
                    answer = await asyncio.wait_for(reader.read(65536), 0.1)
                    break  # an answer, or the end of the connection
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()
        finally:
            caddy.stop()
            code, stderr = gateway.stop()
    assert code == 0, stderr
    assert sent < 60, answer  # cut off after about 1 s, not after the client's 10 s
    assert upstream.requests == [] or len(upstream.requests[0][3]) < 1000


def _completion(content: str) -> dict[str, object]:
    return {
        "id": "chatcmpl-2",
        "object": "chat.completion",
        "created": 1,
        "model": "scripted",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
    }
