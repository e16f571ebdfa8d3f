"""chatmem load test: many concurrent streaming chats, then a count of every stored turn.

    python -m benchmarks.load                       # 1000 streams across 100 conversations
    python -m benchmarks.load --streams 100 --conversations 10 --rounds 1

It starts the mock model (``chatmem mock-upstream``) and the gateway (``chatmem serve`` on
a fresh SQLite file) as real processes on 127.0.0.1, then runs ``--rounds`` rounds: in
each, every stream is started at once (``streams / conversations`` concurrent turns per
conversation, each round with conversations of its own so that rounds are the same
work), each reads its answer to the end. Afterwards it checks the database: each
conversation holds exactly its turns, every question once, each answer right after its
question and echoing it; and ``chatmem db check --chat-only`` finds nothing. The gateway's RSS is
sampled before, during (peak) and after each round, and after a pause at the end.
Results are printed and written as JSON (``--json``, default ``benchmarks/load.json``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from .procs import SRC, Proc, free_port, rss_mb, start

HERE = Path(__file__).resolve().parent


@dataclass
class Round:
    streams: int
    completed: int = 0
    failed: int = 0
    wall_s: float = 0.0
    rss_before_mb: float = 0.0
    rss_peak_mb: float = 0.0
    rss_after_mb: float = 0.0
    errors: list[str] = field(default_factory=list)


@dataclass
class Result:
    streams: int
    conversations: int
    rounds: list[Round]
    tokens: int
    delay_ms: float
    expected_turns: int = 0
    stored_turns: int = 0
    lost_turns: int = 0
    duplicated_turns: int = 0
    misplaced_answers: int = 0
    integrity_problems: list[str] = field(default_factory=list)
    rss_start_mb: float = 0.0
    rss_after_pause_mb: float = 0.0

    @property
    def ok(self) -> bool:
        return (
            all(r.failed == 0 and r.completed == r.streams for r in self.rounds)
            and self.lost_turns == 0
            and self.duplicated_turns == 0
            and self.misplaced_answers == 0
            and not self.integrity_problems
        )


def conversation_id(rnd: int, conv: int) -> str:
    """Each round has its own conversations, so rounds are the same work and RSS after
    one round can be compared with RSS after the next."""
    return f"load-r{rnd}-c{conv}"


def question(rnd: int, conv: int, k: int) -> str:
    return f"load round {rnd} conversation {conv} turn {k}"


async def _stream(
    session: aiohttp.ClientSession, url: str, conv: str, text: str, headers: dict[str, str]
) -> str | None:
    """One streaming turn read to the end; None if it completed, else what went wrong."""
    body = {"model": "load", "stream": True, "messages": [{"role": "user", "content": text}]}
    headers = {**headers, "X-Conversation-Id": conv}
    try:
        async with session.post(f"{url}/chat/completions", json=body, headers=headers) as resp:
            data = await resp.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        return f"{type(exc).__name__}: {exc}"
    if resp.status != 200:
        return f"status {resp.status}: {data[:200]!r}"
    if b'data: {"error"' in data or not data.endswith(b"data: [DONE]\n\n"):
        return f"incomplete stream: {data[-200:]!r}"
    return None


async def _sample_rss(pid: int, peak: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], rss_mb(pid))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.05)


async def run_round(
    url: str, gateway: Proc, rnd: int, streams: int, conversations: int, tokens: int, delay: float
) -> Round:
    result = Round(streams=streams, rss_before_mb=rss_mb(gateway.pid))
    per_conversation = streams // conversations
    headers = {"X-Mock-Delay-Ms": str(delay)}
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=600)
    peak = [result.rss_before_mb]
    stop = asyncio.Event()
    sampler = asyncio.create_task(_sample_rss(gateway.pid, peak, stop))
    started = time.monotonic()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        jobs = []
        for conv in range(conversations):
            for k in range(per_conversation):
                text = question(rnd, conv, k)
                # Enough tokens for the whole echo: "Echo", the words, "(n messages)".
                h = {**headers, "X-Mock-Tokens": str(max(tokens, len(text.split()) + 2))}
                jobs.append(_stream(session, url, conversation_id(rnd, conv), text, h))
        outcomes = await asyncio.gather(*jobs)
    result.wall_s = time.monotonic() - started
    stop.set()
    await sampler
    result.rss_peak_mb = peak[0]
    result.rss_after_mb = rss_mb(gateway.pid)
    result.completed = sum(1 for o in outcomes if o is None)
    result.failed = streams - result.completed
    result.errors = sorted({o for o in outcomes if o is not None})[:10]
    return result


def check_turns(db: Path, result: Result) -> None:
    """Count the stored turns against the questions that were asked."""
    per_conversation = result.streams // result.conversations
    result.expected_turns = per_conversation * result.conversations * len(result.rounds)
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT c.id, m.role, m.content FROM messages m JOIN conversations c"
            " ON c.pk = m.conversation_pk ORDER BY c.id, m.seq"
        ).fetchall()
    by_conversation: dict[str, list[tuple[str, Any]]] = {}
    for conv_id, role, content in rows:
        by_conversation.setdefault(conv_id, []).append((role, json.loads(content)))
    asked: list[str] = []
    for rnd in range(len(result.rounds)):
        for conv in range(result.conversations):
            stored = by_conversation.get(conversation_id(rnd, conv), [])
            for position in range(0, len(stored), 2):
                user, answer = stored[position], stored[position + 1 : position + 2]
                asked.append(user[1])
                adjacent = user[0] == "user" and answer and answer[0][0] == "assistant"
                own = str(user[1]).startswith(f"load round {rnd} conversation {conv} turn ")
                if not (adjacent and own and str(answer[0][1]).startswith(f"Echo {user[1]} (")):
                    result.misplaced_answers += 1
    expected = {
        question(rnd, conv, k)
        for rnd in range(len(result.rounds))
        for conv in range(result.conversations)
        for k in range(per_conversation)
    }
    result.stored_turns = len(asked)
    result.duplicated_turns = len(asked) - len(set(asked))
    result.lost_turns = len(expected - set(asked))
    result.misplaced_answers += len(set(asked) - expected)


def integrity(db: Path) -> list[str]:
    """``chatmem db check --chat-only`` on the database: the problems it prints, one a line."""
    check = subprocess.run(
        [
            *(sys.executable, "-m", "chatmem", "db", "check", "--chat-only"),
            *("--db", f"sqlite+aiosqlite:///{db}"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": SRC},
    )
    problems = check.stdout.splitlines()
    if check.returncode and not problems:
        problems = [f"db check exited {check.returncode}: {check.stderr.strip()}"]
    return problems


async def run(
    *,
    streams: int,
    conversations: int,
    rounds: int = 4,
    tokens: int = 16,
    delay_ms: float = 20.0,
    pause_s: float = 5.0,
    workdir: Path | None = None,
) -> Result:
    """Start the processes, run the rounds, check the database; everything is stopped after."""
    if streams % conversations:
        raise ValueError("streams must be a multiple of conversations")
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        db = Path(tmp) / "load.db"
        mock_port, gateway_port = free_port(), free_port()
        mock = start(
            ["mock-upstream", "--port", str(mock_port)],
            f"http://127.0.0.1:{mock_port}/v1/models",
        )
        try:
            gateway = start(
                [
                    *("serve", "--port", str(gateway_port)),
                    *("--upstream", f"http://127.0.0.1:{mock_port}/v1"),
                    *("--db", f"sqlite+aiosqlite:///{db}"),
                ],
                f"http://127.0.0.1:{gateway_port}/v1/health",
            )
            try:
                url = f"http://127.0.0.1:{gateway_port}/v1"
                result = Result(streams, conversations, [], tokens, delay_ms)
                result.rss_start_mb = rss_mb(gateway.pid)
                for rnd in range(rounds):
                    result.rounds.append(
                        await run_round(url, gateway, rnd, streams, conversations, tokens, delay_ms)
                    )
                await asyncio.sleep(pause_s)
                result.rss_after_pause_mb = rss_mb(gateway.pid)
            finally:
                gateway.stop()
        finally:
            mock.stop()
        check_turns(db, result)
        result.integrity_problems = integrity(db)
    return result


def report(result: Result) -> str:
    lines = [
        f"{result.streams} concurrent streams across {result.conversations} conversations,"
        f" {len(result.rounds)} round(s), {result.tokens} tokens at {result.delay_ms} ms",
    ]
    for i, r in enumerate(result.rounds):
        lines.append(
            f"  round {i}: {r.completed}/{r.streams} completed, {r.failed} failed,"
            f" {r.wall_s:.1f} s; gateway RSS before {r.rss_before_mb:.1f} MB,"
            f" peak {r.rss_peak_mb:.1f} MB, after {r.rss_after_mb:.1f} MB"
        )
        lines += [f"    error: {e}" for e in r.errors]
    lines += [
        f"  gateway RSS at start {result.rss_start_mb:.1f} MB,"
        f" after the pause {result.rss_after_pause_mb:.1f} MB",
        f"  turns: expected {result.expected_turns}, stored {result.stored_turns},"
        f" lost {result.lost_turns}, duplicated {result.duplicated_turns},"
        f" misplaced {result.misplaced_answers}",
        f"  integrity problems: {len(result.integrity_problems)}",
        f"  {'OK' if result.ok else 'FAILED'}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--conversations", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--delay-ms", type=float, default=20.0)
    parser.add_argument("--pause", type=float, default=5.0, help="seconds before the last RSS")
    parser.add_argument("--json", type=Path, default=HERE / "load.json")
    args = parser.parse_args(argv)
    result = asyncio.run(
        run(
            streams=args.streams,
            conversations=args.conversations,
            rounds=args.rounds,
            tokens=args.tokens,
            delay_ms=args.delay_ms,
            pause_s=args.pause,
        )
    )
    print(report(result))
    payload = {**asdict(result), "ok": result.ok}
    args.json.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"written to {args.json}")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
