"""Identity under attack: generated JWTs and Authorization headers against a running
gateway, and two tenants sharing a conversation id while one of them hits upstream faults."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import answer_events
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jwt_keys import OTHER_SECRET, SECRET, b64, raw_token, token
from live import LiveGateway
from scripted_upstream import Script

EXAMPLES = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CLAIMS = ["team_id", "sub", "exp", "nbf", "iat", "aud", "iss", "jti"]
HEADER_MAY_FAIL = "\x00header-may-fail"  # a marker key, never a real claim


@pytest.fixture
def live(tmp_path: Path) -> Iterator[LiveGateway]:
    with LiveGateway(tmp_path / "identity.db", auth={"jwt_secret": SECRET}) as gateway:
        yield gateway


claim_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=300),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=6,
)
tenants = st.text(min_size=1, max_size=20) | st.sampled_from(["acme", "team-a", ""])
plausible_claims = st.fixed_dictionaries(
    {"team_id": tenants},
    optional={"sub": st.text(max_size=20), "exp": st.integers(2_000_000_000, 2**40)},
)
hostile_claims = st.fixed_dictionaries(
    {},
    optional={
        "team_id": tenants | claim_values,
        "sub": st.text(max_size=20) | claim_values,
        **{name: claim_values for name in CLAIMS[2:]},
    },
) | st.dictionaries(st.sampled_from(CLAIMS) | st.text(max_size=5), claim_values, max_size=4)
claims = plausible_claims | plausible_claims | plausible_claims | hostile_claims
headers = st.fixed_dictionaries(
    {
        "alg": st.sampled_from(["HS256", "HS384", "none", "None", "RS256", "ES256", ""])
        | claim_values
    },
    optional={"typ": claim_values, "kid": claim_values, "crit": claim_values},
)


@st.composite
def tokens(draw: st.DrawFn) -> tuple[str, dict[str, Any] | None]:
    """(token, the claims when it is validly signed with the gateway's secret, else None;
    marked with HEADER_MAY_FAIL when its header has fields PyJWT may refuse)."""
    body = draw(claims)
    kind = draw(
        st.sampled_from(["valid"] * 6 + ["other-secret", "hand-made", "tampered", "garbage"])
    )
    if kind == "garbage":
        return draw(st.text(max_size=60) | st.builds(lambda n: "a." * n, st.integers(0, 9))), None
    try:
        json.dumps(body, allow_nan=False)
    except ValueError:
        body = {}
    # Signed by hand: PyJWT's own encoder refuses some of these claims.
    if kind == "valid":
        return raw_token({"alg": "HS256", "typ": "JWT"}, body, SECRET.encode()), body
    if kind == "other-secret":
        return raw_token({"alg": "HS256", "typ": "JWT"}, body, OTHER_SECRET.encode()), None
    header = draw(headers)
    sign = draw(st.sampled_from([SECRET.encode(), OTHER_SECRET.encode(), None]))
    made = raw_token(header, body, sign)
    if kind == "tampered":
        head, _, signature = made.split(".")
        made = ".".join([head, b64(json.dumps({**body, "team_id": "evil"}).encode()), signature])
        return made, None
    # Well signed, but with odd header fields PyJWT may still refuse: acceptance optional.
    signed = header.get("alg") == "HS256" and sign == SECRET.encode()
    return made, {**body, HEADER_MAY_FAIL: True} if signed else None


authorization = st.one_of(
    st.builds(lambda t: ("Bearer " + t[0], t[1]), tokens()),
    st.builds(lambda t: ("Bearer " + t[0], t[1]), tokens()),
    st.builds(lambda t: ("bearer " + t[0], t[1]), tokens()),
    st.builds(lambda t: ("Basic " + t[0], None), tokens()),
    st.builds(lambda t: (t[0], None), tokens()),
    st.sampled_from([("Bearer", None), ("Bearer ", None), ("", None)]),
)


def printable(value: str) -> bool:
    return all(32 <= ord(c) < 127 for c in value)


def expected_owner(body: dict[str, Any] | None) -> tuple[str, str] | None:
    """The (tenant, user) a token validly signed with ``body`` must act for, else None."""
    if body is None:
        return None
    tenant, user = body.get("team_id"), body.get("sub", "")
    if not isinstance(tenant, str) or not tenant or not isinstance(user, str):
        return None
    if len(tenant) > 255 or len(user) > 255 or "\x00" in tenant + user:
        return None
    return tenant, user


def test_generated_tokens(live: LiveGateway) -> None:
    statuses: Counter[int] = Counter()
    generated_token(live, statuses)
    assert statuses[401] >= 50, statuses  # not vacuous: many were refused


def test_valid_tokens_are_accepted(live: LiveGateway) -> None:
    accepted: Counter[int] = Counter()
    valid_token(live, accepted)
    assert accepted[200] >= 50, accepted


@EXAMPLES
@given(claims=plausible_claims.filter(lambda c: expected_owner(c) is not None))
def valid_token(live: LiveGateway, accepted: Counter[int], claims: dict[str, Any]) -> None:
    conversation = f"ok-{sum(accepted.values())}"
    header = "Bearer " + raw_token({"alg": "HS256", "typ": "JWT"}, claims, SECRET.encode())

    async def send() -> int:
        resp = await live.mocked.post(
            "/v1/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
            headers={"Authorization": header, "X-Conversation-Id": conversation},
        )
        await resp.read()
        return resp.status

    status = live.run(send())
    accepted[status] += 1
    assert status == 200
    assert live.owner_of(conversation) == [expected_owner(claims)]


@EXAMPLES
@given(auth=authorization)
def generated_token(
    live: LiveGateway, statuses: Counter[int], auth: tuple[str, dict[str, Any] | None]
) -> None:
    header, signed_claims = auth
    if not printable(header):
        return
    conversation = f"jwt-{sum(statuses.values())}"
    before = live.message_count()

    async def send() -> tuple[int, Any]:
        resp = await live.mocked.post(
            "/v1/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
            headers={"Authorization": header, "X-Conversation-Id": conversation},
        )
        return resp.status, await resp.json()

    status, body = live.run(send())
    statuses[status] += 1
    owner = expected_owner(signed_claims) if header.lower().startswith("bearer ") else None
    if owner is None:
        # "exp" or "nbf" may also make a validly signed token unacceptable: then 401 too.
        assert status == 401, body
        assert body["error"]["type"] == "authentication_error"
        assert live.message_count() == before
        return
    if status == 401:  # a signed token refused for its time or registered claims
        refusable = {"exp", "nbf", "iat", "aud", "iss", "jti", HEADER_MAY_FAIL}
        assert refusable & set(signed_claims or {}), body
        assert live.message_count() == before
        return
    assert status == 200, body
    assert live.owner_of(conversation) == [owner]


TENANT_A = {"Authorization": "Bearer " + token({"team_id": "team-a", "sub": "u"})}
TENANT_B = {"Authorization": "Bearer " + token({"team_id": "team-b", "sub": "u"})}
INTRUDER = {"Authorization": "Bearer " + token({"team_id": "team-c", "sub": "u"})}
FAULTS = [
    Script(chunks=answer_events()[:2], end="reset"),
    Script(chunks=[*answer_events()[:3], b"data: {broken\n\n", answer_events()[-1]]),
    Script(before_headers="garbage"),
    Script(status=500, headers={"Content-Type": "text/plain"}, chunks=[b"x"], framing="length"),
    Script(chunks=answer_events()[:3]),  # no [DONE], no finish_reason
]


def test_tenants_sharing_an_id_stay_apart_under_faults(live: LiveGateway) -> None:
    """Team A has one turn, then its turns all fail (one fault after another, through the
    scripted upstream) while team B's succeed concurrently under the same conversation id:
    B's history has exactly B's turns, A's exactly its one, the model never saw one team's
    text in the other's request, A's next turn carries only A's turn, and a third team
    sees neither."""

    async def turn(client: Any, auth: dict[str, str], text: str) -> int:
        resp = await client.post(
            "/v1/chat/completions",
            json={"model": "m", "stream": True, "messages": [{"role": "user", "content": text}]},
            headers={**auth, "X-Conversation-Id": "shared"},
        )
        await resp.read()
        return int(resp.status)

    async def scenario() -> list[int]:
        statuses = [await turn(live.mocked, TENANT_A, "a-first")]
        for round_, fault in enumerate(FAULTS * 2):
            live.scripted.script = fault
            statuses += await asyncio.gather(
                turn(live.direct, TENANT_A, f"a-{round_}"),
                turn(live.mocked, TENANT_B, f"b-{round_}"),
            )
        return statuses

    live.run(scenario())
    b_rows = live.stored("shared", tenant="team-b")
    assert [m["role"] for m in b_rows] == ["user", "assistant"] * len(FAULTS) * 2
    assert [json.loads(m["content"]) for m in b_rows[::2]] == [
        f"b-{i}" for i in range(len(FAULTS) * 2)
    ]
    a_rows = live.stored("shared", tenant="team-a")
    assert [(m["role"], json.loads(m["content"])[:12]) for m in a_rows] == [
        ("user", "a-first"),
        ("assistant", "Echo a-first"),
    ]
    # What the model was sent for B never carried anything of A's, and the reverse.
    for request in live.received():
        texts = [m["content"] for m in request.json["messages"]]
        mine = {t[0] for t in texts if t.startswith(("a-", "b-"))}
        assert len(mine) == 1, texts
    live.scripted.script = Script(chunks=[b"".join(answer_events())])

    async def probe() -> list[Any]:
        await turn(live.direct, TENANT_A, "a-probe")
        return list(json.loads(live.scripted.requests[-1][3])["messages"])

    assert [m["content"] for m in live.run(probe())] == [
        "a-first",
        json.loads(a_rows[1]["content"]),
        "a-probe",
    ]

    async def look(auth: dict[str, str]) -> tuple[int, Any, Any]:
        items = await live.mocked.get(
            "/v1/conversations/shared/items?limit=100&order=asc", headers=auth
        )
        listing = await live.mocked.get("/v1/conversations", headers=auth)
        return items.status, await items.json(), await listing.json()

    status, items, listing = live.run(look(TENANT_B))
    assert status == 200
    asked = {i["content"] for i in items["data"] if i["role"] == "user"}
    assert asked == {f"b-{i}" for i in range(len(FAULTS) * 2)}
    assert [c["id"] for c in listing["data"]] == ["shared"]
    status, items, listing = live.run(look(INTRUDER))
    assert status == 404 and listing["data"] == []
    status, items, listing = live.run(look(TENANT_A))
    assert [i["content"] for i in items["data"] if i["role"] == "user"] == ["a-first", "a-probe"]
