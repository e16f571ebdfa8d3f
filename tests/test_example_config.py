"""chatmem.example.toml names every configuration key and loads to the defaults."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from chatmem.config import Config, ConfigError, load_config

EXAMPLE = Path(__file__).resolve().parents[1] / "chatmem.example.toml"


def test_example_names_every_key_of_every_section() -> None:
    example = tomllib.loads(EXAMPLE.read_text())
    defaults = Config()
    sections = {f.name: getattr(defaults, f.name) for f in dataclasses.fields(Config)}
    assert set(example) == set(sections)
    for name, section in sections.items():
        keys = {f.name for f in dataclasses.fields(section)}
        assert set(example[name]) == keys, name


def test_every_key_has_a_comment() -> None:
    for line in EXAMPLE.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            assert " # " in line, line


def test_example_loads_to_the_defaults() -> None:
    assert load_config(EXAMPLE, env={}) == Config()


def test_systemd_unit_runs_serve_and_outwaits_the_grace_period() -> None:
    from chatmem.cli import _parser
    from chatmem.config import ServerConfig

    unit = dict(
        line.split("=", 1)
        for line in (EXAMPLE.parent / "deploy" / "chatmem.service").read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    command = unit["ExecStart"].split()
    assert command[0].endswith("/chatmem")
    args = _parser().parse_args(command[1:])
    assert args.command == "serve" and args.workers == 2
    assert float(unit["TimeoutStopSec"]) > ServerConfig().shutdown_grace
    assert unit["KillSignal"] == "SIGTERM"
    assert int(unit["LimitNOFILE"]) >= 2 * 10_000  # two descriptors a stream


@pytest.mark.parametrize(
    ("section", "values", "message"),
    [
        ("server", {"trusted_proxies": ["10.0.0.0/8", "caddy"]}, "server.trusted_proxies: 'caddy'"),
        ("server", {"workers": 0}, "server.workers: must be greater than 0"),
        ("metrics", {"path": "metrics"}, "metrics.path: must start with '/'"),
        ("log", {"format": "xml"}, "log.format: must be 'text' or 'json'"),
        ("log", {"debug_content": "yes"}, "log.debug_content: must be true or false, not 'yes'"),
    ],
)
def test_deployment_keys_are_checked(section: str, values: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, overrides={section: values}, env={})
    assert str(caught.value).startswith(message)


def test_trusted_proxies_accept_addresses_and_networks() -> None:
    config = load_config(
        None, overrides={"server": {"trusted_proxies": ["127.0.0.1", "::1/128"]}}, env={}
    )
    assert config.server.trusted_proxies == ("127.0.0.1", "::1/128")
