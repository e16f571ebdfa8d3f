"""``chatmem db upgrade|downgrade|current|prune|check``: the schema, retention and
integrity, by hand."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
from pathlib import Path
from typing import Any

from alembic.util import CommandError
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from .config import Config, ConfigError, find_config_file, load_config
from .errors import StorageUnavailable
from .storage import Store, create_engine
from .storage.engine import in_memory
from .storage.integrity import check_integrity
from .storage.migrate import (
    SchemaError,
    current_revision,
    describe_current,
    downgrade,
    require_schema,
    upgrade,
)
from .storage.retention import parse_age

__all__ = ["add_db_commands", "driver_error", "one_line", "run_db", "sqlite_path_problem"]

MAX_BATCH = 10_000
"""The most conversations ``db prune`` deletes in one transaction: a batch's numbers go
to the database as parameters, and asyncpg takes at most 32,767 in one statement (a
larger batch failed there, item 146); a batch this large is already one long write."""


def add_db_commands(commands: Any) -> None:
    """Add ``db`` and its subcommands to the ``chatmem`` parser's subcommands."""
    db = commands.add_parser("db", help="database schema (migrations) and retention")
    actions = db.add_subparsers(dest="db_command", required=True)
    upgrade_ = actions.add_parser("upgrade", help="migrate the schema to a newer revision")
    upgrade_.add_argument("revision", nargs="?", default="head", help="default: head")
    downgrade_ = actions.add_parser("downgrade", help="migrate the schema back")
    downgrade_.add_argument("revision", help="a revision, -1 for one step, base for nothing")
    actions.add_parser("current", help="print the schema revision of the database")
    prune = actions.add_parser("prune", help="delete conversations not updated for a while")
    prune.add_argument(
        "--older-than", help="age like 30d, 12h, 2w (default: memory.retention_days)"
    )
    prune.add_argument(
        "--batch-size",
        type=int,
        default=200,
        help=f"conversations per batch (1 to {MAX_BATCH}; default 200)",
    )
    check = actions.add_parser("check", help="check the store's integrity (exit 1 on problems)")
    check.add_argument(
        "--chat-only",
        action="store_true",
        help="the store was written by chat turns only (no Conversations API items): also"
        " require gapless sequence numbers and a last message from the assistant",
    )
    for action in (upgrade_, downgrade_, actions.choices["current"], prune, check):
        action.add_argument("--config", help="TOML config file (as for serve)")
        action.add_argument("--db", help="storage URL; overrides the config file")


def _config(args: argparse.Namespace) -> Config:
    overrides = {"storage": {"url": args.db}} if args.db else None
    return load_config(find_config_file(args.config), overrides=overrides)


async def _run(args: argparse.Namespace, config: Config) -> str:
    # A migration of a big table may rightly take longer than any request should.
    storage = dataclasses.replace(config.storage, statement_timeout=0)
    store = Store(create_engine(storage))
    try:
        if args.db_command == "upgrade":
            await upgrade(store.engine, args.revision)
            return f"schema at revision {await current_revision(store.engine)}"
        if args.db_command == "downgrade":
            await downgrade(store.engine, args.revision)
            return f"schema at revision {await current_revision(store.engine) or 'base'}"
        if args.db_command == "current":
            return await describe_current(store.engine)
        await require_schema(store.engine)
        return await _prune(args, config, store)
    finally:
        await store.close()


def _prune_age(args: argparse.Namespace, config: Config) -> tuple[str, float]:
    """``db prune``'s age, as given and in seconds (ValueError: a usage error)."""
    if not 0 < args.batch_size <= MAX_BATCH:
        raise ValueError(f"--batch-size must be from 1 to {MAX_BATCH}")
    if args.older_than is not None:
        return args.older_than, parse_age(args.older_than)
    if config.memory.retention_days:
        return f"{config.memory.retention_days}d", config.memory.retention_days * 86400.0
    raise ValueError("give --older-than (e.g. 30d) or set memory.retention_days")


async def _prune(args: argparse.Namespace, config: Config, store: Store) -> str:
    age_text, age = _prune_age(args, config)
    deleted = await store.prune(age, batch_size=args.batch_size)
    return f"deleted {deleted} conversations not updated for {age_text}"


def run_db(args: argparse.Namespace) -> int:
    try:
        config = _config(args)
    except ConfigError as exc:
        print(f"chatmem: config error: {exc}", file=sys.stderr)
        return 2
    if args.db_command == "prune":
        try:
            _prune_age(args, config)  # a usage error first, whatever the database
        except ValueError as exc:
            print(f"chatmem db: {exc}", file=sys.stderr)
            return 2
    problem = sqlite_path_problem(config.storage.url)
    if problem is not None:
        print(f"chatmem: config error: {problem}", file=sys.stderr)
        return 2
    url = make_url(config.storage.url)
    if url.get_backend_name() == "sqlite" and in_memory(url):
        # It would be made for the command and gone when it ends: nothing to look at.
        print(
            "chatmem: config error: storage.url: an in-memory database holds nothing"
            " outside the `chatmem serve` that made it",
            file=sys.stderr,
        )
        return 2
    missing = _missing_sqlite_file(config.storage.url)
    if missing is not None and args.db_command != "upgrade":
        # Opening it would create an empty file at what may be a mistyped path.
        print(f"chatmem db: no database at {missing} (db upgrade creates one)", file=sys.stderr)
        return 1
    try:
        if args.db_command == "check":
            return _print_problems(asyncio.run(_check(config, args.chat_only)))
        print(asyncio.run(_run(args, config)))
    except ValueError as exc:
        print(f"chatmem db: {exc}", file=sys.stderr)
        return 2
    except CommandError as exc:
        print(f"chatmem db: {one_line(exc)}", file=sys.stderr)
        return 2
    except SchemaError as exc:
        print(f"chatmem db: {exc}", file=sys.stderr)
        return 1
    except StorageUnavailable as exc:
        print(
            f"chatmem db: {exc.message}: {one_line(driver_error(exc.__cause__))}", file=sys.stderr
        )
        return 1
    except (DBAPIError, PoolTimeout, OSError) as exc:
        print(f"chatmem db: the database failed: {one_line(driver_error(exc))}", file=sys.stderr)
        return 1
    return 0


async def _check(config: Config, chat_only: bool) -> list[str]:
    store = Store(create_engine(config.storage))
    try:
        await require_schema(store.engine)
        return await check_integrity(store, chat_only=chat_only)
    finally:
        await store.close()


def _print_problems(problems: list[str]) -> int:
    for problem in problems:
        print(problem)
    print(f"chatmem db check: {len(problems)} problem(s)", file=sys.stderr)
    return 1 if problems else 0


def _sqlite_file(url: str) -> Path | None:
    """The SQLite database file ``url`` names (None for other URLs, memory, URI names)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    if parsed.query.get("mode") == "memory" or parsed.database.startswith("file:"):
        return None  # a URI filename: left to SQLite
    return Path(parsed.database)


def _missing_sqlite_file(url: str) -> str | None:
    """The path of a SQLite database file that does not exist (None for other URLs)."""
    path = _sqlite_file(url)
    return None if path is None or path.exists() else str(path)


def sqlite_path_problem(url: str) -> str | None:
    """What is wrong with where a SQLite file is to be, if anything: SQLite itself says
    only "unable to open database file" (and makes a file of ``dir/``)."""
    path = _sqlite_file(url)
    if path is None:
        return None
    database = make_url(url).database or ""
    if database.endswith("/") or path.is_dir():
        return f"storage.url: {path} is a directory; name a file in it"
    if not path.parent.is_dir():
        return f"storage.url: no directory {path.parent}"
    return None


def driver_error(exc: BaseException | None) -> BaseException | None:
    """The driver's own error inside SQLAlchemy's wrapper, whose text adds the wrapper's
    class name and a link: ``password authentication failed for user "app"``."""
    orig = getattr(exc, "orig", None)
    return orig if isinstance(orig, BaseException) else exc


def one_line(exc: BaseException | None) -> str:
    """An exception as one short line (driver messages can span several)."""
    text = " ".join(str(exc).split()) if exc is not None else ""
    return text[:300] or type(exc).__name__
