"""Isolation: another team's or user's conversation is invisible on every route, and the
client's credentials never reach the upstream."""

from __future__ import annotations

import json
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from helpers import GatewayFactory, Rows, received, upstream_url
from jwt_keys import SECRET, bearer, token

Client = TestClient[Any, Any]

OWNER = bearer(token({"team_id": "team-b", "sub": "bob"}))
INTRUDERS = {
    "other team": bearer(token({"team_id": "team-a", "sub": "bob"})),
    "other user": bearer(token({"team_id": "team-b", "sub": "mallory"})),
    "team without user": bearer(token({"team_id": "team-b"})),
}
UPSTREAM_KEY = "upstream-key-0123456789"
SECRET_TEXT = "B's secret plan"


@pytest.fixture
async def client(gateway_factory: GatewayFactory, upstream: TestServer) -> Client:
    return await gateway_factory(
        upstream_url(upstream),
        auth={"jwt_secret": SECRET},
        upstream={"api_key": UPSTREAM_KEY},
    )


async def chat(
    client: Client, headers: dict[str, str], conversation: str, text: str, stream: bool = False
) -> Any:
    response = await client.post(
        "/v1/chat/completions",
        json={"model": "m", "stream": stream, "messages": [{"role": "user", "content": text}]},
        headers={**headers, "X-Conversation-Id": conversation, "Cookie": "session=client-cookie"},
    )
    assert response.status == 200, await response.text()
    await response.read()
    return response


async def owners_conversations(client: Client) -> tuple[str, str]:
    """B's two conversations: one named by the client, one created by the API."""
    await chat(client, OWNER, "shared-name", SECRET_TEXT)
    created = await client.post(
        "/v1/conversations",
        json={"metadata": {"owner": "b"}, "items": [{"role": "user", "content": SECRET_TEXT}]},
        headers=OWNER,
    )
    return "shared-name", (await created.json())["id"]


def snapshot(rows: Rows) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    return rows.conversations(), rows.messages()


@pytest.mark.parametrize("intruder", list(INTRUDERS))
async def test_every_conversations_route_answers_404(
    client: Client, rows: Rows, upstream: TestServer, intruder: str
) -> None:
    headers = INTRUDERS[intruder]
    for conversation_id in await owners_conversations(client):
        before = snapshot(rows)
        one = f"/v1/conversations/{conversation_id}"
        for method, path, body in (
            ("GET", one, None),
            ("POST", one, {"metadata": {"owner": "intruder"}}),
            ("DELETE", one, None),
            ("GET", f"{one}/items", None),
            ("POST", f"{one}/items", {"items": [{"role": "user", "content": "injected"}]}),
            ("GET", f"{one}/items/msg_1", None),
            ("DELETE", f"{one}/items/msg_1", None),
        ):
            response = await client.request(method, path, json=body, headers=headers)
            assert response.status == 404, (intruder, method, path)
            error = (await response.json())["error"]
            assert error["message"] == "conversation not found"
            assert SECRET_TEXT not in await response.text()
        assert snapshot(rows) == before
        # Same answer as for an id nobody has: existence is not revealed.
        response = await client.get("/v1/conversations/nobody-has-this", headers=headers)
        assert response.status == 404
        assert (await response.json())["error"]["message"] == "conversation not found"
        listed = await client.get("/v1/conversations", headers=headers)
        assert (await listed.json())["data"] == []
        cursor = await client.get(f"/v1/conversations?after={conversation_id}", headers=headers)
        assert cursor.status == 400
        assert (await cursor.json())["error"]["message"] == (
            "after does not name one of your conversations"
        )
    assert not any(SECRET_TEXT in r.body.decode() for r in received(upstream)[1:])


@pytest.mark.parametrize("intruder", list(INTRUDERS))
@pytest.mark.parametrize("stream", [False, True])
async def test_chat_with_someone_elses_id_is_a_new_conversation(
    client: Client, rows: Rows, upstream: TestServer, intruder: str, stream: bool
) -> None:
    headers = INTRUDERS[intruder]
    for conversation_id in await owners_conversations(client):
        owner_rows = [m for m in rows.messages(conversation_id)]
        response = await chat(client, headers, conversation_id, "what did B say?", stream)
        assert response.headers["X-Conversation-Id"] == conversation_id
        sent = received(upstream)[-1].json
        assert sent["messages"] == [{"role": "user", "content": "what did B say?"}]
        assert SECRET_TEXT not in json.dumps(sent)
        # The intruder got their own conversation of that name; B's is untouched.
        mine = [m for m in rows.messages(conversation_id) if m not in owner_rows]
        assert mine[0]["content"] == '"what did B say?"' and mine[1]["role"] == "assistant"
        assert {(m["tenant"], m["user_id"]) for m in mine} != {("team-b", "bob")}
        assert [m for m in rows.messages(conversation_id) if m in owner_rows] == owner_rows
    # And the owner still sees only their own history.
    await chat(client, OWNER, "shared-name", "and now?")
    history = received(upstream)[-1].json["messages"]
    assert [m["content"] for m in history if m["role"] == "user"] == [SECRET_TEXT, "and now?"]


async def test_listing_shows_only_the_callers_conversations(client: Client) -> None:
    await owners_conversations(client)
    for headers in INTRUDERS.values():
        await client.post("/v1/conversations", json={}, headers=headers)
    listed = await (await client.get("/v1/conversations", headers=OWNER)).json()
    assert len(listed["data"]) == 2
    assert {c["id"] for c in listed["data"]} >= {"shared-name"}
    for headers in INTRUDERS.values():
        theirs = await (await client.get("/v1/conversations", headers=headers)).json()
        assert len(theirs["data"]) == 1
        assert theirs["data"][0]["id"] not in {c["id"] for c in listed["data"]}


async def test_delete_only_deletes_the_callers_conversation(client: Client, rows: Rows) -> None:
    await chat(client, OWNER, "same-id", "owner's")
    other = INTRUDERS["other team"]
    await chat(client, other, "same-id", "other's")
    response = await client.delete("/v1/conversations/same-id", headers=other)
    assert response.status == 200
    left = rows.messages("same-id")
    assert {(m["tenant"], m["user_id"]) for m in left} == {("team-b", "bob")}
    assert left[0]["content"] == '"owner\'s"'


# --- upstream credentials ------------------------------------------------------------


def assert_credentials(request: Any, expected: dict[str, str], absent: tuple[str, ...]) -> None:
    headers = {k.lower(): v for k, v in request.headers.items()}
    for name, value in expected.items():
        assert headers.get(name.lower()) == value, (request.path, name)
    for name in absent:
        assert name.lower() not in headers, (request.path, name)
    assert SECRET not in json.dumps(request.headers)
    assert "client-cookie" not in json.dumps(request.headers)
    assert "Proxy-Authorization".lower() not in headers


async def every_upstream_route(client: Client, headers: dict[str, str]) -> None:
    client_headers = {
        **headers,
        "Cookie": "session=client-cookie",
        "Proxy-Authorization": "Basic Y2xpZW50OnNlY3JldA==",
        "X-Api-Key": "client-supplied-key",
    }
    await chat(client, headers, "c1", "hello")
    await chat(client, headers, "c1", "hello again", stream=True)
    for method, path, body in (
        ("POST", "/v1/ask", {"question": "q", "client_id": "c", "user_id": "u"}),
        ("GET", "/v1/models", None),
        ("POST", "/v1/embeddings", {"input": "x"}),
        ("POST", "/v1/completions", {"prompt": "x"}),
    ):
        response = await client.request(method, path, json=body, headers=client_headers)
        assert response.status == 200, path
        await response.read()


async def test_upstream_gets_its_key_never_the_clients_credentials(
    client: Client, upstream: TestServer
) -> None:
    await every_upstream_route(client, OWNER)
    requests = received(upstream)
    assert len(requests) == 6
    for request in requests:
        assert_credentials(request, {"Authorization": f"Bearer {UPSTREAM_KEY}"}, ("Cookie",))


async def test_custom_header_and_raw_key(
    gateway_factory: GatewayFactory, upstream: TestServer
) -> None:
    client = await gateway_factory(
        upstream_url(upstream),
        auth={"jwt_secret": SECRET},
        upstream={"api_key": UPSTREAM_KEY, "auth_header": "X-Api-Key", "auth_scheme": ""},
    )
    await every_upstream_route(client, OWNER)
    for request in received(upstream):
        assert_credentials(request, {"X-Api-Key": UPSTREAM_KEY}, ("Authorization", "Cookie"))
        assert "client-supplied-key" not in json.dumps(request.headers)


async def test_raw_authorization_like_the_seed(
    gateway_factory: GatewayFactory, upstream: TestServer
) -> None:
    client = await gateway_factory(
        upstream_url(upstream), upstream={"api_key": UPSTREAM_KEY, "auth_scheme": ""}
    )
    await every_upstream_route(client, bearer("client-token-that-must-not-leak"))
    for request in received(upstream):
        assert_credentials(request, {"Authorization": UPSTREAM_KEY}, ("Cookie",))
        assert "client-token-that-must-not-leak" not in json.dumps(request.headers)


async def test_no_upstream_key_sends_no_authorization(
    gateway_factory: GatewayFactory, upstream: TestServer
) -> None:
    client = await gateway_factory(upstream_url(upstream), auth={"jwt_secret": SECRET})
    await every_upstream_route(client, OWNER)
    for request in received(upstream):
        assert_credentials(request, {}, ("Authorization", "Cookie"))


async def test_every_route_needs_a_token(client: Client, upstream: TestServer) -> None:
    for method, path in (
        ("POST", "/v1/chat/completions"),
        ("GET", "/v1/models"),
        ("POST", "/v1/embeddings"),
        ("GET", "/v1/conversations"),
        ("POST", "/v1/conversations"),
        ("GET", "/v1/conversations/x"),
        ("POST", "/v1/conversations/x"),
        ("DELETE", "/v1/conversations/x"),
        ("GET", "/v1/conversations/x/items"),
        ("POST", "/v1/conversations/x/items"),
        ("GET", "/v1/conversations/x/items/msg_1"),
        ("DELETE", "/v1/conversations/x/items/msg_1"),
        ("POST", "/v1/ask"),
        ("POST", "/conversation/m"),
    ):
        response = await client.request(method, path, json={})
        assert response.status == 401, (method, path)
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert (await response.json())["error"]["type"] == "authentication_error"
    assert received(upstream) == []


@pytest.mark.parametrize("intruder", list(INTRUDERS))
async def test_ask_history_is_per_owner(
    client: Client, upstream: TestServer, intruder: str
) -> None:
    """The api-server seed's (client_id, user_id) names a conversation of the caller only."""
    body = {"client_id": "shared-client", "user_id": "u1"}
    response = await client.post("/v1/ask", json={**body, "question": SECRET_TEXT}, headers=OWNER)
    assert response.status == 200, await response.text()
    response = await client.post(
        "/v1/ask", json={**body, "question": "what was asked?"}, headers=INTRUDERS[intruder]
    )
    assert response.status == 200
    sent = received(upstream)[-1].json
    assert SECRET_TEXT not in json.dumps(sent)
    assert [m["content"] for m in sent["messages"]] == ["what was asked?"]
