"""``Server``: what every route shares, and the checks a request passes before it runs.

It holds the runner's description (its worker thread is the batcher's), the vocab, the chat
template, the sessions and their store, the metrics, and the memory running requests were
admitted with. A request's prompt becomes ids here (``prompt_ids``: the vocab in memory, a
long text in a tokenizer child process, every limit checked before the work), its context
and lengths are checked (``check_request``: the one rule, ``check_context``), its memory
admitted (``admit``), and its tokens become text again (``text``, ``pieces``). Every refusal
is an ``ApiError`` (serve/errors.py).
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from samout_edge.artifact import graph, resources
from samout_edge.artifact.vocab import HFTokenizer, check_text
from samout_edge.errors import SamoutError
from samout_edge.generate import Vocab
from samout_edge.runtime.base import Runner, check_context
from samout_edge.runtime.target import Target
from samout_edge.serve.batcher import Batcher
from samout_edge.serve.errors import ApiError
from samout_edge.serve.metrics import BATCH_BUCKETS, Metrics
from samout_edge.serve.options import ServeOptions
from samout_edge.serve.protocol import CompletionRequest
from samout_edge.serve.sessions import SessionStore, SessionTable
from samout_edge.serve.template import ChatTemplate, TemplateFailure
from samout_edge.serve.tokenize import WORKER_CHARS, TokenizerWorker, check_chars

# fp32 buffers of the hidden size a graph call holds per position at once (residual stream, mix, the FFN's
# input and its wider middle): an estimate with headroom, for admission
ACTIVATION_BUFFERS = 8


def prompt_too_long(tokens: int, limit: int, at_least: str = "") -> ApiError:
    return ApiError(f"the prompt is {at_least}{tokens:,} tokens, above this server's limit of {limit:,} "
                    "(serve --max-prompt-tokens)", 400, "prompt_too_long")


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

    async def render(self, fn: Callable[..., str], *args: Any) -> str:
        """A chat template's render, off the event loop (an operator's template renders in its own
        process, within a time bound); its failure is the request's 400."""
        try:
            return await asyncio.to_thread(fn, *args)
        except TemplateFailure as e:
            raise ApiError(f"the chat template failed on these messages: {e}", 400, "chat_template") from None

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
                raise ApiError("this server has no vocab (serve --vocab FILE): send the prompt as token ids",
                               400, "no_vocab")
            try:
                check_text(prompt)  # a lone surrogate has no bytes: refused, never guessed
            except SamoutError as e:
                raise ApiError(str(e), 400, "invalid_text") from None
            limit = self.options.max_prompt_tokens
            check_chars(prompt, self.options.max_prompt_chars)  # before any tokenizer's work
            fewest = self.vocab.fewest_tokens(prompt)  # checked before encoding: a huge text is refused at once
            if fewest > limit:
                raise prompt_too_long(fewest, limit, "at least ")
            try:
                ids = self._worker().encode(prompt, limit) if len(prompt) >= WORKER_CHARS and \
                    isinstance(self.vocab, HFTokenizer) else self.vocab.encode(prompt)
            except SamoutError as e:
                raise ApiError(str(e), 400, "unknown_text") from None
            if isinstance(ids, int):  # the child's count of a prompt past the limit
                raise prompt_too_long(ids, limit)
            return ids
        vocab = self.info.config.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ApiError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", 400, "token_out_of_range")
        return list(prompt)

    def _worker(self) -> TokenizerWorker:
        with self.worker_lock:
            if self.tokenizer_worker is None:
                self.tokenizer_worker = TokenizerWorker(self.vocab.to_json())
            return self.tokenizer_worker

    def check_request(self, req: CompletionRequest, prompt: list[int], ids: list[int], position: int) -> None:
        """``prompt``: what the client sent; ``ids``: that after the session's pending token."""
        if not ids:
            raise ApiError("the prompt is empty (and the session has no pending token)", 400, "empty_prompt")
        if req.max_tokens > self.options.max_tokens:
            raise ApiError(f"max_tokens {req.max_tokens} is above this server's limit {self.options.max_tokens} "
                           "(serve --max-tokens)", 400, "max_tokens_too_large")
        if len(prompt) > self.options.max_prompt_tokens:
            raise prompt_too_long(len(prompt), self.options.max_prompt_tokens)
        try:  # the one rule: cummax takes any context, softmax what its cache and memory hold
            check_context(self.info, position + len(ids) + req.max_tokens - 1, 1, "this request")
        except SamoutError as e:
            raise ApiError(str(e), 400, "context_too_long") from None

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
            raise ApiError(f"this request needs about {human_bytes(need)} of memory (logits, activations and "
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
