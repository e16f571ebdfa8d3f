"""A window's messages as the JSON texts that go upstream, kept in one bytes object.

A request body is spliced together around the history window (``History.encoded``): the
stored messages' JSON texts joined by commas.  Kept as a list of (role, text) pairs, every
window paid per message to be made and joined again: a 200-message window read from the
history blocks took 36 us to cut into pairs, and each request joined the 200 texts once
more.  :class:`Texts` keeps the texts as they are joined, each followed by a comma (the
history blocks store them so), with the roles and where each text starts: a window is a
few ``bytes`` joined, and the body's history one slice.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import pairwise

__all__ = ["Texts"]


@dataclass(slots=True, eq=False)
class Texts:
    """Messages, oldest first: their roles, and their JSON texts each followed by a comma.
    Never changed once made (windows are shared with the window cache).

    ``starts`` counts from wherever ``body`` begins (``starts[0]``), not from 0: the
    messages from ``k`` on are slices of the three (:meth:`since`), so a window that
    slides by a turn at each commit does not count its 200 positions again."""

    roles: list[str]
    body: bytes
    """The texts, each followed by a comma."""
    starts: list[int]
    """Where each text starts, then where the last one ends after its comma: one more
    than ``roles``; ``body`` begins at ``starts[0]``."""

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
        starts = [0]
        end = 0
        for text in texts:
            end += len(text) + 1
            starts.append(end)
        return cls(roles, b",".join(texts) + b"," if texts else b"", starts)

    @classmethod
    def join(cls, parts: Sequence[Texts]) -> Texts:
        """``parts`` one after the other, counted from where the first begins."""
        if len(parts) == 1:
            return parts[0]
        roles: list[str] = []
        starts: list[int] = []
        end: int | None = None
        for part in parts:
            roles += part.roles
            shift = 0 if end is None else end - part.starts[0]
            if shift:
                starts += [start + shift for start in part.starts[:-1]]
            else:
                starts += part.starts[:-1]
            end = part.starts[-1] + shift
        starts.append(0 if end is None else end)
        return cls(roles, b"".join([part.body for part in parts]), starts)

    def __len__(self) -> int:
        return len(self.roles)

    def __add__(self, other: Texts) -> Texts:
        return Texts.join((self, other))

    def __eq__(self, other: object) -> bool:
        """The same messages, wherever each counts its starts from."""
        if not isinstance(other, Texts):
            return NotImplemented
        same = self.roles == other.roles and self.body == other.body
        return same and self.sizes() == other.sizes()

    @property
    def size(self) -> int:
        """The texts' length, the commas left out (what ``memory.max_history_bytes``
        counts)."""
        return len(self.body) - len(self.roles)

    def size_from(self, start: int) -> int:
        """The length of the texts from message ``start`` on."""
        return self.starts[-1] - self.starts[start] - (len(self.roles) - start)

    def sizes(self) -> list[int]:
        """Each text's length."""
        return [end - start - 1 for start, end in pairwise(self.starts)]

    def encoded(self, start: int = 0) -> bytes:
        """The texts from message ``start`` on, joined by commas (b"" for none)."""
        return self.body[self.starts[start] - self.starts[0] : -1]

    def since(self, start: int) -> Texts:
        """The messages from ``start`` on."""
        if not start:
            return self
        return Texts(
            self.roles[start:],
            self.body[self.starts[start] - self.starts[0] :],
            self.starts[start:],
        )

    def pairs(self) -> list[tuple[str, bytes]]:
        """The messages as (role, JSON text)."""
        origin = self.starts[0]
        return [
            (role, self.body[start - origin : end - origin - 1])
            for role, (start, end) in zip(self.roles, pairwise(self.starts), strict=True)
        ]


_EMPTY = Texts([], b"", [0])
