"""Who the client waits behind once a relay has written the response head.

``python -m benchmarks.ttft --sched`` records the scheduler (``perf sched record``, from
Debian's ``linux-perf``) while it measures and reads the record back here with
``perf sched timehist -w``: one line per wake-up (``awakened: TASK``) and one per task
leaving a core, with the time it waited to run after its wake-up (``sch delay``).

For each stream through a relay, the first wake-up of the client by the relay after the
relay woke the upstream (sent the POST) is the response head arriving.  This reports how
long the client then waited for a core, and which task ran on that core while it waited.
"""

from __future__ import annotations

import re
import statistics
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["HeadWaits", "head_waits", "print_head_waits"]

_LINE = re.compile(r"\s*(?P<t>[\d.]+)\s+\[(?P<cpu>\d+)\]\s+(?P<task>\S+)\s+(?P<rest>.*)")
_LONG_US = 100.0


@dataclass
class HeadWaits:
    """The client's waits for a core after a relay's response heads."""

    delays_us: list[float] = field(default_factory=list)
    behind: Counter[str] = field(default_factory=Counter)  # who held the core, long waits


def head_waits(
    timehist: str, client: int, upstream: int, relays: dict[str, int]
) -> dict[str, HeadWaits]:
    """Parse ``perf sched timehist -w`` output; ``relays`` names the relays' pids."""
    names = {f"python[{upstream}]": "upstream", f"python[{client}]": "client"}
    names.update({f"python[{pid}]": name for name, pid in relays.items()})
    by_task = {f"python[{pid}]": name for name, pid in relays.items()}
    client_task, upstream_task = f"python[{client}]", f"python[{upstream}]"
    found = {name: HeadWaits() for name in relays}
    last_out: dict[int, str] = {}  # core -> the task that last left it
    posted: dict[str, bool] = dict.fromkeys(relays, False)
    waiting: tuple[str, int] | None = None  # (relay, core) of a head not yet seen
    for line in timehist.splitlines():
        match = _LINE.match(line)
        if match is None:
            continue
        cpu, task, rest = int(match["cpu"]), match["task"], match["rest"]
        if "awakened:" in rest:
            wakee = rest.split("awakened:", 1)[1].strip()
            relay = by_task.get(task)
            if relay is not None and wakee == upstream_task:
                posted[relay] = True
            elif relay is not None and wakee == client_task and posted[relay]:
                posted[relay] = False
                waiting = (relay, cpu)
            continue
        if task == client_task and waiting is not None:
            fields = rest.split()
            delay = float(fields[1]) * 1000 if len(fields) >= 3 else 0.0
            relay = waiting[0]
            found[relay].delays_us.append(delay)
            if delay > _LONG_US:
                holder = last_out.get(cpu, "?")
                found[relay].behind[names.get(holder, holder.split("[")[0])] += 1
            waiting = None
        last_out[cpu] = task
    return found


def record_command(output: Path) -> list[str]:
    return ["perf", "sched", "record", "-a", "-o", str(output)]


def print_head_waits(data: Path, client: int, upstream: int, relays: dict[str, int]) -> None:
    timehist = subprocess.run(
        ["perf", "sched", "timehist", "-w", "-i", str(data)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    found = head_waits(timehist, client, upstream, relays)
    print("\nthe client waiting for a core after the response head (perf sched):")
    print(f"  {'relay':<8}{'streams':>8}{'p50 us':>8}{'p90 us':>8}   long waits (>100 us) behind")
    for name, waits in found.items():
        if not waits.delays_us:
            print(f"  {name:<8}{0:>8}")
            continue
        ordered = sorted(waits.delays_us)
        p90 = ordered[int(len(ordered) * 0.9)]
        behind = ", ".join(f"{who} {n}" for who, n in waits.behind.most_common(4)) or "-"
        print(
            f"  {name:<8}{len(ordered):>8}{statistics.median(ordered):>8.0f}{p90:>8.0f}   {behind}"
        )
