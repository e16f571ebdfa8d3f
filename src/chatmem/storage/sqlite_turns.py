"""The two queries on every chat request, for SQLite, without SQLAlchemy's thread hops.

Through SQLAlchemy's async engine every statement is several hops to aiosqlite's thread
(execute, fetch, close, begin, rollback), and on this hot path that cost dominated the
gateway: 1.2 ms of CPU to read a history and 2.0 ms to commit a turn (py-spy, benchmarks/).
Here both operations first run on the event loop's own ``sqlite3`` connection, which
never waits: its busy timeout is 0, and it never checkpoints (the fsync of a checkpoint
runs on the writer thread every ``_CHECKPOINT_EVERY`` commits).  A WAL reader never waits
for a lock, so reads almost always finish there (5 us; 12 us with history).  A commit that
finds the write lock taken, by another process or by our own writer thread, is retried on
the writer thread, whose connection waits up to ``busy_timeout``: the loop never blocks on
another process.  The SQL is the one the SQLAlchemy models define, with the same JSON
encoding as SQLAlchemy's ``JSON`` type, so both paths read each other's rows.  The history
is read as JSON text and goes upstream as it is (``History.encoded``), never decoded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar, cast

from .. import jsonio
from ..config import ResendReasoning
from ..errors import StorageUnavailable
from .blocks import BLOCK, Blocks, message_json
from .engine import sqlite_pragmas
from .faults import sqlite_busy
from .pairing import check_still_there, check_turn, overtaken
from .rows import resends_reasoning
from .texts import Texts
from .window_cache import WindowCache
from .write_health import WriteHealth

__all__ = ["SQLiteTurns"]

T = TypeVar("T")

log = logging.getLogger("chatmem.storage")

_FIND = (
    "SELECT pk, system_prompt, last_seq FROM conversations"
    " WHERE tenant = ? AND user_id = ? AND id = ?"
)
_TAIL = (
    "SELECT role, tool_calls, tool_call_id FROM messages WHERE conversation_pk = ?"
    " AND seq <= ? AND seq >= coalesce((SELECT max(seq) FROM messages"
    " WHERE conversation_pk = ? AND seq <= ? AND role <> 'tool'), 0) ORDER BY seq DESC"
)
"""A conversation's messages up to a ``seq``, newest first, back to the last that is not a
tool result (``pairing.open_calls``)."""
_UPSERT = (
    "INSERT INTO conversations (id, tenant, user_id, system_prompt, last_seq, created_at,"
    " updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (tenant, user_id, id) DO UPDATE SET last_seq = last_seq + excluded.last_seq,"
    " updated_at = excluded.updated_at,"
    " system_prompt = coalesce(excluded.system_prompt, system_prompt)"
    " RETURNING pk, last_seq"
)
_CREATE = (
    "INSERT INTO conversations (id, tenant, user_id, system_prompt, last_seq, created_at,"
    " updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_INSERT = (
    "INSERT INTO messages (conversation_pk, seq, role, content, name, tool_calls, tool_call_id,"
    " reasoning, model, finish_reason, usage, created_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


# Commits on the event loop's connection between two checkpoints run by the writer thread.
_CHECKPOINT_EVERY = 200

_RESTART_AFTER_FRAMES = 4096
"""Pages in the WAL (16 MiB of SQLite's 4 KiB pages) after a checkpoint from which the
next one holds the writes back, so that the WAL starts over (``_checkpoint_soon``)."""

_MAX_UNSEEN = 10_000
"""Conversations remembered as read missing (see ``SQLiteTurns._unseen``)."""

_GATHER_PASSES = 4
"""How many more passes of the event loop a group commit waits while turns keep joining
it (see :meth:`SQLiteTurns.append_turn_soon`)."""


_TurnArgs = tuple[str, str, str, Any, Sequence[dict[str, Any]], int, tuple[int, int] | None]
"""tenant, user, conversation id, system prompt, messages, time, and the conversation's pk
and ``last_seq`` when its history was read (None: unknown): one turn to append."""
_Row = tuple[Any, ...]
_Turn = tuple[list[_Row], str | None]
"""A turn written: its rows in ``messages``, and the system prompt as stored."""
_Written = _Turn | Exception
Decided = Callable[[BaseException | None], None]
"""Told how a turn's commit was decided: None, committed; else the failure."""


class _Regroup(Exception):
    """A turn of a group commit must be checked against what came before it, which may be
    a turn of the same group not inserted yet: the group is written one turn at a time."""


def _null(_value: None) -> None:
    return None


def _bind_none_cheaply() -> None:
    """Register an adapter for None, the value of most columns of a message.

    The ``sqlite3`` module binds int, float and str directly, but looks up an adapter for
    every other value, None included: with none registered it asks the parameter's
    protocol for ``__adapt__`` and the value for ``__conform__``, and each failed lookup
    formats an AttributeError message before it is cleared.  A turn binds a dozen Nones;
    that was 4.7 % of the gateway's instructions at 32 clients (callgrind).  Registered,
    a None costs one dictionary lookup and one call, and still binds NULL.  The registry
    is the process's: any other ``sqlite3`` user in it gets the same NULLs, faster.
    """
    sqlite3.register_adapter(type(None), _null)


def _utf8(value: str | None) -> bytes | None:
    return None if value is None else value.encode()


def _failure(exc: BaseException) -> BaseException:
    """What a caller is told: a database error is the store being unavailable."""
    if isinstance(exc, sqlite3.Error):
        unavailable = StorageUnavailable("the conversation store is unavailable")
        unavailable.__cause__ = exc
        return unavailable
    return exc


def _checkpoint(conn: sqlite3.Connection) -> int:
    """A passive checkpoint: the pages the WAL held when it was done."""
    return cast(int, conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1])


def _failed_checkpoint(done: asyncio.Future[int]) -> bool:
    """Whether a checkpoint failed (or never ran), which is logged: the WAL keeps what it
    holds, and the next checkpoint copies it."""
    if done.cancelled():
        return True
    if (error := done.exception()) is not None:
        log.warning("SQLite WAL checkpoint failed: %s", error)
        return True
    return False


def _dump(value: Any) -> str | None:
    return None if value is None else jsonio.dumps(value).decode()


def _load(value: bytes | None) -> Any:
    return None if value is None else jsonio.loads(value)


class SQLiteTurns:
    """``load_window`` and ``append_turn_soon`` on one SQLite file.

    Three connections: the event loop's (fast path, never waits), and one each on a
    reader and a writer thread (the slow path, which waits for locks).  Every write
    transaction starts with ``BEGIN IMMEDIATE``, so writers take the lock up front and
    never fail half-way with "database is locked".
    """

    def __init__(
        self,
        path: str,
        busy_timeout_ms: int,
        resend_reasoning: ResendReasoning,
        health: WriteHealth | None = None,
        *,
        window_messages: int = 200,
    ) -> None:
        """``window_messages``: ``memory.max_history_messages``, the window blocks are kept
        for (see ``blocks``)."""
        _bind_none_cheaply()
        self._path = path
        self._health = health or WriteHealth()
        """Told how each write transaction ended (``/v1/ready``)."""
        self._resend_reasoning: ResendReasoning = resend_reasoning
        self._blocks = Blocks(resend_reasoning, window_messages)
        self._busy_timeout_ms = busy_timeout_ms
        self._local = threading.local()
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="chatmem-sqlite-read")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="chatmem-sqlite-write")
        self._inline: sqlite3.Connection | None = None
        self._inline_opened_at = 0
        """``WriteHealth.reopen`` when the loop's connection was opened."""
        self._reading = False
        """The loop's connection is in the read transaction of this pass of the event loop
        (:meth:`_reading_connection`).  Not ``in_transaction``: the callback that ends the
        read checks this, so that after :meth:`end_read` it never touches a connection a
        thread may be closing."""
        self._since_checkpoint = 0
        self._queued: list[tuple[_TurnArgs, asyncio.Future[None]]] = []
        self._gathered = 0
        """How many turns the pending group commit had at its previous pass (0 before its
        first: a pass always follows the turn that started the group)."""
        self._passes = 0
        self._windows = WindowCache()
        """Windows of the conversations going on, valid for the loop's connection."""
        self._unseen: set[tuple[str, str, str]] = set()
        """Conversations the last read found missing.  Their first turn is created with a
        plain insert, 2.3 us cheaper than the upsert; a hint only: when the conversation
        was created meanwhile the insert fails and the upsert runs after all."""
        self._deciders: dict[asyncio.Future[None], Decided] = {}
        """Who is told how a turn's commit was decided, by its future (``decided``)."""
        self._waiting: set[asyncio.Future[Any]] = set()
        self._held: list[tuple[Sequence[_TurnArgs], list[asyncio.Future[None]]]] = []
        """The batches held back while the process's own SQLAlchemy engine writes
        (:meth:`holding_commits`)."""
        self._holders = 0
        """The writes holding them back: one on the thread may be waiting for another
        process's lock while one on the loop's connection starts and ends."""

    def _open(self, busy_timeout_ms: int) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self._path,
            timeout=busy_timeout_ms / 1000,
            isolation_level=None,
            check_same_thread=False,
        )
        for pragma in sqlite_pragmas(busy_timeout_ms):
            conn.execute(pragma)
        # TEXT comes back as the UTF-8 bytes SQLite holds: the stored JSON is spliced
        # into request bodies as it is, never decoded to str (see _load_window).
        conn.text_factory = bytes
        return conn

    def _connection(self) -> sqlite3.Connection:
        """The calling database thread's connection (opened again after a refusal as
        read-only, see ``WriteHealth.reopen``)."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        stale = conn is not None and self._local.opened_at != self._health.reopen
        if stale and conn is not None and not conn.in_transaction:
            conn.close()
            conn = self._local.conn = None
        if conn is None:
            self._local.opened_at = self._health.reopen
            conn = self._local.conn = self._open(self._busy_timeout_ms)
        return conn

    def _loop_connection(self) -> sqlite3.Connection:
        """The event loop's own connection: it never waits for a lock (busy_timeout 0) and
        never checkpoints (the writer thread does, so the fsync happens there)."""
        inline = self._inline
        if (
            inline is not None
            and self._inline_opened_at != self._health.reopen
            and not inline.in_transaction  # else at the next use after it
        ):
            # A new connection's data_version says nothing of the old one's windows.
            inline.close()
            self._inline = None
            self._windows.clear()
            self._unseen.clear()
        if self._inline is None:
            self._inline_opened_at = self._health.reopen
            self._inline = self._open(0)
            self._inline.execute("PRAGMA wal_autocheckpoint=0")
            # Its writes need no foreign key checks: a turn's messages go in under the
            # conversation row the same transaction (BEGIN IMMEDIATE) just upserted.
            self._inline.execute("PRAGMA foreign_keys=OFF")
        return self._inline

    def _reading_connection(self) -> sqlite3.Connection:
        """The loop's connection, in a read transaction that the reads of this pass of the
        event loop share, ended at the start of the next pass (or by a write before).

        Every read transaction in WAL mode takes a shared lock on the ``-shm`` file and
        gives it back, two ``fcntl`` calls, when no other connection of the process holds
        that lock.  Under load several requests read in one pass: at 32 clients, 0.3-0.5
        ``fcntl`` a request instead of 2.19, and about 1 % less CPU (0.8-2.7 % in three
        alternating A/B runs).

        The snapshot is as fresh as separate reads would be for every request that
        reads in it.  The transaction begins at the first read of a pass, and the
        callback that ends it is queued right then: what ran before it in the queue was
        set off by what happened before that read (a request the loop had already
        received, a commit already done), and whatever happens after it (a client that
        was answered and asks again, another connection's commit, seen through a
        callback of its own) gets to the loop's reads only after it.  The loop's own
        writes end it first (:meth:`_writing_connection`)."""
        conn = self._loop_connection()
        if not self._reading:
            conn.execute("BEGIN")
            self._reading = True
            asyncio.get_running_loop().call_soon(self.end_read)
        return conn

    def _writing_connection(self) -> sqlite3.Connection:
        """The loop's connection, out of its pass's read (``BEGIN IMMEDIATE`` cannot start
        in a transaction, and a write reads the newest data)."""
        self.end_read()
        return self._loop_connection()

    def end_read(self) -> None:
        """End the read transaction of the pass, if one is open (see
        :meth:`_reading_connection`); on the event loop, also before :meth:`close`."""
        if not self._reading:
            return
        self._reading = False
        conn = self._inline
        if conn is None or not conn.in_transaction:  # closed, or a write ended it
            return
        try:
            conn.execute("COMMIT")
        except sqlite3.Error:  # a read ends whichever way: never leave a write unable to begin
            if conn.in_transaction:
                conn.execute("ROLLBACK")

    async def _run(self, executor: ThreadPoolExecutor, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)

    async def load_window(
        self, tenant: str, user: str, conversation_id: str, limit: int, max_bytes: int = 0
    ) -> tuple[int, Any, Texts, bool, int]:
        """(the conversation's pk, its system prompt, its newest ``limit`` messages oldest
        first as the JSON texts sent upstream (:class:`~.texts.Texts`), whether
        ``max_bytes`` left older ones out, its ``last_seq``; pk and ``last_seq`` 0 if it is
        not stored); with ``max_bytes``, only the newest of them whose JSON text fits in
        that many bytes."""
        args = (tenant, user, conversation_id, limit, max_bytes)
        key = (tenant, user, conversation_id)
        conn = self._reading_connection()
        try:
            # A cached window is trusted only if nobody else wrote since; a miss reads the
            # database anyway.
            if key in self._windows:
                self._windows.validate(conn, limit)
                cached = self._windows.get(key)
                if cached is not None:
                    return cached[3], cached[0], cached[1], False, cached[2]
            pk, system, window, version, cut, last_seq = self._load_window(conn, *args)
            if pk:
                self._unseen.discard(key)  # created elsewhere after an earlier miss
            else:
                self.expect_new(*key)
        except sqlite3.OperationalError as exc:
            if not sqlite_busy(exc):
                raise
            pk, system, window, _, cut, last_seq = await self._run(
                self._reader, self._on_thread, self._load_window, *args
            )
            return pk, system, window, cut, last_seq
        if version is not None and not cut:  # found, in a snapshot of that version
            # (a window cut to the byte budget is not the newest ``limit`` messages the
            # cache keeps, and is large: not cached)
            self._windows.put(key, system, window, version, limit, last_seq, pk)
        return pk, system, window, cut, last_seq

    def expect_new(self, tenant: str, user: str, conversation_id: str) -> None:
        """Remember that this conversation is not stored (yet): its first turn is created
        with a plain insert."""
        if len(self._unseen) >= _MAX_UNSEEN:  # turns that never came
            self._unseen.clear()
        self._unseen.add((tenant, user, conversation_id))

    def _on_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return fn(self._connection(), *args)

    def _load_window(
        self,
        conn: sqlite3.Connection,
        tenant: str,
        user: str,
        conversation_id: str,
        limit: int,
        max_bytes: int,
    ) -> tuple[int, Any, Texts, int | None, bool, int]:
        """(the conversation's pk, its system prompt, its window, ``data_version`` of the
        snapshot it was read in, whether ``max_bytes`` cut the window, its ``last_seq``;
        pk and ``last_seq`` 0 if it is not stored).

        All in one snapshot: the loop's connection is in the read transaction of its
        pass (:meth:`_reading_connection`), a thread's begins one here.  A new
        conversation costs one statement, and no version (nothing is cached for it).

        The messages are never decoded: each one's JSON text is put together from the
        stored JSON columns, to be spliced into the request body.  Decoding them to str
        and dicts, and encoding the dicts again, cost ~1.2 us per message of the window
        (up to ``memory.max_history_messages``); putting the text together costs ~0.3."""
        own = not conn.in_transaction  # a thread's connection: not in a read of its pass
        if own:
            conn.execute("BEGIN")
        try:
            found = conn.execute(_FIND, (tenant, user, conversation_id)).fetchone()
            if found is None:
                return 0, None, Texts.empty(), None, False, 0
            version = conn.execute("PRAGMA data_version").fetchone()[0]
            window, cut = self._blocks.read(conn, found[0], found[2], limit, max_bytes)
        finally:
            if own:
                conn.execute("COMMIT")
        return found[0], _load(found[1]), window, version, cut, found[2]

    def append_turn_soon(
        self,
        tenant: str,
        user: str,
        conversation_id: str,
        system: Any,
        turn: Sequence[dict[str, Any]],
        now: int,
        *,
        together: bool = False,
        after: tuple[int, int] | None = None,
        decided: Decided | None = None,
    ) -> asyncio.Future[None]:
        """Append ``turn`` in a transaction of its own or, ``together``, in one transaction
        with the other turns that finish with it; the future is done once the turn is
        committed (or failed), and ``decided`` is called then, with None or the failure.

        The write is under way when this returns, and nothing the caller does stops it:
        cancelling the future only stops waiting for it (``decided`` is still called).
        A turn alone is written at once (the future comes back done) unless the lock is
        taken, when the writer thread waits for it.

        Under load most of a commit's cost is shared (the same index and table pages go
        to the WAL, the same locks are taken), so turns that finish together commit
        together (see :meth:`_write` for a turn that fails).  The group is committed
        once a whole pass of the event loop went by in which no turn joined it, and
        after ``_GATHER_PASSES + 1`` passes at the latest: a turn finishing alone waits
        two passes (microseconds on an idle loop); under load, when turns finish in every
        pass, one transaction takes several passes' worth.  At 32 clients that cut the
        gateway's CPU per request by a fifth, and its latency with it (benchmarks/,
        plain c=32).
        """
        loop = asyncio.get_running_loop()
        args = (tenant, user, conversation_id, system, turn, now, after)
        future: asyncio.Future[None] = loop.create_future()
        if decided is not None:
            self._deciders[future] = decided
        if together:
            self._queued.append((args, future))
            if len(self._queued) == 1:
                self._gathered, self._passes = 0, 0
                loop.call_soon(self._flush, loop)
        else:
            self._commit([args], [future])
        return future

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        """A pass of the event loop since the group commit was due: commit its turns,
        unless more joined in the last pass (see :meth:`append_turn_soon`)."""
        if len(self._queued) > self._gathered and self._passes < _GATHER_PASSES:
            self._gathered = len(self._queued)
            self._passes += 1
            loop.call_soon(self._flush, loop)
            return
        self.commit_queued()

    def commit_queued(self) -> None:
        """Commit the turns of a group commit still gathering now (the store is closing)."""
        queued, self._queued = self._queued, []
        if not queued:
            return  # already committed by an earlier call
        self._commit([args for args, _ in queued], [future for _, future in queued])

    @contextlib.contextmanager
    def holding_commits(self) -> Iterator[None]:
        """Hold back the turns that finish while the process's own SQLAlchemy engine has a
        write transaction open (the Conversations API, retention; see
        ``Store._write``), and commit them after it in one transaction, in the order
        they came.

        That transaction holds SQLite's write lock over several passes of the event loop,
        one for each statement, which under load take milliseconds.  A turn that found the
        lock taken went to the writer thread, whose busy handler sleeps (1, 2, 5, 10 ms
        ...) between tries, every later turn queued behind it there, and after
        ``busy_timeout`` the turn failed: 100 Conversations API writes a second cut chat's
        throughput by a third and put its p99 at 30-40 ms.

        Such writes may overlap: a write on the thread that waits for another process's
        lock, and an API write on the loop's connection that got the lock first.  The
        turns are held until the last of them ends (the loop's one began holding anew
        and dropped what was held: those turns' requests waited for good)."""
        self._holders += 1
        try:
            yield
        finally:
            self._holders -= 1
            held = self._held
            if held and not self._holders:
                self._held = []
                self._commit(
                    [args for batch, _ in held for args in batch],
                    [future for _, futures in held for future in futures],
                )

    def _commit(self, batch: Sequence[_TurnArgs], futures: list[asyncio.Future[None]]) -> None:
        """Write ``batch`` on the loop's connection and settle each turn's future; when
        another process (or our own writer thread) holds the lock, the writer thread waits
        for it instead, never the event loop.

        While a batch waits there, later ones queue behind it on the same thread, which
        runs them in order: written on the loop's connection the moment the lock came
        free, a later turn would be stored before the earlier one, which SQLite's busy
        handler wakes up for only after its next sleep (up to 100 ms).  A client that
        left before ``[DONE]`` and asked again at once found its two turns stored the
        wrong way round (a soak test, one cut in 3,596)."""
        if self._holders:
            self._held.append((batch, futures))
            return
        if self._waiting:
            self._wait_for_lock(batch, futures)
            return
        try:
            written = self._write(self._writing_connection(), batch)
        except sqlite3.OperationalError as exc:
            if sqlite_busy(exc):
                self._wait_for_lock(batch, futures)
            else:
                self._health.failed(exc)
                self._settle(futures, [exc] * len(futures))
            return
        except Exception as exc:  # handed to every caller of the batch
            if isinstance(exc, sqlite3.Error):
                self._health.failed(exc)
            self._settle(futures, [exc] * len(futures))
            return
        self._health.wrote()
        self._committed(batch, written)
        self._settle(futures, written)

    def _wait_for_lock(
        self, batch: Sequence[_TurnArgs], futures: list[asyncio.Future[None]]
    ) -> None:
        """Write ``batch`` on the writer thread, whose connection waits for the lock."""
        waiting = self._ahead_of_writes(self._write, batch)
        waiting.add_done_callback(lambda done: self._written_on_thread(futures, done))

    def _written_on_thread(
        self, futures: Sequence[asyncio.Future[None]], done: asyncio.Future[list[_Written]]
    ) -> None:
        if not done.cancelled():
            error = done.exception()
            if error is None:
                self._health.wrote()
            elif isinstance(error, sqlite3.Error):
                self._health.failed(error)  # contention (a lock past busy_timeout) aside
        self._settle_from(futures, done)

    def _settle(
        self, futures: Sequence[asyncio.Future[None]], outcome: Sequence[BaseException | _Turn]
    ) -> None:
        """Settle each turn's future with what became of it, then tell its ``decided``."""
        failures = [_failure(r) if isinstance(r, BaseException) else None for r in outcome]
        for future, failure in zip(futures, failures, strict=True):
            if future.done():  # its waiter left; the turn is decided all the same
                continue
            if failure is not None:
                future.set_exception(failure)
            else:
                future.set_result(None)
        if self._deciders:  # after every future is settled: none waits for good on a fault
            for future, failure in zip(futures, failures, strict=True):
                decided = self._deciders.pop(future, None)
                if decided is not None:
                    decided(failure)

    def _settle_from(
        self, futures: Sequence[asyncio.Future[None]], done: asyncio.Future[Any]
    ) -> None:
        """Settle ``futures`` from a batch written on the writer thread."""
        if done.cancelled():
            self._settle(futures, [asyncio.CancelledError()] * len(futures))
        elif (error := done.exception()) is not None:
            self._settle(futures, [error] * len(futures))
        else:
            self._settle(futures, done.result())

    def _ahead_of_writes(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Run ``fn`` on the writer thread; until it is done, the turns that finish queue
        behind it there instead of being written on the loop's connection (:meth:`_commit`)."""
        work = asyncio.get_running_loop().run_in_executor(self._writer, self._on_thread, fn, *args)
        self._waiting.add(work)
        work.add_done_callback(self._waiting.discard)
        return work

    def _committed(self, batch: Sequence[_TurnArgs], written: Sequence[_Written]) -> None:
        """After a commit on the loop's connection: the windows grow, checkpoints are due."""
        for args, turn in zip(batch, written, strict=True):
            key = args[:3]
            if key in self._windows and not isinstance(turn, Exception):
                rows, stored_system = turn
                self._windows.committed(
                    key,
                    None if stored_system is None else jsonio.loads(stored_system),
                    self._as_read(rows, self._windows.last_role(key)),
                    rows[-1][1],  # a turn has its answer at least
                )
        self._count_commit()

    def _count_commit(self) -> None:
        """A commit on the loop's connection, which never checkpoints: one is due every
        ``_CHECKPOINT_EVERY`` commits, or the WAL grows by every commit for good."""
        self._since_checkpoint += 1
        if self._since_checkpoint >= _CHECKPOINT_EVERY:
            self._since_checkpoint = 0
            self._checkpoint_soon()

    def _checkpoint_soon(self) -> None:
        """Checkpoint on the writer thread while the loop's connection goes on writing;
        when the WAL still holds ``_RESTART_AFTER_FRAMES`` pages after that, once more
        with the turns that finish meanwhile queued behind it there (as behind a batch
        waiting for the lock, see :meth:`_commit`).

        SQLite starts the WAL over only when a write begins with all of it copied into
        the database.  A checkpoint copies what was committed when it started, and under
        load the loop's connection commits while it runs, so that moment never came: the
        WAL grew by every commit for as long as the load lasted (153 MB in 9 s at 4,500
        turns a second).  The second checkpoint copies what the first left (a few pages
        and an fsync) with the writes held back, so the next write starts the WAL over.
        Under a lighter load the first finds no writes going on, and the WAL starts over
        by itself."""
        loop = asyncio.get_running_loop()
        checkpoint = loop.run_in_executor(self._writer, self._on_thread, _checkpoint)
        checkpoint.add_done_callback(self._checkpointed)

    def _checkpointed(self, done: asyncio.Future[int]) -> None:
        """After a checkpoint: log one that failed (the WAL keeps what it holds, and the
        next checkpoint copies it); hold the writes back for one more while the WAL is
        large."""
        if _failed_checkpoint(done) or done.result() < _RESTART_AFTER_FRAMES:
            return
        if self._inline is None:
            return  # closed meanwhile
        self._ahead_of_writes(_checkpoint).add_done_callback(_failed_checkpoint)

    def _as_read(self, rows: Sequence[_Row], previous_role: str | None) -> Texts:
        """A turn's rows as a read of the window gives them back (``blocks``), after a
        message of ``previous_role``."""
        roles: list[str] = []
        texts: list[bytes] = []
        for row in rows:
            role, content, name, tool_calls, tool_call_id, reasoning = row[2:8]
            if reasoning is not None and not resends_reasoning(
                self._resend_reasoning, role, tool_calls is not None, previous_role
            ):
                reasoning = None
            wire = map(_utf8, (content, name, tool_calls, tool_call_id, reasoning))
            roles.append(role)
            texts.append(message_json(role.encode(), *wire))
            previous_role = role
        return Texts.made(roles, texts)

    def _write(self, conn: sqlite3.Connection, batch: Sequence[_TurnArgs]) -> list[_Written]:
        """Write ``batch`` in one ``BEGIN IMMEDIATE`` transaction; what became of each turn.

        When a turn of several fails, the batch is written again with each turn in a
        savepoint, so that one (its exception is in the returned list) does not take the
        others with it.  Raises when the transaction itself fails: the lock is taken, or
        the commit failed.
        """
        conn.execute("BEGIN IMMEDIATE")
        try:
            try:
                alone = len(batch) == 1
                turns = [self._upsert(conn, *args, alone=alone) for args in batch]
                # One statement run for the messages of every turn in the batch.
                conn.executemany(_INSERT, [row for rows, _ in turns for row in rows])
                for rows, _ in turns:
                    self._write_blocks(conn, rows)
                outcome: list[_Written] = [*turns]
            except Exception:
                if len(batch) == 1:
                    raise
                # A turn of the batch failed: write them one by one, each in a savepoint,
                # so that it takes only itself (rare: a batch is all or nothing otherwise).
                conn.execute("ROLLBACK")
                conn.execute("BEGIN IMMEDIATE")
                outcome = [self._write_alone(conn, args) for args in batch]
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return outcome

    def _write_blocks(self, conn: sqlite3.Connection, rows: Sequence[_Row]) -> None:
        """The history blocks a turn's ``rows``, just inserted, complete (see ``blocks``)."""
        if not rows:
            return
        first, last = rows[0][1], rows[-1][1]
        if last % BLOCK <= last - first:  # a multiple of BLOCK among them
            self._blocks.write(conn, rows[0][0], first, last)

    def _write_alone(self, conn: sqlite3.Connection, args: _TurnArgs) -> _Written:
        conn.execute("SAVEPOINT turn")
        try:
            turn = self._upsert(conn, *args, alone=True)
            conn.executemany(_INSERT, turn[0])
            self._write_blocks(conn, turn[0])
            return turn
        except Exception as exc:  # that turn's caller gets it
            conn.execute("ROLLBACK TO turn")
            return exc
        finally:
            conn.execute("RELEASE turn")

    def _upsert(
        self,
        conn: sqlite3.Connection,
        tenant: str,
        user: str,
        conversation_id: str,
        system: Any,
        turn: Sequence[dict[str, Any]],
        now: int,
        after: tuple[int, int] | None,
        *,
        alone: bool,
    ) -> _Turn:
        """Upsert the turn's conversation, which reserves its sequence numbers; the rows of
        its messages, to be inserted, and its system prompt as stored.  When another write
        came after ``after`` (:func:`pairing.overtaken`), the turn is checked against what
        it now follows (``alone``: the messages before it are all inserted)."""
        count = len(turn)
        stored_system = _dump(system)
        values = (conversation_id, tenant, user, stored_system, count, now, now)
        key = (tenant, user, conversation_id)
        if key in self._unseen:
            self._unseen.discard(key)
            try:
                pk, last_seq = cast(int, conn.execute(_CREATE, values).lastrowid), count
            except sqlite3.IntegrityError:  # created since it was read: upsert after all
                pk, last_seq = conn.execute(_UPSERT, values).fetchone()
        else:
            pk, last_seq = conn.execute(_UPSERT, values).fetchone()
        first = last_seq - count + 1
        if overtaken(after, pk, first - 1):
            if not alone:
                raise _Regroup
            check_still_there(after, pk, first - 1)
            check_turn(turn, conn.execute(_TAIL, (pk, first - 1, pk, first - 1)))
        rows = [
            (
                pk,
                first + offset,
                m["role"],
                _dump(m.get("content")),
                m.get("name"),
                _dump(m.get("tool_calls")),
                m.get("tool_call_id"),
                m.get("reasoning"),
                m.get("model"),
                m.get("finish_reason"),
                _dump(m.get("usage")),
                now,
            )
            for offset, m in enumerate(turn)
        ]
        return rows, stored_system

    def probe_write(self, probe_id: str) -> None:
        """A conversation row inserted and deleted in one transaction on the loop's
        connection, which never waits (``Store.check_ready``): raises SQLite's error, busy
        at once when another writer holds the lock (a readiness check that waited for it
        would hang for ``busy_timeout``)."""
        conn = self._writing_connection()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                pk = conn.execute(_CREATE, (probe_id, "", "", None, 0, 0, 0)).lastrowid
                conn.execute("DELETE FROM conversations WHERE pk = ?", (pk,))
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            self._health.failed(exc)  # unless busy: contention says nothing of the disk
            raise
        self._health.wrote()
        self._count_commit()  # an idle gateway's probes are its only commits

    def close(self) -> None:
        """Close the connections (on a thread: this waits for the database threads), after
        :meth:`end_read` on the loop: its callback must not run on a connection being
        closed."""
        if self._inline is not None:
            self._inline.close()
            self._inline = None
        for executor in (self._reader, self._writer):
            executor.submit(self._close_connection).result()
            executor.shutdown(wait=True)

    def _close_connection(self) -> None:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
