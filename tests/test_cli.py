"""The ``chatmem`` command as a user runs it: real processes, the official openai SDK."""

from __future__ import annotations

import asyncio
import getpass
import json
import shutil
import signal
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pg
import pytest
from helpers import Process, free_port, run_chatmem

from chatmem.cli import listening_line
from chatmem.config import load_config


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_chatmem(*args, env=env)


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    db = tmp_path / "demo.db"
    process = Process(
        ["serve", "--demo", "--port", str(port), "--db", f"sqlite+aiosqlite:///{db}"], cwd=tmp_path
    )
    process.wait_ready(f"http://127.0.0.1:{port}/v1/health")
    yield f"http://127.0.0.1:{port}/v1"
    assert process.stop(signal.SIGINT) == 0


def test_demo_with_the_openai_sdk(demo: str) -> None:
    client = openai.OpenAI(base_url=demo, api_key="unused", max_retries=0)
    headers = {"X-Conversation-Id": "sdk-1"}
    first = client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "hello"}], extra_headers=headers
    )
    assert first.choices[0].message.content.startswith("Echo hello")
    stream = client.chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": "again"}],
        stream=True,
        stream_options={"include_usage": True},
        extra_headers=headers,
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    # The mock counts the messages it was sent: the first exchange came back as history.
    assert "(3 messages)" in text
    raw = client.chat.completions.with_raw_response.create(
        model="demo", messages=[{"role": "user", "content": "new"}]
    )
    assert raw.headers["x-conversation-id"].startswith("conv_")
    assert [m.id for m in client.models.list()] == ["mock-model"]


def test_config_error_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[server]\nport = "seven"\n')
    result = run("serve", "--config", str(bad))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "server.port" in result.stderr
    env_result = run(
        "serve", env={"CHATMEM_CONFIG": str(tmp_path / "missing.toml"), "PATH": "/usr/bin"}
    )
    assert env_result.returncode == 2 and "missing.toml" in env_result.stderr


@pytest.mark.parametrize("url", ["foo://bar", "garbage", "mysql://u:hunter2@db.example/app"])
def test_a_storage_url_without_an_async_driver_we_run_is_a_config_error(
    tmp_path: Path, url: str
) -> None:
    result = run_chatmem("serve", "--db", url, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("chatmem: config error: storage.url: use sqlite+aiosqlite")
    assert result.stderr.strip().count("\n") == 0
    assert "hunter2" not in result.stderr


@pytest.mark.parametrize(
    "command",
    [["serve", "--workers", "2"], ["db", "upgrade"]],  # the two places that check
)
def test_a_sqlite_file_where_there_can_be_none_is_a_config_error(
    tmp_path: Path, command: list[str]
) -> None:
    # SQLite says only "unable to open database file", naming nothing.
    db = f"sqlite+aiosqlite:///{tmp_path / 'nope' / 'x.db'}"
    result = run_chatmem(*command, "--db", db, cwd=tmp_path)
    assert (result.returncode, result.stderr) == (
        2,
        f"chatmem: config error: storage.url: no directory {tmp_path / 'nope'}\n",
    )
    assert not (tmp_path / "nope").exists()
    # A directory is no file: SQLite made a file of "dir/", and said nothing of "dir".
    (tmp_path / "dir").mkdir()
    for written in ("dir/", "dir"):
        db = f"sqlite+aiosqlite:///{tmp_path / written}"
        result = run_chatmem(*command, "--db", db, cwd=tmp_path)
        assert (result.returncode, result.stderr) == (
            2,
            f"chatmem: config error: storage.url: {tmp_path / 'dir'} is a directory;"
            " name a file in it\n",
        )


def test_an_in_memory_sqlite_url_is_for_one_serve(tmp_path: Path) -> None:
    # "?mode=memory" was a TypeError traceback (SQLAlchemy's single-connection pool was
    # given the pool's sizes); it is an in-memory database like ":memory:".
    for url in ("sqlite+aiosqlite:///:memory:", "sqlite+aiosqlite:///x.db?mode=memory"):
        # The db commands would make one for themselves, gone when they end.
        result = run_chatmem("db", "check", "--db", url, cwd=tmp_path)
        assert (result.returncode, result.stderr) == (
            2,
            "chatmem: config error: storage.url: an in-memory database holds nothing"
            " outside the `chatmem serve` that made it\n",
        )
        # One per process: workers would each keep their own.
        result = run_chatmem("serve", "--workers", "2", "--db", url, cwd=tmp_path)
        assert (result.returncode, result.stderr) == (
            2,
            "chatmem: config error: storage.url: an in-memory database belongs to one"
            " process; with server.workers > 1 each worker would keep its own: use a file\n",
        )
    assert not list(tmp_path.iterdir())  # nothing made here ("x.db" is no file)


def test_serve_lifts_the_open_file_limit_to_the_hard_one(tmp_path: Path) -> None:
    # Each stream holds two descriptors: under systemd's soft limit of 1024 a gateway
    # would refuse connections at about 500 streams.
    prlimit = shutil.which("prlimit")
    assert prlimit is not None, "prlimit (util-linux) is needed"
    port = free_port()
    db = f"sqlite+aiosqlite:///{tmp_path / 'x.db'}"
    process = Process(
        ["serve", "--port", str(port), "--db", db, "--upstream", "http://127.0.0.1:9/v1"],
        cwd=tmp_path,
        prefix=(prlimit, "--nofile=256:4096"),  # prlimit execs chatmem: the same pid
    )
    try:
        process.wait_ready(f"http://127.0.0.1:{port}/v1/health")
        limits = Path(f"/proc/{process.proc.pid}/limits").read_text()
        (line,) = [line for line in limits.splitlines() if line.startswith("Max open files")]
        assert line.split()[3:5] == ["4096", "4096"]
    finally:
        assert process.stop(signal.SIGTERM) == 0


def test_an_address_that_cannot_be_bound_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        db = f"sqlite+aiosqlite:///{tmp_path / 'x.db'}"
        result = run_chatmem("serve", "--port", str(port), "--db", db, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        f"chatmem: cannot listen on 127.0.0.1:{port}: Address already in use"
    )
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "x.db").exists()  # told before a database was made


@pytest.mark.parametrize("problem", ["no such database", "a wrong password"])
async def test_a_database_that_refuses_the_gateway_is_one_line(
    tmp_path: Path, problem: str
) -> None:
    """Refused for good at start-up (not merely unreachable): one line with the server's
    own words, not a traceback of SQLAlchemy's wrapper."""
    if problem == "no such database":
        url, said = pg.sqlalchemy_url("chatmem_no_such_database"), "does not exist"
    else:  # the socket's peer authentication ignores passwords: go through TCP
        url = f"postgresql://{getpass.getuser()}:wrong-pw@127.0.0.1:{pg.PORT}/postgres"
        said = "password authentication failed"
    result = await asyncio.to_thread(run_chatmem, "serve", "--db", url, cwd=tmp_path)
    assert result.returncode == 1
    last = result.stderr.splitlines()[-1]
    assert last.startswith("chatmem: cannot use the conversation store: ") and said in last
    assert "Traceback" not in result.stderr and "wrong-pw" not in result.stderr


def test_mock_upstream_refuses_what_it_cannot_do() -> None:
    negative = run("mock-upstream", "--tokens", "-1")
    assert negative.returncode == 2
    assert "argument --tokens: must be at least 0, not -1" in negative.stderr
    # What it wants, where argparse said "invalid parse value" (item 143).
    for flag, value, wanted in (
        ("--delay-ms", "abc", "a number"),
        ("--tokens", "1.5", "a whole number"),
    ):
        refused = run("mock-upstream", flag, value)
        assert refused.returncode == 2
        assert f"argument {flag}: must be {wanted}, not '{value}'" in refused.stderr


def test_the_help_names_every_command_and_the_defaults() -> None:
    """Item 143: the top help named three of the four commands (not db), with reST
    backticks, and serve's --host and --port said nothing of their defaults."""
    top = run("--help")
    assert top.returncode == 0
    assert "``" not in top.stdout
    assert all(name in top.stdout for name in ("mock-upstream", "token", "(db)"))
    serve = run("serve", "--help").stdout
    assert "(default 127.0.0.1)" in serve and "(default 7001)" in serve
    beyond = run("mock-upstream", "--port", "99999")  # used to listen on 99999 - 65536
    assert beyond.returncode == 2
    assert "argument --port: must be 0 to 65535, not 99999" in beyond.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = run("mock-upstream", "--port", str(port))
    assert busy.returncode == 1 and busy.stdout == ""  # no "mock upstream on ..." line
    assert busy.stderr == f"chatmem: cannot listen on 127.0.0.1:{port}: Address already in use\n"


def test_mock_upstream_on_port_0_names_its_port_and_stops_on_sigterm() -> None:
    process = Process(["mock-upstream", "--port", "0"])
    try:
        assert process.proc.stdout is not None
        line = process.proc.stdout.readline().decode()
        assert line.startswith("mock upstream on http://127.0.0.1:") and ":0/" not in line
        with urllib.request.urlopen(line.split()[-1] + "/models", timeout=10) as models:
            assert models.status == 200
    finally:
        assert process.stop(signal.SIGTERM) == 0  # was 143: killed by the signal


def test_demo_says_that_it_replaces_a_given_upstream(tmp_path: Path) -> None:
    port = free_port()
    db = f"sqlite+aiosqlite:///{tmp_path / 'a.db'}"
    upstream = "http://127.0.0.1:9/v1"
    process = Process(
        ["serve", "--demo", "--port", str(port), "--db", db, "--upstream", upstream],
        cwd=tmp_path,
    )
    process.wait_ready(f"http://127.0.0.1:{port}/v1/health")
    process.proc.send_signal(signal.SIGINT)
    out, err = process.proc.communicate(timeout=20)
    assert process.proc.returncode == 0
    assert "--demo: the built-in mock model is the upstream; upstream.url is not used" in (
        err.decode()
    )
    assert "(demo model)" in out.decode()


def test_serving_without_auth_says_so(tmp_path: Path) -> None:
    port = free_port()
    process = Process(
        ["serve", "--port", str(port), "--db", f"sqlite+aiosqlite:///{tmp_path / 'a.db'}"],
        cwd=tmp_path,
    )
    process.wait_ready(f"http://127.0.0.1:{port}/v1/health")
    process.proc.send_signal(signal.SIGINT)
    _, err = process.proc.communicate(timeout=20)
    assert process.proc.returncode == 0
    assert "INFO chatmem auth is off (no auth.jwt_secret" in err.decode()


def test_mock_upstream_command() -> None:
    port = free_port()
    process = Process(["mock-upstream", "--port", str(port), "--tokens", "3"])
    try:
        process.wait_ready(f"http://127.0.0.1:{port}/v1/models")
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            data=json.dumps(
                {"model": "m", "messages": [{"role": "user", "content": "a b"}]}
            ).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as resp:
            body = json.load(resp)
        assert body["choices"][0]["message"]["content"] == "Echo a b"
    finally:
        process.stop(signal.SIGINT)


def test_token_encode_decode() -> None:
    claims = '{"team_id": "tenstorrent", "token_id": "debug-test"}'
    encoded = run("token", "encode", "--secret", "s", claims)
    assert encoded.returncode == 0
    token = encoded.stdout.strip()
    decoded = run("token", "decode", "--secret", "s", token)
    assert json.loads(decoded.stdout) == {"team_id": "tenstorrent", "token_id": "debug-test"}
    wrong = run("token", "decode", "--secret", "other", token)
    assert wrong.returncode == 1 and "invalid token" in wrong.stderr
    expiring = run("token", "encode", "--secret", "s", "--exp", "60", claims)
    assert "exp" in json.loads(
        run("token", "decode", "--secret", "s", expiring.stdout.strip()).stdout
    )


@pytest.mark.parametrize(
    ("host", "url"), [("::1", "http://[::1]:7001/v1"), ("0.0.0.0", "http://0.0.0.0:7001/v1")]
)
def test_the_listening_line_names_a_url(host: str, url: str) -> None:
    config = load_config(None, overrides={"server": {"host": host}}, env={})
    assert listening_line(config, demo=False).startswith(f"chatmem listening on {url} -> ")
