"""Retention: delete conversations nobody has touched for ``memory.retention_days``."""

from __future__ import annotations

import asyncio
import logging

from ..errors import StorageUnavailable
from .queries import Store

__all__ = ["PRUNE_INTERVAL", "parse_age", "prune_periodically"]

log = logging.getLogger("chatmem.retention")

# Seconds between two prunes in a running gateway.  Every instance prunes; on PostgreSQL
# they skip rows another one has locked, so N instances share the work.
PRUNE_INTERVAL = 3600.0

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


_LONGEST = 1000 * 365 * 86400.0
"""Older than this is not an age: ``inf`` or ``1e400`` would overflow the cutoff."""


def parse_age(text: str) -> float:
    """``"30d"``, ``"12h"``, ``"90m"``, ``"2w"``, ``"45s"`` -> seconds.

    The unit is required: ``prune --older-than 30`` meant as days, read as seconds,
    deletes every conversation idle for half a minute."""
    value = text.strip().lower()
    unit = _UNITS.get(value[-1:])
    try:
        amount = float(value[:-1] if unit is not None else value)
    except ValueError:
        raise ValueError(f"{text!r} is not an age like 30d, 12h, 90m or 2w") from None
    if unit is None:
        raise ValueError(f"{text!r}: an age needs its unit, s, m, h, d or w (30d is 30 days)")
    seconds = amount * unit
    if not 0 < seconds < _LONGEST:  # nan fails both
        raise ValueError(
            f"{text!r}: an age must be more than 0 and less than 1000 years"
            " (memory.retention_days = 0 means keep forever: nothing to prune)"
        )
    return seconds


async def prune_periodically(
    store: Store, older_than: float, interval: float = PRUNE_INTERVAL
) -> None:
    """Prune now, then every ``interval`` seconds, until cancelled.  A database that is
    down is logged and tried again next time, never fatal."""
    while True:
        try:
            deleted = await store.prune(older_than)
        except StorageUnavailable:
            log.warning("retention: the database is unavailable; will retry")
        else:
            if deleted:
                log.info("retention: deleted %d old conversations", deleted)
        await asyncio.sleep(interval)
