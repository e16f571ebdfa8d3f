"""History blocks (``storage/blocks.py``): a long conversation's window read from a few
rows of joined JSON texts must be, byte for byte, the window read message by message, on
a real SQLite file, whatever the window's size, budget, deletes and ``resend_reasoning``;
and what the upstream receives through the gateway must not change."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from itertools import accumulate
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from helpers import GatewayFactory, received, strict_loads, upstream_url
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_history_splice import AWKWARD, wires

from chatmem.config import ResendReasoning, StorageConfig
from chatmem.storage import Owner, Store, create_engine
from chatmem.storage.blocks import BLOCK, Blocks
from chatmem.storage.integrity import check_integrity
from chatmem.storage.migrate import downgrade, upgrade
from chatmem.storage.texts import Texts

OWNER = Owner("default")


async def open_store(
    db_path: Path, resend: ResendReasoning = "tool_turns", *, direct: bool = True, keep: int = 200
) -> Store:
    url = f"sqlite+aiosqlite:///{db_path}"
    store = Store(
        create_engine(StorageConfig(url=url)),
        direct=direct,
        resend_reasoning=resend,
        window_messages=keep,
    )
    await store.create_schema()
    return store


def turns(count: int) -> list[list[dict[str, Any]]]:
    """Turns of 11 messages (tool calls, their results, reasoning, names, odd text) and of
    2, so that blocks start and end in the middle of turns and of tool exchanges."""
    done: list[list[dict[str, Any]]] = []
    for k in range(count):
        answer = {"role": "assistant", "content": f"answer {k}", "reasoning": f"why {k}"}
        if k % 3 == 1:
            done.append([{"role": "user", "content": f"q {k} \u00e9 \"'"}, answer])
        else:
            done.append([*AWKWARD, answer])
    return done


async def stored(db_path: Path, count: int, keep: int = 200) -> list[dict[str, Any]]:
    """A conversation "c" of ``count`` turns written by the SQLite fast path; its messages."""
    store = await open_store(db_path, keep=keep)
    try:
        for turn in turns(count):
            await store.commit_turn(OWNER, "c", system=None, turn=turn)
    finally:
        await store.close()
    return [m for turn in turns(count) for m in turn]


def block_ends(db_path: Path) -> list[int]:
    with sqlite3.connect(db_path) as conn:
        return [row[0] for row in conn.execute("SELECT last_seq FROM history_blocks ORDER BY 1")]


def drop_blocks(db_path: Path) -> None:
    with sqlite3.connect(db_path) as conn:
        conn.execute("DELETE FROM history_blocks")


async def read(
    db_path: Path,
    limit: int,
    max_bytes: int = 0,
    resend: ResendReasoning = "tool_turns",
    *,
    direct: bool = True,
) -> bytes:
    """The history text a chat request would send, read by a store just opened (nothing
    cached); ``direct=False``: through SQLAlchemy, row by row, as the oracle."""
    store = await open_store(db_path, resend, direct=direct)
    try:
        history = await store.load_history(OWNER, "c", limit, max_bytes=max_bytes)
    finally:
        await store.close()
    return history.encoded


async def test_a_window_from_blocks_is_the_window_read_row_by_row(db_path: Path) -> None:
    messages = await stored(db_path, 24)  # 192 messages
    last = len(messages)
    assert block_ends(db_path) == list(range(BLOCK, last + 1, BLOCK))
    cases = [(limit, 0) for limit in (1, 2, 7, 31, 32, 33, 64, 100, 167, 168, 200)]
    cases += [(200, budget) for budget in (1, 300, 2_000, 5_000, 9_999, 20_000)]
    cases += [(40, 2_000), (140, 9_000)]
    # Budgets that the newest k messages fill exactly, and one byte short of that.
    with sqlite3.connect(db_path) as conn:
        conn.text_factory = bytes
        window, _ = Blocks("tool_turns", 200).read(conn, 1, last, 200, 0)
    sizes = list(accumulate(reversed([width - 1 for width in window.widths])))
    cases += [(200, sizes[k] - d) for k in (0, 5, 31, 32, 40, 77, 150) for d in (0, 1)]
    with_blocks = {case: await read(db_path, *case) for case in cases}
    oracle = {case: await read(db_path, *case, direct=False) for case in cases}
    drop_blocks(db_path)
    for case in cases:
        rows = await read(db_path, *case)
        assert with_blocks[case] == rows, case
        assert json.loads(b"[" + rows + b"]") == json.loads(b"[" + oracle[case] + b"]"), case
    assert len(json.loads(b"[" + with_blocks[(200, 0)] + b"]")) == last


async def test_the_window_is_read_from_the_blocks(db_path: Path) -> None:
    """Change a block behind the store's back and the window changes with it: the test
    above compares blocks with rows, so it must be the blocks that were read."""
    await stored(db_path, 24)
    with sqlite3.connect(db_path) as conn:
        body = conn.execute("SELECT body FROM history_blocks WHERE last_seq = 64").fetchone()[0]
        assert b'"answer 5"' in body
        conn.execute(
            "UPDATE history_blocks SET body = ? WHERE last_seq = 64",
            (body.replace(b'"answer 5"', b'"ANSWER 5"'),),
        )
    sent = await read(db_path, 200)
    assert b'"ANSWER 5"' in sent and b'"answer 5"' not in sent


@pytest.mark.parametrize(
    "damage",
    [
        "sizes = 'x'",
        "roles = 'user'",
        "sizes = '3,4'",
        "sizes = replace(sizes, ',', '.0,')",  # numbers, but not integers
        "sizes = '\"a\",' || sizes",
        "sizes = '9223372036854775808,' || sizes",  # past 64 bits
        "sizes = '[' || sizes || ']'",
        "body = substr(body, 1, length(body) - 1)",  # no comma after the last text
    ],
)
async def test_a_block_that_cannot_be_read_is_read_as_rows(db_path: Path, damage: str) -> None:
    await stored(db_path, 24)
    with sqlite3.connect(db_path) as conn:  # the newest block, read by every window
        conn.execute(f"UPDATE history_blocks SET {damage} WHERE last_seq = 192")
    cases = [(200, 0), (1, 10_000)]
    sent = [await read(db_path, *case) for case in cases]
    drop_blocks(db_path)
    assert sent == [await read(db_path, *case) for case in cases]


async def test_blocks_of_0004_are_dropped_and_never_read(db_path: Path) -> None:
    """0004 kept the texts without commas, and where each ended instead of its size.  Such
    a block is read as rows, and migration
    0005 drops them, both ways (each revision's chatmem would misread the other's)."""
    await stored(db_path, 24)
    with sqlite3.connect(db_path) as conn:
        conn.text_factory = bytes
        roles, sizes, body = conn.execute(
            "SELECT roles, sizes, body FROM history_blocks WHERE last_seq = 192"
        ).fetchone()
        widths = json.loads(b"[" + sizes + b"]")
        old = [text for _, text in Texts(roles.decode().split(), body, widths).pairs()]
        conn.execute(
            "UPDATE history_blocks SET sizes = ?, body = ? WHERE last_seq = 192",
            (",".join(map(str, accumulate(map(len, old)))).encode(), b"".join(old)),
        )
    sent = await read(db_path, 200)
    drop_blocks(db_path)
    assert sent == await read(db_path, 200)
    assert json.loads(b"[" + sent + b"]")[-1]["content"] == "answer 23"

    def blocks() -> int:
        with sqlite3.connect(db_path) as conn:
            return int(conn.execute("SELECT count(*) FROM history_blocks").fetchone()[0])

    await stored(db_path, 24)  # 24 turns more, and their blocks
    engine = create_engine(StorageConfig(url=f"sqlite+aiosqlite:///{db_path}"))
    try:
        assert blocks() == 6
        await downgrade(engine, "0004")
        assert blocks() == 0
        with sqlite3.connect(db_path) as conn:  # as chatmem at 0004 wrote them
            conn.execute(
                "INSERT INTO history_blocks VALUES (1, 32, 1, 'tool_turns', 'user', '2', '{}')"
            )
        await upgrade(engine)
        assert blocks() == 0
    finally:
        await engine.dispose()


async def test_db_check_finds_a_block_that_is_not_a_copy(db_path: Path) -> None:
    await stored(db_path, 24)
    store = await open_store(db_path)
    try:
        assert await check_integrity(store, chat_only=True) == []
        with sqlite3.connect(db_path) as conn:
            conn.execute(
                "UPDATE history_blocks SET body = CAST(replace(body, 'answer 3', 'ANSWER 3')"
                " AS BLOB) WHERE last_seq = 64"
            )
            conn.execute("UPDATE history_blocks SET sizes = 'x' WHERE last_seq = 96")
            conn.execute("UPDATE history_blocks SET body = body || 'x' WHERE last_seq = 192")
            conn.execute("UPDATE history_blocks SET resend = 'often' WHERE last_seq = 128")
            conn.execute("UPDATE history_blocks SET conversation_pk = 9 WHERE last_seq = 160")
        assert await check_integrity(store) == [
            "1 history block(s) of missing conversation pk=9",
            "conversation 'c' (pk=1): history block 33..64 differs from the messages it copies",
            "conversation 'c' (pk=1): history block 65..96 cannot be read",
            "conversation 'c' (pk=1): history block 97..128 is not one this chatmem writes",
            "conversation 'c' (pk=1): history block 161..192 cannot be read",
        ]
    finally:
        await store.close()


async def test_deleting_an_item_drops_its_block_and_the_next(db_path: Path) -> None:
    """Its messages' block goes, and the block of the message after them, whose
    reasoning may go upstream again by the role of the one before (a tool result)."""
    await stored(db_path, 24)
    store = await open_store(db_path)
    try:
        with sqlite3.connect(db_path) as conn:
            roles = dict(conn.execute("SELECT seq, role FROM messages"))
        user = next(seq for seq in range(40, 60) if roles[seq] == "user")
        deleted = await store.delete_item(OWNER, "c", user)
        assert deleted is not None and deleted.seqs == [user]
        assert block_ends(db_path) == [32, 96, 128, 160, 192]  # 64 held it
        # The last message of a block: that block goes, and the next (its message follows).
        assert roles[128] == "assistant"
        deleted = await store.delete_item(OWNER, "c", 128)
        assert deleted is not None and deleted.seqs == [128]
        assert block_ends(db_path) == [32, 96, 192]
        # An assistant message with tool calls goes with its results.
        call = next(seq for seq in range(1, 30) if roles[seq] == "assistant")
        deleted = await store.delete_item(OWNER, "c", call)
        assert deleted is not None and deleted.seqs == [call, call + 1, call + 2]
        assert block_ends(db_path) == [96, 192]
        # The turn that reaches the next multiple of a block writes it, gaps and all
        # (193..195 are numbers the deletes took).
        for _ in range(15):
            await store.commit_turn(OWNER, "c", system=None, turn=turns(2)[1])
        assert block_ends(db_path) == [96, 192, 224]
        assert await check_integrity(store) == []
    finally:
        await store.close()
    with_blocks = await read(db_path, 200)
    oracle = await read(db_path, 200, direct=False)
    drop_blocks(db_path)
    assert with_blocks == await read(db_path, 200)
    assert json.loads(b"[" + with_blocks + b"]") == json.loads(b"[" + oracle + b"]")


async def test_deleting_the_message_before_a_block_remakes_its_first_message(
    db_path: Path,
) -> None:
    """An assistant message's reasoning goes again when the message before it is a tool
    result ("tool_turns"): with that result deleted, the block that starts with the
    answer no longer holds what a read makes of it, and must go too."""
    store = await open_store(db_path)
    try:
        before = made(["user"] * 31 + ["tool"], 0)  # seq 32: a result of no stored call
        after = made(["assistant+reasoning"] + ["user"] * 31, 32)  # seq 33 answers it
        await store.commit_turn(OWNER, "c", system=None, turn=before)
        await store.commit_turn(OWNER, "c", system=None, turn=after)
        assert block_ends(db_path) == [32, 64]
        assert b'"reasoning_content":"r32"' in await read(db_path, 200)
        deleted = await store.delete_item(OWNER, "c", 32)
        assert deleted is not None and deleted.seqs == [32]
        assert block_ends(db_path) == []
    finally:
        await store.close()
    sent = await read(db_path, 200)
    assert b"r32" not in sent
    assert json.loads(b"[" + sent + b"]") == json.loads(
        b"[" + await read(db_path, 200, direct=False) + b"]"
    )


async def test_messages_changed_in_the_file_itself_drop_their_blocks(db_path: Path) -> None:
    """Triggers (migration 0004) keep the blocks exact whoever changes a message: here a
    plain ``sqlite3`` connection, as an operator fixing a row by hand would."""
    await stored(db_path, 24)
    with sqlite3.connect(db_path) as conn:
        conn.execute("DELETE FROM messages WHERE seq = 40")
        conn.execute("UPDATE messages SET content = '\"fixed\"' WHERE seq = 100")
        conn.execute("UPDATE messages SET seq = 999 WHERE seq = 150")  # to the end
    assert block_ends(db_path) == [32, 96]  # 64 (40), 128 (100), 160 and on (150 moved)
    sent = await read(db_path, 200)
    assert b'"fixed"' in sent
    drop_blocks(db_path)
    assert sent == await read(db_path, 200)


async def test_blocks_of_another_size_are_not_used(db_path: Path) -> None:
    """A block of 64 messages ending where one of 32 would (as another chatmem might
    write them) would put messages 1..32 into the window twice."""
    await stored(db_path, 24)
    with sqlite3.connect(db_path) as conn:
        first, second = conn.execute(
            "SELECT roles, sizes, body FROM history_blocks WHERE last_seq IN (32, 64)"
            " ORDER BY last_seq"
        ).fetchall()
        conn.execute(
            "UPDATE history_blocks SET first_seq = 1, roles = ?, sizes = ?, body = ?"
            " WHERE last_seq = 64",
            (first[0] + b" " + second[0], first[1] + b"," + second[1], first[2] + second[2]),
        )
        conn.execute("DELETE FROM history_blocks WHERE last_seq = 32")
    got = await read(db_path, 200)
    assert json.loads(b"[" + got + b"]") == json.loads(
        b"[" + await read(db_path, 200, direct=False) + b"]"
    )


async def test_large_messages_are_read_row_by_row(db_path: Path) -> None:
    """A block is at most 256 KiB (``BLOCK_MAX_BYTES``): 32 messages of 2 MiB copied in
    one commit held the event loop 116 ms, and a read loaded all of them whatever its
    budget (helper-117's review)."""
    store = await open_store(db_path)
    try:
        for size in (20_000, 7_000):  # 32 x 20 kB is over the limit, 32 x 7 kB under
            for k in range(16):
                turn = [
                    {"role": "user", "content": f"{size} {k} " + "q" * size},
                    {"role": "assistant", "content": "a" * size},
                ]
                await store.commit_turn(OWNER, "c", system=None, turn=turn)
        await store.commit_turn(OWNER, "c", system=None, turn=[])  # nothing to add: fine
    finally:
        await store.close()
    assert block_ends(db_path) == [64]  # 33..64 holds the 7 kB messages, 1..32 none
    sent = {budget: await read(db_path, 200, budget) for budget in (0, 100_000, 300_000)}
    drop_blocks(db_path)
    for budget, got in sent.items():
        assert got == await read(db_path, 200, budget), budget


async def test_a_role_with_a_space_in_it_gets_no_block(db_path: Path) -> None:
    """No role the gateway takes has one, but a row written by hand may: its block would
    hold one role more than messages."""
    await stored(db_path, 1)  # 11 messages
    with sqlite3.connect(db_path) as conn:
        conn.execute("UPDATE messages SET role = 'odd\u2003role' WHERE seq = 3")
    store = await open_store(db_path)
    try:
        for turn in turns(12)[1:]:
            await store.commit_turn(OWNER, "c", system=None, turn=turn)
    finally:
        await store.close()
    assert block_ends(db_path)[0] == 64  # not 32, which holds seq 3
    sent = await read(db_path, 200)
    assert '{"role":"odd\u2003role"'.encode() in sent
    drop_blocks(db_path)
    assert sent == await read(db_path, 200)


async def test_blocks_of_another_resend_reasoning_are_not_used(db_path: Path) -> None:
    await stored(db_path, 24)  # under "tool_turns"
    for resend in ("always", "never"):
        got = await read(db_path, 200, resend=resend)
        oracle = await read(db_path, 200, resend=resend, direct=False)
        assert json.loads(b"[" + got + b"]") == json.loads(b"[" + oracle + b"]")
    assert b"why 0" not in await read(db_path, 200, resend="tool_turns")
    assert b"why 0" in await read(db_path, 200, resend="always")


async def test_blocks_are_kept_for_the_window_only(db_path: Path) -> None:
    """Blocks go once they are further back than ``max_history_messages`` and a block:
    the copy stays small however long the conversation grows."""
    messages = await stored(db_path, 40, keep=40)  # 280 messages
    last = len(messages)
    newest = last - last % BLOCK
    assert block_ends(db_path) == [e for e in range(BLOCK, newest + 1, BLOCK) if e > newest - 72]
    with_blocks = await read(db_path, 40)
    drop_blocks(db_path)
    assert with_blocks == await read(db_path, 40)


async def test_deleting_conversations_deletes_their_blocks(db_path: Path) -> None:
    await stored(db_path, 12)
    store = await open_store(db_path)
    try:
        for turn in turns(12):
            await store.commit_turn(OWNER, "d", system=None, turn=turn)
        with sqlite3.connect(db_path) as conn:
            owners = "SELECT count(DISTINCT conversation_pk) FROM history_blocks"
            assert conn.execute(owners).fetchone()[0] == 2
        assert await store.delete_conversation(OWNER, "c")
        with sqlite3.connect(db_path) as conn:
            conn.execute("UPDATE conversations SET updated_at = ?", (int(time.time()) - 7200,))
        assert await store.prune(3600) == 1
    finally:
        await store.close()
    assert block_ends(db_path) == []


async def test_through_the_gateway_a_long_history_survives_a_restart(
    gateway_factory: GatewayFactory, upstream: TestServer, db_path: Path
) -> None:
    """``memory.max_history_messages`` reaches the store: blocks are kept for it; a gateway
    started afresh (nothing cached) sends the same window."""
    url = upstream_url(upstream)
    first = await gateway_factory(url, memory={"max_history_messages": 8})
    answers = []
    for k in range(50):
        resp = await first.post(
            "/v1/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": f"q{k}"}]},
            headers={"X-Conversation-Id": "c"},
        )
        assert resp.status == 200, await resp.text()
        answers.append((await resp.json())["choices"][0]["message"]["content"])
    assert block_ends(db_path) == [64, 96]  # 32 dropped when 96 came (8 + a block back)
    stored_messages = []
    for k, answer in enumerate(answers):
        stored_messages += [
            {"role": "user", "content": f"q{k}"},
            {"role": "assistant", "content": answer},
        ]
    second = await gateway_factory(url, memory={"max_history_messages": 8})
    new = {"role": "user", "content": "and now?"}
    resp = await second.post(
        "/v1/chat/completions",
        json={"model": "m", "messages": [new]},
        headers={"X-Conversation-Id": "c"},
    )
    assert resp.status == 200, await resp.text()
    sent = [r for r in received(upstream) if r.path == "/v1/chat/completions"][-1]
    assert strict_loads(sent.body)["messages"] == [*wires(stored_messages)[-8:], new]


ROLES = ["user", "assistant", "assistant+calls", "assistant+reasoning", "tool"]
operations = st.lists(
    st.one_of(
        st.tuples(st.just("turn"), st.lists(st.sampled_from(ROLES), min_size=1, max_size=40)),
        st.tuples(st.just("append"), st.lists(st.sampled_from(ROLES), min_size=1, max_size=8)),
        st.tuples(st.just("delete"), st.integers(1, 400)),
    ),
    min_size=1,
    max_size=14,
)


def made(roles: list[str], start: int) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    for k, kind in enumerate(roles, start):
        if kind == "assistant+calls":
            call = {
                "id": f"call_{k}",
                "type": "function",
                "function": {"name": "f", "arguments": "{}"},
            }
            messages.append(
                {"role": "assistant", "content": None, "tool_calls": [call], "reasoning": f"r{k}"}
            )
        elif kind == "assistant+reasoning":
            messages.append({"role": "assistant", "content": f"a{k}", "reasoning": f"r{k}"})
        elif kind == "tool":
            messages.append({"role": "tool", "tool_call_id": f"call_{k - 1}", "content": f"t{k}"})
        else:
            messages.append({"role": kind, "content": f"{kind[0]}{k} \u00e9"})
    return messages


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=operations, resend=st.sampled_from(["tool_turns", "always", "never"]))
def test_any_history_reads_the_same_from_blocks_and_rows(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, Any]], resend: ResendReasoning
) -> None:
    """Turns of any length and roles, items appended and deleted through the
    Conversations API, any ``resend_reasoning``: every window and budget reads the same
    from the blocks as row by row, and as through SQLAlchemy; ``db check`` is clean."""
    db_path = tmp_path_factory.mktemp("blocks") / "chatmem.db"

    async def run() -> None:
        store = await open_store(db_path, resend, keep=64)
        try:
            count = 0
            for op, arg in ops:
                if op == "turn":
                    await store.commit_turn(OWNER, "c", system=None, turn=made(arg, count))
                    count += len(arg)
                elif op == "append" and count:
                    await store.append_items(OWNER, "c", system=None, items=made(arg, count))
                    count += len(arg)
                elif op == "delete" and count:
                    await store.delete_item(OWNER, "c", arg)
            assert await check_integrity(store) == []
        finally:
            await store.close()
        cases = [(limit, 0) for limit in (1, 20, 33, 64, 100)] + [(64, 900), (100, 2_500)]
        with_blocks = [await read(db_path, *case, resend=resend) for case in cases]
        oracle = [await read(db_path, *case, resend=resend, direct=False) for case in cases]
        drop_blocks(db_path)
        for case, got, expected in zip(cases, with_blocks, oracle, strict=True):
            assert got == await read(db_path, *case, resend=resend), case
            assert json.loads(b"[" + got + b"]") == json.loads(b"[" + expected + b"]"), case

    asyncio.run(run())
