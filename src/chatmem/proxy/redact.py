"""The upstream key, masked in what the upstream sends before a client gets it.

An upstream that quotes the credential it was sent (``"bad key Bearer sk-..."``) must not
hand the gateway's key to a client.  The key is looked for as it is and, when it has
characters that some JSON encoder escapes, as any JSON string would write it: Go writes
``<``, ``>`` and ``&`` as ``\\u003c``..., Gson also ``=`` and ``'``, .NET ``+`` as
``\\u002B``, PHP ``/`` as ``\\/``; ``"`` and ``\\`` are escaped by every one.  A key of
letters, digits and ``-_.~`` (``sk-proj-...``, a JWT, hex) has no other spelling, and is
looked for with one ``bytes.replace``.
"""

from __future__ import annotations

import functools
import re
from typing import Any

__all__ = ["MASK", "Redactor", "mask_bytes", "masked", "masked_json"]

MASK = b"[upstream key]"

_NEVER_ESCAPED = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.~")
"""Key bytes no JSON encoder writes any other way."""

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
    if byte in _NEVER_ESCAPED:
        return (bytes([byte]),)
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
        self.starts = frozenset(form[0] for form in self.spellings[0])
        self.longest = sum(max(map(len, forms)) for forms in self.spellings)

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
    """The key's JSON spellings, or ``None`` if it has only the one it was given (also a
    key that is not ASCII, which no HTTP header carries: it is looked for as it is)."""
    if not secret.isascii() or all(byte in _NEVER_ESCAPED for byte in secret):
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
    if escaped is not None and b"\\" in data:  # every other spelling has an escape
        data = escaped.pattern.sub(MASK if fill is None else lambda m: fill * len(m[0]), data)
    return data


def masked(text: str, secret: bytes | None) -> str:
    """``text`` with ``secret`` masked, as :class:`Redactor` masks a body."""
    if secret is None:
        return text
    text = text.replace(secret.decode("utf-8", "replace"), MASK.decode())
    escaped = _escaped(secret)
    if escaped is not None and "\\" in text:
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
    at = data.find(secret[:1], max(0, end - len(secret) + 1))
    while at != -1 and not secret.startswith(data[at:]):
        at = data.find(secret[:1], at + 1)
    raw = end if at == -1 else at
    escaped = _escaped(secret)
    if escaped is None:
        return raw
    for start in range(max(0, end - escaped.longest + 1), raw):
        if data[start] in escaped.starts and escaped.cut_at(data, start):
            return start
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
