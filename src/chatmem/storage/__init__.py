"""Storage: the schema and every query (SQLAlchemy 2.0 async; SQLite or PostgreSQL)."""

from __future__ import annotations

from .engine import create_engine
from .queries import History, Owner, Store
from .schema import Base, Conversation, Message

__all__ = ["Base", "Conversation", "History", "Message", "Owner", "Store", "create_engine"]
