"""First visits of long conversations: two checkouts' gateways side by side in one run.

    git worktree add /tmp/before <commit>
    python -m benchmarks.first_visit --base /tmp/before     # that commit, then this one
    python -m benchmarks.first_visit                        # this checkout alone

A first visit reads the conversation's window from the database; the visits after it
find it in the window cache.  ``benchmarks.run`` shows the first visits' p50 next to
direct's, but it takes a run per checkout, and one run moves by more (0.05 ms) than a
change to the read (0.04 ms), so alternating whole runs hid it.  Here one mock upstream
serves a gateway of each checkout, each on its own SQLite file pre-filled by its own
code (``benchmarks.run.prefill``), and every conversation takes its four visits on
each gateway in turn, the order swapped from one conversation to the next: drift hits
both alike.  Printed: the p50 of first visits and of the visits after them, for 10 and
10,000 stored messages, and what a first visit costs more than going on, 10,000 less
10 (the mock's parsing of the longer history is in both visits, so it cancels).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import uvloop
from yarl import URL

from chatmem.proxy.pool import UpstreamPool

from .procs import ROOT, chat_turn, child_env, free_port, start
from .run import VISITS, prefilled

__all__ = ["main"]

SIZES = (10, 10_000)
_WARMUP = 10
"""Conversations of each size left out of the figures (connections, caches)."""


def _prefill(checkout: Path, db: Path, pool: int) -> None:
    """``pool`` conversations of each size in ``db``, written by ``checkout``'s code."""
    code = "import sys; from pathlib import Path; from benchmarks.run import prefill; "
    code += "prefill(Path(sys.argv[1]), [int(s) for s in sys.argv[3:]], int(sys.argv[2]))"
    subprocess.run(
        [sys.executable, "-c", code, str(db), str(pool), *map(str, SIZES)],
        check=True,
        cwd=checkout,
        env=child_env(f"{checkout / 'src'}:{checkout}"),
    )


async def _visits(ports: dict[str, int], pool: int) -> dict[tuple[str, int, bool], list[float]]:
    """ms of each visit, by (checkout, size, first visit or not)."""
    pools = {
        name: UpstreamPool(URL(f"http://127.0.0.1:{port}"), connect_timeout=30, read_timeout=60)
        for name, port in ports.items()
    }
    took: dict[tuple[str, int, bool], list[float]] = {
        (name, size, first): [] for name in ports for size in SIZES for first in (True, False)
    }
    names = list(ports)
    try:
        for number in range(pool):
            for size in SIZES:
                conversation = prefilled(size, number)
                for name in names if number % 2 else names[::-1]:
                    for visit in range(VISITS):
                        sent = time.perf_counter()
                        await chat_turn(pools[name], conversation, tokens=16, stream=False)
                        if number >= min(_WARMUP, pool - 1):
                            ms = (time.perf_counter() - sent) * 1000
                            took[(name, size, visit == 0)].append(ms)
    finally:
        for client in pools.values():
            await client.close()
    return took


def report(took: dict[tuple[str, int, bool], list[float]]) -> list[str]:
    lines = [f"{'checkout':<10}{'stored':>8}{'first p50 ms':>14}{'then p50 ms':>13}"]
    extra: dict[str, float] = {}
    for name in dict.fromkeys(name for name, _, _ in took):
        for size in SIZES:
            first = statistics.median(took[(name, size, True)])
            then = statistics.median(took[(name, size, False)])
            lines.append(f"{name:<10}{size:>8}{first:>14.3f}{then:>13.3f}")
            extra[name] = extra.get(name, 0.0) + (first - then) * (1 if size > 10 else -1)
    for name, ms in extra.items():
        lines.append(f"{name}: a first visit costs {ms * 1000:.0f} us more at 10,000 than at 10")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", type=Path, help="another checkout, measured beside this one")
    parser.add_argument("--conversations", type=int, default=300, help="of each size")
    args = parser.parse_args()
    checkouts = {"this": ROOT}
    if args.base is not None:
        checkouts = {"base": args.base.resolve(), **checkouts}
    with contextlib.ExitStack() as running, tempfile.TemporaryDirectory() as tmp:
        up = free_port()
        upstream = start(
            ["mock-upstream", "--port", str(up), "--tokens", "16"],
            f"http://127.0.0.1:{up}/v1/models",
        )
        running.callback(upstream.stop)
        ports: dict[str, int] = {}
        for name, checkout in checkouts.items():
            port, db = free_port(), Path(tmp) / f"{name}.db"
            serve = ["serve", "--port", str(port), "--upstream", f"http://127.0.0.1:{up}/v1"]
            gateway = start(
                [*serve, "--db", f"sqlite+aiosqlite:///{db}"],
                f"http://127.0.0.1:{port}/v1/health",
                pythonpath=str(checkout / "src"),
            )
            running.callback(gateway.stop)
            _prefill(checkout, db, args.conversations)  # after its schema was made
            ports[name] = port
        took = uvloop.run(_visits(ports, args.conversations))
    print("\n".join(report(took)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
