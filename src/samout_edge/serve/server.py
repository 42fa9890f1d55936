"""The HTTP server: OpenAI-style completions over the batcher, with persistent sessions.

Endpoints: ``POST /v1/completions`` (token-id or text prompts, ``max_tokens``,
``temperature``, ``top_k``, ``seed``, ``stream`` as server-sent events, ``echo`` with
``logprobs`` to score a prompt, vLLM's extension fields, and our ``session`` field),
``POST /v1/chat/completions``, ``POST /v1/responses`` (serve/responses.py),
``POST/GET/DELETE /v1/sessions[/{id}]``, ``GET /v1/models``,
``GET /health``, ``GET /metrics`` (Prometheus text). Every error is
``{"error": {"message", "type", "code"}}`` with a 4xx (the request's fault) or 5xx status, and a
refused or failed request changes no session: a session's state is replaced
only when a request completes, and persisted before the response says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import json
import math
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from samout_edge.artifact import graph, resources
from samout_edge.artifact.vocab import HFTokenizer, check_text
from samout_edge.errors import SamoutError
from samout_edge.generate import Sampler, Vocab
from samout_edge.runtime.base import Runner, check_context
from samout_edge.runtime.target import Target
from samout_edge.serve.batcher import Batcher, Job, JobResult, StopMatcher, cut_at_stop
from samout_edge.serve.metrics import BATCH_BUCKETS, Metrics
from samout_edge.serve.responses import ResponsesRequest, from_chat, stream_from_chat
from samout_edge.serve.sessions import SessionError, SessionPolicy, SessionStore, SessionTable
from samout_edge.serve.template import DEFAULT_CHAT_TEMPLATE, ChatTemplate, TemplateFailure  # noqa: F401 - API
from samout_edge.serve.tokenize import WORKER_CHARS, TokenizerWorker, check_chars

DEFAULT_MAX_TOKENS = 16
MAX_PROMPTS = 4096  # prompts in one request, counted before they are validated; one batch (--max-batch) decides
MAX_STOPS = 64  # stop strings a request may give (vLLM takes any number; each is matched on every token's text)
MAX_STOP_CHARS = 1024  # one stop string: a stream holds back text as long as the longest, minus one
MAX_BODY_BYTES = 8 * 2**20  # a request is a prompt; 8 MiB holds a million token ids
MAX_CHAT_MESSAGES = 4096  # a chat request's messages: each is validated and rendered on its way to a prompt
# fp32 buffers of the hidden size a graph call holds per position at once (residual stream, mix, the FFN's
# input and its wider middle): an estimate with headroom, for admission
ACTIVATION_BUFFERS = 8


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    store: Path | None = None  # None: sessions live in memory only
    max_batch: int = 32
    max_tokens: int = 4096  # per request
    policy: SessionPolicy = field(default_factory=SessionPolicy)
    max_prompt_tokens: int = 131072  # tokens a request may send; a session's context grows without limit (cummax)
    max_prompt_chars: int = 1 << 20  # characters a text prompt may have, as sent and NFKC-normalised
    store_busy_timeout_s: float = 5.0  # how long a write waits for another process's lock on the store
    api_keys: list[str] = field(default_factory=list)  # any of them opens every route but /health; none: open
    chat_template: str | None = None  # Jinja source for /v1/chat/completions; None: DEFAULT_CHAT_TEMPLATE
    chat_template_vars: dict[str, str] = field(default_factory=dict)  # tokenizer_config.json's bos_token, eos_token...
    template_timeout_s: float = 5.0  # one render of an operator's template, at most (its process is then replaced)

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise SamoutError(f"--max-batch must be at least 1, got {self.max_batch}")
        if self.max_tokens < 1:
            raise SamoutError(f"--max-tokens must be at least 1, got {self.max_tokens}")
        if self.max_prompt_tokens < 1:
            raise SamoutError(f"--max-prompt-tokens must be at least 1, got {self.max_prompt_tokens}")
        if self.max_prompt_chars < 1:
            raise SamoutError(f"--max-prompt-chars must be at least 1, got {self.max_prompt_chars}")
        if self.policy.max_sessions < 1:
            raise SamoutError(f"--max-sessions must be at least 1, got {self.policy.max_sessions}")
        if not (self.policy.ttl_s > 0 and math.isfinite(self.policy.ttl_s)):
            raise SamoutError(f"--session-ttl must be a positive number of seconds, got {self.policy.ttl_s}")
        if self.policy.kv_budget_bytes is not None and self.policy.kv_budget_bytes < 0:
            raise SamoutError("--kv-budget-mib must be >= 0")
        if not (self.template_timeout_s > 0 and math.isfinite(self.template_timeout_s)):
            raise SamoutError(f"the template timeout must be a positive number of seconds, got {self.template_timeout_s}")
        if not 0 <= self.port <= 65535:
            raise SamoutError(f"--port must be 0..65535, got {self.port}")
        for key in self.api_keys:
            if len(key) < MIN_KEY_LENGTH or not key.isprintable() or any(c.isspace() for c in key):
                raise SamoutError(f"an API key must be at least {MIN_KEY_LENGTH} printable characters without spaces")
            if not key.isascii():  # an HTTP header carries Latin-1 at best: such a key could never match
                raise SamoutError("an API key must be ASCII (a header cannot carry it as UTF-8): this one is not")


MIN_KEY_LENGTH = 16


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


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: with include_usage, every chunk carries the usage so far


def _stop_strings(value: Any) -> Any:
    """``stop``: a string or a list of them, each limit named (a client's list is refused whole,
    never cut)."""
    if value is None or isinstance(value, str):
        value = [] if value is None else [value]
    elif not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("must be a string or a list of strings")
    if len(value) > MAX_STOPS:
        raise ValueError(f"at most {MAX_STOPS} strings, got {len(value)}")
    for i, v in enumerate(value):
        if not v:
            raise ValueError(f"stop sequence {i} is empty")
        if len(v) > MAX_STOP_CHARS:
            raise ValueError(f"stop sequence {i} is {len(v):,} characters, above the limit of {MAX_STOP_CHARS:,}")
    return value


def _prompt_list(value: Any) -> Any:
    """``prompt``: a text, token ids, or a list of either (not mixed); counted before each is
    validated, so a body of a million prompts costs no more than its parse."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise ValueError("must be a string, a list of token ids, or a list of strings or of token-id lists")
    if value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return value
    if not value:
        raise ValueError("an empty list: send at least one prompt (an empty string is an empty prompt)")
    if len(value) > MAX_PROMPTS:
        raise ValueError(f"at most {MAX_PROMPTS:,} prompts per request (and what one batch holds), got {len(value):,}")
    if all(isinstance(v, str) for v in value):
        return value
    for i, v in enumerate(value):
        if not isinstance(v, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in v):
            raise ValueError(f"prompt {i} is not a list of token ids (a list of prompts holds strings or id lists, "
                             "one kind)")
    return value


class Sampling(BaseModel):
    """The fields completions and chat completions share: how to sample, when to stop, how
    to answer. Every field is honoured; OpenAI's fields this server does not implement are
    accepted only at the value that asks for nothing (``unsupported`` names any other), and
    a field OpenAI does not have is refused: never silence."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    temperature: float = Field(1.0, ge=0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    top_k: StrictInt = Field(0, ge=-1)  # 0 or vLLM's -1: no cut
    presence_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    stop: Annotated[list[str], BeforeValidator(_stop_strings)] = Field(default_factory=list)
    seed: StrictInt | None = Field(None, ge=0, le=2**63 - 1)
    n: StrictInt = Field(1, ge=1)  # prompts x n: what one batch holds (serve --max-batch), checked per server
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # the end user, for the operator's records: it changes no output
    # OpenAI's: this server keeps no completions (store true is refused); metadata is for the operator's records
    store: bool | None = None
    metadata: Annotated[dict[str, Annotated[str, Field(max_length=512)]], Field(max_length=16)] | None = None
    # vLLM's extensions, as benchmark and eval clients send them (docs.vllm.ai, "Extra parameters")
    repetition_penalty: float = Field(1.0, gt=0, allow_inf_nan=False)  # > 1 discourages the context's tokens
    min_tokens: StrictInt = Field(0, ge=0)  # stop sequences end nothing before this many tokens
    ignore_eos: bool = False  # no vocab here has an end-of-sequence token that stops generation: either value
    skip_special_tokens: bool = True  # a Hugging Face tokenizer's special tokens are left out of the text
    spaces_between_special_tokens: bool = True  # a slow tokenizer's; a fast tokenizer's decoding ignores it
    add_special_tokens: bool = False  # the tokenizer's BOS/EOS around a text prompt (Hugging Face tokenizers)
    session: str | None = None  # ours: continue a server-side session
    # ours: the session's position as the client last saw it; a request whose answer was lost (kill -9,
    # a dropped connection) sent again with it gets the committed answer back instead of a second turn
    expected_position: StrictInt | None = Field(None, ge=0)

    def digest(self) -> str:
        """What makes two requests the same turn: every field but how the answer is delivered."""
        fields = self.model_dump(exclude={"stream", "stream_options", "expected_position"})
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()

    def unsupported_common(self) -> str | None:
        if self.store:
            return "store"  # this server keeps no completions to list or distil
        if self.min_tokens and self.min_tokens > self.limit():
            raise SessionError(f"min_tokens ({self.min_tokens}) is above max_tokens ({self.limit()})", 400,
                               "invalid_request")
        return None

    def limit(self) -> int:
        return DEFAULT_MAX_TOKENS


class CompletionRequest(Sampling):
    """OpenAI's completion request."""

    # one prompt (text or token ids), or a list of them: choice i * n + j is prompt i's j-th
    prompt: Annotated[str | list[StrictInt] | list[str] | list[list[StrictInt]], BeforeValidator(_prompt_list)] = ""
    max_tokens: StrictInt = Field(DEFAULT_MAX_TOKENS, ge=0)  # 0: only the prompt (with echo and logprobs: scored)
    best_of: StrictInt | None = None  # only = n: we return every sequence we make
    echo: bool = False  # the prompt's text before the completion's
    logprobs: StrictInt | None = Field(None, ge=0, le=5)  # each token's log-probability and the top ones
    # OpenAI's, not implemented: refused unless at the value that asks for nothing
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None

    def prompts(self) -> list[str | list[int]]:
        if isinstance(self.prompt, list) and self.prompt and not isinstance(self.prompt[0], int):
            return list(self.prompt)
        return [self.prompt]

    def limit(self) -> int:
        return self.max_tokens

    def unsupported(self) -> str | None:
        """The first parameter set to something this server does not do."""
        for name, idle in (("logit_bias", {}), ("suffix", None)):
            value = getattr(self, name)
            if value is not None and value != idle:
                return name
        if self.best_of is not None and self.best_of != self.n:
            return "best_of"  # best_of > n: sequences made and thrown away; we return all we make
        return self.unsupported_common()

    def stops(self) -> list[str]:
        return list(self.stop)


def _content_text(value: Any) -> Any:
    """A message's content: a string, or OpenAI's list of parts of which only text parts are
    read (joined by newlines, as vLLM joins them); any other part is refused by its type."""
    if value is None or isinstance(value, str):
        return value or ""
    if not isinstance(value, list):
        raise ValueError("must be a string or a list of content parts")
    texts = []
    for i, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str) or set(part) - {"type", "text"}:
            what = f"a {kind!r} part" if isinstance(kind, str) else "not a content part"
            raise ValueError(f"part {i} is {what}: this server reads only {{\"type\": \"text\", \"text\": ...}} "
                             "parts (the model reads text)")
        texts.append(part["text"])
    return "\n".join(texts)


def few_messages(messages: Any) -> Any:
    """Chat messages counted before each is validated: validating 200,000 of them holds the event loop for seconds."""
    if isinstance(messages, list) and len(messages) > MAX_CHAT_MESSAGES:
        raise ValueError(f"{len(messages):,} messages, above this server's limit of {MAX_CHAT_MESSAGES:,}")
    return messages


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]  # developer: OpenAI's newer name for system
    content: Annotated[str, BeforeValidator(_content_text)] = ""
    name: str | None = None

    def for_template(self) -> dict[str, Any]:
        message = self.model_dump(exclude_none=True)
        if self.role == "developer":
            message["role"] = "system"
        return message


class ChatRequest(Sampling):
    """OpenAI's chat completion request: the messages go through the chat template into a
    completion's prompt; tools and every other unimplemented field are refused by name."""

    messages: Annotated[list[ChatMessage], BeforeValidator(few_messages),
                        Field(min_length=1, max_length=MAX_CHAT_MESSAGES)]
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: bool | None = None  # each token's log-probability (with its bytes), as OpenAI's chat answers
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)  # and this many most likely, with logprobs
    logit_bias: dict[str, float] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None

    def limit(self) -> int:
        return self.max_completion_tokens or self.max_tokens or DEFAULT_MAX_TOKENS

    def unsupported(self) -> str | None:
        if self.tools or self.functions or self.tool_choice not in (None, "none") or \
                self.function_call not in (None, "none"):
            return "tools"  # tool calls: the model has no tool-call format
        for name, idle in (("logit_bias", {}), ("parallel_tool_calls", None)):
            value = getattr(self, name)
            if value is not None and value != idle:
                return name
        if self.response_format not in (None, {"type": "text"}):
            return "response_format"
        return self.unsupported_common()

    def completion(self, prompt: str) -> CompletionRequest:
        """The completion this chat turn is: the shared fields, the rendered prompt."""
        if self.top_logprobs and not self.logprobs:
            raise SessionError("top_logprobs needs logprobs: true", 400, "invalid_request")
        req = CompletionRequest(prompt=prompt, max_tokens=self.limit(),
                                **{k: getattr(self, k) for k in Sampling.model_fields})
        req.logprobs = (self.top_logprobs or 0) if self.logprobs else None  # chat takes up to 20, completions 5
        return req

    def check_text(self) -> None:
        """Refuse a message that is not valid Unicode (a lone surrogate), naming it."""
        for i, m in enumerate(self.messages):
            try:
                check_text(m.content)
            except SamoutError as e:
                raise SessionError(f"messages.{i}.content: {e}", 400, "invalid_text") from None


class Server:
    """What the routes share: the runner's description, the batcher, sessions, metrics."""

    def __init__(self, load_runner, options: ServeOptions, identity: str, vocab: Vocab | None = None,
                 model_name: str = "samout"):
        self.options, self.vocab, self.model_name = options, vocab, model_name
        self.chat_template = ChatTemplate(options.chat_template, options.chat_template_vars,
                                          options.template_timeout_s)
        if options.chat_template is not None:  # an operator's template: refused now if it hangs or floods
            try:
                self.chat_template.check()
            except BaseException:
                self.chat_template.close()
                raise
        self.metrics = Metrics()
        self.batcher = Batcher(load_runner, options.max_batch, self._on_step)
        runner: Runner = self.batcher.start()
        self.info = runner.info
        self.initial = runner.host_state(runner.initial_state(1))
        dtypes = sorted({a.dtype.name for a in self.initial.values()})
        fingerprint = f"{self.info.arch}/{','.join(dtypes)}/{identity}"
        store = None
        if options.store is not None:
            try:
                store = SessionStore(options.store, fingerprint, options.store_busy_timeout_s)
            except BaseException:
                self.batcher.stop()
                raise
        self.sessions = SessionTable(store, self.initial, self.info.spec, self.info.config.num_layers, options.policy,
                                     len(options.api_keys))
        # SQLite's waits (a store locked by another process) run here, not on the event loop and not in
        # the default pool that tokenizes prompts: a locked store holds up only the writes
        self.store_pool = ThreadPoolExecutor(4, thread_name_prefix="samout-store")
        self.active = 0
        self.memory_held = 0  # bytes admitted to requests still running (admit)
        self.tokenizer_worker: TokenizerWorker | None = None  # a tokenizer.json's child process (serve/tokenize.py)
        self.worker_lock = threading.Lock()
        m = self.metrics
        m.counter("samout_requests_total", "HTTP requests by route and status.")
        m.counter("samout_prompt_tokens_total", "Tokens consumed from prompts (and sessions' pending tokens).")
        m.counter("samout_generated_tokens_total", "Tokens generated.")
        m.histogram("samout_request_seconds", "Completion latency, request to last token.")
        m.histogram("samout_time_to_first_token_seconds", "Request to first token (queueing and prefill).")
        m.histogram("samout_step_seconds", "One runner call, by kind (prefill, decode).")
        m.histogram("samout_batch_size", "Requests per runner call, by kind.", BATCH_BUCKETS)
        m.gauges.update({
            "samout_live_sessions": ("Sessions held.", lambda: len(self.sessions.sessions)),
            "samout_session_state_bytes": ("Bytes of all sessions' states.", lambda: self.sessions.state_bytes),
            "samout_active_requests": ("Completions running.", lambda: self.active),
            "samout_corrupt_sessions": ("Stored sessions that failed their checksum at start.",
                                        lambda: len(self.sessions.corrupt)),
        })

    def _on_step(self, kind: str, batch: int, seconds: float) -> None:
        self.metrics.observe("samout_step_seconds", seconds, kind=kind)
        self.metrics.observe("samout_batch_size", batch, kind=kind)

    async def in_store(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a session-table call that writes the store, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.store_pool, functools.partial(fn, *args))

    def close(self) -> None:
        if self.tokenizer_worker is not None:
            self.tokenizer_worker.close()
        self.store_pool.shutdown(wait=True)
        self.batcher.stop()
        self.chat_template.close()
        if self.sessions.store is not None:
            self.sessions.store.close()

    # -- requests

    def prompt_ids(self, prompt: str | list[int], add_special_tokens: bool = False) -> list[int]:
        if isinstance(prompt, str) and add_special_tokens and prompt:
            before, after = self.special_affixes()
            return before + self.prompt_ids(prompt) + after
        if isinstance(prompt, str):
            if not prompt:
                return []
            if self.vocab is None:
                raise SessionError("this server has no vocab (serve --vocab FILE): send the prompt as token ids",
                                   400, "no_vocab")
            try:
                check_text(prompt)  # a lone surrogate has no bytes: refused, never guessed
            except SamoutError as e:
                raise SessionError(str(e), 400, "invalid_text") from None
            limit = self.options.max_prompt_tokens
            check_chars(prompt, self.options.max_prompt_chars)  # before any tokenizer's work
            fewest = self.vocab.fewest_tokens(prompt)  # checked before encoding: a huge text is refused at once
            if fewest > limit:
                raise SessionError(f"the prompt is at least {fewest:,} tokens, above this server's limit of {limit:,} "
                                   "(serve --max-prompt-tokens)", 400, "prompt_too_long")
            try:
                ids = self._worker().encode(prompt, limit) if len(prompt) >= WORKER_CHARS and \
                    isinstance(self.vocab, HFTokenizer) else self.vocab.encode(prompt)
            except SamoutError as e:
                raise SessionError(str(e), 400, "unknown_text") from None
            if isinstance(ids, int):  # the child's count of a prompt past the limit
                raise SessionError(f"the prompt is {ids:,} tokens, above this server's limit of {limit:,} "
                                   "(serve --max-prompt-tokens)", 400, "prompt_too_long")
            return ids
        vocab = self.info.config.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise SessionError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", 400, "token_out_of_range")
        return list(prompt)

    def _worker(self) -> TokenizerWorker:
        with self.worker_lock:
            if self.tokenizer_worker is None:
                self.tokenizer_worker = TokenizerWorker(self.vocab.to_json())
            return self.tokenizer_worker

    def check_request(self, req: CompletionRequest, prompt: list[int], ids: list[int], position: int) -> None:
        """``prompt``: what the client sent; ``ids``: that after the session's pending token."""
        if not ids:
            raise SessionError("the prompt is empty (and the session has no pending token)", 400, "empty_prompt")
        if req.max_tokens > self.options.max_tokens:
            raise SessionError(f"max_tokens {req.max_tokens} is above this server's limit {self.options.max_tokens} "
                               "(serve --max-tokens)", 400, "max_tokens_too_large")
        if len(prompt) > self.options.max_prompt_tokens:
            raise SessionError(f"the prompt is {len(prompt):,} tokens, above this server's limit of "
                               f"{self.options.max_prompt_tokens:,} (serve --max-prompt-tokens)", 400,
                               "prompt_too_long")
        try:  # the one rule: cummax takes any context, softmax what its cache and memory hold
            check_context(self.info, position + len(ids) + req.max_tokens - 1, 1, "this request")
        except SamoutError as e:
            raise SessionError(str(e), 400, "context_too_long") from None

    def request_bytes(self, tokens: int, context: int) -> int:
        """Memory one sequence's runner calls allocate beyond the model, at their peak (a
        prefill call): the logits of the call's positions (every position for a ``--logits all``
        export, else the last) and their float32 copy, each position's activations, and a
        softmax KV cache of the whole context twice (the call's input and output)."""
        info = self.info
        call = min(tokens, info.max_seq or tokens)
        rows = call if info.logits == "all" else 1
        need = 2 * rows * info.config.vocab_size * 4 + call * info.config.hidden_size * 4 * ACTIVATION_BUFFERS
        if info.spec.grows:
            need += 2 * graph.state_bytes(info.config, info.spec, 1, context, info.dtype)
        return need

    def admit(self, need: int) -> int:
        """Admit a request's memory before anything is allocated, against what the host and the
        container's cgroup leave, less what running requests were admitted with: an OOM kill
        would lose every request in flight, a refusal only this one."""
        from samout_edge.artifact.resources import human_bytes

        available = resources.available_memory()
        if need + self.memory_held > available:
            raise SessionError(f"this request needs about {human_bytes(need)} of memory (logits, activations and "
                               f"KV caches of every choice), but {human_bytes(available)} is available (the "
                               f"container's memory limit included) and running requests hold "
                               f"{human_bytes(self.memory_held)}: send a shorter prompt or fewer choices, or retry",
                               503, "insufficient_memory")
        self.memory_held += need
        return need

    def special_affixes(self) -> tuple[list[int], list[int]]:
        """The ids a Hugging Face tokenizer's post-processor puts around a text (its BOS, EOS),
        found by encoding one character both ways; no other vocab has special tokens."""
        if not isinstance(self.vocab, HFTokenizer):
            return [], []
        plain = self.vocab.tokenizer.encode("a", add_special_tokens=False).ids
        full = self.vocab.tokenizer.encode("a", add_special_tokens=True).ids
        for i in range(len(full) - len(plain) + 1):
            if full[i : i + len(plain)] == plain:
                return full[:i], full[i + len(plain):]
        return [], []

    @functools.cached_property
    def special_ids(self) -> frozenset[int]:
        """A Hugging Face tokenizer's special tokens (``added_tokens`` marked special), which
        ``skip_special_tokens`` leaves out of the text, as vLLM and transformers do."""
        if not isinstance(self.vocab, HFTokenizer):
            return frozenset()
        added = self.vocab.source.get("added_tokens") or []
        return frozenset(t["id"] for t in added if isinstance(t, dict) and t.get("special") and
                         isinstance(t.get("id"), int))

    def text(self, tokens: list[int], skip_special: bool = False) -> str:
        if skip_special and self.special_ids:
            tokens = [t for t in tokens if t not in self.special_ids]
        return self.vocab.decode_ids(tokens) if self.vocab else ""

    def pieces(self, skip_special: bool = False) -> Callable[[int], str]:
        """A token at a time -> the whole characters it completes (nothing for a skipped special token)."""
        if self.vocab is None:
            return lambda token: ""
        piece, special = self.vocab.stream(), self.special_ids if skip_special else frozenset()
        return lambda token: "" if token in special else piece(token)


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
        chat = scope.get("path") in ("/v1/chat/completions", "/tokenize")  # bodies that may hold chat messages
        if chat and too_many_objects(body, MAX_CHAT_MESSAGES + 16):
            response = _error(400, f"messages: more than this server's limit of {MAX_CHAT_MESSAGES:,}",
                              "invalid_request")
            return await response(scope, receive, send)

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: http.disconnect, when the client goes away

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send) -> None:
        response = _error(413, f"the body is larger than {self.limit} bytes", "body_too_large")
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
                response = _error(401, "missing or wrong API key: send Authorization: Bearer KEY", "invalid_api_key")
                response.headers["WWW-Authenticate"] = "Bearer"
                return await response(scope, receive, send)
            scope["state"]["owner"] = owner
        await self.app(scope, receive, send)


def _error(status: int, message: str, code: str) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "code": code}}, status_code=status)


def _validation_message(exc: RequestValidationError) -> str:
    errors = exc.errors()
    if not errors:
        return "invalid request"
    first = errors[0]
    if first.get("type") == "json_invalid":
        return "the body is not valid JSON"
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    if first.get("type") == "extra_forbidden":
        return f"unsupported parameter: {where} (not a field of this OpenAI request that this server knows)"
    message = str(first.get("msg")).removeprefix("Value error, ")  # our validators' own one-line messages
    return f"{where}: {message}" if where else message


def create_app(server: Server) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        sweeper = asyncio.create_task(_sweep(server))
        try:
            yield
        finally:
            sweeper.cancel()

    app = FastAPI(title="samout-edge", lifespan=lifespan)
    metrics = server.metrics

    @app.middleware("http")
    async def count(request: Request, call_next):
        response = await call_next(request)
        route = request.scope.get("route")
        metrics.inc("samout_requests_total", route=getattr(route, "path", "unmatched"), status=str(response.status_code))
        return response

    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)  # before anything reads the body
    # outermost: every route but /health needs one of the server's keys (when it has any), checked before
    # the body is read; the key a request came with owns the sessions it creates
    app.add_middleware(KeyGate, keys=server.options.api_keys)

    @app.exception_handler(SessionError)
    async def session_error(request: Request, exc: SessionError):
        return _error(exc.status, str(exc), exc.code)

    @app.exception_handler(SamoutError)
    async def samout_error(request: Request, exc: SamoutError):
        return _error(400, str(exc), "invalid_request")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return _error(400, _validation_message(exc), "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), "http_error")

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):  # a bug: still a JSON body, never plain text
        return _error(500, f"internal error: {type(exc).__name__}: {exc}", "internal_error")

    @app.get("/health")
    async def health():
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

    from samout_edge.serve import tokenizer_api  # vLLM's tokenizer routes (it imports this module)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        """vLLM's: a text's or a conversation's ids, as the export's AutoTokenizer gives them."""
        return await tokenizer_api.tokenize(server, await request.body())

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        """vLLM's: the text of ids."""
        return await tokenizer_api.detokenize(server, await request.body())

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        """vLLM's: the tokenizer's config, special tokens and chat template (lm-eval's remote tokenizer)."""
        return await tokenizer_api.tokenizer_info(server)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        """What OpenAI clients list first: the one model this server runs."""
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": 0,
                                            "owned_by": "samout-edge",
                                            "max_model_len": tokenizer_api.max_model_len(server),
                                            "vocab_size": server.info.config.vocab_size}]}

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/sessions")
    async def create_session(request: Request) -> dict[str, Any]:
        server.sessions.unreserve(server.sessions.reserve(0))  # a full softmax budget takes no new sessions
        session = await server.in_store(server.sessions.create, request.state.owner)
        return session.to_dict()

    @app.get("/v1/sessions/{session_id}")
    async def get_session(session_id: str, request: Request) -> dict[str, Any]:
        return server.sessions.get(session_id, request.state.owner).to_dict()

    @app.delete("/v1/sessions/{session_id}")
    async def delete_session(session_id: str, request: Request) -> dict[str, Any]:
        await server.in_store(server.sessions.delete, session_id, request.state.owner)
        return {"id": session_id, "object": "session", "deleted": True}

    async def start(req: CompletionRequest, request: Request, chat: bool = False, digest: str | None = None):
        refused = req.unsupported()
        if refused is not None:
            raise SessionError(f"{refused} is not supported by this server (leave it out, or at its default)", 400,
                               "unsupported_parameter")
        stops = req.stops()
        if stops and server.vocab is None:
            raise SessionError("stop sequences are matched on the text: this server has no vocab (serve --vocab FILE)",
                               400, "no_vocab")
        texts = req.prompts()
        batch = server.batcher.max_batch
        if len(texts) * req.n > batch:
            raise SessionError(f"prompt: at most {batch} sequences (prompts x n) per request, what one batch holds "
                               f"(serve --max-batch), got {len(texts)} x {req.n}", 400, "too_many_choices")
        if req.session is not None and len(texts) * req.n > 1:
            raise SessionError("a session continues one sequence: a list of prompts or n > 1 takes no session", 400,
                               "invalid_request")
        if req.expected_position is not None and req.session is None:
            raise SessionError("expected_position is a session's position: it needs a session", 400,
                               "invalid_request")
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
                return StreamingResponse(iter(_replay_sse(body, chat)), media_type="text/event-stream")
            return JSONResponse(body)
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
                    choices.append(_Choice(index, prompt, echo if req.echo else "", job))
            run = _Run(server, session, choices, req, reserved, chat, digest)
            run.memory = server.admit(need)  # last: nothing after it can fail before the run owns it
        except BaseException:
            server.sessions.unreserve(reserved)
            if session is not None:
                server.sessions.release(session)
            raise
        run.start()
        if req.stream:
            return StreamingResponse(run.sse(), media_type="text/event-stream")
        return await run.whole(request)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        return await start(req, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        return await chat(req, request)

    @app.post("/v1/responses")
    async def responses(req: ResponsesRequest, request: Request):
        """OpenAI's Responses API over the chat completion it is (serve/responses.py)."""
        refused = req.unsupported()
        if refused is not None:
            raise SessionError(f"{refused} is not supported by this server (leave it out, or at its default)", 400,
                               "unsupported_parameter")
        try:
            chat_req = ChatRequest(**req.chat_body())
        except ValidationError as e:
            raise SessionError(_validation_message(RequestValidationError(e.errors())), 400,
                               "invalid_request") from None
        answer = await chat(chat_req, request)
        if isinstance(answer, StreamingResponse):
            return StreamingResponse(stream_from_chat(req, answer.body_iterator, server.model_name),
                                     media_type="text/event-stream")
        if answer.status_code != 200:
            return answer
        return JSONResponse(from_chat(req, json.loads(answer.body), server.model_name))

    async def chat(req: ChatRequest, request: Request):
        refused = req.unsupported()
        if refused is not None:
            raise SessionError(f"{refused} is not supported by this server (leave it out, or at its default)", 400,
                               "unsupported_parameter")
        if server.vocab is None:
            raise SessionError("chat needs text: this server has no vocab (serve --vocab FILE)", 400, "no_vocab")
        req.check_text()
        try:  # off the event loop: an operator's template renders in its own process, within a time bound
            prompt = await asyncio.to_thread(server.chat_template.render, [m.for_template() for m in req.messages])
        except TemplateFailure as e:
            raise SessionError(f"the chat template failed on these messages: {e}", 400, "chat_template") from None
        return await start(req.completion(prompt), request, chat=True, digest=req.digest())

    return app


@dataclass
class _Choice:
    """One sequence of a request: its prompt (as the client sent it) and its job."""

    index: int
    prompt: list[int]
    prompt_text: str
    job: Job
    result: JobResult | None = None


class _Run:
    """One request in flight (one choice per prompt and per ``n``): bridges the batcher
    thread's events into asyncio. Its choices' jobs go in together, so they decode in
    one batch; a session takes exactly one choice."""

    def __init__(self, server: Server, session, choices: list[_Choice], req: CompletionRequest, reserved: int = 0,
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
        """(choice, kind, value) until every choice is done, or the first error (its value a
        SessionError: status and code); the others are then cancelled."""
        waiting = len(self.choices)
        try:
            while waiting:
                index, kind, value = await self.events.get()
                if kind == "token" and self.first_token_s is None:
                    self.first_token_s = time.perf_counter() - self.t0
                    self.server.metrics.observe("samout_time_to_first_token_seconds", self.first_token_s)
                if kind == "error":
                    value = SessionError(value, 500, "runner_error")
                if kind == "done":
                    self.choices[index].result = value
                    waiting -= 1
                    self.completing = asyncio.ensure_future(self._complete(value))
                    try:
                        await asyncio.shield(self.completing)  # once done, the commit runs to its end
                    except SessionError as e:  # the store could not record it: the session did not move
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

    def completion_logprobs(self, c: _Choice) -> dict[str, Any]:
        """The prompt's steps (with echo) then the generated tokens', with their text offsets."""
        generated = self.logprob_entry(c.job, 0, offsets=self.offsets(c.result.new,
                                                                          len(c.prompt_text) if self.echo else 0))
        if c.job.echo_from is None:
            return generated
        prompt = self.logprob_entry(c.job, 0, steps=c.job.prompt_trace, offsets=self.offsets(c.prompt))
        return {key: prompt[key] + generated[key] for key in generated}

    def choice_body(self, c: _Choice) -> dict[str, Any]:
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
                    return _error(value.status, str(value), value.code)
            return JSONResponse(self.body())

        answer, gone = asyncio.ensure_future(result()), asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
            if answer.done():
                return answer.result()
            answer.cancel()  # closes the event stream: the jobs are cancelled, the session released unchanged
            with contextlib.suppress(asyncio.CancelledError):
                await answer
            return _error(499, "the client closed the request", "client_closed_request")
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
                yield "data: " + json.dumps({"error": {"message": str(value), "type": "server_error",
                                                       "code": value.code}}) + "\n\n"
        yield "data: [DONE]\n\n"


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


def _replay_sse(body: dict[str, Any], chat: bool) -> list[str]:
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


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone away (the body was read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _sweep(server: Server) -> None:
    interval = min(60.0, max(1.0, server.options.policy.ttl_s / 4))
    while True:
        await asyncio.sleep(interval)
        await server.in_store(server.sessions.sweep)


def model_identity(target: Target) -> str:
    """The weights a session's state belongs to (a store written for others is refused)."""
    from samout_edge.artifact.engine import read_engine_meta
    from samout_edge.artifact.files import sha256_file
    from samout_edge.artifact.manifest import MODEL_FILE, read_manifest

    if target.kind == "engine":
        return f"onnx:{read_engine_meta(target.engine_dir).onnx_sha256}"
    if target.kind == "export":
        return f"onnx:{read_manifest(target.export_dir).files.get(MODEL_FILE, {}).get('sha256')}"
    weights = target.path if target.path.is_file() else target.path / "model.safetensors"
    return f"checkpoint:{sha256_file(weights) if weights.is_file() else target.path.name}"
