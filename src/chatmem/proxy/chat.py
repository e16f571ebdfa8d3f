"""POST /v1/chat/completions with memory: load history, forward, tee, commit."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from aiohttp import web

from ..auth import authenticate
from ..errors import ChatmemError, UpstreamError, UpstreamTimeout, error_response
from ..state import GATEWAY, Gateway
from ..storage import History, Owner
from .accumulate import AssistantTurn, turn_from_completion
from .chat_request import ChatRequest, parse_chat_request, valid_conversation_id
from .http import read_body
from .passthrough import relay
from .tee import tee_stream
from .upstream import filter_headers

__all__ = ["CONVERSATION_HEADER", "assistant_message", "chat_completions", "upstream_failures"]

CONVERSATION_HEADER = "X-Conversation-Id"


async def chat_completions(request: web.Request) -> web.StreamResponse:
    gateway = request.config_dict[GATEWAY]
    headers: dict[str, str] = {}
    try:
        owner = authenticate(request)
        header_id = request.headers.get(CONVERSATION_HEADER)
        if header_id is not None:
            headers[CONVERSATION_HEADER] = valid_conversation_id(header_id, CONVERSATION_HEADER)
        raw = await read_body(request, gateway.config.server.max_body_bytes)
        chat = parse_chat_request(raw, header_id)
        headers[CONVERSATION_HEADER] = chat.conversation_id
        history = await gateway.store.load_history(
            owner, chat.conversation_id, gateway.config.memory.max_history_messages
        )
        forwarding = _forward(request, gateway, owner, chat, history, headers)
        if gateway.config.memory.on_client_disconnect == "discard":
            return await forwarding
        # "finish": a client that leaves must not stop the answer from being committed,
        # so the work runs in its own task that the handler's cancellation cannot reach.
        return await asyncio.shield(gateway.detach(forwarding))
    except ChatmemError as exc:
        return error_response(exc, headers)


def assistant_message(turn: AssistantTurn) -> dict[str, Any]:
    return {
        "role": "assistant",
        "content": turn.content,
        "tool_calls": turn.tool_calls,
        "reasoning": turn.reasoning,
        "model": turn.model,
        "finish_reason": turn.finish_reason,
        "usage": turn.usage,
    }


async def _forward(
    request: web.Request,
    gateway: Gateway,
    owner: Owner,
    chat: ChatRequest,
    history: History,
    headers: dict[str, str],
) -> web.StreamResponse:
    upstream = gateway.upstream
    out = upstream.request_headers(request.headers, drop=("accept-encoding", "content-type"))
    out["Content-Type"] = "application/json"
    out["Accept-Encoding"] = "identity"

    async def commit(turn: AssistantTurn) -> None:
        # Shielded: a cancelled handler must not leave the turn half-decided.
        await asyncio.shield(
            gateway.store.commit_turn(
                owner,
                chat.conversation_id,
                system=chat.system,
                turn=[*chat.messages, assistant_message(turn)],
            )
        )

    async with (
        upstream_failures(),
        upstream.session.post(
            upstream.url_for("/chat/completions"),
            data=chat.upstream_body(history),
            headers=out,
            timeout=upstream.timeout,
        ) as response,
    ):
        if response.status != 200:
            return await relay(request, response, headers)
        reply_headers = filter_headers(response.headers, ("content-length",))
        reply_headers.update(headers)
        if response.content_type == "text/event-stream":
            return await tee_stream(
                request,
                response,
                reply_headers,
                commit,
                finish_without_client=gateway.config.memory.on_client_disconnect == "finish",
            )
        body = await response.read()
        turn = _completed_turn(body)
        if turn is None:
            raise UpstreamError("the upstream answered with an invalid chat completion")
        await commit(turn)
        return web.Response(status=200, body=body, headers=reply_headers)


def _completed_turn(body: bytes) -> AssistantTurn | None:
    try:
        parsed = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        return None
    turn = turn_from_completion(parsed) if isinstance(parsed, dict) else None
    return turn if turn is not None and turn.finish_reason is not None else None


@asynccontextmanager
async def upstream_failures() -> AsyncIterator[None]:
    """Turn the client library's failures before a response started into 502 / 504."""
    try:
        yield
    except TimeoutError as exc:  # before ClientError: aiohttp's timeouts are both
        raise UpstreamTimeout("the upstream did not answer in time") from exc
    except aiohttp.ClientError as exc:
        raise UpstreamError("the upstream is unreachable or broke the connection") from exc
