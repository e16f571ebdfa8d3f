"""Crash consistency: ``kill -9`` of a real ``chatmem serve`` in the middle of 50 concurrent
streams, restart on the same SQLite file: the store passes the integrity check, every turn
a client saw finish is there, no half turn is, and serving resumes with exact histories."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from helpers import SRC, Process, free_port

from chatmem.config import StorageConfig
from chatmem.storage import Store, create_engine
from chatmem.storage.integrity import check_integrity

STREAMS = 50


@pytest.fixture
def mock_url() -> Iterator[str]:
    port = free_port()
    mock = Process(["mock-upstream", "--port", str(port)])
    mock.wait_ready(f"http://127.0.0.1:{port}/v1/models")
    yield f"http://127.0.0.1:{port}/v1"
    mock.stop(signal.SIGINT)


def start_gateway(db: Path, upstream: str, port: int) -> Process:
    gateway = Process(
        ["serve", "--port", str(port), "--upstream", upstream, "--db", f"sqlite+aiosqlite:///{db}"]
    )
    gateway.wait_ready(f"http://127.0.0.1:{port}/v1/health")
    return gateway


def echo_tokens(text: str) -> str:
    """Enough mock tokens for the whole echo: "Echo", the words, "(n messages)"."""
    return str(len(text.split()) + 2)


async def chat(
    session: aiohttp.ClientSession,
    url: str,
    conv: str,
    text: str,
    *,
    stream: bool,
    headers: dict[str, str],
) -> aiohttp.ClientResponse:
    body = {"model": "m", "stream": stream, "messages": [{"role": "user", "content": text}]}
    return await session.post(
        f"{url}/chat/completions", json=body, headers={"X-Conversation-Id": conv, **headers}
    )


async def integrity(db: Path) -> list[str]:
    store = Store(create_engine(StorageConfig(url=f"sqlite+aiosqlite:///{db}")))
    try:
        return await check_integrity(store, chat_only=True)
    finally:
        await store.close()


def stored(db: Path, conv: str) -> list[tuple[str, Any]]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT m.role, m.content FROM messages m JOIN conversations c"
            " ON c.pk = m.conversation_pk WHERE c.id = ? ORDER BY m.seq",
            (conv,),
        ).fetchall()
    return [(role, json.loads(content)) for role, content in rows]


async def test_kill_9_mid_streams_then_restart(tmp_path: Path, mock_url: str) -> None:
    db = tmp_path / "crash.db"
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    gateway = start_gateway(db, mock_url, port)
    convs = [f"crash-{i}" for i in range(STREAMS)]
    quick = set(convs[::2])  # these answers finish before the kill; the others are cut by it
    saw_done: set[str] = set()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        for conv in convs:  # one completed turn each, before the crash
            text = f"before {conv}"
            tokens = {"X-Mock-Tokens": echo_tokens(text)}
            resp = await chat(session, url, conv, text, stream=False, headers=tokens)
            assert resp.status == 200
            await resp.read()

        started = asyncio.Event()
        first_events: set[str] = set()

        async def stream(conv: str) -> None:
            text = f"during {conv}"
            slow = {"X-Mock-Tokens": "400", "X-Mock-Delay-Ms": "20"}
            headers = {"X-Mock-Tokens": echo_tokens(text)} if conv in quick else slow
            try:
                async with await chat(
                    session, url, conv, text, stream=True, headers=headers
                ) as resp:
                    async for line in resp.content:
                        first_events.add(conv)
                        if len(first_events) == STREAMS:
                            started.set()
                        if line.startswith(b"data: [DONE]"):
                            saw_done.add(conv)
            except (TimeoutError, aiohttp.ClientError):
                pass  # the gateway was killed under this stream

        tasks = [asyncio.create_task(stream(conv)) for conv in convs]
        await asyncio.wait_for(started.wait(), 60)
        for _ in range(600):  # bounded: up to 30 s for the quick answers to end
            if saw_done >= quick:
                break
            await asyncio.sleep(0.05)
        assert saw_done == quick
        gateway.stop(signal.SIGKILL)
        await asyncio.wait_for(asyncio.gather(*tasks), 60)

    assert await integrity(db) == []
    check = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "chatmem", "db", "check", "--chat-only"],
        *["--db", f"sqlite+aiosqlite:///{db}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={"PYTHONPATH": SRC},
    )
    out, err = await asyncio.wait_for(check.communicate(), 60)
    assert check.returncode == 0, out + err
    for conv in convs:
        before = [("user", f"before {conv}"), ("assistant", f"Echo before {conv} (1 messages)")]
        during = [("user", f"during {conv}"), ("assistant", f"Echo during {conv} (3 messages)")]
        assert stored(db, conv) == (before + during if conv in quick else before)

    gateway = start_gateway(db, mock_url, port)
    try:
        async with aiohttp.ClientSession() as session:
            for conv in convs:
                text = f"after {conv}"
                tokens = {"X-Mock-Tokens": echo_tokens(text)}
                resp = await chat(session, url, conv, text, stream=True, headers=tokens)
                assert resp.status == 200
                assert (await resp.read()).endswith(b"data: [DONE]\n\n")
                seen = 5 if conv in quick else 3  # the stored messages plus the new one
                assert stored(db, conv)[-1] == ("assistant", f"Echo after {conv} ({seen} messages)")
    finally:
        assert gateway.stop(signal.SIGINT) == 0
    assert await integrity(db) == []
