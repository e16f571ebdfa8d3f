"""Tool calls and their results, paired as chat servers check them.

OpenAI and vLLM refuse a history in which a tool result does not answer a call of the
assistant message right before its run of results, or in which another message comes
before every call of an assistant message has its result.  Stored, such a history goes
upstream with every later turn, so the store keeps it from being written: the
Conversations API checks what it appends, and a chat turn is checked when another write
to its conversation came between the turn's read and its commit (concurrent turns).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from .. import jsonio
from ..errors import ChatmemError

__all__ = [
    "ConversationChanged",
    "call_ids",
    "check_still_there",
    "check_turn",
    "open_calls",
    "overtaken",
    "pairing_problem",
]


class ConversationChanged(ChatmemError):
    """Another write to the conversation came first, and the turn no longer follows it."""

    status = 409
    type = "invalid_request_error"
    code = "conversation_changed"
    # The OpenAI SDKs retry a 409 on their own, and the retry, which reads the history
    # with the other turn in it, would send the turn blindly: the caller decides.
    headers = {"X-Should-Retry": "false"}


def call_ids(tool_calls: Any) -> set[str]:
    """The ids of a stored message's tool calls: a list, or its JSON text as read raw
    (older versions stored them unchecked)."""
    if isinstance(tool_calls, bytes | str):
        try:
            tool_calls = jsonio.loads(tool_calls)
        except ValueError:
            return set()
    calls = tool_calls if isinstance(tool_calls, list) else ()
    ids = {call.get("id") for call in calls if isinstance(call, dict)}
    return {i for i in ids if isinstance(i, str)}


def open_calls(newest_first: Iterable[Any]) -> tuple[set[str], set[str]]:
    """The calls a history ends with, and those of them without a result yet, from its
    last messages, newest first, as (role, tool_calls, tool_call_id): the message before
    the run of tool results at the end (str or, read raw from SQLite, bytes)."""
    answered: set[str] = set()
    for role, tool_calls, tool_call_id in newest_first:
        role = role.decode() if isinstance(role, bytes) else role
        if role == "tool":
            answered.add(tool_call_id.decode() if isinstance(tool_call_id, bytes) else tool_call_id)
            continue
        calls = call_ids(tool_calls) if role == "assistant" else set()
        return calls, calls - answered
    return set(), set()


def pairing_problem(
    messages: Sequence[dict[str, Any]], calls: set[str], unanswered: set[str]
) -> tuple[int, str] | None:
    """Where ``messages``, appended to a history that ends with ``calls`` (``unanswered``
    of them without a result), would leave it in a shape chat servers refuse: the index
    of the first message that does, and why (a phrase to follow its name); None if they
    fit.  The calls of the last assistant message may still wait for their results."""
    answerable, waiting = calls, set(unanswered)
    for number, message in enumerate(messages):
        if message["role"] == "tool":
            answered = message.get("tool_call_id")
            if not isinstance(answered, str) or answered not in answerable:
                return number, "names no tool call of the assistant message before it"
            if answered not in waiting:
                return number, f"answers tool call {answered}, which has its result already"
            waiting.discard(answered)
            continue
        if waiting:
            return number, (
                "comes before a tool result for each call of the assistant message before"
                f" it (unanswered: {', '.join(sorted(waiting))}); chat servers refuse a"
                " history with an unanswered call"
            )
        calls_here = message.get("tool_calls") if message["role"] == "assistant" else None
        answerable = call_ids(calls_here)
        waiting = set(answerable)
    return None


def overtaken(after: tuple[int, int] | None, pk: int, before: int) -> bool:
    """Whether a turn read its history at ``after`` (the conversation's pk and
    ``last_seq``, pk 0 when it was not stored; None: not read) and another write came
    before its commit, which found the conversation at ``pk`` with ``before`` messages
    ahead of the turn: another turn, an append, a deleted item (each moves ``last_seq``),
    or the whole conversation deleted and created again (a new pk).  A conversation
    read as not stored and created by this commit was overtaken by nobody."""
    return after is not None and (before != after[1] or after[0] not in (0, pk))


def check_still_there(after: tuple[int, int] | None, pk: int, before: int) -> None:
    """:class:`ConversationChanged` if the conversation a turn read (at ``after``, see
    :func:`overtaken`) was deleted before the turn's commit, which found another row (at
    ``pk``, with ``last_seq`` at ``before``) or made one: the answer came from a history
    its owner deleted, and stored, it would bring the conversation back (or join the one
    other turns created again meanwhile).  Another row has another pk, or, where SQLite
    gave the newest row's number back, a ``last_seq`` below the one read (a row's only
    grows), unless other turns brought it that far meanwhile."""
    if after is not None and after[0] and (after[0] != pk or before < after[1]):
        raise ConversationChanged(
            "the conversation was deleted while this turn was answered: it was not saved"
        )


def check_turn(turn: Sequence[dict[str, Any]], newest_first: Iterable[Any]) -> None:
    """:class:`ConversationChanged` if ``turn`` no longer fits after the history whose last
    messages are ``newest_first`` (see :func:`open_calls`)."""
    problem = pairing_problem(turn, *open_calls(newest_first))
    if problem is not None:
        number, why = problem
        raise ConversationChanged(
            "the conversation changed while this turn was answered (another turn, an"
            " append or a delete came first), and this turn no longer follows it (its"
            f" {turn[number]['role']} message {why}): it was not saved"
        )
