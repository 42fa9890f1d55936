"""One completion in flight: its choices' jobs on the batcher, and the answer they make.

``open_run`` turns a checked request into a ``Run``: a ``Choice`` (a ``Job``, its sampler and
stop matcher) per prompt and per ``n``, the session's reservation and the request's memory
admitted last, so nothing after it can fail before the run owns them. ``Run`` bridges the
batcher thread's events into asyncio and answers them as one body (``whole``: a client that
goes away cancels the jobs, and the session does not move) or as server-sent events
(``sse``: text held back while it could still start a stop sequence). A finished job's
session commit runs to its end (``_complete``) before the client hears; the committed answer
is kept with the state, and ``replayed_turn`` gives it back to the same request sent again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from samout_edge.artifact import graph
from samout_edge.generate import Sampler
from samout_edge.serve.batcher import Job, JobResult, StopMatcher, cut_at_stop
from samout_edge.serve.errors import ApiError
from samout_edge.serve.http import error_response
from samout_edge.serve.protocol import CompletionRequest
from samout_edge.serve.server import Server
from samout_edge.serve.sessions import SessionError


@dataclass
class Choice:
    """One sequence of a request: its prompt (as the client sent it) and its job."""

    index: int
    prompt: list[int]
    prompt_text: str
    job: Job
    result: JobResult | None = None


class Run:
    """One request in flight (one choice per prompt and per ``n``): bridges the batcher
    thread's events into asyncio. Its choices' jobs go in together, so they decode in
    one batch; a session takes exactly one choice."""

    def __init__(self, server: Server, session, choices: list[Choice], req: CompletionRequest, reserved: int = 0,
                 chat: bool = False, digest: str = ""):
        self.server, self.session, self.choices, self.reserved = server, session, choices, reserved
        self.digest = digest  # the request's (Sampling.digest): its answer is replayed only to the same request
        self.n = req.n  # choices per prompt: choice index = prompt index * n + j
        self.stops, self.chat = req.stops(), chat
        options = req.stream_options
        self.include_usage = bool(options and options.include_usage)
        self.continuous_usage = self.include_usage and options.continuous_usage_stats  # as vLLM: both asked
        self.echo, self.logprobs, self.skip_special = req.echo, req.logprobs, req.skip_special_tokens
        self.min_tokens = req.min_tokens
        self.id, self.created = f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}", int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self.t0 = time.perf_counter()
        self.first_token_s: float | None = None
        self.finished = False
        self.completing: asyncio.Future | None = None  # the session's commit of a finished job
        self.memory = 0  # bytes admitted (Server.admit), given back when it finishes

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        for c in self.choices:
            c.job.emit = lambda event, i=c.index: loop.call_soon_threadsafe(self.events.put_nowait, (i, *event))
        self.server.active += 1
        self.server.metrics.inc("samout_prompt_tokens_total", sum(len(c.job.ids) for c in self.choices))
        for c in self.choices:
            self.server.batcher.submit(c.job)

    async def _events(self) -> AsyncIterator[tuple[int, str, Any]]:
        """(choice, kind, value) until every choice is done, or the first error (its value an
        ApiError: status and code); the others are then cancelled."""
        waiting = len(self.choices)
        try:
            while waiting:
                index, kind, value = await self.events.get()
                if kind == "token" and self.first_token_s is None:
                    self.first_token_s = time.perf_counter() - self.t0
                    self.server.metrics.observe("samout_time_to_first_token_seconds", self.first_token_s)
                if kind == "error":
                    value = ApiError(value, 500, "runner_error")
                if kind == "done":
                    self.choices[index].result = value
                    waiting -= 1
                    self.completing = asyncio.ensure_future(self._complete(value))
                    try:
                        await asyncio.shield(self.completing)  # once done, the commit runs to its end
                    except ApiError as e:  # the store could not record it: the session did not move
                        kind, value = "error", e
                yield index, kind, value
                if kind == "error":
                    return
        finally:
            self._finish()

    async def _complete(self, result: JobResult) -> None:
        if self.session is not None:
            before = self.session.position

            def turn(after) -> dict[str, Any]:  # kept with the state: the answer, for a client that lost it
                return {"from_position": before, "request": self.digest, "response": self.body(after.to_dict())}

            await self.server.in_store(self.server.sessions.commit, self.session, result.state, result.consumed,
                                       result.pending, turn)
        m = self.server.metrics
        m.inc("samout_generated_tokens_total", len(result.new))
        m.observe("samout_request_seconds", time.perf_counter() - self.t0)

    def _finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        for c in self.choices:
            c.job.cancelled.set()  # a no-op once done; stops the work of a client that went away
        self.server.active -= 1
        self.server.memory_held -= self.memory
        self.server.sessions.unreserve(self.reserved)
        if self.session is not None:
            session, sessions = self.session, self.server.sessions
            if self.completing is not None and not self.completing.done():  # released once its commit has landed
                def release(task: asyncio.Future) -> None:
                    if not task.cancelled():
                        task.exception()  # retrieved: a failed commit was already answered for
                    sessions.release(session)

                self.completing.add_done_callback(release)
            else:
                sessions.release(session)

    def usage(self, generated: dict[int, int] | None = None) -> dict[str, int]:
        """Each distinct prompt counted once (as OpenAI does with n), every choice's tokens (so far,
        for a stream's continuous usage: ``generated`` counts each choice's tokens sent)."""
        prompts = sum(len(c.prompt) for c in self.choices if c.index % self.n == 0)
        if generated is None:
            completion = sum(len(c.result.new) for c in self.choices if c.result is not None)
        else:
            completion = sum(generated.values())
        return {"prompt_tokens": prompts, "completion_tokens": completion, "total_tokens": prompts + completion}

    def text(self, tokens: list[int]) -> str:
        return self.server.text(tokens, self.skip_special)

    def cut(self, text: str, new: list[int]) -> tuple[str, bool]:
        """The text up to its first stop sequence that ends after the first min_tokens - 1 tokens' text
        (vLLM's min_tokens: no stop before then), and whether one was."""
        after = 0
        if self.min_tokens > 1 and self.stops:
            piece = self.server.pieces(self.skip_special)
            after = sum(len(piece(t)) for t in new[: self.min_tokens - 1])
        return cut_at_stop(text, self.stops, after)

    def offsets(self, tokens: list[int], base: int = 0) -> list[int]:
        """OpenAI's ``text_offset``: where each token's text starts, in characters (a token that
        completes no character yet starts where the text stands)."""
        piece, at, out = self.server.pieces(self.skip_special), base, []
        for t in tokens:
            out.append(at)
            at += len(piece(t))
        return out

    def token_name(self, token: int) -> tuple[str, list[int]]:
        """(name, bytes) of a token for logprobs: a token that is not whole characters is named
        by its bytes (``bytes:\\xNN``), as OpenAI does, so distinct tokens keep distinct names."""
        if self.server.vocab is None:
            return str(token), []
        return self.server.vocab.token_name(token)

    def logprob_entry(self, job: Job, start: int, stop: int | None = None, offsets: list[int] | None = None,
                      steps: list | None = None) -> dict[str, Any]:
        """OpenAI's logprobs for the job's tokens [start:stop] (by step: a stream names the step
        its chunk carries, never the trace's current end), or for ``steps`` (the prompt's, with
        echo): each token's name, its log-probability under the model (before sampling's cuts and
        penalties; the prompt's first is null), the top ones. Chat's form gives each token's bytes too."""
        steps = job.logprob_trace[start:stop] if steps is None else steps
        name = self.token_name
        if self.chat:
            def entry(t: int, lp: float) -> dict[str, Any]:
                token, data = name(t)
                return {"token": token, "logprob": lp, "bytes": data}

            return {"content": [{**entry(t, lp), "top_logprobs": [entry(u, v) for u, v in top]}
                                for t, lp, top in steps], "refusal": None}
        return {"tokens": [name(t)[0] for t, _, _ in steps], "token_logprobs": [lp for _, lp, _ in steps],
                "top_logprobs": [None if top is None else {name(t)[0]: lp for t, lp in top} for _, _, top in steps],
                "text_offset": offsets if offsets is not None else []}

    def completion_logprobs(self, c: Choice) -> dict[str, Any]:
        """The prompt's steps (with echo) then the generated tokens', with their text offsets."""
        generated = self.logprob_entry(c.job, 0, offsets=self.offsets(c.result.new,
                                                                          len(c.prompt_text) if self.echo else 0))
        if c.job.echo_from is None:
            return generated
        prompt = self.logprob_entry(c.job, 0, steps=c.job.prompt_trace, offsets=self.offsets(c.prompt))
        return {key: prompt[key] + generated[key] for key in generated}

    def choice_body(self, c: Choice) -> dict[str, Any]:
        text, stopped = self.cut(self.text(c.result.new), c.result.new)
        if self.echo:
            text = c.prompt_text + text
        content = {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text}
        logprobs = None
        if self.logprobs is not None:
            logprobs = self.logprob_entry(c.job, 0) if self.chat else self.completion_logprobs(c)
        return {"index": c.index, **content, "token_ids": c.result.new, "logprobs": logprobs,
                "finish_reason": "stop" if stopped else "length"}

    def body(self, session: dict[str, Any] | None = None) -> dict[str, Any]:
        body = {"id": self.id, "object": self.object, "created": self.created, "model": self.server.model_name,
                "choices": [self.choice_body(c) for c in self.choices], "usage": self.usage()}
        if self.session is not None:
            body["session"] = session or self.session.to_dict()
        return body

    async def whole(self, request: Request) -> JSONResponse:
        """The whole completion as one body. A client that goes away before it is done
        cancels the jobs: nobody receives those tokens, so the session does not take them."""

        async def result() -> JSONResponse:
            async for _, kind, value in self._events():
                if kind == "error":
                    return error_response(value)
            return JSONResponse(self.body())

        answer, gone = asyncio.ensure_future(result()), asyncio.ensure_future(disconnected(request))
        try:
            await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
            if answer.done():
                return answer.result()
            answer.cancel()  # closes the event stream: the jobs are cancelled, the session released unchanged
            with contextlib.suppress(asyncio.CancelledError):
                await answer
            return error_response(ApiError("the client closed the request", 499, "client_closed_request"))
        finally:
            gone.cancel()

    async def sse(self) -> AsyncIterator[str]:
        """A chunk per token (each naming its choice). With stop sequences the text is held
        back while it could still be the start of one, so no chunk ever carries text the
        whole completion leaves out."""
        chunk_object = "chat.completion.chunk" if self.chat else "text_completion"

        def data(payload: dict) -> str:
            return "data: " + json.dumps({"id": self.id, "object": chunk_object, "created": self.created,
                                          "model": self.server.model_name, **payload}) + "\n\n"

        def chunk(index: int, text: str, ids: list[int], finish: str | None = None, logprobs=None, **extra) -> str:
            content = {"delta": {"content": text} if text or finish is None else {}} if self.chat else {"text": text}
            return data({"choices": [{"index": index, **content, "token_ids": ids, "logprobs": logprobs,
                                      "finish_reason": finish}], **extra})

        hold = max((len(s) for s in self.stops), default=1) - 1
        generated = {c.index: "" for c in self.choices}
        sent = {c.index: 0 for c in self.choices}
        steps = {c.index: 0 for c in self.choices}  # tokens received: the step each event is (the job is ahead)
        pieces = {c.index: self.server.pieces(self.skip_special) for c in self.choices}  # whole characters only
        base = {c.index: len(c.prompt_text) if self.echo else 0 for c in self.choices}  # text_offset's origin
        for c in self.choices:
            if self.chat:  # OpenAI's first chat chunk names the role
                yield data({"choices": [{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None}]})
            elif self.echo and c.prompt_text and c.job.echo_from is None:  # scored: sent with its logprobs below
                yield chunk(c.index, c.prompt_text, [])

        def usage() -> dict[str, Any]:
            return {"usage": self.usage(steps)} if self.continuous_usage else {}

        async for index, kind, value in self._events():
            c = self.choices[index]
            if kind == "prompt":  # the prompt's log-probabilities are in: the echo, with them
                logprobs = self.logprob_entry(c.job, 0, steps=c.job.prompt_trace, offsets=self.offsets(c.prompt))
                yield chunk(index, c.prompt_text, [], logprobs=logprobs, **usage())
            elif kind == "token":
                offset = base[index] + len(generated[index])
                generated[index] += pieces[index](value)
                visible, stopped = self.cut(generated[index], c.job.new[: steps[index] + 1])
                safe = len(visible) if stopped else max(sent[index], len(generated[index]) - hold)
                step = steps[index]
                steps[index] += 1
                logprobs = self.logprob_entry(c.job, step, step + 1, [offset]) if self.logprobs is not None else None
                yield chunk(index, generated[index][sent[index]:safe], [value], logprobs=logprobs, **usage())
                sent[index] = safe
            elif kind == "done":  # the whole text, as unstreamed: what the stream held (a last partial
                # character's U+FFFD) comes out, and the chunks join to exactly the completion's text
                final, stopped = self.cut(self.text(value.new), value.new)
                last = all(x.result is not None for x in self.choices)
                # the usage once: on the finishing chunk unless include_usage asked for its own last chunk
                extra = {"usage": self.usage()} if last and not self.include_usage else usage()
                if last and self.session is not None:
                    extra["session"] = self.session.to_dict()
                yield chunk(index, final[sent[index]:], [], "stop" if stopped else "length", **extra)
                if last and self.include_usage:  # OpenAI's stream_options.include_usage: a last chunk, no choices
                    yield data({"choices": [], "usage": self.usage()})
            else:
                yield "data: " + json.dumps(value.body()) + "\n\n"
        yield "data: [DONE]\n\n"


def open_run(server: Server, req: CompletionRequest, texts: list, prompts: list[list[int]], session,
             stops: list[str], chat: bool, digest: str) -> Run:
    """The run of a checked request: a choice per prompt and per ``n``, each prompt checked
    against the server's limits after the session's pending token; the session's KV growth
    reserved and the memory admitted last, so nothing after it can fail before the run owns
    them. On any refusal the session is released unchanged."""
    reserved = 0
    try:
        choices, need = [], 0
        seed = req.seed if req.seed is not None else secrets.randbits(63)
        scored = req.echo and req.logprobs is not None  # echo with logprobs: the prompt's log-probabilities
        for p, (text, prompt) in enumerate(zip(texts, prompts)):
            pending = session.pending if session else []
            ids = pending + prompt
            position = session.position if session else 0
            server.check_request(req, prompt, ids, position)
            need += req.n * server.request_bytes(len(ids), position + len(ids) + req.max_tokens - 1)
            if session is not None:
                reserved = server.sessions.reserve(graph.state_bytes(
                    server.info.config, server.info.spec, 1, len(ids) + req.max_tokens - 1, server.info.dtype))
            state = session.state if session else server.initial
            for j in range(req.n):
                index = p * req.n + j
                sampler = Sampler(req.temperature, max(req.top_k, 0), (seed + index) % 2**63, req.top_p,
                                  req.presence_penalty, req.frequency_penalty, req.repetition_penalty)
                sampler.context.update(ids)  # repetition_penalty: the prompt's tokens too, as vLLM counts them
                stop = StopMatcher(stops, server.pieces(req.skip_special_tokens)) if stops else None
                job = Job(ids, state, req.max_tokens, sampler, emit=lambda e: None, stop=stop,
                          logprobs=req.logprobs, echo_from=len(pending) if scored and prompt else None,
                          min_tokens=req.min_tokens)
                echo = text if isinstance(text, str) else server.text(prompt, req.skip_special_tokens)
                choices.append(Choice(index, prompt, echo if req.echo else "", job))
        run = Run(server, session, choices, req, reserved, chat, digest)
        run.memory = server.admit(need)  # last: nothing after it can fail before the run owns it
    except BaseException:
        server.sessions.unreserve(reserved)
        if session is not None:
            server.sessions.release(session)
        raise
    return run


def replayed_turn(session, expected: int, digest: str) -> dict[str, Any]:
    """The committed answer of the session's last turn, when this request is that turn sent
    again from where it started (its answer was lost: kill -9, a dropped connection);
    otherwise the client and the session disagree: 409 with both positions."""
    turn = session.last_turn
    if turn is not None and turn.get("from_position") == expected and turn.get("request") == digest:
        return {**turn["response"], "replayed": True}
    why = ("its last turn started there with another request" if turn is not None and
           turn.get("from_position") == expected else "no turn of it started there")
    raise SessionError(f"session {session.id} is at position {session.position}, not at expected_position {expected}, "
                       f"and {why}: nothing was run", 409, "position_mismatch")


def replay_sse(body: dict[str, Any], chat: bool) -> list[str]:
    """A replayed answer as a stream: each choice's whole text and tokens in one chunk, then [DONE]."""
    head = {"id": body["id"], "object": "chat.completion.chunk" if chat else "text_completion",
            "created": body["created"], "model": body["model"], "replayed": True}
    chunks = []
    for c in body["choices"]:
        if chat:
            chunks.append({**head, "choices": [{"index": c["index"], "delta": {"role": "assistant", "content": ""},
                                                "logprobs": None, "finish_reason": None}]})
            content = {"delta": {"content": c["message"]["content"]}}
        else:
            content = {"text": c["text"]}
        chunks.append({**head, "choices": [{"index": c["index"], **content, "token_ids": c["token_ids"],
                                            "logprobs": c["logprobs"], "finish_reason": c["finish_reason"]}],
                       "usage": body["usage"], **({"session": body["session"]} if "session" in body else {})})
    return [f"data: {json.dumps(chunk)}\n\n" for chunk in chunks] + ["data: [DONE]\n\n"]


async def disconnected(request: Request) -> None:
    """Returns when the client has gone away (the body was read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
