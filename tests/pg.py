"""PostgreSQL for the tests, real and never skipped.

* ``pg_url``: a throwaway database on the machine's cluster (``pg_ctlcluster 15 main``,
  reached over its unix socket as the user running the tests, which ``scripts/test.sh``
  makes a role for).  Every database of a run shares one prefix and all are dropped.
* ``private_postgres``: a whole cluster of our own (``initdb`` into a temporary directory,
  on a free port of 127.0.0.1) that a fault test may stop and start without touching the
  shared one.

``CHATMEM_TEST_PG_HOST`` / ``CHATMEM_TEST_PG_PORT`` / ``CHATMEM_TEST_PG_USER`` point the
tests at another server.  If it cannot be reached, the tests that need it fail and say why.
"""

from __future__ import annotations

import asyncio
import getpass
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from helpers import free_port

HOST = os.environ.get("CHATMEM_TEST_PG_HOST", "/var/run/postgresql")
PORT = int(os.environ.get("CHATMEM_TEST_PG_PORT", "5432"))
USER = os.environ.get("CHATMEM_TEST_PG_USER") or getpass.getuser()


def sqlalchemy_url(database: str, *, host: str = HOST, port: int = PORT, user: str = USER) -> str:
    if host.startswith("/"):
        return f"postgresql+asyncpg://{user}@/{database}?host={host}&port={port}"
    return f"postgresql+asyncpg://{user}@{host}:{port}/{database}"


async def connect(url: str) -> asyncpg.Connection:
    """A plain asyncpg connection to the database a SQLAlchemy URL names (for checks)."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    return await asyncpg.connect(
        host=parsed.query.get("host") or parsed.host,
        port=int(parsed.query.get("port") or parsed.port or 5432),
        user=parsed.username,
        database=parsed.database,
    )


async def fetch(url: str, query: str, *args: Any) -> list[dict[str, Any]]:
    conn = await connect(url)
    try:
        return [dict(row) for row in await conn.fetch(query, *args)]
    finally:
        await conn.close()


async def _admin() -> asyncpg.Connection:
    try:
        return await asyncpg.connect(host=HOST, port=PORT, user=USER, database="postgres")
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.fail(
            f"PostgreSQL is not reachable at {HOST}:{PORT} as role {USER!r} ({exc}). "
            "Run scripts/test.sh, which starts the cluster and creates the role, or set "
            "CHATMEM_TEST_PG_HOST/PORT/USER.",
            pytrace=False,
        )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def _drop_databases_of_dead_runs() -> None:
    """Databases left by runs that were killed before their teardown (their pid is gone)."""
    admin = await _admin()
    try:
        names = await admin.fetch(
            "SELECT datname FROM pg_database WHERE datname LIKE 'chatmem\\_test\\_%'"
        )
        for (name,) in names:
            pid = name.split("_")[2]
            if pid.isdigit() and not _alive(int(pid)):
                await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture(scope="session")
def pg_run_prefix() -> str:
    """The prefix of this run's throwaway databases (``chatmem_test_<pid>_<random>``)."""
    asyncio.run(_drop_databases_of_dead_runs())
    return f"chatmem_test_{os.getpid()}_{secrets.token_hex(3)}"


@pytest.fixture
async def pg_url(pg_run_prefix: str) -> AsyncIterator[str]:
    """A new, empty database for this test; dropped afterwards."""
    name = f"{pg_run_prefix}_{secrets.token_hex(4)}"
    admin = await _admin()
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield sqlalchemy_url(name)
    admin = await _admin()
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


def _tool(name: str) -> str:
    for candidate in (shutil.which(name), f"/usr/lib/postgresql/15/bin/{name}"):
        if candidate and os.path.exists(candidate):
            return candidate
    pytest.fail(f"PostgreSQL's {name} is not installed (apt-get install postgresql-15)")


class PrivateCluster:
    """A PostgreSQL cluster of our own in a temporary directory, on 127.0.0.1:<port>."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="chatmem-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        # PostgreSQL refuses to run as root: run it as the postgres user then.
        self._as_owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self._as_owner:
            shutil.chown(self.root, "postgres", "postgres")
        self._run(
            _tool("initdb"), "-D", str(self.data), "-A", "trust", "-U", "chatmem", "-E", "UTF8",
            "--no-sync",
        )  # fmt: skip
        self.url = f"postgresql+asyncpg://chatmem@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        done = subprocess.run([*self._as_owner, *args], capture_output=True, text=True, timeout=120)
        if done.returncode:
            pytest.fail(f"{' '.join(args[:2])} failed: {done.stderr.strip()}", pytrace=False)

    def start(self) -> None:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c fsync=off "
            "-c max_connections=50"
        )
        self._run(
            _tool("pg_ctl"), "-D", str(self.data), "-l", str(self.root / "log"), "-o", options,
            "-w", "start",
        )  # fmt: skip

    def stop(self) -> None:
        self._run(_tool("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def private_postgres() -> Iterator[PrivateCluster]:
    cluster = PrivateCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.remove()


@pytest.fixture(params=["sqlite", "postgresql"])
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same test on a SQLite file and on a PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'chatmem.db'}"
    url: str = request.getfixturevalue("pg_url")
    return url
