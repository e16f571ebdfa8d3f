"""A conversation's window read from SQLite, and the blocks that make a long one cheap.

The window is a conversation's newest ``max_history_messages`` messages, each as the JSON
text that goes upstream (:func:`message_json`), newest first until the byte budget is
spent (:class:`Window`).  Read row by row, 200 messages took about 0.2 ms of the event
loop (SQLite stepping an index and a table, ``sqlite3`` making tuples, the texts put
together) against 0.02 ms for 10.  Every read the window cache cannot answer pays it: a
long conversation's first request after a start, and on ``--workers N`` nearly every
request, since another process's commit clears the cache.

So the messages of a long conversation are also kept in blocks of :data:`BLOCK`, one row
each (table ``history_blocks``): their JSON texts each followed by a comma, as a window
keeps them (:class:`~.texts.Texts`), their roles, and each text's size with its comma.
A read takes the blocks it needs as one: their bodies joined, their roles and sizes
read in one go, never cut into messages (migration 0005 dropped the blocks of 0004,
which kept no commas and where each text ended instead of its size).  The block that ends at
``seq`` ``n * BLOCK`` holds the messages numbered ``n * BLOCK - BLOCK + 1 .. n * BLOCK``
and is written in the transaction of the turn that reaches ``n * BLOCK``, as a window read
makes them under that ``resend_reasoning``.  Numbers are never given twice, and triggers
on ``messages`` (migration 0004) drop the blocks of a message deleted or changed, by the
Conversations API or by hand, and of the message after it, whose reasoning may depend on
the one before; deleting a conversation drops all of them, and so does pruning it.  So a
block is an exact copy of its range.  A read takes the rows after the newest whole block,
then blocks for as long as they follow one another and were made under the same
``resend_reasoning`` and :data:`BLOCK`, then rows for whatever is still missing: without
blocks (a short conversation, one stored before migration 0005, another
``resend_reasoning``, large messages, a damaged block) it reads what it always read.
Blocks further back than ``max_history_messages`` are dropped as new ones come, so the
copy is at most that many messages and two blocks per long conversation, and a block is
at most :data:`BLOCK_MAX_BYTES`.  ``chatmem db check`` compares each block with its
messages (:func:`check`).  PostgreSQL keeps none (its reads are one round trip to a
server that steps rows in C).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from functools import lru_cache
from typing import cast, get_args

import orjson

from .. import jsonio
from ..config import ResendReasoning
from .rows import resent_reasoning
from .texts import Texts

__all__ = ["BLOCK", "BLOCK_MAX_BYTES", "Blocks", "Window", "check", "message_json"]

BLOCK = 32
"""Messages a block holds.  A window read steps up to ``BLOCK - 1`` rows after the newest
block: 32 read a window of 200 in 0.06-0.07 ms alone, where row by row took 0.19."""

BLOCK_MAX_BYTES = 256 * 1024
"""The largest block written.  Blocks save SQLite's and Python's cost per row, which
counts for many small messages; messages of 8 KiB and more on average are read row by
row, so that a turn never copies megabytes in its commit (32 messages of 2 MiB held the
event loop 116 ms) and a read never loads a block much larger than its byte budget."""

Block = tuple[bytes, bytes, bytes]
"""A block as stored: its roles, its texts' sizes (each with its comma), its body."""

_COLUMNS = "SELECT role, content, name, tool_calls, tool_call_id, {reasoning} FROM messages"
_AFTER = _COLUMNS + " WHERE conversation_pk = ? AND seq > ? ORDER BY seq DESC LIMIT ?"
_UP_TO = _COLUMNS + " WHERE conversation_pk = ? AND seq <= ? ORDER BY seq DESC LIMIT ?"
_RANGE = _COLUMNS + " WHERE conversation_pk = ? AND seq >= ? AND seq <= ? ORDER BY seq"
"""``{reasoning}`` is :func:`rows.resent_reasoning`."""
_BLOCKS = (
    "SELECT last_seq, first_seq, resend, roles, sizes, body FROM history_blocks"
    " WHERE conversation_pk = ? AND last_seq <= ? ORDER BY last_seq DESC LIMIT ?"
)
_PUT = (
    "INSERT OR REPLACE INTO history_blocks (conversation_pk, last_seq, first_seq, resend,"
    " roles, sizes, body) VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_DROP_UP_TO = "DELETE FROM history_blocks WHERE conversation_pk = ? AND last_seq <= ?"


@lru_cache(maxsize=256)
def _roles(blob: bytes) -> tuple[str, ...]:
    """A block's roles, made once for all the blocks that have the same: most blocks
    have the same few (a user and an assistant taking turns).  Made anew for each read,
    the 192 strings of a 200-message window were about 16 us of the 36 that putting 6
    blocks into the window took, in the gateway under ``benchmarks.first_visit`` (its
    whole read: 103 us)."""
    return tuple(blob.decode().split())


def _json_text(value: bytes | float) -> bytes:
    """A JSON column's value as JSON text.  The columns are declared ``JSON``, which gives
    them SQLite's NUMERIC affinity: a stored number (``"tool_calls": 5``) comes back as an
    int or a float, not as text."""
    return value if isinstance(value, bytes) else jsonio.dumps(value)


def _quote(text: bytes) -> bytes:
    return jsonio.dumps(text.decode())


# How a message's JSON object starts, for each role the gateway accepts.
_HEADS = {
    role.encode(): b'{"role":' + _quote(role.encode()) + b',"content":'
    for role in ("system", "developer", "user", "assistant", "tool", "function")
}


def message_json(
    role: bytes,
    content: bytes | float | None,
    name: bytes | None,
    tool_calls: bytes | float | None,
    tool_call_id: bytes | None,
    reasoning: bytes | None,
) -> bytes:
    """One stored message as the JSON object sent upstream: role and content, then name,
    tool_calls, tool_call_id and the reasoning to send again (as ``reasoning_content``)
    when not NULL (the keys ``queries._to_wire`` gives on the SQLAlchemy path).  The JSON
    columns go in as the text they are stored as."""
    head = _HEADS.get(role) or b'{"role":' + _quote(role) + b',"content":'
    if (
        name is None
        and tool_calls is None
        and tool_call_id is None
        and reasoning is None
        and type(content) is bytes
    ):
        return head + content + b"}"  # most messages: role and text
    parts = [head, b"null" if content is None else _json_text(content)]
    if name is not None:
        parts += (b',"name":', _quote(name))
    if tool_calls is not None:
        parts += (b',"tool_calls":', _json_text(tool_calls))
    if tool_call_id is not None:
        parts += (b',"tool_call_id":', _quote(tool_call_id))
    if reasoning is not None:
        parts += (b',"reasoning_content":', _quote(reasoning))
    parts.append(b"}")
    return b"".join(parts)


class Window:
    """A window put together newest first, from rows and blocks, until it has ``limit``
    messages or the next would take its JSON text past ``max_bytes`` (0: no budget)."""

    __slots__ = ("_parts", "count", "cut", "limit", "max_bytes", "size")

    def __init__(self, limit: int, max_bytes: int) -> None:
        self.limit = limit
        self.max_bytes = max_bytes
        self.count = 0
        self.size = 0
        """The JSON text's length so far."""
        self.cut = False
        """Whether the budget left a message out."""
        self._parts: list[Texts] = []
        """Each oldest first; the newest part first."""

    @property
    def full(self) -> bool:
        return self.cut or self.count >= self.limit

    def add_rows(self, rows: sqlite3.Cursor) -> None:
        """Rows of a window query, newest first; the query's LIMIT says how many are
        wanted.  They are read only until the budget is spent: read whole and cut
        afterwards, a conversation of large items held the event loop a second a turn."""
        roles: list[str] = []
        texts: list[bytes] = []
        total = self.size
        for row in rows:
            text = message_json(*row)
            if self.max_bytes and total + len(text) > self.max_bytes:
                rows.close()  # the rest is never read
                self.cut = True
                break
            total += len(text)
            roles.append(row[0].decode())
            texts.append(text)
        roles.reverse()
        texts.reverse()
        self._add(Texts.made(roles, texts))

    def add_blocks(self, blocks: Sequence[Block]) -> None:
        """Blocks that follow one another, newest first: as many of their newest messages
        as are still wanted.  They are read as one: all their sizes in one string (block
        by block, a window of 200 took 2.5 us more a block), their roles from
        :func:`_roles`.
        Raises ValueError for blocks that are not as this chatmem writes them."""
        oldest_first = blocks[::-1]
        names: list[str] = []
        for roles, _, _ in oldest_first:
            names += _roles(roles)
        sizes = orjson.loads(b"[" + b",".join([sizes for _, sizes, _ in oldest_first]) + b"]")
        body = b"".join([body for _, _, body in oldest_first])
        try:
            end = sum(sizes)
        except TypeError as exc:  # strings and numbers, lists
            raise ValueError("a block's sizes are not numbers") from exc
        # Integers (a float among them makes their total one), as many as the roles,
        # adding up to the body, whose texts each end with a comma.
        if type(end) is not int or len(sizes) != len(names) or end != len(body):
            raise ValueError("a block's roles, sizes and body disagree")
        if body[-1:] != b",":
            raise ValueError("a block's texts do not end with commas")
        texts = Texts(names, body, sizes)
        first = max(0, len(names) - (self.limit - self.count))
        if self.max_bytes and self.size + texts.size_from(first) > self.max_bytes:
            # the newest of them that fit, as add_rows takes them
            first = texts.newest_within(self.max_bytes - self.size)
            self.cut = True
        self._add(texts.since(first))

    def _add(self, part: Texts) -> None:
        self._parts.append(part)
        self.count += len(part)
        self.size += part.size

    def messages(self) -> Texts:
        """The window, oldest first."""
        return Texts.join(self._parts[::-1])


class Blocks:
    """Window reads and block writes under one ``resend_reasoning``, keeping blocks for
    windows of ``keep`` messages (``memory.max_history_messages``)."""

    def __init__(self, resend: ResendReasoning, keep: int) -> None:
        self.resend = resend.encode()
        self.keep = keep
        reasoning = resent_reasoning(resend)
        self.after = _AFTER.format(reasoning=reasoning)
        self.up_to = _UP_TO.format(reasoning=reasoning)
        self.range = _RANGE.format(reasoning=reasoning)

    def read(
        self, conn: sqlite3.Connection, pk: int, last_seq: int, limit: int, max_bytes: int
    ) -> tuple[Texts, bool]:
        """The window of conversation ``pk``, oldest first, and whether ``max_bytes`` cut
        it; in the caller's transaction (one snapshot for blocks and rows)."""
        window = Window(limit, max_bytes)
        top = last_seq - last_seq % BLOCK
        window.add_rows(conn.execute(self.after, (pk, top, limit)))
        if top and not window.full:
            top -= self._read_blocks(window, conn, pk, top)
            if top and not window.full:
                window.add_rows(conn.execute(self.up_to, (pk, top, limit - window.count)))
        return window.messages(), window.cut

    def _read_blocks(self, window: Window, conn: sqlite3.Connection, pk: int, top: int) -> int:
        """The blocks of conversation ``pk`` that follow one another down from message
        ``top``, as many as ``window`` still wants; how many messages they took the place
        of (0: none could be read)."""
        blocks: list[Block] = []
        wanted = window.limit - window.count
        size = window.size
        rows = conn.execute(_BLOCKS, (pk, top, -(-wanted // BLOCK)))
        for last, first, resend, roles, sizes, body in rows:
            # A block of another size (another chatmem) or mode ends the blocks read.
            if last != top or first != top - BLOCK + 1 or resend != self.resend:
                break
            blocks.append((roles, sizes, body))
            top -= BLOCK
            size += len(body) - BLOCK  # its texts, the commas left out
            if window.max_bytes and size > window.max_bytes:
                break  # the budget is spent: the window takes what fits of these
        rows.close()
        if not blocks:
            return 0
        try:
            window.add_blocks(blocks)
        except ValueError:  # not as this chatmem writes them (db check says so): rows
            return 0
        return BLOCK * len(blocks)

    def write(self, conn: sqlite3.Connection, pk: int, first: int, last: int) -> None:
        """After messages ``first..last`` of conversation ``pk`` went in (in their
        transaction): the blocks they complete, and the oldest dropped."""
        for end in range(-(-first // BLOCK) * BLOCK, last + 1, BLOCK):
            self._put(conn, pk, end)

    def _put(self, conn: sqlite3.Connection, pk: int, last: int) -> None:
        first = last - BLOCK + 1
        rows = conn.execute(self.range, (pk, first, last))
        roles: list[str] = []
        texts: list[bytes] = []
        size = 0
        for row in rows:
            texts.append(message_json(*row))
            roles.append(row[0].decode())
            size += len(texts[-1])
            if size > BLOCK_MAX_BYTES:
                rows.close()  # large messages: read row by row, the rest never loaded here
                texts = []
                break
        joined = " ".join(roles)
        # A role with a space in it (no role the gateway takes) would split in two: no block.
        if texts and len(joined.split()) == len(texts):
            block = Texts.made(roles, texts)  # stored as a window keeps it
            sizes = b",".join([b"%d" % width for width in block.widths])
            conn.execute(_PUT, (pk, last, first, self.resend, joined.encode(), sizes, block.body))
        conn.execute(_DROP_UP_TO, (pk, last - self.keep - BLOCK))


def check(conn: sqlite3.Connection) -> list[tuple[int, str]]:
    """Each block that is not an exact copy of its messages, as (conversation pk, what is
    wrong) (``chatmem db check``); ``conn`` gives TEXT as bytes."""
    problems: list[tuple[int, str]] = []
    queries: dict[bytes, Blocks] = {}
    for pk, last, first, resend, roles, sizes, body in conn.execute(
        "SELECT conversation_pk, last_seq, first_seq, resend, roles, sizes, body"
        " FROM history_blocks ORDER BY conversation_pk, last_seq"
    ):
        name = f"history block {first}..{last}"
        if resend.decode() not in get_args(ResendReasoning) or first != last - BLOCK + 1:
            problems.append((pk, f"{name} is not one this chatmem writes"))
            continue
        blocks = queries.setdefault(resend, Blocks(cast(ResendReasoning, resend.decode()), 0))
        rows = conn.execute(blocks.range, (pk, first, last)).fetchall()
        window = Window(BLOCK, 0)
        try:
            window.add_blocks([(roles, sizes, body)])
        except ValueError:  # sizes that are not numbers, or not as many as the roles
            problems.append((pk, f"{name} cannot be read"))
            continue
        if window.messages() != Texts.of((row[0].decode(), message_json(*row)) for row in rows):
            problems.append((pk, f"{name} differs from the messages it copies"))
    return problems
