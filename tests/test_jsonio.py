"""``jsonio.loads``: orjson's speed, the standard library's exactness."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatmem import jsonio

_numbers = (
    st.integers()  # any size: JSON allows integers beyond 64 bits
    | st.integers(min_value=10**18, max_value=10**30)
    | st.integers(max_value=-(2**63) + 5, min_value=-(2**63) - 5)
    | st.floats(allow_nan=False, allow_infinity=False)
)
_text = st.text() | st.from_regex(r"[a-z ]{0,5}[0-9]{17,25}[a-z ]{0,5}", fullmatch=True)
_values = st.recursive(
    st.none() | st.booleans() | _numbers | _text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=12,
)


def _typed(value: Any) -> Any:
    """``value`` with each number's type beside it: ``1 == 1.0`` must not pass."""
    if isinstance(value, dict):
        return {k: _typed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_typed(v) for v in value]
    return (type(value).__name__, value)


@given(_values)
def test_reads_what_the_standard_library_reads(value: Any) -> None:
    text = json.dumps(value)
    assert _typed(jsonio.loads(text.encode())) == _typed(json.loads(text))


@pytest.fixture
def read_by_json(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The texts ``jsonio`` had the standard library read."""
    calls: list[str] = []
    real = json.loads

    def spy(data: Any, **kwargs: Any) -> Any:
        calls.append(data)
        return real(data, **kwargs)

    monkeypatch.setattr(jsonio.json, "loads", spy)
    return calls


def test_long_digits_in_text_stay_with_orjson(read_by_json: list[str]) -> None:
    # A nanosecond timestamp pasted into a message, and one as a string field.
    body = b'{"messages": [{"role": "user", "content": "at 1732812345678901234 it failed"}],'
    body += b' "metadata": {"trace": "1732812345678901234567"}, "temperature": 0.7}'
    assert jsonio.loads(body)["metadata"]["trace"] == "1732812345678901234567"
    assert read_by_json == []


def test_integers_beyond_64_bits_are_read_exactly(read_by_json: list[str]) -> None:
    for text, value in [
        (b'{"seed": 18446744073709551616}', 2**64),
        (b'{"seed": -9223372036854775809}', -(2**63) - 1),
        (b'[1, {"n": [123456789012345678901234567890]}]', 123456789012345678901234567890),
    ]:
        found = jsonio.loads(text)
        while not isinstance(found, int):
            found = found[-1] if isinstance(found, list) else next(iter(found.values()))
        assert found == value and type(found) is int
    assert len(read_by_json) == 3
    # Within 64 bits orjson is exact: no second read.
    assert jsonio.loads(b"[18446744073709551615, -9223372036854775808]") == [2**64 - 1, -(2**63)]
    assert len(read_by_json) == 3
