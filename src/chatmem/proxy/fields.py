"""Checking the fields of the older services' JSON bodies: 400 naming the field."""

from __future__ import annotations

from typing import Any

from ..errors import InvalidRequest

__all__ = ["optional_int", "optional_number", "optional_stop", "required_str"]


def required_str(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if value is None:
        raise InvalidRequest(f"{name} is required", param=name)
    if not isinstance(value, str):
        raise InvalidRequest(f"{name} must be a string", param=name)
    return value


def optional_int(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise InvalidRequest(f"{name} must be an integer", param=name)
    return value


def optional_number(body: dict[str, Any], name: str) -> float | int | None:
    value = body.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise InvalidRequest(f"{name} must be a number", param=name)
    return value


def optional_stop(body: dict[str, Any], name: str) -> str | list[str] | None:
    value = body.get(name)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise InvalidRequest(f"{name} must be a string or an array of strings", param=name)
