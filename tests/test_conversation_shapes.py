"""The Conversations API's pure validation and shaping functions."""

from __future__ import annotations

import pytest

from chatmem.errors import InvalidRequest
from chatmem.proxy.conversation_shapes import item_json, list_json, parse_items, parse_metadata

CALLS = [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]


def test_parse_items_splits_system_and_normalises_parts() -> None:
    system, items = parse_items(
        [
            {"type": "message", "role": "developer", "content": "rules", "id": "ignored"},
            {
                "role": "user",
                "content": [{"type": "input_text", "text": "a"}, {"type": "input_audio"}],
            },
            {"role": "assistant", "content": None, "tool_calls": CALLS, "status": "x"},
        ]
    )
    assert system == [{"role": "developer", "content": "rules"}]
    assert items == [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "input_audio"}]},
        {"role": "assistant", "content": None, "tool_calls": CALLS},
    ]
    assert parse_items(None) == (None, [])
    assert parse_items([{"role": "user", "content": "x"}])[0] is None


@pytest.mark.parametrize(
    ("item", "param"),
    [
        ({"role": [], "content": "x"}, "items[0].role"),
        ({"role": {}, "content": "x"}, "items[0].role"),
    ],
)
def test_a_role_that_is_not_a_string_is_a_400(item: dict[str, object], param: str) -> None:
    # A list or an object cannot be looked up among the roles: it was a TypeError, a 500.
    with pytest.raises(InvalidRequest) as info:
        parse_items([item])
    assert info.value.param == param


def test_a_part_type_that_is_not_a_string_is_a_400_naming_it() -> None:
    part = {"type": [], "text": "a"}  # unhashable: it must not reach a set lookup
    with pytest.raises(InvalidRequest, match="must be a string") as info:
        parse_items([{"role": "user", "content": [part]}])
    assert info.value.param == "items[0].content[0].type"


def test_parse_metadata_limits() -> None:
    assert parse_metadata(None) == {}
    assert parse_metadata({"k" * 64: "v" * 512}) == {"k" * 64: "v" * 512}
    with pytest.raises(InvalidRequest, match="at most 16"):
        parse_metadata({str(i): "" for i in range(17)})
    with pytest.raises(InvalidRequest, match="not an array") as info:
        parse_metadata({"k": []})
    assert info.value.param == "metadata.k"


def test_item_json_keeps_only_set_fields() -> None:
    row = {
        "seq": 7,
        "role": "assistant",
        "content": "hi",
        "name": None,
        "tool_calls": None,
        "tool_call_id": None,
        "reasoning": "because",
        "model": "m",
        "finish_reason": "stop",
        "usage": None,
        "created_at": 5,
    }
    assert item_json(row) == {
        "id": "msg_7",
        "type": "message",
        "status": "completed",
        "role": "assistant",
        "content": "hi",
        "reasoning": "because",
        "model": "m",
        "finish_reason": "stop",
        "created_at": 5,
    }
    assert list_json([], False) == {
        "object": "list",
        "data": [],
        "first_id": None,
        "last_id": None,
        "has_more": False,
    }
