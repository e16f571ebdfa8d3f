"""The chatmem command: serve the gateway, run the mock model (mock-upstream), make and
read JWTs (token), and manage the database schema (db)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import ipaddress
import logging
import os
import select
import signal
import socket
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from aiohttp import web
from sqlalchemy.engine import make_url

from .app import create_app
from .config import Config, ConfigError, UpstreamConfig, find_config_file, load_config
from .db_cli import add_db_commands, driver_error, one_line, run_db, sqlite_path_problem
from .errors import StorageUnavailable
from .logs import configure_logging
from .storage.engine import in_memory
from .storage.migrate import SchemaError
from .token_cli import add_token_parser, run_token

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatmem", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", help="TOML config file (else $CHATMEM_CONFIG, ./chatmem.toml)")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 7001)")
    serve.add_argument("--upstream", help="base URL of the OpenAI-compatible server, with /v1")
    serve.add_argument("--db", help="storage URL, e.g. sqlite+aiosqlite:///chatmem.db")
    serve.add_argument(
        "--demo", action="store_true", help="run the built-in mock model as the upstream"
    )
    serve.add_argument(
        "--workers", type=int, help="processes sharing the port (SO_REUSEPORT); default 1"
    )
    serve.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # internal

    mock = commands.add_parser("mock-upstream", help="run the built-in fake model server")
    mock.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1")
    mock.add_argument(
        "--port", type=_port, default=8000, help="default 8000; 0: one the system chooses"
    )
    mock.add_argument(
        "--tokens", type=_at_least_0(int), default=16, help="tokens per answer (default 16)"
    )
    mock.add_argument(
        "--delay-ms",
        type=_at_least_0(float),
        default=0.0,
        help="milliseconds between tokens (default 0)",
    )

    add_token_parser(commands)
    add_db_commands(commands)
    return parser


def _serve_overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    overrides: dict[str, dict[str, Any]] = {}
    for section, key, value in (
        ("server", "host", args.host),
        ("server", "port", args.port),
        ("upstream", "url", args.upstream),
        ("storage", "url", args.db),
        ("server", "workers", args.workers),
    ):
        if value is not None:
            overrides.setdefault(section, {})[key] = value
    return overrides


def _worker_args(args: argparse.Namespace) -> list[str]:
    """The ``serve`` flags a worker is started with (it reads the same config file)."""
    out = ["--config", args.config] if args.config else []
    for flag, value in (
        ("--host", args.host),
        ("--port", args.port),
        ("--upstream", args.upstream),
        ("--db", args.db),
    ):
        if value is not None:
            out += [flag, str(value)]
    return out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_demo_upstream(config: Config) -> tuple[Config, asyncio.Task[None]]:
    """Run the mock model in this process; ``config`` pointed at it."""
    from .mock_upstream import run_mock_upstream

    if config.upstream.url != UpstreamConfig().url:
        logging.getLogger("chatmem").warning(
            "--demo: the built-in mock model is the upstream; upstream.url is not used"
        )
    port = _free_port()
    task = asyncio.create_task(run_mock_upstream("127.0.0.1", port, tokens=16, delay_ms=20))
    upstream = dataclasses.replace(config.upstream, url=f"http://127.0.0.1:{port}/v1")
    return dataclasses.replace(config, upstream=upstream), task


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def stop_event_on_signals() -> asyncio.Event:
    """An event set by SIGTERM, SIGINT or SIGHUP (a second signal changes nothing).

    SIGHUP (the terminal went away, or a manager's "reload") is a graceful stop, not a
    reload: without a handler it killed the process at once, and a ``--workers`` master
    died leaving its workers on the port.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    return stop


class CannotListen(Exception):
    """The server's address cannot be bound; the message is the one line to print."""


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _bind_failure(exc: OSError) -> str:
    """Why a bind failed (asyncio's message repeats the address; the errno's text is why)."""
    errno = None if isinstance(exc, socket.gaierror) else exc.errno
    return os.strerror(errno) if errno else (exc.strerror or str(exc))


def listening_line(config: Config, demo: bool) -> str:
    """The one line ``serve`` prints on stdout once it serves."""
    host = config.server.host
    if ":" in host:  # an IPv6 address goes in brackets in a URL
        host = f"[{host}]"
    line = (
        f"chatmem listening on http://{host}:{config.server.port}/v1 "
        f"-> {config.upstream.url}{' (demo model)' if demo else ''} (pid {os.getpid()})"
    )
    if config.log.format == "json":  # a log shipper reading stdout too parses every line
        from .logs import JsonFormatter

        record = logging.makeLogRecord({"name": "chatmem", "levelname": "INFO", "msg": line})
        line = JsonFormatter().format(record)
    return line


def _check_address_free(host: str, port: int) -> None:
    """Raise :class:`CannotListen` if something listens on ``host:port`` already.

    Workers bind with ``SO_REUSEPORT``, which the kernel allows next to any socket of the
    same user that set it too: a second ``serve --workers`` on a port in use would start
    and take half of the other gateway's connections.  A bind without it, as a single
    ``serve`` makes, fails then (``SO_REUSEADDR`` only passes connections in TIME_WAIT).
    """
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, proto, _, address in addresses:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                probe.bind(address)
    except OSError as exc:
        raise CannotListen(f"cannot listen on {host}:{port}: {_bind_failure(exc)}") from None


def _port(text: str) -> int:
    """An argparse type: a TCP port, 0 to 65535 (0: the system chooses)."""
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0 to 65535, not {text}")
    return port


def _at_least_0(kind: Callable[[str], float]) -> Callable[[str], float]:
    """An argparse type: ``kind`` (int or float) of the text, refused below 0."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            word = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"must be {word}, not {text!r}") from None
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be at least 0, not {text}")
        return value

    return parse


def raise_open_file_limit() -> None:
    """Lift the soft limit on open files to the hard one, as Go programs do at start.

    Every stream holds two descriptors (the client's and the upstream's), and the soft
    limit is often 1024 (systemd's default for services): about 500 streams, then
    ``EMFILE``.  The hard limit is the administrator's; this only stops leaving it unused.
    """
    if sys.platform == "win32":
        return
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = _MOST_FILES if hard == resource.RLIM_INFINITY else min(hard, _MOST_FILES)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):  # a sandbox may refuse; 1024 works
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


_MOST_FILES = 1 << 20
"""Linux's default ``fs.nr_open``: no process may open more."""


async def _serve(config: Config, demo: bool, reuse_port: bool = False) -> None:
    from .logs import AccessLogger
    from .server import GatewayRunner

    raise_open_file_limit()
    stop = stop_event_on_signals()
    tasks: list[asyncio.Task[None]] = []
    if demo:
        config, mock = start_demo_upstream(config)
        tasks.append(mock)
    runner = GatewayRunner(
        create_app(config),
        handle_signals=False,
        handler_cancellation=True,
        # In-flight chatmem requests were already given shutdown_grace in on_shutdown.
        shutdown_timeout=config.server.shutdown_grace,
        access_log_class=AccessLogger,
        access_log=logging.getLogger("chatmem.access") if config.log.access else None,
        keepalive_timeout=config.server.idle_timeout,
    )
    await runner.setup()
    # A burst of new clients must not overflow the accept queue: the default of 128 made
    # 256 simultaneous connections wait a second for a SYN retransmit.
    site = web.TCPSite(
        runner, config.server.host, config.server.port, reuse_port=reuse_port, backlog=1024
    )
    try:
        await site.start()
    except OSError as exc:  # in use, not an address of this machine, not allowed
        await runner.cleanup()
        for task in tasks:
            task.cancel()
        where = f"{config.server.host}:{config.server.port}"
        raise CannotListen(f"cannot listen on {where}: {_bind_failure(exc)}") from None
    # Everything alive now (modules, the app, the config) lives as long as the process:
    # take it out of the collector's reach, so that a full collection walks only what
    # requests create.  Without this a full collection, which the allocations of a burst
    # of requests trigger, walked every imported module's objects: pauses of up to 50 ms
    # in the middle of 256 concurrent streams (benchmarks/).
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    if reuse_port:  # a worker: its master starts another in its place if it dies now
        from .workers import tell_master

        # Before the line: whoever sees a worker's line knows its master counts it as
        # listening (a worker killed between the two was taken for one that never did).
        tell_master()
    print(listening_line(config, demo), flush=True)
    if not config.auth.enabled:
        # An empty secret (``jwt_secret = "${JWT_SECRET:-}"`` with the variable unset) is
        # no secret: say so, loudly where others can reach the gateway.
        level = logging.INFO if _is_loopback(config.server.host) else logging.WARNING
        logging.getLogger("chatmem").log(
            level,
            "auth is off (no auth.jwt_secret, auth.public_key or auth.jwks_url):"
            " every caller is tenant 'default'",
        )
    try:
        await stop.wait()
        logging.getLogger("chatmem").info("shutting down")
    finally:
        # Stops listening, drains requests in flight (on_shutdown), then closes resources.
        await runner.cleanup()
        for task in tasks:
            task.cancel()


GC_THRESHOLDS = (10_000, 10, 10)
"""The collector's thresholds while serving (Python's are 700, 10, 10).

A request allocates a few hundred container objects and frees nearly all of them by
reference counting, so a collection every 700 allocations mostly walked the objects of
the requests in flight, again and again: 4 % of the gateway's instructions at 32 clients
(callgrind, benchmarks/).  Every 10,000 allocations finds the same garbage, 14 times less
often.
"""


def _run(main: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop where it is installed: the same code, about a third less CPU per
    proxied request (measured with benchmarks/)."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``chatmem`` command; its exit status.

    A reader that stops early (``chatmem token encode ... | head -c 20``) ends the output
    quietly, as it does any Unix tool's: Python would print a traceback, and another one
    when it flushes standard output at exit."""
    try:
        status = _main(argv)
        sys.stdout.flush()  # here, where a closed pipe can still be caught
    except BrokenPipeError:
        if not _stdout_gone():
            raise  # a socket's (a database's, say): not a reader that stopped
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return status


def _stdout_gone() -> bool:
    """Whether standard output is a pipe whose reader has closed it (``poll`` says
    ``POLLERR`` for such a pipe's write end)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError):  # no file descriptor behind it
        return False


def _main(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if args.command == "token":
        return run_token(args)
    if args.command == "db":
        return run_db(args)
    try:
        if args.command == "mock-upstream":
            from .mock_upstream import run_mock_upstream

            where = f"{args.host}:{args.port}"

            async def mock() -> None:
                await run_mock_upstream(
                    args.host,
                    args.port,
                    tokens=args.tokens,
                    delay_ms=args.delay_ms,
                    on_ready=lambda port: print(
                        f"mock upstream on http://{args.host}:{port}/v1", flush=True
                    ),
                    stop=stop_event_on_signals(),  # SIGTERM too ends it cleanly, exit 0
                )

            try:
                _run(mock())
            except OSError as exc:
                raise CannotListen(f"cannot listen on {where}: {_bind_failure(exc)}") from None
            return 0
        try:
            config = load_config(find_config_file(args.config), overrides=_serve_overrides(args))
            problem = sqlite_path_problem(config.storage.url)
            if problem is not None:
                raise ConfigError(problem)
            storage = make_url(config.storage.url)
            if (
                config.server.workers > 1
                and storage.get_backend_name() == "sqlite"
                and in_memory(storage)
            ):
                raise ConfigError(
                    "storage.url: an in-memory database belongs to one process; with"
                    " server.workers > 1 each worker would keep its own: use a file"
                )
        except ConfigError as exc:
            print(f"chatmem: config error: {exc}", file=sys.stderr)
            return 2
        configure_logging(config.log)
        if config.server.workers > 1 and not args.worker:
            from .workers import run_workers

            _check_address_free(config.server.host, config.server.port)
            return run_workers(config, _worker_args(args), demo=args.demo)
        if args.worker:
            from .workers import stop_with_master, worker_config

            stop_with_master()
            config = worker_config(config)
        else:  # before the app opens (and may create) its database
            _check_address_free(config.server.host, config.server.port)
        _run(_serve(config, args.demo, reuse_port=args.worker))
    except (SchemaError, CannotListen) as exc:
        print(f"chatmem: {exc}", file=sys.stderr)
        return 1
    except StorageUnavailable as exc:
        print(f"chatmem: {exc.message}: {one_line(driver_error(exc.__cause__))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
