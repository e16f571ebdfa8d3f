"""Real processes for the benchmark, and what /proc says about them."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from chatmem.proxy.pool import UpstreamPool

ROOT = Path(__file__).resolve().parents[1]
SRC = f"{ROOT / 'src'}:{ROOT}"
_TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class Proc:
    popen: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def start(
    args: list[str],
    ready_url: str,
    timeout: float = 30.0,
    module: str = "chatmem",
    *,
    prefix: Sequence[str] = (),
    pythonpath: str = SRC,
) -> Proc:
    """``python -m <module> <args>`` from this checkout (or ``pythonpath``), run by
    ``prefix`` if given (``valgrind ...``), once ``ready_url`` answers."""
    popen = subprocess.Popen(
        [*prefix, sys.executable, "-m", module, *args],
        env={**os.environ, "PYTHONPATH": pythonpath},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            raise RuntimeError(f"{module} {' '.join(args)} exited with {popen.returncode}")
        try:
            with urllib.request.urlopen(ready_url, timeout=1):
                return Proc(popen)
        except OSError:
            time.sleep(0.05)
    popen.kill()
    raise TimeoutError(f"{ready_url} did not answer")


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (a ``--workers`` gateway is a master and its workers)."""
    pids = [pid]
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(c) for c in f.read().split()]
    except OSError:
        return pids
    for child in children:
        pids += _tree(child)
    return pids


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` and its descendants so far."""
    total = 0
    for member in _tree(pid):
        try:
            with open(f"/proc/{member}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / _TICK


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and its descendants."""
    total = 0
    for member in _tree(pid):
        try:
            with open(f"/proc/{member}/status") as f:
                total += next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
        except OSError:
            continue
    return total / 1024


async def chat_turn(pool: UpstreamPool, conversation: str, *, tokens: int, stream: bool) -> None:
    """One turn of a new question in ``conversation`` through ``pool`` (chatmem's lean
    client, on the gateway's origin), read whole; anything but a 200 is an error."""
    headers = {
        "Content-Type": "application/json",
        "X-Mock-Tokens": str(tokens),
        "X-Conversation-Id": conversation,
    }
    body = {
        "model": "bench",
        "messages": [{"role": "user", "content": f"a question in {conversation}"}],
        "stream": stream,
    }
    async with await pool.post("/v1/chat/completions", headers, json.dumps(body).encode()) as r:
        await r.read()
        if r.status != 200:
            raise RuntimeError(f"the gateway answered {r.status}")
