"""A window's messages as the JSON texts that go upstream, kept in one bytes object.

A request body is spliced together around the history window (``History.encoded``): the
stored messages' JSON texts joined by commas.  Kept as a list of (role, text) pairs, every
window paid per message to be made and joined again: a 200-message window read from the
history blocks took 36 us to cut into pairs, and each request joined the 200 texts once
more.  :class:`Texts` keeps the texts as they are joined, each followed by a comma (the
history blocks store them so), with the roles and each text's width: a window is a few
``bytes`` joined, and the body's history one slice.

Widths, not where each text starts: a window read from the history blocks, whose sizes
are stored, takes them as they are, and parts join without a position counted again.
Kept as starts, a 200-message window made 200 new integers from the blocks' sizes at
every first visit, and more to shift a part's starts behind the one before it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["Texts"]


@dataclass(slots=True)
class Texts:
    """Messages, oldest first: their roles, and their JSON texts each followed by a comma.
    Never changed once made (windows are shared with the window cache)."""

    roles: list[str]
    body: bytes
    """The texts, each followed by a comma."""
    widths: list[int]
    """Each text's length with its comma: as many as ``roles``, adding up to ``body``."""

    @staticmethod
    def empty() -> Texts:
        """No messages (one object for all: Texts are never changed)."""
        return _EMPTY

    @classmethod
    def of(cls, messages: Iterable[tuple[str, bytes]]) -> Texts:
        """``messages`` as (role, JSON text)."""
        roles: list[str] = []
        texts: list[bytes] = []
        for role, text in messages:
            roles.append(role)
            texts.append(text)
        return cls.made(roles, texts)

    @classmethod
    def made(cls, roles: list[str], texts: list[bytes]) -> Texts:
        """The messages of ``roles`` and their ``texts``."""
        body = b",".join(texts) + b"," if texts else b""
        return cls(roles, body, [len(text) + 1 for text in texts])

    @classmethod
    def join(cls, parts: Sequence[Texts]) -> Texts:
        """``parts`` one after the other."""
        if len(parts) == 1:
            return parts[0]
        roles: list[str] = []
        widths: list[int] = []
        for part in parts:
            roles += part.roles
            widths += part.widths
        return cls(roles, b"".join([part.body for part in parts]), widths)

    def __len__(self) -> int:
        return len(self.roles)

    def __add__(self, other: Texts) -> Texts:
        return Texts.join((self, other))

    @property
    def size(self) -> int:
        """The texts' length, the commas left out (what ``memory.max_history_bytes``
        counts)."""
        return len(self.body) - len(self.roles)

    def size_from(self, start: int) -> int:
        """The length of the texts from message ``start`` on."""
        return len(self.body) - self._offset(start) - (len(self.roles) - start)

    def newest_within(self, max_bytes: int) -> int:
        """Where the newest messages whose texts add up to at most ``max_bytes`` start."""
        widths = self.widths
        start, total = len(widths), 0
        while start and total + widths[start - 1] - 1 <= max_bytes:
            start -= 1
            total += widths[start] - 1
        return start

    def encoded(self, start: int = 0) -> bytes:
        """The texts from message ``start`` on, joined by commas (b"" for none)."""
        return self.body[self._offset(start) : -1]

    def since(self, start: int) -> Texts:
        """The messages from ``start`` on."""
        if not start:
            return self
        return Texts(self.roles[start:], self.body[self._offset(start) :], self.widths[start:])

    def _offset(self, start: int) -> int:
        """Where message ``start``'s text begins in ``body``."""
        return sum(self.widths[:start])

    def pairs(self) -> list[tuple[str, bytes]]:
        """The messages as (role, JSON text)."""
        pairs: list[tuple[str, bytes]] = []
        start = 0
        for role, width in zip(self.roles, self.widths, strict=True):
            pairs.append((role, self.body[start : start + width - 1]))
            start += width
        return pairs


_EMPTY = Texts([], b"", [])
