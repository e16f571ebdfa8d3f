"""Who is calling: the (tenant, user) a request acts for, from its bearer JWT.

The :class:`Authenticator` is built once from :class:`~chatmem.config.AuthConfig` and stored
on the app.  Verification is synchronous (``authenticate(request)``); keys from a JWKS URL
are fetched ahead of it by :func:`jwks_middleware`, so handlers never wait on I/O to learn
who is calling.  The token's own header only ever *selects* among what the config allows:
its ``alg`` must be one of ``auth.algorithms``, HS* tokens are checked with the secret only,
and RS/ES/PS/EdDSA tokens with the public key or the JWKS only, so a token cannot pick
``none`` or turn the public key into an HMAC secret.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, NamedTuple

import jwt
from aiohttp import web
from aiohttp.typedefs import Handler
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.types import Options

from . import jsonio
from .config import AuthConfig
from .errors import Unauthorized
from .jwks import JwksKeys
from .storage import Owner
from .tracking import is_chatmem_route

__all__ = [
    "AUTHENTICATOR",
    "DEFAULT_OWNER",
    "Authenticator",
    "authenticate",
    "jwks_middleware",
    "load_public_key",
]

log = logging.getLogger("chatmem.auth")

DEFAULT_OWNER = Owner(tenant="default")
"""Everything belongs to it when auth is off: for local, single-user use only."""

_HMAC = frozenset({"HS256", "HS384", "HS512"})
# Longest tenant / user id the schema stores (conversations.tenant, conversations.user_id).
_MAX_ID = 255


def load_public_key(value: str) -> Any:
    """``auth.public_key`` is inline PEM or the path of a PEM file; the key object."""
    pem = value
    if not value.lstrip().startswith("-----BEGIN"):
        pem = Path(value).read_text(encoding="ascii")
    return serialization.load_pem_public_key(pem.encode())


def bearer_token(header: str | None) -> str:
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("missing bearer token in the Authorization header")
    return token.strip()


_VERIFIED_MAX = 10_000
"""Verified tokens remembered (see :meth:`Authenticator.owner`)."""
_VERIFIED_LENGTH = 2048
"""Longer tokens are verified each time: the cache holds 20 MB of them at most, not 80
(aiohttp takes headers of 8 KiB).  A JWT of a few claims is 200-1000 characters."""


class _Verified(NamedTuple):
    owner: Owner
    valid_from: float
    valid_until: float


class Authenticator:
    """Verifies bearer JWTs against the configured keys and maps claims to an owner."""

    def __init__(self, config: AuthConfig, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self._verified: dict[str, _Verified] = {}
        self._verified_keys = 0
        self.public_key = load_public_key(config.public_key) if config.public_key else None
        self.jwks = (
            JwksKeys(
                config.jwks_url,
                cache_seconds=config.jwks_cache_seconds,
                refetch_interval=config.jwks_refetch_interval,
            )
            if config.jwks_url
            else None
        )
        secret = config.jwt_secret or ""
        if secret and len(secret.encode()) < 32:
            log.warning("auth.jwt_secret is shorter than 32 bytes; use a longer random secret")

    async def close(self) -> None:
        if self.jwks is not None:
            await self.jwks.close()

    def owner(self, authorization: str | None) -> Owner:
        """The owner named by an ``Authorization`` header; :class:`Unauthorized` if none.

        A client sends the same token with every request, and verifying it costs 60-140 us
        (HS256 to ES256), a fifth of what a whole turn costs otherwise.  So a token that
        verified is remembered, by its exact text, with the time window its ``exp``,
        ``nbf`` and ``iat`` allow: within it the same token verifies the same, with the
        same keys.  Outside it, or once the JWKS key set changed, it is verified again.
        """
        if not self.config.enabled:
            return DEFAULT_OWNER
        token = bearer_token(authorization)
        if self.jwks is not None and self.jwks.version != self._verified_keys:
            self._verified.clear()
            self._verified_keys = self.jwks.version
        known = self._verified.get(token)
        if known is not None and known.valid_from <= self.clock() < known.valid_until:
            return known.owner
        claims = self.verify(token)
        owner = self.owner_from_claims(claims)
        if len(token) > _VERIFIED_LENGTH:
            return owner
        if len(self._verified) >= _VERIFIED_MAX:
            del self._verified[next(iter(self._verified))]  # the oldest
        self._verified[token] = _Verified(owner, *self._valid_between(claims))
        return owner

    def _valid_between(self, claims: dict[str, Any]) -> tuple[float, float]:
        """When pyjwt accepts these (already verified) claims: ``exp`` is refused from
        ``exp + leeway`` on, ``nbf`` and ``iat`` until ``value - leeway``."""
        leeway = self.config.leeway
        start = max(
            (_seconds(claims[name]) - leeway for name in ("nbf", "iat") if name in claims),
            default=-math.inf,
        )
        end = _seconds(claims["exp"]) + leeway if "exp" in claims else math.inf
        return start, end

    def verify(self, token: str) -> dict[str, Any]:
        config = self.config
        if len(token) > config.max_token_bytes:
            raise Unauthorized(f"token is longer than {config.max_token_bytes} bytes")
        if not token.isascii():  # a JWT is base64url and dots
            raise Unauthorized("invalid token: not a well-formed JWT")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthorized("invalid token: not a well-formed JWT") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in config.algorithms:
            raise Unauthorized("invalid token: its algorithm is not accepted")
        key = self._key_for(alg, header.get("kid"))
        options: Options = {
            "require": list(config.require),
            "verify_aud": config.audience is not None,
        }
        try:
            with warnings.catch_warnings():
                # A short secret is reported once at startup, not on every request.
                warnings.simplefilter("ignore", jwt.InsecureKeyLengthWarning)
                claims: dict[str, Any] = jwt.decode(
                    token,
                    key,
                    algorithms=[alg],
                    audience=config.audience,
                    issuer=config.issuer,
                    leeway=config.leeway,
                    options=options,
                )
        except jwt.InvalidKeyError:
            raise Unauthorized("invalid token: its algorithm does not fit the key") from None
        except jwt.ExpiredSignatureError:  # pyjwt says "Signature has expired"
            raise Unauthorized("invalid token: it has expired (its exp claim)") from None
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"invalid token: {exc}") from None
        except (TypeError, ValueError):  # pyjwt's own key checks, one level down
            raise Unauthorized("invalid token: its algorithm does not fit the key") from None
        return claims

    def _key_for(self, alg: str, kid: object) -> Any:
        if alg in _HMAC:
            if not self.config.jwt_secret:
                raise Unauthorized("invalid token: its algorithm is not accepted")
            return self.config.jwt_secret
        if self.jwks is not None:
            found = self.jwks.get(kid if isinstance(kid, str) else None, alg)
            if found is not None:
                return _fitting(alg, found)
        if self.public_key is not None:
            return _fitting(alg, self.public_key)
        raise Unauthorized("invalid token: signed with an unknown key")

    def owner_from_claims(self, claims: dict[str, Any]) -> Owner:
        tenant_claim, user_claim = self.config.tenant_claim, self.config.user_claim
        tenant = claims.get(tenant_claim)
        if not isinstance(tenant, str) or not tenant:
            raise Unauthorized(f"token has no non-empty string claim {tenant_claim!r}")
        user = claims.get(user_claim, "")
        if not isinstance(user, str):
            raise Unauthorized(f"token claim {user_claim!r} must be a string")
        if not (jsonio.is_text(tenant) and jsonio.is_text(user)) or "\x00" in tenant + user:
            raise Unauthorized(f"token claims {tenant_claim!r} and {user_claim!r} must be text")
        for name, value in ((tenant_claim, tenant), (user_claim, user)):
            if len(value) > _MAX_ID:
                raise Unauthorized(f"token claim {name!r} is too long (at most {_MAX_ID})")
        return Owner(tenant=tenant, user=user)


_KEY_TYPES: dict[str, tuple[type[Any], ...]] = {
    "RS": (rsa.RSAPublicKey,),
    "PS": (rsa.RSAPublicKey,),
    "ES": (ec.EllipticCurvePublicKey,),
    "Ed": (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey),
}


def _fitting(alg: str, key: Any) -> Any:
    """``key`` if it is of the kind ``alg`` needs; a 401 otherwise (never pyjwt's TypeError)."""
    if not isinstance(key, _KEY_TYPES.get(alg[:2], ())):
        raise Unauthorized("invalid token: its algorithm does not fit the key")
    return key


AUTHENTICATOR = web.AppKey("chatmem.authenticator", Authenticator)


def setup_auth(app: web.Application, config: AuthConfig) -> None:
    """Store the authenticator on ``app``; its JWKS client lives as long as the app."""
    authenticator = Authenticator(config)
    app[AUTHENTICATOR] = authenticator

    async def lifecycle(_app: web.Application) -> AsyncIterator[None]:
        yield
        await authenticator.close()

    app.cleanup_ctx.append(lifecycle)
    if authenticator.jwks is not None:
        app.middlewares.append(jwks_middleware)


def _seconds(value: Any) -> float:
    """A time claim pyjwt accepted, as a float: an integer too large for one (``10**400``,
    which pyjwt compares as an int) is as good as never."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def authenticate(request: web.Request) -> Owner:
    """The caller's identity; raises :class:`Unauthorized` (401) without a valid token.

    Called by chatmem's handlers only, so ``request.app`` is the app :func:`setup_auth`
    stored the authenticator on (``config_dict`` would build a chain of apps each time).
    """
    authenticator = request.app[AUTHENTICATOR]
    if not authenticator.config.enabled:
        return DEFAULT_OWNER
    given = request.headers.getall("Authorization", ())
    if len(given) > 1:
        # Which one counts would be a guess, and proxies on the way may guess otherwise.
        raise Unauthorized("the request has more than one Authorization header")
    return authenticator.owner(given[0] if given else None)


@web.middleware
async def jwks_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Fetch the JWKS keys a bearer token names before the handler verifies it."""
    authenticator = request.config_dict[AUTHENTICATOR]
    jwks = authenticator.jwks
    header = request.headers.get("Authorization", "")
    if (
        jwks is not None
        and is_chatmem_route(request)
        and header[:7].lower() == "bearer "
        and len(header) <= authenticator.config.max_token_bytes + 7
        and header.isascii()
    ):
        token = header[7:].strip()
        try:
            kid = jwt.get_unverified_header(token).get("kid") if token else None
        except jwt.PyJWTError:
            kid = None  # authenticate() answers 401 for it
        await jwks.ensure(kid if isinstance(kid, str) else None)
    return await handler(request)
