"""The Conversations API: OpenAI's shapes, stored rows, pagination and validation."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from helpers import Rows, received

Client = TestClient[Any, Any]


async def create(client: Client, body: dict[str, Any] | None = None) -> dict[str, Any]:
    response = await client.post("/v1/conversations", json=body or {})
    assert response.status == 200, await response.text()
    result: dict[str, Any] = await response.json()
    return result


async def ok(response: Any) -> Any:
    assert response.status == 200, await response.text()
    return await response.json()


async def bad(response: Any, fragment: str, param: str | None = None) -> dict[str, Any]:
    assert response.status == 400, await response.text()
    error: dict[str, Any] = (await response.json())["error"]
    assert error["type"] == "invalid_request_error"
    assert fragment in error["message"], error["message"]
    if param is not None:
        assert error["param"] == param
    return error


async def test_create_get_update_delete(gateway: Client, rows: Rows) -> None:
    made = await create(
        gateway,
        {
            "metadata": {"topic": "demo"},
            "items": [
                {"role": "system", "content": "Be brief."},
                {"type": "message", "role": "user", "content": "Hello"},
                {"role": "assistant", "content": [{"type": "output_text", "text": "Hi!"}]},
            ],
        },
    )
    assert set(made) == {"id", "object", "created_at", "metadata"}
    assert made["object"] == "conversation"
    assert made["metadata"] == {"topic": "demo"}
    assert made["id"].startswith("conv_")
    assert isinstance(made["created_at"], int)
    conversation_id = made["id"]

    (stored,) = rows.conversations()
    assert stored["id"] == conversation_id
    # The same compact text as the chat path writes (SQLite sends it as stored).
    assert stored["system_prompt"] == '[{"role":"system","content":"Be brief."}]'
    assert [(m["seq"], m["role"], m["content"]) for m in rows.messages(conversation_id)] == [
        (1, "user", '"Hello"'),
        (2, "assistant", '[{"type":"text","text":"Hi!"}]'),
    ]

    assert await ok(await gateway.get(f"/v1/conversations/{conversation_id}")) == made
    updated = await ok(
        await gateway.post(f"/v1/conversations/{conversation_id}", json={"metadata": {"a": "b"}})
    )
    assert updated == {**made, "metadata": {"a": "b"}}
    assert await ok(await gateway.get(f"/v1/conversations/{conversation_id}")) == updated

    deleted = await ok(await gateway.delete(f"/v1/conversations/{conversation_id}"))
    assert deleted == {"id": conversation_id, "object": "conversation.deleted", "deleted": True}
    assert rows.conversations() == [] and rows.messages() == []
    response = await gateway.get(f"/v1/conversations/{conversation_id}")
    assert response.status == 404
    assert (await response.json())["error"]["type"] == "not_found_error"
    assert (await gateway.delete(f"/v1/conversations/{conversation_id}")).status == 404


async def test_empty_body_creates_an_empty_conversation(gateway: Client, rows: Rows) -> None:
    response = await gateway.post("/v1/conversations")
    made = await ok(response)
    assert made["metadata"] == {}
    assert [c["id"] for c in rows.conversations()] == [made["id"]]
    assert rows.messages() == []


async def test_items_list_append_get_delete(gateway: Client, rows: Rows) -> None:
    made = await create(gateway, {"items": [{"role": "user", "content": f"m{i}"} for i in (1, 2)]})
    base = f"/v1/conversations/{made['id']}/items"
    appended = await ok(
        await gateway.post(
            base,
            json={
                "items": [
                    _calls("c1"),
                    {"role": "tool", "tool_call_id": "c1", "content": "42", "name": "calc"},
                ]
            },
        )
    )
    assert [i["id"] for i in appended["data"]] == ["msg_3", "msg_4"]
    assert appended["object"] == "list" and appended["has_more"] is False

    newest = await ok(await gateway.get(base))
    assert [i["id"] for i in newest["data"]] == ["msg_4", "msg_3", "msg_2", "msg_1"]
    assert newest["first_id"] == "msg_4" and newest["last_id"] == "msg_1"
    tool = newest["data"][0]
    assert tool["type"] == "message" and tool["role"] == "tool"
    assert tool["tool_call_id"] == "c1" and tool["name"] == "calc" and tool["content"] == "42"
    assert isinstance(tool["created_at"], int)

    page = await ok(await gateway.get(base, params={"order": "asc", "limit": "2"}))
    assert [i["id"] for i in page["data"]] == ["msg_1", "msg_2"] and page["has_more"] is True
    page = await ok(
        await gateway.get(base, params={"order": "asc", "limit": "2", "after": "msg_2"})
    )
    assert [i["id"] for i in page["data"]] == ["msg_3", "msg_4"] and page["has_more"] is False
    page = await ok(await gateway.get(base, params={"after": "msg_3"}))
    assert [i["id"] for i in page["data"]] == ["msg_2", "msg_1"]

    one = await ok(await gateway.get(f"{base}/msg_2"))
    assert one["content"] == "m2" and one["role"] == "user"
    after_delete = await ok(await gateway.delete(f"{base}/msg_2"))
    assert after_delete["id"] == made["id"] and after_delete["object"] == "conversation"
    assert [m["seq"] for m in rows.messages(made["id"])] == [1, 3, 4]
    for method in ("GET", "DELETE"):
        for item in ("msg_2", "msg_99", "nonsense", "msg_0"):
            response = await gateway.request(method, f"{base}/{item}")
            assert response.status == 404
            assert (await response.json())["error"]["message"] == "item not found"
    # Sequence numbers are never reused, and a delete takes one (a turn read before it
    # is checked at its commit): the next item after a delete is msg_6.
    again = await ok(await gateway.post(base, json={"items": [{"role": "user", "content": "x"}]}))
    assert [i["id"] for i in again["data"]] == ["msg_6"]


async def test_items_are_the_chat_history(
    gateway: Client, upstream: TestServer, rows: Rows
) -> None:
    made = await create(
        gateway,
        {
            "items": [
                {"role": "developer", "content": "Answer in French."},
                {"role": "user", "content": [{"type": "input_text", "text": "Bonjour"}]},
                {"role": "assistant", "content": "Salut"},
            ]
        },
    )
    response = await gateway.post(
        "/v1/chat/completions",
        json={"model": "m", "messages": [{"role": "user", "content": "Ça va?"}]},
        headers={"X-Conversation-Id": made["id"]},
    )
    assert response.status == 200
    assert received(upstream)[-1].json["messages"] == [
        {"role": "developer", "content": "Answer in French."},
        {"role": "user", "content": [{"type": "text", "text": "Bonjour"}]},
        {"role": "assistant", "content": "Salut"},
        {"role": "user", "content": "Ça va?"},
    ]
    items = await ok(await gateway.get(f"/v1/conversations/{made['id']}/items?order=asc"))
    assert [i["role"] for i in items["data"]] == ["user", "assistant", "user", "assistant"]
    answer = items["data"][-1]
    assert answer["model"] == "m" and answer["finish_reason"] == "stop"
    assert answer["usage"]["total_tokens"] > 0


async def test_the_conversations_apis_own_parts_go_upstream_as_chat_parts(
    gateway: Client, upstream: TestServer
) -> None:
    # What the OpenAI SDK's typed items hold (found by a probe): no chat server takes
    # input_image or input_file parts, nor output_text's annotations and logprobs.
    parts = [
        {"type": "input_text", "text": "What is in"},
        {"type": "input_image", "image_url": "https://example.test/a.png", "detail": "low"},
        {"type": "input_file", "file_id": "file-1", "filename": "a.pdf"},
        {"type": "video_url", "video_url": {"url": "v.mp4"}},  # vLLM's own: as it is
    ]
    answer = [{"type": "output_text", "text": "A cat.", "annotations": [], "logprobs": []}]
    made = await create(
        gateway,
        {"items": [{"role": "user", "content": parts}, {"role": "assistant", "content": answer}]},
    )
    response = await gateway.post(
        "/v1/chat/completions",
        json={"model": "m", "messages": [{"role": "user", "content": "And?"}]},
        headers={"X-Conversation-Id": made["id"]},
    )
    assert response.status == 200
    assert received(upstream)[-1].json["messages"][:2] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in"},
                {
                    "type": "image_url",
                    "image_url": {"url": "https://example.test/a.png", "detail": "low"},
                },
                {"type": "file", "file": {"file_id": "file-1", "filename": "a.pdf"}},
                {"type": "video_url", "video_url": {"url": "v.mp4"}},
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
    ]


async def test_walk_250_conversations_each_exactly_once(gateway: Client) -> None:
    created = [(await create(gateway, {"metadata": {"n": str(i)}}))["id"] for i in range(250)]
    for order, expected in (("desc", created[::-1]), ("asc", created)):
        seen: list[str] = []
        after: str | None = None
        for _ in range(100):  # bounded: 250 / 7 pages
            params = {"limit": "7", "order": order, **({"after": after} if after else {})}
            page = await ok(await gateway.get("/v1/conversations", params=params))
            ids = [c["id"] for c in page["data"]]
            assert page["object"] == "list"
            assert page["first_id"] == ids[0] and page["last_id"] == ids[-1]
            seen.extend(ids)
            if not page["has_more"]:
                break
            after = page["last_id"]
        assert seen == expected
    default = await ok(await gateway.get("/v1/conversations"))
    assert [c["id"] for c in default["data"]] == created[::-1][:20]
    assert default["data"][0]["metadata"] == {"n": "249"}
    full = await ok(await gateway.get("/v1/conversations?limit=100"))
    assert len(full["data"]) == 100 and full["has_more"] is True


async def test_empty_list(gateway: Client) -> None:
    page = await ok(await gateway.get("/v1/conversations"))
    assert page == {
        "object": "list",
        "data": [],
        "first_id": None,
        "last_id": None,
        "has_more": False,
    }


async def test_chat_conversations_are_listed(gateway: Client) -> None:
    await gateway.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}]},
        headers={"X-Conversation-Id": "from-chat"},
    )
    page = await ok(await gateway.get("/v1/conversations"))
    assert [c["id"] for c in page["data"]] == ["from-chat"]
    assert page["data"][0]["metadata"] == {}


@pytest.mark.parametrize(
    ("query", "fragment", "param"),
    [
        ("limit=0", "limit must be an integer from 1 to 100", "limit"),
        ("limit=101", "limit must be an integer from 1 to 100", "limit"),
        ("limit=ten", "limit must be an integer from 1 to 100", "limit"),
        # What int() takes and a decimal integer is not (item 137).
        ("limit=1_0", "limit must be an integer from 1 to 100", "limit"),
        ("limit=%EF%BC%95", "limit must be an integer from 1 to 100", "limit"),  # fullwidth 5
        ("limit=%2B5", "limit must be an integer from 1 to 100", "limit"),
        ("limit=%205", "limit must be an integer from 1 to 100", "limit"),
        ("order=newest", "order must be 'asc' or 'desc'", "order"),
        ("after=conv_unknown", "after does not name one of your conversations", "after"),
    ],
)
async def test_list_query_errors(gateway: Client, query: str, fragment: str, param: str) -> None:
    await bad(await gateway.get(f"/v1/conversations?{query}"), fragment, param)


async def test_items_query_errors(gateway: Client) -> None:
    made = await create(gateway)
    base = f"/v1/conversations/{made['id']}/items"
    await bad(await gateway.get(f"{base}?after=item-1"), "after must be an item id", "after")
    await bad(await gateway.get(f"{base}?limit=500"), "limit must be", "limit")
    await bad(await gateway.get(f"{base}?order=up"), "order must be", "order")


def pairs(count: int) -> dict[str, str]:
    return {f"k{i}": "v" for i in range(count)}


METADATA_ERRORS = [
    (pairs(17), "metadata has 17 pairs; at most 16 are allowed", "metadata"),
    ({"k" * 65: "v"}, "is 65 characters long; at most 64 are allowed", "metadata"),
    ({"k": "v" * 513}, "metadata value of 'k' is 513 characters long; at most 512", "metadata.k"),
    ({"k": 5}, "metadata value of 'k' must be a string, not a number", "metadata.k"),
    ({"k": None}, "metadata value of 'k' must be a string, not null", "metadata.k"),
    (["k", "v"], "metadata must be an object", "metadata"),
    ("k=v", "metadata must be an object", "metadata"),
]


@pytest.mark.parametrize(("metadata", "fragment", "param"), METADATA_ERRORS)
async def test_metadata_validation(
    gateway: Client, rows: Rows, metadata: Any, fragment: str, param: str
) -> None:
    await bad(await gateway.post("/v1/conversations", json={"metadata": metadata}), fragment, param)
    assert rows.conversations() == []
    made = await create(gateway, {"metadata": {"keep": "me"}})
    update = await gateway.post(f"/v1/conversations/{made['id']}", json={"metadata": metadata})
    await bad(update, fragment, param)
    assert (await ok(await gateway.get(f"/v1/conversations/{made['id']}")))["metadata"] == {
        "keep": "me"
    }


async def test_a_field_the_request_does_not_take_is_a_400(gateway: Client, rows: Rows) -> None:
    """As OpenAI's API answers: a typo (``item``) made an empty conversation, and
    ``items`` sent with an update, which only sets metadata, were dropped unseen."""
    items = [{"role": "user", "content": "q"}]
    typo = await gateway.post("/v1/conversations", json={"item": items})
    error = await bad(typo, "unknown parameter 'item'", "item")
    assert error["code"] == "unknown_parameter"
    assert rows.conversations() == []
    made = await create(gateway, {"metadata": {"keep": "me"}})
    update = f"/v1/conversations/{made['id']}"
    sent = {"metadata": {"new": "1"}, "items": items}
    await bad(await gateway.post(update, json=sent), "unknown parameter 'items'", "items")
    appended = {"items": items, "metadata": {"new": "1"}}
    await bad(await gateway.post(update + "/items", json=appended), "'metadata'", "metadata")
    assert (await ok(await gateway.get(update)))["metadata"] == {"keep": "me"}
    assert rows.messages() == []


async def test_metadata_at_the_limits_is_accepted(gateway: Client) -> None:
    metadata = {f"{i:02d}" + "k" * 62: "v" * 512 for i in range(16)}
    made = await create(gateway, {"metadata": metadata})
    assert made["metadata"] == metadata
    cleared = await ok(await gateway.post(f"/v1/conversations/{made['id']}", json={"metadata": {}}))
    assert cleared["metadata"] == {}


@pytest.mark.parametrize(
    ("body", "fragment", "param"),
    [
        ({"items": "hello"}, "items must be an array", "items"),
        ({"items": [1]}, "items[0] must be a message object", "items[0]"),
        ({"items": [{"role": "robot", "content": "x"}]}, "items[0].role must be one of", None),
        (
            {"items": [{"role": "user", "content": 5}]},
            "items[0].content must be a string, an array",
            "items[0].content",
        ),
        ({"items": [{"role": "user"}]}, "items[0].content is required", "items[0].content"),
        (
            {"items": [{"role": "assistant", "content": None}]},
            "items[0].content is required (only an assistant message with tool_calls",
            "items[0].content",
        ),
        (
            {"items": [{"role": "tool", "content": "42"}]},
            "items[0].tool_call_id is required",
            "items[0].tool_call_id",
        ),
        (
            {"items": [{"role": "user", "content": "a"}, {"type": "reasoning", "role": "user"}]},
            "items[1].type must be 'message'",
            "items[1].type",
        ),
        ({"items": [{"role": "tool", "tool_call_id": 3}]}, "items[0].tool_call_id must be", None),
        ({"items": [{"role": "assistant", "tool_calls": {}}]}, "tool_calls must be an array", None),
        # What a chat server refuses in a later turn's history (found by a probe):
        (
            {"items": [{"role": "assistant", "content": None, "tool_calls": [{}]}]},
            "items[0].tool_calls[0].id must be a non-empty string",
            "items[0].tool_calls[0].id",
        ),
        (
            {"items": [{"role": "assistant", "tool_calls": [{"id": "c", "function": {}}]}]},
            "items[0].tool_calls[0].function must have a string name and string arguments",
            "items[0].tool_calls[0].function",
        ),
        (
            {"items": [{"role": "user", "content": []}]},
            "items[0].content must not be an empty array",
            "items[0].content",
        ),
        (
            {"items": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "items[0].content[0].image_url must be an object with a string url",
            "items[0].content[0].image_url",
        ),
        (
            {"items": [{"role": "user", "content": [{"type": "input_text"}]}]},
            "items[0].content[0].text must be a string",
            "items[0].content[0].text",
        ),
        (
            {"items": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]},
            "items[0].content[0].image_url must be a string: chat servers take an image",
            "items[0].content[0].image_url",
        ),
        (
            {"items": [{"role": "user", "content": [{"type": "input_file", "file_url": "u"}]}]},
            "items[0].content[0] must have a file_id or file_data",
            "items[0].content[0]",
        ),
        (
            {
                "items": [
                    {
                        "role": "system",
                        "content": [{"type": "input_image", "image_url": "https://x/y.png"}],
                    }
                ]
            },
            "items[0].content[0]: a system message takes text parts only",
            "items[0].content[0]",
        ),
        (
            {
                "items": [
                    {"role": "user", "content": "q"},
                    {"role": "tool", "tool_call_id": "call_9", "content": "r"},
                ]
            },
            "items[1].tool_call_id names no tool call of the assistant message before it",
            "items[1].tool_call_id",
        ),
    ],
)
async def test_item_validation(
    gateway: Client, rows: Rows, body: dict[str, Any], fragment: str, param: str | None
) -> None:
    await bad(await gateway.post("/v1/conversations", json=body), fragment, param)
    assert rows.conversations() == []


async def test_an_items_reasoning_content_is_stored_as_reasoning(
    gateway: Client, rows: Rows
) -> None:
    """As on the chat route: DeepSeek's name for it, in an imported transcript (h53)."""
    said = {"role": "assistant", "content": "a", "reasoning_content": "because"}
    made = await create(gateway, {"items": [{"role": "user", "content": "q"}, said]})
    assert [m["reasoning"] for m in rows.messages(made["id"])] == [None, "because"]


async def test_a_request_creates_or_appends_at_most_1000_items(gateway: Client, rows: Rows) -> None:
    """A 4 MB body of 110,000 tiny items held every other request for 1.5-2 s (h51):
    checked and answered on the event loop, written holding SQLite's write lock."""
    many = [{"role": "user", "content": str(i)} for i in range(1001)]
    await bad(
        await gateway.post("/v1/conversations", json={"items": many}), "at most 1000 items", "items"
    )
    assert rows.conversations() == []
    made = await create(gateway, {"items": many[:1000]})
    items = f"/v1/conversations/{made['id']}/items"
    await bad(await gateway.post(items, json={"items": many}), "append more in several", "items")
    await ok(await gateway.post(items, json={"items": many[:1000]}))
    assert len(rows.messages(made["id"])) == 2000


def _calls(*ids: str) -> dict[str, Any]:
    calls = [
        {"id": i, "type": "function", "function": {"name": "f", "arguments": "{}"}} for i in ids
    ]
    return {"role": "assistant", "content": None, "tool_calls": calls}


def _question_and_calls(*answered: str) -> list[dict[str, Any]]:
    """A user's question, an assistant message calling call_1 and call_2, and results
    for the calls ``answered``."""
    results = [{"role": "tool", "tool_call_id": i, "content": f"r{i[-1]}"} for i in answered]
    return [{"role": "user", "content": "q"}, _calls("call_1", "call_2"), *results]


async def test_tool_results_answer_the_call_before_them(gateway: Client, rows: Rows) -> None:
    """A tool result must answer a call of the assistant message before its run of
    results, in the request or, for an append, at the end of the stored conversation:
    chat servers refuse any other history, so every later turn would fail."""
    made = await create(gateway, {"items": _question_and_calls("call_1")})
    items = f"/v1/conversations/{made['id']}/items"
    answer = {"role": "tool", "tool_call_id": "call_2", "content": "r2"}
    appended = await gateway.post(items, json={"items": [answer]})
    assert appended.status == 200  # call_2 is still open at the end of the stored turn
    stray = {"role": "tool", "tool_call_id": "nonexistent", "content": "x"}
    await bad(
        await gateway.post(items, json={"items": [stray]}),
        "items[0].tool_call_id names no tool call",
        "items[0].tool_call_id",
    )
    await gateway.post(items, json={"items": [{"role": "assistant", "content": "done"}]})
    late = {"role": "tool", "tool_call_id": "call_1", "content": "again"}
    await bad(await gateway.post(items, json={"items": [late]}), "names no tool call")
    assert [m["role"] for m in rows.messages(made["id"])] == [
        "user",
        "assistant",
        "tool",
        "tool",
        "assistant",
    ]


async def test_every_call_is_answered_before_another_message(gateway: Client, rows: Rows) -> None:
    """An assistant message's calls all get their results before any other message, in
    one request or across appends: a history with an unanswered call is refused by chat
    servers on every later turn.  The calls stored last may wait for their results."""
    for shape in (
        [*_question_and_calls(), {"role": "assistant", "content": "mid"}],
        [*_question_and_calls("call_1"), {"role": "user", "content": "next"}],
    ):
        await bad(
            await gateway.post("/v1/conversations", json={"items": shape}),
            f"items[{len(shape) - 1}] comes before a tool result for each call",
            f"items[{len(shape) - 1}]",
        )
    assert rows.conversations() == []
    made = await create(gateway, {"items": _question_and_calls("call_2")})
    items = f"/v1/conversations/{made['id']}/items"
    question = {"role": "user", "content": "next"}
    await bad(
        await gateway.post(items, json={"items": [question]}),
        "items[0] comes before a tool result for each call of the assistant message before"
        " it (unanswered: call_1)",
        "items[0]",
    )
    answer = {"role": "tool", "tool_call_id": "call_1", "content": "r1"}
    assert (await gateway.post(items, json={"items": [answer, question]})).status == 200
    assert [m["role"] for m in rows.messages(made["id"])] == [
        "user",
        "assistant",
        "tool",
        "tool",
        "user",
    ]


async def test_deleting_keeps_tool_calls_and_results_together(
    gateway: Client, rows: Rows, upstream: TestServer
) -> None:
    """Deleting half of a tool call and its results would leave a history every later
    turn fails on: a result alone is not deleted (the answer says which item to delete),
    and deleting the call takes its results with it."""
    done = {"role": "assistant", "content": "done"}
    made = await create(gateway, {"items": [*_question_and_calls("call_1", "call_2"), done]})
    items = f"/v1/conversations/{made['id']}/items"
    await bad(
        await gateway.delete(items + "/msg_4"),
        "msg_4 is the result of a tool call in msg_2: delete msg_2",
        "item_id",
    )
    assert len(rows.messages(made["id"])) == 5
    deleted = await ok(await gateway.delete(items + "/msg_2"))
    assert deleted["id"] == made["id"]
    assert [(m["seq"], m["role"]) for m in rows.messages(made["id"])] == [
        (1, "user"),
        (5, "assistant"),
    ]
    # What is left goes upstream as a history any server takes.
    body = {"model": "m", "messages": [{"role": "user", "content": "next"}]}
    await ok(
        await gateway.post(
            "/v1/chat/completions", json=body, headers={"X-Conversation-Id": made["id"]}
        )
    )
    sent = received(upstream)[-1].json["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "user"]


async def test_a_delete_racing_an_append_of_the_results_leaves_no_orphan(
    gateway: Client, rows: Rows
) -> None:
    """Deleting a tool call while its result is being appended: whichever goes first,
    the other sees it (the append's check runs under the conversation's lock), so the
    result is either deleted with its call or refused, never stored without it."""
    for attempt in range(12):  # bounded; the old check, outside the lock, lost most races
        made = await create(
            gateway, {"items": [{"role": "user", "content": "q"}, _calls(f"call_{attempt}")]}
        )
        items = f"/v1/conversations/{made['id']}/items"
        result = {"role": "tool", "tool_call_id": f"call_{attempt}", "content": "r"}
        deleted, appended = await asyncio.gather(
            gateway.delete(items + "/msg_2"), gateway.post(items, json={"items": [result]})
        )
        assert deleted.status == 200, await deleted.text()
        assert appended.status in (200, 400), await appended.text()
        assert [m["role"] for m in rows.messages(made["id"])] == ["user"]


async def test_a_tool_call_group_of_any_size_stays_together(gateway: Client, rows: Rows) -> None:
    """300 parallel calls (more than one page of the walk over the run of results)."""
    ids = [f"c{i}" for i in range(300)]
    results = [{"role": "tool", "tool_call_id": i, "content": "r"} for i in ids]
    made = await create(
        gateway, {"items": [{"role": "user", "content": "q"}, _calls(*ids[:-1]), *results[:-1]]}
    )
    items = f"/v1/conversations/{made['id']}/items"
    await bad(await gateway.post(items, json={"items": [results[-1]]}), "names no tool call")
    made = await create(
        gateway, {"items": [{"role": "user", "content": "q"}, _calls(*ids), *results[:-1]]}
    )
    items = f"/v1/conversations/{made['id']}/items"
    await ok(await gateway.post(items, json={"items": [results[-1]]}))  # answers c299
    await bad(await gateway.delete(items + "/msg_302"), "delete msg_2")
    await ok(await gateway.delete(items + "/msg_2"))
    assert [m["role"] for m in rows.messages(made["id"])] == ["user"]


async def test_a_tool_result_whose_call_is_gone_can_be_deleted(gateway: Client, rows: Rows) -> None:
    """A result stored without its call (by an older version, or a chat request that
    sent one) answers nothing: deleting it is allowed."""
    made = await create(gateway, {"items": [{"role": "user", "content": "q"}]})
    await gateway.post(
        "/v1/chat/completions",
        json={"model": "m", "messages": [{"role": "tool", "tool_call_id": "x", "content": "r"}]},
        headers={"X-Conversation-Id": made["id"]},
    )
    roles = [(m["seq"], m["role"]) for m in rows.messages(made["id"])]
    assert roles[1] == (2, "tool")
    await ok(await gateway.delete(f"/v1/conversations/{made['id']}/items/msg_2"))
    assert [m["seq"] for m in rows.messages(made["id"])] == [1, 3]


async def test_items_that_no_server_would_take_are_refused_or_made_plain(
    gateway: Client, rows: Rows
) -> None:
    made = await create(gateway)
    items = f"/v1/conversations/{made['id']}/items"
    legacy = {"role": "assistant", "content": None, "function_call": {"name": "f"}}
    await bad(
        await gateway.post(items, json={"items": [legacy]}),
        "send tools, and tool_calls",
        "items[0].function_call",
    )
    # "tool_calls": [] is no calls (servers refuse the empty array): not stored.
    await ok(
        await gateway.post(
            items, json={"items": [{"role": "assistant", "content": "x", "tool_calls": []}]}
        )
    )
    assert [m["tool_calls"] for m in rows.messages(made["id"])] == [None]


async def test_body_errors(gateway: Client) -> None:
    made = await create(gateway)
    one = f"/v1/conversations/{made['id']}"
    await bad(await gateway.post("/v1/conversations", data=b"{nope"), "not valid JSON")
    await bad(await gateway.post("/v1/conversations", json=[1]), "must be a JSON object")
    await bad(await gateway.post(one, json={}), "metadata is required", "metadata")
    await bad(await gateway.post(f"{one}/items", json={"items": []}), "non-empty array", "items")
    await bad(await gateway.post(f"{one}/items", json={}), "non-empty array", "items")


async def test_unknown_ids_are_404_and_ids_no_conversation_can_have_400(
    gateway: Client, upstream: TestServer
) -> None:
    for path, status, param in (
        ("/v1/conversations/nope", 404, "conversation_id"),
        ("/v1/conversations/bad%20id!", 400, "conversation_id"),
        ("/v1/conversations/" + "x" * 129, 400, "conversation_id"),
    ):
        for method, suffix in (
            ("GET", ""),
            ("POST", ""),
            ("DELETE", ""),
            ("GET", "/items"),
            ("POST", "/items"),
            ("GET", "/items/msg_1"),
            ("DELETE", "/items/msg_1"),
        ):
            items = [{"role": "user", "content": "x"}]
            body = {"items": items} if suffix == "/items" else {"metadata": {}}
            response = await gateway.request(method, path + suffix, json=body)
            assert response.status == status, (method, path + suffix)
            error = (await response.json())["error"]
            assert error["param"] == param
            if status == 404:
                assert error["message"] == "conversation not found"
            else:
                assert error["message"].startswith("conversation id must be 1-128 characters")
    assert received(upstream) == []


async def test_other_methods_do_not_reach_the_upstream(
    gateway: Client, upstream: TestServer
) -> None:
    made = await create(gateway)
    for method, path, allow in (
        ("PUT", "/v1/conversations", "GET,POST"),
        ("PATCH", f"/v1/conversations/{made['id']}", "DELETE,GET,POST"),
        ("PUT", f"/v1/conversations/{made['id']}/items", "GET,POST"),
        ("POST", f"/v1/conversations/{made['id']}/items/msg_1", "DELETE,GET"),
    ):
        response = await gateway.request(method, path)
        assert response.status == 405
        assert response.headers["Allow"] == allow
        assert (await response.json())["error"]["type"] == "invalid_request_error"
    assert received(upstream) == []


async def test_other_paths_under_conversations_do_not_reach_the_upstream(
    gateway: Client, upstream: TestServer
) -> None:
    made = await create(gateway)
    for method, path in (
        ("GET", "/v1/conversations/"),
        ("GET", f"/v1/conversations/{made['id']}/"),
        ("POST", f"/v1/conversations/{made['id']}/foo"),
        ("GET", f"/v1/conversations/{made['id']}/items/"),
        ("DELETE", f"/v1/conversations/{made['id']}/items/msg_1/x"),
    ):
        response = await gateway.request(method, path)
        assert response.status == 404, path
        error = (await response.json())["error"]
        assert error["message"] == f"no such route: {method} {path}"
    assert received(upstream) == []


async def test_an_append_of_system_items_only_sets_the_system_prompt(
    gateway: Client, rows: Rows
) -> None:
    """System items set the stored system prompt and are no items of their own: an append
    of nothing else was a 500."""
    made = await create(gateway, {"items": [{"role": "user", "content": "q"}]})
    items = f"/v1/conversations/{made['id']}/items"
    system = {"role": "developer", "content": "Answer in French."}
    appended = await gateway.post(items, json={"items": [system]})
    assert appended.status == 200, await appended.text()
    assert (await appended.json())["data"] == []
    (stored,) = rows.conversations()
    assert json.loads(stored["system_prompt"]) == [system]
    assert [m["role"] for m in rows.messages(made["id"])] == ["user"]
