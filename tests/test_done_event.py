"""Where the tee puts its error event in front of ``[DONE]``: the fast path for the usual
end of a stream must find the same place as walking the events one by one."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from chatmem.proxy.sse import SSEParser
from chatmem.proxy.tee import _done_event_start

_BOUNDARY = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r(?!\n)|\n)")


def by_events(data: bytes) -> int:
    """The definition: the start of the first event whose only payload is [DONE]."""
    start = 0
    for boundary in _BOUNDARY.finditer(data):
        event = data[start : boundary.end()]
        if [payload.strip() for payload in SSEParser().feed(event)] == ["[DONE]"]:
            return start
        start = boundary.end()
    return len(data)


def test_the_usual_end_of_a_stream() -> None:
    data = b'data: {"a":1}\n\ndata: {"b":"[DONE"}\n\ndata: [DONE]\n\n'
    assert _done_event_start(data) == data.index(b"data: [DONE]")
    assert _done_event_start(b"data: [DONE]\n\n") == 0


def test_a_done_in_the_text_before_is_not_the_end() -> None:
    data = b'data: {"content":"say [DONE]"}\n\ndata: [DONE]\n\n'
    assert _done_event_start(data) == data.index(b"data: [DONE]\n\n")


def test_a_done_event_written_another_way_comes_first() -> None:
    data = b"data:  [DONE] \n\ndata: [DONE]\n\n"
    assert _done_event_start(data) == 0


@given(
    st.lists(
        st.sampled_from(
            [
                b"data: [DONE]\n\n",
                b"data: [DONE]",
                b"data:[DONE]\n\n",
                b'data: {"x":"[DONE]"}\n\n',
                b"data: {}\n\n",
                b"data: ",
                b"[DONE]",
                b"\n",
                b"\n\n",
                b"\r",
                b"\r\n",
                b": c\n\n",
                b"x",
            ]
        ),
        max_size=16,
    )
)
def test_any_data_gives_the_place_the_events_give(parts: list[bytes]) -> None:
    data = b"".join(parts)
    assert _done_event_start(data) == by_events(data)


class _Written:
    """A response that keeps what is written (the tee's client side, without a socket)."""

    def __init__(self) -> None:
        self.body = b""

    async def write(self, data: bytes) -> None:
        self.body += data


_PIECES = st.sampled_from([b"data: ", b"[DONE]", b"[DO", b"NE]", b"\n", b"\r", b'{"a":1}'])


@given(st.lists(st.lists(_PIECES, max_size=8).map(b"".join), max_size=12))
def test_may_end_and_relay_keep_track_of_what_is_held(reads: list[bytes]) -> None:
    """``may_end`` does not search what is held on every read (a long unfinished event
    can come in thousands): it must still see a ``[DONE]`` anywhere in it or split
    between it and the new read.  And what is relayed is the reads' whole events."""
    import asyncio

    from chatmem.proxy.tee import _Client

    written = _Written()
    client = _Client(written, None, head_waits=False, chunks_only=False)  # type: ignore[arg-type]

    async def feed() -> None:
        for n, read in enumerate(reads, 1):
            assert client.may_end(read) == (b"[DONE]" in bytes(client._held) + read)
            await client.relay(read, None)  # type: ignore[arg-type]
            assert written.body + client._held == b"".join(reads[:n])
            assert not _BOUNDARY.search(bytes(client._held))  # only an unfinished event

    asyncio.run(feed())
