"""The FastAPI app: its routes, each a short function over the ``Server`` in ``app.state``.

Endpoints: ``POST /v1/completions`` (token-id or text prompts, ``max_tokens``,
``temperature``, ``top_k``, ``seed``, ``stream`` as server-sent events, ``echo`` with
``logprobs`` to score a prompt, vLLM's extension fields, and our ``session`` field),
``POST /v1/chat/completions``, ``POST /v1/responses`` (serve/responses.py),
``POST/GET/DELETE /v1/sessions[/{id}]``, ``GET /v1/models``, vLLM's ``POST /tokenize``,
``POST /detokenize`` and ``GET /tokenizer_info`` (serve/tokenizer_api.py), ``GET /health``,
``GET /metrics`` (Prometheus text). Every error is ``{"error": {"message", "type", "code"}}``
with a 4xx (the request's fault) or 5xx status (serve/http.py), and a refused or failed
request changes no session: a session's state is replaced only when a request completes,
and persisted before the response says so (serve/completion.py).

The three completion routes are one path: a Responses request is the chat request it
names, a chat request is the completion of its rendered messages, and ``complete`` checks
a completion, reads its prompts and session, and starts its run.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import ValidationError

from samout_edge.serve import tokenizer_api
from samout_edge.serve.completion import open_run, replay_sse, replayed_turn
from samout_edge.serve.errors import ApiError, refuse_unsupported
from samout_edge.serve.http import MAX_BODY_BYTES, BodyLimit, KeyGate, add_error_handlers
from samout_edge.serve.protocol import ChatRequest, CompletionRequest, check_messages, validation_message
from samout_edge.serve.responses import ResponsesRequest, from_chat, stream_from_chat
from samout_edge.serve.server import Server
from samout_edge.serve.sessions import SessionError

router = APIRouter()


def create_app(server: Server) -> FastAPI:
    """The app over ``server``: its routes, the key and body layers, the error handlers, and
    the sweep that evicts idle sessions while it runs."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        sweeper = asyncio.create_task(_sweep(server))
        try:
            yield
        finally:
            sweeper.cancel()

    app = FastAPI(title="samout-edge", lifespan=lifespan)
    app.state.server = server

    @app.middleware("http")
    async def count(request: Request, call_next):
        response = await call_next(request)
        route = request.scope.get("route")
        server.metrics.inc("samout_requests_total", route=getattr(route, "path", "unmatched"),
                           status=str(response.status_code))
        return response

    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)  # before anything reads the body
    # outermost: every route but /health needs one of the server's keys (when it has any), checked before
    # the body is read; the key a request came with owns the sessions it creates
    app.add_middleware(KeyGate, keys=server.options.api_keys)
    add_error_handlers(app)
    app.include_router(router)
    return app


def server_of(request: Request) -> Server:
    return request.app.state.server


async def _sweep(server: Server) -> None:
    interval = min(60.0, max(1.0, server.options.policy.ttl_s / 4))
    while True:
        await asyncio.sleep(interval)
        await server.in_store(server.sessions.sweep)


# -- the server


@router.get("/health")
async def health(request: Request):
    server = server_of(request)
    info = server.info
    status = "ok" if server.batcher.thread.is_alive() else "runner stopped"
    if status == "ok" and server.sessions.store is not None:
        try:
            server.sessions.store.check()
        except SessionError as e:
            status = str(e)
    return JSONResponse(status_code=200 if status == "ok" else 503, content={
            "status": status, "model": server.model_name, "arch": info.arch, "backend": info.backend,
            "device": info.device, "dtype": info.dtype, "max_seq": info.max_seq,
            "vocab_size": info.config.vocab_size, "max_batch": server.batcher.max_batch,
            "sessions": len(server.sessions.sessions), "session_state_bytes": server.sessions.state_bytes,
            "corrupt_sessions": len(server.sessions.corrupt), "text_prompts": server.vocab is not None})


@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    """What OpenAI clients list first: the one model this server runs."""
    server = server_of(request)
    return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": 0,
                                        "owned_by": "samout-edge",
                                        "max_model_len": tokenizer_api.max_model_len(server),
                                        "vocab_size": server.info.config.vocab_size}]}


@router.get("/metrics")
async def prometheus(request: Request) -> PlainTextResponse:
    return PlainTextResponse(server_of(request).metrics.render(), media_type="text/plain; version=0.0.4")


# -- vLLM's tokenizer routes (serve/tokenizer_api.py)


@router.post("/tokenize")
async def tokenize(request: Request) -> dict[str, Any]:
    """vLLM's: a text's or a conversation's ids, as the export's AutoTokenizer gives them."""
    return await tokenizer_api.tokenize(server_of(request), await request.body())


@router.post("/detokenize")
async def detokenize(request: Request) -> dict[str, Any]:
    """vLLM's: the text of ids."""
    return await tokenizer_api.detokenize(server_of(request), await request.body())


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request) -> dict[str, Any]:
    """vLLM's: the tokenizer's config, special tokens and chat template (lm-eval's remote tokenizer)."""
    return await tokenizer_api.tokenizer_info(server_of(request))


# -- sessions


@router.post("/v1/sessions")
async def create_session(request: Request) -> dict[str, Any]:
    sessions = server_of(request).sessions
    sessions.unreserve(sessions.reserve(0))  # a full softmax budget takes no new sessions
    session = await server_of(request).in_store(sessions.create, request.state.owner)
    return session.to_dict()


@router.get("/v1/sessions/{session_id}")
async def get_session(session_id: str, request: Request) -> dict[str, Any]:
    return server_of(request).sessions.get(session_id, request.state.owner).to_dict()


@router.delete("/v1/sessions/{session_id}")
async def delete_session(session_id: str, request: Request) -> dict[str, Any]:
    server = server_of(request)
    await server.in_store(server.sessions.delete, session_id, request.state.owner)
    return {"id": session_id, "object": "session", "deleted": True}


# -- completions: one path


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request):
    return await complete(server_of(request), req, request)


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatRequest, request: Request):
    return await chat(server_of(request), req, request)


@router.post("/v1/responses")
async def responses(req: ResponsesRequest, request: Request):
    """OpenAI's Responses API over the chat completion it is (serve/responses.py)."""
    server = server_of(request)
    refuse_unsupported(req)
    try:
        chat_req = ChatRequest(**req.chat_body())
    except ValidationError as e:
        raise ApiError(validation_message(e.errors())) from None
    answer = await chat(server, chat_req, request)
    if isinstance(answer, StreamingResponse):
        return StreamingResponse(stream_from_chat(req, answer.body_iterator, server.model_name),
                                 media_type="text/event-stream")
    if answer.status_code != 200:
        return answer
    return JSONResponse(from_chat(req, json.loads(answer.body), server.model_name))


async def chat(server: Server, req: ChatRequest, request: Request):
    """A chat completion: the completion of its messages rendered by the chat template."""
    refuse_unsupported(req)
    if server.vocab is None:
        raise ApiError("chat needs text: this server has no vocab (serve --vocab FILE)", 400, "no_vocab")
    check_messages(req.messages)
    prompt = await server.render(server.chat_template.render, [m.for_template() for m in req.messages])
    return await complete(server, req.completion(prompt), request, chat=True, digest=req.digest())


def check_completion(server: Server, req: CompletionRequest) -> tuple[list, list[str]]:
    """The refusals that need no work: fields this server does not do, what one batch holds,
    a session's one sequence. Returns the prompts (as sent) and the stop sequences."""
    refuse_unsupported(req)
    stops = req.stops()
    if stops and server.vocab is None:
        raise ApiError("stop sequences are matched on the text: this server has no vocab (serve --vocab FILE)",
                       400, "no_vocab")
    texts = req.prompts()
    batch = server.batcher.max_batch
    if len(texts) * req.n > batch:
        raise ApiError(f"prompt: at most {batch} sequences (prompts x n) per request, what one batch holds "
                       f"(serve --max-batch), got {len(texts)} x {req.n}", 400, "too_many_choices")
    if req.session is not None and len(texts) * req.n > 1:
        raise ApiError("a session continues one sequence: a list of prompts or n > 1 takes no session")
    if req.expected_position is not None and req.session is None:
        raise ApiError("expected_position is a session's position: it needs a session")
    return texts, stops


async def complete(server: Server, req: CompletionRequest, request: Request, chat: bool = False,
                   digest: str | None = None):
    """A completion (a chat turn's too): checked, its prompts read off the event loop, its
    session taken; the session's last answer again when the request is that turn resent."""
    texts, stops = check_completion(server, req)
    prompts = [await asyncio.to_thread(server.prompt_ids, t, req.add_special_tokens)  # linear time, off the loop
               for t in texts]
    session = server.sessions.acquire(req.session, request.state.owner) if req.session is not None else None
    digest = digest or req.digest()
    if session is not None and req.expected_position not in (None, session.position):
        try:
            body = replayed_turn(session, req.expected_position, digest)
        finally:
            server.sessions.release(session)
        if req.stream:
            return StreamingResponse(iter(replay_sse(body, chat)), media_type="text/event-stream")
        return JSONResponse(body)
    run = open_run(server, req, texts, prompts, session, stops, chat, digest)
    run.start()
    if req.stream:
        return StreamingResponse(run.sse(), media_type="text/event-stream")
    return await run.whole(request)
