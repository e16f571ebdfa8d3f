"""Instructions the gateway executes per request, counted by callgrind.

    python -m benchmarks.instructions                  # 2,000 requests of 32 clients
    python -m benchmarks.instructions --src ../other/src   # another checkout, to compare
    python -m benchmarks.instructions --stream 64 --clients 1   # 64-token streams, one client

CPU time from ``/proc`` moves by about 5 % from run to run on a shared machine, too much
to see a change of 2 %.  Instructions do not depend on what else runs: the mock upstream
and the load generator run natively, ``chatmem serve`` (plain non-streaming requests, a
new conversation each, as ``plain c=32`` of ``benchmarks.run``) runs under
``valgrind --tool=callgrind``, which counts only while the measured requests run.  The
figure repeats to about 0.2 % (threads included, system calls and cache misses not:
compare like with like, then confirm with ``benchmarks.run``).  Under valgrind the
gateway is some 50 times slower, so its batches differ from a real run's; the count is a
yardstick for changes to the code, not a prediction of speed.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from yarl import URL

from chatmem.proxy.pool import UpstreamPool

from .procs import ROOT, chat_turn, free_port, start

__all__ = ["count"]

_CALLGRIND = ("valgrind", "--tool=callgrind", "--instr-atstart=no")
"""Counting starts switched off: the imports and the warm-up are not measured."""


async def _load(base: str, requests: int, clients: int, first: int, stream: int) -> None:
    """``requests`` chat turns from ``clients`` concurrent clients, each a new conversation;
    streamed answers of ``stream`` tokens, or plain answers of 16 when ``stream`` is 0."""
    pool = UpstreamPool(URL(base), connect_timeout=30, read_timeout=600)
    numbers = iter(range(first, first + requests))

    async def client() -> None:
        for number in numbers:
            await chat_turn(pool, f"bench-{number}", tokens=stream or 16, stream=bool(stream))

    try:
        await asyncio.gather(*(client() for _ in range(clients)))
    finally:
        await pool.close()


def _callgrind(pid: int, command: str) -> None:
    subprocess.run(["callgrind_control", command, str(pid)], check=True, capture_output=True)


def count(src: Path, requests: int, clients: int, stream: int = 0, warmup: int = 300) -> float:
    """Instructions per request of the gateway in ``src`` (a checkout's ``src``)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        upstream_port, gateway_port = free_port(), free_port()
        upstream = start(
            ["mock-upstream", "--port", str(upstream_port)],
            f"http://127.0.0.1:{upstream_port}/v1/models",
        )
        gateway = start(
            [
                "serve",
                "--port",
                str(gateway_port),
                "--upstream",
                f"http://127.0.0.1:{upstream_port}/v1",
                "--db",
                f"sqlite+aiosqlite:///{Path(tmp) / 'bench.db'}",
            ],
            f"http://127.0.0.1:{gateway_port}/v1/health",
            timeout=300,
            prefix=[*_CALLGRIND, f"--callgrind-out-file={out}"],
            pythonpath=f"{src}:{ROOT}",  # --src measures another checkout's gateway
        )
        base = f"http://127.0.0.1:{gateway_port}"
        try:
            asyncio.run(_load(base, warmup, clients, 0, stream))
            _callgrind(gateway.pid, "--instr=on")
            asyncio.run(_load(base, requests, clients, warmup, stream))
            _callgrind(gateway.pid, "--dump")
            _callgrind(gateway.pid, "--instr=off")
        finally:
            gateway.stop()
            upstream.stop()
        # One file per dump (and one at exit, when nothing was counted any more).
        total = 0
        for dump in Path(tmp).glob("callgrind.out*"):
            for line in dump.read_text().splitlines():
                if line.startswith("totals:"):
                    total += int(line.split()[1])
        return total / requests


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--stream", type=int, default=0, help="streamed answers of N tokens")
    parser.add_argument("--src", type=Path, default=ROOT / "src", help="the source to measure")
    args = parser.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("valgrind (with callgrind_control) is needed: apt-get install valgrind")
        return 2
    per_request = count(args.src.resolve(), args.requests, args.clients, args.stream)
    answers = f"{args.stream}-token streams" if args.stream else "plain answers"
    print(
        f"{per_request / 1e6:.3f} M instructions per request "
        f"({args.requests} requests, {args.clients} clients, {answers}, {args.src})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
