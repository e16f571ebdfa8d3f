"""The Conversations API's queries: conversations made, listed, renamed in their
metadata; items listed, appended and deleted.  :class:`Store` inherits them; the turns of
the chat route are its own (``queries``)."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, aclosing
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy import and_, delete, insert, or_, select, update

from .pairing import call_ids, open_calls
from .rows import (
    Executes,
    Owner,
    conversations,
    item_size,
    messages,
    owned,
    tail_before,
    to_row,
    walk,
)

__all__ = [
    "INLINE_ITEMS",
    "ITEM_FIELDS",
    "ConversationInfo",
    "ConversationItems",
    "Deletion",
    "Page",
]

T = TypeVar("T")

INLINE_ITEMS = 256
"""Items a write may insert within one step of the event loop (see ``inline_sqlite``):
about 7 us each there, so at most 2 ms in which no stream moves.  A larger import (a
4 MiB body holds 20,000 short items: 140 ms on the loop) goes to aiosqlite's thread."""


@dataclass(frozen=True, slots=True)
class Deletion:
    """What deleting an item did: the messages deleted (the item first), or nothing
    because the item is the result of the tool call in message ``call_seq``."""

    seqs: list[int]
    call_seq: int | None = None


@dataclass(frozen=True, slots=True)
class ConversationInfo:
    """A conversation as the Conversations API shows it."""

    id: str
    created_at: int
    metadata: dict[str, str]


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a list, in the order asked for; ``has_more`` if the list goes on."""

    data: list[T]
    has_more: bool


def _info(row: Any) -> ConversationInfo:
    return ConversationInfo(id=row.id, created_at=row.created_at, metadata=row.meta or {})


_INFO_COLUMNS = (
    conversations.c.id,
    conversations.c.created_at,
    conversations.c["metadata"].label("meta"),
)
# Every stored field of a message, as the Conversations API lists items.
ITEM_FIELDS = (
    "seq",
    "role",
    "content",
    "name",
    "tool_calls",
    "tool_call_id",
    "reasoning",
    "model",
    "finish_reason",
    "usage",
    "created_at",
)


_PAGE_BYTES = 8 * 1024 * 1024
"""A page of items ends once its items' content, tool calls and reasoning are this large
(one item at least)."""


def _page_seqs(sized: Sequence[Any], limit: int) -> list[int]:
    """The ``seq`` of the items on a page, from (seq, size) rows in the page's order."""
    seqs: list[int] = []
    total = 0
    for seq, size in sized[:limit]:
        total += size
        if seqs and total > _PAGE_BYTES:
            break
        seqs.append(seq)
    return seqs


async def _results_of(conn: Executes, ours: Any, seq: int, call_ids: set[str]) -> list[int]:
    """The seqs of the tool results in the run right after ``seq`` that answer
    ``call_ids``."""
    m = messages.c
    results: list[int] = []
    async with aclosing(walk(conn, (m.role, m.tool_call_id), ours, seq, newer=True)) as rows:
        async for row in rows:
            if row.role != "tool":
                break
            if row.tool_call_id in call_ids:
                results.append(int(row.seq))
    return results


class ConversationItems(ABC):
    """The Conversations API's queries, on the transactions of the class that inherits
    them."""

    _sqlite: bool

    @abstractmethod
    async def _run_read(self, work: Callable[[Executes], Awaitable[T]]) -> T:
        """Run ``work`` on a connection, with no transaction of its own."""

    @abstractmethod
    async def _run_write(
        self, work: Callable[[Executes], Awaitable[T]], *, bounded: bool = True
    ) -> T:
        """Run ``work`` in one write transaction, again if the database asks for it.
        ``bounded``: small enough to run within one step of the event loop (see
        ``inline_sqlite``)."""

    @abstractmethod
    def _write(self, *, bounded: bool = True) -> AbstractAsyncContextManager[Executes]:
        """A connection in a write transaction, committed at the end of the block;
        ``bounded``: as for :meth:`_run_write`."""

    async def create_conversation(
        self,
        owner: Owner,
        conversation_id: str,
        *,
        metadata: dict[str, str],
        system: list[dict[str, Any]] | None,
        items: Sequence[dict[str, Any]],
    ) -> ConversationInfo:
        """A new conversation with its first messages, in one transaction."""
        now = int(time.time())
        async with self._write(bounded=len(items) <= INLINE_ITEMS) as conn:
            pk = (
                await conn.execute(
                    insert(conversations)
                    .values(
                        id=conversation_id,
                        tenant=owner.tenant,
                        user_id=owner.user,
                        system_prompt=system,
                        metadata=metadata,
                        last_seq=len(items),
                        created_at=now,
                        updated_at=now,
                    )
                    .returning(conversations.c.pk)
                )
            ).scalar_one()
            if items:
                rows = [
                    {**to_row(item, now), "conversation_pk": pk, "seq": seq}
                    for seq, item in enumerate(items, start=1)
                ]
                await conn.execute(insert(messages), rows)
        return ConversationInfo(id=conversation_id, created_at=now, metadata=metadata)

    async def get_conversation(self, owner: Owner, conversation_id: str) -> ConversationInfo | None:
        query = select(*_INFO_COLUMNS).where(owned(owner, conversation_id))

        async def read(conn: Executes) -> Any:
            return (await conn.execute(query)).first()

        row = await self._run_read(read)
        return None if row is None else _info(row)

    async def update_metadata(
        self, owner: Owner, conversation_id: str, metadata: dict[str, str]
    ) -> ConversationInfo | None:
        """Replace the conversation's metadata; None if the owner has no such conversation."""
        stmt = (
            update(conversations)
            .where(owned(owner, conversation_id))
            .values(metadata=metadata, updated_at=int(time.time()))
            .returning(*_INFO_COLUMNS)
        )
        async with self._write() as conn:
            row = (await conn.execute(stmt)).first()
        return None if row is None else _info(row)

    async def list_conversations(
        self, owner: Owner, *, limit: int, after: str | None, newest_first: bool
    ) -> Page[ConversationInfo] | None:
        """The owner's conversations by creation time; None if ``after`` is not one of them."""
        c = conversations.c
        mine = select(*_INFO_COLUMNS).where(c.tenant == owner.tenant, c.user_id == owner.user)
        order = (c.created_at.desc(), c.pk.desc()) if newest_first else (c.created_at, c.pk)

        async def read(conn: Executes) -> Sequence[Any] | None:
            query = mine
            if after is not None:
                cursor = (
                    await conn.execute(select(c.created_at, c.pk).where(owned(owner, after)))
                ).first()
                if cursor is None:
                    return None
                if newest_first:
                    query = query.where(
                        or_(
                            c.created_at < cursor.created_at,
                            and_(c.created_at == cursor.created_at, c.pk < cursor.pk),
                        )
                    )
                else:
                    query = query.where(
                        or_(
                            c.created_at > cursor.created_at,
                            and_(c.created_at == cursor.created_at, c.pk > cursor.pk),
                        )
                    )
            return (await conn.execute(query.order_by(*order).limit(limit + 1))).all()

        rows = await self._run_read(read)
        if rows is None:
            return None
        return Page(data=[_info(row) for row in rows[:limit]], has_more=len(rows) > limit)

    async def list_items(
        self,
        owner: Owner,
        conversation_id: str,
        *,
        limit: int,
        after_seq: int | None,
        newest_first: bool,
    ) -> Page[dict[str, Any]] | None:
        """Stored messages with every field; None if the owner has no such conversation."""
        m = messages.c

        async def read(conn: Executes) -> Page[dict[str, Any]] | None:
            pk = (
                await conn.execute(select(conversations.c.pk).where(owned(owner, conversation_id)))
            ).scalar_one_or_none()
            if pk is None:
                return None
            where = [m.conversation_pk == pk]
            if after_seq is not None:
                where.append(m.seq < after_seq if newest_first else m.seq > after_seq)
            order = m.seq.desc() if newest_first else m.seq
            # Sizes first: a page of large items ends at _PAGE_BYTES (has_more says so),
            # and only its rows are read (100 items of 3 MB each made one page 300 MB).
            sizes = select(m.seq, item_size).where(*where).order_by(order).limit(limit + 1)
            sized = (await conn.execute(sizes)).all()
            seqs = _page_seqs(sized, limit)
            query = select(*(m[name] for name in ITEM_FIELDS)).where(m.seq.in_(seqs), *where)
            rows = (await conn.execute(query.order_by(order))).all() if seqs else ()
            return Page([dict(row._mapping) for row in rows], has_more=len(seqs) < len(sized))

        return await self._run_read(read)

    async def append_items(
        self,
        owner: Owner,
        conversation_id: str,
        *,
        system: list[dict[str, Any]] | None,
        items: Sequence[dict[str, Any]],
        check_results: Callable[[set[str], set[str]], None] | None = None,
    ) -> list[dict[str, Any]] | None:
        """Append messages to an existing conversation; None if the owner has none such.

        Like :meth:`commit_turn`, bumping ``last_seq`` reserves the sequence numbers and
        locks the row, so appends, deletes and chat turns never interleave.
        ``check_results`` is called with the tool call ids the stored conversation ends
        with (those a tool result appended now may answer) and those of them not answered
        yet, once the row is locked, so a delete cannot remove the call between the check
        and the append; what it raises rolls the append back.
        """
        now = int(time.time())
        changes: dict[str, Any] = {"last_seq": conversations.c.last_seq + len(items)}
        changes["updated_at"] = now
        if system is not None:
            changes["system_prompt"] = system
        stmt = (
            update(conversations)
            .where(owned(owner, conversation_id))
            .values(**changes)
            .returning(conversations.c.pk, conversations.c.last_seq)
        )
        async with self._write(bounded=len(items) <= INLINE_ITEMS) as conn:
            found = (await conn.execute(stmt)).first()
            if found is None:
                return None
            first = found.last_seq - len(items) + 1
            if check_results is not None:
                ours = messages.c.conversation_pk == found.pk
                _, tail = await tail_before(conn, ours, first)
                check_results(*open_calls(tail))
            rows = [
                {**to_row(item, now), "conversation_pk": found.pk, "seq": first + offset}
                for offset, item in enumerate(items)
            ]
            if rows:
                await conn.execute(insert(messages), rows)
        return [{name: row.get(name) for name in ITEM_FIELDS} for row in rows]

    async def delete_item(self, owner: Owner, conversation_id: str, seq: int) -> Deletion | None:
        """Delete one message, so that the history stays one a model server takes.

        An assistant message that made tool calls goes with the tool results after it
        that answer them (they mean nothing without it); a tool result whose call is
        still stored is not deleted (``Deletion.call_seq``): the call would be left
        unanswered, which strict servers refuse on every later turn.  None if the owner
        has no such conversation or message.
        """
        m = messages.c

        async def delete_it(conn: Executes) -> Deletion | None:
            pk = await self._lock_conversation(conn, owner, conversation_id)
            if pk is None:
                return None
            ours = m.conversation_pk == pk
            row = (
                await conn.execute(
                    select(m.role, m.tool_calls, m.tool_call_id).where(ours, m.seq == seq)
                )
            ).first()
            if row is None:
                return None
            seqs = [seq]
            if row.role == "tool":
                call_seq, tail = await tail_before(conn, ours, seq)
                if row.tool_call_id in open_calls(tail)[0]:
                    return Deletion(seqs=[], call_seq=call_seq)
            elif row.role == "assistant" and (calls := call_ids(row.tool_calls)):
                seqs += await _results_of(conn, ours, seq, calls)
            # Found under the conversation's lock: a concurrent delete found nothing.
            # On SQLite a trigger drops the history blocks these messages were in (0004).
            await conn.execute(delete(messages).where(ours, m.seq.in_(seqs)))
            # last_seq moves too (a number no message takes): a turn whose history was read
            # before the delete is checked against what is left when it commits (pairing).
            await conn.execute(
                update(conversations)
                .where(conversations.c.pk == pk)
                .values(updated_at=int(time.time()), last_seq=conversations.c.last_seq + 1)
            )
            return Deletion(seqs=seqs)

        return await self._run_write(delete_it)

    async def _lock_conversation(
        self, conn: Executes, owner: Owner, conversation_id: str
    ) -> int | None:
        """The conversation's pk, its row locked for the transaction on PostgreSQL (SQLite's
        writers are one at a time already): deletes take the conversation's row before its
        messages, as appends and turns do, so none of them interleave or deadlock."""
        find = select(conversations.c.pk).where(owned(owner, conversation_id))
        if not self._sqlite:
            find = find.with_for_update()
        pk: int | None = (await conn.execute(find)).scalar_one_or_none()
        return pk
