"""Config: TOML + environment into a frozen typed object; errors name the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from chatmem.config import Config, ConfigError, find_config_file, load_config

FULL = """
[server]
host = "0.0.0.0"
port = 8080
max_body_bytes = 1024

[upstream]
url = "${UP_URL:-http://127.0.0.1:9000/v1}"
api_key = "${UPSTREAM_API_KEY}"
connect_timeout = 3
read_timeout = 60.5

[storage]
url = "sqlite+aiosqlite:///x.db"

[auth]
jwt_secret = "${JWT_SECRET}"
algorithms = ["HS256", "HS512"]
tenant_claim = "team_id"
user_claim = "sub"

[memory]
max_history_messages = 50
on_client_disconnect = "finish"
resend_reasoning = "never"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "chatmem.toml"
    path.write_text(text)
    return path


def test_full_file(tmp_path: Path) -> None:
    env = {"UPSTREAM_API_KEY": "sk-1", "JWT_SECRET": "s3cret"}
    config = load_config(write(tmp_path, FULL), env=env)
    assert config.server.host == "0.0.0.0" and config.server.port == 8080
    assert config.upstream.url == "http://127.0.0.1:9000/v1"
    assert config.upstream.api_key == "sk-1"
    assert config.upstream.connect_timeout == 3.0 and config.upstream.read_timeout == 60.5
    assert config.auth.algorithms == ("HS256", "HS512") and config.auth.enabled
    assert config.memory.on_client_disconnect == "finish"
    assert config.memory.resend_reasoning == "never"
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.server.port = 1  # type: ignore[misc]
    assert "sk-1" not in repr(config) and "s3cret" not in repr(config)


def test_defaults() -> None:
    config = load_config(None, env={})
    assert config == Config()
    assert (config.server.host, config.server.port) == ("127.0.0.1", 7001)
    assert config.storage.url == "sqlite+aiosqlite:///chatmem.db"
    assert not config.auth.enabled


def test_default_and_env_override(tmp_path: Path) -> None:
    text = '[upstream]\nurl = "${UP_URL:-http://a:1/v1}"\n[server]\nport = "${PORT:-7001}"\n'
    path = write(tmp_path, text)
    assert load_config(path, env={}).upstream.url == "http://a:1/v1"
    config = load_config(path, env={"UP_URL": "http://b:2/v1", "PORT": "9"})
    assert config.upstream.url == "http://b:2/v1" and config.server.port == 9


def test_a_default_stands_in_for_an_empty_variable_too(tmp_path: Path) -> None:
    # As in the shell: ${VAR:-default} when VAR is unset or empty; ${VAR} is what it is.
    text = '[upstream]\napi_key = "pre-${K:-d}-post"\n[auth]\njwt_secret = "${S}"\n'
    path = write(tmp_path, text)
    config = load_config(path, env={"K": "", "S": ""})
    assert config.upstream.api_key == "pre-d-post"
    assert not config.auth.enabled  # an empty secret is no secret
    assert load_config(path, env={"K": "k", "S": ""}).upstream.api_key == "pre-k-post"


@pytest.mark.parametrize("placeholder", ["${K", "a${1X}b", "${K:=x}", "${}"])
def test_a_broken_placeholder_is_an_error_not_text(tmp_path: Path, placeholder: str) -> None:
    path = write(tmp_path, f'[upstream]\napi_key = "sk-{placeholder}-secret"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={"K": "k"})
    assert str(caught.value).startswith("upstream.api_key: has a '${' that is not ${VAR}")
    assert "write $${ for one" in str(caught.value)
    assert "secret" not in str(caught.value)  # the value itself is never shown


@pytest.mark.parametrize(
    ("section", "name", "value", "kind"),
    [
        ("upstream", "api_key", "12345678901", "a whole number"),
        ("auth", "jwt_secret", "987654.321", "a number"),
        ("compat", "session_secret", "true", "true or false"),
        ("upstream", "api_key", '["sk-in-a-list"]', "a list"),
    ],
)
def test_a_secret_of_the_wrong_type_is_not_quoted(
    tmp_path: Path, section: str, name: str, value: str, kind: str
) -> None:
    """A secret written without its quotes is a number to TOML: the error named the key
    and printed the number, which is the secret all the same (item 137)."""
    path = write(tmp_path, f"[{section}]\n{name} = {value}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert str(caught.value) == f"{section}.{name}: must be a string, not {kind}"
    # A key that holds no secret still quotes what it was given.
    path = write(tmp_path, '[server]\nport = "seven"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert str(caught.value) == "server.port: must be a whole number, not 'seven'"


def test_true_and_false_may_come_from_the_environment(tmp_path: Path) -> None:
    """As numbers may (``port = "${PORT:-7001}"``): a boolean set per deployment."""
    text = '[log]\naccess = "${ACCESS:-false}"\n[compat]\nsession_cookie_secure = "${SECURE}"\n'
    path = write(tmp_path, text)
    config = load_config(path, env={"ACCESS": "true", "SECURE": "false"})
    assert config.log.access is True and config.compat.session_cookie_secure is False
    assert load_config(path, env={"SECURE": "true"}).log.access is False


def test_a_value_is_expanded_once_and_dollar_brace_can_be_written(tmp_path: Path) -> None:
    # What a variable holds is taken as it is (a secret may hold "${"), "$${" is a literal
    # "${", and a flag is not expanded at all: the shell did that.
    text = '[upstream]\napi_key = "${KEY}"\n[auth]\njwt_secret = "pa$${ss"\n'
    path = write(tmp_path, text)
    config = load_config(path, env={"KEY": "sk-a${b", "HOME": "/root"})
    assert config.upstream.api_key == "sk-a${b"
    assert config.auth.jwt_secret == "pa${ss"
    assert load_config(path, env={"KEY": "sk-${HOME}x"}).upstream.api_key == "sk-${HOME}x"
    flag = {"storage": {"url": "postgresql+asyncpg://u:pa${ss@h/db"}}
    config = load_config(None, overrides=flag, env={})
    assert config.storage.url == "postgresql+asyncpg://u:pa${ss@h/db"


def test_variables_are_expanded_in_lists_too(tmp_path: Path) -> None:
    # A list of strings is as likely to come from the environment as a string: the
    # algorithms a deployment accepts, the origins CORS allows.
    text = (
        '[auth]\njwt_secret = "s"\nalgorithms = ["${ALG}", "${ALG2:-HS512}"]\n'
        '[server]\ncors_origins = ["https://${SITE}"]\n'
    )
    config = load_config(write(tmp_path, text), env={"ALG": "HS384", "SITE": "a.example"})
    assert config.auth.algorithms == ("HS384", "HS512")
    assert config.server.cors_origins == ("https://a.example",)
    # Unset without a default: an error naming the element, not a claim called "${NOPE}".
    text = '[auth]\njwt_secret = "s"\nrequire = ["exp", "${NOPE}"]\n'
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text), env={})
    assert str(caught.value) == "auth.require[1]: environment variable NOPE is not set"
    # Empty by default: a claim no token carries, which would lock every client out.
    text = '[auth]\njwt_secret = "s"\nrequire = ["exp", "${NOPE:-}"]\n'
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text), env={})
    assert str(caught.value) == "auth.require[1]: must name a claim, not be empty"


def test_flags_override_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nport = 1234\nhost = "0.0.0.0"\n')
    config = load_config(path, overrides={"server": {"port": 9999}}, env={})
    assert config.server.port == 9999 and config.server.host == "0.0.0.0"


@pytest.mark.parametrize(
    ("text", "flags", "message"),
    [
        ('[server]\nport = "x"\n', {"server": {"port": 9999}}, "server.port: must be"),
        ('[storage]\nurl = "mysql://x"\n', {"storage": {"url": "sqlite:///a.db"}}, "storage.url"),
    ],
)
def test_a_flag_does_not_hide_a_bad_value_in_the_file(
    tmp_path: Path, text: str, flags: dict[str, dict[str, object]], message: str
) -> None:
    """The file is checked as written: the same file without the flag would not start."""
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text), overrides=flags, env={})
    assert str(caught.value).startswith(message)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[server]\nprot = 1\n", "server.prot: unknown key"),
        ("[srever]\nport = 1\n", "[srever]: unknown section"),
        ('[server]\nport = "abc"\n', "server.port: must be a whole number, not 'abc'"),
        ("[server]\nport = true\n", "server.port: must be a whole number, not true"),
        ("[server]\nport = 0\n", "server.port: must be greater than 0"),
        ('[upstream]\nread_timeout = "x"\n', "upstream.read_timeout: must be a number, not 'x'"),
        ('[upstream]\nurl = "ftp://x"\n', "upstream.url: must be an http"),
        (
            '[upstream]\napi_key = "${NOPE_NOT_SET}"\n',
            "upstream.api_key: environment variable NOPE_NOT_SET is not set",
        ),
        ('[auth]\nalgorithms = "HS256"\n', "auth.algorithms: must be a list of strings"),
        ('[memory]\non_client_disconnect = "keep"\n', "memory.on_client_disconnect: must be"),
        (
            '[memory]\nresend_reasoning = "tools"\n',
            "memory.resend_reasoning: must be 'tool_turns' or 'always' or 'never', not 'tools'",
        ),
        ('[auth]\ntenant_claim = ""\n', "auth.tenant_claim: must name a claim"),
        ('[compat]\nask_model = " "\n', "compat.ask_model: must not be empty"),  # item 150
        ('[storage]\nurl = "mysql://u:pw@h/db"\n', "storage.url: use sqlite+aiosqlite"),
        ("server = 1\n", "[server]: must be a table"),
        ("[server\n", "invalid TOML"),
        ('[server]\nhost = ""\n', "server.host: must not be empty"),
        ("[server]\nshutdown_grace = -1\n", "server.shutdown_grace: must not be negative"),
        ("[storage]\nbusy_timeout_ms = -5\n", "storage.busy_timeout_ms: must not be negative"),
        ("[memory]\nmax_history_bytes = -1\n", "memory.max_history_bytes: must not be negative"),
        ("[upstream]\nmax_answer_bytes = 0\n", "upstream.max_answer_bytes: must be greater than 0"),
        ('[metrics]\npath = "/v1/health"\n', "metrics.path: must not be one of the gateway's"),
        ('[metrics]\npath = "/api/v1/health"\n', "metrics.path: must not be one of"),
        ('[metrics]\npath = "/conversation/m"\n', "metrics.path: must not be one of"),
        ('[upstream]\npassthrough = ["models"]\n', "upstream.passthrough[0]: must be a path"),
        ('[upstream]\npassthrough = ["/", "/a/../b"]\n', "upstream.passthrough[1]: must be"),
        ('[upstream]\npassthrough = ["/%66iles"]\n', "upstream.passthrough[0]: must be"),
        ('[upstream]\nurl = "http://127.0.0.1:99999/v1"\n', "upstream.url: not a valid URL"),
        ('[upstream]\nurl = "http://h:port/v1"\n', "upstream.url: not a valid URL"),
        ('[upstream]\nurl = "http://user:pw@/v1"\n', "upstream.url: not a valid URL"),
        ('[storage]\nurl = "postgresql://u:pw@h:abc/db"\n', "storage.url: not a valid URL"),
        ('[storage]\nurl = "postgresql://u:pw@h:70000/db"\n', "storage.url: the port must be"),
        ('[storage]\nurl = "postgresql://u@/db?host=/s&port=5432x"\n', "storage.url: not a valid"),
        (
            '[storage]\nurl = "postgresql://u:pw@h/db?sslcert=x"\n',
            "storage.url: asyncpg does not take 'sslcert' (it takes database,",
        ),
        # Found by this session's review of the config (item 163): each started, and then
        # every request (or the shutdown) failed, or the value was taken as written.
        ("[upstream]\nread_timeout = nan\n", "upstream.read_timeout: must be a finite number"),
        ('[upstream]\nconnect_timeout = "inf"\n', "upstream.connect_timeout: must be a finite"),
        ("[server]\nshutdown_grace = nan\n", "server.shutdown_grace: must be a finite number"),
        ("[storage]\npool_timeout = inf\n", "storage.pool_timeout: must be a finite number"),
        ("[server]\nworkers = 100000\n", "server.workers: must be at most 256"),
        ('[upstream]\napi_key = "${A:-${B}}"\n', "upstream.api_key: has a '${' that is not"),
        ("[upstream]\napi_key = 1979-05-27\n", "upstream.api_key: must be a string, not a date"),
        ("[server]\nhost = 07:32:00\n", "server.host: must be a string, not a date or time"),
        ('[log]\naccess = "yes"\n', "log.access: must be true or false, not 'yes'"),
        ('[storage]\nurl = "sqlite:///x.db?mode=ro"\n', "storage.url: a SQLite URL takes no"),
        ('[storage]\nurl = "sqlite:///x.db?foo=bar"\n', "(not 'foo=bar')"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text), env={})
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("api_key", "sk-secret-from-a-file\n", "upstream.api_key: must not contain line"),
        ("api_key", "sk-secret\r\nX-Injected: 1", "upstream.api_key: must not contain"),
        ("auth_scheme", "Bearer\n", "upstream.auth_scheme: must not contain"),
        ("auth_header", "X-Api Key", "upstream.auth_header: must be an HTTP header name"),
        ("auth_header", "", "upstream.auth_header: must be an HTTP header name"),
        ("url", "http://h/v1?api-key=sk-secret", "upstream.url: must not have a query"),
        ("url", "http://h/v1#sk-secret", "upstream.url: must not have a query"),
        ("url", "http://h/v1\n", "upstream.url: must not contain spaces"),
        ("url", "ftp://user:sk-secret@h/v1", "upstream.url: must be an http"),
        ("url", "http://admin:sk-secret@h/v1", "upstream.url: must not carry credentials"),
        ("url", "http://sk-secret@h/v1", "upstream.url: must not carry credentials"),
    ],
)
def test_upstream_values_that_would_fail_every_request(
    tmp_path: Path, name: str, value: str, message: str
) -> None:
    """A key read from a file with its line break, or a header name with a space, used
    to start the gateway and then fail every turn with a 400 blaming the client (and a
    500 on passthrough).  Refused at start-up, from a variable or a flag, without
    quoting the value."""
    path = write(tmp_path, f'[upstream]\n{name} = "${{VALUE}}"\n')
    for load in (
        lambda: load_config(path, env={"VALUE": value}),
        lambda: load_config(None, overrides={"upstream": {name: value}}, env={}),
    ):
        with pytest.raises(ConfigError) as caught:
            load()
        assert str(caught.value).startswith(message)
        assert "secret" not in str(caught.value)


@pytest.mark.parametrize(
    ("url", "fault"),
    [
        ("ftp://reader:PASS-4c1e@keys.example/jwks.json", "not ftp:"),
        ("keys.example/jwks.json?token=PASS-4c1e", "it has no scheme"),
        ("https:///jwks.json?token=PASS-4c1e", "it has no host"),
    ],
)
def test_a_bad_jwks_url_is_refused_without_quoting_it(tmp_path: Path, url: str, fault: str) -> None:
    """The URL may hold the key server's credentials: the error says what is wrong with
    it, not what it is."""
    with pytest.raises(ConfigError) as caught:
        load_config(
            write(tmp_path, f'[auth]\nalgorithms = ["RS256"]\njwks_url = "{url}"\n'), env={}
        )
    assert str(caught.value) == f"auth.jwks_url: must be an http:// or https:// URL ({fault})"


def test_a_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "chatmem.toml"
    path.write_bytes(b"\xff\xfe[server]\n")
    with pytest.raises(ConfigError, match=r"chatmem.toml: invalid TOML \(not UTF-8 text\)"):
        load_config(path, env={})


def test_libpq_sslmode_becomes_asyncpg_ssl() -> None:
    """asyncpg names libpq's ``sslmode`` ``ssl`` (same values); a pasted libpq URL used to
    fail at the first connection with a TypeError traceback."""
    url = "postgresql://u@db.example/app?sslmode=verify-full"
    used = load_config(overrides={"storage": {"url": url}}, env={}).storage.url
    assert used == "postgresql+asyncpg://u@db.example/app?ssl=verify-full"
    kept = "postgresql://u@/db?host=/run/pg&ssl=require"
    used = load_config(overrides={"storage": {"url": kept}}, env={}).storage.url
    assert used == "postgresql+asyncpg://u@/db?host=/run/pg&ssl=require"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "absent.toml", env={})


def test_discovery(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert find_config_file(None, env={}) is None
    (tmp_path / "chatmem.toml").write_text("")
    assert find_config_file(None, env={}) == Path("chatmem.toml")
    assert find_config_file(None, env={"CHATMEM_CONFIG": "/etc/x.toml"}) == Path("/etc/x.toml")
    assert find_config_file("mine.toml", env={"CHATMEM_CONFIG": "/x"}) == Path("mine.toml")


@pytest.mark.parametrize(
    ("written", "used"),
    [
        ("sqlite:///x.db", "sqlite+aiosqlite:///x.db"),
        ("postgresql://u@h/db", "postgresql+asyncpg://u@h/db"),
        ("postgres://u@/db?host=/run/pg", "postgresql+asyncpg://u@/db?host=/run/pg"),
        ("sqlite+aiosqlite:///x.db", "sqlite+aiosqlite:///x.db"),
    ],
)
def test_a_storage_url_without_its_async_driver_gets_it(written: str, used: str) -> None:
    assert load_config(overrides={"storage": {"url": written}}).storage.url == used


def test_a_public_key_that_is_no_key_is_not_printed() -> None:
    """A secret pasted into auth.public_key by mistake must not reach the terminal."""
    with pytest.raises(ConfigError) as caught:
        auth = {"public_key": "hunter2-my-hs256-secret", "algorithms": ["RS256"]}
        load_config(None, overrides={"auth": auth}, env={})
    assert "hunter2" not in str(caught.value)
    assert str(caught.value).startswith("auth.public_key: not a PEM key")
