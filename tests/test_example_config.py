"""chatmem.example.toml names every configuration key and loads to the defaults."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

from chatmem.config import Config, load_config

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
