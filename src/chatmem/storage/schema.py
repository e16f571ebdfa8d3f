"""The database schema: conversations, their messages, and blocks of their history."""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.ext.asyncio import AsyncAttrs
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = ["Base", "Conversation", "HistoryBlock", "Message"]

# SQL NULL for None (not the JSON text "null"), so "IS NULL" means what it says.
Json = JSON(none_as_null=True)
# Row numbers and Unix times: 64 bits on PostgreSQL (migration 0006), never given back
# there; SQLite's INTEGER is 64 bits already, and only INTEGER PRIMARY KEY numbers rows.
BigInt = BigInteger().with_variant(Integer(), "sqlite")


class Base(AsyncAttrs, DeclarativeBase):
    """Every table.  The database schema itself is made by the Alembic migrations in
    ``migrations/versions``; a change here needs a new revision there (a test compares
    the two)."""


class Conversation(Base):
    """One conversation of one owner: ``(tenant, user_id)``.

    ``id`` is the public id and is only unique per owner, so a client-chosen id that
    someone else also uses simply names the caller's own conversation.  ``last_seq`` is the
    sequence number of the newest message; a turn reserves its numbers by bumping it in the
    same statement that takes the row lock (see ``queries.commit_turn``).
    """

    __tablename__ = "conversations"
    __table_args__ = (
        UniqueConstraint("tenant", "user_id", "id", name="uq_conversations_owner_id"),
        Index("ix_conversations_owner_created", "tenant", "user_id", "created_at", "pk"),
        Index("ix_conversations_updated", "updated_at"),
        # A deleted conversation's number is never given to another (migration 0003).
        {"sqlite_autoincrement": True},
    )

    pk: Mapped[int] = mapped_column(BigInt, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(128))
    tenant: Mapped[str] = mapped_column(String(255))
    user_id: Mapped[str] = mapped_column(String(255), default="")
    system_prompt: Mapped[list[dict[str, Any]] | None] = mapped_column(Json, nullable=True)
    meta: Mapped[dict[str, str] | None] = mapped_column("metadata", Json, nullable=True)
    last_seq: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[int] = mapped_column(BigInt)
    updated_at: Mapped[int] = mapped_column(BigInt)


class Message(Base):
    """One stored message; ``(conversation_pk, seq)`` is unique and is the history index."""

    __tablename__ = "messages"
    __table_args__ = (UniqueConstraint("conversation_pk", "seq", name="uq_messages_seq"),)

    pk: Mapped[int] = mapped_column(BigInt, primary_key=True, autoincrement=True)
    conversation_pk: Mapped[int] = mapped_column(
        BigInt, ForeignKey("conversations.pk", ondelete="CASCADE")
    )
    seq: Mapped[int] = mapped_column(Integer)
    role: Mapped[str] = mapped_column(String(32))
    content: Mapped[Any] = mapped_column(Json, nullable=True)
    name: Mapped[str | None] = mapped_column(String(255), nullable=True)
    tool_calls: Mapped[list[dict[str, Any]] | None] = mapped_column(Json, nullable=True)
    tool_call_id: Mapped[str | None] = mapped_column(String(255), nullable=True)
    reasoning: Mapped[str | None] = mapped_column(Text, nullable=True)
    model: Mapped[str | None] = mapped_column(String(255), nullable=True)
    finish_reason: Mapped[str | None] = mapped_column(String(64), nullable=True)
    usage: Mapped[dict[str, Any] | None] = mapped_column(Json, nullable=True)
    created_at: Mapped[int] = mapped_column(BigInt)


class HistoryBlock(Base):
    """The messages ``first_seq..last_seq`` of a conversation as the JSON text a window
    read sends upstream, in one row (see ``storage.blocks``): a copy, kept on SQLite for
    the newest ``memory.max_history_messages`` of long conversations, so that reading a
    window is a few rows and not hundreds.  ``resend`` is the ``memory.resend_reasoning``
    the texts were made under; ``roles`` and ``sizes`` (each text's, with the comma that
    follows it in ``body``) are ASCII."""

    __tablename__ = "history_blocks"
    conversation_pk: Mapped[int] = mapped_column(
        BigInt, ForeignKey("conversations.pk", ondelete="CASCADE"), primary_key=True
    )
    last_seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    first_seq: Mapped[int] = mapped_column(Integer)
    resend: Mapped[str] = mapped_column(String(16))
    roles: Mapped[bytes] = mapped_column(LargeBinary)
    sizes: Mapped[bytes] = mapped_column(LargeBinary)
    body: Mapped[bytes] = mapped_column(LargeBinary)
