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
    state: dict[str, np.ndarray]  # after consuming ids + new[:-1]
    consumed: int
    new: list[int]
    prefill_s: float
    seconds: float
    stopped: bool = False  # a stop sequence ended it (else max_tokens did)


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


def logprob_step(logits: np.ndarray, token: int, top: int) -> tuple[int, float, list[tuple[int, float]]]:
    """(token, its log-probability, the ``top`` most likely (id, log-probability)) under the model's
    distribution, before sampling's temperature, cuts and penalties (as OpenAI reports them)."""
    z = logits.astype(np.float64)
    z = z - z.max()
    logp = z - np.log(np.exp(z).sum())
    best = np.argsort(-logp, kind="stable")[:top]
    return token, float(logp[token]), [(int(t), float(logp[t])) for t in best]


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """``text`` up to the first stop sequence in it (OpenAI leaves the sequence out), and whether one was."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
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
    logprob_trace: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)
    new: list[int] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    prefill_s: float = 0.0

    def signature(self) -> tuple:
        return tuple((name, a.shape) for name, a in self.state.items())


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

    def _prefill(self, jobs: list[Job]) -> list[Job]:
        groups: dict[tuple, list[Job]] = {}
        for job in jobs:
            groups.setdefault((len(job.ids), job.signature()), []).append(job)
        still = []
        for group in groups.values():
            for part in chunks(group, self.max_batch):
                ids = np.asarray([j.ids for j in part], dtype=np.int64)
                still += self._step("prefill", part, ids)
        return still

    def _decode(self, jobs: list[Job]) -> list[Job]:
        groups: dict[tuple, list[Job]] = {}
        for job in jobs:
            groups.setdefault(job.signature(), []).append(job)
        still = []
        for group in groups.values():
            for part in chunks(group, self.max_batch):
                ids = np.asarray([[j.new[-1]] for j in part], dtype=np.int64)
                still += self._step("decode", part, ids)
        return still

    def _step(self, kind: str, jobs: list[Job], ids: np.ndarray) -> list[Job]:
        """One runner call for ``jobs``; returns those that go on decoding."""
        runner = self.runner
        t0 = time.perf_counter()
        try:
            logits, state = runner.run(ids, stack([j.state for j in jobs]))
            last = runner.to_numpy(logits)[:, -1].astype(np.float32)
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
            if not np.isfinite(last[i]).all():
                job.emit(("error", "the model produced non-finite logits"))
                continue
            job.state = {name: a[i : i + 1] for name, a in host.items()}
            token = job.sampler(last[i])
            if job.logprobs is not None:  # recorded before the token is announced: the reader finds it there
                job.logprob_trace.append(logprob_step(last[i], token, job.logprobs))
            job.new.append(token)
            job.emit(("token", token))
            stopped = job.stop is not None and job.stop(token)
            if stopped or len(job.new) >= job.max_tokens:
                consumed = len(job.ids) + len(job.new) - 1
                job.emit(("done", JobResult(job.state, consumed, list(job.new), job.prefill_s,
                                            time.perf_counter() - job.started, stopped)))
            else:
                still.append(job)
        return still
