"""chatmem benchmark: the gateway next to a direct connection to the same upstream.

    python -m benchmarks.run            # the full run (a few minutes)
    python -m benchmarks.run --quick    # tiny counts: checks that the benchmark works

It starts the mock upstream and the gateway as real processes on 127.0.0.1, then runs each
scenario against its targets in alternating rounds (so machine drift hits all alike):
``direct`` (the upstream itself), ``bare`` (a 40-line relay on aiohttp's server and
client, benchmarks/bare_hop.py: the issue's "bare aiohttp hop"), with ``--caddy`` also
``caddy`` (Caddy's reverse proxy, benchmarks/caddy_hop.py), ``memory`` (chatmem's
/v1/chat/completions with a conversation id), ``passthrough`` (chatmem's plain relay,
/v1/completions) and ``direct-legacy`` (the upstream's /v1/completions, which passthrough
is compared with). It prints a table of medians, writes the raw samples as JSON and draws
a PNG of the added latency.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import io
import json
import math
import os
import platform
import re
import signal
import sqlite3
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import aiohttp
import uvloop
from yarl import URL

from chatmem.proxy.pool import UpstreamPool
from chatmem.storage.blocks import Blocks

from .caddy_hop import caddy_binary, start_caddy
from .procs import ChildExited, Proc, cpu_seconds, free_port, rss_mb, start
from .slices import get_slice_ns, set_process_slice_ns

HERE = Path(__file__).resolve().parent
CLIENT_SLICE_US = 100.0
"""The load generator's scheduler slice by default (see :func:`client_slice`)."""
WARMUP_MAX = 50
"""Requests per target in the warm-up of a scenario."""
FIRST_TOKEN = re.compile(rb'"(?:content|text)":"[^"]')
"""The first event with text in it: a chat delta's ``content``, a completion's ``text``
(the role-only event before it, which the mock sends first, is not a token)."""
BASELINE = {"passthrough": "direct-legacy", "direct-legacy": "direct-legacy"}
"""The direct target a relay is compared with, when it is not ``direct``: passthrough
goes to the mock's /v1/completions, whose answers cost the mock more than chat's."""
RELAYS = ("bare", "caddy")
"""The targets that relay the client's request as it is to the mock (a client of theirs
sends the history itself, as one of direct does), in the order of the tables."""


@dataclass
class Scenario:
    name: str
    stream: bool
    concurrency: int
    requests: int  # per target per round
    tokens: int = 16
    delay_ms: float = 0.0
    history: int = 0  # stored messages in the conversation (memory target)
    targets: tuple[str, ...] = ("direct", "bare", "memory", "passthrough", "direct-legacy")
    kernel_slice: bool = False
    """The load generator keeps the kernel's own scheduler slice here, not
    ``--client-slice-us`` (see :func:`client_slice`)."""


@dataclass
class Sample:
    target: str
    round: int
    latencies_ms: list[float] = field(default_factory=list)
    ttft_ms: list[float] = field(default_factory=list)
    first_visit_ms: list[float] = field(default_factory=list)
    """History scenarios, memory: the requests that read their window from the database
    (the first of each conversation's ``VISITS``), also in ``latencies_ms``."""
    wall_s: float = 0.0
    gateway_cpu_s: float = 0.0
    loadgen_cpu_s: float = 0.0
    upstream_cpu_s: float = 0.0
    errors: int = 0


def scenarios(quick: bool, caddy: bool = False) -> list[Scenario]:
    """The scenarios of a run (``quick``: tiny counts); ``caddy``: with the Caddy relay
    next to the bare one."""
    n = 10 if quick else 1
    chosen = [
        Scenario("plain c=1", False, 1, 300 // n),
        Scenario("plain c=32", False, 32, 1600 // n),
        Scenario("stream64 c=1", True, 1, 150 // n, tokens=64),
        Scenario(
            "stream64 c=1, kernel slice",
            True,
            1,
            150 // n,
            tokens=64,
            targets=("direct", "bare", "memory"),
            kernel_slice=True,
        ),
        Scenario("stream64 c=32", True, 32, 640 // n, tokens=64),
        Scenario(
            "stream 256x20ms",
            True,
            256,
            256,
            tokens=16 if quick else 32,
            delay_ms=20,
            targets=("direct", "bare", "memory"),
        ),
        Scenario(
            "history 10", False, 1, 150 // n, history=10, targets=("direct", "bare", "memory")
        ),
        Scenario(
            "history 1000", False, 1, 150 // n, history=1000, targets=("direct", "bare", "memory")
        ),
        Scenario(
            "history 10000", False, 1, 150 // n, history=10000, targets=("direct", "bare", "memory")
        ),
    ]
    if caddy:
        for sc in chosen:
            at = sc.targets.index("bare") + 1
            sc.targets = (*sc.targets[:at], "caddy", *sc.targets[at:])
    return chosen


class Bench:
    """The load generator.

    Its HTTP client is chatmem's own lean keep-alive client (``chatmem.proxy.pool``), not
    aiohttp's: at 32 clients aiohttp's ``ClientSession`` spent a whole core on the
    "direct" target (about 100 us a request), so the load generator, not the upstream,
    set the direct figure.  The lean client costs about a third of that; every sample
    records the CPU share of the load generator and of the upstream, so the table shows
    which one limits "direct".
    """

    def __init__(self, started: Started) -> None:
        """``started``: the processes measured (:func:`start_targets`)."""
        self.started = started
        self.pools = {
            base: UpstreamPool(URL(base), connect_timeout=30, read_timeout=300)
            for base in started.bases()
        }
        self.counter = 0
        self.visits = 0  # memory requests in the history scenarios
        self.pool = 1  # pre-filled conversations of each history size

    async def close(self) -> None:
        for pool in self.pools.values():
            await pool.close()

    def request_for(
        self, sc: Scenario, target: str, client: int
    ) -> tuple[str, str, dict[str, Any], dict[str, str]]:
        """(base URL, path, JSON body, headers) of the next request to ``target``."""
        self.counter += 1
        headers = {"Content-Type": "application/json", "X-Mock-Tokens": str(sc.tokens)}
        if sc.delay_ms:
            headers["X-Mock-Delay-Ms"] = str(sc.delay_ms)
        question = {"role": "user", "content": f"question {self.counter} from client {client}"}
        body: dict[str, Any] = {"model": "bench", "messages": [question], "stream": sc.stream}
        base = self.started.base(target)
        if target == "direct" or target in self.started.relays:
            # A client without chatmem must send the history itself.
            body["messages"] = [*self.window(sc.history), question]
            return base, "/v1/chat/completions", body, headers
        if target in ("passthrough", "direct-legacy"):
            # The plain relay: legacy completions, no memory involved; and the same
            # request straight to the upstream, to compare it with.
            prompt = {"model": "bench", "prompt": question["content"], "stream": sc.stream}
            return base, "/v1/completions", prompt, headers
        if sc.history:
            conv = history_conversation(sc.history, self.visits, self.pool)
            self.visits += 1
        else:
            conv = f"bench-{self.counter}"  # a new conversation: a miss, then an insert
        headers["X-Conversation-Id"] = conv
        return base, "/v1/chat/completions", body, headers

    def window(self, history: int) -> list[dict[str, Any]]:
        return [
            {"role": "user" if i % 2 == 0 else "assistant", "content": f"stored message {i}"}
            for i in range(max(0, history - 200), history)
        ]

    async def one(self, sc: Scenario, target: str, client: int, sample: Sample) -> None:
        first_visit = target == "memory" and sc.history > 0 and self.visits % VISITS == 0
        base, path, body, headers = self.request_for(sc, target, client)
        data = json.dumps(body).encode()
        start_t = time.perf_counter()
        try:
            async with await self.pools[base].post(path, headers, data) as resp:
                first = None
                seen = b""
                async for chunk in resp.content.iter_any():
                    if first is None and sc.stream:
                        seen = seen[-16:] + chunk  # a marker may straddle two reads
                        if FIRST_TOKEN.search(seen):
                            first = time.perf_counter()
                if resp.status != 200:
                    sample.errors += 1
                    return
        except (aiohttp.ClientError, TimeoutError):
            sample.errors += 1
            return
        end = time.perf_counter()
        sample.latencies_ms.append((end - start_t) * 1000)
        if first_visit:
            sample.first_visit_ms.append((end - start_t) * 1000)
        if sc.stream and first is not None:
            sample.ttft_ms.append((first - start_t) * 1000)

    async def run(self, sc: Scenario, target: str, rnd: int) -> Sample:
        sample = Sample(target, rnd)
        queue = iter(range(sc.requests))

        async def worker(client: int) -> None:
            for _ in queue:
                await self.one(sc, target, client, sample)

        relay = self.started.relay(target)
        upstream = self.started.upstream
        cpu0 = cpu_seconds(relay.pid) if relay is not None else 0.0
        upstream_cpu0 = cpu_seconds(upstream.pid)
        self_cpu0 = time.process_time()
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(c) for c in range(sc.concurrency)))
        sample.wall_s = time.perf_counter() - t0
        sample.gateway_cpu_s = cpu_seconds(relay.pid) - cpu0 if relay is not None else 0.0
        sample.loadgen_cpu_s = time.process_time() - self_cpu0
        sample.upstream_cpu_s = cpu_seconds(upstream.pid) - upstream_cpu0
        return sample


VISITS = 4
"""Requests in a row on one pre-filled conversation in the history scenarios."""


def prefilled(size: int, number: int) -> str:
    """The id of pre-filled conversation ``number`` of ``size`` messages (:func:`prefill`)."""
    return f"hist-{size}-{number}"


def history_conversation(size: int, counter: int, pool: int) -> str:
    """A user going on with a chat: ``VISITS`` requests in a row on one pre-filled
    conversation of ``size`` messages, then the next one.  The first request of each
    reads the window from the database, the others find it in the gateway's window
    cache; every size has the same pattern, and grows by only ``2 * VISITS`` messages."""
    return prefilled(size, (counter // VISITS) % pool)


def history_pool(chosen: list[Scenario], rounds: int) -> int:
    """Enough pre-filled conversations per size for every memory request of a history
    scenario (warm-up included) to make its ``VISITS`` on a conversation of its own."""
    most = max((WARMUP_MAX + rounds * s.requests for s in chosen if s.history), default=0)
    return max(1, -(-most // VISITS))


def prefill(db: Path, sizes: list[int], pool: int) -> None:
    """Store conversations of each size straight into the gateway's SQLite file, as the
    gateway would have stored them: with the history blocks that the turns completing
    them would have written (``chatmem.storage.blocks``)."""
    now = int(time.time())
    blocks = Blocks("tool_turns", 200)  # the gateway's defaults, as the benchmark runs it
    with sqlite3.connect(db, timeout=60) as conn:
        conn.text_factory = bytes  # as the gateway reads them
        for size in sizes:
            for i in range(pool):
                cur = conn.execute(
                    "INSERT INTO conversations (id, tenant, user_id, last_seq, created_at,"
                    " updated_at) VALUES (?, 'default', '', ?, ?, ?)",
                    (prefilled(size, i), size, now, now),
                )
                pk = cur.lastrowid
                assert pk is not None
                conn.executemany(
                    "INSERT INTO messages (conversation_pk, seq, role, content, created_at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (
                        (
                            pk,
                            s + 1,
                            "user" if s % 2 == 0 else "assistant",
                            json.dumps(f"stored message {s}"),
                            now,
                        )
                        for s in range(size)
                    ),
                )
                blocks.write(conn, pk, 1, size)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _round_rps(s: Sample) -> float:
    return len(s.latencies_ms) / s.wall_s


def _round_p50(s: Sample) -> float:
    return pct(s.latencies_ms, 0.5)


def paired(samples: list[Sample], target: str, figure: Callable[[Sample], float]) -> float:
    """``target``'s ``figure`` over its direct target's (``BASELINE``), the median over
    the rounds of the ratio within each round.  The rounds alternate the targets, so a
    ratio within one round cancels the machine's drift from one round to the next, which
    a ratio of the two medians does not (it may pair one round's target with another
    round's direct)."""
    base = BASELINE.get(target, "direct")
    theirs = {s.round: figure(s) for s in samples if s.target == base}
    ratios = [
        figure(s) / theirs[s.round] for s in samples if s.target == target and theirs.get(s.round)
    ]
    return statistics.median(ratios) if ratios else float("nan")


def summarise(sc: Scenario, samples: list[Sample]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for target in sc.targets:
        mine = [s for s in samples if s.target == target]
        lat = [v for s in mine for v in s.latencies_ms]
        ttft = [v for s in mine for v in s.ttft_ms]
        done = sum(len(s.latencies_ms) for s in mine)
        first_visits = [s.first_visit_ms for s in mine if s.first_visit_ms]
        out[target] = {
            "p50_ms": statistics.median([pct(s.latencies_ms, 0.5) for s in mine]),
            # The requests that read from the database (memory, history scenarios); the
            # other targets do the same for every request.
            "first_visit_p50_ms": statistics.median([pct(v, 0.5) for v in first_visits])
            if first_visits
            else float("nan"),
            "p99_ms": pct(lat, 0.99),
            "ttft_p50_ms": statistics.median([pct(s.ttft_ms, 0.5) for s in mine])
            if ttft
            else float("nan"),
            "rps": statistics.median([_round_rps(s) for s in mine]),
            "x_direct_rps": paired(samples, target, _round_rps),
            "x_direct_p50": paired(samples, target, _round_p50),
            "gateway_cpu_ms_per_req": 1000 * sum(s.gateway_cpu_s for s in mine) / max(done, 1),
            "loadgen_cpu_share": statistics.median([s.loadgen_cpu_s / s.wall_s for s in mine]),
            "upstream_cpu_share": statistics.median([s.upstream_cpu_s / s.wall_s for s in mine]),
            "errors": sum(s.errors for s in mine),
            "requests": done,
        }
    return out


async def held_streams(bench: Bench, count: int) -> dict[str, float]:
    """``count`` concurrent memory streams held open at once; the gateway's RSS meanwhile,
    the most streams in flight at one time and the wall time of them all."""
    sc = Scenario("held", True, count, count, tokens=50, delay_ms=40)
    before = rss_mb(bench.started.gateway.pid)
    peak = before
    sample = Sample("memory", 0)
    in_flight = most_in_flight = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, rss_mb(bench.started.gateway.pid))
            await asyncio.sleep(0.1)

    async def one(client: int) -> None:
        nonlocal in_flight, most_in_flight
        in_flight += 1
        most_in_flight = max(most_in_flight, in_flight)
        try:
            await bench.one(sc, "memory", client, sample)
        finally:
            in_flight -= 1

    watcher = asyncio.create_task(watch())
    began = time.perf_counter()
    try:
        await asyncio.gather(*(one(c) for c in range(count)))
    finally:
        watcher.cancel()
    wall = time.perf_counter() - began
    await asyncio.sleep(1)
    return {
        "streams": count,
        "completed": len(sample.latencies_ms),
        "errors": sample.errors,
        "peak_in_flight": most_in_flight,
        "wall_s": wall,
        "rss_before_mb": before,
        "rss_peak_mb": peak,
        "rss_after_mb": rss_mb(bench.started.gateway.pid),
    }


def baseline(targets: dict[str, Any], target: str) -> dict[str, float]:
    """The figures of the direct target ``target`` is compared with (see ``BASELINE``)."""
    return targets.get(BASELINE.get(target, "direct"), targets["direct"])  # type: ignore[no-any-return]


def held_streams_failed(held: dict[str, float] | list[dict[str, float]] | None) -> bool:
    """Whether the held streams (of one run, or of each run) had errors or did not all
    complete."""
    runs = held if isinstance(held, list) else [held] if held else []
    return any(h["errors"] or h["completed"] != h["streams"] for h in runs)


def print_table(results: dict[str, Any]) -> None:
    if results.get("client_slice_us") is not None:
        print(
            f"the load generator's scheduler slice: {results['client_slice_us']:g} us"
            f" (the kernel's, {results['kernel_slice_us']:g} us, where a scenario says so)"
        )
    head = (
        f"{'scenario':<28}{'target':<14}{'p50 ms':>9}{'p99 ms':>9}{'ttft ms':>9}"
        f"{'req/s':>9}{'hop cpu ms':>11}{'added p50':>10}{'x direct':>9}{'loadgen':>8}"
        f"{'upstream':>9}"
    )
    print(head)
    print("-" * len(head))
    for name, targets in results["scenarios"].items():
        for target, m in targets.items():
            direct = baseline(targets, target)
            added = m["p50_ms"] - direct["p50_ms"]
            ratio = m["x_direct_rps"]
            print(
                f"{name:<28}{target:<14}{m['p50_ms']:>9.2f}{m['p99_ms']:>9.2f}"
                f"{m['ttft_p50_ms']:>9.2f}{m['rps']:>9.0f}{m['gateway_cpu_ms_per_req']:>11.3f}"
                f"{added:>10.2f}{ratio:>9.2f}{m['loadgen_cpu_share']:>8.2f}"
                f"{m.get('upstream_cpu_share', float('nan')):>9.2f}"
            )
            first = m.get("first_visit_p50_ms", math.nan)
            if not math.isnan(first):  # the requests that read from the database
                print(
                    f"{'':<28}{'  1st visit':<14}{first:>9.2f}{'':>36}"
                    f"{first - direct['p50_ms']:>10.2f}"
                )


def _cpu(s: dict[str, Any], t: str) -> float:
    return float(s[t]["gateway_cpu_ms_per_req"])


def _added(field: str) -> Any:
    return lambda s, t: s[t][field] - baseline(s, t)[field]


def _ratio(field: str) -> Any:
    """The median of the ratios to direct within each round (:func:`paired`): over
    several runs, the median of the runs' medians (:func:`median_of_runs`)."""
    return lambda s, t: s[t][field]


TARGETS = [
    # (what, scenario, figure of (scenario results, target), target, kind)
    ("CPU ms/request, plain", "plain c=1", _cpu, 1.0, "<="),
    ("CPU ms/request, 64-token stream", "stream64 c=1", _cpu, 2.0, "<="),
    ("added p50 ms, plain c=1", "plain c=1", _added("p50_ms"), 1.0, "<="),
    ("x direct req/s, plain c=32", "plain c=32", _ratio("x_direct_rps"), 0.6, ">="),
    ("added TTFT ms, stream c=1", "stream64 c=1", _added("ttft_p50_ms"), 0.5, "<="),
    ("x direct time, 256 x 20 ms streams", "stream 256x20ms", _ratio("x_direct_p50"), 1.05, "<="),
]
"""Issue #8's targets that one scenario decides."""


def compared(results: dict[str, Any]) -> tuple[str, ...]:
    """chatmem with memory, and the relays the run had, in the order of the table."""
    ran = {target for figures in results["scenarios"].values() for target in figures}
    return ("memory", *(relay for relay in RELAYS if relay in ran))


def targets(results: dict[str, Any]) -> list[tuple[str, dict[str, float], float, str]]:
    """Issue #8's targets: (what, the figure of each of :func:`compared`, target, kind)."""
    sc = results["scenarios"]
    who = compared(results)
    rows = [
        (what, {t: figure(sc[name], t) for t in who}, target, kind)
        for what, name, figure, target, kind in TARGETS
        if name in sc
    ]
    if "history 10" in sc and "history 10000" in sc:

        def growth(target: str, first_visit: bool = False) -> float:
            def added(name: str) -> float:
                # memory's first visits; the other targets do alike for every request
                figures = sc[name][target]
                first = figures.get("first_visit_p50_ms", math.nan)
                p50 = first if first_visit and not math.isnan(first) else figures["p50_ms"]
                return float(p50 - sc[name]["direct"]["p50_ms"])

            small = added("history 10")
            # A ratio to a figure at or below zero says nothing (noise, or a relay faster
            # than direct): not a number, so never "met".
            return added("history 10000") / small if small > 0.05 else float("nan")

        going_on = {t: growth(t) for t in who}
        rows.append(("added p50, 10,000 / 10, going on", going_on, 1.2, "<="))
        first_visit = {t: growth(t, True) for t in who}
        rows.append(("added p50, 10,000 / 10, first visit", first_visit, 1.2, "<="))
    return rows


def print_targets(results: dict[str, Any]) -> None:
    """Issue #8's targets, met or not by chatmem with memory; the relays' figures beside."""
    columns = "".join(f"{who:>9}" for who in compared(results))
    print(f"{'target (issue #8)':<38}{columns}{'target':>10}  met")
    for what, figures, target, kind in targets(results):
        memory = figures["memory"]
        met = memory <= target if kind == "<=" else memory >= target
        shown = "".join(f"{figure:>9.3f}" for figure in figures.values())
        print(f"{what:<38}{shown}{kind:>5}{target:>5.2f}  {'yes' if met else 'no'}")
    if (budget := cpu_budget(results)) is not None:
        print(
            f"at 32 clients, 0.6x direct on one event loop needs <= {budget:.3f} ms of relay"
            " CPU per request"
        )
    if "caddy" in compared(results):
        print(
            "with --caddy the target measured right after Caddy's round runs slower (README,"
            ' "With Caddy"): judge the targets on a run without it'
        )


def cpu_budget(results: dict[str, Any]) -> float | None:
    """The relay CPU per request (ms) at which one event loop, a core at most, keeps
    0.6x of direct's req/s at 32 clients: what the throughput target asks of a relay."""
    direct = results["scenarios"].get("plain c=32", {}).get("direct")
    return 1000 / (0.6 * direct["rps"]) if direct and direct["rps"] else None


LABELS = {"bare": "bare aiohttp relay", "caddy": "Caddy"}
"""The chart's names of the targets that are not chatmem."""


def draw(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["scenarios"])
    fig, ax = plt.subplots(figsize=(10, 4.5))
    series = [*compared(results)[1:], "memory", "passthrough"]
    width = 0.8 / len(series)
    for number, target in enumerate(series):
        offset = (number - (len(series) - 1) / 2) * width
        values = [
            results["scenarios"][n][target]["p50_ms"]
            - baseline(results["scenarios"][n], target)["p50_ms"]
            if target in results["scenarios"][n]
            else 0.0
            for n in names
        ]
        bars = ax.bar(
            [i + offset for i in range(len(names))],
            values,
            width,
            label=LABELS.get(target, f"chatmem {target}"),
        )
        labels = [
            f"{v:.2f}" if target in results["scenarios"][n] else ""
            for n, v in zip(names, values, strict=True)
        ]
        ax.bar_label(bars, labels=labels, fontsize=7, padding=1)
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set_ylabel("added p50 latency vs direct (ms, log above 1)")
    ax.set_title("chatmem: latency added over a direct connection (medians)")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


async def measure(args: argparse.Namespace, bench: Bench, chosen: list[Scenario]) -> dict[str, Any]:
    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "rounds": args.rounds,
        "gateway_workers": args.workers,
        "client_slice_us": args.client_slice_us,
        "kernel_slice_us": args.kernel_slice_us,
        "load_generator_slice_us": {},
        "scenarios": {},
        "raw": {},
    }
    try:
        for sc in chosen:
            # Warm up every target once, then alternate their order round by round.
            warmup = Scenario(
                sc.name,
                sc.stream,
                sc.concurrency,
                # Enough for every client to open its connections before the rounds.
                min(sc.requests, max(WARMUP_MAX, sc.concurrency)),
                sc.tokens,
                sc.delay_ms,
                sc.history,
            )
            chosen_slice = args.client_slice_us
            if sc.kernel_slice and chosen_slice is not None:
                chosen_slice = 0
            with client_slice(chosen_slice):
                if chosen_slice is not None:  # as the kernel has it, read back
                    results["load_generator_slice_us"][sc.name] = get_slice_ns(0) / 1000
                for target in sc.targets:
                    await bench.run(warmup, target, -1)
                samples = []
                for rnd in range(args.rounds):
                    order = sc.targets if rnd % 2 == 0 else tuple(reversed(sc.targets))
                    for target in order:
                        samples.append(await bench.run(sc, target, rnd))
            results["scenarios"][sc.name] = summarise(sc, samples)
            results["raw"][sc.name] = [asdict(s) for s in samples]
            print(f"done: {sc.name}", file=sys.stderr)
        if not args.only:
            results["held_streams"] = await held_streams(bench, 100 if args.quick else 1000)
    finally:
        await bench.close()
    return results


@contextlib.contextmanager
def client_slice(micros: float | None) -> Iterator[None]:
    """The load generator's scheduler slice: ``micros`` while the block runs (0: the
    kernel's own; None: this kernel keeps none of a task's own), then the kernel's.

    The load generator stands in for clients on other machines, which never wait for a
    core of the gateway's machine.  Here it shares two cores with the mock and a relay,
    and on Linux 6.12+ (EEVDF) a woken task takes a busy core at once only if its slice
    is shorter than that of the task running there: with the kernel's slice (1.4 ms on
    this VM), a client woken by the first token of a stream waits for the mock's burst of
    64 tokens to end, which the time to first token then counts.  With 0.1 ms it does not
    wait, and direct's own figures do not move (README, Performance).  The scenario
    "stream64 c=1, kernel slice" measures the wait, which says nothing about the gateway.
    """
    if micros is None:
        yield
        return
    set_process_slice_ns(os.getpid(), round(micros * 1000))
    try:
        yield
    finally:
        set_process_slice_ns(os.getpid(), 0)


def usable_slice(micros: float) -> float | None:
    """``micros`` if this kernel keeps a task's own slice, else None (with a note)."""
    try:
        with client_slice(micros):
            pass
    except OSError as exc:
        print(f"benchmarks.run: the load generator keeps the kernel's slice ({exc})")
        return None
    return micros


def one_run(args: argparse.Namespace, out: Path, chosen: list[Scenario]) -> dict[str, Any]:
    """Start the mock, the gateway and the relays on a fresh database; measure.

    Every process started is stopped however this ends; the database is removed after
    the gateway stopped.  A process that exits meanwhile aborts the run
    (:class:`ChildExited`), checked around every round of every target."""
    db = out / "bench.db"
    with contextlib.ExitStack() as running:
        remove_db(db)
        running.callback(remove_db, db)  # registered first: runs after every stop
        started = start_targets(running, db, workers=args.workers, caddy=args.caddy)
        pool = history_pool(chosen, args.rounds)
        prefill(db, sorted({s.history for s in chosen if s.history}), pool)

        async def run() -> dict[str, Any]:
            bench = Bench(started)
            bench.pool = pool
            watch_children(bench, started.children)
            results = await measure(args, bench, chosen)
            check_children(started.children)
            return results

        # uvloop in the load generator too: the cheaper it is, the less it limits "direct";
        # and no full collection of everything imported in the middle of a round.
        gc.freeze()
        try:
            return uvloop.run(run())
        except Exception as exc:
            if isinstance(exc, ChildExited):
                raise
            # Requests to a dead port can fail in ways the load generator does not count
            # as errors: name the process that is gone, not the symptom.
            check_children(started.children, cause=exc)
            raise


@dataclass
class Started:
    """The processes of a run (:func:`start_targets`) and where they listen."""

    upstream: Proc
    gateway: Proc
    upstream_url: str
    gateway_url: str
    relays: dict[str, tuple[str, Proc]]
    """The base URL and the process of each relay of :data:`RELAYS` that runs."""

    @property
    def children(self) -> tuple[Proc, ...]:
        return (self.upstream, self.gateway, *(proc for _, proc in self.relays.values()))

    def bases(self) -> tuple[str, ...]:
        return (self.upstream_url, self.gateway_url, *(base for base, _ in self.relays.values()))

    def base(self, target: str) -> str:
        """The base URL a request to ``target`` goes to."""
        if target.startswith("direct"):
            return self.upstream_url
        return self.relays[target][0] if target in self.relays else self.gateway_url

    def relay(self, target: str) -> Proc | None:
        """The process between the client and the mock for ``target``: None for direct."""
        if target.startswith("direct"):
            return None
        return self.relays[target][1] if target in self.relays else self.gateway


def start_targets(
    running: contextlib.ExitStack, db: Path, *, workers: int = 1, caddy: bool = False
) -> Started:
    """The mock, the gateway on the SQLite file ``db``, the bare relay and, with ``caddy``,
    Caddy; each is stopped when ``running`` closes."""
    up_port, gw_port, bare_port = free_port(), free_port(), free_port()
    upstream = start(
        ["mock-upstream", "--port", str(up_port), "--tokens", "16"],
        f"http://127.0.0.1:{up_port}/v1/models",
    )
    running.callback(upstream.stop)
    gateway = start(
        [
            "serve",
            "--port",
            str(gw_port),
            "--upstream",
            f"http://127.0.0.1:{up_port}/v1",
            "--db",
            f"sqlite+aiosqlite:///{db}",
            "--workers",
            str(workers),
        ],
        f"http://127.0.0.1:{gw_port}/v1/health",
    )
    running.callback(gateway.stop)
    bare = start(
        [f"http://127.0.0.1:{up_port}", str(bare_port)],
        f"http://127.0.0.1:{bare_port}/health",
        module="benchmarks.bare_hop",
    )
    running.callback(bare.stop)
    relays = {"bare": (f"http://127.0.0.1:{bare_port}/v1", bare)}
    if caddy:
        caddy_port = free_port()
        caddy_proc = start_caddy(caddy_port, up_port)
        running.callback(caddy_proc.stop)
        relays["caddy"] = (f"http://127.0.0.1:{caddy_port}/v1", caddy_proc)
    return Started(
        upstream,
        gateway,
        f"http://127.0.0.1:{up_port}/v1",
        f"http://127.0.0.1:{gw_port}/v1",
        relays,
    )


def remove_db(db: Path) -> None:
    """The gateway's SQLite file and its WAL companions."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)


def check_children(children: Sequence[Proc], cause: BaseException | None = None) -> None:
    """Raise :class:`ChildExited` (from ``cause``) if any of ``children`` has exited."""
    for child in children:
        try:
            child.check()
        except ChildExited as exc:
            raise exc from cause


def watch_children(bench: Bench, children: Sequence[Proc]) -> None:
    """Check ``children`` before and after every round ``bench`` runs (``measure`` calls
    ``bench.run``): a server that died must abort the run, not leave nan and 0 req/s."""
    inner = bench.run

    async def run(sc: Scenario, target: str, rnd: int) -> Sample:
        check_children(children)
        sample = await inner(sc, target, rnd)
        try:
            check_children(children)
        except ChildExited as exc:
            raise ChildExited(f"{exc}, during {sc.name!r} ({target})") from None
        return sample

    bench.run = run  # type: ignore[method-assign]


def median_of_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Every figure of every scenario and target: the median over the runs."""
    combined = dict(runs[0])
    combined["runs"] = len(runs)
    combined["scenarios"] = {
        name: {
            target: {
                metric: statistics.median(run["scenarios"][name][target][metric] for run in runs)
                for metric in figures
            }
            for target, figures in targets.items()
        }
        for name, targets in runs[0]["scenarios"].items()
    }
    combined["raw"] = [run["raw"] for run in runs]
    if "held_streams" in runs[0]:
        combined["held_streams"] = [run["held_streams"] for run in runs]
    return combined


class _Tee(io.TextIOBase):
    """stdout that also keeps a copy of everything written (for run.log)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.copy = io.StringIO()

    def write(self, text: str) -> int:
        self.copy.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


def _terminate_on_sigterm() -> None:
    """``kill -TERM`` becomes a clean exit (as Ctrl-C is): ``SystemExit`` in the main
    thread, so every ``finally`` stops the servers.  Later ones are ignored, not to
    interrupt that cleanup."""

    def handler(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("benchmarks.run: SIGTERM, stopping the servers", file=sys.stderr)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def _write_atomically(out: Path, files: dict[str, Callable[[Path], object]]) -> None:
    """Write each file of ``files`` (name: writer of a path) to a temporary file in
    ``out``, then move them all in place: a failure leaves the old ones as they were."""
    written: dict[str, Path] = {}
    try:
        for name, write in files.items():
            # Same suffix: draw() takes the image format from it.
            written[name] = out / f".{name}.{os.getpid()}.tmp{Path(name).suffix}"
            write(written[name])
        for name, tmp in written.items():
            os.replace(tmp, out / name)
    finally:
        for tmp in written.values():
            tmp.unlink(missing_ok=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny counts (CI)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=1, help="whole runs; figures are medians")
    parser.add_argument("--only", help="run the scenarios whose name contains this")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--workers", type=int, default=1, help="gateway processes")
    parser.add_argument(
        "--caddy",
        action="store_true",
        help="Caddy's reverse proxy as one more relay (the target after it runs slower)",
    )
    parser.add_argument(
        "--client-slice-us",
        type=float,
        default=CLIENT_SLICE_US,
        help="the load generator's scheduler slice in us, Linux 6.12+ (0: the kernel's own)",
    )
    args = parser.parse_args()
    if args.caddy and caddy_binary() is None:
        parser.error("--caddy: caddy is not installed (apt-get install -y caddy)")
    args.client_slice_us = usable_slice(args.client_slice_us)
    args.kernel_slice_us = get_slice_ns(0) / 1000 if args.client_slice_us is not None else None
    if args.quick:
        args.rounds = min(args.rounds, 2)
    _terminate_on_sigterm()
    out = Path(args.out).resolve()  # absolute: the servers run in a directory of their own
    out.mkdir(parents=True, exist_ok=True)
    chosen = [s for s in scenarios(args.quick, args.caddy) if not args.only or args.only in s.name]
    tee = _Tee(sys.stdout)
    with contextlib.redirect_stdout(tee):
        try:
            runs = []
            for number in range(max(1, args.runs)):
                runs.append(one_run(args, out, chosen))
                if args.runs > 1:
                    print(f"run {number + 1} of {args.runs}:")
                    print_table(runs[-1])
        except ChildExited as exc:
            print(f"benchmarks.run: aborted, {exc}; nothing written to {out}", file=sys.stderr)
            return 2
        results = runs[0] if len(runs) == 1 else median_of_runs(runs)
        if len(runs) > 1:
            print(f"median of {len(runs)} runs:")
        print_table(results)
        print_targets(results)
        held = results.get("held_streams")
        if held is not None:
            print("held streams:", json.dumps(held))
        print(
            f"raw results: {out / 'results.json'}; chart: {out / 'added_latency.png'};"
            f" tables: {out / 'run.log'}"
        )
    _write_atomically(
        out,
        {
            "results.json": lambda p: p.write_text(json.dumps(results, indent=1)),
            "added_latency.png": lambda p: draw(results, p),
            "run.log": lambda p: p.write_text(tee.copy.getvalue()),
        },
    )
    errors = sum(m["errors"] for t in results["scenarios"].values() for m in t.values())
    if held_streams_failed(held):
        print(
            "benchmarks.run: the held streams had errors or did not all complete", file=sys.stderr
        )
        return 1
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
