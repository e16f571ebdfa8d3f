"""``plain c=32`` of ``benchmarks.run`` again, with wrk (C) as the load generator.

    python -m benchmarks.wrk_check                      # 5 rounds of 4 s for each target
    python -m benchmarks.wrk_check --rounds 1 --seconds 1 --caddy

Issue #8 asks that the load generator not be the bottleneck.  ``benchmarks.run``'s own is
Python (chatmem's lean client on uvloop): at 32 clients it uses about 0.03 ms of CPU a
request, CPU the relays on the same two cores do not get.  This check runs the same
requests (a new conversation each for ``memory``, the same body for every target, 16
tokens an answer) from wrk, Debian's ``wrk``, which uses about 0.6 of that, in
alternating rounds: ``direct``, ``bare``, ``caddy`` (with ``--caddy``) and ``memory``
(chatmem).  For each target it prints the median requests per second, the ratio to
direct, the relay's CPU per request and the share of a core that comes to, the mock's and
wrk's CPU, and p50/p99 latency; the rounds go to ``--json``.

A relay on one event loop cannot go faster than one core allows: where "relay core" is
about 1.0, the relay's own CPU per request sets its throughput, whatever the load
generator costs.  The line under the table says how little CPU per request 0.6x of
direct leaves.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from .procs import ChildExited, cpu_seconds
from .run import Started, start_targets

CONNECTIONS = 32
SCRIPT = """\
wrk.method = "POST"
wrk.body = '{"model": "bench", "messages": [{"role": "user", "content": "a question"}], \
"stream": false}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-Mock-Tokens"] = "16"
local prefix = os.getenv("WRK_CONVERSATION_PREFIX")
local n = 0
if prefix then
  request = function()
    n = n + 1
    wrk.headers["X-Conversation-Id"] = prefix .. n
    return wrk.format()
  end
end
"""
"""wrk's Lua script: with ``WRK_CONVERSATION_PREFIX`` set (``memory``), each request is a
new conversation (one wrk thread, so one counter)."""
_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


@dataclass
class Round:
    target: str
    round: int
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    relay_cpu_ms_per_req: float
    upstream_cpu_ms_per_req: float
    wrk_cpu_ms_per_req: float

    @property
    def relay_core(self) -> float:
        """The share of a core the relay used."""
        return self.relay_cpu_ms_per_req * self.rps / 1000


def wrk_binary() -> str | None:
    return shutil.which("wrk")


def parse(output: str) -> tuple[int, float, float, float, int]:
    """(requests, req/s, p50 ms, p99 ms, errors) from wrk's report (``--latency``)."""

    def latency(percent: str) -> float:
        found = re.search(rf"^\s+{percent}%\s+([\d.]+)(us|ms|s|m)\s*$", output, re.M)
        if found is None:
            raise ValueError(f"wrk printed no {percent}% latency:\n{output}")
        return float(found[1]) * _UNITS[found[2]]

    requests = re.search(r"(\d+) requests in", output)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if requests is None or rps is None:
        raise ValueError(f"wrk printed no request count:\n{output}")
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", output))
    socket = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if socket is not None:
        errors += sum(int(n) for n in socket.groups())
    return int(requests[1]), float(rps[1]), latency("50"), latency("99"), errors


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def one_round(started: Started, target: str, number: int, seconds: int, script: Path) -> Round:
    """``seconds`` of wrk at :data:`CONNECTIONS` connections on ``target``."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    if target == "memory":
        env["WRK_CONVERSATION_PREFIX"] = f"wrk-{number}-"
    relay = started.relay(target)
    relay0 = cpu_seconds(relay.pid) if relay is not None else 0.0
    upstream0 = cpu_seconds(started.upstream.pid)
    wrk0 = _children_cpu()
    done = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{CONNECTIONS}",
            f"-d{seconds}s",
            "--latency",
            "-s",
            str(script),
            f"{started.base(target)}/chat/completions",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=True,
    )
    wrk_cpu = _children_cpu() - wrk0
    relay_cpu = cpu_seconds(relay.pid) - relay0 if relay is not None else 0.0
    upstream_cpu = cpu_seconds(started.upstream.pid) - upstream0
    requests, rps, p50, p99, errors = parse(done.stdout)
    per = 1000 / max(requests, 1)
    return Round(
        target,
        number,
        requests,
        rps,
        p50,
        p99,
        errors,
        relay_cpu * per,
        upstream_cpu * per,
        wrk_cpu * per,
    )


def summary(rounds: list[Round], targets: list[str]) -> dict[str, dict[str, float]]:
    """Medians over the measured rounds of each target; ``x_direct`` is the median of
    each round's ratio to the direct round just before it."""
    direct = {r.round: r.rps for r in rounds if r.target == "direct"}
    out = {}
    for target in targets:
        mine = [r for r in rounds if r.target == target]
        out[target] = {
            "rps": statistics.median(r.rps for r in mine),
            "x_direct": statistics.median(r.rps / direct[r.round] for r in mine),
            "p50_ms": statistics.median(r.p50_ms for r in mine),
            "p99_ms": statistics.median(r.p99_ms for r in mine),
            "relay_cpu_ms_per_req": statistics.median(r.relay_cpu_ms_per_req for r in mine),
            "relay_core": statistics.median(r.relay_core for r in mine),
            "upstream_cpu_ms_per_req": statistics.median(r.upstream_cpu_ms_per_req for r in mine),
            "wrk_cpu_ms_per_req": statistics.median(r.wrk_cpu_ms_per_req for r in mine),
            "errors": sum(r.errors for r in mine),
        }
    return out


def print_summary(table: dict[str, dict[str, float]]) -> None:
    print(
        f"{'target':<8} {'req/s':>7} {'x direct':>8} {'p50 ms':>7} {'p99 ms':>7}"
        f" {'relay CPU ms/req':>16} {'relay core':>10} {'mock CPU ms/req':>15}"
        f" {'wrk CPU ms/req':>14} {'errors':>6}"
    )
    for target, m in table.items():
        relay_cpu, relay_core = "", ""
        if target != "direct":
            relay_cpu, relay_core = f"{m['relay_cpu_ms_per_req']:.3f}", f"{m['relay_core']:.2f}"
        print(
            f"{target:<8} {m['rps']:>7.0f} {m['x_direct']:>8.3f} {m['p50_ms']:>7.2f}"
            f" {m['p99_ms']:>7.2f} {relay_cpu:>16} {relay_core:>10}"
            f" {m['upstream_cpu_ms_per_req']:>15.3f} {m['wrk_cpu_ms_per_req']:>14.3f}"
            f" {m['errors']:>6.0f}"
        )
    budget = 1000 / (0.6 * table["direct"]["rps"])
    print(
        f"0.6x direct is {0.6 * table['direct']['rps']:.0f} req/s: at most {budget:.3f} ms"
        " of CPU per request for a relay on one core"
    )


def stored_conversations(db: Path) -> int:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        count: int = conn.execute("SELECT count(*) FROM conversations").fetchone()[0]
    return count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds per target")
    parser.add_argument("--seconds", type=int, default=4, help="wrk's time per round")
    parser.add_argument("--caddy", action="store_true", help="Caddy as one more relay")
    parser.add_argument("--json", help="write the rounds and the medians here")
    args = parser.parse_args()
    if wrk_binary() is None:
        parser.error("wrk is not installed (apt-get install -y wrk)")
    targets = ["direct", "bare", *(["caddy"] if args.caddy else []), "memory"]
    with (
        tempfile.TemporaryDirectory(prefix="chatmem-wrk-") as tmp,
        contextlib.ExitStack() as running,
    ):
        db = Path(tmp) / "bench.db"
        script = Path(tmp) / "post.lua"
        script.write_text(SCRIPT)
        started = start_targets(running, db, caddy=args.caddy)
        rounds: list[Round] = []
        answered = 0  # by chatmem, warm-up included
        try:
            for number in range(args.rounds + 1):  # round 0 warms up, and is not counted
                for target in targets:
                    for child in started.children:
                        child.check()
                    done = one_round(started, target, number, args.seconds, script)
                    answered += done.requests if target == "memory" else 0
                    if number:
                        rounds.append(done)
            for child in started.children:
                child.check()
        except ChildExited as exc:
            print(f"benchmarks.wrk_check: aborted, {exc}", file=sys.stderr)
            return 2
        started.gateway.stop()  # its last group commits are written before it exits
        stored = stored_conversations(db)
    table = summary(rounds, targets)
    print(f"wrk, {CONNECTIONS} connections, {args.rounds} rounds of {args.seconds:g} s, medians:")
    print_summary(table)
    print(
        f"chatmem stored {stored} conversations, wrk counted {answered} answers (warm-up"
        f" included): wrk leaves unread the up to {CONNECTIONS} requests in flight when a"
        " round ends"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "rounds": [asdict(r) for r in rounds],
                    "summary": table,
                    "stored": stored,
                    "answered": answered,
                },
                indent=1,
            )
        )
    if stored < answered:
        print(
            f"benchmarks.wrk_check: {answered - stored} answered turns not stored", file=sys.stderr
        )
        return 1
    return 1 if any(m["errors"] for m in table.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
