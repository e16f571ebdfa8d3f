from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatmem.proxy.sse import SSEParser

BOM = b"\xef\xbb\xbf"


def parse(*chunks: bytes, max_event_bytes: int = 64 * 1024 * 1024) -> list[str]:
    parser = SSEParser(max_event_bytes)
    events: list[str] = []
    for chunk in chunks:
        events.extend(parser.feed(chunk))
    return events


def byte_by_byte(stream: bytes) -> list[bytes]:
    return [stream[i : i + 1] for i in range(len(stream))]


# A stream exercising every rule at once: used for the split-anywhere tests.
MIXED = (
    BOM
    + b": keepalive\r\n"
    + b'event: message\r\nid: 1\r\nretry: 1000\r\ndata: {"a": 1}\r\n\r\n'
    + b"data:no-space\rdata:  two spaces\r\r"
    + b": ping\n\n"
    + b"data\nfoo\ndata: caf\xc3\xa9 \xf0\x9f\x99\x82\n\n"
    + b"event: empty\n\n"
    + b"data: [DONE]\n\n"
    + b"data: unterminated\n"
)
MIXED_EVENTS = ['{"a": 1}', "no-space\n two spaces", "\ncafé 🙂", "[DONE]"]


def test_lf_framing() -> None:
    assert parse(b"data: a\n\ndata: b\n\n") == ["a", "b"]


def test_crlf_framing() -> None:
    assert parse(b"data: a\r\n\r\ndata: b\r\n\r\n") == ["a", "b"]


def test_cr_framing() -> None:
    assert parse(b"data: a\r\rdata: b\r\r") == ["a", "b"]


def test_mixed_line_endings_in_one_event() -> None:
    assert parse(b"data: a\rdata: b\r\ndata: c\n\r\n") == ["a\nb\nc"]


def test_crlf_split_across_feeds_is_one_line_ending() -> None:
    # Were CR and LF two line endings, the LF would be a blank line dispatching "a" alone.
    assert parse(b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n") == ["a\nb"]


def test_pending_cr_survives_an_empty_chunk() -> None:
    assert parse(b"data: a\r", b"", b"\ndata: b\r\n\r\n") == ["a\nb"]


def test_cr_at_end_of_chunk_then_cr_is_a_blank_line() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\r") == ["a"]


def test_lone_lf_chunk_after_cr() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\n") == []
    assert parser.feed(b"\n") == ["a"]


def test_data_with_and_without_space() -> None:
    assert parse(b"data:x\n\ndata: x\n\ndata:  x\n\n") == ["x", "x", " x"]


def test_empty_data_line_is_an_event_with_empty_payload() -> None:
    assert parse(b"data:\n\n") == [""]
    assert parse(b"data: \n\n") == [""]


def test_comments_are_ignored() -> None:
    assert parse(b": ping\n\n:\n\n") == []
    assert parse(b"data: a\n: ping in the middle\ndata: b\n\n") == ["a\nb"]


def test_multi_line_data_joined_with_newline() -> None:
    assert parse(b"data: one\ndata: two\ndata: three\n\n") == ["one\ntwo\nthree"]


def test_event_id_retry_and_unknown_fields_are_ignored() -> None:
    stream = b"event: delta\nid: 42\nretry: 3000\nfoo: bar\ndata: x\n\n"
    assert parse(stream) == ["x"]


def test_event_without_data_is_not_dispatched() -> None:
    assert parse(b"event: ping\nid: 7\n\n") == []


def test_field_without_colon() -> None:
    assert parse(b"data\n\n") == [""]
    assert parse(b"data\ndata\n\n") == ["\n"]
    assert parse(b"foo\ndata: x\n\n") == ["x"]


def test_field_names_are_case_sensitive() -> None:
    assert parse(b"Data: x\n\nDATA: y\n\n") == []


def test_unterminated_event_is_never_returned() -> None:
    assert parse(b"data: a") == []
    assert parse(b"data: a\n") == []
    assert parse(b"data: a\r\n") == []


def test_bom_at_start_is_skipped() -> None:
    assert parse(BOM + b"data: x\n\n") == ["x"]
    assert parse(*byte_by_byte(BOM + b"data: x\n\n")) == ["x"]
    assert parse(BOM, b"data: x\n\n") == ["x"]


def test_only_one_bom_is_skipped_and_only_at_start() -> None:
    # The second BOM becomes part of the field name "\ufeffdata", which is unknown.
    assert parse(BOM + BOM + b"data: x\n\n") == []
    assert parse(b"data: x\n\n" + BOM + b"data: y\n\n") == ["x"]


def test_bom_prefix_that_is_not_a_bom() -> None:
    assert parse(b"\xef\xbb", b"data: x\n\n") == []  # a garbled field name, not a crash
    assert parse(b"\xef", b"\n\ndata: x\n\n") == ["x"]


def test_done_payload_is_returned_verbatim() -> None:
    assert parse(b"data: [DONE]\n\n") == ["[DONE]"]


def test_mixed_stream_one_shot() -> None:
    assert parse(MIXED) == MIXED_EVENTS


def test_mixed_stream_byte_by_byte() -> None:
    assert parse(*byte_by_byte(MIXED)) == MIXED_EVENTS


def test_mixed_stream_every_two_way_split() -> None:
    for cut in range(len(MIXED) + 1):
        assert parse(MIXED[:cut], MIXED[cut:]) == MIXED_EVENTS, cut


def test_mixed_stream_every_three_way_split() -> None:
    for first in range(0, len(MIXED) + 1, 3):
        for second in range(first, len(MIXED) + 1, 5):
            chunks = MIXED[:first], MIXED[first:second], MIXED[second:]
            assert parse(*chunks) == MIXED_EVENTS, (first, second)


@pytest.mark.parametrize("text", ["é", "🙂", "日本語 ok", "a🙂b"])
def test_utf8_character_split_across_feeds(text: str) -> None:
    stream = f"data: {text}\n\n".encode()
    for cut in range(len(stream) + 1):
        assert parse(stream[:cut], stream[cut:]) == [text], cut
    assert parse(*byte_by_byte(stream)) == [text]


def test_invalid_utf8_is_replaced() -> None:
    assert parse(b"data: a\xffb\xe2\x82\n\n") == ["a\ufffdb\ufffd"]


def test_two_megabyte_data_line_in_one_chunk() -> None:
    payload = "x" * (2 * 1024 * 1024)
    assert parse(f"data: {payload}\n\n".encode()) == [payload]


def test_two_megabyte_data_line_in_small_chunks() -> None:
    # 8192 feeds of 256 bytes: a parser re-scanning or re-copying its buffer on every
    # feed would move gigabytes here; a linear one finishes in milliseconds.
    payload = b'{"content": "' + b"y" * (2 * 1024 * 1024) + b'"}'
    stream = b"data: " + payload + b"\r\n\r\ndata: next\r\n\r\n"
    chunks = [stream[i : i + 256] for i in range(0, len(stream), 256)]
    assert parse(*chunks) == [payload.decode(), "next"]


def test_overflow_on_a_long_data_line() -> None:
    parser = SSEParser(max_event_bytes=10)
    assert parser.feed(b"data: 0123456789abcdef\n\n") == []
    assert parser.overflowed
    assert parser.feed(b"data: x\n\n") == []


def test_overflow_on_an_unfinished_line() -> None:
    parser = SSEParser(max_event_bytes=100)
    parser.feed(b"data: ")
    assert not parser.overflowed
    for _ in range(20):
        assert parser.feed(b"z" * 10) == []
    assert parser.overflowed
    assert parser.feed(b"\n\ndata: x\n\n") == []


def test_overflow_on_many_data_lines() -> None:
    parser = SSEParser(max_event_bytes=20)
    assert parser.feed(b"data: 12345\n" * 5) == []
    assert parser.overflowed


def test_events_before_the_overflow_in_the_same_chunk_are_returned() -> None:
    parser = SSEParser(max_event_bytes=10)
    assert parser.feed(b"data: ok\n\ndata: far too long for it\n\ndata: x\n\n") == ["ok"]
    assert parser.overflowed
    assert parser.feed(b"data: y\n\n") == []


def test_events_under_the_limit_do_not_overflow() -> None:
    parser = SSEParser(max_event_bytes=10)
    assert parser.feed(b"data: 123456789\n\n" * 3) == ["123456789"] * 3
    assert not parser.overflowed


@given(st.lists(st.binary(max_size=64), max_size=30))
def test_feed_never_raises_and_chunking_does_not_matter(chunks: list[bytes]) -> None:
    assert parse(*chunks) == parse(b"".join(chunks))


line_text = st.text(
    alphabet=st.characters(exclude_characters="\r\n", exclude_categories=["Cs"]),
    max_size=20,
)
extra_lines = st.sampled_from(["", ": ping", "event: delta", "id: 3", "retry: 10", "x-unknown: 1"])


@given(
    events=st.lists(
        st.lists(st.tuples(line_text, extra_lines, st.booleans()), min_size=1, max_size=4),
        max_size=8,
    ),
    newline=st.sampled_from([b"\n", b"\r\n", b"\r"]),
    bom=st.booleans(),
    cuts=st.lists(st.integers(min_value=0), max_size=10),
)
def test_round_trip_with_random_framing_and_splits(
    events: list[list[tuple[str, str, bool]]],
    newline: bytes,
    bom: bool,
    cuts: list[int],
) -> None:
    stream = BOM if bom else b""
    expected: list[str] = []
    for event in events:
        for text, extra, spaced in event:
            if extra:
                stream += extra.encode() + newline
            spaced = spaced or text.startswith(" ")
            stream += b"data:" + (b" " if spaced else b"") + text.encode() + newline
        stream += newline
        expected.append("\n".join(text for text, _, _ in event))
    points = sorted({cut % (len(stream) + 1) for cut in cuts})
    chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    assert parse(*chunks) == expected


whole_event = st.one_of(
    line_text.map(lambda text: b"data: " + text.encode() + b"\n\n"),
    st.sampled_from(
        [
            b"data: [DONE]\n\n",
            b"data:no-space\n\n",
            b"data:  two spaces\n\n",
            b": ping\n\n",
            b"data: a\ndata: b\n\n",
            b"event: e\ndata: y\n\n",
            b"\n\n",
            b"data: \xff invalid\n\n",
            b"data: x\n\n\n",
        ]
    ),
)


@given(st.lists(st.lists(whole_event, min_size=1, max_size=5), max_size=10))
def test_chunks_of_whole_events_parse_as_the_byte_by_byte_stream(
    groups: list[list[bytes]],
) -> None:
    # Chunks made of whole events take the parser's fast path when every event is one
    # "data: " line; byte by byte never does.  Both must give the same events.
    chunks = [b"".join(group) for group in groups]
    assert parse(*chunks) == parse(*byte_by_byte(b"".join(chunks)))


@given(
    st.lists(
        st.sampled_from(
            [b"data: ", b"data:", b"data", b"\n", b"\n\n", b"x", b"\xc3\xa9", b"\xff", b": c"]
        ),
        max_size=24,
    )
)
def test_any_chunk_ending_in_a_blank_line_parses_as_byte_by_byte(parts: list[bytes]) -> None:
    # The fast path decides from counts of LF and "\n\ndata: " alone: pieces that almost
    # look like simple events (a bare "data", an extra LF, a comment) must not fool it.
    chunk = b"".join(parts) + b"\n\n"
    assert parse(chunk) == parse(*byte_by_byte(chunk))
