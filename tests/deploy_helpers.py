"""Running a real ``chatmem serve`` process from a config file, and reading what it logged."""

from __future__ import annotations

import json
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from helpers import Process, free_port


@dataclass
class ServedGateway:
    process: Process
    url: str  # http://127.0.0.1:PORT
    port: int
    db: Path

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> tuple[int, str]:
        """Send ``sig``, wait for the exit; the exit code and everything written to stderr."""
        proc = self.process.proc
        if proc.poll() is None:
            proc.send_signal(sig)
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate(timeout=10)
            raise
        return proc.returncode, err.decode()


def serve(
    tmp_path: Path,
    upstream: str,
    toml: str = "",
    *args: str,
    env: dict[str, str] | None = None,
    upstream_toml: str = "",
) -> ServedGateway:
    """Start ``chatmem serve`` with a config file holding ``toml`` plus upstream and storage
    (``upstream_toml``: more keys for the ``[upstream]`` table)."""
    port = free_port()
    db = tmp_path / "chatmem.db"
    config = tmp_path / "chatmem.toml"
    config.write_text(
        f'[upstream]\nurl = "{upstream}"\n{upstream_toml}\n[storage]\nurl = "sqlite+aiosqlite:///{db}"\n\n{toml}'
    )
    process = Process(
        ["serve", "--config", str(config), "--port", str(port), *args], env=env, cwd=tmp_path
    )
    process.wait_ready(f"http://127.0.0.1:{port}/v1/health")
    return ServedGateway(process, f"http://127.0.0.1:{port}", port, db)


def json_lines(stderr: str) -> list[dict[str, Any]]:
    """The JSON log lines (every line must be one)."""
    return [json.loads(line) for line in stderr.splitlines() if line.strip()]
