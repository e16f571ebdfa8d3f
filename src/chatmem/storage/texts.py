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


@dataclass(slots=True)
class Texts:
    """Messages, oldest first: their roles, and their JSON texts each followed by a comma.
    Never changed once made (windows are shared with the window cache)."""

    roles: list[str]
    body: bytes
    """The texts, each followed by a comma."""
    starts: list[int]
    """Where each text starts in ``body``, then ``len(body)``: one more than ``roles``."""

    @classmethod
    def empty(cls) -> Texts:
        return cls([], b"", [0])

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
        """``parts`` one after the other."""
        if len(parts) == 1:
            return parts[0]
        roles: list[str] = []
        starts: list[int] = []
        base = 0
        for part in parts:
            roles += part.roles
            if base:
                starts += [start + base for start in part.starts[:-1]]
            else:
                starts += part.starts[:-1]
            base += len(part.body)
        starts.append(base)
        return cls(roles, b"".join([part.body for part in parts]), starts)

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
        return len(self.body) - self.starts[start] - (len(self.roles) - start)

    def sizes(self) -> list[int]:
        """Each text's length."""
        return [end - start - 1 for start, end in pairwise(self.starts)]

    def encoded(self, start: int = 0) -> bytes:
        """The texts from message ``start`` on, joined by commas (b"" for none)."""
        return self.body[self.starts[start] : -1]

    def since(self, start: int) -> Texts:
        """The messages from ``start`` on."""
        if not start:
            return self
        offset = self.starts[start]
        return Texts(
            self.roles[start:],
            self.body[offset:],
            [position - offset for position in self.starts[start:]],
        )

    def pairs(self) -> list[tuple[str, bytes]]:
        """The messages as (role, JSON text)."""
        return [
            (role, self.body[start : end - 1])
            for role, (start, end) in zip(self.roles, pairwise(self.starts), strict=True)
        ]
