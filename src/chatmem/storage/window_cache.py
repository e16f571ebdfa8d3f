"""The history windows of the conversations a gateway process is serving, kept in memory.

A conversation that goes on is read again at its next turn: the newest
``memory.max_history_messages`` messages, the same ones as last time plus the turn this
process just committed.  Reading them is the one per-request cost that grows with the
history (an index walk and a table lookup per message), so the fast path keeps each
window as the JSON text it sends upstream (:class:`~.texts.Texts`) and extends it when it
commits a turn.

The cache can only be trusted while no other connection wrote to the database: the
writer thread's, the SQLAlchemy engine of the Conversations API and of retention, another
process.  SQLite says exactly that through ``PRAGMA data_version``, which changes for a
connection when any other connection commits; :meth:`WindowCache.validate` reads it
before a cached window is used and forgets everything when it moved.  Every write the
cache does not see is therefore covered, at the price of one pragma per cache hit.  A
miss reads the database anyway: a window read there comes with the version of the
snapshot it was read in (:meth:`WindowCache.put`), and a new conversation, which has no
window to keep, costs no pragma at all.
"""

from __future__ import annotations

import sqlite3
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from .texts import Texts

__all__ = ["Key", "WindowCache"]

Key = tuple[str, str, str]
"""tenant, user, conversation id"""

_MAX_BYTES = 64 * 1024 * 1024
_MAX_CONVERSATIONS = 10_000


@dataclass(slots=True)
class _Window:
    system: Any
    messages: Texts
    size: int
    last_seq: int
    """The conversation's ``last_seq`` as of this window."""
    pk: int
    """The conversation's row."""


def _size(messages: Texts) -> int:
    # The text, and what Python spends around each message: its width (an int and a list
    # slot) and its role (a str and a list slot); tracemalloc counted 108 bytes a message
    # for windows read from blocks, 127 for windows of 10 read from rows, when each kept
    # where its text started (a new int each) and its own role string.
    return len(messages.body) + 120 * len(messages)


class WindowCache:
    """Least recently used windows, up to 64 MiB of message text or 10,000 conversations."""

    def __init__(
        self, max_bytes: int = _MAX_BYTES, max_conversations: int = _MAX_CONVERSATIONS
    ) -> None:
        self._windows: OrderedDict[Key, _Window] = OrderedDict()
        self._bytes = 0
        self._max_bytes = max_bytes
        self._max_conversations = max_conversations
        self._version: int | None = None
        self._limit: int | None = None

    def __len__(self) -> int:
        return len(self._windows)

    def __contains__(self, key: Key) -> bool:
        return key in self._windows

    def validate(self, conn: sqlite3.Connection, limit: int) -> None:
        """Forget everything if another connection committed since the last call (or the
        window size asked for changed)."""
        version = conn.execute("PRAGMA data_version").fetchone()[0]
        if version != self._version or limit != self._limit:
            self.clear()
            self._version = version
            self._limit = limit

    def get(self, key: Key) -> tuple[Any, Texts, int, int] | None:
        """(system prompt, window, ``last_seq``, pk) of ``key``, if kept."""
        window = self._windows.get(key)
        if window is None:
            return None
        self._windows.move_to_end(key)
        return window.system, window.messages, window.last_seq, window.pk

    def last_role(self, key: Key) -> str | None:
        """The role of the newest message in the window of ``key`` (None: none kept)."""
        window = self._windows.get(key)
        return window.messages.roles[-1] if window is not None and window.messages else None

    def put(
        self,
        key: Key,
        system: Any,
        messages: Texts,
        version: int,
        limit: int,
        last_seq: int,
        pk: int,
    ) -> None:
        """The window as just read from the database, in a snapshot whose ``data_version``
        was ``version``: the windows kept from another version are forgotten."""
        if version != self._version or limit != self._limit:
            self.clear()
            self._version = version
            self._limit = limit
        self._store(key, _Window(system, messages, _size(messages), last_seq, pk))

    def committed(self, key: Key, system: Any, messages: Texts, last_seq: int) -> None:
        """A turn of ``key`` was committed on the validated connection: ``messages`` go at
        the end of its window, ``system`` (when not None) replaces its system prompt, and
        the conversation's ``last_seq`` is now ``last_seq``.

        Only a window already cached grows.  A conversation is cached from its second
        turn on, when that turn's read puts its window here: a conversation that ends
        after one turn, as many API calls do, never takes the place of one that goes on.
        """
        if self._limit is None:
            return
        window = self._windows.pop(key, None)
        if window is None:
            return  # not known here: the next load reads it
        self._bytes -= window.size
        joined = window.messages + messages
        kept = joined.since(max(len(joined) - self._limit, 0))
        kept_system = window.system if system is None else system
        self._store(key, _Window(kept_system, kept, _size(kept), last_seq, window.pk))

    def clear(self) -> None:
        self._windows.clear()
        self._bytes = 0

    def _store(self, key: Key, window: _Window) -> None:
        old = self._windows.pop(key, None)
        if old is not None:
            self._bytes -= old.size
        self._windows[key] = window
        self._bytes += window.size
        while self._windows and (
            self._bytes > self._max_bytes or len(self._windows) > self._max_conversations
        ):
            _, evicted = self._windows.popitem(last=False)
            self._bytes -= evicted.size
