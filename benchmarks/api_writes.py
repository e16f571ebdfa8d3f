"""Chat beside the Conversations API's writes, on one SQLite file.

    python -m benchmarks.api_writes                         # 0, 100, 200, 300 writes/s
    python -m benchmarks.api_writes --src OTHER/src         # and another checkout, alternating
    python -m benchmarks.api_writes --rates 100 --pairs 3 --seconds 10
    python -m benchmarks.api_writes --workers 2           # two gateway processes, one file

Starts the mock upstream and ``chatmem serve`` (a fresh SQLite file each run) as
processes.  ``--clients`` chat clients send turns of new conversations one after another
while one more sends ``POST /v1/conversations`` with two items at a steady ``--rates``
(a write every 1/rate seconds, whether the last one answered or not).  It prints, for
each run, the chat turns a second with their p50 and p99, and the API writes' p50 and p99.
An API write on aiosqlite's thread held SQLite's write lock over several passes of the
event loop, and under chat each pass takes milliseconds; on the loop's own connection it
is one step (README, "The gateway's own writes and its turns").  This shows what each
costs the other.  Runs of this checkout and ``--src`` alternate, so machine drift hits
both alike.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
import uuid

from yarl import URL

from chatmem.proxy.pool import UpstreamPool

from .procs import ROOT, chat_turn, free_port, start

__all__ = ["main"]

_API_BODY = json.dumps(
    {"items": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
).encode()
_JSON = {"Content-Type": "application/json"}


def _ms(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def _load(
    base: str, clients: int, rate: float, seconds: float
) -> tuple[list[float], list[float]]:
    """(the chat turns' times, the API writes' times) of ``seconds`` of load."""
    pool = UpstreamPool(URL(base), connect_timeout=30, read_timeout=60)
    chat: list[float] = []
    api: list[float] = []
    deadline = time.perf_counter() + seconds

    async def chat_client() -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            await chat_turn(pool, uuid.uuid4().hex, tokens=16, stream=False)  # mock's default
            chat.append(time.perf_counter() - started)

    async def api_write() -> None:
        started = time.perf_counter()
        async with await pool.post("/v1/conversations", _JSON, _API_BODY) as response:
            await response.read()
            if response.status != 200:
                raise RuntimeError(f"the gateway answered {response.status} to an API write")
        api.append(time.perf_counter() - started)

    async def api_writer() -> None:
        writes: list[asyncio.Task[None]] = []
        started = time.perf_counter()
        while time.perf_counter() < deadline:
            writes.append(asyncio.create_task(api_write()))
            due = started + len(writes) / rate
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
        await asyncio.gather(*writes)

    try:
        jobs = [chat_client() for _ in range(clients)]
        if rate > 0:
            jobs.append(api_writer())
        await asyncio.gather(*jobs)
    finally:
        await pool.close()
    return chat, api


def _run(src: str, clients: int, rate: float, seconds: float, workers: int) -> dict[str, float]:
    """One run on fresh processes of the checkout at ``src``."""
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as running:
        up, gw = free_port(), free_port()
        path = f"{src}:{ROOT}"
        mock = start(
            ["mock-upstream", "--port", str(up)],
            f"http://127.0.0.1:{up}/v1/models",
            pythonpath=path,
        )
        running.callback(mock.stop)
        gateway = start(
            [
                *("serve", "--port", str(gw), "--upstream", f"http://127.0.0.1:{up}/v1"),
                *("--db", f"sqlite+aiosqlite:///{tmp}/api_writes.db"),
                *(("--workers", str(workers)) if workers > 1 else ()),
            ],
            f"http://127.0.0.1:{gw}/v1/health",
            pythonpath=path,
        )
        running.callback(gateway.stop)
        chat, api = asyncio.run(_load(f"http://127.0.0.1:{gw}", clients, rate, seconds))
        gateway.check()
        return {
            "chat_per_s": len(chat) / seconds,
            "chat_p50_ms": _ms(chat, 0.5),
            "chat_p99_ms": _ms(chat, 0.99),
            "api_writes": len(api),
            "api_p50_ms": _ms(api, 0.5),
            "api_p99_ms": _ms(api, 0.99),
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="0,100,200,300", help="API writes a second")
    parser.add_argument("--clients", type=int, default=16, help="chat clients")
    parser.add_argument("--seconds", type=float, default=10.0, help="of load per run")
    parser.add_argument("--pairs", type=int, default=1, help="runs of each target per rate")
    parser.add_argument("--src", help="another checkout's src/ to run alternately")
    parser.add_argument("--workers", type=int, default=1, help="gateway processes")
    args = parser.parse_args()
    targets = {"this": str(ROOT / "src")}
    if args.src:
        targets["other"] = args.src
    print("target  API writes/s  chat/s  chat p50  chat p99   API p50   API p99 (ms)")
    for rate in (float(r) for r in args.rates.split(",")):
        for pair in range(args.pairs):
            order = list(targets.items())
            for name, src in order if pair % 2 == 0 else order[::-1]:
                r = _run(src, args.clients, rate, args.seconds, args.workers)
                print(
                    f"{name:6} {rate:13.0f} {r['chat_per_s']:7.0f} {r['chat_p50_ms']:9.2f}"
                    f" {r['chat_p99_ms']:9.2f} {r['api_p50_ms']:9.2f} {r['api_p99_ms']:9.2f}",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
