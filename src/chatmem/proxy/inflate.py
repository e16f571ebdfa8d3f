"""Decoding an upstream's gzip or deflate body as it arrives, to look for the upstream key
in it (the key cannot be looked for in compressed bytes)."""

from __future__ import annotations

import zlib
from collections.abc import Iterator

__all__ = ["INFLATABLE", "Inflater"]

INFLATABLE = frozenset({"gzip", "x-gzip", "deflate"})
"""The ``Content-Encoding`` values (:func:`.upstream.content_encoding`'s) decoded here."""

_GZIP_OR_ZLIB = 47  # 32 + 15: the header says which, the largest window
_RAW_DEFLATE = -15
_PIECE = 64 * 1024
_SNIFF = 1024


class Inflater:
    """A gzip or zlib body decoded piece by piece, every gzip member of it (h54: a second
    one was dropped, and the client got half a body), each piece at most ``piece`` bytes,
    so that a small body that decodes to a large one is never held whole.

    ``deflate`` is zlib's format by HTTP's definition, but some servers send it raw:
    :meth:`for_body` tells them apart on the body's first bytes.
    """

    def __init__(self, wbits: int = _GZIP_OR_ZLIB, piece: int = _PIECE) -> None:
        self._wbits = wbits
        self._piece = piece
        self._decoder = zlib.decompressobj(wbits=wbits)

    @classmethod
    def for_body(cls, encoding: str, first: bytes) -> Inflater | None:
        """An inflater for a body in ``encoding`` that starts with ``first``; None if
        ``first`` is not in that coding (a label may lie: one that says gzip on plain
        text).  Decided on the first bytes' header and first block, not on all of them:
        their whole output may be large."""
        formats = (_GZIP_OR_ZLIB, _RAW_DEFLATE) if encoding == "deflate" else (_GZIP_OR_ZLIB,)
        for wbits in formats:
            try:
                zlib.decompressobj(wbits=wbits).decompress(first[:_SNIFF], 1)
            except zlib.error:
                continue
            return cls(wbits)
        return None

    @property
    def complete(self) -> bool:
        """Whether what was fed ends where a member of the body ends."""
        return self._decoder.eof

    def feed(self, data: bytes) -> Iterator[bytes]:
        """What ``data``, the body's next bytes, decodes to, in pieces; raises
        ``zlib.error`` where the body is not in the coding."""
        more = bool(data)
        while more:
            decoder = self._decoder
            if decoder.eof:  # bytes after a member: the next member
                decoder = self._decoder = zlib.decompressobj(wbits=self._wbits)
            out = decoder.decompress(data, self._piece)
            data = decoder.unused_data if decoder.eof else decoder.unconsumed_tail
            # A full piece may leave output in the decoder with no input left.
            more = bool(data) or (len(out) == self._piece and not decoder.eof)
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
        except zlib.error:
            return None
        return bytes(decoded) if self.complete else None
