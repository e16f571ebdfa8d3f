"""Caddy as a relay in front of the mock: a compiled, multi-threaded reverse proxy that
parses and stores nothing, for ``benchmarks.run --caddy``.

The issue behind the benchmark (#8) measured Caddy at about 0.2 ms added; this target puts
it in the same alternating rounds as the others, on the same two cores.  It runs with its
admin API off, no automatic HTTPS, its home and data in a directory of its own, and
``flush_interval -1``: every read of a stream goes on at once, as chatmem's tee does.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .procs import Proc, spawn

CADDYFILE = """\
{{
	admin off
	auto_https off
}}
http://127.0.0.1:{port} {{
	reverse_proxy 127.0.0.1:{upstream_port} {{
		flush_interval -1
	}}
}}
"""


def caddy_binary() -> str | None:
    return shutil.which("caddy")


def start_caddy(port: int, upstream_port: int) -> Proc:
    """Caddy on ``port``, relaying everything to the mock on ``upstream_port``."""
    binary = caddy_binary()
    if binary is None:
        raise RuntimeError("caddy is not installed (apt-get install -y caddy)")
    home = tempfile.mkdtemp(prefix="chatmem-bench-caddy-")
    config = Path(home) / "Caddyfile"
    config.write_text(CADDYFILE.format(port=port, upstream_port=upstream_port))
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": home,
        "XDG_DATA_HOME": f"{home}/data",
        "XDG_CONFIG_HOME": f"{home}/config",
    }
    return spawn(
        [binary, "run", "--config", str(config), "--adapter", "caddyfile"],
        f"http://127.0.0.1:{port}/v1/models",
        "caddy",
        env,
        home,
    )
