"""Tool exchanges at the edge of the history window.

A request that starts with tool results answers the assistant's newest tool call: the
history sent with it must hold that call whatever the limits leave out, or every server
that checks pairing (OpenAI, vLLM) refuses the turn, and every retry is cut the same way.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from helpers import GatewayFactory, Rows, chunk, received, sse, strict_loads, upstream_url
from scripted_upstream import Script, scripted_upstream

from chatmem.config import StorageConfig
from chatmem.errors import InvalidRequest
from chatmem.storage import Owner, Store, create_engine
from chatmem.storage.pairing import ConversationChanged, open_calls, pairing_problem

Client = TestClient[Any, Any]
OWNER = Owner("default")


def call(*ids: str, arguments: str = "{}") -> dict[str, Any]:
    calls = [
        {"id": i, "type": "function", "function": {"name": "f", "arguments": arguments}}
        for i in ids
    ]
    return {"role": "assistant", "content": None, "tool_calls": calls}


def result(call_id: str, content: str = "r") -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "content": content}


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": text}


# Stored: a finished turn, then a question whose answer called two tools, one answered.
STORED = [user("q1"), assistant("a1"), user("q2"), call("c2", "c3"), result("c2")]


@pytest.fixture(params=["sqlite-fast", "sqlite-sqlalchemy", "postgresql"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, bool]:
    """The three ways a history is read: SQLite's own connection, SQLAlchemy, asyncpg."""
    if request.param == "postgresql":
        return request.getfixturevalue("pg_url"), True
    return f"sqlite+aiosqlite:///{tmp_path / 'chatmem.db'}", request.param == "sqlite-fast"


@pytest.fixture
async def store(where: tuple[str, bool]) -> AsyncIterator[Store]:
    url, direct = where
    made = Store(create_engine(StorageConfig(url=url)), direct=direct)
    await made.create_schema()
    await made.commit_turn(OWNER, "c", system=None, turn=STORED)
    yield made
    await made.close()


async def history(store: Store, limit: int, **options: Any) -> list[dict[str, Any]]:
    return (await store.load_history(OWNER, "c", limit, **options)).messages


async def test_the_call_a_request_answers_is_kept_past_the_limits(store: Store) -> None:
    # Without tool results in the request, the cut window loses its orphaned result...
    assert await history(store, 1) == []
    # ...with them, it reaches back to the call they answer, past max_history_messages.
    assert await history(store, 1, answering=True) == STORED[3:]
    assert await history(store, 2, answering=True) == STORED[3:]
    assert await history(store, 3, answering=True) == STORED[2:]
    # The byte budget reaches back too while the call fits in it.
    assert await history(store, 1, max_bytes=10_000, answering=True) == STORED[3:]
    # A window that holds the call already is read as before (once, from the cache).
    assert await history(store, 200, answering=True) == STORED
    assert await history(store, 200, answering=True) == STORED


async def test_start_at_user_keeps_the_call_from_the_user_message_before_it(
    store: Store,
) -> None:
    at_user = {"start_at_user": True}
    # A cut window with no user message: nothing (the alternation such templates want)...
    assert await history(store, 2, **at_user) == []
    # ...unless the request answers the call in it: then from the question it answered.
    assert await history(store, 2, **at_user, answering=True) == STORED[2:]
    assert await history(store, 1, **at_user, answering=True) == STORED[2:]
    assert await history(store, 4, **at_user, answering=True) == STORED[2:]
    assert await history(store, 5, **at_user, answering=True) == STORED


async def test_a_window_of_the_whole_conversation_left_nothing_out(store: Store) -> None:
    """Exactly ``limit`` messages stored: none was left out, so start_at_user keeps the
    window as it is (it used to count as cut, and lost its leading messages)."""
    await store.commit_turn(OWNER, "w", system=None, turn=[assistant("hello"), user("hi")])
    await store.commit_turn(OWNER, "w", system=None, turn=[assistant("how can I help?")])
    whole = await store.load_history(OWNER, "w", 3, start_at_user=True)
    assert [m["role"] for m in whole.messages] == ["assistant", "user", "assistant"]
    cut = await store.load_history(OWNER, "w", 2, start_at_user=True)
    assert [m["role"] for m in cut.messages] == ["user", "assistant"]


async def test_a_call_over_the_byte_budget_is_a_clear_error(store: Store) -> None:
    with pytest.raises(InvalidRequest) as refused:
        await history(store, 1, max_bytes=60, answering=True)
    assert refused.value.code == "context_length_exceeded"
    assert refused.value.param == "messages"
    assert "memory.max_history_bytes (60)" in refused.value.message


def chat_bodies(upstream: TestServer) -> list[Any]:
    return [strict_loads(r.body) for r in received(upstream) if r.path == "/v1/chat/completions"]


async def chat(client: Client, messages: list[dict[str, Any]]) -> Any:
    return await client.post(
        "/v1/chat/completions",
        json={"model": "m", "messages": messages},
        headers={"X-Conversation-Id": "t"},
    )


async def test_tool_results_go_upstream_with_their_call(
    gateway_factory: GatewayFactory, upstream: TestServer
) -> None:
    """The chat route, end to end: with max_history_messages = 1, the stored call and its
    first result go upstream before the client's second result."""
    client = await gateway_factory(upstream_url(upstream), memory={"max_history_messages": 1})
    created = await client.post(
        "/v1/conversations", json={"items": [user("q"), call("c2", "c3"), result("c2")]}
    )
    conversation = (await created.json())["id"]
    resp = await client.post(
        "/v1/chat/completions",
        json={"model": "m", "messages": [result("c3")]},
        headers={"X-Conversation-Id": conversation},
    )
    assert resp.status == 200, await resp.text()
    assert chat_bodies(upstream)[-1]["messages"] == [call("c2", "c3"), result("c2"), result("c3")]


async def test_a_call_over_the_byte_budget_is_a_400_and_nothing_is_stored(
    gateway_factory: GatewayFactory, upstream: TestServer
) -> None:
    memory = {"max_history_bytes": 400}
    client = await gateway_factory(upstream_url(upstream), memory=memory)
    big = call("cX", arguments='{"a": "' + "z" * 600 + '"}')
    created = await client.post("/v1/conversations", json={"items": [user("q"), big]})
    conversation = (await created.json())["id"]
    before = len(chat_bodies(upstream))
    resp = await client.post(
        "/v1/chat/completions",
        json={"model": "m", "messages": [result("cX")]},
        headers={"X-Conversation-Id": conversation},
    )
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "invalid_request_error",
        "context_length_exceeded",
        "messages",
    )
    assert len(chat_bodies(upstream)) == before  # the model was not asked
    items = await client.get(f"/v1/conversations/{conversation}/items")
    assert [item["role"] for item in (await items.json())["data"]] == ["assistant", "user"]


# Turns that raced: checked against what came between their read and their commit.


async def test_a_turn_that_no_longer_pairs_after_a_concurrent_one_is_refused(
    store: Store,
) -> None:
    read = await store.load_history(OWNER, "c", 200)  # both turns read the same history
    assert read.last_seq == len(STORED)
    # The call c3 is still open: a concurrent turn answers it (and is stored)...
    await store.commit_turn(
        OWNER, "c", system=None, turn=[result("c3"), call("j1")], after=read.read_at
    )
    # ...and a user message that came with it would now leave j1 unanswered.
    with pytest.raises(ConversationChanged) as refused:
        await store.commit_turn(
            OWNER, "c", system=None, turn=[user("B"), assistant("b")], after=read.read_at
        )
    assert refused.value.status == 409 and refused.value.code == "conversation_changed"
    assert "unanswered: j1" in refused.value.message
    # The same result twice (a double submit): the second answers no open call.
    with pytest.raises(ConversationChanged, match="tool message names no tool call"):
        await store.commit_turn(
            OWNER, "c", system=None, turn=[result("c3"), assistant("x")], after=read.read_at
        )
    # A turn that still fits is stored, as are turns whose read was not overtaken.
    later = await store.load_history(OWNER, "c", 200)
    await store.commit_turn(
        OWNER, "c", system=None, turn=[result("j1"), assistant("y")], after=read.read_at
    )
    await store.commit_turn(
        OWNER,
        "c",
        system=None,
        turn=[user("C"), assistant("c")],
        after=(later.pk, later.last_seq + 2),
    )
    final = await store.load_history(OWNER, "c", 200)
    assert final.messages == [
        *STORED,
        result("c3"),
        call("j1"),
        result("j1"),
        assistant("y"),
        user("C"),
        assistant("c"),
    ]
    assert final.last_seq == len(STORED) + 6


async def test_turns_of_one_group_commit_are_checked_one_after_the_other(tmp_path: Path) -> None:
    """On SQLite, turns that finish together share a transaction: a turn is checked
    against the one before it in the same group, whose rows are not inserted yet."""
    made = Store(create_engine(StorageConfig(url=f"sqlite+aiosqlite:///{tmp_path / 'g.db'}")))
    await made.create_schema()
    try:
        await made.commit_turn(OWNER, "g", system=None, turn=[user("q"), assistant("a")])
        read = await made.load_history(OWNER, "g", 200)

        def soon(*turn: dict[str, Any], after: tuple[int, int] | None = None) -> Any:
            return made.commit_turn_soon(
                OWNER, "g", system=None, turn=turn, together=True, after=after
            )

        first = soon(user("A"), call("j1"), after=read.read_at)
        second = soon(user("B"), assistant("b"), after=read.read_at)
        third = soon(user("C"), assistant("c"))
        outcomes = await asyncio.gather(first, second, third, return_exceptions=True)
        assert outcomes[0] is None and outcomes[2] is None
        assert isinstance(outcomes[1], ConversationChanged)
        stored = (await made.load_history(OWNER, "g", 200)).messages
        assert stored == [
            user("q"),
            assistant("a"),
            user("A"),
            call("j1"),
            user("C"),
            assistant("c"),
        ]
    finally:
        await made.close()


def test_pairing_problems() -> None:
    calls, unanswered = open_calls(
        [("tool", None, b"c2"), ("assistant", b'[{"id": "c2"}, {"id": "c3"}]', None)]
    )
    assert (calls, unanswered) == ({"c2", "c3"}, {"c3"})
    assert pairing_problem([result("c3"), assistant("a")], calls, unanswered) is None
    assert pairing_problem([result("c2")], calls, unanswered) == (
        0,
        "answers tool call c2, which has its result already",
    )
    assert pairing_problem([user("u")], calls, unanswered) == (
        0,
        "comes before a tool result for each call of the assistant message before it"
        " (unanswered: c3); chat servers refuse a history with an unanswered call",
    )
    # The last calls may wait; a call of the same messages pairs as well.
    assert pairing_problem([result("c3"), call("j1")], calls, unanswered) is None
    assert pairing_problem([call("j1"), result("j1"), result("j1")], set(), set()) == (
        2,
        "answers tool call j1, which has its result already",
    )
    assert open_calls([]) == (set(), set())


async def test_a_chat_turn_overtaken_by_a_tool_call_is_not_stored(
    gateway_factory: GatewayFactory, rows: Rows
) -> None:
    """The chat route, end to end: while a streamed turn is answered, a tool call is
    appended to its conversation; the turn, a user message, would leave that call
    unanswered, so it ends with an error event and is not stored."""
    release = asyncio.Event()
    chunks = [sse(chunk("b", role="assistant")), release, sse(chunk(finish="stop")), sse("[DONE]")]
    async with scripted_upstream(Script(chunks=chunks)) as up:
        client = await gateway_factory(up.url)
        made = await client.post("/v1/conversations", json={"items": [user("q"), assistant("a")]})
        conversation = (await made.json())["id"]
        body = {"model": "m", "stream": True, "messages": [user("B")]}
        answer = await client.post(
            "/v1/chat/completions", json=body, headers={"X-Conversation-Id": conversation}
        )
        assert answer.status == 200  # the history was read, the answer is under way
        items = f"/v1/conversations/{conversation}/items"
        assert (await client.post(items, json={"items": [call("j1")]})).status == 200
        release.set()
        events = [e for e in (await answer.read()).split(b"\n\n") if e]
    error = json.loads(events[-2].removeprefix(b"data: "))["error"]
    assert (error["code"], error["type"]) == ("conversation_changed", "invalid_request_error")
    assert error["message"].startswith(
        "the answer could not be saved: the conversation changed while this turn was answered"
    )
    assert events[-1] == b"data: [DONE]"
    stored = [(m["role"], m["tool_calls"] is not None) for m in rows.messages(conversation)]
    assert stored == [("user", False), ("assistant", False), ("assistant", True)]


async def test_an_overtaken_plain_turn_is_a_409_the_sdks_do_not_retry(
    gateway_factory: GatewayFactory, rows: Rows
) -> None:
    """Not streamed, the refusal is the response: 409, with ``X-Should-Retry: false``, as
    the OpenAI SDKs retry a 409 otherwise, with a history the caller never saw."""
    release = asyncio.Event()
    message = {"role": "assistant", "content": "b"}
    choice = {"index": 0, "message": message, "finish_reason": "stop"}
    body = json.dumps({"object": "chat.completion", "model": "m", "choices": [choice]}).encode()
    script = Script(headers={"Content-Type": "application/json"}, chunks=[release, body])
    async with scripted_upstream(script) as up:
        client = await gateway_factory(up.url)
        made = await client.post("/v1/conversations", json={"items": [user("q"), assistant("a")]})
        conversation = (await made.json())["id"]
        turn = {"model": "m", "messages": [user("B")]}
        answer = asyncio.ensure_future(
            client.post(
                "/v1/chat/completions", json=turn, headers={"X-Conversation-Id": conversation}
            )
        )
        for _ in range(500):  # until the upstream has the turn (its history read), 5 s at most
            if up.requests:
                break
            await asyncio.sleep(0.01)
        items = f"/v1/conversations/{conversation}/items"
        assert (await client.post(items, json={"items": [call("j1")]})).status == 200
        release.set()
        resp = await answer
        assert resp.status == 409
        assert resp.headers["X-Should-Retry"] == "false"
        assert resp.headers["X-Conversation-Id"] == conversation
        assert (await resp.json())["error"]["code"] == "conversation_changed"
    assert [m["role"] for m in rows.messages(conversation)] == ["user", "assistant", "assistant"]


async def test_a_turn_whose_call_was_deleted_meanwhile_is_refused(store: Store) -> None:
    """Deleting an item moves last_seq: a tool result sent while its call is deleted is
    checked at its commit, and is not stored without its call."""
    read = await store.load_history(OWNER, "c", 200)
    deleted = await store.delete_item(OWNER, "c", 4)  # the call c2+c3, with c2's result
    assert deleted is not None and deleted.seqs == [4, 5]
    with pytest.raises(ConversationChanged, match="tool message names no tool call"):
        await store.commit_turn(
            OWNER, "c", system=None, turn=[result("c3"), assistant("x")], after=read.read_at
        )
    assert (await store.load_history(OWNER, "c", 200)).messages == STORED[:3]


async def test_a_turn_whose_conversation_was_deleted_and_created_again_is_checked(
    store: Store,
) -> None:
    """A conversation deleted and created again can reach the very ``last_seq`` a turn in
    flight read: the turn is still refused, because the conversation is another row."""
    await store.commit_turn(OWNER, "d", system=None, turn=[user("q"), assistant("a")])
    read = await store.load_history(OWNER, "c", 200)
    assert await store.delete_conversation(OWNER, "c")
    again = [user("n1"), assistant("n2"), user("n3"), call("z1"), result("z1")]
    await store.commit_turn(OWNER, "c", system=None, turn=again)
    assert (await store.load_history(OWNER, "c", 200)).last_seq == read.last_seq
    with pytest.raises(ConversationChanged, match="was deleted while this turn was answered"):
        await store.commit_turn(
            OWNER, "c", system=None, turn=[result("c3"), assistant("x")], after=read.read_at
        )
    assert (await store.load_history(OWNER, "c", 200)).messages == again


async def test_the_newest_conversation_deleted_and_created_again_is_not_taken_for_it(
    store: Store,
) -> None:
    """As above with the conversation the newest one (h65): SQLite gave a deleted row's
    number to the next row made, so the conversation made again was the same row to the
    check, and a plain turn answered from the deleted history was stored in it (found
    with a slow turn while another client deleted and re-made the conversation).  Row
    numbers are never given back now (migration 0003), on SQLite as on PostgreSQL."""
    read = await store.load_history(OWNER, "c", 200)
    assert await store.delete_conversation(OWNER, "c")
    again = [user(f"n{i}") if i % 2 else assistant(f"n{i}") for i in range(1, read.last_seq + 1)]
    await store.commit_turn(OWNER, "c", system=None, turn=again)
    assert (await store.load_history(OWNER, "c", 200)).last_seq == read.last_seq
    with pytest.raises(ConversationChanged, match="was deleted while this turn was answered"):
        await store.commit_turn(
            OWNER, "c", system=None, turn=[user("more"), assistant("x")], after=read.read_at
        )
    assert (await store.load_history(OWNER, "c", 200)).messages == again


async def test_a_turn_whose_conversation_was_deleted_meanwhile_does_not_bring_it_back(
    store: Store,
) -> None:
    """A turn answered while its conversation was deleted (h45): its answer came from the
    deleted history, and stored it made the conversation exist again, holding that turn.
    Refused (409 ``conversation_changed``); the conversation stays deleted, and a turn
    that read it as deleted starts it anew."""
    read = await store.load_history(OWNER, "c", 200)
    assert read.messages
    assert await store.delete_conversation(OWNER, "c")
    with pytest.raises(ConversationChanged, match="was deleted while this turn was answered"):
        await store.commit_turn(
            OWNER, "c", system=None, turn=[user("more"), assistant("x")], after=read.read_at
        )
    assert await store.get_conversation(OWNER, "c") is None
    fresh = await store.load_history(OWNER, "c", 200)
    await store.commit_turn(
        OWNER, "c", system=None, turn=[user("anew"), assistant("y")], after=fresh.read_at
    )
    assert (await store.load_history(OWNER, "c", 200)).messages == [user("anew"), assistant("y")]


async def test_a_streamed_turn_whose_conversation_is_deleted_meanwhile_is_not_stored(
    gateway_factory: GatewayFactory, rows: Rows
) -> None:
    """The chat route, end to end (h45): a conversation deleted while a streamed turn of
    it is answered. The turn ends with an error event and the conversation stays
    deleted; it used to come back holding that turn, an answer to the deleted history.
    It is the newest conversation, whose row number SQLite gives to the next one."""
    release = asyncio.Event()
    chunks = [sse(chunk("b", role="assistant")), release, sse(chunk(finish="stop")), sse("[DONE]")]
    async with scripted_upstream(Script(chunks=chunks)) as up:
        client = await gateway_factory(up.url)
        made = await client.post("/v1/conversations", json={"items": [user("secret")]})
        conversation = (await made.json())["id"]
        body = {"model": "m", "stream": True, "messages": [user("B")]}
        answer = await client.post(
            "/v1/chat/completions", json=body, headers={"X-Conversation-Id": conversation}
        )
        assert answer.status == 200  # the history was read, the answer is under way
        assert (await client.delete(f"/v1/conversations/{conversation}")).status == 200
        release.set()
        events = [e for e in (await answer.read()).split(b"\n\n") if e]
        gone = await client.get(f"/v1/conversations/{conversation}")
        assert gone.status == 404
    error = json.loads(events[-2].removeprefix(b"data: "))["error"]
    assert (error["code"], error["type"]) == ("conversation_changed", "invalid_request_error")
    assert error["message"] == (
        "the answer could not be saved: the conversation was deleted while this turn was"
        " answered: it was not saved"
    )
    assert events[-1] == b"data: [DONE]"
    assert rows.messages(conversation) == []
