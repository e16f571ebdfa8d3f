"""Two real gateway processes on one real PostgreSQL database behave as one gateway."""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from helpers import Process, free_port, received, upstream_url
from pg import connect, fetch

from chatmem.mock_upstream import create_mock_app
from chatmem.storage.migrate import head_revision

HEADER = "X-Conversation-Id"


@pytest.fixture
async def upstream(aiohttp_server: Any) -> TestServer:
    """The mock model, answering with enough tokens to show the message count."""
    server: TestServer = await aiohttp_server(create_mock_app(tokens=64))
    return server


def start_gateways(
    count: int, db_url: str, upstream: str, config: Path | None = None
) -> list[tuple[Process, str]]:
    """``count`` ``chatmem serve`` processes, all started before any is waited for (so
    they race for the empty database's migration, as instances started together do)."""
    started = []
    for _ in range(count):
        port = free_port()
        args = ["serve", "--port", str(port), "--db", db_url, "--upstream", upstream]
        if config is not None:
            args += ["--config", str(config)]
        started.append((Process(args), f"http://127.0.0.1:{port}"))
    for process, base in started:
        process.wait_ready(f"{base}/v1/health")
    return started


@pytest.fixture
def instances(pg_url: str, upstream: TestServer) -> Iterator[list[tuple[Process, str]]]:
    started = start_gateways(2, pg_url, upstream_url(upstream))
    yield started
    for process, _ in started:
        assert process.stop() == 0


@pytest.fixture
def gateways(instances: list[tuple[Process, str]]) -> list[str]:
    """The base URLs of two instances on one database."""
    return [base for _, base in instances]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        yield session


def sse_text(body: bytes) -> str:
    """The assistant text of a streamed answer (which must end with [DONE])."""
    events = [e for e in body.decode().split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "data: [DONE]", body
    text = ""
    for event in events[:-1]:
        for choice in json.loads(event[len("data: ") :])["choices"]:
            text += choice["delta"].get("content") or ""
    return text


async def chat(
    http: aiohttp.ClientSession, base: str, conversation: str, words: str, stream: bool
) -> str:
    """One turn; returns the assistant's text."""
    body = {"model": "m", "stream": stream, "messages": [{"role": "user", "content": words}]}
    async with http.post(
        f"{base}/v1/chat/completions", json=body, headers={HEADER: conversation}
    ) as resp:
        raw = await resp.read()
        assert resp.status == 200, raw
        assert resp.headers[HEADER] == conversation
    if stream:
        return sse_text(raw)
    return str(json.loads(raw)["choices"][0]["message"]["content"])


def sent_for(upstream: TestServer, words: str) -> list[dict[str, Any]]:
    """The messages the upstream was sent with the turn whose user text is ``words``."""
    matches = [
        r.json["messages"]
        for r in received(upstream)
        if r.json and r.json["messages"][-1]["content"] == words
    ]
    assert len(matches) == 1, words
    messages: list[dict[str, Any]] = matches[0]
    return messages


async def test_both_instances_migrated_the_empty_database_once(
    gateways: list[str], pg_url: str
) -> None:
    assert await fetch(pg_url, "SELECT version_num FROM alembic_version") == [
        {"version_num": head_revision()}
    ]


async def test_turns_alternate_and_interleave_between_instances(
    gateways: list[str], upstream: TestServer, http: aiohttp.ClientSession, pg_url: str
) -> None:
    """Three conversations, each turn served by the other instance than the last; each
    turn's upstream request carries exactly the turns before it, whoever served them."""
    expected: dict[str, list[dict[str, Any]]] = {"c1": [], "c2": [], "c3": []}
    step = 0
    for round_ in range(4):
        for name, history in expected.items():
            words = f"{name} round {round_}"
            base = gateways[step % 2]
            step += 1
            answer = await chat(http, base, name, words, stream=step % 3 == 0)
            user = {"role": "user", "content": words}
            assert sent_for(upstream, words) == [*history, user]
            assert answer.startswith(f"Echo {words}")
            assert f"({len(history) + 1} messages)" in answer
            history += [user, {"role": "assistant", "content": answer}]
    rows = await fetch(
        pg_url,
        "SELECT c.id, m.seq, m.role, m.content FROM messages m "
        "JOIN conversations c ON c.pk = m.conversation_pk ORDER BY c.id, m.seq",
    )
    for name, history in expected.items():
        mine = [r for r in rows if r["id"] == name]
        assert [r["seq"] for r in mine] == list(range(1, 9))
        assert [{"role": r["role"], "content": json.loads(r["content"])} for r in mine] == history


async def test_fifty_simultaneous_turns_on_one_conversation(
    gateways: list[str], upstream: TestServer, http: aiohttp.ClientSession, pg_url: str
) -> None:
    """50 turns of one conversation at once, alternating between the two instances and
    between streaming and not: all answered, all stored once, each turn adjacent, seq
    unique and gap-free, and every turn saw a history made only of whole turns that is
    a prefix of the final one."""
    words = [f"turn {i} of fifty" for i in range(50)]
    order = list(range(50))
    random.Random(6).shuffle(order)
    answers = await asyncio.gather(
        *(chat(http, gateways[i % 2], "busy", words[i], stream=i % 3 == 0) for i in order)
    )
    answer_of = {words[i]: answer for i, answer in zip(order, answers, strict=True)}
    rows = await fetch(
        pg_url,
        "SELECT m.seq, m.role, m.content FROM messages m "
        "JOIN conversations c ON c.pk = m.conversation_pk WHERE c.id = 'busy' ORDER BY m.seq",
    )
    assert [r["seq"] for r in rows] == list(range(1, 101))
    assert await fetch(pg_url, "SELECT last_seq FROM conversations") == [{"last_seq": 100}]
    stored = [{"role": r["role"], "content": json.loads(r["content"])} for r in rows]
    users = [m["content"] for m in stored[::2]]
    assert sorted(users) == sorted(words)  # each turn exactly once
    for user, assistant in zip(stored[::2], stored[1::2], strict=True):
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert assistant["content"] == answer_of[user["content"]]
    for text in words:
        sent = sent_for(upstream, text)
        assert sent[:-1] == stored[: len(sent) - 1]
        assert len(sent) % 2 == 1


async def test_a_turn_committed_on_one_is_read_by_the_next_request_on_the_other(
    gateways: list[str], upstream: TestServer, http: aiohttp.ClientSession
) -> None:
    """Read-your-writes across instances, for streaming too: [DONE] is released only
    after the commit, so the other instance's very next read sees the turn."""
    for i in range(10):
        await chat(http, gateways[i % 2], "ping-pong", f"hop {i}", stream=True)
        assert len(sent_for(upstream, f"hop {i}")) == 2 * i + 1


async def test_cancelled_requests_leave_no_connection_behind(
    pg_url: str, upstream: TestServer, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """Clients that give up while their history query waits for a lock: the gateway
    (pool of 2) cancels the queries, returns its connections, and serves the next turn;
    PostgreSQL shows no chatmem session left active or idle in a transaction."""
    config = tmp_path / "chatmem.toml"
    config.write_text("[storage]\npool_size = 2\nmax_overflow = 0\npool_timeout = 5\n")
    [(process, base)] = start_gateways(1, pg_url, upstream_url(upstream), config)
    try:
        await chat(http, base, "c", "warm up", stream=False)
        locker = await connect(pg_url)
        await locker.execute("BEGIN; LOCK TABLE messages IN ACCESS EXCLUSIVE MODE")
        clients = [
            asyncio.create_task(chat(http, base, "c", f"gave up {i}", stream=i % 2 == 0))
            for i in range(6)
        ]
        for _ in range(600):
            waiting = await fetch(
                pg_url,
                "SELECT count(*) AS n FROM pg_stat_activity WHERE application_name = 'chatmem'"
                " AND datname = current_database() AND wait_event_type = 'Lock'",
            )
            if waiting[0]["n"] == 2:
                break
            await asyncio.sleep(0.05)
        assert waiting[0]["n"] == 2  # the pool's two connections, stuck in the query
        for client in clients:
            client.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
        for _ in range(600):  # the gateway noticed and cancelled both queries
            waiting = await fetch(
                pg_url,
                "SELECT count(*) AS n FROM pg_stat_activity WHERE application_name = 'chatmem'"
                " AND datname = current_database() AND state <> 'idle'",
            )
            if waiting[0]["n"] == 0:
                break
            await asyncio.sleep(0.05)
        await locker.execute("COMMIT")
        await locker.close()
        assert waiting[0]["n"] == 0
        await chat(http, base, "c", "after", stream=False)
        assert len(sent_for(upstream, "after")) == 3  # warm-up turn + the new message
        assert not [r for r in received(upstream) if "gave up" in json.dumps(r.json)]
        sessions = await fetch(
            pg_url,
            "SELECT state FROM pg_stat_activity WHERE application_name = 'chatmem'"
            " AND datname = current_database()",
        )
        assert len(sessions) <= 2 and {s["state"] for s in sessions} <= {"idle"}
    finally:
        assert process.stop() == 0


README = Path(__file__).resolve().parents[1] / "README.md"


def caddyfile(port: int, backends: list[str]) -> str:
    """The README's "Scaling out" Caddyfile, verbatim but for the addresses, on
    127.0.0.1 without TLS and without the admin API (tests run side by side)."""
    readme = README.read_text()
    section = readme[readme.index("## Scaling out") :]
    block = section[section.index("```caddy\n") + len("```caddy\n") :]
    block = block[: block.index("```")]
    hosts = " ".join(backend.removeprefix("http://") for backend in backends)
    block = block.replace("chat.example.com", f"http://127.0.0.1:{port}")
    block = block.replace("10.0.0.11:7001 10.0.0.12:7001 10.0.0.13:7001", hosts)
    assert hosts in block and str(port) in block
    return "{\n\tadmin off\n\tauto_https off\n}\n" + block


def start_caddy(gateways: list[str], tmp_path: Path) -> tuple[str, subprocess.Popen[bytes]]:
    """Caddy on a free port, answering (checked by its Server header: on a busy machine
    the port can be taken between choosing and binding it, and then Caddy exits)."""
    caddy = shutil.which("caddy")
    if caddy is None:
        pytest.fail("caddy is not installed (scripts/test.sh installs it)")
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)}
    for attempt in range(3):
        port = free_port()
        config = tmp_path / f"Caddyfile.{attempt}"
        config.write_text(caddyfile(port, gateways))
        with (tmp_path / f"caddy.{attempt}.log").open("wb") as log:
            proc = subprocess.Popen(
                [caddy, "run", "--config", str(config), "--adapter", "caddyfile"],
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=env,
            )
        base = f"http://127.0.0.1:{port}"
        for _ in range(400):
            if proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"{base}/v1/health", timeout=1) as resp:
                    if resp.headers.get("Server") == "Caddy":
                        return base, proc
            except OSError:
                pass
            time.sleep(0.05)
        proc.terminate()
        proc.wait(10)
    pytest.fail(f"caddy did not start; see {tmp_path}/caddy.*.log")


@pytest.fixture
def caddy_in_front(
    gateways: list[str], tmp_path: Path
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    base, proc = start_caddy(gateways, tmp_path)
    try:
        yield base, proc
    finally:
        proc.terminate()
        proc.wait(10)


async def test_behind_caddy_round_robin_and_an_instance_going_away(
    caddy_in_front: tuple[str, subprocess.Popen[bytes]],
    instances: list[tuple[Process, str]],
    upstream: TestServer,
    http: aiohttp.ClientSession,
    pg_url: str,
) -> None:
    """The README's Caddy configuration over both instances: turns alternate between
    them, and when one stops, Caddy sends the rest to the other; no turn is lost and
    each sees all the earlier ones."""
    base, caddy = caddy_in_front
    for i in range(6):
        await chat(http, base, "via-caddy", f"hop {i}", stream=i % 2 == 0)
        assert len(sent_for(upstream, f"hop {i}")) == 2 * i + 1
    # Take the first instance away (its port now refuses connections).
    assert instances[0][0].stop() == 0
    for i in range(6, 16):  # least_conn picks at random among idle instances
        await chat(http, base, "via-caddy", f"hop {i}", stream=i % 2 == 0)
        assert len(sent_for(upstream, f"hop {i}")) == 2 * i + 1
    rows = await fetch(
        pg_url,
        "SELECT m.seq FROM messages m JOIN conversations c ON c.pk = m.conversation_pk "
        "WHERE c.id = 'via-caddy' ORDER BY m.seq",
    )
    assert [r["seq"] for r in rows] == list(range(1, 33))
    assert caddy.poll() is None
