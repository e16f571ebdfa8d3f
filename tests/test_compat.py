"""The older services' endpoints, replayed with the seed READMEs' own curl commands.

``../shared/seeds/api-server.md`` and ``conversation-api.md`` document their APIs as curl
examples; the tests run those commands with the real ``curl`` (same method, headers, body
and cookie jar; only the address changes) against a real gateway and the real mock model.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from helpers import (
    GatewayFactory,
    Rows,
    answer_events,
    chunk,
    make_config,
    received,
    run_chatmem,
    sse,
    upstream_url,
)
from scripted_upstream import Script, scripted_upstream

import chatmem
from chatmem.config import ConfigError, load_config
from chatmem.proxy.ask import ask_conversation_id
from chatmem.state import GATEWAY

Client = TestClient[Any, Any]

SECRET = "seed-jwt-secret-of-at-least-32-bytes"
# The seed's jwt_util.py example claims.
CLAIMS = '{"team_id": "tenstorrent", "token_id":"debug-test"}'

# The two bodies of conversation-api.md, character for character.
REPEAT = """{
  "text": "Repeat the number '94572'.",
  "top_k": 1,
  "top_p": 0.9,
  "temperature": 0.7,
  "max_tokens": 32,
  "stop_sequence": "."
}"""
WHAT_NUMBER = """{
  "text": "What number did you repeat?",
  "top_k": 1,
  "top_p": 0.9,
  "temperature": 0.7,
  "max_tokens": 32,
  "stop_sequence": "."
}"""
# The bodies of api-server.md.
ASK_FIELDS = '"question": "What is the weather like today?", "client_id": "1234", "user_id": "1234"'
ASK = "{" + ASK_FIELDS + ', "stream": false}'
ASK_STREAM = "{" + ASK_FIELDS + ', "stream": true}'

# What the mock model (6 tokens) answers to the first message of a conversation.
REPEAT_ANSWER = "Echo Repeat the number '94572'. (1 messages)"


@dataclass
class CurlResult:
    status: int
    body: bytes
    headers: dict[str, str]


def base(client: Client) -> str:
    return str(client.make_url("")).rstrip("/")


async def curl(*args: str, cwd: Path) -> CurlResult:
    """Run the real curl; ``-sS``, ``-D`` and ``-o`` only capture what it got."""
    assert shutil.which("curl"), "curl is needed to replay the seed READMEs"
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "-D", "headers.txt", "-o", "body.txt", "-w", "%{http_code}", *args,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    headers: dict[str, str] = {}
    for line in (cwd / "headers.txt").read_text().splitlines()[1:]:
        name, _, value = line.partition(":")
        if value:
            headers[name.strip().lower()] = value.strip()
    return CurlResult(int(out), (cwd / "body.txt").read_bytes(), headers)


def conversation_command(client: Client, body: str, token: str | None) -> list[str]:
    """The seed's command: -b/-c cookies.txt, -L, its two -H and -d (Authorization if given)."""
    args = [
        "-X", "POST", f"{base(client)}/conversation/falcon-40b-instruct",
        "-b", "cookies.txt", "-c", "cookies.txt", "-L",
        "-H", "accept: */*", "-H", "Content-Type: application/json",
    ]  # fmt: skip
    if token is not None:
        args += ["-H", f"Authorization: {token}"]
    return [*args, "-d", body]


def seed_token(secret: str = SECRET, claims: str = CLAIMS) -> str:
    """``export JWT_TOKEN="Bearer $(jwt_util.py --secret ... encode ...)"``, with chatmem."""
    result = run_chatmem("token", "encode", "--secret", secret, claims)
    assert result.returncode == 0, result.stderr
    encoded = result.stdout.strip()
    return f"Bearer {encoded}"


def chats(upstream: TestServer) -> list[dict[str, Any]]:
    return [r.json for r in received(upstream) if r.path == "/v1/chat/completions"]


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def sse_payloads(body: bytes) -> list[str]:
    text = body.decode()
    assert text.endswith("\n\n")
    events = text[:-2].split("\n\n")
    assert all(e.startswith("data: ") for e in events), events
    return [e.removeprefix("data: ") for e in events]


def replace_with_directory(db_path: Path) -> None:
    for leftover in db_path.parent.glob(db_path.name + "*"):
        leftover.unlink()
    db_path.mkdir()


# --- health and readiness ---------------------------------------------------------------


async def test_health_as_in_the_seed(gateway_factory: GatewayFactory, tmp_path: Path) -> None:
    client = await gateway_factory("http://127.0.0.1:9/v1", auth={"jwt_secret": SECRET})
    for path in ("/api/v1/health", "/v1/health"):
        result = await curl("-X", "GET", base(client) + path, cwd=tmp_path)
        assert (result.status, json.loads(result.body)) == (200, {"status": "ok"})
    ready = await client.get("/v1/ready")  # no token needed, like health
    assert (ready.status, await ready.json()) == (200, {"status": "ok", "database": "ok"})


async def test_ready_is_503_when_the_database_is_gone(
    gateway_factory: GatewayFactory, db_path: Path
) -> None:
    client = await gateway_factory("http://127.0.0.1:9/v1")
    assert (await client.get("/v1/ready")).status == 200
    store = client.app[GATEWAY].store
    await store.engine.dispose()  # drop pooled connections to the file ...
    replace_with_directory(db_path)  # ... and put something SQLite cannot open in its place
    resp = await client.get("/v1/ready")
    assert resp.status == 503
    assert (await resp.json())["error"]["code"] == "storage_unavailable"
    assert (await client.get("/v1/health")).status == 200  # liveness is not readiness


# --- POST /v1/ask -----------------------------------------------------------------------


def test_ask_conversation_ids() -> None:
    assert ask_conversation_id("1234", "1234") == "ask:1234:1234"
    # A ':' would make the readable form ambiguous, so such pairs are hashed.
    colon_a, colon_b = ask_conversation_id("a:b", "c"), ask_conversation_id("a", "b:c")
    assert colon_a != colon_b
    assert colon_a.startswith("ask-sha256:") and len(colon_a) == len("ask-sha256:") + 64
    assert ask_conversation_id("x" * 61, "u") != ask_conversation_id("x" * 61, "v")


async def test_ask_seed_examples_continue_the_stored_conversation(
    gateway: Client, upstream: TestServer, rows: Rows, tmp_path: Path
) -> None:
    url = base(gateway) + "/v1/ask"
    first = await curl(
        "-X", "POST", url, "-d", ASK, "-H", "Content-Type: application/json", cwd=tmp_path
    )
    assert first.status == 200
    completion = json.loads(first.body)
    assert completion["object"] == "chat.completion"
    assert completion["model"] == "gpt-3.5-turbo"
    assert set(completion["usage"]) >= {"prompt_tokens", "completion_tokens", "total_tokens"}
    choice = completion["choices"][0]
    assert (choice["index"], choice["finish_reason"]) == (0, "stop")
    answer1 = choice["message"]["content"]
    assert choice["message"]["role"] == "assistant" and answer1.startswith("Echo What")
    question = "What is the weather like today?"
    assert chats(upstream)[-1] == {
        "model": "gpt-3.5-turbo",
        "stream": False,
        "messages": [user(question)],
    }

    second = await curl(
        "-X", "POST", url, "-d", ASK_STREAM,
        "-H", "Accept: text/event-stream", "-H", "Content-Type: application/json",
        cwd=tmp_path,
    )  # fmt: skip
    assert second.status == 200
    assert second.headers["content-type"].startswith("text/event-stream")
    payloads = sse_payloads(second.body)
    # Every event is a chunk, as the old service sent them: no [DONE] to trip a client
    # that reads each one as JSON.
    chunks = [json.loads(p) for p in payloads]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    answer2 = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    # The stored first exchange went upstream before the new question.
    assert chats(upstream)[-1]["messages"] == [user(question), assistant(answer1), user(question)]
    assert chats(upstream)[-1]["stream"] is True

    stored = rows.messages("ask:1234:1234")
    assert [(m["role"], json.loads(m["content"])) for m in stored] == [
        ("user", question),
        ("assistant", answer1),
        ("user", question),
        ("assistant", answer2),
    ]
    assert {(m["tenant"], m["user_id"]) for m in stored} == {("default", "")}

    # Its README shows the health check under /api: a client with that base asks there.
    json_body = {"Content-Type": "application/json"}
    third = await gateway.post("/api/v1/ask", data=ASK, headers=json_body)
    assert third.status == 200
    assert chats(upstream)[-1]["messages"][:4] == [
        user(question), assistant(answer1), user(question), assistant(answer2)
    ]  # fmt: skip
    assert len(rows.messages("ask:1234:1234")) == 6


async def test_ask_with_history_uses_it_and_still_remembers(
    gateway: Client, upstream: TestServer, rows: Rows
) -> None:
    ask = {"question": "one", "client_id": "c", "user_id": "u"}
    await gateway.post("/v1/ask", json=ask)
    history = [user("hello."), assistant("Hi.")]
    resp = await gateway.post("/v1/ask", json={**ask, "question": "two", "history": history})
    assert resp.status == 200
    assert resp.headers["X-Conversation-Id"] == "ask:c:u"
    answer = (await resp.json())["choices"][0]["message"]["content"]
    assert chats(upstream)[-1]["messages"] == [*history, user("two")]  # not the stored turn
    contents = [json.loads(m["content"]) for m in rows.messages("ask:c:u")]
    assert contents[2:] == ["two", answer]  # the given history is not stored again


async def test_ask_sends_a_given_history_as_it_is(
    gateway: Client, upstream: TestServer, rows: Rows
) -> None:
    """A given history is never stored, so what only the store cannot keep (a name over
    its column, a NUL, the deprecated function_call) goes upstream as the client sent it."""
    history = [
        {"role": "user", "content": "hello.", "name": "n" * 300},
        {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}},
        {"role": "function", "name": "f\x00", "content": "42"},
    ]
    ask = {"question": "two", "client_id": "c", "user_id": "u", "history": history}
    resp = await gateway.post("/v1/ask", json=ask)
    assert resp.status == 200, await resp.text()
    assert chats(upstream)[-1]["messages"] == [*history, user("two")]
    stored = rows.messages("ask:c:u")
    assert [m["role"] for m in stored] == ["user", "assistant"]  # the history is not stored
    assert json.loads(stored[0]["content"]) == "two"


async def test_ask_keeps_clients_users_and_tenants_apart(
    gateway_factory: GatewayFactory, upstream: TestServer, rows: Rows
) -> None:
    client = await gateway_factory(upstream_url(upstream), auth={"jwt_secret": SECRET})
    tenants = {
        name: {"Authorization": seed_token(claims=json.dumps({"team_id": name}))}
        for name in ("t1", "t2")
    }
    for headers in tenants.values():
        for user_id in ("u1", "u2"):
            body = {"question": f"hi {user_id}", "client_id": "c", "user_id": user_id}
            assert (await client.post("/v1/ask", json=body, headers=headers)).status == 200
    # Every (tenant, client, user) started its own conversation: one message of history each.
    assert [len(c["messages"]) for c in chats(upstream)] == [1, 1, 1, 1]
    owners = {(c["tenant"], c["id"]) for c in rows.conversations()}
    assert owners == {(t, f"ask:c:{u}") for t in ("t1", "t2") for u in ("u1", "u2")}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"client_id": "1", "user_id": "1"}, "question"),
        ({"question": 5, "client_id": "1", "user_id": "1"}, "question"),
        ({"question": "q", "user_id": "1"}, "client_id"),
        ({"question": "q", "client_id": "1", "user_id": ["1"]}, "user_id"),
        ({"question": "q", "client_id": "", "user_id": "1"}, "client_id"),
        ({"question": "q", "client_id": "1", "user_id": "1", "stream": "yes"}, "stream"),
        ({"question": "q", "client_id": "1", "user_id": "1", "history": {}}, "history"),
        (
            {"question": "q", "client_id": "1", "user_id": "1", "history": [{"role": "x"}]},
            "history[0].role",
        ),
        (
            {"question": "q", "client_id": "1", "user_id": "1", "history": [{"role": "user"}]},
            "history[0].content",
        ),
        (
            {
                "question": "q",
                "client_id": "1",
                "user_id": "1",
                "history": [
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": None},
                ],
            },
            "history[1].content",
        ),
        (  # as many as a chat request's messages (h53: 80,000 went up)
            {
                "question": "q",
                "client_id": "1",
                "user_id": "1",
                "history": [{"role": "user", "content": "a"}] * 2049,
            },
            "history",
        ),
    ],
)
async def test_ask_bad_fields_are_400_naming_the_field(
    gateway: Client, upstream: TestServer, rows: Rows, body: dict[str, Any], param: str
) -> None:
    resp = await gateway.post("/v1/ask", json=body)
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    assert chats(upstream) == [] and rows.messages() == []
    # Once client_id and user_id name the conversation, the answer names it too.
    named = param not in ("client_id", "user_id")
    assert resp.headers.get("X-Conversation-Id") == ("ask:1:1" if named else None)


@pytest.mark.parametrize("value", [1.5, True, "", ["1"]])
async def test_ask_says_which_ids_it_takes(gateway: Client, value: Any) -> None:
    body = {"question": "q", "client_id": value, "user_id": "u"}
    resp = await gateway.post("/v1/ask", json=body)
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["message"] == "client_id must be a non-empty string or an integer"


async def test_ask_accepts_integer_ids(gateway: Client, rows: Rows) -> None:
    resp = await gateway.post("/v1/ask", json={"question": "q", "client_id": 7, "user_id": 8})
    assert resp.status == 200
    assert rows.conversations()[0]["id"] == "ask:7:8"


async def test_ask_needs_a_token_when_auth_is_on(
    gateway_factory: GatewayFactory, upstream: TestServer, tmp_path: Path
) -> None:
    client = await gateway_factory(upstream_url(upstream), auth={"jwt_secret": SECRET})
    result = await curl(
        "-X", "POST", base(client) + "/v1/ask", "-d", ASK,
        "-H", "Content-Type: application/json", cwd=tmp_path,
    )  # fmt: skip
    assert result.status == 401
    assert json.loads(result.body)["error"]["type"] == "authentication_error"
    assert chats(upstream) == []


# --- POST /conversation/{model} ---------------------------------------------------------


async def test_conversation_seed_examples_with_the_cookie_jar(
    gateway: Client, upstream: TestServer, rows: Rows, tmp_path: Path
) -> None:
    # Auth is off here, so the seed's first command (which sends no token) succeeds too.
    first = await curl(*conversation_command(gateway, REPEAT, None), cwd=tmp_path)
    assert first.status == 200
    assert first.headers["content-type"] == "text/plain; charset=utf-8"
    assert first.body.decode() == REPEAT_ANSWER
    jar = (tmp_path / "cookies.txt").read_text()
    assert "#HttpOnly_127.0.0.1" in jar and "chatmem_session" in jar
    conversation_id = first.headers["x-conversation-id"]

    second = await curl(*conversation_command(gateway, WHAT_NUMBER, "Bearer unused"), cwd=tmp_path)
    assert second.status == 200
    assert second.headers["x-conversation-id"] == conversation_id
    sent = chats(upstream)
    expected_fields = {
        "model": "falcon-40b-instruct",
        "stream": True,
        "top_k": 1,
        "top_p": 0.9,
        "temperature": 0.7,
        "max_tokens": 32,
        "stop": ".",
    }
    assert sent[0] == {**expected_fields, "messages": [user("Repeat the number '94572'.")]}
    assert sent[1] == {
        **expected_fields,
        "messages": [
            user("Repeat the number '94572'."),
            assistant(REPEAT_ANSWER),
            user("What number did you repeat?"),
        ],
    }
    stored = rows.messages(conversation_id)
    assert [(m["role"], json.loads(m["content"])) for m in stored] == [
        ("user", "Repeat the number '94572'."),
        ("assistant", REPEAT_ANSWER),
        ("user", "What number did you repeat?"),
        ("assistant", second.body.decode()),
    ]
    assert stored[1]["model"] == "falcon-40b-instruct"
    assert stored[1]["finish_reason"] == "stop"

    # A new cookie jar is a new conversation.
    (tmp_path / "cookies.txt").unlink()
    third = await curl(*conversation_command(gateway, REPEAT, None), cwd=tmp_path)
    assert third.headers["x-conversation-id"] != conversation_id
    assert len(chats(upstream)[-1]["messages"]) == 1


async def test_conversation_seed_examples_with_auth_on(
    gateway_factory: GatewayFactory, upstream: TestServer, rows: Rows, tmp_path: Path
) -> None:
    client = await gateway_factory(upstream_url(upstream), auth={"jwt_secret": SECRET})
    token = seed_token()
    # The seed's first command sends no Authorization header: refused.
    refused = await curl(*conversation_command(client, REPEAT, None), cwd=tmp_path)
    assert refused.status == 401
    assert json.loads(refused.body)["error"]["code"] == "invalid_api_key"
    assert chats(upstream) == []

    for body in (REPEAT, WHAT_NUMBER):
        result = await curl(*conversation_command(client, body, token), cwd=tmp_path)
        assert result.status == 200
    theirs = result.headers["x-conversation-id"]
    assert chats(upstream)[-1]["messages"][:2] == [
        user("Repeat the number '94572'."),
        assistant(REPEAT_ANSWER),
    ]
    assert {(m["tenant"], m["user_id"]) for m in rows.messages()} == {("tenstorrent", "")}

    # Another tenant replaying the same cookie jar sees nothing of this conversation, not
    # even its id; the cookie it gets back is its own from then on.
    other = seed_token(claims='{"team_id": "other"}')
    result = await curl(*conversation_command(client, WHAT_NUMBER, other), cwd=tmp_path)
    assert result.status == 200
    assert chats(upstream)[-1]["messages"] == [user("What number did you repeat?")]
    own = result.headers["x-conversation-id"]
    assert own.startswith("conv_") and own != theirs
    again = await curl(*conversation_command(client, REPEAT, other), cwd=tmp_path)
    assert again.headers["x-conversation-id"] == own
    assert len(chats(upstream)[-1]["messages"]) == 3  # its own first turn, then this one


async def test_cookie_is_signed_with_the_configured_secret(
    gateway_factory: GatewayFactory, upstream: TestServer, tmp_path: Path
) -> None:
    url = upstream_url(upstream)
    one = await gateway_factory(url, compat={"session_secret": "flask-secret"})
    two = await gateway_factory(url, compat={"session_secret": "flask-secret"})
    other = await gateway_factory(url, compat={"session_secret": "another-secret"})
    first = await one.post("/conversation/m", json={"text": "one"})
    assert (await first.text()).startswith("Echo one")  # the turn is stored at the end
    cookie = first.cookies["chatmem_session"]
    assert cookie["httponly"] and cookie["path"] == "/"
    conversation_id = first.headers["X-Conversation-Id"]
    jar = {"chatmem_session": cookie.value}

    # Another instance with the same secret (and database) continues the conversation.
    same = await two.post("/conversation/m", json={"text": "two"}, cookies=jar)
    await same.read()
    assert same.headers["X-Conversation-Id"] == conversation_id
    assert len(chats(upstream)[-1]["messages"]) == 3
    # A different secret, or a forged cookie, starts a new one (not an error).
    for client, value in ((other, cookie.value), (one, cookie.value[:-4] + "AAAA")):
        resp = await client.post(
            "/conversation/m", json={"text": "x"}, cookies={"chatmem_session": value}
        )
        assert resp.status == 200
        await resp.read()
        assert resp.headers["X-Conversation-Id"] != conversation_id
        assert len(chats(upstream)[-1]["messages"]) == 1


@pytest.mark.parametrize("secure", [False, True])
async def test_the_session_cookie_is_secure_when_configured(
    gateway_factory: GatewayFactory, upstream: TestServer, secure: bool
) -> None:
    client = await gateway_factory(
        upstream_url(upstream), compat={"session_secret": "s", "session_cookie_secure": secure}
    )
    resp = await client.post("/conversation/m", json={"text": "one"})
    await resp.read()
    assert ("; Secure" in resp.headers["Set-Cookie"]) is secure


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"top_k": 1}, "text"),
        ({"text": ["x"]}, "text"),
        ({"text": "x", "top_k": "1"}, "top_k"),
        ({"text": "x", "top_k": 1.5}, "top_k"),
        ({"text": "x", "top_p": "0.9"}, "top_p"),
        ({"text": "x", "temperature": True}, "temperature"),
        ({"text": "x", "max_tokens": 3.0}, "max_tokens"),
        ({"text": "x", "stop_sequence": 5}, "stop_sequence"),
        ({"text": "x", "stop_sequence": [".", 1]}, "stop_sequence"),
    ],
)
async def test_conversation_bad_fields_are_400_naming_the_field(
    gateway: Client, upstream: TestServer, rows: Rows, body: dict[str, Any], param: str
) -> None:
    resp = await gateway.post("/conversation/m", json=body)
    assert resp.status == 400
    assert (await resp.json())["error"]["param"] == param
    assert chats(upstream) == [] and rows.messages() == []


async def test_other_methods_on_the_old_services_paths_stay_here(
    gateway: Client, upstream: TestServer
) -> None:
    for method, path, allow in (
        ("PUT", "/v1/health", "GET,HEAD"),
        ("DELETE", "/v1/health", "GET,HEAD"),
        ("GET", "/v1/ask", "POST"),
        ("GET", "/conversation/m", "POST"),
    ):
        resp = await gateway.request(method, path)
        assert resp.status == 405, (method, path)
        assert resp.headers["Allow"] == allow  # RFC 9110: a 405 names what is allowed
        assert (await resp.json())["error"]["type"] == "invalid_request_error"
    assert received(upstream) == []


async def test_other_methods_on_the_chat_path_pass_through(
    gateway: Client, upstream: TestServer
) -> None:
    """Only POST is a turn with memory; OpenAI's list of stored completions is GET."""
    resp = await gateway.get("/v1/chat/completions?limit=2")
    assert [(r.method, r.path, r.query) for r in received(upstream)] == [
        ("GET", "/v1/chat/completions", "limit=2")
    ]
    assert resp.status == 405  # the mock upstream takes only POST there: its own answer
    assert resp.headers["Allow"] == "POST"


async def test_a_model_name_may_hold_slashes(gateway: Client, upstream: TestServer) -> None:
    resp = await gateway.post("/conversation/meta-llama/Llama-3.1-8B-Instruct", json={"text": "x"})
    assert resp.status == 200
    assert chats(upstream)[-1]["model"] == "meta-llama/Llama-3.1-8B-Instruct"


async def test_a_trailing_slash_is_not_part_of_the_model(
    gateway: Client, upstream: TestServer, rows: Rows
) -> None:
    for path in (
        "/conversation/meta-llama/Llama-3.1-8B-Instruct/",
        "/conversation//meta-llama/Llama-3.1-8B-Instruct",  # a leading one too (item 150)
    ):
        resp = await gateway.post(path, json={"text": "x"})
        assert resp.status == 200
        assert chats(upstream)[-1]["model"] == "meta-llama/Llama-3.1-8B-Instruct"
    sent = len(chats(upstream))
    for path in ("/conversation//", "/conversation/"):  # no model at all (item 137)
        resp = await gateway.post(path, json={"text": "x"})
        assert resp.status == 400
        assert (await resp.json())["error"]["param"] == "model"
    assert len(chats(upstream)) == sent and len(rows.messages()) == 4


async def test_conversation_sends_only_the_fields_given(
    gateway: Client, upstream: TestServer
) -> None:
    resp = await gateway.post("/conversation/m", json={"text": "x", "stop_sequence": [".", "!"]})
    assert resp.status == 200
    assert chats(upstream)[-1] == {
        "model": "m",
        "stream": True,
        "stop": [".", "!"],
        "messages": [user("x")],
    }


# --- upstream failures on both endpoints --------------------------------------------------


@pytest.mark.parametrize("status", [401, 403])
async def test_upstream_auth_failure_is_503(
    gateway_factory: GatewayFactory, rows: Rows, status: int
) -> None:
    script = Script(status=status, headers={"Content-Type": "application/json"},
                    chunks=[b'{"error": {"message": "bad key"}}'], framing="length")  # fmt: skip
    async with scripted_upstream(script) as up:
        key = "Bearer tt-api-jwt-value"
        client = await gateway_factory(up.url, upstream={"api_key": key, "auth_scheme": ""})
        for path, body in (
            ("/conversation/m", {"text": "x"}),
            ("/v1/ask", {"question": "q", "client_id": "c", "user_id": "u"}),
        ):
            resp = await client.post(path, json=body)
            assert resp.status == 503
            raw = await resp.text()
            assert json.loads(raw)["error"]["code"] == "upstream_auth_failed"
            assert "tt-api-jwt-value" not in raw
        # TT_API_JWT holding the whole header value: auth_scheme "" sends it as it is.
        assert {r[2]["Authorization"] for r in up.requests} == {key}
    assert rows.messages() == []


async def test_other_upstream_errors_pass_through(
    gateway_factory: GatewayFactory, rows: Rows
) -> None:
    body = b'{"error": {"message": "slow down"}}'
    script = Script(status=429, headers={"Content-Type": "application/json"},
                    chunks=[body], framing="length")  # fmt: skip
    async with scripted_upstream(script) as up:
        client = await gateway_factory(up.url)
        for path, request in (
            ("/conversation/m", {"text": "x"}),
            ("/v1/ask", {"question": "q", "client_id": "c", "user_id": "u"}),
        ):
            resp = await client.post(path, json=request)
            assert (resp.status, await resp.read()) == (429, body)
    assert rows.messages() == []


async def conversation_reply(gateway_factory: GatewayFactory, events: list[bytes]) -> str:
    """The text ``POST /conversation/m`` gives for an upstream that streams ``events``."""
    async with scripted_upstream(Script(chunks=[*events])) as up:
        client = await gateway_factory(up.url)
        resp = await client.post("/conversation/m", json={"text": "x"})
        assert resp.status == 200
        return (await resp.read()).decode()


async def test_conversation_stream_cut_off_ends_with_an_error_line(
    gateway_factory: GatewayFactory, rows: Rows
) -> None:
    events = [
        b'data: {"choices": [{"index": 0, "delta": {"content": "Hel"}}]}\n\n',
        b'data: {"choices": [{"index": 0, "delta": {"content": "lo"}}]}\n\n',
    ]
    text = await conversation_reply(gateway_factory, events)
    assert text == "Hello\n[error: the upstream stream ended before the answer completed]\n"
    assert rows.messages() == []


async def test_conversation_shows_a_streamed_refusal(
    gateway_factory: GatewayFactory, rows: Rows
) -> None:
    """A refusal is what the assistant said, stored as such: the client got an empty
    reply before (h53), and the refusal came back as its words in the next turn."""
    events = [
        b'data: {"choices": [{"index": 0, "delta": {"content": "", "refusal": "I can"}}]}\n\n',
        b'data: {"choices": [{"index": 0, "delta": {"refusal": "not."}}]}\n\n',
        b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}\n\n',
        b"data: [DONE]\n\n",
    ]
    assert await conversation_reply(gateway_factory, events) == "I cannot."
    assert [json.loads(m["content"]) for m in rows.messages()] == ["x", "I cannot."]


# --- configuration ----------------------------------------------------------------------


def test_compat_config(tmp_path: Path) -> None:
    path = tmp_path / "chatmem.toml"
    path.write_text('[compat]\nsession_secret = "${FLASK_SECRET}"\nask_model = "gpt-4o"\n')
    config = load_config(path, env={"FLASK_SECRET": "s3cr3t-value"})
    assert config.compat.session_secret == "s3cr3t-value"
    assert "s3cr3t-value" not in repr(config)
    with pytest.raises(ConfigError, match=r"compat\.session_secret: environment variable"):
        load_config(path, env={})
    path.write_text("[compat]\nsession_max_age = 0\n")
    with pytest.raises(ConfigError, match=r"compat\.session_max_age: must be greater than 0"):
        load_config(path, env={})


async def test_conversation_shows_the_upstreams_error_event(
    gateway_factory: GatewayFactory, rows: Rows
) -> None:
    events = [
        b'data: {"choices": [{"index": 0, "delta": {"content": "Hi"}}]}\n\n',
        b'data: {"error": {"message": "model overloaded"}}\n\n',
        b"data: [DONE]\n\n",
    ]
    assert await conversation_reply(gateway_factory, events) == "Hi\n[error: model overloaded]\n"
    assert rows.messages() == []


async def test_conversation_renders_a_non_streamed_answer_as_text(
    gateway_factory: GatewayFactory, rows: Rows
) -> None:
    completion = {
        "object": "chat.completion",
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hi."},
                "finish_reason": "stop",
            }
        ],
    }
    script = Script(headers={"Content-Type": "application/json"},
                    chunks=[json.dumps(completion).encode()], framing="length")  # fmt: skip
    async with scripted_upstream(script) as up:
        client = await gateway_factory(up.url)
        resp = await client.post("/conversation/m", json={"text": "x"})
        assert (resp.status, await resp.text()) == (200, "Hi.")
        assert resp.headers["Content-Type"] == "text/plain; charset=utf-8"
    stored = rows.messages()
    assert [json.loads(m["content"]) for m in stored] == ["x", "Hi."]


async def test_host_app_routes_get_no_session_cookie(
    aiohttp_client: Any, upstream: TestServer, db_path: Path
) -> None:
    async def hello(_request: web.Request) -> web.Response:
        return web.Response(text="host")

    app = web.Application()
    app.router.add_get("/hello", hello)
    chatmem.setup(app, make_config(db_path, upstream_url(upstream)))
    client = await aiohttp_client(app)
    host = await client.get("/hello", cookies={"chatmem_session": "x"})
    assert (await host.text(), "Set-Cookie" in host.headers) == ("host", False)
    ours = await client.post("/conversation/m", json={"text": "x"})
    assert ours.cookies["chatmem_session"].value
    assert (await ours.text()).startswith("Echo x")


async def test_a_cookie_that_is_not_utf8_starts_a_new_conversation(
    gateway_factory: GatewayFactory, upstream: TestServer
) -> None:
    # Found by a hostile-input probe: aiohttp-session failed on it (UnicodeEncodeError),
    # a 500.  Sent as raw bytes: an HTTP client would encode the value.
    client = await gateway_factory(upstream_url(upstream), compat={"session_secret": "s"})
    body = b'{"text": "one"}'
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(
        b"POST /conversation/m HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Cookie: chatmem_session=\xff\xfe\xfd\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, _ = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    assert b"Set-Cookie: chatmem_session=" in head  # a new session
    assert len(chats(upstream)[-1]["messages"]) == 1


def split_everywhere(data: bytes, step: int) -> list[bytes | float]:
    return [piece for i in range(0, len(data), step) for piece in (data[i : i + step], 0.001)]


@pytest.mark.parametrize(
    ("events", "sent", "stored"),
    [
        (answer_events(), answer_events()[:-1], True),
        # [DONE] cut anywhere, even inside its blank line
        (split_everywhere(b"".join(answer_events()), 7), answer_events()[:-1], True),
        (
            [*answer_events()[:2], sse({"error": {"message": "overloaded"}}), sse("[DONE]")],
            [*answer_events()[:2], sse({"error": {"message": "overloaded"}})],
            False,
        ),
        ([*answer_events()[:3], sse("[DONE]")], answer_events()[:3], False),  # no finish
        ([*answer_events(), sse("[DONE]")], answer_events()[:-1], True),
        ([*answer_events(), 0.01, b"data: [DONE]\n\ndata: {}\n\n"], answer_events()[:-1], True),
        # [DONE] without its blank line, at the end of a whole body: the answer finished.
        ([*answer_events()[:-1], b"data: [DONE]\n"], answer_events()[:-1], True),
        (
            [*answer_events()[:2], sse({"error": {"message": "x"}}), b"data: [DO"],
            [*answer_events()[:2], sse({"error": {"message": "x"}})],
            False,
        ),
        *(
            (
                split_everywhere(b"".join(answer_events(newline=nl)), 3),
                answer_events()[:-1],  # in the old service's LF framing
                True,
            )
            for nl in (b"\r\n", b"\r")
        ),
        # An event over 4 KiB cut off mid-way: never passed on in part.
        ([*answer_events()[:2], 0.01, sse(chunk("x" * 9000))[:6000]], answer_events()[:2], False),
        (
            [*answer_events()[:2], *split_everywhere(sse(chunk("y" * 9000)), 1500)],
            [*answer_events()[:2], sse(chunk("y" * 9000))],
            False,
        ),
    ],
    ids=[
        "whole",
        "split",
        "upstream-error",
        "no-finish-reason",
        "two-done-events",
        "more-after-done",
        "done-without-its-blank-line",
        "error-then-an-unfinished-event",
        "split-crlf",
        "split-cr",
        "a-long-event-cut-off",
        "a-long-event-in-pieces",
    ],
)
async def test_ask_streams_end_without_done(
    gateway_factory: GatewayFactory,
    rows: Rows,
    events: list[bytes | float],
    sent: list[bytes],
    stored: bool,
) -> None:
    """The old api-server's clients read every event as a chat.completion.chunk: its
    stream had no ``[DONE]``, and /v1/ask's has none either, whatever the upstream sent."""
    async with scripted_upstream(Script(chunks=events)) as up:
        client = await gateway_factory(up.url)
        resp = await client.post(
            "/v1/ask", json={"question": "q", "client_id": "1", "user_id": "2", "stream": True}
        )
        body = await resp.read()
    assert b"[DONE]" not in body and b"[DO" not in body
    assert body.startswith(b"".join(sent))
    extra = body[len(b"".join(sent)) :]
    if stored:
        assert extra == b""
        assert [m["role"] for m in rows.messages()] == ["user", "assistant"]
    else:  # at most our error event: every event is JSON
        assert extra == b"" or (extra.startswith(b'data: {"error"') and extra.count(b"\n\n") == 1)
        assert extra.endswith(b"\n\n") or not extra
        assert rows.messages() == []


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"], ids=["lf", "crlf", "cr"])
async def test_ask_streams_come_in_the_old_services_framing(
    gateway_factory: GatewayFactory, rows: Rows, newline: bytes
) -> None:
    """The old api-server's README promises events that start with ``data: `` and end
    with ``\n\n``, and its clients split on that: an upstream's comments (keep-alives,
    OpenRouter's ``: OPENROUTER PROCESSING``), its ``event:``, ``id:`` and ``retry:``
    fields and its CRLF or CR line ends broke them.  Each event goes out as its data
    alone, one ``data: `` line a line of it, in LF framing; the turn is stored as ever."""
    events = answer_events(newline=newline)
    nl = newline
    chunks: list[bytes | float | asyncio.Event] = [
        b": keep-alive" + nl + nl,
        b"retry: 100" + nl + b"id: 1" + nl + events[0],
        b": OPENROUTER PROCESSING" + nl + nl + b"event: delta" + nl + events[1][:9],
        0.01,
        events[1][9:] + events[2],
        b"data: " + json.dumps(chunk("")).encode() + nl + b"data: " + nl + nl,  # two lines
        events[3],
        events[4],
    ]
    async with scripted_upstream(Script(chunks=chunks)) as up:
        client = await gateway_factory(up.url)
        resp = await client.post(
            "/v1/ask", json={"question": "q", "client_id": "1", "user_id": "2", "stream": True}
        )
        body = await resp.read()
    two_lines = b"data: " + json.dumps(chunk("")).encode() + b"\ndata: \n\n"
    lf = answer_events()
    assert body == lf[0] + lf[1] + lf[2] + two_lines + lf[3]
    stored = rows.messages()
    assert [m["role"] for m in stored] == ["user", "assistant"]
    assert json.loads(stored[1]["content"]) == "Hello world"


async def test_the_old_services_end_their_body_at_done(
    gateway_factory: GatewayFactory, rows: Rows
) -> None:
    """Nothing after [DONE] reaches their clients, so an upstream that keeps sending
    after it does not keep their body open; and the LF of a CRLF split from its CR is
    not taken for a line of its own (they get the old service's LF framing)."""
    events = answer_events(newline=b"\r\n")
    last = events[-2]  # the finish_reason chunk
    release = asyncio.Event()
    chunks: list[bytes | float | asyncio.Event] = [
        *events[:-2],
        last[:-1],
        0.05,
        last[-1:] + events[-1],
        b": more\r\n\r\n",
        release,
    ]
    async with scripted_upstream(Script(chunks=chunks)) as up:
        client = await gateway_factory(up.url)
        try:
            ask = await client.post(
                "/v1/ask", json={"question": "q", "client_id": "1", "user_id": "2", "stream": True}
            )
            body = await asyncio.wait_for(ask.read(), 10)  # while the upstream holds on
        finally:
            release.set()
    assert body == b"".join(answer_events()[:-1])
    assert [m["role"] for m in rows.messages()] == ["user", "assistant"]


async def test_a_streamed_turn_of_the_old_services_gives_its_connection_back(
    gateway: Client,
) -> None:
    """Ending the body at [DONE] lets go of the upstream's answer: when that has all come
    (it usually has), its connection goes back to the pool, not closed."""
    pool = gateway.server.app[GATEWAY].upstream.pool
    used = []
    for _ in range(2):
        body = {"question": "q", "client_id": "1", "user_id": "2", "stream": True}
        ask = await gateway.post("/v1/ask", json=body)
        assert ask.status == 200 and b"[DONE]" not in await ask.read()
        assert len(pool._idle) == 1
        used.append(pool._idle[0])
    assert used[0] is used[1]  # the second turn went on the first one's connection
