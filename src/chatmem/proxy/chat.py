"""Chat turns with memory: load history, forward, tee, commit (/v1/chat/completions and
the older services' endpoints all run through :func:`run_turn`)."""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from .. import jsonio
from ..auth import authenticate
from ..errors import (
    ChatmemError,
    InvalidRequest,
    UpstreamAuthFailed,
    UpstreamError,
    UpstreamTimeout,
    error_response,
)
from ..logs import log_content
from ..state import Gateway, gateway_of
from ..storage import History, Owner
from .accumulate import (
    FAILED_FINISH,
    AssistantTurn,
    failed_finish_message,
    sendable_calls,
    turn_from_completion,
)
from .chat_request import (
    ChatRequest,
    named_conversation,
    new_conversation_id,
    parse_chat_request,
    reasoning_content,
    valid_conversation_id,
)
from .http import json_object, read_body, upstream_says
from .passthrough import relay
from .pool import BodyTooLarge, HeadRefused, head_refused
from .redact import mask_bytes, masked_json
from .tee import Renderer, tee_stream
from .upstream import content_encoding, response_headers, shown_coding

__all__ = [
    "CONVERSATION_HEADER",
    "Turn",
    "assistant_message",
    "chat_completions",
    "early_headers",
    "run_turn",
    "upstream_failures",
]

CONVERSATION_HEADER = "X-Conversation-Id"


@dataclass(frozen=True, slots=True)
class Turn:
    """One exchange with memory: what the caller asks, and how the answer comes back.

    ``/v1/chat/completions`` and the older services' endpoints all run through
    :func:`run_turn`, so forwarding, teeing and committing exist once.
    """

    owner: Owner
    chat: ChatRequest
    history: History | None = None
    """The history to send instead of the stored one; None loads the stored history."""
    render: Renderer | None = None
    """How the answer reaches the client; None relays the upstream's bytes unchanged."""
    upstream_auth_is_ours: bool = False
    """The upstream refusing our key (401/403) is our failure: 503, not its status."""
    query: str = ""
    """The client's raw query string, sent upstream with the request."""
    chunks_only: bool = False
    """The stream ends at ``[DONE]`` without passing it on, nor anything after it (the
    older api-server's clients read every event as a JSON chunk, and never got one)."""


def _named_conversation(request: web.Request) -> str | None:
    """The conversation the ``X-Conversation-Id`` header names, if any (400 when it is not
    a valid id, or when several of them disagree)."""
    header_ids = request.headers.getall(CONVERSATION_HEADER, ())
    if not header_ids:
        return None
    if any(other != header_ids[0] for other in header_ids[1:]):
        raise InvalidRequest(
            "X-Conversation-Id headers name different conversations", param=CONVERSATION_HEADER
        )
    return valid_conversation_id(header_ids[0], CONVERSATION_HEADER)


def early_headers(request: web.Request) -> dict[str, str]:
    """``X-Conversation-Id`` for an answer given before the handler runs (an ``Expect``
    refused): the header's conversation, else the id a new one would have had."""
    try:
        named = _named_conversation(request)
    except InvalidRequest:
        named = None
    return {CONVERSATION_HEADER: named or new_conversation_id()}


async def chat_completions(request: web.Request) -> web.StreamResponse:
    gateway = gateway_of(request)
    headers: dict[str, str] = {}
    try:
        header_id = _named_conversation(request)
        if header_id is not None:
            headers[CONVERSATION_HEADER] = header_id
        owner = authenticate(request)
        body = json_object(await read_body(request, gateway.config.server.max_body_bytes))
        conversation_id = named_conversation(body, header_id)
        if conversation_id is not None:
            headers[CONVERSATION_HEADER] = conversation_id
        chat = parse_chat_request(body, conversation_id)
        headers[CONVERSATION_HEADER] = chat.conversation_id
        turn = Turn(owner, chat, query=request.rel_url.raw_query_string)
        return await run_turn(request, turn, headers)
    except ChatmemError as exc:
        if CONVERSATION_HEADER not in headers:
            # Every response names a conversation: before one was known, the id a new
            # conversation would have had (nothing is stored under it).
            headers[CONVERSATION_HEADER] = new_conversation_id()
        return error_response(exc, headers)


async def run_turn(request: web.Request, turn: Turn, headers: dict[str, str]) -> web.StreamResponse:
    """Send ``turn`` upstream with its history, answer the client, commit a completed answer.

    ``headers`` go on every response.  Raises :class:`ChatmemError` for failures before the
    answer started.
    """
    gateway = gateway_of(request)
    if gateway.config.memory.on_client_disconnect == "discard":
        # _read_and_forward's steps, inline: through it, every turn costs one coroutine
        # more, 0.4 % of a plain request's instructions (benchmarks.instructions).
        history = _known_history(gateway, turn)
        if history is None:
            history = await _read_history(gateway, turn)
        return await _forward(request, gateway, turn, history, headers)
    # "finish": a client that leaves must not stop the answer from being committed, so
    # the work runs in its own task that the handler's cancellation cannot reach, from
    # the history's read on: the handler of a client that sent its request and left at
    # once is cancelled at its first wait, which on PostgreSQL is that read.
    return await gateway.live.detached(gateway.detach(_read_and_forward(request, turn, headers)))


def _known_history(gateway: Gateway, turn: Turn) -> History | None:
    """The turn's history when it needs no read: given (``/v1/ask`` with ``history``), or
    a new conversation's (an id the request made up); else None."""
    if turn.history is not None:
        return turn.history
    if turn.chat.named_here:
        return gateway.store.new_conversation(turn.owner, turn.chat.conversation_id)
    return None


def _read_history(gateway: Gateway, turn: Turn) -> Awaitable[History]:
    memory = gateway.config.memory
    return gateway.store.load_history(
        turn.owner,
        turn.chat.conversation_id,
        memory.max_history_messages,
        max_bytes=memory.max_history_bytes,
        start_at_user=memory.start_at_user,
        answering=turn.chat.answering,
    )


async def _read_and_forward(
    request: web.Request, turn: Turn, headers: dict[str, str]
) -> web.StreamResponse:
    """The turn's history (read if need be), then :func:`_forward`."""
    gateway = gateway_of(request)
    history = _known_history(gateway, turn)
    if history is None:
        history = await _read_history(gateway, turn)
    return await _forward(request, gateway, turn, history, headers)


_NOT_FROM_THE_CLIENT = ("accept-encoding", "content-type", "content-encoding")


def assistant_message(turn: AssistantTurn) -> dict[str, Any]:
    """The message to store.  Its ``content`` is never null without tool calls: OpenAI
    refuses such a message in a later request's history.  A refusal (which has no column
    of its own) is what the assistant said, also next to a content of "" (some servers
    send both); an answer with neither (reasoning only, cut off by ``length``) said "".
    Its tool calls are :func:`sendable_calls`."""
    content = turn.content
    calls = sendable_calls(turn.tool_calls, turn.finish_reason)
    if not content and calls is None:
        content = turn.refusal or ""
    return {
        "role": "assistant",
        "content": content,
        "tool_calls": calls,
        "reasoning": turn.reasoning,
        # The upstream's words, cut to their columns: an answer is not lost to a long name.
        "model": turn.model[:255] if turn.model is not None else None,
        "finish_reason": turn.finish_reason[:64] if turn.finish_reason is not None else None,
        "usage": turn.usage,
    }


def _as_stored(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The request's messages as they are stored: a ``reasoning_content`` (DeepSeek's and
    vLLM's name) as ``reasoning``, as an answer's is, and no empty ``tool_calls`` (OpenAI
    refuses ``[]`` in a later request, and it made no call); and an assistant's message
    whose null content a field the store has no place for stood in for (OpenAI's
    ``refusal``, or ``audio: {"id"}`` naming an earlier audio answer) as an answer's is
    (:func:`assistant_message`): its refusal, else "", since without that field OpenAI
    refuses null in a later request's history.  They go upstream as they came."""
    for m in messages:
        if (
            "reasoning_content" in m
            or m.get("tool_calls") == []
            or (m.get("content") is None and _stands_in(m))  # no call for a usual message
        ):
            break
    else:
        return messages  # the usual turn: nothing to copy
    stored = []
    for m in messages:
        reasoning = reasoning_content(m)
        if reasoning is not None:
            m = {**m, "reasoning": reasoning}
        if m.get("tool_calls") == []:
            m = {k: v for k, v in m.items() if k != "tool_calls"}
        if _stands_in(m):
            refusal = m.get("refusal")
            m = {**m, "content": refusal if isinstance(refusal, str) else ""}
        stored.append(m)
    return stored


def _stands_in(message: dict[str, Any]) -> bool:
    """An assistant's message whose ``refusal`` or ``audio`` stands in for its content."""
    return (
        message.get("content") is None
        and message["role"] == "assistant"
        and ("refusal" in message or "audio" in message)
        and not message.get("tool_calls")
    )


async def _forward(
    request: web.Request,
    gateway: Gateway,
    turn: Turn,
    history: History,
    headers: dict[str, str],
) -> web.StreamResponse:
    upstream = gateway.upstream
    chat = turn.chat
    # The body goes up re-encoded as plain JSON (aiohttp decoded a compressed one).
    out = upstream.request_headers(request.headers, drop=_NOT_FROM_THE_CLIENT)
    out["Content-Type"] = "application/json"
    out["Accept-Encoding"] = "identity"
    finish_without_client = gateway.config.memory.on_client_disconnect == "finish"

    async def commit(answer: AssistantTurn) -> None:
        # The upstream may have quoted the key it was sent: not in the store, nor the log.
        message = masked_json(assistant_message(answer), upstream.secret)
        # Under way once this returns, and not stopped by a handler that is cancelled
        # meanwhile (that only stops the waiting): the turn is never left half-decided,
        # and the metrics hear how it went from the store, waited for or not.
        await gateway.store.commit_turn_soon(
            turn.owner,
            chat.conversation_id,
            system=chat.system,
            turn=[*_as_stored(chat.messages), message],
            # Other requests in flight: let turns that finish together commit together.
            together=len(gateway.live.tasks) > 1,
            after=history.read_at,
            decided=gateway.metrics.commit_counter(turn.owner.tenant, answer.usage),
        )
        log_content(gateway.config.log.debug_content, "turn committed", message.get("content"))

    log_content(gateway.config.log.debug_content, "messages", chat.messages)
    timer = gateway.metrics.upstream_timer("chat")
    max_answer = gateway.config.upstream.max_answer_bytes
    with upstream_failures():
        sent = chat.upstream_body(history)
        response = await upstream.post("/chat/completions", out, sent, turn.query)
        async with response:
            timer.answered()
            if response.status in (401, 403) and turn.upstream_auth_is_ours:
                raise UpstreamAuthFailed(
                    "the upstream refused the gateway's credentials (see upstream.api_key)"
                )
            if 300 <= response.status < 400:
                # Relayed, it would send the client past the gateway (and its memory) to
                # an address of the upstream's side.
                raise UpstreamError(
                    f"the upstream answered with a redirect ({response.status}),"
                    " which the gateway does not follow"
                )
            if response.status not in _ANSWERS:
                return await relay(request, response, headers, secret=upstream.secret)
            encoding = content_encoding(response.headers)
            if encoding != "identity":
                # It was asked for identity: an answer it encoded anyway cannot be read
                # into the turn, nor relayed byte for byte with an error event in it.
                raise UpstreamError(
                    f"the upstream answered with Content-Encoding {shown_coding(encoding)}"
                    " although the gateway asks for identity"
                )
            reply_headers = response_headers(response.headers, ("content-length",), upstream.secret)
            reply_headers.update(headers)
            if turn.render is not None:
                reply_headers["Content-Type"] = turn.render.content_type
            # An event stream, or what a client that asked for one takes for one: the
            # SDKs parse by the request's "stream", so an SSE body without its content
            # type (Starlette's StreamingResponse without a media_type) works for them.
            # Any other type (a login page's text/html) is read whole, as JSON is.
            kind = response.content_type
            if kind == "text/event-stream" or (chat.stream and kind in _UNTYPED_STREAMS):
                with gateway.live.stream(response):
                    return await tee_stream(
                        request,
                        response,
                        reply_headers,
                        commit,
                        finish_without_client=finish_without_client,
                        render=turn.render,
                        chunks_only=turn.chunks_only,
                        max_bytes=max_answer,
                        on_first_chunk=timer.first_chunk,
                        secret=upstream.secret,
                    )
            try:
                body = await response.read(max_answer)
            except BodyTooLarge:
                raise UpstreamError(
                    "the upstream's answer is larger than upstream.max_answer_bytes"
                    f" ({max_answer})",
                    code="upstream_answer_too_large",
                ) from None
            answer = _completed_turn(body)
            if answer is None:
                raise UpstreamError(_not_an_answer(body, upstream.secret))
            if answer.finish_reason in FAILED_FINISH:
                raise UpstreamError(failed_finish_message(answer.finish_reason))
            await commit(answer)
            if turn.render is not None:  # asked to stream, the upstream answered at once
                body = jsonio.utf8(answer.content or "")
            body = mask_bytes(body, upstream.secret)
            return web.Response(status=response.status, body=body, headers=reply_headers)


_UNTYPED_STREAMS = frozenset({"application/octet-stream", "text/plain"})
"""Content types an event stream comes with from a server that does not name it (none:
aiohttp reads that as ``application/octet-stream``; or plain text), relayed as one when
the client asked for a stream.  With another type (a proxy's or a login page's
``text/html``) the 200 is read whole: it is a chat completion or a 502, never the
client's 200 with an error event in that type."""


_ANSWERS = frozenset({200, 201, 203})
"""Statuses of an answer, read into the turn (and its status passed on); any other is
relayed as it is and remembers nothing.  Not 202 (Accepted: not answered yet), 204 and
205 (no body)."""


def _completed_turn(body: bytes) -> AssistantTurn | None:
    try:
        # Read for the turn only: the client gets the body as it came.
        parsed = jsonio.loads(body, lone_surrogates="keep", exact_integers=False)
    except (UnicodeDecodeError, ValueError, RecursionError):  # nested too deep
        return None
    turn = turn_from_completion(parsed) if isinstance(parsed, dict) else None
    return turn if turn is not None and turn.finish_reason is not None else None


def _not_an_answer(body: bytes, secret: bytes | None) -> str:
    """Why a 2xx body is no finished chat completion, for the client's 502: the upstream's
    own message when it sent an error with a 200, as some servers do (key masked)."""
    try:
        parsed = jsonio.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError):
        parsed = None
    said = None
    if isinstance(parsed, dict):
        # vLLM's errors are the object itself: {"object": "error", "message": ...}
        error = parsed if parsed.get("object") == "error" else parsed.get("error")
        said = upstream_says(error, secret)
    if said is None:
        return "the upstream answered with an invalid chat completion"
    return f"the upstream answered with an error: {said}"


class upstream_failures:  # lower case, like contextlib.suppress
    """``with upstream_failures():`` turns the client library's failures before a response
    started into 502 / 504.

    A class, not a ``contextlib`` generator: every request goes through one, and a
    generator-based context manager costs a generator, its frame and three calls more.
    """

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if isinstance(exc, TimeoutError):  # before ClientError: aiohttp's timeouts are both
            raise UpstreamTimeout("the upstream did not answer in time") from exc
        if isinstance(exc, aiohttp.ClientResponseError) and isinstance(
            exc.__cause__, HttpProcessingError
        ):  # the passthrough's aiohttp could not parse the head (never quoted: the key?)
            raise UpstreamError(head_refused(None)) from exc
        if isinstance(exc, HeadRefused):  # the same from the pool
            raise UpstreamError(str(exc)) from exc
        if isinstance(exc, aiohttp.ClientError):
            raise UpstreamError("the upstream is unreachable or broke the connection") from exc
