"""POST /v1/ask: the older api-server's endpoint, now with durable memory.

Request ``{question, history?, client_id, user_id, stream}``; the answer is the upstream's
``chat.completion`` JSON or its ``chat.completion.chunk`` SSE events, relayed as they are.
The conversation is the caller's (tenant, user) conversation named by
:func:`ask_conversation_id`; ``history``, when given, is sent instead of the stored one.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from aiohttp import web

from ..auth import authenticate
from ..errors import ChatmemError, InvalidRequest, error_response
from ..state import gateway_of
from ..storage import History
from .chat import CONVERSATION_HEADER, Turn, run_turn
from .chat_request import MAX_MESSAGES, ChatRequest, check_message
from .fields import required_str
from .http import json_object, read_body

__all__ = ["ask", "ask_conversation_id"]

_READABLE = re.compile(r"[A-Za-z0-9._-]{1,60}")


def ask_conversation_id(client_id: str, user_id: str) -> str:
    """The conversation id of (client_id, user_id); one-to-one, always a valid id.

    ``ask:<client_id>:<user_id>`` when both are 1-60 characters of ``A-Z a-z 0-9 . _ -``
    (no ``:``, so the pair can be read back), else ``ask-sha256:`` and the SHA-256 of the
    JSON array ``[client_id, user_id]``.
    """
    if _READABLE.fullmatch(client_id) and _READABLE.fullmatch(user_id):
        return f"ask:{client_id}:{user_id}"
    pair = json.dumps([client_id, user_id], ensure_ascii=False).encode()
    return "ask-sha256:" + hashlib.sha256(pair).hexdigest()


def _identifier(body: dict[str, Any], name: str) -> str:
    """A client or user id: a non-empty string, or an integer (taken as its digits)."""
    value = body.get(name)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if value is None:
        raise InvalidRequest(f"{name} is required", param=name)
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"{name} must be a non-empty string or an integer", param=name)
    return value


def _history(value: object) -> History | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise InvalidRequest("history must be an array of message objects", param="history")
    if len(value) > MAX_MESSAGES:  # as a chat request's messages (h53)
        raise InvalidRequest(f"history must hold at most {MAX_MESSAGES} messages", param="history")
    # Sent as it is and never stored: only what a chat server would refuse is checked.
    messages = [check_message(i, m, "history", stored=False) for i, m in enumerate(value)]
    for i, message in enumerate(messages):
        # The older service's history is {role, content} pairs: one without content is a
        # client's mistake to name here, not the upstream's 400 to relay.
        calls = message.get("tool_calls") or message.get("function_call")
        if message.get("content") is None and not calls:
            param = f"history[{i}].content"
            raise InvalidRequest(f"{param} is required", param=param)
    return History.from_messages(None, messages)


async def ask(request: web.Request) -> web.StreamResponse:
    gateway = gateway_of(request)
    headers: dict[str, str] = {}
    try:
        owner = authenticate(request)
        body = json_object(await read_body(request, gateway.config.server.max_body_bytes))
        conversation_id = ask_conversation_id(
            _identifier(body, "client_id"), _identifier(body, "user_id")
        )
        headers[CONVERSATION_HEADER] = conversation_id  # on the 400s below too
        question = required_str(body, "question")
        history = _history(body.get("history"))
        stream = False if body.get("stream") is None else body["stream"]
        if not isinstance(stream, bool):
            raise InvalidRequest("stream must be a boolean", param="stream")
        chat = ChatRequest(
            body={"model": gateway.config.compat.ask_model, "stream": stream},
            conversation_id=conversation_id,
            system=None,
            messages=[{"role": "user", "content": question}],
            stream=stream,
        )
        turn = Turn(owner, chat, history=history, upstream_auth_is_ours=True, chunks_only=True)
        return await run_turn(request, turn, headers)
    except ChatmemError as exc:
        return error_response(exc, headers)
