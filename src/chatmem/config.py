"""Configuration: one TOML file plus the environment, loaded once into a frozen object.

The object is built by :func:`load_config` and passed to whatever needs it; nothing reads
configuration from globals.  Every problem (unreadable file, unknown key, wrong type,
unset ``${VAR}``) raises :class:`ConfigError` with a one-line message naming the key.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from yarl import URL

__all__ = [
    "AuthConfig",
    "CompatConfig",
    "Config",
    "ConfigError",
    "LogConfig",
    "MemoryConfig",
    "MetricsConfig",
    "ResendReasoning",
    "ServerConfig",
    "StorageConfig",
    "UpstreamConfig",
    "find_config_file",
    "load_config",
]


class ConfigError(Exception):
    """A configuration problem; ``str(exc)`` is one line that names the key."""


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 7001
    max_body_bytes: int = 4 * 1024 * 1024
    # Seconds in-flight streams get to finish on SIGTERM/SIGINT/SIGHUP before they are cut.
    shutdown_grace: float = 30.0
    # Processes sharing the port (SO_REUSEPORT); ``chatmem serve --workers`` overrides it.
    workers: int = 1
    # Peers (IPs or CIDR networks) whose X-Forwarded-For is believed, e.g. the local Caddy.
    trusted_proxies: tuple[str, ...] = ()
    # Origins of web pages that may call the gateway ("https://app.example.com", or "*"
    # for any); empty: CORS is off (and the upstream's own headers are relayed as they are).
    cors_origins: tuple[str, ...] = ()
    # Seconds a connection may go without a complete request head: from when it opens, or
    # from the previous response on a kept-alive one. Closes slow-header (slowloris) and
    # idle connections (aiohttp's keepalive_timeout, which runs from the connection's start).
    # Also the time a JSON request body has to arrive in full (else 408). Longer than
    # Caddy's upstream keep-alive (2 min), so Caddy never reuses a connection being closed.
    idle_timeout: float = 130.0


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    url: str = "http://127.0.0.1:8000/v1"
    api_key: str | None = field(default=None, repr=False)
    # How the key is sent: "<auth_header>: <auth_scheme> <key>" (an empty scheme sends the
    # raw key, as the older conversation service did).
    auth_header: str = "Authorization"
    auth_scheme: str = "Bearer"
    connect_timeout: float = 10.0
    read_timeout: float = 300.0
    # The largest chat answer the gateway reads to store (JSON body or SSE stream, in
    # bytes): a larger one is refused (502, or an error event ending the stream) instead
    # of being held in memory.  Passthrough answers are streamed and never held.
    max_answer_bytes: int = 32 * 1024 * 1024
    # The paths under /v1 the passthrough relays (a prefix covers what is under it), "/"
    # for all.  Every tenant reaches the upstream with the one key: whatever it keeps
    # under that key (OpenAI's stored completions, files, batches) is everyone's.
    passthrough: tuple[str, ...] = ("/",)


@dataclass(frozen=True, slots=True)
class StorageConfig:
    url: str = "sqlite+aiosqlite:///chatmem.db"
    # SQLite: milliseconds a writer waits for the file lock before giving up.
    busy_timeout_ms: int = 30_000
    # Connection pool, per gateway instance: connections kept open, extra ones allowed under
    # load, and seconds a request waits for a free one before answering 503.  No overflow
    # by default: an overflow connection is closed when it is given back, so under steady
    # load beyond the pool every turn paid for a new PostgreSQL connection (460 instead of
    # 850 turns a second at 32 clients); a turn holds one for about a millisecond, so
    # waiting for a pooled one is cheaper.
    pool_size: int = 10
    max_overflow: int = 0
    pool_timeout: float = 10.0
    # PostgreSQL: seconds to establish a connection, and the longest one statement may run
    # (server-side statement_timeout; 0 = no limit).  Either failing answers 503.
    connect_timeout: float = 5.0
    statement_timeout: float = 30.0


@dataclass(frozen=True, slots=True)
class AuthConfig:
    jwt_secret: str | None = field(default=None, repr=False)
    public_key: str | None = field(default=None, repr=False)
    algorithms: tuple[str, ...] = ("HS256",)
    tenant_claim: str = "team_id"
    user_claim: str = "sub"
    # public_key is inline PEM ("-----BEGIN PUBLIC KEY-----...") or the path of a PEM file.
    jwks_url: str | None = None
    jwks_cache_seconds: float = 300.0
    # An unknown "kid" triggers a refetch at most this often (seconds).
    jwks_refetch_interval: float = 30.0
    audience: str | None = None
    issuer: str | None = None
    leeway: float = 0.0
    # Claims a token must carry, e.g. ["exp"]; exp/nbf are always checked when present.
    require: tuple[str, ...] = ()
    max_token_bytes: int = 8192

    @property
    def enabled(self) -> bool:
        return bool(self.jwt_secret or self.public_key or self.jwks_url)


ResendReasoning = Literal["tool_turns", "always", "never"]
"""``memory.resend_reasoning``: which stored reasoning goes upstream again."""


@dataclass(frozen=True, slots=True)
class MemoryConfig:
    max_history_messages: int = 200
    # At most this many bytes of stored history (the messages' JSON text) go upstream: the
    # newest messages that fit.  Set it to fit the model's context (about 4 bytes a token
    # of English), so that a long conversation does not end in context-length errors on
    # every turn.  0: no limit but max_history_messages.  The default, 8 MiB, is more
    # than any model's context (about 2M tokens): it bounds what one turn reads, holds and
    # sends, which a conversation of large appended items made 120 MB a turn.
    max_history_bytes: int = 8 * 1024 * 1024
    # When the limits above leave older messages out, start the history at a user message
    # (the start of a turn): chat templates that want roles to alternate from a user
    # message (Mistral's, Llama 2's) refuse [system, assistant, user, ...].  Off: the
    # newest messages as the contract says, never starting with an orphaned tool result.
    start_at_user: bool = False
    # Which stored assistant messages carry their reasoning upstream again, as
    # ``reasoning_content``: "tool_turns", those that made tool calls or answer tool
    # results (DeepSeek's thinking mode refuses a history whose tool calls lost their
    # reasoning; Qwen3's chat template renders it in a tool loop); "always"; "never".
    resend_reasoning: ResendReasoning = "tool_turns"
    on_client_disconnect: Literal["discard", "finish"] = "discard"
    # Conversations not updated for this many days are deleted (0 = keep forever).
    retention_days: int = 0


@dataclass(frozen=True, slots=True)
class CompatConfig:
    """The endpoints of the older services chatmem replaces (see README, Migration guide)."""

    # Signs and encrypts the /conversation/{model} session cookie (the old FLASK_SECRET).
    # Unset: a random key per process, so cookies end with the process (logged at start).
    session_secret: str | None = field(default=None, repr=False)
    # Seconds the session cookie lives; None: until the client discards it.
    session_max_age: int | None = None
    # Mark the cookie Secure (sent over HTTPS only): on when clients reach the gateway
    # through TLS (Caddy), which sees plain HTTP itself and cannot tell.
    session_cookie_secure: bool = False
    # The model /v1/ask asks (its requests name none).
    ask_model: str = "gpt-3.5-turbo"


@dataclass(frozen=True, slots=True)
class LogConfig:
    format: Literal["text", "json"] = "text"
    level: Literal["debug", "info", "warning", "error"] = "info"
    # One line per request (method, path, status, duration, request id, client address).
    # Off by default: about 13 us of CPU per request, and Caddy logs requests in front.
    access: bool = False
    # Log message content (requests and answers) at debug level; never on in production.
    debug_content: bool = False


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    # Where Prometheus scrapes; "" turns the endpoint off.
    path: str = "/metrics"
    # With auth on, the tenant whose tokens read the metrics (their labels name every
    # tenant); "" lets any valid token read them.
    tenant: str = ""


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    compat: CompatConfig = field(default_factory=CompatConfig)
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


MAX_WORKERS = 256
"""``server.workers`` at most: far more processes than any machine has cores for."""


_TOKEN = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
"""``$${`` (a literal ``${``), or a placeholder: ``${VAR}`` or ``${VAR:-default}``."""


def _expand(value: str, key: str, env: Mapping[str, str]) -> str:
    """``${VAR}`` and ``${VAR:-default}`` as the shell reads them: the default stands in
    for a variable that is unset or empty.  ``$${`` is a literal ``${``; any other ``${``
    is an error, not text: a placeholder with a typo would otherwise become, say, the
    upstream key as written.  What a variable holds is taken as it is."""

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$${":
            return "${"
        name, default = match.group(1), match.group(2)
        if default is not None:
            # "${A:-${B}}": the shell would expand B; as text, "${B}" would be the value.
            _check_plain(default, key)
            return env.get(name) or default
        if name in env:
            return env[name]
        raise ConfigError(f"{key}: environment variable {name} is not set")

    expanded: list[str] = []
    at = 0
    for match in _TOKEN.finditer(value):
        _check_plain(value[at : match.start()], key)
        expanded.append(value[at : match.start()])
        expanded.append(substitute(match))
        at = match.end()
    _check_plain(value[at:], key)
    expanded.append(value[at:])
    return "".join(expanded)


def _check_plain(text: str, key: str) -> None:
    if "${" in text:  # not quoted: the value may be a secret
        raise ConfigError(
            f"{key}: has a '${{' that is not ${{VAR}} or ${{VAR:-default}} (write $${{ for one)"
        )


_TYPE_WORDS = {int: "a whole number", float: "a number", bool: "true or false", str: "a string"}
"""How an error names the TOML type a key wants."""


def _type_name(tp: Any) -> str:
    return _TYPE_WORDS.get(tp) or getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, *, secret: bool = False) -> Any:
    """Check ``value`` against the annotation ``tp``; an error quotes it unless ``secret``
    (a key whose value is never printed, even when it has the wrong type)."""
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(tp)
        if value is None or (value == "" and type(None) in args):
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, secret=secret)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            wanted = " or ".join(repr(c) for c in choices)
            raise ConfigError(f"{key}: must be {wanted}, not {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}: must be a list of strings")
        return tuple(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, str):
        # Numbers may come from the environment: port = "${PORT:-7001}".
        try:
            value = tp(value)
        except ValueError:
            given = _given(value, secret)
            raise ConfigError(f"{key}: must be {_type_name(tp)}, not {given}") from None
    if tp is bool and value in ("true", "false"):  # so may true and false
        return value == "true"
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: must be {_type_name(tp)}, not {_given(value, secret)}")
    if tp is float and not math.isfinite(value):
        # nan passed every range check, then every request (or the shutdown) failed.
        raise ConfigError(f"{key}: must be a finite number, not {_given(value, secret)}")
    return value


def _given(value: Any, secret: bool) -> str:
    """A value of the wrong type, as TOML spells it; a secret's only by its type (the
    number a secret was mistyped as is the secret all the same)."""
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, (datetime.date, datetime.time)):  # TOML's own, unquoted
        return "a date or time"
    if secret:
        kinds = {bool: "true or false", int: "a whole number", float: "a number"}
        return kinds.get(type(value), "a string")
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _build_section(cls: type[Any], raw: Any, section: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"[{section}]: must be a table")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for name, value in raw.items():
        key = f"{section}.{name}"
        if name not in fields:
            raise ConfigError(f"{key}: unknown key")
        # A field left out of the config's repr holds a secret (or a key's text).
        values[name] = _coerce(value, hints[name], key, secret=not fields[name].repr)
    if section == "storage" and "url" in values:
        values["url"] = _storage_url(values["url"])
    _validate(section, values)
    return cls(**values)


def _validate(section: str, values: Mapping[str, Any]) -> None:
    positive = {
        "server": ("port", "max_body_bytes", "workers", "idle_timeout"),
        "upstream": ("connect_timeout", "read_timeout", "max_answer_bytes"),
        "memory": ("max_history_messages",),
        "storage": ("pool_size", "pool_timeout", "connect_timeout"),
    }
    not_negative = {
        "server": ("shutdown_grace",),
        "storage": ("max_overflow", "statement_timeout", "busy_timeout_ms"),
        "memory": ("retention_days", "max_history_bytes"),
    }
    for name in not_negative.get(section, ()):
        if name in values and values[name] < 0:
            raise ConfigError(f"{section}.{name}: must not be negative")
    for name in positive.get(section, ()):
        if name in values and values[name] <= 0:
            raise ConfigError(f"{section}.{name}: must be greater than 0")
    if section == "compat" and "ask_model" in values and not values["ask_model"].strip():
        raise ConfigError("compat.ask_model: must not be empty")  # every /v1/ask a 400 else
    max_age = values.get("session_max_age") if section == "compat" else None
    if max_age is not None and max_age <= 0:
        raise ConfigError("compat.session_max_age: must be greater than 0")
    if section == "server" and values.get("port", 1) > 65535:
        raise ConfigError("server.port: must be at most 65535")
    if section == "server" and values.get("workers", 1) > MAX_WORKERS:
        # A typo (100000) forked until the machine gave out.
        raise ConfigError(f"server.workers: must be at most {MAX_WORKERS}")
    if section == "memory" and values.get("retention_days", 0) >= 365_000:
        # As `db prune --older-than`: an age the store's times cannot go back by (item 146).
        raise ConfigError("memory.retention_days: must be less than 1000 years (365000)")
    if section == "server":
        _validate_networks(values.get("trusted_proxies", ()))
        _validate_origins(values.get("cors_origins", ()))
        if values.get("host", "127.0.0.1").strip() == "":
            # asyncio reads an empty host as every interface: say it if it is meant.
            raise ConfigError("server.host: must not be empty (0.0.0.0 is every interface)")
    if section == "metrics":
        _validate_metrics_path(values.get("path", "/metrics"))
    if section == "auth":
        _validate_auth(values)
    if section == "upstream":
        _validate_upstream(values)


def _validate_metrics_path(path: str) -> None:
    if path == "":
        return
    if not path.startswith("/"):
        raise ConfigError("metrics.path: must start with '/' (or be \"\" to turn it off)")
    if path.rstrip("/") in ("/v1", "/api/v1/health", "/api/v1/ask") or path.startswith(
        ("/v1/", "/conversation/")
    ):
        # It is added first: it would take the route over (GET /v1/health answering metrics).
        raise ConfigError("metrics.path: must not be one of the gateway's routes or under /v1/")


_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _validate_upstream(values: Mapping[str, Any]) -> None:
    """What would otherwise fail on every request (as the client's fault, a 400) or send
    part of a secret somewhere else; the values are never quoted (they may be secrets)."""
    url = values.get("url")
    if url is not None:
        if not re.match(r"^https?://[^/]+", url):
            raise ConfigError("upstream.url: must be an http:// or https:// URL")
        if "?" in url or "#" in url:
            # The API's paths are appended to it: a query would be dropped from every
            # request (and is where some put a key).
            raise ConfigError("upstream.url: must not have a query string or a fragment")
        if _CONTROL.search(url) or " " in url:
            raise ConfigError("upstream.url: must not contain spaces or control characters")
        try:
            parsed = URL(url)
            host, _port = parsed.host, parsed.port
        except ValueError:  # a port out of range or not a number, a broken host
            raise ConfigError("upstream.url: not a valid URL (check its host and port)") from None
        if not host:
            raise ConfigError("upstream.url: has no host")
        if parsed.user is not None or parsed.password is not None:
            # The chat path sent upstream.api_key instead, the passthrough failed on every
            # request: a key goes in upstream.api_key (with auth_scheme "Basic" if need be).
            raise ConfigError(
                "upstream.url: must not carry credentials (user:password@);"
                " set upstream.api_key instead"
            )
    for name in ("api_key", "auth_scheme"):
        value = values.get(name)
        if value is not None and _CONTROL.search(value):
            # A key read from a file often ends in a line break: strip it where it is set.
            raise ConfigError(
                f"upstream.{name}: must not contain line breaks or other control characters"
            )
    header = values.get("auth_header")
    if header is not None and not _HEADER_NAME.fullmatch(header):
        raise ConfigError("upstream.auth_header: must be an HTTP header name")
    for index, prefix in enumerate(values.get("passthrough", ())):
        if not _PATH_PREFIX.fullmatch(prefix) or "//" in prefix:
            raise ConfigError(
                f"upstream.passthrough[{index}]: must be a path under /v1 such as"
                f" /models or /embeddings (letters, digits, - _ . /), not {prefix!r}"
            )


_PATH_PREFIX = re.compile(r"/(?:[A-Za-z0-9_-][A-Za-z0-9._-]*/?)*")
"""A plain path: no escapes, query or dot segments, which the client could spell another
way (the match is on the path as sent)."""


_DRIVERS = {
    "sqlite+aiosqlite": "sqlite+aiosqlite",
    "sqlite": "sqlite+aiosqlite",
    "postgresql+asyncpg": "postgresql+asyncpg",
    "postgresql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",
}
"""The database URL schemes the gateway takes, and the async driver each one runs on."""


def _storage_url(url: str) -> str:
    """``url`` with its async driver (``sqlite://`` and ``postgresql://`` get theirs).

    The URL is never shown in an error: it may hold a password."""
    wanted = "use sqlite+aiosqlite:///PATH or postgresql+asyncpg://USER@HOST/DATABASE"
    scheme, sep, rest = url.partition("://")
    driver = _DRIVERS.get(scheme.lower()) if sep else None
    if driver is None:
        named = f"not {scheme}://" if sep and len(scheme) <= 40 else "the URL has no scheme"
        raise ConfigError(f"storage.url: {wanted} ({named})")
    if driver == "postgresql+asyncpg":
        return _asyncpg_url(f"{driver}://{rest}")
    _check_sqlite_query(rest)
    return f"{driver}://{rest}"


def _check_sqlite_query(rest: str) -> None:
    """A SQLite URL's query may only ask for an in-memory database: the driver warned
    about any other name and left it out, and the gateway's own connections open the
    file by its path alone (``mode=ro`` would have been read-write)."""
    _path, sep, query = rest.partition("?")
    if not sep:
        return
    for pair in query.split("&"):
        name, _, value = pair.partition("=")
        if (name, value) != ("mode", "memory"):
            shown = f"not {pair!r}" if len(pair) <= 60 and pair.isprintable() else "not that"
            raise ConfigError(f"storage.url: a SQLite URL takes no query but mode=memory ({shown})")


_ASYNCPG_QUERY = frozenset(
    {
        *("host", "port", "user", "password", "passfile", "database", "ssl", "direct_tls"),
        *("target_session_attrs", "krbsrvname", "gsslib", "prepared_statement_cache_size"),
    }
)
"""What a ``postgresql+asyncpg://`` URL's query may hold: asyncpg's ``connect()``
arguments that make sense as text (anything else failed at the first connection with
a ``TypeError``), and SQLAlchemy's statement cache size."""


def _asyncpg_url(url: str) -> str:
    """A PostgreSQL URL asyncpg can connect with: libpq's ``sslmode`` (what people paste)
    becomes asyncpg's ``ssl``, which takes the same values."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
        port = parsed.port
    except (ArgumentError, ValueError):  # a port that is not a number, say
        raise ConfigError("storage.url: not a valid URL (check its host and port)") from None
    query = dict(parsed.query)
    in_query = query.get("port", ())  # ?host=/run/postgresql&port=5433, once for each host
    ports = [str(port)] if port is not None else []
    ports += [in_query] if isinstance(in_query, str) else list(in_query)
    for text in ports:
        if not text.isdigit():
            raise ConfigError("storage.url: not a valid URL (check its host and port)")
        if not 0 < int(text) < 65536:
            raise ConfigError("storage.url: the port must be between 1 and 65535")
    if "sslmode" in query and "ssl" not in query:
        ssl = query.pop("sslmode")
        parsed = parsed.difference_update_query(["sslmode"]).update_query_dict({"ssl": ssl})
        url = parsed.render_as_string(hide_password=False)
    unknown = sorted(name for name in query if name not in _ASYNCPG_QUERY)
    if unknown:
        shown = ", ".join(repr(name[:40]) for name in unknown[:3])
        known = ", ".join(sorted(_ASYNCPG_QUERY | {"sslmode"}))
        raise ConfigError(f"storage.url: asyncpg does not take {shown} (it takes {known})")
    return url


def _validate_networks(networks: tuple[str, ...]) -> None:
    for network in networks:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise ConfigError(
                f"server.trusted_proxies: {network!r} is not an IP address or network"
            ) from None


# What a browser sends in Origin: scheme, host (a name or a bracketed IPv6 address) and a
# port; no user, path or wildcard.
_ORIGIN = re.compile(r"https?://([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(:(\d{1,5}))?", re.IGNORECASE)


def _validate_origins(origins: tuple[str, ...]) -> None:
    for origin in origins:
        match = _ORIGIN.fullmatch(origin.rstrip("/"))
        if origin != "*" and (match is None or int(match.group(3) or 1) > 65535):
            raise ConfigError(
                f"server.cors_origins: {origin[:80]!r} is not an origin"
                ' (scheme://host[:port], such as https://app.example.com) or "*"'
            )


_HMAC = frozenset({"HS256", "HS384", "HS512"})
_ASYMMETRIC = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)


def _validate_auth(values: Mapping[str, Any]) -> None:
    if values.get("tenant_claim", "team_id") == "":
        raise ConfigError("auth.tenant_claim: must name a claim (it gives the tenant)")
    algorithms = values.get("algorithms", ("HS256",))
    if not algorithms:
        raise ConfigError("auth.algorithms: must name at least one algorithm")
    for alg in algorithms:
        if alg not in _HMAC | _ASYMMETRIC:
            known = ", ".join(sorted(_HMAC | _ASYMMETRIC))
            raise ConfigError(f"auth.algorithms: unsupported algorithm {alg!r} (use {known})")
    asymmetric = values.get("public_key") or values.get("jwks_url")
    if any(a in _HMAC for a in algorithms) and asymmetric and not values.get("jwt_secret"):
        raise ConfigError("auth.algorithms: HS* algorithms need auth.jwt_secret")
    if any(a in _ASYMMETRIC for a in algorithms) and values.get("jwt_secret") and not asymmetric:
        raise ConfigError("auth.algorithms: RS/ES/PS/EdDSA need auth.public_key or auth.jwks_url")
    key = values.get("public_key")
    if key:
        _check_public_key(key)
    url = values.get("jwks_url")
    if url and not re.match(r"^https?://[^/]+", url):
        # Not quoted: the URL may hold the key server's credentials.
        scheme = re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", url)
        if scheme is None:
            fault = "it has no scheme"
        elif scheme.group().lower() in ("http:", "https:"):
            fault = "it has no host"
        else:
            fault = f"not {scheme.group()}"
        raise ConfigError(f"auth.jwks_url: must be an http:// or https:// URL ({fault})")
    if url:
        try:
            _ = URL(url).port  # parses the host and port: a bad one failed every request
        except ValueError:
            # Not quoted either.  (Item 151: a 500 for every token, the URL in the log.)
            raise ConfigError("auth.jwks_url: not a valid URL (its host or port)") from None
    for number, claim in enumerate(values.get("require", ())):
        if not claim.strip():  # "${REQ:-}" with REQ unset: no token carries that claim
            raise ConfigError(f"auth.require[{number}]: must name a claim, not be empty")
    for name in ("jwks_cache_seconds", "jwks_refetch_interval", "leeway"):
        if values.get(name, 0) < 0:
            raise ConfigError(f"auth.{name}: must not be negative")
    if values.get("max_token_bytes", 1) <= 0:
        raise ConfigError("auth.max_token_bytes: must be greater than 0")


def _check_public_key(value: str) -> None:
    """``auth.public_key`` is inline PEM or the path of a PEM file; either must load."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    pem = value
    if not value.lstrip().startswith("-----BEGIN"):
        try:
            pem = Path(value).read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError):
            # Not quoted: a secret pasted into the wrong key must not be printed.
            raise ConfigError(
                "auth.public_key: not a PEM key (-----BEGIN PUBLIC KEY-----)"
                " and not the path of a readable file"
            ) from None
    try:
        load_pem_public_key(pem.encode())
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError("auth.public_key: not a valid PEM public key") from None


def _expanded(raw: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """The file's tables with ``${VAR}`` expanded in their strings, once (a variable may
    hold ``${``), at any depth: ``algorithms = ["${ALG}"]`` too.  Flags are merged in
    afterwards, as given: the shell expanded them."""
    return {
        section: _expand_all(table, section, env) if isinstance(table, dict) else table
        for section, table in raw.items()
    }


def _expand_all(value: Any, key: str, env: Mapping[str, str]) -> Any:
    """``value`` with every string in it expanded; ``key`` names it in errors
    (``auth.algorithms[0]``)."""
    if isinstance(value, str):
        return _expand(value, key, env)
    if isinstance(value, list):
        return [_expand_all(item, f"{key}[{i}]", env) for i, item in enumerate(value)]
    if isinstance(value, dict):
        return {name: _expand_all(item, f"{key}.{name}", env) for name, item in value.items()}
    return value


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def find_config_file(explicit: str | None, env: Mapping[str, str] | None = None) -> Path | None:
    """``--config``, else ``$CHATMEM_CONFIG``, else ``./chatmem.toml`` if it exists."""
    env = os.environ if env is None else env
    if explicit:
        return Path(explicit)
    if env.get("CHATMEM_CONFIG"):
        return Path(env["CHATMEM_CONFIG"])
    default = Path("chatmem.toml")
    return default if default.is_file() else None


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    env: Mapping[str, str] | None = None,
) -> Config:
    """Build the :class:`Config` from a TOML file (optional) and ``overrides`` (CLI flags)."""
    if path is not None and not isinstance(path, str | os.PathLike):
        raise TypeError(
            f"load_config(path): path must be a file path, not {type(path).__name__}"
            " (settings as a dict go in overrides={'section': {'key': value}})"
        )
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config file ({exc.strerror})") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML ({exc})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: invalid TOML (not UTF-8 text)") from None
        raw = _expanded(raw, env)
    if not overrides:
        return _build(raw)
    if raw:
        _build(raw)  # the file on its own too: a flag that overrides a bad value hides no error
    return _build(_merge(raw, overrides))


def _build(raw: Mapping[str, Any]) -> Config:
    sections = {f.name: f for f in dataclasses.fields(Config)}
    built: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in sections:
            raise ConfigError(f"[{name}]: unknown section")
        section_type = typing.get_type_hints(Config)[name]
        built[name] = _build_section(section_type, value, name)
    return Config(**built)
