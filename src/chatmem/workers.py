"""``chatmem serve --workers N``: N gateway processes sharing one port.

The master creates the database schema once (so workers do not race to create it), gives
the workers a fresh prometheus-client multiprocess directory (so ``/metrics`` on any worker
adds up all of them), starts them (``chatmem serve --worker``: ``SO_REUSEPORT`` on the same
host and port, the kernel spreads connections over them), passes SIGTERM, SIGINT or SIGHUP
on as SIGTERM and waits.
Each worker then shuts down gracefully on its own.  A worker that dies after it started
listening (killed, out of memory, a crash) is replaced by a new one, while the others
serve on: only the requests it had in flight are lost.  Workers that keep dying soon after
they start are replaced with a growing delay (:class:`_Backoff`), so a crash that comes
back in every new worker does not turn the master into a loop of start-ups.  A worker that
dies before it
listens would die again (its address, its database): the master then stops the others and
exits 1, so the process manager sees the failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import logging
import os
import secrets
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from prometheus_client.multiprocess import mark_process_dead

from .config import Config
from .metrics import MULTIPROC_ENV
from .storage import Store, create_engine

__all__ = ["SESSION_SECRET_ENV", "run_workers", "stop_with_master", "tell_master", "worker_config"]

SESSION_SECRET_ENV = "CHATMEM_WORKERS_SESSION_SECRET"
"""How the master hands its workers the one random ``compat.session_secret`` they share
when the configuration sets none (the environment: never on a command line)."""

READY_FD_ENV = "CHATMEM_WORKER_READY_FD"
"""The pipe a worker writes one byte to once it listens (see :func:`tell_master`)."""

MASTER_PID_ENV = "CHATMEM_WORKER_MASTER_PID"
"""The master's pid, for a worker to tell whether it is still there (see
:func:`stop_with_master`)."""

_PR_SET_PDEATHSIG = 1

_SETTLED_S = 30.0
"""A worker that served this long before it died was not killed by what kills every new
one: its replacement starts at once, and the back-off starts over."""
_FIRST_DELAY_S = 0.5
_MAX_DELAY_S = 30.0

log = logging.getLogger("chatmem")

# prometheus-client leaves this function unannotated; this is its signature.
_mark_process_dead: Callable[[int, str], object] = mark_process_dead


def run_workers(config: Config, worker_args: list[str], *, demo: bool) -> int:
    return asyncio.run(_supervise(config, worker_args, demo))


def worker_config(config: Config) -> Config:
    """A worker's configuration: with the master's session secret when it sets none."""
    secret = os.environ.pop(SESSION_SECRET_ENV, None)
    if secret is None or config.compat.session_secret:
        return config
    return dataclasses.replace(
        config, compat=dataclasses.replace(config.compat, session_secret=secret)
    )


def stop_with_master() -> None:
    """In a worker, on Linux: ask the kernel for a SIGTERM when its master dies.  A master
    killed with ``kill -9`` left its workers serving the port, unsupervised, where a new
    master's workers would join them (``SO_REUSEPORT``)."""
    master = os.environ.pop(MASTER_PID_ENV, None)
    if master is None or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(master):  # it died before the request: nobody sends it now
        os.kill(os.getpid(), signal.SIGTERM)


def tell_master() -> None:
    """In a worker: say that it listens, on the pipe its master gave it (no-op elsewhere)."""
    fd = os.environ.pop(READY_FD_ENV, None)
    if fd is None:
        return
    with contextlib.suppress(OSError, ValueError):  # a master gone: nobody to tell
        try:
            os.write(int(fd), b"1")
        finally:
            os.close(int(fd))


@dataclasses.dataclass(frozen=True)
class _Worker:
    process: asyncio.subprocess.Process
    listened: asyncio.Task[bool]
    """True once it listens; False if it exited first."""
    exited: asyncio.Task[int]
    started: float
    """``loop.time()`` when it was started."""


class _Backoff:
    """How long to wait before replacing a worker that died: at once for the first of a
    row of workers that died within ``_SETTLED_S`` of their start (one killed by the
    out-of-memory killer, say), then 0.5 s, doubling up to 30 s for each next one (a crash
    that every new worker meets: without a delay the master started about two a second,
    each importing chatmem on a core the others serve on)."""

    def __init__(self) -> None:
        self.early_deaths = 0

    def delay(self, lived: float) -> float:
        if lived >= _SETTLED_S:
            self.early_deaths = 0
            return 0.0
        self.early_deaths += 1
        if self.early_deaths == 1:
            return 0.0
        return float(min(_FIRST_DELAY_S * 2 ** (self.early_deaths - 2), _MAX_DELAY_S))


async def _start_worker(command: list[str], env: dict[str, str]) -> _Worker:
    read_end, write_end = os.pipe()  # neither is inherited but by pass_fds
    try:
        process = await asyncio.create_subprocess_exec(
            *command,
            env={**env, READY_FD_ENV: str(write_end), MASTER_PID_ENV: str(os.getpid())},
            pass_fds=(write_end,),
            # A group of its own: a terminal's Ctrl-C (SIGINT to the foreground group)
            # reaches the master alone, which stops the workers with SIGTERM.  A worker
            # still importing chatmem took it for a KeyboardInterrupt, with a traceback.
            process_group=0,
        )
    except BaseException:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)  # the worker holds the only write end: EOF when it exits
    listened = asyncio.create_task(_reads_a_byte(read_end))
    exited = asyncio.create_task(process.wait())
    return _Worker(process, listened, exited, asyncio.get_running_loop().time())


async def _reads_a_byte(fd: int) -> bool:
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0)
    )
    try:
        return await reader.read(1) == b"1"
    finally:
        transport.close()


async def _create_schema(config: Config) -> None:
    """Create an empty database's schema; refuse an out-of-date one (``SchemaError``)."""
    store = Store(create_engine(config.storage))
    try:
        await store.check_schema()
    finally:
        await store.close()


def _metrics_dir(env: dict[str, str]) -> tuple[str, bool]:
    """The multiprocess directory, emptied; and whether we created it (and remove it)."""
    given = env.get(MULTIPROC_ENV)
    if not given:
        _remove_dead_masters_dirs()
        return tempfile.mkdtemp(prefix=f"{_OWN_DIRS}{os.getpid()}-"), True
    path = Path(given)
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):  # values of a previous run must not be added up
        stale.unlink()
    return given, False


_OWN_DIRS = "chatmem-metrics-"
"""The prefix of the directories masters make, followed by the master's pid."""


def _remove_dead_masters_dirs() -> None:
    """Remove the directories of masters that died without removing theirs (``kill -9``,
    a crash): each held its workers' metric files, and they piled up in the temporary
    directory with every such death."""
    for path in Path(tempfile.gettempdir()).glob(f"{_OWN_DIRS}*-*"):
        pid = path.name[len(_OWN_DIRS) :].split("-", 1)[0]
        if not pid.isdigit() or not path.is_dir():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:  # dead (a pid taken again since is left alone)
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:  # alive, another user's
            continue


async def _replace(
    worker: _Worker,
    code: int,
    backoff: _Backoff,
    stopping: asyncio.Task[bool],
    command: list[str],
    env: dict[str, str],
) -> _Worker | None:
    """Start a worker in place of one that exited after it listened, after the back-off;
    None if a stop came meanwhile.  Exit status 0 is a worker stopped on its own (a
    SIGTERM sent to it alone), logged as a warning; anything else is a crash."""
    level = logging.WARNING if code == 0 else logging.ERROR
    pid = worker.process.pid
    loop = asyncio.get_running_loop()
    delay = backoff.delay(loop.time() - worker.started)
    if delay:  # said now: the wait may be long, or end in a stop
        log.log(
            level,
            "worker %d exited (%s); another starts in its place in %g s"
            " (%d in a row died within %g s)",
            pid,
            code,
            delay,
            backoff.early_deaths,
            _SETTLED_S,
        )
        await asyncio.wait([stopping], timeout=delay)
        if stopping.done():
            return None
    replacement = await _start_worker(command, env)
    if delay:
        log.info("started worker %d in place of worker %d", replacement.process.pid, pid)
    else:
        log.log(
            level,
            "worker %d exited (%s); started worker %d in its place",
            pid,
            code,
            replacement.process.pid,
        )
    return replacement


async def _supervise(config: Config, worker_args: list[str], demo: bool) -> int:
    from .cli import STOP_SIGNALS, start_demo_upstream, stop_event_on_signals

    stop = stop_event_on_signals()
    mock: asyncio.Task[None] | None = None
    if demo:
        config, mock = start_demo_upstream(config)
        worker_args = [*worker_args, "--upstream", config.upstream.url]
    await _create_schema(config)
    env = dict(os.environ)
    if not config.compat.session_secret:
        # Each worker would otherwise make its own key, and a /conversation cookie one
        # worker signed would start a new conversation whenever the other one got it.
        log.warning(
            "compat.session_secret is not set: /conversation session cookies are signed "
            "with a random key and stop working when the gateway stops"
        )
        env[SESSION_SECRET_ENV] = secrets.token_urlsafe(32)
    metrics_dir, owned = _metrics_dir(env)
    env[MULTIPROC_ENV] = metrics_dir
    command = [sys.executable, "-m", "chatmem", "serve", *worker_args, "--worker"]
    workers: list[_Worker] = []
    while len(workers) < config.server.workers and not stop.is_set():  # a stop ends it
        workers.append(await _start_worker(command, env))
    pids = " ".join(str(w.process.pid) for w in workers)
    log.info("started %d workers: %s", len(workers), pids)
    stopping = asyncio.create_task(stop.wait())
    backoff = _Backoff()
    crashed = False
    while not crashed and not stop.is_set():
        await asyncio.wait(
            [stopping, *(w.exited for w in workers)], return_when=asyncio.FIRST_COMPLETED
        )
        for worker in [w for w in workers if w.exited.done()]:
            if stop.is_set():
                break
            workers.remove(worker)
            _mark_process_dead(worker.process.pid, metrics_dir)
            code = worker.exited.result()
            if not await worker.listened:  # it would die again: let the manager see it
                log.error("worker %d exited (%s) before it listened", worker.process.pid, code)
                crashed = True
            elif not crashed:
                replacement = await _replace(worker, code, backoff, stopping, command, env)
                if replacement is not None:
                    workers.append(replacement)
    if crashed:
        log.error("stopping the other workers")
    for worker in workers:
        if worker.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(signal.SIGTERM)
    codes = await asyncio.gather(*(w.exited for w in workers))
    stopping.cancel()
    for worker in workers:
        worker.listened.cancel()
        _mark_process_dead(worker.process.pid, metrics_dir)
    await asyncio.gather(*(w.listened for w in workers), return_exceptions=True)
    if owned:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    if mock is not None:
        mock.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await mock
    log.info("workers exited with %s", codes)
    # A worker still starting when the master passed SIGTERM on (or the terminal's SIGINT
    # or SIGHUP reached it) has no handler for it yet and dies of it: stopped before it
    # served anything, as it was asked to.
    stopped = (0, *(-sig for sig in STOP_SIGNALS)) if not crashed else (0,)
    return 1 if crashed or any(code not in stopped for code in codes) else 0
