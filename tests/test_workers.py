"""``chatmem serve --workers 2``: two real processes on one port, one set of metrics."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import urllib.request
from pathlib import Path

import pytest
from deploy_helpers import json_lines, serve
from helpers import Process, free_port, run_chatmem
from prometheus_client.parser import text_string_to_metric_families


def _open(url: str, request_id: str, body: dict[str, object] | None = None) -> str:
    # urllib opens a new connection per request, so the kernel picks a worker each time.
    request = urllib.request.Request(
        url,
        data=None if body is None else json.dumps(body).encode(),
        headers={"X-Request-Id": request_id, "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=20) as response:
        assert response.status == 200
        assert response.headers["X-Request-Id"] == request_id
        return str(response.read().decode())


def served_by(stderr: str, request_ids: str) -> set[int]:
    """The pids of the workers whose access log has a request id starting with ``request_ids``."""
    return {
        line["pid"]
        for line in json_lines(stderr)
        if line.get("logger") == "chatmem.access" and line["request_id"].startswith(request_ids)
    }


def sample(metrics: str, name: str, labels: dict[str, str] | None = None) -> float:
    for family in text_string_to_metric_families(metrics):
        for s in family.samples:
            if s.name == name and s.labels == (labels or {}):
                return float(s.value)
    raise AssertionError(f"{name}{labels} not in the scrape")


def test_two_workers_share_the_port_and_metrics(tmp_path: Path) -> None:
    # --demo: the master runs the mock model; both workers use it.
    toml = '[log]\nformat = "json"\naccess = true\n'
    gateway = serve(tmp_path, "http://unused.invalid/v1", toml, "--workers", "2", "--demo")
    probes, chats = 64, 6
    try:
        # Both workers print their "listening" line on stdout once they accept connections.
        stdout = gateway.process.proc.stdout
        assert stdout is not None
        listening = [stdout.readline() for _ in range(2)]
        assert all(b"chatmem listening" in line for line in listening), listening
        for i in range(probes):
            _open(gateway.url + "/v1/health", f"probe-{i}")
        for i in range(chats):
            body = {"model": "m", "messages": [{"role": "user", "content": f"turn {i}"}]}
            _open(gateway.url + "/v1/chat/completions", f"chat-{i}", body)
        scrape = _open(gateway.url + "/metrics", "scrape")
    finally:
        code, stderr = gateway.stop(signal.SIGTERM)
    assert code == 0, stderr
    # The kernel spread the connections over both workers: each logged some of them.
    assert len(served_by(stderr, "probe-")) == 2
    # Whichever worker answered the scrape, it counted the requests of both (and the one
    # health check that found the gateway ready).
    health = sample(scrape, "chatmem_requests_total", {"route": "health", "status": "200"})
    assert health == probes + 1
    assert sample(scrape, "chatmem_requests_total", {"route": "chat", "status": "200"}) == chats
    assert sample(scrape, "chatmem_turns_committed_total") == chats
    assert sample(scrape, "chatmem_streams_in_flight") == 0


def test_one_conversation_across_two_workers_sees_every_turn(tmp_path: Path) -> None:
    """Each worker keeps its own window cache of the one SQLite file; a turn committed by
    the other worker must be in the next history either way.  The demo model answers
    with the number of messages it received, so every answer tells what history went."""
    toml = '[log]\nformat = "json"\naccess = true\n'
    gateway = serve(tmp_path, "http://unused.invalid/v1", toml, "--workers", "2", "--demo")
    turns = 16
    try:
        stdout = gateway.process.proc.stdout
        assert stdout is not None
        assert all(b"chatmem listening" in stdout.readline() for _ in range(2))
        for turn in range(1, turns + 1):
            body = {
                "model": "m",
                "conversation": "shared",
                "messages": [{"role": "user", "content": f"turn {turn}"}],
            }
            answer = json.loads(_open(gateway.url + "/v1/chat/completions", f"turn-{turn}", body))
            # Turn k goes upstream with the 2(k-1) stored messages and its own.
            assert f"({2 * turn - 1} messages)" in answer["choices"][0]["message"]["content"]
    finally:
        code, stderr = gateway.stop(signal.SIGTERM)
    assert code == 0, stderr
    assert len(served_by(stderr, "turn-")) == 2  # both workers took turns of the conversation


def test_a_conversation_cookie_works_on_every_worker(tmp_path: Path) -> None:
    """Without ``compat.session_secret`` the workers share the master's random key: a
    cookie one worker signed continues the conversation on the other."""
    toml = '[log]\nformat = "json"\naccess = true\n'
    gateway = serve(tmp_path, "http://unused.invalid/v1", toml, "--workers", "2", "--demo")
    turns, cookie = 12, ""
    try:
        stdout = gateway.process.proc.stdout
        assert stdout is not None
        assert all(b"chatmem listening" in stdout.readline() for _ in range(2))
        for turn in range(1, turns + 1):
            request = urllib.request.Request(
                gateway.url + "/conversation/m",
                data=json.dumps({"text": f"turn {turn}"}).encode(),
                headers={"X-Request-Id": f"turn-{turn}", "Cookie": cookie},
            )
            with urllib.request.urlopen(request, timeout=20) as response:
                text = response.read().decode()
                cookie = response.headers["Set-Cookie"].split(";")[0]
            # Turn k goes upstream with the 2(k-1) stored messages and its own.
            assert f"({2 * turn - 1} messages)" in text, (turn, text)
    finally:
        code, stderr = gateway.stop(signal.SIGTERM)
    assert code == 0, stderr
    assert len(served_by(stderr, "turn-")) == 2  # both workers took turns
    assert os.environ.get("CHATMEM_WORKERS_SESSION_SECRET") is None
    assert "CHATMEM_WORKERS_SESSION_SECRET" not in stderr
    warnings = [line for line in json_lines(stderr) if "session_secret" in line["message"]]
    assert len(warnings) == 1  # the master's, not one per worker


def _start_two_workers(tmp_path: Path) -> tuple[Process, list[int]]:
    """``serve --workers 2``, as soon as its master logged the workers' pids (they are
    still importing chatmem then)."""
    port = free_port()
    db = f"sqlite+aiosqlite:///{tmp_path / 'w.db'}"
    process = Process(["serve", "--workers", "2", "--port", str(port), "--db", db], cwd=tmp_path)
    stderr = process.proc.stderr
    assert stderr is not None
    for _ in range(50):  # bounded: the master's first lines
        line = stderr.readline().decode()
        if "started 2 workers" in line or not line:
            break
    assert "started 2 workers" in line, line
    return process, [int(pid) for pid in line.rsplit(":", 1)[1].split()]


def test_a_stop_while_the_workers_start_is_a_clean_exit(tmp_path: Path) -> None:
    """SIGTERM right after the master started its workers (``systemctl restart`` just
    after a start): the workers, still importing, have no handler yet and die of the
    SIGTERM passed on to them.  They were asked to stop and served nothing: exit 0, not
    the 1 that tells the process manager a worker failed."""
    process, pids = _start_two_workers(tmp_path)
    assert len(pids) == 2
    assert process.stop(signal.SIGTERM) == 0


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in path.read_text().split()] if path.exists() else []


def test_a_stop_while_many_workers_start_starts_no_more(tmp_path: Path) -> None:
    """The master started every worker asked for before it looked at a signal: with a
    large ``workers`` (a typo), SIGTERM was ignored while more and more processes came
    (found by a review: 46, then 84 of 100,000 after the SIGTERM).  A stop now ends the
    starting."""
    db = tmp_path / "chatmem.db"
    config = tmp_path / "chatmem.toml"
    config.write_text(f'[storage]\nurl = "sqlite+aiosqlite:///{db}"\n[server]\nworkers = 64\n')
    process = Process(["serve", "--config", str(config), "--port", str(free_port()), "--demo"])
    try:
        deadline = time.monotonic() + 30
        while not _children(process.proc.pid) and time.monotonic() < deadline:
            assert process.proc.poll() is None
            time.sleep(0.002)
        process.proc.send_signal(signal.SIGTERM)
        process.proc.wait(60)
        stderr = process.proc.stderr.read().decode() if process.proc.stderr else ""
    finally:
        process.stop(signal.SIGKILL)
    started = next(line for line in stderr.splitlines() if "started" in line and "workers" in line)
    count = int(started.split("started ", 1)[1].split()[0])
    assert count < 64, started
    assert process.proc.returncode == 0, stderr


def _started(pid: int) -> list[int]:
    """The children of ``pid`` that run a worker (past their ``exec``)."""
    started = []
    for child in _children(pid):
        try:
            if b"--worker" in Path(f"/proc/{child}/cmdline").read_bytes():
                started.append(child)
        except OSError:  # gone meanwhile
            continue
    return started


def test_a_terminals_ctrl_c_while_the_workers_start_is_no_traceback(tmp_path: Path) -> None:
    """Ctrl-C sends SIGINT to the terminal's whole process group: a worker still
    importing chatmem raised KeyboardInterrupt and printed (half of) its traceback before
    the master's SIGTERM ended it (found by a review).  Workers have a group of their
    own: the master alone gets the SIGINT, and stops them."""
    import subprocess
    import sys

    from helpers import SRC

    db = tmp_path / "chatmem.db"
    config = tmp_path / "chatmem.toml"
    config.write_text(f'[storage]\nurl = "sqlite+aiosqlite:///{db}"\n[server]\nworkers = 2\n')
    args = ["serve", "--config", str(config), "--port", str(free_port()), "--demo"]
    master = subprocess.Popen(
        [sys.executable, "-m", "chatmem", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": SRC},
        start_new_session=True,  # a group of its own, as a terminal's job is
    )
    try:
        deadline = time.monotonic() + 30
        while len(_started(master.pid)) < 2 and time.monotonic() < deadline:
            assert master.poll() is None
            time.sleep(0.005)
        workers = _started(master.pid)
        assert all(os.getpgid(pid) != master.pid for pid in workers)  # not in its group
        time.sleep(0.15)  # into their imports (which take longer), past Python's start
        os.killpg(master.pid, signal.SIGINT)  # the terminal's Ctrl-C, to the whole group
        _, stderr = master.communicate(timeout=60)
    finally:
        if master.poll() is None:
            master.kill()
            master.wait(5)
    assert "Traceback" not in stderr.decode(), stderr.decode()
    assert master.returncode == 0, stderr.decode()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sighup_stops_the_master_and_its_workers(tmp_path: Path) -> None:
    """SIGHUP (the terminal closed) to the master is a graceful stop of the whole set: it
    used to kill the master alone (exit 129) and leave both workers serving the port."""
    gateway = serve(tmp_path, "http://unused.invalid/v1", "", "--workers", "2", "--demo")
    code, stderr = gateway.stop(signal.SIGHUP)
    started = next(line for line in stderr.splitlines() if "started 2 workers" in line)
    pids = [int(pid) for pid in started.rsplit(":", 1)[1].split()]
    assert code == 0, stderr
    assert len(pids) == 2 and not any(_alive(pid) for pid in pids)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", gateway.port), timeout=5).close()


def test_a_demo_answer_in_flight_does_not_hold_the_master_at_a_stop(tmp_path: Path) -> None:
    """``--demo --workers 2`` stopped while a plain answer of 5,000 demo tokens (100 s) is
    being made: the workers end at their grace, and the master, which runs the demo
    model, waited for that answer to finish, up to aiohttp's 60 s (item 143). The demo
    model now gives its answers a second at a stop."""
    toml = "[server]\nshutdown_grace = 1\n"
    gateway = serve(tmp_path, "http://unused.invalid/v1", toml, "--workers", "2", "--demo")
    body = json.dumps({"model": "demo", "messages": [{"role": "user", "content": "x"}]})
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Mock-Tokens: 5000\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body.encode())
        )
        time.sleep(1)  # the worker has asked the demo model by now
        started = time.monotonic()
        code, stderr = gateway.stop(timeout=50)
        stopped_in = time.monotonic() - started
    assert code == 0, stderr
    # A bound for a hang, not a speed: 60 s before, about 2 s now (grace 1 s, then 1 s).
    assert stopped_in < 30, stderr


def test_workers_do_not_share_a_port_another_gateway_listens_on(tmp_path: Path) -> None:
    """Another ``serve --workers`` (its sockets set ``SO_REUSEPORT``, as this one stands for)
    already listens: the kernel would let the new workers in beside it, to take half of
    its connections into another database.  Refused, as a single ``serve`` is."""
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        db = f"sqlite+aiosqlite:///{tmp_path / 'x.db'}"
        result = run_chatmem(
            "serve", "--workers", "2", "--port", str(port), "--db", db, cwd=tmp_path
        )
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        f"chatmem: cannot listen on 127.0.0.1:{port}: Address already in use"
    )
    assert not (tmp_path / "x.db").exists()  # refused before anything was started


def _listening_pid(line: bytes) -> int:
    assert b"chatmem listening" in line, line
    return int(line.rsplit(b"(pid ", 1)[1].split(b")", 1)[0])


def test_a_worker_that_dies_is_replaced_while_the_others_serve_on(tmp_path: Path) -> None:
    """A worker killed (out of memory, a crash in a C library) after it listened: the
    master starts another in its place, and the other worker serves on.  Before, the
    master stopped the whole set and exited 1 for the process manager to start it again,
    cutting every other worker's requests short."""
    toml = '[log]\nformat = "json"\naccess = true\n'
    gateway = serve(tmp_path, "http://unused.invalid/v1", toml, "--workers", "2", "--demo")
    stdout = gateway.process.proc.stdout
    assert stdout is not None
    try:
        first, second = (_listening_pid(stdout.readline()) for _ in range(2))
        os.kill(first, signal.SIGKILL)
        # EOF (b"") if the master gave up instead: then this fails, it does not hang.
        third = _listening_pid(stdout.readline())
        assert third not in (first, second) and _alive(second) and not _alive(first)
        body = {"model": "m", "messages": [{"role": "user", "content": "still there?"}]}
        for i in range(16):  # a new connection each: the kernel picks either worker
            _open(gateway.url + "/v1/chat/completions", f"after-{i}", body)
    finally:
        code, stderr = gateway.stop(signal.SIGTERM)
    assert code == 0, stderr
    assert served_by(stderr, "after-") <= {second, third}
    replaced = [line["message"] for line in json_lines(stderr) if "in its place" in line["message"]]
    assert replaced == [f"worker {first} exited (-9); started worker {third} in its place"]
    assert not _alive(second) and not _alive(third)


def test_workers_that_keep_dying_are_replaced_later_each_time(tmp_path: Path) -> None:
    """A crash that every new worker meets: the first is replaced at once, the next ones
    after 0.5 s, then 1 s (they started about two a second, for as long as it lasted).
    A worker stopped on its own (SIGTERM to it alone: it drains and exits 0) is replaced
    too, with a warning rather than an error."""
    toml = '[log]\nformat = "json"\n'
    gateway = serve(tmp_path, "http://unused.invalid/v1", toml, "--workers", "2", "--demo")
    stdout = gateway.process.proc.stdout
    assert stdout is not None
    pids = [_listening_pid(stdout.readline()) for _ in range(2)]
    waited = []
    try:
        for sig in (signal.SIGKILL, signal.SIGKILL, signal.SIGTERM):
            killed = time.monotonic()
            os.kill(pids[-1], sig)
            pids.append(_listening_pid(stdout.readline()))  # EOF (b"") fails, not hangs
            waited.append(time.monotonic() - killed)
    finally:
        code, stderr = gateway.stop(signal.SIGTERM)
    assert code == 0, stderr
    assert waited[1] >= 0.5 and waited[2] >= 1.0
    replaced = [
        (line["level"], line["message"])
        for line in json_lines(stderr)
        if "in its place" in line["message"] or "in place of" in line["message"]
    ]
    assert replaced == [
        ("error", f"worker {pids[1]} exited (-9); started worker {pids[2]} in its place"),
        # Said at once, before the wait: the operator hears of a death when it happens.
        (
            "error",
            f"worker {pids[2]} exited (-9); another starts in its place in 0.5 s"
            " (2 in a row died within 30 s)",
        ),
        ("info", f"started worker {pids[3]} in place of worker {pids[2]}"),
        (
            "warning",
            f"worker {pids[3]} exited (0); another starts in its place in 1 s"
            " (3 in a row died within 30 s)",
        ),
        ("info", f"started worker {pids[4]} in place of worker {pids[3]}"),
    ]


def test_a_worker_that_dies_before_it_listens_stops_the_set(tmp_path: Path) -> None:
    """A worker that dies while it starts would die again (its address, its database):
    the master stops the others and exits 1, so the process manager sees the failure
    rather than a master starting workers in a loop."""
    process, pids = _start_two_workers(tmp_path)
    os.kill(pids[0], signal.SIGKILL)  # still importing chatmem: it has not listened
    _, err = process.proc.communicate(timeout=30)  # and closes the pipes
    rest = err.decode()
    assert process.proc.returncode == 1, rest
    assert f"worker {pids[0]} exited (-9) before it listened" in rest
    assert "in its place" not in rest and not _alive(pids[1])


def test_the_workers_stop_when_their_master_is_killed(tmp_path: Path) -> None:
    """``kill -9`` of the master (systemd's control group is not everywhere): its workers
    used to keep serving the port, unsupervised, where a new master's workers would join
    them.  Each now gets SIGTERM from the kernel when its master dies, and drains."""
    gateway = serve(tmp_path, "http://unused.invalid/v1", "", "--workers", "2", "--demo")
    stdout = gateway.process.proc.stdout
    assert stdout is not None
    pids = [_listening_pid(stdout.readline()) for _ in range(2)]
    code, _ = gateway.stop(signal.SIGKILL)
    assert code == -signal.SIGKILL
    for _ in range(200):  # bounded: up to 20 s for both to drain and exit
        if not any(_alive(pid) for pid in pids):
            break
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in pids)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", gateway.port), timeout=5).close()


def test_a_dead_masters_metrics_directory_is_removed_by_the_next(tmp_path: Path) -> None:
    """A master killed with SIGKILL leaves its directory of metric files in the temporary
    directory (found by a review: 126 of them); the next master removes those of masters
    that are gone, and no other."""
    import shutil
    import subprocess
    import sys
    import tempfile

    from chatmem.workers import _metrics_dir

    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    dead_pid = int(gone.stdout)
    temp = Path(tempfile.gettempdir())
    dead = temp / f"chatmem-metrics-{dead_pid}-test"
    alive = temp / f"chatmem-metrics-{os.getpid()}-test"
    other = temp / "chatmem-metrics-notapid"
    made = None
    try:
        for path in (dead, alive, other):
            path.mkdir(exist_ok=True)
            (path / "counter_1.db").write_bytes(b"x")
        made, owned = _metrics_dir({})
        assert owned and Path(made).name.startswith(f"chatmem-metrics-{os.getpid()}-")
        assert not dead.exists()
        assert alive.exists() and other.exists()
    finally:
        for path in (dead, alive, other, *([Path(made)] if made else [])):
            shutil.rmtree(path, ignore_errors=True)
