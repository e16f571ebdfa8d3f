"""Verified tokens are remembered by their text, within the time window pyjwt allows them.

The authenticator is used directly with a real HS256 secret; the token's expiry is real
time (a token that expires while remembered must be refused once it has expired).
"""

from __future__ import annotations

import asyncio
import time

import pytest
from jwt_keys import SECRET, token

from chatmem import auth
from chatmem.auth import Authenticator
from chatmem.config import AuthConfig
from chatmem.errors import Unauthorized
from chatmem.storage import Owner

CLAIMS = {"team_id": "acme", "sub": "alice"}


def header(value: str) -> str:
    return f"Bearer {value}"


async def test_a_remembered_token_is_refused_once_it_expired() -> None:
    authenticator = Authenticator(AuthConfig(jwt_secret=SECRET))
    expires = int(time.time()) + 2
    short = token({**CLAIMS, "exp": expires})
    assert authenticator.owner(header(short)) == Owner("acme", "alice")
    assert authenticator.owner(header(short)) == Owner("acme", "alice")  # remembered
    for _ in range(40):  # until the expiry has passed (bounded: at most 4 s)
        if time.time() >= expires + 0.01:
            break
        await asyncio.sleep(0.1)
    with pytest.raises(Unauthorized, match="expired"):
        authenticator.owner(header(short))


def test_the_window_follows_exp_nbf_iat_and_the_leeway() -> None:
    now = 1_000_000.0
    clock = [now]
    authenticator = Authenticator(AuthConfig(jwt_secret=SECRET, leeway=5), clock=lambda: clock[0])
    start, end = authenticator._valid_between({"iat": now - 10, "nbf": now + 3, "exp": now + 60})
    assert (start, end) == (now - 2, now + 65)
    assert authenticator._valid_between({}) == (float("-inf"), float("inf"))


def test_tokens_are_remembered_apart_and_within_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "_VERIFIED_MAX", 3)
    authenticator = Authenticator(AuthConfig(jwt_secret=SECRET))
    owners = [
        authenticator.owner(header(token({"team_id": f"t{i}", "sub": f"u{i}"}))) for i in range(5)
    ]
    assert owners == [Owner(f"t{i}", f"u{i}") for i in range(5)]
    assert len(authenticator._verified) == 3  # the oldest went first
    # A remembered token and a forged one with the same claims: only the first passes.
    remembered = token({"team_id": "t4", "sub": "u4"})
    assert authenticator.owner(header(remembered)) == Owner("t4", "u4")
    forged = remembered[: remembered.rindex(".") + 1] + "A" * 43
    with pytest.raises(Unauthorized):
        authenticator.owner(header(forged))


def test_a_refused_token_is_not_remembered() -> None:
    authenticator = Authenticator(AuthConfig(jwt_secret=SECRET))
    early = token({**CLAIMS, "nbf": int(time.time()) + 3600})
    for _ in range(2):
        with pytest.raises(Unauthorized, match="not yet valid"):
            authenticator.owner(header(early))
    assert authenticator._verified == {}


def test_a_long_token_is_verified_each_time_not_remembered() -> None:
    # A cache of 10,000 tokens of 8 KiB would hold 80 MB: long ones are not kept.
    authenticator = Authenticator(AuthConfig(jwt_secret=SECRET))
    long = token({**CLAIMS, "padding": "x" * 3000})
    short = token(CLAIMS)
    for _ in range(2):
        assert authenticator.owner(header(long)) == Owner("acme", "alice")
        assert authenticator.owner(header(short)) == Owner("acme", "alice")
    assert list(authenticator._verified) == [short]
