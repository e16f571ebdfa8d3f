from __future__ import annotations

import json
from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatmem.proxy.accumulate import AssistantTurn, StreamAccumulator, turn_from_completion


def chunk(
    delta: Any = None,
    *,
    index: int = 0,
    finish_reason: str | None = None,
    model: str = "m-1",
    **extra: Any,
) -> str:
    choice = {"index": index, "delta": {} if delta is None else delta}
    choice["finish_reason"] = finish_reason
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "model": model,
        "choices": [choice],
        **extra,
    }
    return json.dumps(body)


def accumulate(*payloads: str) -> StreamAccumulator:
    acc = StreamAccumulator()
    for payload in payloads:
        acc.add(payload)
    return acc


def tool_delta(index: int | None = None, **fields: Any) -> dict[str, Any]:
    call: dict[str, Any] = {} if index is None else {"index": index}
    function = {k: fields.pop(k) for k in ("name", "arguments") if k in fields}
    if function:
        call["function"] = function
    call.update(fields)
    return call


def tool_calls_of(*payloads: str) -> list[dict[str, Any]] | None:
    turn = accumulate(*payloads).turn()
    assert turn is not None
    return turn.tool_calls


def test_content_is_concatenated() -> None:
    acc = accumulate(
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Hel"}),
        chunk({"content": "lo"}),
        chunk({}, finish_reason="stop"),
        "[DONE]",
    )
    assert acc.turn() == AssistantTurn(
        content="Hello",
        reasoning=None,
        tool_calls=None,
        finish_reason="stop",
        model="m-1",
        usage=None,
    )
    assert acc.done
    assert acc.completed


def test_content_is_none_when_it_never_arrived() -> None:
    acc = accumulate(chunk({"role": "assistant", "content": None}), chunk({}, finish_reason="stop"))
    turn = acc.turn()
    assert turn is not None
    assert turn.content is None


def test_empty_content_is_not_none() -> None:
    turn = accumulate(chunk({"content": ""})).turn()
    assert turn is not None
    assert turn.content == ""


def test_model_is_the_first_non_empty_one() -> None:
    acc = accumulate(chunk({}, model=""), chunk({}, model="first"), chunk({}, model="second"))
    turn = acc.turn()
    assert turn is not None
    assert turn.model == "first"


@pytest.mark.parametrize("name", ["reasoning", "reasoning_content"])
def test_reasoning_is_kept_apart_from_content(name: str) -> None:
    acc = accumulate(
        chunk({name: "let me "}),
        chunk({name: "think"}),
        chunk({"content": "42"}),
    )
    turn = acc.turn()
    assert turn is not None
    assert (turn.reasoning, turn.content) == ("let me think", "42")


def test_reasoning_under_both_names_across_chunks() -> None:
    turn = accumulate(chunk({"reasoning_content": "a"}), chunk({"reasoning": "b"})).turn()
    assert turn is not None
    assert turn.reasoning == "ab"


def test_reasoning_sent_under_both_names_in_one_delta_counts_once() -> None:
    delta = {"reasoning": "x", "reasoning_content": "x"}
    turn = accumulate(chunk(delta), chunk({"reasoning": "", "reasoning_content": "y"})).turn()
    assert turn is not None
    assert turn.reasoning == "xy"


def test_refusal_is_concatenated() -> None:
    turn = accumulate(chunk({"refusal": "I can"}), chunk({"refusal": "not."})).turn()
    assert turn is not None
    assert (turn.refusal, turn.content) == ("I cannot.", None)


def test_openai_style_tool_call_fragments() -> None:
    calls = tool_calls_of(
        chunk({"role": "assistant", "content": None}),
        chunk(
            {"tool_calls": [tool_delta(0, id="call_1", type="function", name="get", arguments="")]}
        ),
        chunk({"tool_calls": [tool_delta(0, arguments='{"ci')]}),
        chunk({"tool_calls": [tool_delta(0, arguments='ty": "Paris"}')]}),
        chunk({}, finish_reason="tool_calls"),
    )
    assert calls == [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get", "arguments": '{"city": "Paris"}'},
        }
    ]


def test_arguments_streamed_as_an_object_are_kept_as_its_json() -> None:
    """As a plain answer's are (``turn_from_completion``): they were stored as "", and a
    history whose call has no arguments is refused by servers that parse them."""
    calls = tool_calls_of(
        chunk(
            {"tool_calls": [tool_delta(0, id="c1", type="function", name="g", arguments={"a": 1})]}
        ),
        chunk({"tool_calls": [tool_delta(1, id="c2", type="function", name="h", arguments=[])]}),
        chunk({}, finish_reason="tool_calls"),
    )
    assert calls == [
        {"id": "c1", "type": "function", "function": {"name": "g", "arguments": '{"a": 1}'}},
        {"id": "c2", "type": "function", "function": {"name": "h", "arguments": "[]"}},
    ]


def test_a_call_sent_bare_not_in_a_list_is_one_call() -> None:
    """TGI before 3.2 streamed ``delta.tool_calls`` as the call itself (TGI #2949): the
    call was dropped, and the answer stored as one that called nothing (item 148)."""
    bare = {
        "index": 0,
        "id": "c1",
        "type": "function",
        "function": {"name": "g", "arguments": "{}"},
    }
    calls = tool_calls_of(chunk({"tool_calls": bare}), chunk({}, finish_reason="eos_token"))
    one = [{"id": "c1", "type": "function", "function": {"name": "g", "arguments": "{}"}}]
    assert calls == one
    message = {"role": "assistant", "content": None, "tool_calls": bare}
    turn = turn_from_completion(completion(message))
    assert turn is not None and turn.tool_calls == one


def test_same_index_twice_in_one_chunk_is_merged_in_order() -> None:
    calls = tool_calls_of(
        chunk(
            {
                "tool_calls": [
                    tool_delta(0, id="c", name="f", arguments='{"a":'),
                    tool_delta(0, arguments=" 1}"),
                ]
            }
        )
    )
    assert calls == [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    ]


def test_repeated_and_empty_names_are_ignored() -> None:
    calls = tool_calls_of(
        chunk({"tool_calls": [tool_delta(0, id="c", name="", arguments="")]}),
        chunk({"tool_calls": [tool_delta(0, name="lookup", arguments="{")]}),
        chunk({"tool_calls": [tool_delta(0, id="other", name="lookup", arguments="}")]}),
        chunk({"tool_calls": [tool_delta(0, name="", arguments=None)]}),
    )
    assert calls is not None
    assert calls[0]["id"] == "c"
    assert calls[0]["function"] == {"name": "lookup", "arguments": "{}"}


def test_name_streamed_in_fragments_is_joined() -> None:
    calls = tool_calls_of(
        chunk({"tool_calls": [tool_delta(0, name="get_")]}),
        chunk({"tool_calls": [tool_delta(0, name="weather")]}),
        chunk({"tool_calls": [tool_delta(0, name="get_weather")]}),
    )
    assert calls is not None
    assert calls[0]["function"]["name"] == "get_weather"


def test_two_interleaved_tool_calls_are_sorted_by_index() -> None:
    calls = tool_calls_of(
        chunk({"tool_calls": [tool_delta(1, id="b", name="second", arguments="[")]}),
        chunk({"tool_calls": [tool_delta(0, id="a", name="first", arguments="{")]}),
        chunk({"tool_calls": [tool_delta(1, arguments="]"), tool_delta(0, arguments="}")]}),
    )
    assert calls == [
        {"id": "a", "type": "function", "function": {"name": "first", "arguments": "{}"}},
        {"id": "b", "type": "function", "function": {"name": "second", "arguments": "[]"}},
    ]


def test_missing_tool_call_index_is_its_position() -> None:
    calls = tool_calls_of(
        chunk({"tool_calls": [tool_delta(id="a", name="f"), tool_delta(id="b", name="g")]}),
        chunk({"tool_calls": [tool_delta(arguments="1"), tool_delta(arguments="2")]}),
    )
    assert calls is not None
    assert [(c["id"], c["function"]["arguments"]) for c in calls] == [("a", "1"), ("b", "2")]


def test_tool_call_defaults() -> None:
    calls = tool_calls_of(chunk({"tool_calls": [tool_delta(0, id="c", name="f")]}))
    assert calls == [{"id": "c", "type": "function", "function": {"name": "f", "arguments": ""}}]


def test_tool_call_type_and_id_first_non_empty_wins() -> None:
    calls = tool_calls_of(
        chunk({"tool_calls": [tool_delta(0, id="", type="")]}),
        chunk({"tool_calls": [tool_delta(0, id="x", type="custom")]}),
        chunk({"tool_calls": [tool_delta(0, id="y", type="function")]}),
    )
    assert calls is not None
    assert (calls[0]["id"], calls[0]["type"]) == ("x", "custom")


def test_two_choices_are_kept_apart() -> None:
    acc = accumulate(
        chunk({"content": "A"}, index=0),
        chunk({"content": "B"}, index=1),
        chunk({"content": "a"}, index=0, finish_reason="stop"),
        chunk({"content": "b"}, index=1, finish_reason="length"),
        "[DONE]",
    )
    first, second = acc.turn(0), acc.turn(1)
    assert first is not None
    assert second is not None
    assert (first.content, first.finish_reason) == ("Aa", "stop")
    assert (second.content, second.finish_reason) == ("Bb", "length")
    assert acc.turn(2) is None
    assert acc.completed


def test_include_usage_chunk_with_empty_choices() -> None:
    usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    acc = accumulate(
        chunk({"content": "hi"}, usage=None),
        chunk({}, finish_reason="stop", usage=None),
        json.dumps({"id": "x", "object": "chat.completion.chunk", "choices": [], "usage": usage}),
        "[DONE]",
    )
    turn = acc.turn()
    assert turn is not None
    assert (turn.content, turn.usage) == ("hi", usage)
    assert acc.completed


def test_last_non_null_usage_and_finish_reason_win() -> None:
    acc = accumulate(
        chunk({}, finish_reason="length", usage={"total_tokens": 1}),
        chunk({}, finish_reason="stop", usage={"total_tokens": 2}),
        chunk({}, finish_reason=None, usage=None),
    )
    turn = acc.turn()
    assert turn is not None
    assert (turn.finish_reason, turn.usage) == ("stop", {"total_tokens": 2})


def test_error_object_inside_stream() -> None:
    acc = accumulate(
        chunk({"content": "par"}),
        json.dumps({"error": {"message": "overloaded", "type": "server_error"}}),
        "[DONE]",
    )
    assert acc.error == {"message": "overloaded", "type": "server_error"}
    assert not acc.completed
    turn = acc.turn()
    assert turn is not None
    assert turn.content == "par"


def test_error_that_is_not_an_object() -> None:
    acc = accumulate(json.dumps({"error": "boom"}))
    assert acc.error == {"message": "boom"}


def test_null_error_is_not_an_error() -> None:
    acc = accumulate(chunk({"content": "ok"}, finish_reason="stop", error=None), "[DONE]")
    assert acc.error is None
    assert acc.completed


@pytest.mark.parametrize("payload", ["{", "not json", "[1, 2]", "42", "null", '"[DONE]"'])
def test_malformed_payload(payload: str) -> None:
    acc = accumulate(chunk({"content": "x"}, finish_reason="stop"), payload, "[DONE]")
    assert acc.malformed
    assert not acc.completed


@pytest.mark.parametrize("payload", ["", " ", "\n"])
def test_an_event_with_empty_data_is_passed_over(payload: str) -> None:
    """``data:`` with nothing after it carries nothing, like a keep-alive: it used to
    count as a malformed chunk and lose the whole answer."""
    acc = accumulate(
        payload, chunk({"content": "x"}), payload, chunk({}, finish_reason="stop"), "[DONE]"
    )
    turn = acc.turn()
    assert not acc.malformed and acc.completed
    assert turn is not None and turn.content == "x"


def test_deeply_nested_json_is_malformed_not_a_crash() -> None:
    acc = accumulate("[" * 100_000)
    assert acc.malformed


def test_missing_finish_reason_is_not_completed() -> None:
    acc = accumulate(chunk({"content": "x"}), "[DONE]")
    assert acc.done
    assert not acc.completed


def test_missing_done_is_not_completed() -> None:
    acc = accumulate(chunk({"content": "x"}, finish_reason="stop"))
    assert not acc.done
    assert not acc.completed


def test_nothing_seen() -> None:
    acc = accumulate("[DONE]")
    assert acc.turn() is None
    assert not acc.completed


def test_only_choice_one_is_not_completed() -> None:
    acc = accumulate(chunk({"content": "x"}, index=1, finish_reason="stop"), "[DONE]")
    assert acc.turn(0) is None
    assert not acc.completed


@pytest.mark.parametrize(
    "body",
    [
        {"choices": "nope"},
        {"choices": [1, None, "x"]},
        {"choices": [{"index": "0", "delta": {"content": "x"}}]},
        {"choices": [{"index": True, "delta": {"content": "x"}}]},
        {"choices": [{"index": 0.0, "delta": {"content": "x"}}]},
        {"model": 7, "usage": [1], "choices": None},
    ],
)
def test_bad_shapes_are_skipped(body: dict[str, Any]) -> None:
    acc = accumulate(json.dumps(body), "[DONE]")
    assert acc.turn() is None
    assert not acc.malformed


def test_bad_pieces_inside_a_choice_are_skipped() -> None:
    acc = accumulate(
        chunk("not a dict"),
        chunk({"content": 1, "reasoning": ["x"], "refusal": {}, "tool_calls": "nope"}),
        chunk({"tool_calls": [None, 3, {"index": "1"}, {"index": 0, "function": "f"}]}),
        chunk({"tool_calls": [{"index": 0, "id": 5, "function": {"name": 1, "arguments": 2}}]}),
        chunk({"content": "ok"}, finish_reason=cast(str, 9)),
        chunk({}, finish_reason="stop"),
        "[DONE]",
    )
    turn = acc.turn()
    assert turn is not None
    assert (turn.content, turn.reasoning, turn.refusal) == ("ok", None, None)
    assert turn.tool_calls == [
        {"id": None, "type": "function", "function": {"name": None, "arguments": ""}}
    ]
    assert acc.completed


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=30,
)
known_keys = st.sampled_from(
    [
        "index",
        "delta",
        "choices",
        "content",
        "reasoning",
        "reasoning_content",
        "refusal",
        "tool_calls",
        "function",
        "name",
        "arguments",
        "id",
        "type",
        "finish_reason",
        "model",
        "usage",
        "error",
    ]
)
chunk_like = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2, max_value=3) | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(known_keys, children, max_size=5)
    ),
    max_leaves=40,
)


def exercise(acc: StreamAccumulator) -> None:
    for index in (-1, 0, 1, 2):
        acc.turn(index)
    assert isinstance(acc.completed, bool)


@given(st.lists(st.text(), max_size=5))
def test_add_never_raises_for_arbitrary_text(payloads: list[str]) -> None:
    exercise(accumulate(*payloads))


@given(st.lists(json_values, max_size=5))
def test_add_never_raises_for_arbitrary_json(values: list[Any]) -> None:
    exercise(accumulate(*(json.dumps(value) for value in values)))


@given(st.lists(chunk_like, max_size=8))
def test_add_never_raises_for_chunk_shaped_json(values: list[Any]) -> None:
    exercise(accumulate(*(json.dumps(value) for value in values)))


def completion(message: Any, **extra: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "m-1",
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        "usage": {"total_tokens": 3},
        **extra,
    }


def test_turn_from_completion() -> None:
    body = completion({"role": "assistant", "content": "Hi", "reasoning_content": "hmm"})
    assert turn_from_completion(body) == AssistantTurn(
        content="Hi",
        reasoning="hmm",
        tool_calls=None,
        finish_reason="stop",
        model="m-1",
        usage={"total_tokens": 3},
    )


def test_turn_from_completion_with_tool_calls_and_refusal() -> None:
    message = {
        "role": "assistant",
        "content": None,
        "refusal": "no",
        "reasoning": "r",
        "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}},
            {"id": "b", "function": {"name": "g", "arguments": {"x": 1}}},
            {"id": "c", "function": {"name": "h"}},
            {"id": "d"},
            "junk",
        ],
    }
    turn = turn_from_completion(completion(message))
    assert turn is not None
    assert (turn.content, turn.reasoning, turn.refusal) == (None, "r", "no")
    assert turn.tool_calls == [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}},
        {"id": "b", "type": "function", "function": {"name": "g", "arguments": '{"x": 1}'}},
        {"id": "c", "type": "function", "function": {"name": "h", "arguments": ""}},
    ]


def test_turn_from_completion_tolerates_odd_fields() -> None:
    body = completion({"content": 5, "tool_calls": []}, model="", usage="x")
    body["choices"][0]["finish_reason"] = None
    assert turn_from_completion(body) == AssistantTurn(
        content=None, reasoning=None, tool_calls=None, finish_reason=None, model=None, usage=None
    )


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"choices": None},
        {"choices": {}},
        {"choices": []},
        {"choices": ["x"]},
        {"choices": [{"index": 0}]},
        {"choices": [{"message": "hi"}]},
        {"error": {"message": "nope"}},
    ],
)
def test_turn_from_completion_rejects_bad_shapes(body: dict[str, Any]) -> None:
    assert turn_from_completion(body) is None


def test_turn_from_completion_takes_choice_0_by_its_index() -> None:
    """As in a stream, the turn is choice ``index`` 0, wherever it is in the list (a
    choice without an index is at its position)."""
    first, second = "choice zero", "choice one"
    body = completion({"role": "assistant", "content": first})
    zero = body["choices"][0]
    one = {**zero, "index": 1, "message": {"role": "assistant", "content": second}}
    for choices, stored in [
        ([one, zero], first),
        ([zero, one], first),
        ([{k: v for k, v in zero.items() if k != "index"}, one], first),
        ([{**one, "index": "0"}, zero], first),  # not an index: skipped
    ]:
        turn = turn_from_completion({**body, "choices": choices})
        assert turn is not None and turn.content == stored, choices
    assert turn_from_completion({**body, "choices": [one]}) is None  # no choice 0


def test_turn_from_completion_rejects_non_object_body() -> None:
    assert turn_from_completion(cast(dict[str, Any], [1, 2])) is None


@pytest.mark.parametrize("keep_pieces", [False, True])
def test_a_long_answer_is_held_as_joined_text_unless_its_pieces_are_wanted(
    keep_pieces: bool,
) -> None:
    tokens = [f" t{i}" for i in range(2_000)]
    acc = StreamAccumulator(keep_pieces=keep_pieces)
    for token in tokens:
        acc.add(chunk({"content": token, "reasoning_content": token.upper()}))
    turn = acc.turn()
    assert turn is not None
    assert turn.content == "".join(tokens)
    assert turn.reasoning == "".join(tokens).upper()
    # Joined 256 at a time, not a string per token, unless a renderer that shows what
    # each read added needs the pieces.
    choice = acc._choices[0]
    if keep_pieces:
        assert acc.content_parts() == tokens and choice.content_before == []
    else:
        assert [len(block) for block in choice.content_before] == [
            len("".join(tokens[i : i + 256])) for i in range(0, 1_792, 256)
        ]
        assert choice.content == tokens[1_792:]
