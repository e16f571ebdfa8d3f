"""PostgreSQL stopped and started again under traffic, on a cluster of the test's own:
503s in the OpenAI error shape before anything goes upstream, recovery without a restart,
and no answered turn lost."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from helpers import Process, free_port, received, upstream_url
from pg import PrivateCluster, fetch

from chatmem.mock_upstream import create_mock_app

HEADER = "X-Conversation-Id"
ERROR_EVENT = b'data: {"error": '


@pytest.fixture
async def upstream(aiohttp_server: Any) -> TestServer:
    server: TestServer = await aiohttp_server(create_mock_app(tokens=64))
    return server


@pytest.fixture
async def gateway(
    private_postgres: PrivateCluster, upstream: TestServer, tmp_path: Path
) -> AsyncIterator[str]:
    config = tmp_path / "chatmem.toml"
    config.write_text("[storage]\npool_size = 3\nmax_overflow = 2\nconnect_timeout = 2\n")
    port = free_port()
    db, up = private_postgres.url, upstream_url(upstream)
    process = Process(
        ["serve", "--config", str(config), "--port", str(port), "--db", db, "--upstream", up]
    )
    process.wait_ready(f"http://127.0.0.1:{port}/v1/health")
    yield f"http://127.0.0.1:{port}"
    assert process.proc.poll() is None  # it never died, it was never restarted
    assert process.stop() == 0


@dataclass
class Outcome:
    words: str
    status: int
    body: bytes
    stream: bool

    @property
    def answered(self) -> bool:
        """The client got a whole answer (so the turn must be stored)."""
        if self.status != 200:
            return False
        if not self.stream:
            return True
        # A stream whose turn could not be saved has an error event before its [DONE].
        return self.body.rstrip().endswith(b"data: [DONE]") and ERROR_EVENT not in self.body


@dataclass
class Traffic:
    base: str
    outcomes: list[Outcome] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, session: aiohttp.ClientSession) -> None:
        i = 0
        while not self.stop.is_set():
            words = f"live turn {i}"
            stream = i % 4 == 3
            body = {
                "model": "m",
                "stream": stream,
                "messages": [{"role": "user", "content": words}],
            }
            async with session.post(
                f"{self.base}/v1/chat/completions", json=body, headers={HEADER: "live"}
            ) as resp:
                self.outcomes.append(Outcome(words, resp.status, await resp.read(), stream))
            i += 1
            await asyncio.sleep(0.02)

    async def wait_for(self, count: int, answered: bool) -> None:
        """Until ``count`` more requests were answered (or refused), bounded."""
        start = sum(o.answered == answered for o in self.outcomes)
        for _ in range(3000):
            if sum(o.answered == answered for o in self.outcomes) >= start + count:
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"traffic never saw {count} {'answers' if answered else 'errors'}")


async def post(session: aiohttp.ClientSession, base: str, words: str) -> tuple[int, Any]:
    body = {"model": "m", "messages": [{"role": "user", "content": words}]}
    async with session.post(
        f"{base}/v1/chat/completions", json=body, headers={HEADER: "steady"}
    ) as resp:
        return resp.status, await resp.json()


async def test_postgresql_stops_and_comes_back_under_traffic(
    gateway: str, private_postgres: PrivateCluster, upstream: TestServer
) -> None:
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        assert (await post(session, gateway, "before the outage"))[0] == 200
        traffic = Traffic(gateway)
        runner = asyncio.create_task(traffic.run(session))
        try:
            await traffic.wait_for(3, answered=True)
            await asyncio.to_thread(private_postgres.stop)
            await traffic.wait_for(3, answered=False)

            # Down: a clean 503 in the OpenAI shape, and the upstream is never asked.
            status, body = await post(session, gateway, "while it is down")
            assert status == 503
            assert body == {
                "error": {
                    "message": "the conversation store is unavailable",
                    "type": "server_error",
                    "param": None,
                    "code": "storage_unavailable",
                }
            }
            asked = [r.json for r in received(upstream)]
            assert not [m for m in asked if "while it is down" in json.dumps(m)]

            await asyncio.to_thread(private_postgres.start)
            await traffic.wait_for(3, answered=True)
        finally:
            traffic.stop.set()
            await runner

        # Back, with no restart: the conversation from before the outage continues.
        status, body = await post(session, gateway, "after the outage")
        assert status == 200
        sent = [r.json for r in received(upstream) if r.json]
        assert [m["content"] for m in sent[-1]["messages"]][::2] == [
            "before the outage",
            "after the outage",
        ]

    failures = [o for o in traffic.outcomes if not o.answered]
    assert failures, "the outage was never seen"
    for outcome in failures:
        # Refused up front (503 JSON) or, for a stream whose commit failed, an error
        # event saying so; never a 500.
        assert outcome.status in (200, 503), outcome
        if outcome.status == 503:
            assert json.loads(outcome.body)["error"]["code"] == "storage_unavailable"
        else:
            start = outcome.body.index(ERROR_EVENT) + len(b"data: ")
            error = json.loads(outcome.body[start:].split(b"\n\n")[0])["error"]
            assert error["message"].startswith("the answer could not be saved")
            # The type a non-streamed answer failing the same way has (the 503 above).
            assert (error["type"], error["code"]) == ("server_error", "storage_unavailable")

    rows = await fetch(
        private_postgres.url,
        "SELECT m.seq, m.role, m.content FROM messages m JOIN conversations c "
        "ON c.pk = m.conversation_pk WHERE c.id = 'live' ORDER BY m.seq",
    )
    assert [r["seq"] for r in rows] == list(range(1, len(rows) + 1))
    stored = [json.loads(r["content"]) for r in rows if r["role"] == "user"]
    assert [r["role"] for r in rows] == ["user", "assistant"] * len(stored)
    answered = [o.words for o in traffic.outcomes if o.answered]
    # Every answered turn is stored, once; nothing stored that nobody sent.
    assert set(answered) <= set(stored) <= {o.words for o in traffic.outcomes}
    assert len(stored) == len(set(stored))


async def test_connections_that_died_with_the_server_are_replaced(
    gateway: str, private_postgres: PrivateCluster
) -> None:
    # The gateway is idle while PostgreSQL restarts: the connections in its pool died
    # with the server, and the next request must get new ones, not a 503.
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        for n in range(4):  # concurrent turns, so the pool holds several connections
            results = await asyncio.gather(
                *(post(session, gateway, f"warm {n}.{i}") for i in range(3))
            )
            assert [status for status, _ in results] == [200, 200, 200]
        await asyncio.to_thread(private_postgres.stop)
        await asyncio.to_thread(private_postgres.start)
        for n in range(6):
            status, body = await post(session, gateway, f"after the restart {n}")
            assert status == 200, body
