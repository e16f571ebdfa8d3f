"""The kernel's share of a relay's CPU, and the system calls it makes per request.

    python -m benchmarks.syscalls                   # 20,000 requests of 32 clients, 3 rounds
    python -m benchmarks.syscalls --no-strace       # the user / system split only

``benchmarks.instructions`` counts the instructions run in user space only, and the
relays' CPU time in ``benchmarks.run`` is user and system time together.  This tool
splits it: plain chat turns (a new conversation each, as ``plain c=32``) go to chatmem
with memory and to the bare aiohttp relay in alternating rounds, and each round reads the
relay's user and system time from ``/proc``.  Then, with ``strace`` installed, one more
batch per relay runs under ``strace -c -f`` and the system calls are counted per request
(strace slows the relay down many times, so its times are not used, only its counts).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from yarl import URL

from chatmem.proxy.pool import UpstreamPool

from .procs import chat_turn
from .run import start_targets

__all__ = ["split", "syscalls"]

_TICK = os.sysconf("SC_CLK_TCK")
_SYSCALL_LINE = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$")
"""A row of ``strace -c``: % time, seconds, usecs/call, calls, [errors], syscall."""


def _user_system(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of ``pid`` (its threads included) so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / _TICK, int(fields[12]) / _TICK


async def _turns(base: str, requests: int, clients: int, first: int) -> None:
    """``requests`` plain chat turns from ``clients`` concurrent clients, each a new
    conversation (``bench-N`` from ``first`` on)."""
    pool = UpstreamPool(URL(base), connect_timeout=30, read_timeout=600)
    numbers = iter(range(first, first + requests))

    async def client() -> None:
        for number in numbers:
            await chat_turn(pool, f"bench-{number}", tokens=16, stream=False)

    try:
        await asyncio.gather(*(client() for _ in range(clients)))
    finally:
        await pool.close()


def split(
    targets: dict[str, tuple[str, int]], requests: int, clients: int, rounds: int
) -> dict[str, dict[str, float]]:
    """Per target (its base URL and relay pid): the medians over ``rounds`` alternating
    rounds of user and system microseconds per request."""
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in targets}
    first = 1_000_000
    for number in range(rounds):
        order = list(targets) if number % 2 == 0 else list(reversed(targets))
        for name in order:
            base, pid = targets[name]
            user0, system0 = _user_system(pid)
            asyncio.run(_turns(base, requests, clients, first))
            user1, system1 = _user_system(pid)
            first += requests
            samples[name].append(
                ((user1 - user0) / requests * 1e6, (system1 - system0) / requests * 1e6)
            )
    return {
        name: {
            "user_us": statistics.median(user for user, _ in values),
            "system_us": statistics.median(system for _, system in values),
        }
        for name, values in samples.items()
    }


def syscalls(base: str, pid: int, requests: int, clients: int, first: int) -> dict[str, float]:
    """System calls per request of the relay ``pid`` (its threads included) while it
    serves ``requests`` turns, counted by ``strace -c -f``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "strace.txt"
        tracer = subprocess.Popen(
            ["strace", "-c", "-f", "-p", str(pid), "-o", str(out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(1)  # attached to every thread before the first request
            asyncio.run(_turns(base, requests, clients, first))
        finally:
            tracer.terminate()
            tracer.wait(30)
        counts: dict[str, float] = {}
        for line in out.read_text().splitlines():
            match = _SYSCALL_LINE.match(line)
            if match is not None and match.group(2) != "total":
                counts[match.group(2)] = int(match.group(1)) / requests
        return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000, help="per round")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--strace-requests", type=int, default=5_000)
    parser.add_argument("--no-strace", action="store_true")
    args = parser.parse_args()
    traced = not args.no_strace
    if traced and shutil.which("strace") is None:
        print("strace is needed to count system calls (apt-get install strace), or --no-strace")
        return 2
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as running:
        started = start_targets(running, Path(tmp) / "bench.db")
        bare_base, bare = started.relays["bare"]
        targets = {
            "memory": (started.gateway_url.removesuffix("/v1"), started.gateway.pid),
            "bare": (bare_base.removesuffix("/v1"), bare.pid),
        }
        for base, _ in targets.values():  # warm-up: connections, caches, the JIT-less rest
            asyncio.run(_turns(base, 3_000, args.clients, 0))
        times = split(targets, args.requests, args.clients, args.rounds)
        print(f"{args.clients} clients, {args.rounds} alternating rounds of {args.requests}")
        print(f"{'target':<8} {'user us':>8} {'system us':>10} {'system share':>13}")
        for name, figures in times.items():
            user, system = figures["user_us"], figures["system_us"]
            print(f"{name:<8} {user:8.1f} {system:10.1f} {system / (user + system):13.1%}")
        if not traced:
            return 0
        counted = {
            name: syscalls(base, pid, args.strace_requests, args.clients, 10_000_000 * (i + 1))
            for i, (name, (base, pid)) in enumerate(targets.items())
        }
        names = sorted(
            {call for counts in counted.values() for call in counts},
            key=lambda call: -max(counts.get(call, 0.0) for counts in counted.values()),
        )
        print(f"\nsystem calls per request ({args.strace_requests} requests under strace -c -f)")
        print(f"{'call':<16}" + "".join(f"{name:>10}" for name in counted))
        for call in names:
            row = [counted[name].get(call, 0.0) for name in counted]
            if max(row) >= 0.01:
                print(f"{call:<16}" + "".join(f"{value:10.2f}" for value in row))
        totals = [sum(counts.values()) for counts in counted.values()]
        print(f"{'all':<16}" + "".join(f"{value:10.2f}" for value in totals))
    return 0


if __name__ == "__main__":
    sys.exit(main())
