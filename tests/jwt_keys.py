"""Keys and hand-built tokens for the auth tests (real keys, generated per test session)."""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

SECRET = "a-test-secret-that-is-long-enough-for-hs512-" + "s" * 32
OTHER_SECRET = "another-secret-long-enough-for-any-hmac-alg-" + "o" * 32


@functools.cache
def private_key(kind: str) -> Any:
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kind == "rsa2":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kind == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "ed":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(kind)


def public_pem(kind: str) -> str:
    return (
        private_key(kind)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def private_pem(kind: str) -> str:
    return (
        private_key(kind)
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        .decode()
    )


def public_jwk(kind: str, kid: str, alg: str | None = None) -> dict[str, Any]:
    algorithms = {"rsa": jwt.algorithms.RSAAlgorithm, "rsa2": jwt.algorithms.RSAAlgorithm}
    if kind == "ec":
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(private_key(kind).public_key()))
    elif kind == "ed":
        jwk = json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(private_key(kind).public_key()))
    else:
        jwk = json.loads(algorithms[kind].to_jwk(private_key(kind).public_key()))
    jwk["kid"] = kid
    if alg is not None:
        jwk["alg"] = alg
    return jwk


def token(
    claims: dict[str, Any],
    key: Any = SECRET,
    alg: str = "HS256",
    headers: dict[str, Any] | None = None,
) -> str:
    return jwt.encode(claims, key, algorithm=alg, headers=headers)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def raw_token(header: dict[str, Any], claims: dict[str, Any], sign: bytes | None) -> str:
    """A token assembled by hand: ``sign`` is the HMAC-SHA256 key, or None for no signature."""
    signing_input = b64(json.dumps(header).encode()) + "." + b64(json.dumps(claims).encode())
    if sign is None:
        return signing_input + "."
    digest = hmac.new(sign, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64(digest)


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}
