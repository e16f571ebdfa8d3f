"""Every query chatmem makes, behind one small class: the turns of the chat route here,
the Conversations API's queries in ``items``, which :class:`Store` inherits."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sqlite3
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterator,
    Mapping,
    Sequence,
    Sized,
)
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg
from sqlalchemy import Text, and_, delete, func, insert, literal_column, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.util import greenlet_spawn

from .. import jsonio
from ..config import ResendReasoning
from ..errors import InvalidRequest, StorageUnavailable
from . import postgres_turns
from .engine import WRITE, in_memory, is_sqlite, reopen_after_read_only_refusals
from .faults import (
    BROKEN_CONNECTION,
    is_connection_lost,
    is_retryable,
    is_stale_statement,
    is_unavailable,
    sqlite_busy,
)
from .inline_sqlite import InlineConnection, InlineSQLite
from .items import ConversationInfo, ConversationItems, Deletion, Page
from .migrate import ensure_schema, upgrade
from .pairing import check_still_there, check_turn, overtaken
from .rows import (
    RESULT_ROLES,
    Executes,
    Owner,
    conversations,
    messages,
    owned,
    resent_reasoning,
    stored_size,
    tail_before,
    to_row,
)
from .sqlite_turns import Decided, SQLiteTurns
from .texts import Texts
from .write_health import WriteHealth

__all__ = ["ConversationInfo", "Deletion", "History", "Owner", "Page", "Store"]

T = TypeVar("T")

log = logging.getLogger("chatmem.storage")

# A write transaction that fails with a serialization failure or a deadlock is re-run this
# many times in all (with a short random pause) before the client gets a 503.
WRITE_ATTEMPTS = 5

_INLINE_RETRIES = (0.0005, 0.001, 0.002)
"""Seconds an API write waits, one after the other, for SQLite's lock to come free
before it takes the thread path (see ``Store._inline_write``)."""

_PROBE_EVERY = 1.0
"""Seconds between two write probes of :meth:`Store.check_ready`."""
_PROBE_ID = "chatmem ready probe"
"""The probe row's conversation id: a space, so no request's (they are checked)."""

# Fields of a chat message that are stored and sent back upstream as history (the
# reasoning as memory.resend_reasoning says, see rows.resent_reasoning).
_WIRE_FIELDS = ("name", "tool_calls", "tool_call_id", "reasoning_content")


@dataclass(frozen=True, slots=True)
class History:
    """What is stored for a conversation, ready to be sent upstream.

    ``encoded`` is the window of stored messages, oldest first, as JSON objects joined by
    commas (b"" for none): the request body is spliced together around it
    (``ChatRequest.upstream_body``), so on SQLite the stored messages reach the upstream
    without being decoded and encoded again.  ``messages`` decodes it for everyone else.
    """

    system: list[dict[str, Any]] | None
    encoded: bytes = b""
    last_seq: int | None = None
    """The conversation's ``last_seq`` when it was read (0: not stored); None: not read.
    A turn's commit checks the turn against what came after it (``pairing``)."""
    pk: int = 0
    """The conversation's row when it was read (0: not stored), so that a commit also
    tells a conversation deleted and created again from the one it read."""

    @classmethod
    def from_messages(
        cls,
        system: list[dict[str, Any]] | None,
        messages: list[dict[str, Any]],
        last_seq: int | None = None,
        pk: int = 0,
    ) -> History:
        return cls(system, jsonio.dumps_elements(messages), last_seq, pk)

    @property
    def read_at(self) -> tuple[int, int] | None:
        """(``pk``, ``last_seq``) as read, for the commit of the turn (None: not read)."""
        return None if self.last_seq is None else (self.pk, self.last_seq)

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The window's messages, decoded anew on each access."""
        messages: list[dict[str, Any]] = jsonio.loads(b"[" + self.encoded + b"]")
        return messages


def _wire_columns(resend_reasoning: ResendReasoning) -> tuple[Any, ...]:
    """What a history sends of each stored message (read by :func:`_to_wire`)."""
    m = messages.c
    reasoning = literal_column(resent_reasoning(resend_reasoning), Text).label("reasoning_content")
    return (m.role, m.content, m.name, m.tool_calls, m.tool_call_id, reasoning)


async def _window(
    conn: Executes, owned: Any, limit: int, resend_reasoning: ResendReasoning
) -> tuple[Any, Sequence[Any]]:
    """The conversation's pk, system prompt and ``last_seq`` (None if it is not stored),
    and its newest ``limit`` messages, newest first."""
    c, m = conversations.c, messages.c
    found = (await conn.execute(select(c.pk, c.system_prompt, c.last_seq).where(owned))).first()
    if found is None:
        return None, ()
    columns = _wire_columns(resend_reasoning)
    newest = select(*columns).where(m.conversation_pk == found.pk).order_by(m.seq.desc())
    return found, (await conn.execute(newest.limit(limit))).all()


def _to_wire(row: Mapping[Any, Any] | asyncpg.Record) -> dict[str, Any]:
    message: dict[str, Any] = {"role": row["role"], "content": row["content"]}
    for name in _WIRE_FIELDS:
        value = row[name]
        if value is not None:
            message[name] = value
    return message


def _call_left_out(roles: list[str], start_at_user: bool) -> bool:
    """Whether a cut window (its ``roles``) for a request of tool results lacks what must
    come with them: the assistant message with the call, and with ``start_at_user`` the
    user message before it (the window then starts with one)."""
    if "assistant" not in roles:
        return True
    return start_at_user and roles[0] != "user"


def _older_left_out(window: Sized, limit: int, last_seq: int) -> bool:
    """Whether the newest ``limit`` messages left older ones out: a window of ``limit``
    messages, unless the conversation holds no more (``last_seq`` counts every message
    ever stored: more than the window, and one may have been deleted; the same, none)."""
    return len(window) >= limit and last_seq > len(window)


def _texts(wire: list[dict[str, Any]]) -> Texts:
    """A window read through SQLAlchemy or asyncpg, each message encoded once (the byte
    budget counts each one's text)."""
    return Texts.made([message["role"] for message in wire], [jsonio.dumps(m) for m in wire])


def _encoded_history(
    system: Any,
    window: Texts,
    max_bytes: int,
    start_at_user: bool,
    cut: bool,
    answering: bool,
    last_seq: int,
    pk: int,
) -> History | None:
    """The history to send of a window: ``cut``, older messages were left out already;
    ``start_at_user``, ``memory.start_at_user``; ``answering``, the request starts with
    tool results (see :func:`window_start`).  None when ``answering`` and the limits left
    out the call they answer: read it with :meth:`Store._call_tail`."""
    start = window_start(window.roles, start_at_user and cut, answering)
    # The usual window fits: its size is known, no loop.
    if max_bytes and window.size_from(start) > max_bytes:
        newest = window.newest_within(max_bytes)
        start = window_start(window.roles, start_at_user, answering, newest)
        cut = True
    if answering and cut and _call_left_out(window.roles[start:], start_at_user):
        return None
    return History(system=system, encoded=window.encoded(start), last_seq=last_seq, pk=pk)


def _call_over_budget(max_bytes: int) -> InvalidRequest:
    return InvalidRequest(
        "the tool call these tool results answer, with its results so far (and, with"
        " memory.start_at_user, from the user message before it), is larger than"
        f" memory.max_history_bytes ({max_bytes}) lets the history be, so it cannot be sent"
        " with them",
        param="messages",
        code="context_length_exceeded",
    )


def window_start(roles: list[str], cut: bool, answering: bool = False, begin: int = 0) -> int:
    """Where a history may start in a window of messages of ``roles``, from ``begin`` on.
    Never with tool (or function) results whose call was left out.  When older messages
    were left out (``cut``), at a user message, the start of a turn (nothing, if the
    window has none): the assistant's half of a turn first broke, turn after turn, the
    chat templates that want user and assistant to alternate (Mistral's, Llama 2's).
    ``answering``: the request starts with tool results, so the window's last assistant
    message, the call they answer, is kept whatever else is left out."""
    end = len(roles)
    start = begin
    while start < end and roles[start] in RESULT_ROLES:
        start += 1
    if cut:
        while start < end and roles[start] != "user":
            start += 1
    if answering:
        call = end - 1
        while call >= begin and roles[call] != "assistant":
            call -= 1
        if call >= begin:
            start = min(start, call)
    return start


class Store(ConversationItems):
    """The conversation store.  One instance per engine, safe to share between tasks:
    every method opens its own short connection and never holds one across a stream."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        busy_timeout_ms: int = 30_000,
        direct: bool = True,
        resend_reasoning: ResendReasoning = "tool_turns",
        window_messages: int = 200,
    ) -> None:
        """``direct``: the per-request queries take the fast path, SQLite's own connection
        (see sqlite_turns) or asyncpg itself (see postgres_turns); off, SQLAlchemy's
        statements, as every other query (the tests compare the two).
        ``resend_reasoning``: ``memory.resend_reasoning``, for the histories read.
        ``window_messages``: ``memory.max_history_messages``, the window SQLite's history
        blocks are kept for (see ``blocks``)."""
        self.engine = engine
        self._sqlite = is_sqlite(engine)
        self._resend_reasoning: ResendReasoning = resend_reasoning
        # The per-request queries on a SQLite file take the fast path (see sqlite_turns).
        database = engine.url.database
        self.health = WriteHealth()
        """How the latest write transaction ended (see :meth:`check_ready`)."""
        self._probed_at = -_PROBE_EVERY
        self._writes_seen = 0
        """``health.writes`` when ``/v1/ready`` last looked."""
        self._turns = (
            SQLiteTurns(
                database,
                busy_timeout_ms,
                resend_reasoning,
                self.health,
                window_messages=window_messages,
            )
            if direct and self._sqlite and database and not in_memory(engine.url)
            else None
        )
        self._inline = (
            InlineSQLite(database, self.health) if self._turns is not None and database else None
        )
        if self._sqlite:
            reopen_after_read_only_refusals(engine, self.health)
        """The Conversations API's statements within one step of the loop (SQLite)."""
        # One writer at a time per process on SQLite: waiting here is cheaper than
        # waiting on the file lock, which stays for writers in other processes.
        self._write_lock = asyncio.Lock() if self._sqlite else None
        self._insert = sqlite.insert if self._sqlite else postgresql.insert
        # PostgreSQL reads run outside a transaction: at READ COMMITTED each statement sees
        # its own snapshot either way, and BEGIN and ROLLBACK were two round trips a read.
        self._reads = (
            engine if self._sqlite else engine.execution_options(isolation_level="AUTOCOMMIT")
        )
        # On asyncpg the per-request queries take the fast path (see postgres_turns).
        self._asyncpg = direct and not self._sqlite and engine.dialect.driver == "asyncpg"
        self._committing: set[asyncio.Task[None]] = set()
        """The turns being committed in a task of their own (not on SQLite's fast path)."""

    async def create_schema(self) -> None:
        """Bring the database to the newest schema (the migrations, not create_all)."""
        await upgrade(self.engine)

    async def check_schema(self) -> None:
        """The start-up check (see :func:`migrate.ensure_schema`): an empty database is
        migrated; one at another revision raises ``SchemaError``."""
        try:
            upgraded = await ensure_schema(self.engine)
        except (DBAPIError, PoolTimeout, OSError) as exc:
            _raise_unavailable(exc)
            # Refused for good (a wrong password, no such database): one line at start-up.
            raise StorageUnavailable("cannot use the conversation store") from exc
        if upgraded:
            log.info("created the database schema (revision %s)", upgraded)

    async def close(self) -> None:
        if self._turns is not None:
            self._turns.commit_queued()  # a group commit still gathering is not dropped
            self._turns.end_read()  # the loop's, and its connection is closed on a thread
            await asyncio.get_running_loop().run_in_executor(None, self._turns.close)
        if self._inline is not None:
            self._inline.close()
        await self.engine.dispose()

    async def _run_read(
        self, work: Callable[[Executes], Awaitable[T]], *, pooled: bool = False
    ) -> T:
        """Run ``work`` on the loop's own SQLite connection within this step of the loop
        (see ``inline_sqlite``), else (or ``pooled``) on a pooled connection; again on
        the next one if the server had ended it (:meth:`_retried`): a read changes
        nothing.  Before, killing the gateway's connections under load cost 3 in 120
        Conversations API reads a 503."""
        inline = self._inline if not pooled else None
        if inline is not None and (conn := inline.begin(write=False)):
            try:
                with _store_failures():
                    return await work(conn)
            except StorageUnavailable as exc:
                if not sqlite_busy(exc.__cause__):
                    raise
                # A lock in the way of a read (rare in WAL mode): the thread path waits.
            finally:
                inline.end(commit=False)

        async def read() -> T:
            async with _checked_out(self._reads) as conn:
                return await work(conn)

        return await self._retried(read, harmless=True)

    @asynccontextmanager
    async def _write(self, *, bounded: bool = True) -> AsyncIterator[Executes]:
        """A connection in a write transaction, committed at the end of the block: the
        loop's own SQLite connection when the work is ``bounded`` (small enough for one
        step of the event loop) and SQLite's lock is free (see ``inline_sqlite``), else
        one of the engine's."""
        inline = await self._inline_write() if bounded else None
        if inline is None:
            async with self._write_on_thread() as conn:
                yield conn
            return
        assert self._inline is not None and self._turns is not None
        done = False
        try:
            # Turns are held back only if the work awaits something that leaves this
            # step of the loop, as none does (see ``SQLiteTurns.holding_commits``).
            with _store_failures(), self._turns.holding_commits():
                try:
                    yield inline
                    done = True
                finally:
                    self._inline.end(commit=done)
                    # The turns' reads of this pass began before it: the next one
                    # sees it.  (A write on a thread ends in a later pass, after them.)
                    self._turns.end_read()
        except StorageUnavailable as exc:
            self.health.failed(exc)
            raise
        self.health.wrote()

    async def _inline_write(self) -> InlineConnection | None:
        """A write transaction on the loop's own SQLite connection, if SQLite's lock
        comes free within a few milliseconds.  Another process's commit (``--workers``)
        holds it for a fraction of one; the thread path would hold the turns back while
        it waits, and hold the lock over several passes of the loop once it has it."""
        if self._inline is None:
            return None
        for delay in _INLINE_RETRIES:
            if (inline := self._inline.begin(write=True)) is not None:
                return inline
            await asyncio.sleep(delay)
        return self._inline.begin(write=True)

    @asynccontextmanager
    async def _write_on_thread(self) -> AsyncIterator[AsyncConnection]:
        try:
            async with (
                self._write_lock or contextlib.nullcontext(),
                _checked_out(self.engine) as conn,
            ):
                if self._write_lock is not None:
                    await conn.execution_options(**{WRITE: True})
                with self._turns.holding_commits() if self._turns else contextlib.nullcontext():
                    async with conn.begin():
                        yield conn
        except StorageUnavailable as exc:
            self.health.failed(exc)
            raise
        self.health.wrote()

    @asynccontextmanager
    async def _driver(self, *, writing: bool) -> AsyncIterator[asyncpg.Connection]:
        """asyncpg's own connection, from the pool (see postgres_turns).

        Checked out of the pool as it is (``raw_connection``): the fast path sends its
        statements through asyncpg, so SQLAlchemy's ``Connection`` around it, and the
        isolation level set on it and reset, cost for nothing: 8 % of a plain turn's CPU
        at one client, 12 % at 32 (``benchmarks.storage``: 1.15 -> 1.06 ms and
        0.84 -> 0.74 ms).
        """
        pooled = await _checkout(self.engine, self.engine.raw_connection)
        try:
            driver = pooled.driver_connection
            if not isinstance(driver, asyncpg.Connection):  # None once invalidated
                raise StorageUnavailable("the conversation store is unavailable")
            with _store_failures():
                try:
                    yield driver
                except BaseException as exc:
                    if writing or isinstance(exc, (*BROKEN_CONNECTION, OSError)):
                        # A write cut short can leave the connection in a transaction
                        # that asyncpg or the server still thinks open (cancelled while
                        # its BEGIN was on the way, or cancelled twice before its
                        # ROLLBACK went out), and later turns would run inside it, never
                        # committed.  Closed now, without a round trip that a second
                        # cancel could cut short, it is replaced at the next checkout
                        # (engine.py); the server rolls the transaction back when it
                        # finds the client gone.  A read has no transaction: asyncpg's
                        # own cancel request stops it on the server.  A connection that
                        # broke goes too, rather than back into the pool.
                        driver.terminate()
                    raise
        finally:
            # Given back in a greenlet, as SQLAlchemy's async engine gives back its own:
            # the pool's reset may call into the driver.  Only an overflow connection
            # waits on its way back (it is closed): that one is given back whole even if
            # the task is cancelled meanwhile; the others cost no task and no loop pass.
            closing = greenlet_spawn(pooled.close)
            if self._overflowing():
                await _to_completion(closing)
            else:
                await closing

    def _overflowing(self) -> bool:
        overflow = getattr(self.engine.sync_engine.pool, "overflow", None)
        return overflow is None or overflow() > 0

    async def ping(self) -> None:
        """Prove the database answers and holds our schema; :class:`StorageUnavailable` if not.
        On a pooled connection, which opens the file as it is now: the loop's own has
        kept it open since it started, also if it was removed or replaced since."""
        query = select(conversations.c.pk).limit(1)
        await self._run_read(lambda conn: conn.execute(query), pooled=True)

    async def check_ready(self) -> None:
        """``/v1/ready``: the database answers a read (:meth:`ping`) and takes a write.

        A write went through since the last look (a turn, a Conversations API write):
        ready.  None did (an idle gateway), or writes are refused: a probe, a conversation
        row inserted and deleted in one transaction, so never seen, with an owner no
        request has (the tenant is never empty), at most once every ``_PROBE_EVERY``
        seconds however often ``/v1/ready`` is asked (it needs no token).
        :class:`StorageUnavailable` while writes are refused.  So an idle gateway sees a
        disk that filled meanwhile before a turn is lost to it, and with ``--workers``
        each process checks the database itself, not only its own last write.

        On SQLite's fast path the probe runs on the event loop's connection, which never
        waits: another writer holding the lock gets the last answer at once (contention
        does not tell whether the database takes writes).

        Not proof that a turn fits: a SQLite file that can no longer grow still takes a
        write into the space its WAL already has, and a turn needs more pages than the
        probe (see README, "When things fail")."""
        await self.ping()
        health = self.health
        if health.refusing is None and health.writes != self._writes_seen:
            self._writes_seen = health.writes
            return
        cause: BaseException | None = None
        now = time.monotonic()
        if now - self._probed_at >= _PROBE_EVERY:
            self._probed_at = now
            try:
                if self._turns is not None:
                    self._turns.probe_write(_PROBE_ID)
                else:
                    await self._run_write(_probe_write)
            except (sqlite3.Error, StorageUnavailable, SQLAlchemyError) as exc:
                # Another writer in the way leaves ``refusing`` as it was: it says nothing.
                cause = exc.__cause__ if isinstance(exc, StorageUnavailable) else exc
            finally:
                self._writes_seen = health.writes  # the probe's own write is not news
        if health.refusing is not None:
            raise StorageUnavailable("the conversation store refuses writes") from cause

    async def _run_write(
        self, work: Callable[[Executes], Awaitable[T]], *, bounded: bool = True
    ) -> T:
        """Run ``work`` in one write transaction (see :meth:`_retried`); ``bounded``: see
        :meth:`_write`."""

        async def transaction() -> T:
            async with self._write(bounded=bounded) as conn:
                return await work(conn)

        return await self._retried(transaction)

    async def _retried(self, work: Callable[[], Awaitable[T]], *, harmless: bool = False) -> T:
        """Run ``work``.  PostgreSQL may roll a transaction back with a serialization
        failure or a deadlock when instances contend; it is then re-run (bounded, with
        jitter) instead of being surfaced to the client.  ``harmless``: ``work`` changes
        nothing if it fails on a connection the server had ended
        (:func:`faults.is_connection_lost`): a read, or a write on asyncpg itself
        (``_driver``), which tells a COMMIT without its answer apart
        (``CommitUnconfirmed``).  It then runs again at once on the next connection, up
        to once for every connection the pool holds (a restart ends them all, each fails
        at once when used, and the last try is on a new one)."""
        ended = 0
        attempt = 1
        while True:
            try:
                return await work()
            except StorageUnavailable as exc:
                cause = exc.__cause__
                lost = harmless and (is_connection_lost(cause) or is_stale_statement(cause))
                if lost and ended < self._pool_size():
                    ended += 1
                    continue
                if attempt == WRITE_ATTEMPTS or not is_retryable(exc.__cause__):
                    raise
            await asyncio.sleep(random.uniform(0, 0.005 * 2**attempt))
            attempt += 1

    def new_conversation(self, owner: Owner, conversation_id: str) -> History:
        """The history of a conversation the gateway has just named (``conv_`` and 128
        random bits): empty, without a read; its first turn is created with a plain
        insert on SQLite, as after a read that found it missing."""
        if self._turns is not None:
            self._turns.expect_new(owner.tenant, owner.user, conversation_id)
        return History(system=None)

    async def load_history(
        self,
        owner: Owner,
        conversation_id: str,
        limit: int,
        *,
        max_bytes: int = 0,
        start_at_user: bool = False,
        answering: bool = False,
    ) -> History:
        """The stored system prompt and the newest ``limit`` messages, oldest first; with
        ``max_bytes``, only the newest of them whose JSON text fits in that many bytes;
        with ``start_at_user``, from a user message on if older ones were left out.
        ``answering``: the request starts with tool results, and the limits never leave
        out the call they answer (:meth:`_call_tail`)."""
        history: History | None
        if self._turns is not None:
            try:
                pk, system, window, cut, last_seq = await self._turns.load_window(
                    owner.tenant, owner.user, conversation_id, limit, max_bytes
                )
            except sqlite3.Error as exc:
                raise StorageUnavailable("the conversation store is unavailable") from exc
            if not pk:
                return History(system=None, last_seq=0)
            cut = cut or _older_left_out(window, limit, last_seq)
            history = _encoded_history(
                system, window, max_bytes, start_at_user, cut, answering, last_seq, pk
            )
        elif self._asyncpg:
            pk, system, records, last_seq = await self._read_window(owner, conversation_id, limit)
            if not pk:
                return History(system=None, last_seq=0)
            wire = [_to_wire(record) for record in records]
            cut = _older_left_out(wire, limit, last_seq)
            history = _encoded_history(
                system, _texts(wire), max_bytes, start_at_user, cut, answering, last_seq, pk
            )
        else:
            found, rows = await self._run_read(
                lambda conn: _window(
                    conn, owned(owner, conversation_id), limit, self._resend_reasoning
                )
            )
            if found is None:
                return History(system=None, last_seq=0)
            system, last_seq, pk = found.system_prompt, found.last_seq, found.pk
            wire = [_to_wire(row._mapping) for row in reversed(rows)]
            cut = _older_left_out(wire, limit, last_seq)
            history = _encoded_history(
                system, _texts(wire), max_bytes, start_at_user, cut, answering, last_seq, pk
            )
        if history is None:
            tail = await self._call_tail(owner, conversation_id, max_bytes, start_at_user)
            history = History.from_messages(system, tail, last_seq, pk)
        return history

    async def _read_window(
        self, owner: Owner, conversation_id: str, limit: int
    ) -> tuple[int, Any, list[asyncpg.Record], int]:
        """``postgres_turns.load_window`` on a pooled connection, run again on the next
        one when the server had ended it (:meth:`_retried`): a read changes nothing.
        Before, killing the gateway's connections under load cost about six requests a
        503 each time."""

        async def read() -> tuple[int, Any, list[asyncpg.Record], int]:
            async with self._driver(writing=False) as driver:
                return await postgres_turns.load_window(
                    driver, owner.tenant, owner.user, conversation_id, limit, self._resend_reasoning
                )

        return await self._retried(read, harmless=True)

    def _pool_size(self) -> int:
        size = getattr(self.engine.sync_engine.pool, "size", None)
        return int(size()) if callable(size) else 1

    async def _call_tail(
        self, owner: Owner, conversation_id: str, max_bytes: int, start_at_user: bool
    ) -> list[dict[str, Any]]:
        """The stored messages from the newest assistant message with tool calls on, oldest
        first: the call a request's tool results answer, and its results so far, for a
        history whose limits left the call out (none if there is no such call); with
        ``start_at_user``, from the user message before it.  The
        ``memory.max_history_messages`` limit gives way, the byte budget does not: over
        it, a 400 ``context_length_exceeded``.  On the tool path only, so plain SQLAlchemy."""
        m = messages.c
        pk = select(conversations.c.pk).where(owned(owner, conversation_id))
        ours = m.conversation_pk == pk.scalar_subquery()
        with_calls = and_(ours, m.role == "assistant", m.tool_calls.is_not(None))
        call = select(m.seq).where(with_calls).order_by(m.seq.desc()).limit(1)

        async def read(conn: Executes) -> Sequence[Any]:
            seq = (await conn.execute(call)).scalar_one_or_none()
            if seq is None:
                return ()
            if start_at_user:
                asked = select(func.max(m.seq)).where(ours, m.role == "user", m.seq < seq)
                seq = (await conn.execute(asked)).scalar() or seq
            tail = and_(ours, m.seq >= seq)
            if max_bytes:  # sizes first (a lower bound of the text's), rows only if they fit
                total = (await conn.execute(select(func.sum(stored_size)).where(tail))).scalar()
                if (total or 0) > max_bytes:
                    raise _call_over_budget(max_bytes)
            columns = _wire_columns(self._resend_reasoning)
            return (await conn.execute(select(*columns).where(tail).order_by(m.seq))).all()

        wire = [_to_wire(row._mapping) for row in await self._run_read(read)]
        if max_bytes and sum(len(jsonio.dumps(message)) for message in wire) > max_bytes:
            raise _call_over_budget(max_bytes)
        return wire

    async def commit_turn(
        self,
        owner: Owner,
        conversation_id: str,
        *,
        system: list[dict[str, Any]] | None,
        turn: Sequence[dict[str, Any]],
        together: bool = False,
        after: tuple[int, int] | None = None,
    ) -> None:
        """Append one turn (the request's messages and the answer) in one transaction:
        :meth:`commit_turn_soon`, waited for.  Where that runs a task (not on SQLite's
        fast path), the commit runs in the caller instead: a caller cancelled meanwhile
        (``asyncio.wait_for``) cancels it, and its transaction rolls back."""
        if self._turns is None:
            await self._commit_turn(owner, conversation_id, system, turn, after)
            return
        await self.commit_turn_soon(
            owner, conversation_id, system=system, turn=turn, together=together, after=after
        )

    def commit_turn_soon(
        self,
        owner: Owner,
        conversation_id: str,
        *,
        system: list[dict[str, Any]] | None,
        turn: Sequence[dict[str, Any]],
        together: bool = False,
        after: tuple[int, int] | None = None,
        decided: Decided | None = None,
    ) -> asyncio.Future[None]:
        """Append one turn in one transaction, started now: the future is done when the
        turn is committed (or failed), and ``decided`` is called then, with None or the
        failure.  A caller who stops waiting (cancels the future, or is cancelled while
        it awaits it) does not stop the commit, and ``decided`` is still called: the
        future may be awaited as it is, with no ``asyncio.shield`` (whose second future
        and extra pass of the loop were 2.4 % of the gateway's instructions at 32
        clients).

        On SQLite the write is already under way when this returns (done, for a turn
        alone that found the lock free), so no task is made for it; ``together``: other
        turns are in flight, so this one may share its transaction with those that finish
        around it (group commit, see ``SQLiteTurns.append_turn_soon``).  Elsewhere it
        runs in a task, which the returned future only reports on.

        The upsert creates the conversation if needed and reserves the turn's sequence
        numbers by bumping ``last_seq``; it locks the conversation row until commit, so
        concurrent turns of one conversation are serialised and never interleave.
        ``system``, when given, replaces the stored system prompt.  ``after``: the
        conversation's pk and ``last_seq`` when the turn's history was read
        (``History.read_at``); when another write came after it
        (:func:`pairing.overtaken`), the turn is checked against what it now follows,
        under that lock, and :class:`ConversationChanged` if tool calls and their results
        would no longer pair (:func:`pairing.check_turn`).
        """
        if self._turns is not None:
            return self._turns.append_turn_soon(
                owner.tenant,
                owner.user,
                conversation_id,
                system,
                turn,
                int(time.time()),
                together=together,
                after=after,
                decided=decided,
            )
        committing = asyncio.ensure_future(
            self._commit_turn(owner, conversation_id, system, turn, after)
        )
        self._committing.add(committing)  # referenced while it runs, waited for or not
        waiter: asyncio.Future[None] = committing.get_loop().create_future()
        committing.add_done_callback(lambda done: self._report(done, waiter, decided))
        return waiter

    def _report(
        self, done: asyncio.Task[None], waiter: asyncio.Future[None], decided: Decided | None
    ) -> None:
        """Pass a commit's outcome on to its waiter, if it still waits, and ``decided``."""
        self._committing.discard(done)
        failure: BaseException | None
        if done.cancelled():
            failure = asyncio.CancelledError()
            waiter.cancel()  # a no-op when the waiter is done already
        else:
            failure = done.exception()
            if not waiter.done():
                if failure is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(failure)
        if decided is not None:
            decided(failure)

    async def _commit_turn(
        self,
        owner: Owner,
        conversation_id: str,
        system: list[dict[str, Any]] | None,
        turn: Sequence[dict[str, Any]],
        after: tuple[int, int] | None,
    ) -> None:
        now = int(time.time())
        if self._asyncpg:

            async def append() -> None:
                async with self._driver(writing=True) as driver:
                    await postgres_turns.append_turn(
                        driver,
                        owner.tenant,
                        owner.user,
                        conversation_id,
                        system,
                        turn,
                        now,
                        after,
                    )

            try:
                await self._retried(append, harmless=True)
            except StorageUnavailable as exc:
                self.health.failed(exc)
                raise
            self.health.wrote()
            return
        count = len(turn)
        upsert = self._insert(conversations).values(
            id=conversation_id,
            tenant=owner.tenant,
            user_id=owner.user,
            system_prompt=system,
            last_seq=count,
            created_at=now,
            updated_at=now,
        )
        changes: dict[str, Any] = {
            "last_seq": conversations.c.last_seq + count,
            "updated_at": now,
        }
        if system is not None:
            changes["system_prompt"] = upsert.excluded.system_prompt
        stmt = upsert.on_conflict_do_update(
            index_elements=["tenant", "user_id", "id"], set_=changes
        ).returning(conversations.c.pk, conversations.c.last_seq)

        async def write(conn: Executes) -> None:
            pk, last_seq = (await conn.execute(stmt)).one()
            first = last_seq - count + 1
            if overtaken(after, pk, first - 1):
                check_still_there(after, pk, first - 1)
                _, tail = await tail_before(conn, messages.c.conversation_pk == pk, first)
                check_turn(turn, tail)
            rows = [
                {**to_row(message, now), "conversation_pk": pk, "seq": first + offset}
                for offset, message in enumerate(turn)
            ]
            if rows:
                await conn.execute(insert(messages), rows)

        await self._run_write(write)

    async def delete_conversation(self, owner: Owner, conversation_id: str) -> bool:
        """Delete a conversation and its messages (explicitly: not every database that
        holds the schema is guaranteed to cascade)."""

        async def delete_it(conn: Executes) -> bool:
            pk = await self._lock_conversation(conn, owner, conversation_id)
            if pk is None:
                return False
            await conn.execute(delete(messages).where(messages.c.conversation_pk == pk))
            # Found under the conversation's lock: it is there to delete.
            await conn.execute(delete(conversations).where(conversations.c.pk == pk))
            return True

        # A conversation's messages are as many as it has: not on the loop's step.
        return await self._run_write(delete_it, bounded=False)

    async def prune(self, older_than: float, *, batch_size: int = 200) -> int:
        """Delete whole conversations (with their messages) not updated for
        ``older_than`` seconds; returns how many.  Each batch is its own short
        transaction, so live turns get the lock between batches; on PostgreSQL a
        conversation whose row a live turn holds is skipped, not waited for."""
        cutoff = int(time.time() - older_than)
        pick = (
            select(conversations.c.pk)
            .where(conversations.c.updated_at < cutoff)
            .order_by(conversations.c.updated_at)
            .limit(batch_size)
        )
        if not self._sqlite:
            pick = pick.with_for_update(skip_locked=True)

        async def prune_batch(conn: Executes) -> int:
            pks = list((await conn.execute(pick)).scalars())
            if pks:  # messages explicitly, as delete_conversation does, then the rows
                await conn.execute(delete(messages).where(messages.c.conversation_pk.in_(pks)))
                await conn.execute(delete(conversations).where(conversations.c.pk.in_(pks)))
            return len(pks)

        total = 0
        while True:
            deleted = await self._run_write(prune_batch, bounded=False)
            total += deleted
            if deleted < batch_size:
                return total
            await asyncio.sleep(0)


async def _probe_write(conn: Executes) -> None:
    """``Store.check_ready``'s probe: a conversation row inserted and deleted."""
    probe = (
        insert(conversations)
        .values(id=_PROBE_ID, tenant="", user_id="", last_seq=0, created_at=0, updated_at=0)
        .returning(conversations.c.pk)
    )
    pk = (await conn.execute(probe)).scalar_one()
    await conn.execute(delete(conversations).where(conversations.c.pk == pk))


@asynccontextmanager
async def _checked_out(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A connection from ``engine``'s pool; the database's failures while it is used are
    :class:`StorageUnavailable`."""
    conn = await _checkout(engine, engine.connect)
    try:
        with _store_failures():
            yield conn
    finally:
        await _to_completion(conn.close())


async def _to_completion(closing: Coroutine[Any, Any, None]) -> None:
    """Run ``closing`` (a connection given back) to its end, even if the task is
    cancelled meanwhile; the cancellation is raised once it is done.

    Giving a connection back may wait (an overflow connection is closed, a transaction
    rolled back), and cut short there it leaves the pool to tidy up after it, logging
    the interruption as an error.  As SQLAlchemy's own ``async with`` does.
    """
    task = asyncio.ensure_future(closing)
    cancelled: asyncio.CancelledError | None = None
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError as exc:
            cancelled = exc
        except Exception:
            break  # the close failed: raised below, after a cancel that came first
    if cancelled is not None:
        raise cancelled
    task.result()


async def _checkout(engine: AsyncEngine, connect: Callable[[], Awaitable[T]]) -> T:
    """``connect()`` (a checkout from ``engine``'s pool), any failure of which is
    :class:`StorageUnavailable`.

    Nothing a request did can make a checkout fail: a server whose new connections are
    closed again as they come (while it shuts down; the pool gives up after three with
    an error of its own) is as unavailable as one that refuses them.  So is any failure:
    SQLAlchemy's ``Connection`` wraps the driver's errors in its own, a raw checkout
    raises those of the dialect's DBAPI adapter, and asyncpg, connecting to a peer that
    is not a PostgreSQL server, may raise what it likes.
    """
    try:
        return await connect()
    except Exception as exc:  # asyncpg fails with AttributeError on a peer that is no server
        driver_error = engine.dialect.loaded_dbapi.Error  # a raw checkout raises these
        if not isinstance(exc, (SQLAlchemyError, OSError, asyncpg.PostgresError, driver_error)):
            # Could be ours (a pool event listener) as well as a strange peer's: say where.
            log.warning("checking a connection out failed unexpectedly", exc_info=True)
        raise StorageUnavailable("the conversation store is unavailable") from exc


@contextlib.contextmanager
def _store_failures() -> Iterator[None]:
    """The database's failures while a checked-out connection is used, as
    :class:`StorageUnavailable` (busy, or unavailable); anything else unchanged."""
    try:
        yield
    except postgres_turns.CommitUnconfirmed as exc:
        raise StorageUnavailable(
            "the conversation store stopped answering as the turn was committed: it may"
            " be stored or not (read the conversation before sending the turn again)",
            code="storage_outcome_unknown",
        ) from exc
    except (DBAPIError, PoolTimeout, OSError, asyncpg.PostgresError, *BROKEN_CONNECTION) as exc:
        _raise_unavailable(exc)
        raise


def _raise_unavailable(exc: BaseException) -> None:
    if is_retryable(exc):
        raise StorageUnavailable("the conversation store is busy; try again") from exc
    if is_unavailable(exc):
        raise StorageUnavailable("the conversation store is unavailable") from exc
