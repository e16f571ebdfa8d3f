"""``chatmem token encode|decode``: the older services' ``jwt_util.py``, a little safer.

HS256/384/512 take ``--secret``; RS/PS/ES/EdDSA take ``--key`` (a PEM file: the private key
to encode, the public key to decode).  ``encode --secret`` signs with HS256 unless ``--alg``
says otherwise; ``decode --secret`` verifies any of the three.  ``none`` is never accepted.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import jwt

__all__ = ["add_token_parser", "run_token"]

HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
KEY_ALGORITHMS = (
    *("RS256", "RS384", "RS512", "PS256", "PS384", "PS512"),
    *("ES256", "ES384", "ES512", "EdDSA"),
)


def add_token_parser(commands: Any) -> None:
    token = commands.add_parser("token", help="encode or decode a JWT (like the old jwt_util.py)")
    # jwt_util.py took its secret before the command (``--secret S encode ...``): both work.
    _key_arguments(token, "private or public", dest_prefix="outer_")
    token_commands = token.add_subparsers(dest="token_command", required=True)
    encode = token_commands.add_parser("encode", help="print a signed JWT for JSON claims")
    _key_arguments(encode, "private")
    encode.add_argument("--exp", type=int, help="expire after this many seconds")
    encode.add_argument("claims", help='JSON object of claims, e.g. \'{"team_id": "acme"}\'')
    decode = token_commands.add_parser("decode", help="verify a JWT and print its claims")
    _key_arguments(decode, "public")
    decode.add_argument("token")


def _key_arguments(parser: argparse.ArgumentParser, kind: str, dest_prefix: str = "") -> None:
    key = parser.add_mutually_exclusive_group()
    key.add_argument("--secret", dest=dest_prefix + "secret", help="HMAC secret (HS256/384/512)")
    key.add_argument(
        "--key",
        dest=dest_prefix + "key",
        metavar="PEM_FILE",
        help=f"{kind} key file (RS/PS/ES/EdDSA)",
    )
    parser.add_argument("--alg", dest=dest_prefix + "alg", choices=HMAC_ALGORITHMS + KEY_ALGORITHMS)


def _merge_key_arguments(args: argparse.Namespace) -> str | None:
    """Fold the options given before the command into ``args``; the problem, if any."""
    for name in ("secret", "key", "alg"):
        inner, outer = getattr(args, name), getattr(args, "outer_" + name)
        if inner is not None and outer is not None and inner != outer:
            return f"--{name} given twice"
        setattr(args, name, inner if inner is not None else outer)
    if (args.secret is None) == (args.key is None):
        return "give one of --secret (HS256/384/512) or --key (a PEM file)"
    if args.alg is None:
        if args.key is not None:
            return "--key needs --alg (RS/PS/ES/EdDSA)"
        # Signing takes HS256; a secret verifies any HMAC token (decode names no --alg).
        args.alg = "HS256" if args.token_command == "encode" else None
    return None


def _fail(message: str, code: int = 2) -> int:
    print(f"chatmem token: {message}", file=sys.stderr)
    return code


def run_token(args: argparse.Namespace) -> int:
    problem = _merge_key_arguments(args)
    if problem is not None:
        return _fail(problem)
    if args.alg is not None and (args.alg in HMAC_ALGORITHMS) != (args.secret is not None):
        return _fail(f"{args.alg} needs {'--secret' if args.secret is None else '--key'}")
    key: Any = args.secret
    if args.key is not None:
        try:
            key = Path(args.key).read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            return _fail(f"cannot read key file {args.key}: {exc}")
        if args.alg is not None:
            key, problem = _usable_key(args.alg, key, signing=args.token_command == "encode")
            if problem is not None:
                return _fail(problem)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", jwt.InsecureKeyLengthWarning)
        code = _encode(args, key) if args.token_command == "encode" else _decode(args, key)
    for warning in {str(w.message) for w in caught}:  # one line each, not Python's two
        print(f"chatmem token: warning: {warning}", file=sys.stderr)
    return code


def _usable_key(alg: str, text: str, *, signing: bool) -> tuple[Any, str | None]:
    """The key ``alg`` signs or verifies with, read from ``text``; or why there is none.

    PyJWT itself fails with a traceback on a public key to sign with (``no attribute
    'sign'``) and names a key of another family with a ``<generator object ...>``.  A
    private key verifies as its public half does."""
    try:
        key = jwt.get_algorithm_by_name(alg).prepare_key(text)
    except (jwt.PyJWTError, NotImplementedError, ValueError, TypeError):
        return None, f"--key does not hold a key {alg} can use"
    private = hasattr(key, "sign")
    if signing and not private:
        return None, f"{alg} signs with a private key; --key holds a public one"
    if not signing and private:
        key = key.public_key()
    return key, None


def _decode(args: argparse.Namespace, key: Any) -> int:
    try:
        algorithms = [args.alg] if args.alg is not None else list(HMAC_ALGORITHMS)
        decoded = jwt.decode(args.token, key, algorithms=algorithms, options={"verify_aud": False})
    except (jwt.PyJWTError, ValueError) as exc:
        return _fail(f"invalid token: {exc}", 1)
    print(json.dumps(decoded))
    return 0


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # 1e999: written back as Infinity, which is no JSON
        raise ValueError(f"{text} is too large for a JSON number")
    return value


def _encode(args: argparse.Namespace, key: Any) -> int:
    try:
        claims = json.loads(args.claims, parse_constant=_not_json, parse_float=_finite)
    except ValueError as exc:  # NaN and Infinity too: no JWT library would read them back
        return _fail(f"claims are not valid JSON: {exc}")
    if not isinstance(claims, dict):
        return _fail("claims must be a JSON object")
    if args.exp is not None:
        claims["exp"] = int(time.time()) + args.exp
    try:
        print(jwt.encode(claims, key, algorithm=args.alg))
    except (jwt.PyJWTError, ValueError, TypeError) as exc:
        return _fail(f"cannot sign with this key: {exc}")
    return 0
