"""Storage: the schema and every query (SQLAlchemy 2.0 async; SQLite or PostgreSQL)."""

from __future__ import annotations

from .engine import create_engine
from .items import ConversationInfo, Deletion, Page
from .queries import History, Store
from .rows import RESULT_ROLES, Owner
from .schema import Base, Conversation, Message

__all__ = [
    "RESULT_ROLES",
    "Base",
    "Conversation",
    "ConversationInfo",
    "Deletion",
    "History",
    "Message",
    "Owner",
    "Page",
    "Store",
    "create_engine",
]
