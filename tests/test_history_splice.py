"""The stored history goes upstream spliced in as the JSON text it is stored as (the SQLite
fast path), never decoded and encoded again.  What the upstream receives, parsed, must be
exactly what the dict path sends: the system prompt, the stored window oldest first
(never starting with orphan tool results), then the request's messages."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from helpers import GatewayFactory, received, sendable, strict_loads, upstream_url
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from live import LiveGateway
from sqlalchemy.ext.asyncio import create_async_engine

from chatmem.config import StorageConfig
from chatmem.storage import Owner, Store, create_engine

Client = TestClient[Any, Any]
OWNER = Owner("default")  # the identity of a gateway without auth

CALLS = [
    {
        "id": "call_1",
        "type": "function",
        "function": {"name": "lookup", "arguments": '{"q": "caf\\u00e9 \\"x\\"", "n": 1}'},
    },
    {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": "{}"}},
]
AWKWARD: list[dict[str, Any]] = [
    {
        "role": "user",
        "content": 'naïve "quoted" \\back\\slash\\ \n new\r\nline \t tab \x00 nul \u2028'
        " 🦊👩‍👩‍👧 日本語",
        "name": 'ann "o\'brien" \\',
    },
    # Reasoning of a tool turn goes upstream again (memory.resend_reasoning).
    {"role": "assistant", "content": None, "tool_calls": CALLS, "reasoning": 'a "q" \\ é\n🦊'},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"answer": "42 ° \\u00e9"}'},
    {
        "role": "tool",
        "tool_call_id": "call_2",
        "content": [{"type": "text", "text": '12:00 "Z"\n'}],
    },
    {"role": "assistant", "content": "42 at noon", "reasoning": "both came back"},
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "what is this? \\u0041 is not A"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR=="}},
            {"type": "text", "text": "", "extra": {"n": 2**64 - 1, "f": 0.1, "e": -1.5e-300}},
        ],
    },
    {"role": "assistant", "content": "", "reasoning": "stored apart, never sent"},
    # No content (only an assistant message may have none): stored NULL, sent as null.
    {"role": "assistant", "unknown_field": "dropped"},
    {"role": "function", "name": "legacy_fn", "content": "[1, 2]"},
    {"role": "user", "content": "null"},  # the string "null", not JSON null
]


def wire(message: dict[str, Any], previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """A message as the history sends it back: role, content, and the set wire fields;
    an assistant message's reasoning as ``reasoning_content`` when it made tool calls or
    answers tool results (the ``previous`` message is one): memory.resend_reasoning's
    default, "tool_turns"."""
    sent = {"role": message["role"], "content": message.get("content")}
    for name in ("name", "tool_calls", "tool_call_id"):
        if message.get(name) is not None and message[name] != []:  # [] is stored as none
            sent[name] = message[name]
    tool_turn = bool(message.get("tool_calls")) or (
        previous is not None and previous["role"] in ("tool", "function")
    )
    if message["role"] == "assistant" and message.get("reasoning") is not None and tool_turn:
        sent["reasoning_content"] = message["reasoning"]
    return sent


def wires(stored: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``stored`` (a conversation's messages, oldest first) as the history sends them."""
    return [wire(m, stored[k - 1] if k else None) for k, m in enumerate(stored)]


def window(
    stored: list[dict[str, Any]], limit: int, start_at_user: bool = False, cut: bool = False
) -> list[dict[str, Any]]:
    """The newest ``limit`` messages, without leading tool or function results; with
    ``start_at_user``, once older messages are left out (``cut``, or ``limit`` messages
    there), from the first user message on (none, if there is none)."""
    kept = stored[-limit:]
    start = 0
    while start < len(kept) and kept[start]["role"] in ("tool", "function"):
        start += 1
    users = [k for k in range(start, len(kept)) if kept[k]["role"] == "user"]
    if start_at_user and (cut or len(kept) >= limit):
        start = users[0] if users else len(kept)
    return kept[start:]


def upstream_bodies(upstream: TestServer) -> list[Any]:
    return [strict_loads(r.body) for r in received(upstream) if r.path == "/v1/chat/completions"]


async def sqlalchemy_store(db_path: Path) -> Store:
    """A store on the same file that reads through SQLAlchemy: the dict path."""
    return Store(create_engine(StorageConfig(url=f"sqlite+aiosqlite:///{db_path}")), direct=False)


async def post(client: Client, conversation: str, **body: Any) -> Any:
    resp = await client.post(
        "/v1/chat/completions", json=body, headers={"X-Conversation-Id": conversation}
    )
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def test_awkward_history_reaches_the_upstream_exactly(
    gateway: Client, upstream: TestServer, db_path: Path
) -> None:
    system = {"role": "system", "content": 'Système "S" \\ 🦊\n'}
    first = await post(gateway, "awk", model="m", messages=[system, *AWKWARD])
    answer = first["choices"][0]["message"]["content"]
    # What the dict path (SQLAlchemy reading the same rows) would send as the history.
    reader = await sqlalchemy_store(db_path)
    try:
        history = await reader.load_history(OWNER, "awk", 200)
    finally:
        await reader.close()
    new = [{"role": "user", "content": "and now? ✓ \"'\\"}]
    await post(gateway, "awk", model="m", messages=new, temperature=0.5, stream=False, n=1)

    body = upstream_bodies(upstream)[-1]
    stored = wires([*AWKWARD, {"role": "assistant", "content": answer}])
    assert body == {
        "model": "m",
        "temperature": 0.5,
        "stream": False,
        "n": 1,
        "messages": [system, *stored, *new],
    }
    assert history.system == [system]
    assert body["messages"] == [system, *history.messages, *new]


async def test_orphan_tool_results_at_the_window_edge_are_dropped(
    gateway_factory: GatewayFactory, upstream: TestServer
) -> None:
    client = await gateway_factory(upstream_url(upstream), memory={"max_history_messages": 3})
    question = {"role": "user", "content": "q"}
    results = [
        {"role": "tool", "tool_call_id": "call_1", "content": "a"},
        {"role": "tool", "tool_call_id": "call_2", "content": "b"},
    ]
    # Stored: question, call, result, result, answer; the newest 3 start with two results.
    both = {"role": "assistant", "content": None, "tool_calls": CALLS}
    answer = await post(client, "two", model="m", messages=[question, both, *results])
    await post(client, "two", model="m", messages=[question])
    assert upstream_bodies(upstream)[-1]["messages"] == [
        {"role": "assistant", "content": answer["choices"][0]["message"]["content"]},
        question,
    ]
    # Stored: question, call, result, answer; the newest 3 start with the call: all kept.
    one = {"role": "assistant", "content": None, "tool_calls": CALLS[:1]}
    answer = await post(client, "one", model="m", messages=[question, one, results[0]])
    await post(client, "one", model="m", messages=[question])
    assert upstream_bodies(upstream)[-1]["messages"] == [
        one,
        results[0],
        {"role": "assistant", "content": answer["choices"][0]["message"]["content"]},
        question,
    ]


async def test_numbers_in_json_columns_come_back(gateway: Client, upstream: TestServer) -> None:
    """The JSON columns have SQLite's NUMERIC affinity, so a stored number comes back as an
    int or a float, not as JSON text; the conversation must still be readable.  (A chat
    request with such ``tool_calls`` is a 400 now; rows stored before that still exist.)"""
    from chatmem.state import GATEWAY

    odd = [
        {"role": "assistant", "content": "x", "tool_calls": 5},
        {"role": "assistant", "content": "y", "tool_calls": 0.5},
        {"role": "assistant", "content": "z", "tool_calls": "7"},
    ]
    store = gateway.server.app[GATEWAY].store
    await store.commit_turn(OWNER, "num", system=None, turn=odd)
    await post(gateway, "num", model="m", messages=[{"role": "user", "content": "q"}])
    assert upstream_bodies(upstream)[-1]["messages"] == [*odd, {"role": "user", "content": "q"}]


@pytest.mark.parametrize("limit", range(1, len(AWKWARD) + 2))
async def test_sqlite_fast_path_and_sqlalchemy_path_agree(
    db_path: Path, limit: int, storage_writer: str
) -> None:
    """Rows written by either path (orjson on the fast path, the same compact text through
    SQLAlchemy; "legacy": SQLAlchemy's own json.dumps, with ASCII escapes and spaces, as
    chatmem wrote before) read back the same through both, at every window size."""
    fast = Store(create_engine(StorageConfig(url=f"sqlite+aiosqlite:///{db_path}")))
    slow = await sqlalchemy_store(db_path)
    legacy = Store(create_async_engine(f"sqlite+aiosqlite:///{db_path}"), direct=False)
    await fast.create_schema()
    turn = [*AWKWARD, {"role": "assistant", "content": "done", "usage": {"total_tokens": 1}}]
    try:
        writer = {"fast": fast, "sqlalchemy": slow, "legacy": legacy}[storage_writer]
        await writer.commit_turn(OWNER, "c", system=[{"role": "system", "content": "é"}], turn=turn)
        expected = window(wires(turn), limit)
        for store in (fast, slow):
            history = await store.load_history(OWNER, "c", limit)
            assert history.system == [{"role": "system", "content": "é"}]
            assert history.messages == expected
            assert json.loads(b"[" + history.encoded + b"]") == expected
    finally:
        await fast.close()
        await slow.close()
        await legacy.close()


@pytest.fixture(params=["fast", "sqlalchemy", "legacy"])
def storage_writer(request: pytest.FixtureRequest) -> str:
    param: str = request.param
    return param


async def test_history_on_every_store(storage_url: str) -> None:
    """SQLite (fast path) and PostgreSQL give the same history for awkward messages."""
    store = Store(create_engine(StorageConfig(url=storage_url)))
    await store.create_schema()
    try:
        await store.commit_turn(OWNER, "c", system=None, turn=AWKWARD)
        history = await store.load_history(OWNER, "c", 200)
        assert history.system is None
        assert history.messages == wires(AWKWARD)
        assert (await store.load_history(OWNER, "missing", 200)).encoded == b""
    finally:
        await store.close()


# Generated conversations through a running gateway.

ROLES = ["user", "assistant", "tool", "function"]
# Integers within 64 bits: the request parser (orjson) reads a bigger one as a float.
json_leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_leaves,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=8,
)
parts = st.lists(
    st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "image_url"]), "text": st.text(max_size=30)},
        optional={"extra": json_values},
    ),
    min_size=1,
    max_size=3,
)
tool_calls = st.lists(
    st.fixed_dictionaries(
        {
            "id": st.text(min_size=1, max_size=10),
            "type": st.just("function"),
            "function": st.fixed_dictionaries(
                {"name": st.text(max_size=10), "arguments": st.text(max_size=30)}
            ),
        }
    ),
    max_size=2,
)
identifier_chars = st.characters(exclude_characters="\x00", exclude_categories=("Cs",))


messages = st.fixed_dictionaries(
    {"role": st.sampled_from(ROLES)},
    optional={
        "content": st.text(max_size=60) | parts | st.none(),
        # No NUL in identifiers: refused with a 400 (test_chat_memory.py); no lone
        # surrogates anywhere (a 400 too, test_lone_surrogates.py).
        "name": st.text(identifier_chars, max_size=20),
        "tool_calls": tool_calls,
        "tool_call_id": st.text(identifier_chars, max_size=20),
        "reasoning": st.text(max_size=10),
    },
).map(sendable)
systems = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "developer"]), "content": st.text(max_size=30)}
    ),
    max_size=1,
)
LIMIT = 5


@pytest.fixture
def live(tmp_path: Path) -> Iterator[LiveGateway]:
    with LiveGateway(tmp_path / "splice.db", memory={"max_history_messages": LIMIT}) as gateway:
        yield gateway


def test_generated_history_reaches_the_upstream_exactly(live: LiveGateway) -> None:
    generated_history(live, itertools.count())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    system=systems,
    first=st.lists(messages, min_size=1, max_size=6),
    later_system=systems,
    new=st.lists(messages, max_size=2),
    extra=st.dictionaries(st.sampled_from(["temperature", "stop", "vendor_x"]), json_values),
)
def generated_history(
    live: LiveGateway,
    ids: Iterator[int],
    system: list[dict[str, Any]],
    first: list[dict[str, Any]],
    later_system: list[dict[str, Any]],
    new: list[dict[str, Any]],
    extra: dict[str, Any],
) -> None:
    headers = {"X-Conversation-Id": f"gen-{next(ids)}"}

    async def turns() -> tuple[Any, bytes]:
        resp = await live.mocked.post(
            "/v1/chat/completions",
            json={"model": "m", "messages": [*system, *first]},
            headers=headers,
        )
        assert resp.status == 200, await resp.text()
        answer = await resp.json()
        body = {**extra, "model": "m", "messages": [*later_system, *new]}
        resp = await live.mocked.post("/v1/chat/completions", json=body, headers=headers)
        assert resp.status == 200, await resp.text()
        return answer, live.received()[-1].body

    answer, sent = live.run(turns())
    stored = wires(
        [*first, {"role": "assistant", "content": answer["choices"][0]["message"]["content"]}]
    )
    assert strict_loads(sent) == {
        **extra,
        "model": "m",
        "messages": [*(later_system or system), *window(stored, LIMIT), *new],
    }


def compact(message: dict[str, Any]) -> int:
    """The size of ``message`` as the upstream gets it (compact JSON, UTF-8)."""
    return len(json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode())


BUDGETED = [
    {"role": "user", "content": "a" * 10},
    {"role": "assistant", "content": None, "tool_calls": CALLS[:1], "reasoning": "b" * 7},
    {"role": "tool", "tool_call_id": "call_1", "content": "é" * 30},
    {"role": "assistant", "content": "d" * 40, "reasoning": "c" * 9},
    {"role": "user", "content": "e" * 5},
    {"role": "assistant", "content": "f" * 20},
]


@pytest.mark.parametrize("writer", ["fast", "sqlalchemy"])
async def test_max_history_bytes_keeps_the_newest_messages_that_fit(
    storage_url: str, writer: str
) -> None:
    """At every budget around the sizes of the newest messages: the newest ones whose JSON
    text adds up to at most the budget, then no leading tool result; on every store, read
    through either path, whichever path wrote them (the Conversations API writes through
    SQLAlchemy, and the SQLite fast path sends and counts the text as stored)."""
    fast = Store(create_engine(StorageConfig(url=storage_url)))
    slow = Store(create_engine(StorageConfig(url=storage_url)), direct=False)
    await fast.create_schema()
    sent = wires(BUDGETED)
    sizes = [compact(m) for m in sent]
    ends = [sum(sizes[k:]) for k in range(len(sizes))]  # messages k.. (the newest) together
    budgets = sorted({1, *ends, *(e - 1 for e in ends), *(e + 1 for e in ends)})
    try:
        await (fast if writer == "fast" else slow).commit_turn(
            OWNER, "b", system=None, turn=BUDGETED
        )
        for store in (fast, slow):
            for budget in budgets:
                newest = [m for k, m in enumerate(sent) if ends[k] <= budget]
                history = await store.load_history(OWNER, "b", 200, max_bytes=budget)
                assert history.messages == window(newest, len(newest)), budget
                # memory.start_at_user: once the budget left older messages out, from a
                # user message on (if one is left).
                turned = await store.load_history(
                    OWNER, "b", 200, max_bytes=budget, start_at_user=True
                )
                cut = len(newest) < len(BUDGETED)
                assert turned.messages == window(newest, 200, True, cut), budget
            unlimited = await store.load_history(OWNER, "b", 200)
            assert unlimited.messages == sent
            assert len(unlimited.encoded) == sum(sizes) + len(sizes) - 1  # the sizes are right
            # The message limit applies first: the budget chooses among those messages.
            two = await store.load_history(OWNER, "b", 2, max_bytes=ends[0])
            assert two.messages == sent[-2:]
    finally:
        await fast.close()
        await slow.close()
