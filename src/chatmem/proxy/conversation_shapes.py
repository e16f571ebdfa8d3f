"""The Conversations API's JSON: validating what comes in, shaping what goes out.

Pure functions, no I/O.  Input items are chat messages (optionally OpenAI's ``"type":
"message"`` form); output follows OpenAI's Conversations API.
"""

from __future__ import annotations

from typing import Any

from ..errors import InvalidRequest
from ..storage import ConversationInfo, Page
from ..storage.pairing import pairing_problem
from .chat_request import (
    DEPRECATED_FUNCTIONS,
    check_parts,
    check_stored_strings,
    check_tool_calls,
    reasoning_content,
)

__all__ = [
    "MAX_ITEMS",
    "check_tool_results",
    "conversation_json",
    "item_id",
    "item_json",
    "list_json",
    "page_json",
    "parse_items",
    "parse_metadata",
]

MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512

_SYSTEM_ROLES = frozenset({"system", "developer"})
_ROLES = _SYSTEM_ROLES | {"user", "assistant", "tool"}
# Parts of OpenAI's Responses/Conversations shape that chat servers call plain "text".
_TEXT_PARTS = frozenset({"input_text", "output_text"})
_OPTIONAL_FIELDS = ("name", "tool_call_id", "reasoning")


def parse_metadata(value: object) -> dict[str, str]:
    """At most 16 pairs of string keys (<= 64 chars) and string values (<= 512 chars)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidRequest("metadata must be an object of string values", param="metadata")
    if len(value) > MAX_METADATA_PAIRS:
        raise InvalidRequest(
            f"metadata has {len(value)} pairs; at most {MAX_METADATA_PAIRS} are allowed",
            param="metadata",
        )
    for key, item in value.items():
        if len(key) > MAX_METADATA_KEY:
            raise InvalidRequest(
                f"metadata key {key[:20]!r}... is {len(key)} characters long; "
                f"at most {MAX_METADATA_KEY} are allowed",
                param="metadata",
            )
        if not isinstance(item, str):
            raise InvalidRequest(
                f"metadata value of {key!r} must be a string, not {_json_type(item)}",
                param=f"metadata.{key}",
            )
        if len(item) > MAX_METADATA_VALUE:
            raise InvalidRequest(
                f"metadata value of {key!r} is {len(item)} characters long; "
                f"at most {MAX_METADATA_VALUE} are allowed",
                param=f"metadata.{key}",
            )
    return dict(value)


def _json_type(value: object) -> str:
    names = {bool: "a boolean", int: "a number", float: "a number", list: "an array"}
    if value is None:
        return "null"
    return names.get(type(value), "an object")


def _content(value: object, param: str) -> Any:
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise InvalidRequest(
            f"{param} must be a string, an array of content parts or null", param=param
        )
    check_parts(value, param)
    return [_chat_part(part, f"{param}[{number}]") for number, part in enumerate(value)]


def _chat_part(part: dict[str, Any], param: str) -> dict[str, Any]:
    """``part`` as a chat server takes it: the Conversations API's own part types become
    chat's (``input_text``/``output_text`` -> ``text``, ``input_image`` -> ``image_url``,
    ``input_file`` -> ``file``), and the fields a chat server needs of the parts it knows
    are checked.  Other types pass as they are: servers have their own (vLLM's
    ``video_url``, say)."""
    kind = part.get("type")
    if not isinstance(kind, str):
        raise InvalidRequest(f"{param}.type must be a string", param=f"{param}.type")
    if kind == "text" or kind in _TEXT_PARTS:
        text = part.get("text")
        if not isinstance(text, str):
            raise InvalidRequest(f"{param}.text must be a string", param=f"{param}.text")
        return part if kind == "text" else {"type": "text", "text": text}
    if kind == "image_url":
        image = part.get("image_url")
        if not (isinstance(image, dict) and isinstance(image.get("url"), str)):
            raise InvalidRequest(
                f"{param}.image_url must be an object with a string url",
                param=f"{param}.image_url",
            )
        return part
    if kind == "input_image":
        url = part.get("image_url")
        if not isinstance(url, str):
            raise InvalidRequest(
                f"{param}.image_url must be a string: chat servers take an image by its URL"
                " (or a data: URL), not by file_id",
                param=f"{param}.image_url",
            )
        image = {"url": url, **_present(part, "detail")}
        return {"type": "image_url", "image_url": image}
    if kind == "input_file":
        file = _present(part, "file_id", "file_data", "filename")
        if "file_id" not in file and "file_data" not in file:
            raise InvalidRequest(
                f"{param} must have a file_id or file_data: chat servers take no file_url",
                param=param,
            )
        return {"type": "file", "file": file}
    return part


def _present(part: dict[str, Any], *names: str) -> dict[str, Any]:
    return {name: part[name] for name in names if isinstance(part.get(name), str)}


def check_tool_results(
    items: list[dict[str, Any]], open_calls: set[str], unanswered: set[str]
) -> None:
    """What chat servers check of tool exchanges (:func:`pairing.pairing_problem`): every
    tool result answers a call of the assistant message right before its run of tool
    results that has no result yet (one named in ``items`` before it, or, for the first
    items, one of ``open_calls``: the stored conversation ends with those, ``unanswered``
    of them without a result), and every call is answered before another message comes.
    The last calls may wait for results."""
    problem = pairing_problem(items, open_calls, unanswered)
    if problem is not None:
        number, why = problem
        param = f"items[{number}]"
        if items[number]["role"] == "tool":
            param += ".tool_call_id"
        raise InvalidRequest(f"{param} {why}", param=param)


def _item(index: int, value: object) -> dict[str, Any]:
    param = f"items[{index}]"
    if not isinstance(value, dict):
        raise InvalidRequest(f"{param} must be a message object", param=param)
    if value.get("type", "message") != "message":
        raise InvalidRequest(f"{param}.type must be 'message'", param=f"{param}.type")
    role = value.get("role")
    if not isinstance(role, str) or role not in _ROLES:  # a list or object is unhashable
        raise InvalidRequest(
            f"{param}.role must be one of {', '.join(sorted(_ROLES))}", param=f"{param}.role"
        )
    if value.get("function_call") is not None:
        raise InvalidRequest(DEPRECATED_FUNCTIONS, param=f"{param}.function_call")
    content = _content(value.get("content"), f"{param}.content")
    message: dict[str, Any] = {"role": role, "content": content}
    check_stored_strings(value, param)
    for name in _OPTIONAL_FIELDS:
        if value.get(name) is not None:
            message[name] = value[name]
    reasoning = reasoning_content(value)  # as on the chat route (h53)
    if reasoning is not None:
        message["reasoning"] = reasoning
    calls = value.get("tool_calls")
    if calls is not None:
        calls = check_tool_calls(calls, f"{param}.tool_calls")
        if calls:  # an empty array is no calls: servers refuse "tool_calls": []
            message["tool_calls"] = calls
    # What a later chat turn could not send: every chat server wants content, but for an
    # assistant message that calls tools, and a tool result names its call.
    if content is None and not (role == "assistant" and calls):
        raise InvalidRequest(
            f"{param}.content is required (only an assistant message with tool_calls may"
            " leave it null)",
            param=f"{param}.content",
        )
    if role == "tool" and not message.get("tool_call_id"):
        raise InvalidRequest(
            f"{param}.tool_call_id is required for a tool message", param=f"{param}.tool_call_id"
        )
    if role in _SYSTEM_ROLES and isinstance(content, list):
        # Stored as the system prompt, it goes up with every later turn, and OpenAI takes
        # only text in a system or developer message.
        for number, part in enumerate(content):
            if part.get("type") != "text":
                at = f"{param}.content[{number}]"
                raise InvalidRequest(f"{at}: a {role} message takes text parts only", param=at)
    return message


MAX_ITEMS = 1000
"""Items a request may create or append (OpenAI's API takes 20).  They are checked and
answered on the event loop and written in one transaction (on SQLite, holding the write
lock): 110,000 tiny ones, 4 MB, held every other request for 1.5-2 s (h51); 1,000 take
about 5 ms."""


def parse_items(value: object) -> tuple[list[dict[str, Any]] | None, list[dict[str, Any]]]:
    """(system messages or None, the other messages) of an ``items`` array."""
    if value is None:
        return None, []
    if not isinstance(value, list):
        raise InvalidRequest("items must be an array of message objects", param="items")
    if len(value) > MAX_ITEMS:
        raise InvalidRequest(
            f"items must hold at most {MAX_ITEMS} items; append more in several requests",
            param="items",
        )
    checked = [_item(i, item) for i, item in enumerate(value)]
    system = [m for m in checked if m["role"] in _SYSTEM_ROLES]
    return system or None, [m for m in checked if m["role"] not in _SYSTEM_ROLES]


def conversation_json(info: ConversationInfo) -> dict[str, Any]:
    return {
        "id": info.id,
        "object": "conversation",
        "created_at": info.created_at,
        "metadata": info.metadata,
    }


def item_id(seq: int) -> str:
    return f"msg_{seq}"


def item_json(row: dict[str, Any]) -> dict[str, Any]:
    item: dict[str, Any] = {
        "id": item_id(row["seq"]),
        "type": "message",
        "status": "completed",
        "role": row["role"],
        "content": row["content"],
    }
    for name, value in row.items():
        if name not in ("seq", "role", "content") and value is not None:
            item[name] = value
    return item


def list_json(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }


def page_json(page: Page[dict[str, Any]]) -> dict[str, Any]:
    return list_json([item_json(row) for row in page.data], page.has_more)
