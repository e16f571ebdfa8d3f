"""Where the time to first token goes, step by step: the bare relay next to chatmem.

    python -m benchmarks.ttft                     # 5 rounds of 300 streams per target
    python -m benchmarks.ttft --pin c=0,r=0,m=1   # client and relay on core 0, mock on 1
    python -m benchmarks.ttft --tokens 1          # answers of one token: no burst after it
    python -m benchmarks.ttft --tokens 16 --delay-ms 1   # tokens 1 ms apart, like a model
    python -m benchmarks.ttft --sched             # and who the client waits behind (perf)
    python -m benchmarks.ttft --slice c=100       # the client's scheduler slice at 0.1 ms

One client streams 64-token answers from the mock upstream, alternating between three
targets as ``benchmarks.run`` does: direct, the bare aiohttp relay and chatmem with
memory (a new conversation each time).  The relays run with ``benchmarks/ttft_hooks`` on
their path, which notes when a request's handler starts, when the POST leaves, when the
upstream's head arrives, when the response head is written and when the first token is;
the load generator notes when it sent and when the first bytes of the body came back.
All on ``perf_counter``, the system's monotonic clock, shared by every process.

``--think MS`` waits between two requests, so that every process has gone idle.
``--tokens`` and ``--delay-ms`` shape the answers (the mock's ``X-Mock-Tokens`` and
``X-Mock-Delay-Ms``): by default 64 tokens with no pause, whose burst after the first
token keeps both cores busy while the client is being woken.
``--pin`` puts the client (``c``), the relays (``r``) and the mock (``m``), every
thread of each, on given cores (``sched_setaffinity``), to show how much the kernel's
placement of the three processes on two cores decides.
``--sched`` records the scheduler while measuring (``benchmarks.waits``): how long the
client waited for a core once the response head was written, and behind which process.
``--slice`` gives the client, the relays or the mock, every thread of each, a scheduler
slice of its own in us (``benchmarks.slices``; Linux 6.12 and later): a woken task takes
a busy core at once only if its slice is shorter than that of the task running there.

The mock runs with the same hooks, so the tool also says, for each target, how often the
client had the answer's first bytes only after the mock had written the last of them
(the end of its burst), and each round's median: when the kernel leaves the client no
core while the mock bursts and the relay relays, the client waits for the burst to end,
and that goes by rounds, not streams.  With ``--slice c=100`` it no longer waits: a woken
client with a slice shorter than the busy task's takes the core at once.  (Since
8f42411 ``benchmarks.run`` gives its load generator that slice by default; this tool
leaves every process the kernel's own unless ``--slice`` says otherwise.)
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import uvloop
from yarl import URL

from chatmem.proxy.pool import UpstreamPool

from . import waits
from .procs import ROOT, SRC, free_port, start
from .slices import set_process_slice_ns

__all__ = ["main"]

_HOOKS = str(ROOT / "benchmarks" / "ttft_hooks")
_TARGETS = ("direct", "bare", "memory")
_STEPS = (
    "client sends -> handler starts",
    "handler -> POST upstream",
    "POST -> upstream head in",
    "upstream head -> response head out",
    "response head out -> first token out",
    "first token out -> client has it",
)

Sent = tuple[int, int, int]
"""A request as the client saw it: sent, first body bytes in (ns), round."""


async def _run(
    bases: dict[str, str], rounds: int, requests: int, think: float, answer: dict[str, str]
) -> dict[str, list[Sent]]:
    pools = {
        target: UpstreamPool(URL(base), connect_timeout=30, read_timeout=300)
        for target, base in bases.items()
    }
    seen: dict[str, list[Sent]] = {t: [] for t in bases}
    number = 0
    try:
        for rnd in range(rounds + 1):  # round 0 warms up
            order = _TARGETS if rnd % 2 else _TARGETS[::-1]
            for target in order:
                for _ in range(requests):
                    number += 1
                    headers = {"Content-Type": "application/json", **answer}
                    if target == "memory":
                        headers["X-Conversation-Id"] = f"ttft-{number}"
                    body = json.dumps(
                        {
                            "model": "bench",
                            "messages": [{"role": "user", "content": f"question {number}"}],
                            "stream": True,
                        }
                    ).encode()
                    if think:
                        await asyncio.sleep(think)
                    sent = time.perf_counter_ns()
                    async with await pools[target].post(
                        "/v1/chat/completions", headers, body
                    ) as response:
                        first = 0
                        async for _chunk in response.content.iter_any():
                            first = first or time.perf_counter_ns()
                    seen[target].append((sent, first, rnd))
    finally:
        for pool in pools.values():
            await pool.close()
    return seen


def _inside(trace: Path) -> list[tuple[int, int, int, int, int]]:
    """(handler, POST, upstream head, response head, first body write) of each relayed
    stream, in order."""
    events: list[tuple[str, int]] = json.loads(trace.read_text())
    requests: list[list[tuple[str, int]]] = []
    for kind, at in events:
        if kind == "h":
            requests.append([])
        if requests:
            requests[-1].append((kind, at))
    found = []
    for steps in requests:
        handler = steps[0][1]
        rest = steps[1:]
        post = next((i for i, (kind, _) in enumerate(rest) if kind in "pwW"), None)
        if post is None:
            continue  # a health check
        head = next((i for i in range(post + 1, len(rest)) if rest[i][0] == "d"), None)
        if head is None:
            continue
        out = next((i for i in range(head + 1, len(rest)) if rest[i][0] in "wW"), None)
        if out is None:
            continue
        if rest[out][0] == "W":  # the head and the first token in one write
            token = out
        else:
            token = next((i for i in range(out + 1, len(rest)) if rest[i][0] in "wW"), out)
        found.append((handler, rest[post][1], rest[head][1], rest[out][1], rest[token][1]))
    return found


def _named(spec: str, procs: dict[str, list[int]]) -> Iterator[tuple[int, str]]:
    """(pid, value) for every process that ``spec`` (``c=V,r=V,m=V``) names."""
    for part in spec.split(","):
        who, _, value = part.partition("=")
        for pid in procs.get(who, []):
            yield pid, value


def _pin(spec: str, procs: dict[str, list[int]]) -> None:
    """Pin every thread of the processes ``spec`` names (``c``, ``r``, ``m``) to its cores;
    threads started later inherit it from the thread that starts them."""
    for pid, cores in _named(spec, procs):
        cpus = {int(core) for core in cores.split("+")}
        for task in Path(f"/proc/{pid}/task").iterdir():
            os.sched_setaffinity(int(task.name), cpus)


def _slice(spec: str, procs: dict[str, list[int]]) -> None:
    """Give every thread of the processes ``spec`` names (``c``, ``r``, ``m``) a scheduler
    slice of that many us; threads started later inherit it."""
    for pid, micros in _named(spec, procs):
        set_process_slice_ns(pid, round(float(micros) * 1000))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=300, help="streams per target a round")
    parser.add_argument("--pin", help="c=CORE,r=CORE,m=CORE (cores joined by +)")
    parser.add_argument("--think", type=float, default=0.0, help="ms between two requests")
    parser.add_argument("--tokens", type=int, default=64, help="tokens an answer")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="ms between two tokens")
    parser.add_argument(
        "--sched", action="store_true", help="also record the scheduler (perf) while measuring"
    )
    parser.add_argument("--slice", help="c=US,r=US,m=US: scheduler slices (Linux 6.12+)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as running:
        up, gw, bp = free_port(), free_port(), free_port()
        os.environ["CHATMEM_TTFT_TRACE"] = f"{tmp}/trace"
        hooked = f"{_HOOKS}:{SRC}"
        try:
            mock = start(
                ["mock-upstream", "--port", str(up)],
                f"http://127.0.0.1:{up}/v1/models",
                pythonpath=hooked,
            )
            running.callback(mock.stop)
            gateway = start(
                [
                    *("serve", "--port", str(gw), "--upstream", f"http://127.0.0.1:{up}/v1"),
                    *("--db", f"sqlite+aiosqlite:///{tmp}/ttft.db"),
                ],
                f"http://127.0.0.1:{gw}/v1/health",
                pythonpath=hooked,
            )
            running.callback(gateway.stop)
            bare = start(
                [f"http://127.0.0.1:{up}", str(bp)],
                f"http://127.0.0.1:{bp}/health",
                module="benchmarks.bare_hop",
                pythonpath=hooked,
            )
            running.callback(bare.stop)
        finally:
            del os.environ["CHATMEM_TTFT_TRACE"]
        procs = {"c": [os.getpid()], "r": [bare.pid, gateway.pid], "m": [mock.pid]}
        if args.pin:
            _pin(args.pin, procs)
        if args.slice:
            _slice(args.slice, procs)
        bases = {
            "direct": f"http://127.0.0.1:{up}/v1",
            "bare": f"http://127.0.0.1:{bp}/v1",
            "memory": f"http://127.0.0.1:{gw}/v1",
        }
        gc.freeze()
        answer = {"X-Mock-Tokens": str(args.tokens), "X-Mock-Delay-Ms": str(args.delay_ms)}
        sched = Path(tmp) / "sched.data"
        recorder = _record_scheduler(sched) if args.sched else None
        seen = uvloop.run(_run(bases, args.rounds, args.requests, args.think / 1000, answer))
        if recorder is not None:
            recorder.send_signal(signal.SIGINT)
            recorder.wait(60)
        running.close()  # the relays and the mock write their traces as they exit
        relays = {"bare": bare, "memory": gateway}
        _report(seen, {t: Path(f"{tmp}/trace.{p.pid}.json") for t, p in relays.items()})
        _report_bursts(seen, _burst_ends(Path(f"{tmp}/trace.{mock.pid}.json")))
        if recorder is not None:
            pids = {name: proc.pid for name, proc in relays.items()}
            waits.print_head_waits(sched, os.getpid(), mock.pid, pids)
    return 0


def _record_scheduler(output: Path) -> subprocess.Popen[bytes]:
    recorder = subprocess.Popen(
        waits.record_command(output), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    time.sleep(1)  # perf is recording once it has set up its buffers
    if recorder.poll() is not None:
        raise SystemExit("--sched needs perf (Debian's linux-perf) and leave to trace")
    return recorder


def _report(seen: dict[str, list[Sent]], traces: dict[str, Path]) -> None:
    def median_of_rounds(samples: list[Sent], value: int) -> float:
        by_round: dict[int, list[float]] = {}
        for sample in samples:
            if sample[2]:
                by_round.setdefault(sample[2], []).append((sample[value] - sample[0]) / 1e3)
        return statistics.median(statistics.median(v) for v in by_round.values())

    direct = median_of_rounds(seen["direct"], 1)
    print(f"time to first token, us (median of the rounds' medians; direct {direct:.0f}):")
    for target in ("bare", "memory"):
        ttft = median_of_rounds(seen[target], 1)
        print(f"  {target:<7} {ttft:6.0f}   added {ttft - direct:4.0f}")
    print(f"\n{'step, us (medians)':<40}{'bare':>8}{'memory':>8}")
    columns = {}
    for target, trace in traces.items():
        inside = _inside(trace)[-len(seen[target]) :]
        steps: list[list[float]] = [[] for _ in _STEPS]
        for (sent, first, rnd), points in zip(seen[target], inside, strict=True):
            if not rnd:
                continue
            marks = (sent, *points, first)
            for i in range(len(_STEPS)):
                steps[i].append((marks[i + 1] - marks[i]) / 1e3)
        columns[target] = [statistics.median(step) for step in steps]
    for i, step in enumerate(_STEPS):
        print(f"  {step:<38}{columns['bare'][i]:8.0f}{columns['memory'][i]:8.0f}")


def _burst_ends(trace: Path) -> list[tuple[int, int]]:
    """(handler start, last write) of each request the mock answered, in order."""
    events: list[tuple[str, int]] = json.loads(trace.read_text())
    answered: list[tuple[int, int]] = []
    for kind, at in events:
        if kind == "h":
            answered.append((at, at))
        elif answered and kind in "wW":
            answered[-1] = (answered[-1][0], at)
    return answered


def _report_bursts(seen: dict[str, list[Sent]], answered: list[tuple[int, int]]) -> None:
    """For each target, how often the client's first bytes came after the mock's last
    write of that answer, and each round's median time to first token: one client asks
    one thing at a time, so the mock's first request after a stream was sent is its."""
    starts = [start for start, _ in answered]
    print("\nthe client's first bytes after the mock's burst had ended (the burst: the mock's")
    print("writes of one answer), and the time to first token of each round, us:")
    for target in ("direct", "bare", "memory"):
        after = total = 0
        by_round: dict[int, list[float]] = {}
        for sent, first, rnd in seen[target]:
            at = bisect.bisect_left(starts, sent)
            if not rnd or at == len(answered):
                continue
            total += 1
            after += first > answered[at][1]
            by_round.setdefault(rnd, []).append((first - sent) / 1e3)
        medians = " ".join(f"{statistics.median(v):.0f}" for v in by_round.values())
        print(f"  {target:<7} after the burst in {after:4} of {total:4}; rounds: {medians}")


if __name__ == "__main__":
    sys.exit(main())
