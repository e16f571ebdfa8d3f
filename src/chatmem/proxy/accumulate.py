"""Rebuild the assistant's message from OpenAI ``chat.completion.chunk`` deltas, pure and I/O free.

Upstream servers differ in the details, so every piece is checked before use and a piece of
the wrong type is skipped: :meth:`StreamAccumulator.add` never raises, whatever it is given.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any

import orjson

from .. import jsonio

__all__ = [
    "FAILED_FINISH",
    "AssistantTurn",
    "StreamAccumulator",
    "failed_finish_message",
    "sendable_calls",
    "turn_from_completion",
]

FAILED_FINISH = frozenset({"abort", "error", "function_call"})
"""Finish reasons of an answer that did not complete: vLLM ends a request its engine
aborted (shutdown, sleep, scale-down) with ``abort`` and then ``[DONE]``; some servers
use ``error``.  And one that cannot be stored: ``function_call``, the deprecated
functions API's call, which has no place in the store (a client's is refused with a
400); stored without it, the turn was a history servers refuse on every later turn."""


def failed_finish_message(reason: str) -> str:
    """What the client is told of an answer that ended with one of :data:`FAILED_FINISH`."""
    said = f"the upstream ended the answer with finish_reason {reason!r}"
    if reason == "function_call":
        return (
            f"{said}, a call of the deprecated functions API, which chatmem cannot store"
            " with the conversation; it was not saved (send tools, for tool_calls)"
        )
    return f"{said}; it was not saved"


@dataclass(frozen=True, slots=True)
class AssistantTurn:
    """One assistant message, from a stream or from a non-streaming completion."""

    content: str | None
    reasoning: str | None
    tool_calls: list[dict[str, Any]] | None
    finish_reason: str | None
    model: str | None
    usage: dict[str, Any] | None
    refusal: str | None = None


_PIECES = 256
"""Content and reasoning pieces that are joined into one string once they are this many.

A streamed token is a string of a few characters with about 50 bytes of object around
it: a 30,000-token answer held 2 MB of pieces for 0.2 MB of text, for every stream in
flight (and a stalled client keeps its stream in flight).  Joined 256 at a time they
cost about the text, and each character is copied once more, not again and again."""


class StreamAccumulator:
    """Feed it every SSE data payload of a streamed chat completion, in order.

    ``keep_pieces``: :meth:`content_parts` gives the content as it arrived, piece by
    piece (a renderer that shows what each read added needs that); otherwise pieces are
    joined as they pile up (see ``_PIECES``).
    """

    def __init__(self, *, keep_pieces: bool = False) -> None:
        self.keep_pieces = keep_pieces
        self.done = False
        self.error: dict[str, Any] | None = None
        self.malformed = False
        self._model: str | None = None
        self._usage: dict[str, Any] | None = None
        self._choices: dict[int, _Choice] = {}

    def add(self, data: str) -> None:
        """Take one SSE data payload: ``[DONE]``, a chunk, or an error object."""
        if data[:1] != "{" and data.strip() == "[DONE]":  # a chunk is an object: no strip
            self.done = True
            return
        try:
            chunk = orjson.loads(data)  # what jsonio.loads tries first, one call less a token
        except orjson.JSONDecodeError:
            try:
                # A surrogate pair may come as two halves in two chunks: kept for the
                # commit, which makes the joined text whole (jsonio.dumps).
                chunk = jsonio.loads(data, lone_surrogates="keep")
            except (ValueError, RecursionError):
                # An event with empty data carries nothing, as a keep-alive (a comment).
                self.malformed = self.malformed or bool(data.strip())
                return
        if not isinstance(chunk, dict):
            self.malformed = True
        elif chunk.get("error") is not None:
            error = chunk["error"]
            self.error = error if isinstance(error, dict) else {"message": str(error)}
        else:
            self._add_chunk(chunk)

    def turn(self, index: int = 0) -> AssistantTurn | None:
        """The message accumulated for choice ``index``; None if that choice never appeared."""
        choice = self._choices.get(index)
        if choice is None:
            return None
        return choice.to_turn(self._model, self._usage)

    def content_parts(self, index: int = 0) -> list[str]:
        """The content pieces of choice ``index`` so far, in order (do not modify the list);
        all of them only with ``keep_pieces``."""
        choice = self._choices.get(index)
        return choice.content or [] if choice is not None else []

    def refusal_parts(self, index: int = 0) -> list[str]:
        """The refusal pieces of choice ``index`` so far, in order (do not modify the list)."""
        choice = self._choices.get(index)
        return choice.refusal or [] if choice is not None else []

    @property
    def completed(self) -> bool:
        """True when the stream ended cleanly: [DONE], and :attr:`finished`."""
        return self.done and self.finished

    @property
    def finished(self) -> bool:
        """True when choice 0 finished (not with one of :data:`FAILED_FINISH`), with no
        error and nothing malformed so far."""
        choice = self._choices.get(0)
        return (
            self.error is None
            and not self.malformed
            and choice is not None
            and choice.finish_reason is not None
            and choice.finish_reason not in FAILED_FINISH
        )

    @property
    def failed_finish(self) -> str | None:
        """Choice 0's finish reason if it is one of :data:`FAILED_FINISH`."""
        choice = self._choices.get(0)
        reason = choice.finish_reason if choice is not None else None
        return reason if reason in FAILED_FINISH else None

    def _add_chunk(self, chunk: dict[str, Any]) -> None:
        if self._model is None:
            model = chunk.get("model")
            if isinstance(model, str) and model:
                self._model = model
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self._usage = usage
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            return
        for position, raw in enumerate(choices):
            if not isinstance(raw, dict):
                continue
            index = _index_of(raw, position)
            if index is None:
                continue
            choice = self._choices.get(index)
            if choice is None:
                choice = self._choices[index] = _Choice(join_pieces=not self.keep_pieces)
            choice.add(raw)


@dataclass(slots=True)
class _Choice:
    join_pieces: bool = True
    content: list[str] | None = None
    """The newest content pieces (all of them with ``join_pieces`` off)."""
    content_before: list[str] = field(default_factory=list)
    """The content before those, in strings of ``_PIECES`` pieces joined."""
    reasoning_before: list[str] = field(default_factory=list)
    reasoning: list[str] | None = None
    refusal: list[str] | None = None
    finish_reason: str | None = None
    tool_calls: dict[int, _ToolCall] = field(default_factory=dict)
    """The call each index is on."""
    earlier_calls: list[tuple[int, _ToolCall]] = field(default_factory=list)
    """Calls an index has moved on from: servers that number every whole call 0 (Ollama),
    or give no index, so that each is at position 0 of its delta."""

    def add(self, choice: dict[str, Any]) -> None:
        finish_reason = choice.get("finish_reason")
        if isinstance(finish_reason, str) and finish_reason:
            self.finish_reason = finish_reason
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            return
        content = delta.get("content")
        if isinstance(content, list):  # content parts, as a few servers stream them
            content = _text_of_parts(content)
        if isinstance(content, str):  # once per token: no helper calls on this path
            if self.content is None:
                self.content = [content]
            else:
                self.content.append(content)
                if len(self.content) == _PIECES and self.join_pieces:
                    _fold(self.content, self.content_before)
        if len(delta) == 1 and content is not None:
            return  # a token: nothing but content (the usual delta)
        if "reasoning" in delta or "reasoning_content" in delta:
            self.reasoning = _append(self.reasoning, _reasoning_of(delta))
            if self.reasoning is not None and len(self.reasoning) == _PIECES:
                _fold(self.reasoning, self.reasoning_before)  # never shown piece by piece
        if "refusal" in delta:
            self.refusal = _append(self.refusal, delta.get("refusal"))
        if "tool_calls" not in delta:
            return
        tool_calls = delta.get("tool_calls")
        if isinstance(tool_calls, dict):  # TGI before 3.2 streamed its one call bare
            tool_calls = [tool_calls]
        elif not isinstance(tool_calls, list):
            return
        for position, raw in enumerate(tool_calls):
            if not isinstance(raw, dict):
                continue
            index = _index_of(raw, position)
            if index is None:
                continue
            call = self.tool_calls.get(index)
            if call is None:
                call = self.tool_calls[index] = _ToolCall()
            elif call.followed_by_another(raw):
                self.earlier_calls.append((index, call))
                call = self.tool_calls[index] = _ToolCall()
            call.add(raw)

    def to_turn(self, model: str | None, usage: dict[str, Any] | None) -> AssistantTurn:
        # By index; at one index, in the order the calls came (sorted() keeps it).
        numbered = sorted([*self.earlier_calls, *self.tool_calls.items()], key=_by_index)
        calls = [call.to_dict() for _, call in numbered]
        return AssistantTurn(
            content=_joined(self.content, self.content_before),
            reasoning=_joined(self.reasoning, self.reasoning_before),
            tool_calls=calls or None,
            finish_reason=self.finish_reason,
            model=model,
            usage=usage,
            refusal=_joined(self.refusal),
        )


@dataclass(slots=True)
class _ToolCall:
    id: str | None = None
    type: str | None = None
    name: str | None = None
    arguments: list[str] = field(default_factory=list)
    """The arguments' pieces; of a ``custom`` call (OpenAI's free-form tools), its input's."""

    def add(self, delta: dict[str, Any]) -> None:
        call_id = delta.get("id")
        if self.id is None and isinstance(call_id, str) and call_id:
            self.id = call_id
        call_type = delta.get("type")
        if self.type is None and isinstance(call_type, str) and call_type:
            self.type = call_type
        function = delta.get("function")
        if not isinstance(function, dict):
            function = delta.get("custom")
            if not isinstance(function, dict):
                return
            self.type = "custom"
            function = {"name": function.get("name"), "arguments": function.get("input")}
        name = function.get("name")
        # Some servers repeat the whole name in every delta, some send "": ignore both.
        # A different name is taken as the next fragment of a name streamed in pieces.
        if isinstance(name, str) and name and name != self.name:
            self.name = name if self.name is None else self.name + name
        arguments = function.get("arguments")
        if isinstance(arguments, dict | list) and self.type != "custom":
            # A few servers send the object itself, whole, as in a plain answer (where it
            # is taken the same way, ``_tool_calls_of``): dropped, it was stored as "".
            arguments = json.dumps(arguments)
        if isinstance(arguments, str):
            self.arguments.append(arguments)

    def followed_by_another(self, delta: dict[str, Any]) -> bool:
        """Whether ``delta``, at this call's index, starts the next call: it has an id of
        its own and a name, and this call's arguments are already a whole JSON value.

        A server that sends every call whole with index 0 (or none) looks like that; one
        that repeats a fresh id with every fragment of one call does not, as long as the
        arguments so far are unfinished.
        """
        call_id = delta.get("id")
        if not isinstance(call_id, str) or not call_id or self.id in (None, call_id):
            return False
        function = delta.get("function")
        if not isinstance(function, dict) or not function.get("name"):
            return False
        try:
            json.loads("".join(self.arguments))
        except ValueError:
            return False
        return True

    def to_dict(self) -> dict[str, Any]:
        if self.type == "custom":
            custom = {"name": self.name, "input": "".join(self.arguments)}
            return {"id": self.id, "type": "custom", "custom": custom}
        return {
            "id": self.id,
            "type": self.type or "function",
            "function": {"name": self.name, "arguments": "".join(self.arguments)},
        }


def turn_from_completion(body: dict[str, Any]) -> AssistantTurn | None:
    """The assistant message of choice 0 of a non-streaming ``chat.completion`` (by its
    ``index``, as in a stream, not by its place in the list); None if badly shaped."""
    choices = body.get("choices") if isinstance(body, dict) else None
    if not isinstance(choices, list) or not choices:
        return None
    choice = choices[0]  # where it nearly always is
    if not isinstance(choice, dict) or _index_of(choice, 0) != 0:
        choice = next(
            (c for n, c in enumerate(choices) if isinstance(c, dict) and _index_of(c, n) == 0),
            None,
        )
        if choice is None:
            return None
    message = choice.get("message")
    if not isinstance(message, dict):
        return None
    model = body.get("model")
    usage = body.get("usage")
    finish_reason = choice.get("finish_reason")
    return AssistantTurn(
        content=_content_of(message.get("content")),
        reasoning=_reasoning_of(message),
        tool_calls=_tool_calls_of(message.get("tool_calls")),
        finish_reason=finish_reason if isinstance(finish_reason, str) and finish_reason else None,
        model=model if isinstance(model, str) and model else None,
        usage=usage if isinstance(usage, dict) else None,
        refusal=_str_or_none(message.get("refusal")),
    )


def _tool_calls_of(value: object) -> list[dict[str, Any]] | None:
    if isinstance(value, dict):  # one call, bare, as TGI before 3.2 streamed it
        value = [value]
    if not isinstance(value, list):
        return None
    calls: list[dict[str, Any]] = []
    for raw in value:
        if not isinstance(raw, dict):
            continue
        custom = raw.get("custom")
        if raw.get("type") == "custom" and isinstance(custom, dict):  # a free-form tool's
            name, given = custom.get("name"), custom.get("input")
            custom = {"name": _str_or_none(name), "input": given if isinstance(given, str) else ""}
            calls.append({"id": _str_or_none(raw.get("id")), "type": "custom", "custom": custom})
            continue
        if not isinstance(raw.get("function"), dict):
            continue
        function = raw["function"]
        arguments = function.get("arguments")
        if isinstance(arguments, dict | list):  # a few servers send the object itself
            arguments = json.dumps(arguments)
        call_type = raw.get("type")
        calls.append(
            {
                "id": _str_or_none(raw.get("id")),
                "type": call_type if isinstance(call_type, str) and call_type else "function",
                "function": {
                    "name": _str_or_none(function.get("name")),
                    "arguments": arguments if isinstance(arguments, str) else "",
                },
            }
        )
    return calls or None


def sendable_calls(
    calls: list[dict[str, Any]] | None, finish_reason: str | None
) -> list[dict[str, Any]] | None:
    """The tool calls of an answer as they are stored, to go upstream with every later
    turn: in the shape chat servers take (and chatmem takes from a client).  A call
    without a string ``id`` (llama.cpp and LM Studio have sent none, or "") gets one,
    ``call_`` and 96 random bits, and a missing name becomes ""; they went upstream as
    null, which those servers then refuse on every later turn.  So does an id holding a
    NUL character, which no tool result can name (chatmem refuses it there).  A call cut off by
    ``length``, its arguments not a whole JSON value, is left out: servers parse the
    arguments of the calls in a history (vLLM), and no one can run a cut call; a whole
    one with no arguments at all gets ``{}``, which they parse.  None
    for none (vLLM's answers say ``"tool_calls": []``, which OpenAI refuses in a later
    request, and which is no call)."""
    if not calls:
        return None
    sendable: list[dict[str, Any]] = []
    for call in calls:
        kind = "custom" if call["type"] == "custom" else "function"  # the key of its body
        body = call[kind]
        if finish_reason == "length" and kind == "function":  # a custom input is any text
            try:
                json.loads(body["arguments"])
            except ValueError:
                continue
        if kind == "function" and not body["arguments"].strip():
            # A tool without parameters, called with no arguments at all (none sent, or
            # ""): no JSON value either, so the empty object, as OpenAI sends it.
            body = {**body, "arguments": "{}"}
            call = {**call, kind: body}
        usable_id = bool(call["id"]) and "\x00" not in call["id"]
        if not usable_id or not isinstance(body["name"], str):
            call = {
                **call,
                "id": call["id"] if usable_id else "call_" + secrets.token_hex(12),
                kind: {**body, "name": body["name"] or ""},
            }
        sendable.append(call)
    return sendable or None


def _index_of(item: dict[str, Any], position: int) -> int | None:
    """``item["index"]``; its position in the list when absent; None when not an int."""
    index = item.get("index")
    if index is None:
        return position
    if isinstance(index, int) and not isinstance(index, bool):
        return index
    return None


def _reasoning_of(message: dict[str, Any]) -> str | None:
    """``reasoning`` or ``reasoning_content``: either name, counted once if both are sent."""
    reasoning = message.get("reasoning")
    reasoning_content = message.get("reasoning_content")
    if isinstance(reasoning, str) and (reasoning or not isinstance(reasoning_content, str)):
        return reasoning
    return reasoning_content if isinstance(reasoning_content, str) else None


def _append(parts: list[str] | None, value: object) -> list[str] | None:
    if not isinstance(value, str):
        return parts
    if parts is None:
        return [value]
    parts.append(value)
    return parts


def _fold(parts: list[str], before: list[str]) -> None:
    """Move the pieces in ``parts`` to the end of ``before``, as one string."""
    before.append("".join(parts))
    parts.clear()


def _joined(parts: list[str] | None, before: list[str] | None = None) -> str | None:
    if parts is None:
        return None
    return "".join(before + parts) if before else "".join(parts)


def _by_index(numbered: tuple[int, _ToolCall]) -> int:
    return numbered[0]


def _text_of_parts(parts: list[Any]) -> str | None:
    """The text of content given as parts (``[{"type": "text", "text": ...}]``, or
    strings); None when there is none to keep."""
    texts = [part.get("text") if isinstance(part, dict) else part for part in parts]
    kept = [text for text in texts if isinstance(text, str)]
    return "".join(kept) if kept else None


def _content_of(value: object) -> str | None:
    return _text_of_parts(value) if isinstance(value, list) else _str_or_none(value)


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None
