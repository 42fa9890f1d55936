"""Continuous batching: one worker thread owns the runner and runs every request's steps.

Each loop iteration first prefills the requests that arrived (those with the
same prompt length and state shape in one call), then runs one decode step for
every active request: their states stacked along the batch axis, one runner
call per group of at most ``max_batch``. States that do not grow (a running max,
a softmax window) all have one shape, so all such requests decode together; KV
caches batch only when their lengths are equal (the graph has no attention mask
to pad with), otherwise they run in separate calls.

The runner is created in the worker thread and used only there (a TensorRT
execution context and its CUDA context belong to one thread).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from samout_edge.errors import SamoutError
from samout_edge.generate import Sampler
from samout_edge.runtime.base import Runner

Event = tuple[str, Any]  # ("token", id) | ("done", JobResult) | ("error", message)


@dataclass
class JobResult:
    state: dict[str, np.ndarray]  # after consuming ``consumed`` tokens: ids + new[:-1], or ids[:-1] with no new
    consumed: int
    new: list[int]
    prefill_s: float
    seconds: float
    stopped: bool = False  # a stop sequence ended it (else max_tokens did)
    pending: list[int] = field(default_factory=list)  # the tokens after ``consumed``: not yet in the state


class StopMatcher:
    """Whether the text generated so far contains one of ``stops``, fed a token at a time:
    each token's text is checked with the end of the text before it, so a stop sequence
    split across tokens is found, in time linear in the text."""

    def __init__(self, stops: list[str], decode: Callable[[int], str]):
        self.stops, self.decode = stops, decode
        self.longest = max(len(s) for s in stops)
        self.text = ""

    def __call__(self, token: int) -> bool:
        start = max(0, len(self.text) - self.longest + 1)
        self.text += self.decode(token)
        window = self.text[start:]
        return any(s in window for s in self.stops)


LogprobStep = tuple[int, float | None, list[tuple[int, float]] | None]


def logprob_step(logits: np.ndarray, token: int, top: int) -> LogprobStep:
    """(token, its log-probability, the ``top`` most likely (id, log-probability)) under the model's
    distribution, before sampling's temperature, cuts and penalties (as OpenAI reports them)."""
    return logprob_rows(logits[None], [token], top)[0]


SCORE_ROWS = 256  # positions log-softmaxed at once: a float64 copy of 256 x vocab, whatever the prompt's length


def logprob_rows(logits: np.ndarray, tokens: list[int], top: int) -> list[LogprobStep]:
    """``logprob_step`` for each row of ``logits`` ([rows, vocab]) and its token: a prompt's positions
    log-softmaxed SCORE_ROWS at a time, and the top ones a partial sort (ties by lower id)."""
    steps = []
    for start in range(0, len(tokens), SCORE_ROWS):
        z = logits[start : start + SCORE_ROWS].astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        for row, token in zip(logp, tokens[start : start + SCORE_ROWS]):
            best: list[int] = []
            if top:
                part = np.argpartition(-row, top - 1)[:top] if top < row.size else np.arange(row.size)
                best = sorted(part.tolist(), key=lambda t: (-row[t], t))
            steps.append((token, float(row[token]), [(int(t), float(row[t])) for t in best]))
    return steps


def cut_at_stop(text: str, stops: list[str], after: int = 0) -> tuple[str, bool]:
    """``text`` up to the first stop sequence in it that ends past character ``after`` (OpenAI
    leaves the sequence out), and whether one was."""
    found = [i for i in (text.find(s, max(0, after - len(s) + 1)) for s in stops) if i >= 0]
    return (text[: min(found)], True) if found else (text, False)


@dataclass
class Job:
    ids: list[int]  # to consume first: the session's pending token(s), then the prompt
    state: dict[str, np.ndarray]  # batch 1, host
    max_tokens: int
    sampler: Sampler
    emit: Callable[[Event], None]  # called from the worker thread; must not block
    cancelled: threading.Event = field(default_factory=threading.Event)
    stop: Callable[[int], bool] | None = None  # True once the text generated so far holds a stop sequence
    logprobs: int | None = None  # record each token's log-probability and this many top ones
    logprob_trace: list[LogprobStep] = field(default_factory=list)
    # echo with logprobs: score ids[echo_from:] (what this request sent, after a session's pending tokens);
    # prompt_trace gets one step per scored token, the first None when no logits precede it
    echo_from: int | None = None
    prompt_trace: list[LogprobStep] = field(default_factory=list)
    min_tokens: int = 0  # stop sequences end nothing before this many tokens (vLLM's min_tokens)
    new: list[int] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    prefill_s: float = 0.0
    fed: int = 0  # ids in the state so far

    def signature(self) -> tuple:
        return tuple((name, a.shape) for name, a in self.state.items())

    @property
    def feed_end(self) -> int:
        """How many ids go into the state: all of them, or with max_tokens 0 all but the last (its
        log-probability needs only the logits before it; it stays pending, as a generated token does)."""
        return len(self.ids) if self.max_tokens > 0 else len(self.ids) - 1

    def next_ids(self, one_at_a_time: bool) -> list[int]:
        """The ids of this job's next call: the rest of its prompt (one token of it, when its prompt is
        scored on a graph that returns only the last position's logits), else its last token."""
        if self.fed < self.feed_end:
            return self.ids[self.fed : self.fed + 1] if one_at_a_time else self.ids[self.fed : self.feed_end]
        return self.new[-1:]


def stack(states: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {name: np.concatenate([s[name] for s in states], axis=0) for name in states[0]}


def chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


class Batcher:
    def __init__(self, load_runner: Callable[[], Runner], max_batch: int,
                 on_step: Callable[[str, int, float], None] | None = None):
        self.load_runner, self.max_batch, self.on_step = load_runner, max_batch, on_step
        self.inbox: queue.Queue[Job] = queue.Queue()
        self.stopping = threading.Event()
        self.ready = threading.Event()
        self.runner: Runner | None = None
        self.startup_error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, name="samout-batcher", daemon=True)

    def start(self, timeout: float | None = None) -> Runner:
        """Start the worker and wait until its runner is loaded (its load error is raised here)."""
        self.thread.start()
        self.ready.wait(timeout)
        if self.startup_error is not None:
            raise self.startup_error
        if self.runner is None:
            raise SamoutError(f"the runner did not load within {timeout} s")
        return self.runner

    def submit(self, job: Job) -> None:
        self.inbox.put(job)

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=10)

    # -- the worker

    def _main(self) -> None:
        try:
            self.runner = self.load_runner()
            limit = self.runner.info.max_batch
            self.max_batch = min(self.max_batch, limit) if limit else self.max_batch
        except BaseException as e:  # reported by start()
            self.startup_error = e
            self.ready.set()
            return
        self.ready.set()
        active: list[Job] = []
        try:
            while not self.stopping.is_set():
                incoming = self._take(block=not active)
                try:
                    if incoming:
                        active += self._prefill(incoming)
                    active = [j for j in active if not j.cancelled.is_set()]
                    if active:
                        active = self._decode(active)
                except Exception as e:  # a bug here must end these requests, not hang them or the server
                    for job in {id(j): j for j in active + incoming}.values():
                        job.emit(("error", f"internal error: {type(e).__name__}: {e}"))
                    active = []
        finally:
            self.runner.close()

    def _take(self, block: bool) -> list[Job]:
        jobs = []
        try:
            if block:
                jobs.append(self.inbox.get(timeout=0.05))
            while True:
                jobs.append(self.inbox.get_nowait())
        except queue.Empty:
            pass
        return [j for j in jobs if not j.cancelled.is_set()]

    def _one_at_a_time(self, job: Job) -> bool:
        """A scored prompt on a graph with only the last position's logits is fed a token per call
        (exact: chunked == whole), each call's logits scoring the next token; these calls batch
        with the decode steps."""
        return job.echo_from is not None and self.runner.info.logits != "all"

    def _prefill(self, jobs: list[Job]) -> list[Job]:
        groups: dict[tuple, list[Job]] = {}
        still = []
        for job in jobs:
            if job.echo_from == 0:  # the first token has no logits before it: OpenAI's null
                job.prompt_trace.append((job.ids[0], None, None))
            if job.feed_end == 0:  # max_tokens 0 and one token: nothing to run, it is all pending
                self._finish(job)
                continue
            feed = job.next_ids(self._one_at_a_time(job))
            groups.setdefault((len(feed), job.signature()), []).append(job)
        for group in groups.values():
            for part in chunks(group, self.max_batch):
                ids = np.asarray([j.next_ids(self._one_at_a_time(j)) for j in part], dtype=np.int64)
                still += self._step("prefill", part, ids)
        return still

    def _decode(self, jobs: list[Job]) -> list[Job]:
        groups: dict[tuple, list[Job]] = {}
        for job in jobs:
            groups.setdefault(job.signature(), []).append(job)
        still = []
        for group in groups.values():
            for part in chunks(group, self.max_batch):
                ids = np.asarray([j.next_ids(True) for j in part], dtype=np.int64)
                still += self._step("decode", part, ids)
        return still

    def _step(self, kind: str, jobs: list[Job], ids: np.ndarray) -> list[Job]:
        """One runner call for ``jobs``; returns those that go on."""
        runner = self.runner
        t0 = time.perf_counter()
        try:
            logits, state = runner.run(ids, stack([j.state for j in jobs]))
            logits = runner.to_numpy(logits)
            host = runner.host_state(state)
        except Exception as e:  # the runner's failure ends these requests, not the server
            for job in jobs:
                job.emit(("error", f"the runner failed: {e}"))
            return []
        seconds = time.perf_counter() - t0
        if self.on_step:
            self.on_step(kind, len(jobs), seconds)
        still = []
        for i, job in enumerate(jobs):
            if kind == "prefill":
                job.prefill_s = time.perf_counter() - job.started
            rows = logits[i]  # [positions, vocab]: every position of the call, or its last
            if not np.isfinite(rows if job.echo_from is not None else rows[-1]).all():  # the rows it reads
                job.emit(("error", "the model produced non-finite logits"))
                continue
            job.state = {name: a[i : i + 1] for name, a in host.items()}
            was_feeding, start = job.fed < job.feed_end, job.fed
            if was_feeding:
                job.fed = start + ids.shape[1]
                if job.echo_from is not None:
                    self._score(job, rows, start)
                if job.fed < job.feed_end:  # more of the prompt to feed
                    still.append(job)
                    continue
                if job.max_tokens == 0:
                    self._finish(job)
                    continue
            last = rows[-1].astype(np.float32)
            token = job.sampler(last)
            if job.logprobs is not None:  # recorded before the token is announced: the reader finds it there
                job.logprob_trace.append(logprob_step(last, token, job.logprobs))
            job.new.append(token)
            job.emit(("token", token))
            stopped = job.stop is not None and job.stop(token) and len(job.new) >= job.min_tokens
            if stopped or len(job.new) >= job.max_tokens:
                self._finish(job, stopped)
            else:
                still.append(job)
        return still

    @staticmethod
    def _score(job: Job, rows: np.ndarray, start: int) -> None:
        """The prompt tokens these logits predict: row r is position ``start + r`` of the call's
        ids when the graph returns every position, else the call's last position."""
        end = job.fed
        first = end - rows.shape[0]  # the position of row 0
        targets = [p + 1 for p in range(first, end) if job.echo_from <= p + 1 < len(job.ids)]
        if targets:
            picked = rows[[t - 1 - first for t in targets]]
            job.prompt_trace += logprob_rows(picked, [job.ids[t] for t in targets], job.logprobs or 0)
        if end >= job.feed_end:
            job.emit(("prompt", None))  # every scored token has its step: a stream can send the echo now

    @staticmethod
    def _finish(job: Job, stopped: bool = False) -> None:
        if job.new:
            consumed, pending = len(job.ids) + len(job.new) - 1, job.new[-1:]
        else:  # max_tokens 0: every id but the last is in the state
            consumed, pending = len(job.ids) - 1, job.ids[-1:]
        if job.echo_from is not None and job.feed_end == 0:
            job.emit(("prompt", None))
        job.emit(("done", JobResult(job.state, consumed, list(job.new), job.prefill_s,
                                    time.perf_counter() - job.started, stopped, pending)))
