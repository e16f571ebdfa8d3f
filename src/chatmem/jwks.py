"""Signing keys from a JWKS URL: cached, refetched for an unknown ``kid`` at most every
``refetch_interval`` seconds, and kept when a refetch fails.

pyjwt's ``PyJWKClient`` fetches with blocking ``urllib``; this small client uses aiohttp so
a slow key server never stalls the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import jwt
from yarl import URL

__all__ = ["JwksKeys"]

log = logging.getLogger("chatmem.auth")

_MAX_JWKS_BYTES = 1024 * 1024
_FETCH_TIMEOUT = aiohttp.ClientTimeout(total=10)


def _shown(url: str) -> str:
    """``url`` fit for a log line: without a user, password or query (which may hold
    the key server's credentials); never raises (the config checks the URL, but a log
    line must not fail the request that writes it)."""
    try:
        parsed = URL(url)
        return str(parsed.with_user(None).with_query(None).with_fragment(None))
    except ValueError:
        return "the JWKS URL"


def _why(exc: BaseException) -> str:
    """Why a fetch failed, for the log: aiohttp's errors say it by their class (their
    text quotes the URL whole, its query token too, and what the server sent)."""
    if isinstance(exc, TimeoutError):
        return f"no answer within {_FETCH_TIMEOUT.total:g} s"
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"{type(exc).__name__}, status {exc.status}"
    if isinstance(exc, aiohttp.ClientError | RecursionError):
        return type(exc).__name__
    return str(exc)  # ours, or the JSON parser's (where in the document it broke)


class _Key:
    __slots__ = ("alg", "key")

    def __init__(self, key: Any, alg: str | None) -> None:
        self.key = key
        self.alg = alg  # the "alg" the JWK declares, if any


def parse_jwks(document: Any) -> dict[str | None, _Key]:
    """The usable signing keys of a JWKS document, by ``kid``; ValueError if none."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWKS document (no 'keys' array)")
    keys: dict[str | None, _Key] = {}
    for entry in document["keys"]:
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
            continue
        try:
            parsed = jwt.PyJWK(entry)
        except jwt.PyJWTError:
            continue  # a key type we cannot use; the others still count
        kid = entry.get("kid")
        alg = entry.get("alg")
        keys[kid if isinstance(kid, str) else None] = _Key(
            parsed.key, alg if isinstance(alg, str) else None
        )
    if not keys:
        raise ValueError("the JWKS document has no usable signing key")
    return keys


class JwksKeys:
    """The keys of one JWKS URL.  :meth:`ensure` fetches; :meth:`get` never does I/O."""

    def __init__(
        self,
        url: str,
        *,
        cache_seconds: float,
        refetch_interval: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.cache_seconds = cache_seconds
        self.refetch_interval = refetch_interval
        self.clock = clock
        self.fetches = 0
        self.version = 0
        """Bumped whenever the key set is replaced (what was verified before may not be)."""
        self._keys: dict[str | None, _Key] = {}
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None
        self._lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None

    def get(self, kid: str | None, alg: str) -> Any | None:
        """The key for ``kid`` (or the only key when the token names none) usable for ``alg``."""
        if kid is None and len(self._keys) == 1:
            found: _Key | None = next(iter(self._keys.values()))
        else:
            found = self._keys.get(kid)
        if found is None or (found.alg is not None and found.alg != alg):
            return None
        return found.key

    def _wanted(self, kid: str | None) -> bool:
        if self._fetched_at is None or self.clock() - self._fetched_at >= self.cache_seconds:
            return True
        return kid not in self._keys if kid is not None else not self._keys

    def _may_fetch(self) -> bool:
        last = self._attempted_at
        return last is None or self.clock() - last >= self.refetch_interval

    async def ensure(self, kid: str | None) -> None:
        """Refresh the keys if they are stale or lack ``kid``, unless rate-limited.  A
        request that needs keys while a fetch is under way waits for that fetch: refused
        at once, a valid token signed with a key the fetch was bringing got a 401 (item
        151: 49 of 50 tokens sent together to a gateway that had not fetched yet)."""
        if not self._wanted(kid) or not (self._may_fetch() or self._lock.locked()):
            return
        async with self._lock:
            if not (self._wanted(kid) and self._may_fetch()):
                return  # the fetch waited for brought it, or another was tried just now
            self._attempted_at = self.clock()
            self.fetches += 1
            try:
                keys = parse_jwks(await self._fetch())
            except (aiohttp.ClientError, TimeoutError, ValueError, RecursionError) as exc:
                # A broken document (nested past the parser's depth, say) is a failed
                # fetch like any other: the cached keys stay, the token is refused (401).
                log.warning(
                    "JWKS fetch from %s failed (%s); keeping %d cached keys",
                    _shown(self.url),
                    _why(exc),
                    len(self._keys),
                )
                return
            self._keys = keys
            self.version += 1
            self._fetched_at = self.clock()

    async def _fetch(self) -> Any:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=_FETCH_TIMEOUT)
        async with self._session.get(self.url, allow_redirects=False) as response:
            if response.status != 200:
                raise ValueError(f"HTTP status {response.status}")
            # All of it: read(n) gives what has arrived, up to n (a document over 64 KiB
            # came in pieces, and only the first was parsed: item 151).
            pieces: list[bytes] = []
            size = 0
            async for piece in response.content.iter_any():
                size += len(piece)
                if size > _MAX_JWKS_BYTES:
                    raise ValueError("the JWKS document is too large")
                pieces.append(piece)
        return json.loads(b"".join(pieces))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
