"""Decoding an upstream's compressed body as it arrives, to look for the upstream key in
it (the key cannot be looked for in compressed bytes): gzip, deflate, brotli and zstd,
the codings HTTP servers send."""

from __future__ import annotations

import sys
import zlib
from collections.abc import Callable, Iterator
from typing import Protocol

import brotli  # type: ignore[import-untyped]  # Google's binding ships no types

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd

__all__ = ["INFLATABLE", "SNIFF", "Inflater", "NotInItsCoding"]

INFLATABLE = frozenset({"gzip", "x-gzip", "deflate", "br", "zstd"})
"""The ``Content-Encoding`` values (:func:`.upstream.content_encoding`'s) decoded here."""

_GZIP_OR_ZLIB = 47  # 32 + 15: the header says which, the largest window
_RAW_DEFLATE = -15
_PIECE = 64 * 1024
SNIFF = 64
"""The bytes of a body :meth:`Inflater.for_body` needs at least, unless the body is
shorter: a gzip header is 10, and a byte or two of plain text pass for the start of a
deflate or brotli stream."""
_SNIFFED = 1024  # the most of a body's first bytes for_body decodes,
_SNIFF_OUTPUT = 1024 * 1024  # and the most of their output


class NotInItsCoding(ValueError):
    """The body's bytes are not in the coding it says it is in."""


class _Member(Protocol):
    """One gzip member, zlib stream, zstd frame or brotli stream of a body, decoded."""

    def decode(self, data: bytes, limit: int) -> tuple[bytes, bytes]:
        """At most ``limit`` bytes of output, and the input it left for the caller to
        feed again (a decoder that keeps the rest itself leaves ``b""``)."""
        ...

    @property
    def more(self) -> bool:
        """Whether output is waiting for a call with no new input."""
        ...

    @property
    def ended(self) -> bool:
        """Whether the member's end was read."""
        ...


class _Zlib:
    def __init__(self, wbits: int) -> None:
        self._decoder = zlib.decompressobj(wbits=wbits)
        self._full = False

    def decode(self, data: bytes, limit: int) -> tuple[bytes, bytes]:
        decoder = self._decoder
        out = decoder.decompress(data, limit)
        # A full piece may leave output in the decoder with no input left.
        self._full = len(out) == limit
        return out, decoder.unused_data if decoder.eof else decoder.unconsumed_tail

    @property
    def more(self) -> bool:
        return self._full and not self._decoder.eof

    @property
    def ended(self) -> bool:
        return self._decoder.eof


class _Zstd:
    def __init__(self) -> None:
        self._decoder = zstd.ZstdDecompressor()

    def decode(self, data: bytes, limit: int) -> tuple[bytes, bytes]:
        decoder = self._decoder
        out = decoder.decompress(data, limit)
        return out, decoder.unused_data if decoder.eof else b""

    @property
    def more(self) -> bool:
        return not self._decoder.needs_input and not self._decoder.eof

    @property
    def ended(self) -> bool:
        return self._decoder.eof


class _Brotli:
    def __init__(self) -> None:
        self._decoder = brotli.Decompressor()
        self._more = False

    def decode(self, data: bytes, limit: int) -> tuple[bytes, bytes]:
        decoder = self._decoder
        out: bytes = decoder.process(data, output_buffer_limit=limit)
        # It says it can take more input while output it holds still waits, so (as
        # aiohttp does) only a call that gives nothing tells that none is left.
        self._more = not decoder.is_finished() and (bool(out) or not decoder.can_accept_more_data())
        return out, b""

    @property
    def more(self) -> bool:
        return self._more

    @property
    def ended(self) -> bool:
        return bool(self._decoder.is_finished())


_ERRORS = (zlib.error, zstd.ZstdError, brotli.error, EOFError)
"""What the decoders raise on bytes that are not in their coding (a zstd decoder, bytes
after its frame's end: a brotli stream has one, and bytes after it are an error)."""


def _starts(member: _Member, data: bytes) -> bool:
    """Whether ``data`` decodes as the start of ``member``: up to the member's end (what
    follows is another member, judged as it comes), the end of ``data``, or
    :data:`_SNIFF_OUTPUT` bytes of output, whichever comes first."""
    decoded = 0
    try:
        while not member.ended and decoded <= _SNIFF_OUTPUT:
            out, data = member.decode(data, _PIECE)
            decoded += len(out)
            if not data and not member.more:
                break
    except _ERRORS:
        return False
    return True


class Inflater:
    """A compressed body decoded piece by piece, every gzip member or zstd frame of it
    (h54: a second member was dropped, and the client got half a body), each piece at
    most ``piece`` bytes, so that a small body that decodes to a large one is never held
    whole.

    ``deflate`` is zlib's format by HTTP's definition, but some servers send it raw:
    :meth:`for_body` tells them apart on the body's first bytes.
    """

    def __init__(self, member: Callable[[], _Member], piece: int = _PIECE) -> None:
        self._new_member = member
        self._piece = piece
        self._member = member()
        self._multiple = not isinstance(self._member, _Brotli)

    @classmethod
    def for_body(cls, encoding: str, first: bytes) -> Inflater | None:
        """An inflater for a body in ``encoding`` that starts with ``first`` (:data:`SNIFF`
        bytes or more, unless the body is shorter); None if ``first`` is not in that
        coding (a label may lie: one that says gzip on plain text).  Decided on up to
        1 KiB of it, and on no more than 1 MiB of what that decodes to, so that a bomb is
        not decoded whole here.  A short body that is a valid start but does not end
        (``[]`` read as raw deflate) is taken: it could as well be a body cut short, which
        must not go on undecoded, with the key in it, to a client that decodes it."""
        members: list[Callable[[], _Member]]
        if encoding == "br":
            members = [_Brotli]
        elif encoding == "zstd":
            members = [_Zstd]
        elif encoding == "deflate":
            members = [lambda: _Zlib(_GZIP_OR_ZLIB), lambda: _Zlib(_RAW_DEFLATE)]
        else:
            members = [lambda: _Zlib(_GZIP_OR_ZLIB)]
        for member in members:
            if _starts(member(), first[:_SNIFFED]):
                return cls(member)
        return None

    @property
    def complete(self) -> bool:
        """Whether what was fed ends where a member of the body ends."""
        return self._member.ended

    def feed(self, data: bytes) -> Iterator[bytes]:
        """What ``data``, the body's next bytes, decodes to, in pieces; raises
        :class:`NotInItsCoding` where the body is not in the coding."""
        try:
            yield from self._feed(data)
        except _ERRORS:
            raise NotInItsCoding from None

    def _feed(self, data: bytes) -> Iterator[bytes]:
        more = bool(data)
        while more:
            member = self._member
            if member.ended and self._multiple:  # bytes after a member: the next member
                member = self._member = self._new_member()
            out, data = member.decode(data, self._piece)
            more = bool(data) or member.more
            if out:
                yield out

    def whole(self, data: bytes, limit: int) -> bytes | None:
        """``data`` decoded whole, None if it is not all of a body in the coding or if it
        decodes to more than ``limit`` bytes."""
        decoded = bytearray()
        try:
            for piece in self.feed(data):
                decoded += piece
                if len(decoded) > limit:
                    return None
        except NotInItsCoding:
            return None
        return bytes(decoded) if self.complete else None
