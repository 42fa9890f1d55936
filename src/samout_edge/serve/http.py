"""The HTTP plumbing under the routes: API keys, the body bound, and every error's JSON.

Two ASGI layers run before FastAPI reads a byte of a body: ``KeyGate`` (outermost) answers
401 to a request without one of the server's keys, its body unread, and records the key's
owner (a digest, never the key) for the sessions it makes; ``BodyLimit`` reads at most
``MAX_BODY_BYTES`` of a body and refuses a chat body of too many objects before any parse
of them. ``error_response`` is OpenAI's error body, and ``add_error_handlers`` answers every
exception with it: an ``ApiError`` with its own status and code, any other ``SamoutError``
400, pydantic's validation errors 400 in one line, a bug 500, never plain text.
"""

from __future__ import annotations

import hashlib
import hmac
import json

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from samout_edge.errors import SamoutError
from samout_edge.serve.errors import ApiError
from samout_edge.serve.protocol import MAX_CHAT_MESSAGES, validation_message

MAX_BODY_BYTES = 8 * 2**20  # a request is a prompt; 8 MiB holds a million token ids
CHAT_PATHS = ("/v1/chat/completions", "/tokenize")  # bodies that may hold chat messages


def error_response(error: ApiError) -> JSONResponse:
    """OpenAI's ``{"error": {"message", "type", "code"}}`` with the error's status."""
    return JSONResponse(error.body(), status_code=error.status)


def add_error_handlers(app: FastAPI) -> None:
    """Every exception a route raises, answered as OpenAI's error body."""

    @app.exception_handler(ApiError)  # every refusal, SessionError and StoreUnavailable included
    async def api_error(request: Request, exc: ApiError):
        return error_response(exc)

    @app.exception_handler(SamoutError)
    async def samout_error(request: Request, exc: SamoutError):
        return error_response(ApiError(str(exc)))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return error_response(ApiError(validation_message(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error_response(ApiError(str(exc.detail), exc.status_code, "http_error"))

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):  # a bug: still a JSON body, never plain text
        return error_response(ApiError(f"internal error: {type(exc).__name__}: {exc}", 500, "internal_error"))


def key_owner(key: str) -> str:
    """What a session records of the key that created it: a digest, never the key."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()[:32]


def authorize(keys: list[str], header: str | None) -> str | None:
    """The owner of a valid ``Authorization: Bearer KEY``, else None. Every key is compared,
    each in constant time, so the time taken says nothing about which key or how much matched."""
    scheme, _, given = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        return None
    given_bytes = given.strip().encode()
    match = None
    for key in keys:
        if hmac.compare_digest(key.encode(), given_bytes):
            match = key
    return None if match is None else key_owner(match)


class BodyLimit:
    """Refuse bodies over ``limit`` bytes as they arrive (chunked ones too): the body is
    read here, at most ``limit`` bytes of it, and replayed to the app; a longer one
    gets 413 without the rest being read or parsed."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await self._too_large(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away mid-body
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return await self._too_large(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False
        if scope.get("path") in CHAT_PATHS and too_many_objects(body, MAX_CHAT_MESSAGES + 16):
            response = error_response(ApiError(f"messages: more than this server's limit of {MAX_CHAT_MESSAGES:,}"))
            return await response(scope, receive, send)

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: http.disconnect, when the client goes away

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send) -> None:
        response = error_response(ApiError(f"the body is larger than {self.limit} bytes", 413, "body_too_large"))
        await response(scope, receive, send)


class _TooMany(Exception):
    pass


def too_many_objects(body: bytes, limit: int) -> bool:
    """Whether the JSON body holds more than ``limit`` objects, found out by a parse that stops
    at the one past it: 200,000 chat messages would hold the event loop (and the GIL) for a
    quarter of a second just to be parsed, before any validation could count them."""
    seen = 0

    def count(pairs: list) -> None:
        nonlocal seen
        seen += 1
        if seen > limit:
            raise _TooMany

    try:
        json.loads(body, object_pairs_hook=count)
    except _TooMany:
        return True
    except (ValueError, RecursionError):  # not JSON: FastAPI says so
        pass
    return False


class KeyGate:
    """The API key, checked on the headers before anything reads the body (the outermost
    layer): an unauthenticated request is answered 401 with its body unread, so it costs
    no buffering. The key's owner goes to ``request.state.owner`` (None without keys)."""

    def __init__(self, app, keys: list[str]):
        self.app, self.keys = app, keys

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        scope.setdefault("state", {})["owner"] = None
        if self.keys and scope.get("path") != "/health":
            header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
            owner = authorize(self.keys, header)
            if owner is None:
                response = error_response(ApiError("missing or wrong API key: send Authorization: Bearer KEY", 401,
                                                   "invalid_api_key"))
                response.headers["WWW-Authenticate"] = "Bearer"
                return await response(scope, receive, send)
            scope["state"]["owner"] = owner
        await self.app(scope, receive, send)

