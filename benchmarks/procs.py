"""Real processes for the benchmark, and what /proc says about them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from chatmem.proxy.pool import UpstreamPool

ROOT = Path(__file__).resolve().parents[1]
SRC = f"{ROOT / 'src'}:{ROOT}"
_TICK = os.sysconf("SC_CLK_TCK")
KEEP_ENV = frozenset({"CHATMEM_TTFT_TRACE"})
"""``CHATMEM_*`` variables a child keeps: the benchmark's own (benchmarks/ttft_hooks reads
this one), which chatmem itself never reads.  Every other one is dropped: the gateway
under test must not pick up the caller's ``$CHATMEM_CONFIG`` or settings."""


class ChildExited(RuntimeError):
    """A process the benchmark started is gone while it still needs it."""


@dataclass
class Proc:
    popen: subprocess.Popen[bytes]
    name: str = "child"
    cwd: str | None = None  # an empty directory of its own, removed when it stops

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def check(self) -> None:
        """Raise :class:`ChildExited` if the process has exited."""
        code = self.popen.poll()
        if code is not None:
            how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
            raise ChildExited(f"{self.name} (pid {self.pid}) {how}")

    def stop(self) -> None:
        try:
            if self.popen.poll() is None:
                self.popen.send_signal(signal.SIGINT)
                try:
                    self.popen.wait(30)
                except subprocess.TimeoutExpired:
                    self.popen.kill()
                    self.popen.wait(5)
        finally:
            if self.cwd is not None:
                shutil.rmtree(self.cwd, ignore_errors=True)


def child_env(pythonpath: str) -> dict[str, str]:
    """The caller's environment without its ``CHATMEM_*`` settings, with ``PYTHONPATH``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATMEM_") or k in KEEP_ENV}
    env["PYTHONPATH"] = pythonpath
    return env


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
    ``prefix`` if given (``valgrind ...``), once ``ready_url`` answers.

    The child runs in an empty directory of its own (no ``./chatmem.toml`` to pick up:
    paths in ``args`` must be absolute) with :func:`child_env`.  If it does not come up,
    or anything (a signal's exception too) interrupts the wait, it is killed."""
    name = module if not args or args[0].startswith(("-", "http")) else f"{module} {args[0]}"
    command = [*prefix, sys.executable, "-m", module, *args]
    return spawn(
        command,
        ready_url,
        name,
        child_env(pythonpath),
        tempfile.mkdtemp(prefix="chatmem-bench-"),
        timeout,
    )


def spawn(
    command: Sequence[str],
    ready_url: str,
    name: str,
    env: dict[str, str],
    cwd: str,
    timeout: float = 30.0,
) -> Proc:
    """``command`` in ``cwd`` (a directory of its own, removed when it stops), once
    ``ready_url`` answers; killed, and ``cwd`` removed, if it does not come up or anything
    (a signal's exception too) interrupts the wait."""
    try:
        popen = subprocess.Popen(
            command, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
    except BaseException:
        shutil.rmtree(cwd, ignore_errors=True)
        raise
    proc = Proc(popen, name, cwd)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if popen.poll() is not None:
                raise RuntimeError(f"{' '.join(command)} exited with {popen.returncode}")
            try:
                with urllib.request.urlopen(ready_url, timeout=1):
                    return proc
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"{ready_url} did not answer")
    except BaseException:
        popen.kill()
        popen.wait(5)
        shutil.rmtree(cwd, ignore_errors=True)
        raise


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
