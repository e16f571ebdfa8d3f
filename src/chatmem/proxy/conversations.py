"""The Conversations API (shapes of OpenAI's): the caller's conversations and their items.

Every handler authenticates first and passes the caller's :class:`Owner` to the store, whose
queries all filter on it: another owner's conversation is indistinguishable from one that
does not exist (404), and never appears in a list.
"""

from __future__ import annotations

import functools
import re
from typing import Any

from aiohttp import web

from ..auth import authenticate
from ..errors import InvalidRequest, NotFound
from ..state import gateway_of
from .chat_request import new_conversation_id, valid_conversation_id
from .conversation_shapes import (
    check_tool_results,
    conversation_json,
    item_id,
    item_json,
    list_json,
    page_json,
    parse_items,
    parse_metadata,
)
from .http import ChatmemRoutes, json_object, json_response, method_not_allowed, read_body

__all__ = ["add_conversation_routes"]

DEFAULT_LIMIT = 20
MAX_LIMIT = 100

_ITEM_ID = re.compile(r"msg_([1-9][0-9]{0,17})")


def add_conversation_routes(router: ChatmemRoutes, prefix: str) -> None:
    """Register the routes (before the ``/v1/{tail}`` passthrough, which they shadow)."""
    base = "/v1/conversations"
    one = base + "/{conversation_id}"
    items = one + "/items"
    item = items + "/{item_id}"
    name = prefix + "conversations"
    router.add_post(base, create_conversation, name=name + ".create")
    router.add_get(base, list_conversations, name=name + ".list", allow_head=False)
    router.add_get(one, get_conversation, name=name + ".get", allow_head=False)
    router.add_post(one, update_conversation, name=name + ".update")
    router.add_delete(one, delete_conversation, name=name + ".delete")
    router.add_get(items, list_items, name=name + ".items", allow_head=False)
    router.add_post(items, append_items, name=name + ".append")
    router.add_get(item, get_item, name=name + ".item", allow_head=False)
    router.add_delete(item, delete_item, name=name + ".delete_item")
    for number, path in enumerate((base, one, items, item)):
        # Other methods on our paths must not fall through to the upstream passthrough.
        router.add_route("*", path, method_not_allowed, name=f"{name}.other{number}")
    # Nor may other paths under ours ("/v1/conversations/", ".../items/", ".../x/y").
    router.add_route("*", base + "/{rest:.*}", _no_such_path, name=name + ".unknown")


# --- requests -------------------------------------------------------------------------


async def _json_body(
    request: web.Request, fields: tuple[str, ...], *, optional: bool = False
) -> dict[str, Any]:
    """The request's JSON object, which may hold only ``fields`` (as OpenAI's API, which
    answers any other with 400 ``unknown_parameter``): a typo (``item``), or ``items``
    sent to the update, which only sets metadata, would otherwise be dropped unseen."""
    raw = await read_body(request, gateway_of(request).config.server.max_body_bytes)
    if optional and not raw.strip():
        return {}
    body = json_object(raw)
    for name in body:
        if name not in fields:
            raise InvalidRequest(
                f"unknown parameter {name!r}: this request takes {' and '.join(fields)}",
                param=name,
                code="unknown_parameter",
            )
    return body


def _limit(request: web.Request) -> int:
    raw = request.query.get("limit")
    if raw is None:
        return DEFAULT_LIMIT
    # Decimal digits only: int() also takes "1_0", " 5", "+5" and other scripts' digits.
    limit = int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= 4 else 0
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidRequest(f"limit must be an integer from 1 to {MAX_LIMIT}", param="limit")
    return limit


def _newest_first(request: web.Request) -> bool:
    order = request.query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise InvalidRequest("order must be 'asc' or 'desc'", param="order")
    return order == "desc"


def _conversation_id(request: web.Request) -> str:
    """The id in the URL; one no conversation can have is a 400, as on chat."""
    return valid_conversation_id(request.match_info["conversation_id"], "conversation_id")


def _not_found() -> NotFound:
    return NotFound("conversation not found", param="conversation_id")


def _item_seq(value: str) -> int | None:
    match = _ITEM_ID.fullmatch(value)
    return int(match.group(1)) if match else None


# --- handlers -------------------------------------------------------------------------


async def create_conversation(request: web.Request) -> web.Response:
    owner = authenticate(request)
    body = await _json_body(request, ("metadata", "items"), optional=True)
    metadata = parse_metadata(body.get("metadata"))
    system, items = parse_items(body.get("items"))
    check_tool_results(items, set(), set())
    store = gateway_of(request).store
    info = await store.create_conversation(
        owner, new_conversation_id(), metadata=metadata, system=system, items=items
    )
    return json_response(conversation_json(info))


async def list_conversations(request: web.Request) -> web.Response:
    owner = authenticate(request)
    limit, newest_first = _limit(request), _newest_first(request)
    after = request.query.get("after")
    store = gateway_of(request).store
    page = await store.list_conversations(
        owner, limit=limit, after=after, newest_first=newest_first
    )
    if page is None:
        raise InvalidRequest("after does not name one of your conversations", param="after")
    data = [conversation_json(info) for info in page.data]
    return json_response(list_json(data, page.has_more))


async def get_conversation(request: web.Request) -> web.Response:
    owner = authenticate(request)
    info = await gateway_of(request).store.get_conversation(owner, _conversation_id(request))
    if info is None:
        raise _not_found()
    return json_response(conversation_json(info))


async def update_conversation(request: web.Request) -> web.Response:
    owner = authenticate(request)
    conversation_id = _conversation_id(request)
    body = await _json_body(request, ("metadata",))
    if "metadata" not in body:
        raise InvalidRequest("metadata is required", param="metadata")
    metadata = parse_metadata(body["metadata"])
    store = gateway_of(request).store
    info = await store.update_metadata(owner, conversation_id, metadata)
    if info is None:
        raise _not_found()
    return json_response(conversation_json(info))


async def delete_conversation(request: web.Request) -> web.Response:
    owner = authenticate(request)
    conversation_id = _conversation_id(request)
    if not await gateway_of(request).store.delete_conversation(owner, conversation_id):
        raise _not_found()
    return json_response({"id": conversation_id, "object": "conversation.deleted", "deleted": True})


async def list_items(request: web.Request) -> web.Response:
    owner = authenticate(request)
    conversation_id = _conversation_id(request)
    limit, newest_first = _limit(request), _newest_first(request)
    after = request.query.get("after")
    after_seq = None if after is None else _item_seq(after)
    if after is not None and after_seq is None:
        raise InvalidRequest("after must be an item id such as 'msg_1'", param="after")
    page = await gateway_of(request).store.list_items(
        owner, conversation_id, limit=limit, after_seq=after_seq, newest_first=newest_first
    )
    if page is None:
        raise _not_found()
    return json_response(page_json(page))


async def append_items(request: web.Request) -> web.Response:
    owner = authenticate(request)
    conversation_id = _conversation_id(request)
    body = await _json_body(request, ("items",))
    if not isinstance(body.get("items"), list) or not body["items"]:
        raise InvalidRequest("items must be a non-empty array of message objects", param="items")
    system, items = parse_items(body["items"])
    if items and items[0]["role"] != "tool":  # the items alone, before the lock
        check_tool_results(items, set(), set())
    # Then with the calls the stored conversation ends with (a first tool result answers
    # one of them, and a first message of another role must wait until all are
    # answered), under the conversation's lock, so that no delete can come between.
    added = await gateway_of(request).store.append_items(
        owner,
        conversation_id,
        system=system,
        items=items,
        check_results=functools.partial(check_tool_results, items),
    )
    if added is None:
        raise _not_found()
    return json_response(list_json([item_json(row) for row in added], False))


async def get_item(request: web.Request) -> web.Response:
    owner = authenticate(request)
    conversation_id = _conversation_id(request)
    seq = _item_seq(request.match_info["item_id"])
    page = await gateway_of(request).store.list_items(
        owner, conversation_id, limit=1, after_seq=(seq or 1) - 1, newest_first=False
    )
    if page is None:
        raise _not_found()
    if seq is None or not page.data or page.data[0]["seq"] != seq:
        raise NotFound("item not found", param="item_id")
    return json_response(item_json(page.data[0]))


async def delete_item(request: web.Request) -> web.Response:
    owner = authenticate(request)
    conversation_id = _conversation_id(request)
    seq = _item_seq(request.match_info["item_id"])
    store = gateway_of(request).store
    deletion = None if seq is None else await store.delete_item(owner, conversation_id, seq)
    if deletion is None:
        if await store.get_conversation(owner, conversation_id) is None:
            raise _not_found()
        raise NotFound("item not found", param="item_id")
    if deletion.call_seq is not None:
        call = item_id(deletion.call_seq)
        raise InvalidRequest(
            f"{request.match_info['item_id']} is the result of a tool call in {call}: delete"
            f" {call}, and its results go with it (a call left without its result is refused"
            " by model servers on every later turn)",
            param="item_id",
        )
    info = await store.get_conversation(owner, conversation_id)
    if info is None:  # deleted meanwhile by another request
        raise _not_found()
    return json_response(conversation_json(info))


async def _no_such_path(request: web.Request) -> web.Response:
    authenticate(request)
    raise NotFound(f"no such route: {request.method} {request.path}")
