"""The upstream key, masked in what the upstream sends before a client gets it.

An upstream that quotes the credential it was sent (``"bad key Bearer sk-..."``) must not
hand the gateway's key to a client.  The key is looked for as it is and as any JSON string
may write it: Go writes ``<``, ``>`` and ``&`` as ``\\u003c``..., Gson also ``=`` and
``'``, .NET ``+`` as ``\\u002B``, PHP ``/`` as ``\\/``; ``"`` and ``\\`` are escaped by
every one; and any character at all may be written ``\\u00XX`` (``sk\\u002dproj...``,
which a JSON client reads as the key).  Every spelling but the key as it is has a
backslash, so a piece without one is looked at with ``bytes.replace`` alone.
"""

from __future__ import annotations

import functools
import re
from typing import Any

__all__ = ["MASK", "Redactor", "mask_bytes", "masked", "masked_json"]

MASK = b"[upstream key]"

_NEVER_ESCAPED = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.~")
"""Key bytes no JSON encoder writes any other way by itself (JSON still lets a string
write them ``\\u00XX``)."""

_SHORT_ESCAPES = {
    ord("/"): b"\\/",
    ord('"'): b'\\"',
    ord("\\"): b"\\\\",
    ord("\t"): b"\\t",
    ord("\n"): b"\\n",
    ord("\r"): b"\\r",
    ord("\b"): b"\\b",
    ord("\f"): b"\\f",
}
"""JSON's two-character escapes (a header value may hold a tab)."""


def _spellings(byte: int) -> tuple[bytes, ...]:
    """Every way a JSON string may write the key's ``byte``; each starts differently from
    the others or is no prefix of them, so a body is read against them one way only."""
    code = f"\\u{byte:04x}".encode()
    forms = [code, code.upper().replace(b"\\U", b"\\u")]
    if byte in _SHORT_ESCAPES:
        forms.append(_SHORT_ESCAPES[byte])
    if byte >= 0x20 and byte not in (ord('"'), ord("\\")):  # JSON escapes those two always
        forms.append(bytes([byte]))
    return tuple(dict.fromkeys(forms))  # \u002f and \u002F; \u0030 has no upper case


class _Escaped:
    """How the key may come back written as JSON, for a key that may be written more
    than one way."""

    def __init__(self, secret: bytes) -> None:
        self.spellings = tuple(_spellings(byte) for byte in secret)
        either = (b"|".join(map(re.escape, forms)) for forms in self.spellings)
        self.pattern = re.compile(b"".join(b"(?:" + forms + b")" for forms in either))
        self.text = re.compile(self.pattern.pattern.decode("ascii"))
        self.longest = sum(max(map(len, forms)) for forms in self.spellings)
        self.marker = b"\\u" if all(byte in _NEVER_ESCAPED for byte in secret) else b"\\"
        """What every spelling but the key as it is holds: a text without it has none
        (``\\n`` and the like are everywhere in JSON; ``\\u`` is not)."""
        # Where a piece may end inside a spelling: its first character whole, then the
        # second's first byte or the end (found by the regex engine, so :meth:`cut_at`
        # looks at a few places, not every byte); or the first cut short at the end.
        first, *rest = self.spellings
        then = dict.fromkeys(re.escape(form[:1]) for form in rest[0]) if rest else {}
        self.maybe = re.compile(
            b"(?:" + b"|".join(map(re.escape, first)) + b")(?=" + b"|".join([*then, b"\\Z"]) + b")"
        )
        cut = {form[:n] for form in first for n in range(1, len(form))}
        self.cut_first = sorted(cut, key=len, reverse=True)
        """The first character's spellings cut short, longest (the earliest start) first."""

    def cut_at(self, data: bytes, start: int) -> bool:
        """Whether ``data[start:]`` is the first part of the key in one of its spellings
        (the rest may come in the next piece)."""
        at, end = start, len(data)
        for forms in self.spellings:
            if at == end:
                return True
            for form in forms:
                piece = data[at : at + len(form)]
                if piece == form:
                    at += len(form)
                    break
                if at + len(piece) == end and form.startswith(piece):
                    return True
            else:
                return False
        return True


@functools.lru_cache(maxsize=8)
def _escaped(secret: bytes) -> _Escaped | None:
    """The key's JSON spellings, or ``None`` for a key that is not ASCII, which no HTTP
    header carries: it is looked for as it is."""
    if not secret.isascii():
        return None
    return _Escaped(secret)


def mask_bytes(data: bytes, secret: bytes | None, *, keep_length: bool = False) -> bytes:
    """``data`` with ``secret`` masked in every spelling: as :data:`MASK`, or as as many
    ``*`` as the spelling has bytes where the length of the body is already said (``#``
    for a key with a ``*`` in it: the stars could finish a spelling that the body held
    all but the end of)."""
    if secret is None:
        return data
    fill = (b"#" if b"*" in secret else b"*") if keep_length else None
    if secret in data:
        data = data.replace(secret, MASK if fill is None else fill * len(secret))
    escaped = _escaped(secret)
    if escaped is not None and escaped.marker in data:  # every other spelling has it
        data = escaped.pattern.sub(MASK if fill is None else lambda m: fill * len(m[0]), data)
    return data


def masked(text: str, secret: bytes | None) -> str:
    """``text`` with ``secret`` masked, as :class:`Redactor` masks a body."""
    if secret is None:
        return text
    text = text.replace(secret.decode("utf-8", "replace"), MASK.decode())
    escaped = _escaped(secret)
    if escaped is not None and escaped.marker.decode() in text:
        text = escaped.text.sub(MASK.decode(), text)
    return text


def masked_json(value: Any, secret: bytes | None) -> Any:
    """``value`` (decoded JSON) with ``secret`` masked in every string in it, object
    names included (h56: a name in ``usage`` was stored as sent, and listed back by the
    Conversations API): a message to store, whose text the upstream may have quoted the
    key in."""
    if secret is None:
        return value
    if isinstance(value, str):
        return masked(value, secret)
    if isinstance(value, list):
        return [masked_json(item, secret) for item in value]
    if isinstance(value, dict):
        return {masked(key, secret): masked_json(item, secret) for key, item in value.items()}
    return value


def _start_of_a_key(data: bytes, secret: bytes) -> int:
    """Where the longest end of ``data`` that may be the first part of a key cut in two
    begins, in any of its spellings (``len(data)`` if none may)."""
    end = len(data)
    if data[-1:] == b"\n":  # no spelling holds one (the key cannot: see config)
        return end
    at = data.find(secret[:1], max(0, end - len(secret) + 1))
    while at != -1 and not secret.startswith(data[at:]):
        at = data.find(secret[:1], at + 1)
    raw = end if at == -1 else at
    escaped = _escaped(secret)
    if escaped is None:
        return raw
    start = max(0, end - escaped.longest + 1, data.rfind(b"\n") + 1)
    if start >= raw:
        return raw
    while (maybe := escaped.maybe.search(data, start)) is not None and maybe.start() < raw:
        start = maybe.start()
        if escaped.cut_at(data, start):
            return start
        start += 1
    for piece in escaped.cut_first:
        if end - len(piece) < raw and data.endswith(piece):
            return end - len(piece)
    return raw


class Redactor:
    """Masks ``secret`` in a body that arrives in pieces, also where one piece ends inside
    it: the end of a piece that could be the start of the key waits for the next piece
    (or :meth:`end`); nothing else waits, so an event stream (whose events end with a
    line break, which no spelling of a key holds) goes on event by event as it came.

    ``keep_length``: the key becomes as many ``*`` as it has bytes (see
    :func:`mask_bytes`), where the body's length is already said (``Content-Length``);
    else :data:`MASK`.
    """

    def __init__(self, secret: bytes, *, keep_length: bool = False) -> None:
        self.secret = secret
        self.keep_length = keep_length
        self._held = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self._held + chunk if self._held else chunk
        data = mask_bytes(data, self.secret, keep_length=self.keep_length)
        start = _start_of_a_key(data, self.secret)
        self._held = data[start:]
        return data[:start]

    def end(self) -> bytes:
        held, self._held = self._held, b""
        return held
