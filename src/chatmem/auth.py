"""Who is calling: the (tenant, user) a request acts for, from its bearer JWT."""

from __future__ import annotations

from typing import Any

import jwt
from aiohttp import web

from .config import AuthConfig
from .errors import Unauthorized
from .state import GATEWAY
from .storage import Owner

__all__ = ["DEFAULT_OWNER", "authenticate", "verify_token"]

DEFAULT_OWNER = Owner(tenant="default")


def verify_token(config: AuthConfig, token: str) -> dict[str, Any]:
    key = config.jwt_secret or config.public_key or ""
    try:
        claims: dict[str, Any] = jwt.decode(token, key, algorithms=list(config.algorithms))
    except jwt.PyJWTError as exc:
        raise Unauthorized(f"invalid token: {exc}") from None
    return claims


def owner_from_claims(config: AuthConfig, claims: dict[str, Any]) -> Owner:
    tenant = claims.get(config.tenant_claim)
    if not isinstance(tenant, str) or not tenant:
        raise Unauthorized(f"token has no string claim {config.tenant_claim!r}")
    user = claims.get(config.user_claim, "")
    if not isinstance(user, str):
        raise Unauthorized(f"token claim {config.user_claim!r} must be a string")
    return Owner(tenant=tenant, user=user)


def authenticate(request: web.Request) -> Owner:
    """The caller's identity; raises :class:`Unauthorized` (401) without a valid token."""
    config = request.config_dict[GATEWAY].config.auth
    if not config.enabled:
        return DEFAULT_OWNER
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("missing bearer token in the Authorization header")
    return owner_from_claims(config, verify_token(config, token.strip()))
