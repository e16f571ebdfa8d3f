"""Reading a /v1/chat/completions request: the conversation id and the messages."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Any

from .. import jsonio
from ..errors import InvalidRequest
from ..storage import RESULT_ROLES, History

__all__ = [
    "DEPRECATED_FUNCTIONS",
    "MAX_MESSAGES",
    "ChatRequest",
    "check_message",
    "named_conversation",
    "new_conversation_id",
    "parse_chat_request",
    "reasoning_content",
    "valid_conversation_id",
]

# Not "." or "..": in a URL path (/v1/conversations/{id}) those are dot segments, which
# clients (the OpenAI SDK refuses them) and proxies resolve away.
_ID = re.compile(r"(?!\.\.?\Z)[A-Za-z0-9._:-]{1,128}")
_SYSTEM_ROLES = frozenset({"system", "developer"})
_ROLES = _SYSTEM_ROLES | {"user", "assistant", "tool", "function"}
MAX_MESSAGES = 2048
"""Messages in one chat request.  Each is checked, sent and stored on the event loop
(on SQLite, in a transaction that holds the write lock): 100,000 tiny ones, 4 MB, held
every other request for 0.37 s (h51); 2,048 for about 8 ms."""
_MAY_BE_EMPTY = frozenset({"assistant", "function"})
"""Roles whose ``content`` OpenAI's API takes as null: an assistant's calling tools, and
an older history's function result (its type says ``content: Optional[str]``)."""


def new_conversation_id() -> str:
    return "conv_" + secrets.token_hex(16)


def valid_conversation_id(value: object, param: str) -> str:
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise InvalidRequest(
            'conversation id must be 1-128 characters of A-Z a-z 0-9 . _ : - (and not "." or "..")',
            param=param,
        )
    return value


@dataclass(frozen=True, slots=True)
class ChatRequest:
    body: dict[str, Any]
    """The client's body without ``conversation``; everything else goes upstream as is."""
    conversation_id: str
    system: list[dict[str, Any]] | None
    """The request's system/developer messages; ``None`` when it has none."""
    messages: list[dict[str, Any]]
    """The request's other messages, in order: the start of the turn to remember."""
    stream: bool
    named_here: bool = False
    """The request named no conversation and the gateway chose ``conversation_id``:
    nothing can be stored under it yet, so there is no history to read."""

    @property
    def answering(self) -> bool:
        """The new messages start with tool (or function) results: they answer a call
        that is stored, which the history must then hold."""
        return bool(self.messages) and self.messages[0]["role"] in RESULT_ROLES

    def upstream_body(self, history: History) -> bytes:
        """The client's body with ``messages`` = the system prompt (the request's, else the
        stored one), the stored history, then the request's messages.

        Spliced together as bytes: the history is already JSON (``History.encoded``), and
        decoding and encoding it again on every request made a request's cost grow with
        the window (up to ``memory.max_history_messages`` messages).
        """
        system = self.system if self.system is not None else (history.system or [])
        pieces = (
            jsonio.dumps_elements(system),
            history.encoded,
            jsonio.dumps_elements(self.messages),
        )
        messages = b",".join(piece for piece in pieces if piece)
        rest = jsonio.dumps({k: v for k, v in self.body.items() if k != "messages"})
        head = b"{" if rest == b"{}" else rest[:-1] + b","  # rest ends with "}"
        return b"".join((head, b'"messages":[', messages, b"]}"))


def _conversation_from_body(value: object) -> str:
    if isinstance(value, dict):
        return valid_conversation_id(value.get("id"), "conversation.id")
    return valid_conversation_id(value, "conversation")


STORED_STRINGS: dict[str, int | None] = {
    "name": 255,
    "tool_call_id": 255,
    "model": 255,
    "finish_reason": 64,
    "reasoning": None,
    "reasoning_content": None,  # DeepSeek's and vLLM's name, stored as reasoning
}
"""Message fields stored in string columns, and their sizes (None: unlimited text)."""


_IDENTIFIERS = ("name", "tool_call_id")
"""Stored strings that pair messages up: they cannot be made storable by replacing a
character, as other text is on PostgreSQL (see ``storage.postgres_turns``)."""


def reasoning_content(message: dict[str, Any]) -> str | None:
    """A client message's ``reasoning_content`` (DeepSeek's and vLLM's name) to store as
    its ``reasoning``, as an answer's is: when it is text and ``reasoning`` is not set."""
    value = message.get("reasoning_content")
    return value if isinstance(value, str) and message.get("reasoning") is None else None


def check_stored_strings(message: dict[str, Any], param: str) -> None:
    """400 for a field the store could not take: not a string, longer than its column, or
    an identifier holding a NUL character, which PostgreSQL's text columns refuse (the
    model would have answered, at a cost, before the commit failed)."""
    for name, limit in STORED_STRINGS.items():
        value = message.get(name)
        if value is None:
            continue
        if not isinstance(value, str) or (limit is not None and len(value) > limit):
            size = f" of at most {limit} characters" if limit is not None else ""
            raise InvalidRequest(f"{param}.{name} must be a string{size}", param=f"{param}.{name}")
        if name in _IDENTIFIERS and "\x00" in value:
            raise InvalidRequest(
                f"{param}.{name} must not contain NUL characters", param=f"{param}.{name}"
            )


DEPRECATED_FUNCTIONS = (
    "the deprecated functions/function_call API is not supported: chatmem could not store"
    " a function_call with the conversation, and every later turn would send a broken"
    " history; send tools, and tool_calls"
)
"""OpenAI replaced it with tools in 2023; the role "function" alone (a result) is still
taken, as older histories hold it."""


def check_message(
    index: int, message: object, field: str = "messages", *, stored: bool = True
) -> dict[str, Any]:
    """``message`` if it is one a chat server takes; with ``stored``, also one the store
    can keep as it is (or a 400 naming the field)."""
    param = f"{field}[{index}]"
    if not isinstance(message, dict):
        raise InvalidRequest(f"{param} must be an object", param=param)
    role = message.get("role")
    if not isinstance(role, str) or role not in _ROLES:  # a list or object is unhashable
        raise InvalidRequest(
            f"{param}.role must be one of {', '.join(sorted(_ROLES))}", param=f"{param}.role"
        )
    if stored:
        if message.get("function_call") is not None:
            raise InvalidRequest(DEPRECATED_FUNCTIONS, param=f"{param}.function_call")
        check_stored_strings(message, param)
        if role == "tool" or message.get("tool_calls") is not None:
            check_pairing(message, param)
    content = message.get("content")
    if isinstance(content, str):
        return message
    if content is None:
        if stored and role not in _MAY_BE_EMPTY:
            # Every chat server wants it; stored, it would go up with every later turn.
            raise InvalidRequest(
                f"{param}.content is required (only an assistant message, or an older"
                " history's function result, may leave it null)",
                param=f"{param}.content",
            )
    elif not isinstance(content, list):
        raise InvalidRequest(
            f"{param}.content must be a string, an array of parts or null",
            param=f"{param}.content",
        )
    elif stored:
        check_parts(content, f"{param}.content")
    return message


def check_parts(content: list[Any], param: str) -> None:
    """A list ``content`` is a non-empty array of parts: objects with a string ``type``."""
    if not content:
        raise InvalidRequest(f"{param} must not be an empty array", param=param)
    for number, part in enumerate(content):
        at = f"{param}[{number}]"
        if not isinstance(part, dict):
            raise InvalidRequest(f"{at} must be a content part (an object)", param=at)
        if not isinstance(part.get("type"), str):
            raise InvalidRequest(f"{at}.type must be a string", param=f"{at}.type")


def check_pairing(message: dict[str, Any], param: str) -> None:
    """The fields that pair a tool result with its call, as the store reads them (the
    history's orphaned results, deleting a call with its results): an assistant's
    ``tool_calls`` as OpenAI defines them, and a tool result's ``tool_call_id``."""
    calls = message.get("tool_calls")
    if calls is not None:
        check_tool_calls(calls, f"{param}.tool_calls")
    if message["role"] == "tool" and not message.get("tool_call_id"):
        raise InvalidRequest(
            f"{param}.tool_call_id is required for a tool message", param=f"{param}.tool_call_id"
        )


def check_tool_calls(calls: object, param: str) -> list[dict[str, Any]]:
    """OpenAI's tool calls: each with a string ``id``, and either ``type`` "function" and
    a ``function`` of string ``name`` and ``arguments``, or ``type`` "custom" (a
    free-form tool's) and a ``custom`` of string ``name`` and ``input``."""
    if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
        raise InvalidRequest(f"{param} must be an array of objects", param=param)
    for number, call in enumerate(calls):
        at = f"{param}[{number}]"
        if not isinstance(call.get("id"), str) or not call["id"]:
            raise InvalidRequest(f"{at}.id must be a non-empty string", param=f"{at}.id")
        kind = call.get("type", "function")
        if kind not in ("function", "custom"):
            raise InvalidRequest(f"{at}.type must be 'function' or 'custom'", param=f"{at}.type")
        value = "arguments" if kind == "function" else "input"
        body = call.get(kind)
        if not (
            isinstance(body, dict)
            and isinstance(body.get("name"), str)
            and isinstance(body.get(value), str)
        ):
            raise InvalidRequest(
                f"{at}.{kind} must have a string name and string {value}",
                param=f"{at}.{kind}",
            )
    return calls


def named_conversation(body: dict[str, Any], header_id: str | None) -> str | None:
    """The conversation the request names: its body's ``conversation`` field, which is
    removed (null too: not named), else ``header_id``, the (already valid) header value;
    400 when the field is not a valid id or names another conversation than the header.

    A step of its own, before the rest of the body is checked: a request that named its
    conversation and fails later is answered under that id, not a fresh one."""
    named = body.pop("conversation", None)
    if named is None:
        return header_id
    from_body = _conversation_from_body(named)
    if header_id is not None and header_id != from_body:
        raise InvalidRequest(
            "X-Conversation-Id header and body field conversation name different conversations",
            param="conversation",
        )
    return from_body


def parse_chat_request(body: dict[str, Any], conversation_id: str | None) -> ChatRequest:
    """Check the body (its ``conversation`` taken out by :func:`named_conversation`, which
    gave ``conversation_id``)."""
    for deprecated in ("functions", "function_call"):
        if body.get(deprecated) is not None:
            raise InvalidRequest(DEPRECATED_FUNCTIONS, param=deprecated)
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise InvalidRequest("messages must be an array of message objects", param="messages")
    if len(messages) > MAX_MESSAGES:
        raise InvalidRequest(
            f"messages must hold at most {MAX_MESSAGES} messages (the conversation's are"
            " stored: send the new ones)",
            param="messages",
        )
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise InvalidRequest("stream must be a boolean", param="stream")
    checked = [check_message(i, m) for i, m in enumerate(messages)]
    system = [m for m in checked if m["role"] in _SYSTEM_ROLES]
    return ChatRequest(
        body=body,
        conversation_id=conversation_id or new_conversation_id(),
        system=system or None,
        messages=[m for m in checked if m["role"] not in _SYSTEM_ROLES],
        stream=stream,
        named_here=conversation_id is None,
    )
