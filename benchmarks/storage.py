"""The gateway on SQLite next to the gateway on PostgreSQL.

    createdb chatmem_bench    # once: an empty database the gateway may fill
    python -m benchmarks.storage --db 'postgresql+asyncpg://user@/chatmem_bench?host=/var/run/postgresql'

Starts the mock upstream and ``chatmem serve`` once per database (a fresh SQLite file,
then each ``--db``), with the configuration's defaults, and measures three scenarios of
``benchmarks.run`` against it: plain turns at 1 and 32 clients and 64-token streams at
one client, each a new conversation.  Prints p50 latency, turns a second and the
gateway's CPU time per turn.  ``benchmarks.run`` remains the benchmark against a direct
connection; this one shows what the choice of database costs.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import uvloop
from yarl import URL

from chatmem.proxy.pool import UpstreamPool

from .procs import chat_turn, cpu_seconds, free_port, start

__all__ = ["main"]


@dataclass(frozen=True)
class Scenario:
    name: str
    clients: int
    requests: int
    stream: bool


SCENARIOS = (
    Scenario("plain c=1", 1, 600, False),
    Scenario("plain c=32", 32, 3000, False),
    Scenario("stream64 c=1", 1, 400, True),
)


async def _load(base: str, sc: Scenario, tag: str, gateway_pid: int) -> tuple[float, float, float]:
    """(p50 ms, turns a second, gateway CPU ms a turn) of ``sc`` against ``base``."""
    pool = UpstreamPool(URL(base), connect_timeout=30, read_timeout=300)
    numbers = iter(range(sc.requests))
    latencies: list[float] = []

    async def client() -> None:
        for number in numbers:
            sent = time.perf_counter()
            tokens = 64 if sc.stream else 16
            await chat_turn(pool, f"{tag}-{number}", tokens=tokens, stream=sc.stream)
            latencies.append(time.perf_counter() - sent)

    cpu = cpu_seconds(gateway_pid)
    began = time.perf_counter()
    try:
        await asyncio.gather(*(client() for _ in range(sc.clients)))
    finally:
        await pool.close()
    wall = time.perf_counter() - began
    cpu = cpu_seconds(gateway_pid) - cpu
    return statistics.median(latencies) * 1e3, sc.requests / wall, cpu / sc.requests * 1e3


def measure(db: str, scenarios: tuple[Scenario, ...]) -> list[tuple[float, float, float]]:
    up, gw = free_port(), free_port()
    mock = start(["mock-upstream", "--port", str(up)], f"http://127.0.0.1:{up}/v1/models")
    try:
        gateway = start(
            ["serve", "--port", str(gw), "--upstream", f"http://127.0.0.1:{up}/v1", "--db", db],
            f"http://127.0.0.1:{gw}/v1/health",
        )
        try:
            base = f"http://127.0.0.1:{gw}"
            run = f"{time.time_ns():x}"  # conversations of this run only: new ones
            warm = Scenario("warm-up", 8, 300, False)
            uvloop.run(_load(base, warm, f"{run}-warm", gateway.pid))
            return [
                uvloop.run(_load(base, sc, f"{run}-{i}", gateway.pid))
                for i, sc in enumerate(scenarios)
            ]
        finally:
            gateway.stop()
    finally:
        mock.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", action="append", default=[], help="a database URL to measure")
    parser.add_argument("--quick", action="store_true", help="a tenth of the requests (CI)")
    args = parser.parse_args()
    scenarios: tuple[Scenario, ...] = SCENARIOS
    if args.quick:
        scenarios = tuple(
            Scenario(sc.name, sc.clients, sc.requests // 10, sc.stream) for sc in SCENARIOS
        )
    gc.freeze()
    with tempfile.TemporaryDirectory() as tmp:
        databases = [("SQLite", f"sqlite+aiosqlite:///{tmp}/bench.db")]
        databases += [(URL(db).scheme.split("+")[0], db) for db in args.db]
        print(f"{'database':<12}{'scenario':<14}{'p50 ms':>8}{'turns/s':>9}{'CPU ms/turn':>13}")
        for label, db in databases:
            for sc, (p50, rate, cpu) in zip(scenarios, measure(db, scenarios), strict=True):
                print(f"{label:<12}{sc.name:<14}{p50:8.2f}{rate:9.0f}{cpu:13.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
