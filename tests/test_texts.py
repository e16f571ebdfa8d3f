"""``Texts``: a window kept as its JSON texts joined.  Every operation is checked against
the same operation on the plain list of (role, text) pairs it replaced."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from chatmem.storage.queries import window_start
from chatmem.storage.texts import Texts

ROLES = st.sampled_from(["system", "user", "assistant", "tool", "function"])
# Texts of every length from 1 byte, commas and brackets in them (as in JSON strings).
TEXTS = st.binary(min_size=1, max_size=12).map(lambda b: b.replace(b"\x00", b","))
MESSAGES = st.lists(st.tuples(ROLES, TEXTS), max_size=12)


def sizes(texts: Texts) -> list[int]:
    """Each text's length, its comma left out."""
    return [width - 1 for width in texts.widths]


@given(MESSAGES)
def test_texts_keep_each_message(messages: list[tuple[str, bytes]]) -> None:
    texts = Texts.of(messages)
    assert texts.pairs() == messages
    assert texts.roles == [role for role, _ in messages]
    assert texts.body == b"".join(text + b"," for _, text in messages)
    assert sizes(texts) == [len(text) for _, text in messages]
    assert len(texts) == len(messages)
    assert texts.size == sum(len(text) for _, text in messages)
    for start in range(len(messages) + 1):
        kept = messages[start:]
        assert texts.encoded(start) == b",".join(text for _, text in kept)
        assert texts.size_from(start) == sum(len(text) for _, text in kept)
        assert texts.since(start) == Texts.of(kept)


@given(st.lists(st.tuples(MESSAGES, st.integers(0, 12)), max_size=5))
def test_texts_joined_are_the_messages_one_after_the_other(
    parts: list[tuple[list[tuple[str, bytes]], int]],
) -> None:
    """Parts cut from the front first (their starts no longer count from 0), as a window
    that slides is."""
    cut = [(messages, min(start, len(messages))) for messages, start in parts]
    joined = Texts.join([Texts.of(messages).since(start) for messages, start in cut])
    expected = [message for messages, start in cut for message in messages[start:]]
    assert joined == Texts.of(expected)
    assert joined.pairs() == expected
    assert sizes(joined) == [len(text) for _, text in expected]
    for start in range(len(expected) + 1):
        assert joined.encoded(start) == b",".join(text for _, text in expected[start:])
        assert joined.size_from(start) == sum(len(text) for _, text in expected[start:])
        assert joined.since(start).pairs() == expected[start:]
    if len(parts) == 2:
        first, second = (Texts.of(messages).since(start) for messages, start in cut)
        assert first + second == joined


def test_an_empty_window() -> None:
    empty = Texts.empty()
    assert empty == Texts.of([]) == Texts.join([]) == Texts.of([("user", b"1")]).since(1)
    assert empty.encoded() == b"" and empty.size == 0 and sizes(empty) == []


def test_a_window_encoded_is_the_json_array_of_its_messages() -> None:
    messages = [{"role": "user", "content": "a, [b]"}, {"role": "assistant", "content": "}"}]
    texts = Texts.of((m["role"], json.dumps(m).encode()) for m in messages)
    assert json.loads(b"[" + texts.encoded() + b"]") == messages
    assert json.loads(b"[" + texts.encoded(1) + b"]") == messages[1:]


@given(MESSAGES, st.integers(0, 60))
def test_newest_within_a_budget(messages: list[tuple[str, bytes]], budget: int) -> None:
    texts = Texts.of(messages)
    start = texts.newest_within(budget)
    assert texts.size_from(start) <= budget
    assert start == 0 or texts.size_from(start - 1) > budget


@given(st.lists(ROLES, max_size=10), st.booleans(), st.booleans(), st.integers(0, 10))
def test_where_a_history_starts(roles: list[str], cut: bool, answering: bool, begin: int) -> None:
    """``window_start`` on the roles from ``begin`` on is the rule in its docstring."""
    begin = min(begin, len(roles))
    start = window_start(roles, cut, answering, begin)
    assert begin <= start <= len(roles)
    calls = [i for i in range(begin, len(roles)) if roles[i] == "assistant"]
    # The first message that may start a history: no result, and a user's after a cut.
    first = next(
        (
            i
            for i in range(begin, len(roles))
            if roles[i] not in ("tool", "function") and (not cut or roles[i] == "user")
        ),
        len(roles),
    )
    # ... unless that would leave out the call the request's results answer.
    assert start == (min(first, calls[-1]) if answering and calls else first)
