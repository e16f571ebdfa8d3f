"""CI runs the benchmark once with tiny counts, so that it keeps working.

Nothing here asserts speed: the figures of a shared CI machine mean nothing. It asserts
that every scenario ran against every target without an error and left its results.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import run, wrk_check
from benchmarks.slices import get_slice_ns, set_process_slice_ns

ROOT = Path(__file__).resolve().parents[1]


def run_module(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m module args`` from the checkout; it must succeed."""
    result = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:] + result.stdout[-2000:]
    return result


def test_benchmark_runs_with_tiny_counts(tmp_path: Path) -> None:
    quick = ("--quick", "--rounds", "1", "--out", str(tmp_path), "--caddy")
    result = run_module("benchmarks.run", *quick, "--client-slice-us", "150")
    results = json.loads((tmp_path / "results.json").read_text())
    # The load generator ran with the slice asked for, read back from the kernel, but in
    # the scenario that measures the wait behind a burst, with the kernel's own slice.
    assert results["client_slice_us"] == 150
    kernel = results["kernel_slice_us"]
    assert kernel != 150 and kernel > 0
    slices = results["load_generator_slice_us"]
    assert slices.pop("stream64 c=1, kernel slice") == kernel
    assert set(slices.values()) == {150}
    assert set(results["scenarios"]) == {
        "plain c=1",
        "plain c=32",
        "stream64 c=1",
        "stream64 c=1, kernel slice",
        "stream64 c=32",
        "stream 256x20ms",
        "history 10",
        "history 1000",
        "history 10000",
    }
    for name, targets in results["scenarios"].items():
        # Caddy (--caddy) relays wherever the bare relay does, and uses CPU of its own.
        assert {"direct", "bare", "caddy", "memory"} <= set(targets), name
        for target, figures in targets.items():
            assert figures["errors"] == 0, (name, target)
            assert figures["requests"] > 0, (name, target)
    assert results["scenarios"]["plain c=32"]["caddy"]["gateway_cpu_ms_per_req"] > 0
    held = results["held_streams"]
    assert held["completed"] == held["streams"] == 100
    assert (tmp_path / "added_latency.png").stat().st_size > 1000
    assert "x direct" in result.stdout
    assert re.search(r"target \(issue #8\) +memory +bare +caddy +target", result.stdout)
    assert "judge the targets on a run without it" in result.stdout


def test_a_ratio_to_direct_is_taken_within_each_round() -> None:
    """The machine sped up for the third round: a ratio of the two medians would pair the
    relay's median round (60 req/s, round 3) with direct's (100, round 1) and say 0.6;
    within each round the relay made 0.5, 0.9 and 0.2 of direct, median 0.5."""

    def sample(target: str, rnd: int, rps: int) -> run.Sample:
        return run.Sample(target, rnd, latencies_ms=[1.0] * rps, wall_s=1.0)

    rounds = [(100, 50), (100, 90), (300, 60)]
    samples = [sample("direct", r, d) for r, (d, _) in enumerate(rounds)]
    samples += [sample("memory", r, m) for r, (_, m) in enumerate(rounds)]
    assert run.paired(samples, "memory", run._round_rps) == pytest.approx(0.5)
    # passthrough is compared with the mock's /v1/completions, not its chat route
    samples += [sample("direct-legacy", r, 200) for r in range(3)]
    samples += [sample("passthrough", r, 100) for r in range(3)]
    assert run.paired(samples, "passthrough", run._round_rps) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("command", "said"),
    [
        (
            ["benchmarks.run", "--caddy", "--out", "{tmp}"],
            "--caddy: caddy is not installed (apt-get install -y caddy)",
        ),
        (
            ["benchmarks.wrk_check", "--json", "{tmp}/w.json"],
            "wrk is not installed (apt-get install -y wrk)",
        ),
    ],
    ids=["caddy", "wrk"],
)
def test_a_tool_not_installed_is_said_before_anything_starts(
    tmp_path: Path, command: list[str], said: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", *(arg.format(tmp=tmp_path) for arg in command)],
        cwd=ROOT,
        env={**os.environ, "PATH": str(tmp_path)},  # neither caddy nor wrk there
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert said in result.stderr
    assert list(tmp_path.iterdir()) == []  # nothing measured, nothing written


def test_wrk_check_runs_with_tiny_counts(tmp_path: Path) -> None:
    """``benchmarks.wrk_check`` loads every target with wrk (installed by scripts/test.sh)."""
    out = tmp_path / "wrk.json"
    args = ("--rounds", "1", "--seconds", "1", "--caddy", "--json", str(out))
    result = run_module("benchmarks.wrk_check", *args)
    data = json.loads(out.read_text())
    summary = data["summary"]
    assert list(summary) == ["direct", "bare", "caddy", "memory"]
    for target, figures in summary.items():
        assert figures["errors"] == 0, target
        assert figures["rps"] > 0 and figures["upstream_cpu_ms_per_req"] > 0, target
        assert figures["wrk_cpu_ms_per_req"] > 0, target
    assert summary["direct"]["relay_cpu_ms_per_req"] == 0
    for relay in ("bare", "caddy", "memory"):
        assert summary[relay]["relay_cpu_ms_per_req"] > 0, relay
    assert [r["round"] for r in data["rounds"]] == [1, 1, 1, 1]  # round 0 warmed up
    # Every request to chatmem was a new conversation, and every one wrk saw answered is
    # stored; the ones in flight when a round ended (at most 32) may be stored too.
    assert data["answered"] <= data["stored"] <= data["answered"] + 2 * wrk_check.CONNECTIONS
    assert "0.6x direct is" in result.stdout


def test_wrk_report_is_read_with_its_units_and_errors() -> None:
    report = """\
Running 4s test @ http://127.0.0.1:40000/v1/chat/completions
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     4.19ms    1.52ms  30.11ms   80.54%
    Req/Sec     7.52k   350.21     8.10k    72.50%
  Latency Distribution
     50%  850.00us
     75%    4.80ms
     90%    5.73ms
     99%    1.20s
  30031 requests in 4.00s, 18.27MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:   7507.36
Transfer/sec:      4.57MB
"""
    assert wrk_check.parse(report) == (30031, 7507.36, 0.85, 1200.0, 7)
    with pytest.raises(ValueError, match="no 99% latency"):
        wrk_check.parse(report.replace("     99%    1.20s\n", ""))


@pytest.mark.parametrize("answers", [[], ["--stream", "8"]], ids=["plain", "stream"])
def test_instruction_count_runs_with_tiny_counts(answers: list[str]) -> None:
    """``benchmarks.instructions`` runs the gateway under callgrind (installed by
    scripts/test.sh) and reports a count: only that it counted something is asserted."""
    result = run_module("benchmarks.instructions", "--requests", "40", "--clients", "4", *answers)
    millions = float(result.stdout.split(" M instructions per request")[0])
    assert 0.05 < millions < 100, result.stdout


def test_syscall_count_runs_with_tiny_counts() -> None:
    """``benchmarks.syscalls`` splits both relays' CPU into user and system time and counts
    their system calls under strace (installed by scripts/test.sh): each relay read its
    requests and wrote their answers, and only the gateway wrote to its SQLite file."""
    result = run_module(
        "benchmarks.syscalls", "--requests", "200", "--rounds", "1", "--strace-requests", "100"
    )
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines() if line}
    assert float(rows["memory"][0]) > 0 and float(rows["bare"][0]) > 0, result.stdout
    assert float(rows["read"][0]) >= 1 and float(rows["read"][1]) >= 1, result.stdout
    assert float(rows["write"][0]) >= 1 and float(rows["write"][1]) >= 1, result.stdout
    assert float(rows["pwrite64"][0]) > 0 and float(rows["pwrite64"][1]) == 0, result.stdout


def test_first_visits_side_by_side_run_with_tiny_counts() -> None:
    """Two gateways (this checkout twice) on files each pre-filled by its own code: every
    size has a figure for both visits on both, and the summary lines come out."""
    result = run_module("benchmarks.first_visit", "--base", str(ROOT), "--conversations", "2")
    rows = [line.split() for line in result.stdout.splitlines()[1:5]]
    assert [(row[0], row[1]) for row in rows] == [
        ("base", "10"),
        ("base", "10000"),
        ("this", "10"),
        ("this", "10000"),
    ], result.stdout
    assert all(float(ms) > 0 for row in rows for ms in row[2:]), result.stdout
    assert result.stdout.count("a first visit costs") == 2, result.stdout


def test_time_to_first_token_steps_with_tiny_counts() -> None:
    # The hooks in the relays must still find their functions in aiohttp and chatmem:
    # every step of both relays gets a figure, never a negative one (0 where the head
    # and the first token went out in one write).
    result = run_module(
        *("benchmarks.ttft", "--rounds", "1", "--requests", "5", "--tokens", "3"),
        *("--delay-ms", "1", "--slice", "c=100,r=200,m=300"),
    )
    steps = [line for line in result.stdout.splitlines() if "->" in line]
    assert len(steps) == 6, result.stdout
    for line in steps:
        bare, memory = line.split()[-2:]
        assert float(bare) >= 0 and float(memory) >= 0, line
    # The mock's hooks found its writes: each target's streams were matched to its answers
    # (one round of 5 after the warm-up) and the round has a median.
    bursts = [line.split() for line in result.stdout.splitlines() if "after the burst in" in line]
    assert [row[0] for row in bursts] == ["direct", "bare", "memory"], result.stdout
    for row in bursts:
        after, total, rounds = int(row[5]), int(row[7].rstrip(";")), row[9:]
        assert total == 5 and 0 <= after <= total and len(rounds) == 1, row


def test_a_scheduler_slice_is_set_on_every_thread_and_read_back() -> None:
    """``benchmarks.slices`` packs ``struct sched_attr`` itself: a slice set on another
    process (a thread of its own too) is the one the kernel then reports, each later
    setting replaces it, and 0 gives the threads the kernel's own slice back."""
    code = "import threading, time; threading.Thread(target=time.sleep, args=(30,)).start()"
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        tasks = Path(f"/proc/{child.pid}/task")
        for _ in range(100):  # until the thread is there (5 s at most)
            threads = [int(task.name) for task in tasks.iterdir()]
            if len(threads) == 2:
                break
            time.sleep(0.05)
        assert len(threads) == 2
        kernel = [get_slice_ns(tid) for tid in threads]
        assert kernel[0] == kernel[1] and kernel[0] not in (250_000, 1_000_000)
        for micros in (250, 1000):
            set_process_slice_ns(child.pid, micros * 1000)
            assert [get_slice_ns(tid) for tid in threads] == [micros * 1000] * 2
        set_process_slice_ns(child.pid, 0)
        assert [get_slice_ns(tid) for tid in threads] == kernel
    finally:
        child.kill()
        child.wait()


def test_a_kernel_that_keeps_no_slice_of_a_task_leaves_the_run_its_own(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before Linux 6.12 (or off Linux) a task's own slice cannot be set: the run goes on
    with the kernel's, records none, and says why; where it can, it is set and read back
    for the block, and the kernel's is back after it."""
    kernel = get_slice_ns(0)
    assert run.usable_slice(250) == 250
    with run.client_slice(250):
        assert get_slice_ns(0) == 250_000
    assert get_slice_ns(0) == kernel

    def refuse(pid: int, ns: int) -> None:
        raise OSError("this kernel does not keep a task's own slice (6.6.0)")

    monkeypatch.setattr(run, "set_process_slice_ns", refuse)
    assert run.usable_slice(100) is None
    assert "keeps the kernel's slice (this kernel does not keep" in capsys.readouterr().out
    with run.client_slice(None):  # what the scenarios then do: nothing
        assert get_slice_ns(0) == kernel


def test_stalled_clients_run_with_tiny_counts() -> None:
    result = run_module(
        "benchmarks.stalled", "--clients", "3", "--tokens", "3000", "--seconds", "1"
    )
    assert "held for 3 stalled clients:" in result.stdout, result.stdout
    assert "after they left:" in result.stdout, result.stdout


def test_chat_beside_api_writes_runs_with_tiny_counts() -> None:
    result = run_module(
        "benchmarks.api_writes", "--rates", "0,20", "--clients", "2", "--seconds", "1"
    )
    rows = [line.split() for line in result.stdout.splitlines()[1:]]
    assert [(row[0], row[1]) for row in rows] == [("this", "0"), ("this", "20")], result.stdout
    assert rows[1][5] != "nan", result.stdout  # API writes were made and timed


def test_storage_comparison_runs_with_tiny_counts(pg_url: str) -> None:
    result = run_module("benchmarks.storage", "--quick", "--db", pg_url)
    rows = [line.split() for line in result.stdout.splitlines()[1:]]
    assert [(row[0], row[1], row[2]) for row in rows] == [
        (database, *scenario.split())
        for database in ("SQLite", "postgresql")
        for scenario in ("plain c=1", "plain c=32", "stream64 c=1")
    ], result.stdout


# ``perf sched timehist -w`` as it printed one stream through a relay (pid 30): the relay
# wakes the upstream (20), the upstream wakes the relay with the head, the relay wakes the
# client (10) on core 1, where the upstream is busy; the client runs 0.412 ms later.
_TIMEHIST = """\
           time    cpu  task name                       wait time  sch delay   run time
   100.000100 [0000]  python[30]          awakened: python[20]
   100.000150 [0000]  python[30]                        0.000      0.000      0.300
   100.000300 [0001]  python[20]          awakened: python[30]
   100.000400 [0000]  python[30]          awakened: python[10]
   100.000812 [0001]  python[20]                        0.100      0.000      0.700
   100.000900 [0001]  python[10]                        0.900      0.412      0.088
   100.000950 [0000]  python[30]          awakened: python[10]
   100.000990 [0000]  python[30]                        0.000      0.000      0.590
   100.001100 [0001]  python[10]                        0.050      0.020      0.050
"""


def test_head_waits_names_who_held_the_clients_core() -> None:
    from benchmarks.waits import head_waits

    found = head_waits(_TIMEHIST, client=10, upstream=20, relays={"memory": 30, "bare": 40})
    # Only the first wake after the POST counts (the head), not the later token's.
    assert found["memory"].delays_us == [412.0]
    assert found["memory"].behind == {"upstream": 1}
    assert found["bare"].delays_us == []
