"""POST /conversation/{model}: the older conversation service's endpoint.

Request ``{text, top_k, top_p, temperature, max_tokens, stop_sequence}``; the reply streams
back as plain text.  The conversation id lives in a signed, encrypted, http-only session
cookie (aiohttp-session's ``EncryptedCookieStorage``), so ``curl -b cookies.txt -c
cookies.txt`` continues it; the turns themselves are stored like any other conversation's.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import secrets
from typing import Any

from aiohttp import web
from aiohttp_session import Session
from aiohttp_session.cookie_storage import EncryptedCookieStorage

from .. import jsonio
from ..auth import authenticate
from ..config import CompatConfig
from ..errors import ChatmemError, InvalidRequest, error_response
from ..state import gateway_of
from ..storage.queries import Owner
from .accumulate import StreamAccumulator
from .chat import CONVERSATION_HEADER, Turn, run_turn
from .chat_request import ChatRequest, new_conversation_id, valid_conversation_id
from .fields import optional_int, optional_number, optional_stop, required_str
from .http import json_object, read_body

__all__ = ["COOKIE_SESSIONS", "CookieSessions", "PlainText", "conversation"]

log = logging.getLogger("chatmem")

COOKIE_NAME = "chatmem_session"
_CONVERSATION = "conversation"
_OWNER = "owner"  # [tenant, user] of the caller the cookie was issued to


class CookieSessions:
    """The signed session cookie that names a caller's conversation.

    aiohttp-session's middleware saves a session only into responses that are not yet
    sent, and this reply streams; so the handler loads the session from the storage
    directly and sends its cookie with the response headers, before the first byte.  No
    middleware is installed: other routes and a host application are left alone.
    """

    def __init__(self, config: CompatConfig) -> None:
        if config.session_secret:
            key = hashlib.sha256(config.session_secret.encode()).digest()
        else:
            log.warning(
                "compat.session_secret is not set: /conversation session cookies are "
                "signed with a random key and stop working when this process stops"
            )
            key = secrets.token_bytes(32)
        self._key = key
        self._config = config
        self._storages: dict[str, EncryptedCookieStorage] = {}

    def _storage_at(self, prefix: str) -> EncryptedCookieStorage:
        """The cookie storage of a gateway mounted at ``prefix`` ("" at the root).

        A gateway in a sub-app (``add_subapp("/ai/", sub)``) has a cookie of its own name
        and path: with one shared name and ``Path=/``, its ``/conversation`` and the
        host's each took the other's cookie for theirs and dropped its conversation
        (found by a review).  At the root, the name and path are as they always were."""
        storage = self._storages.get(prefix)
        if storage is None:
            slug = re.sub(r"[^A-Za-z0-9]+", "_", prefix).strip("_")
            storage = self._storages[prefix] = EncryptedCookieStorage(
                self._key,
                cookie_name=f"{COOKIE_NAME}_{slug}" if slug else COOKIE_NAME,
                path=f"{prefix}/" if prefix else "/",
                max_age=self._config.session_max_age,
                samesite="Lax",
                secure=self._config.session_cookie_secure or None,
            )
        return storage

    def _for(self, request: web.Request) -> EncryptedCookieStorage:
        resource = request.match_info.route.resource
        canonical = resource.canonical if resource is not None else ""
        return self._storage_at(canonical[: max(canonical.find("/conversation/"), 0)])

    async def load(self, request: web.Request, owner: Owner) -> tuple[Session, str]:
        """The session and its conversation id: a new one for a new or unreadable cookie,
        or for one issued to another caller (replayed, it must not even tell them the id
        of someone else's conversation)."""
        storage = self._for(request)
        try:
            session = await storage.load_session(request)
        except UnicodeError:  # a cookie value that is not UTF-8 (aiohttp-session fails)
            session = Session(None, data=None, new=True, max_age=storage.max_age)
        caller = [owner.tenant, owner.user]
        conversation_id = None
        # A cookie from before owners were recorded is taken as the caller's.
        if session.get(_OWNER, caller) == caller:
            with contextlib.suppress(ChatmemError):
                conversation_id = valid_conversation_id(session.get(_CONVERSATION), _CONVERSATION)
        if conversation_id is None:
            conversation_id = new_conversation_id()
            session[_CONVERSATION] = conversation_id
        session[_OWNER] = caller
        return session, conversation_id

    async def set_cookie_header(self, request: web.Request, session: Session) -> str:
        """The ``Set-Cookie`` value that saves ``session`` (re-sent to renew its max age)."""
        storage = self._for(request)
        scratch = web.Response()
        await storage.save_session(request, scratch, session)
        return scratch.cookies[storage.cookie_name].OutputString()


COOKIE_SESSIONS = web.AppKey("chatmem.cookie_sessions", CookieSessions)


class PlainText:
    """Renders a streamed answer as the text of choice 0, piece by piece: its content, or
    its refusal, which is what the assistant said (and is stored as such)."""

    content_type = "text/plain; charset=utf-8"

    def __init__(self) -> None:
        self._sent = 0
        self._refused = 0

    def progress(self, answer: StreamAccumulator) -> bytes:
        parts = answer.content_parts(0)
        new, self._sent = parts[self._sent :], len(parts)
        refusal = answer.refusal_parts(0)
        if len(refusal) > self._refused:
            new = [*new, *refusal[self._refused :]]
            self._refused = len(refusal)
        return jsonio.utf8("".join(new))

    def failure(self, message: str) -> bytes:
        return f"\n[error: {message}]\n".encode()


def _model(request: web.Request) -> str:
    """The model the path names.  Its name may hold slashes (``meta-llama/...``) but
    never starts or ends with one: a slash there (a base URL joined with one) is not sent
    upstream, where the model ``m/`` or ``/m`` would be refused by name."""
    model = request.match_info["model"].strip("/")
    if not model:
        raise InvalidRequest("the path names no model: POST /conversation/{model}", param="model")
    return model


def _upstream_body(model: str, body: dict[str, Any]) -> dict[str, Any]:
    """The chat completion fields: the seed's names, OpenAI's meaning (``top_k`` is the
    extra parameter vLLM, llama.cpp and TGI accept)."""
    fields: dict[str, Any] = {
        "top_k": optional_int(body, "top_k"),
        "top_p": optional_number(body, "top_p"),
        "temperature": optional_number(body, "temperature"),
        "max_tokens": optional_int(body, "max_tokens"),
        "stop": optional_stop(body, "stop_sequence"),
    }
    sent = {name: value for name, value in fields.items() if value is not None}
    return {"model": model, "stream": True, **sent}


async def conversation(request: web.Request) -> web.StreamResponse:
    gateway = gateway_of(request)
    headers: dict[str, str] = {}
    try:
        owner = authenticate(request)
        body = json_object(await read_body(request, gateway.config.server.max_body_bytes))
        text = required_str(body, "text")
        upstream_body = _upstream_body(_model(request), body)
        sessions = request.config_dict[COOKIE_SESSIONS]
        session, conversation_id = await sessions.load(request, owner)
        headers["Set-Cookie"] = await sessions.set_cookie_header(request, session)
        headers[CONVERSATION_HEADER] = conversation_id
        chat = ChatRequest(
            body=upstream_body,
            conversation_id=conversation_id,
            system=None,
            messages=[{"role": "user", "content": text}],
            stream=True,
        )
        turn = Turn(owner, chat, render=PlainText(), upstream_auth_is_ours=True)
        return await run_turn(request, turn, headers)
    except ChatmemError as exc:
        return error_response(exc, headers)
