"""One interface over every backend, as Polygraphy does it: loaders build runners,
runners only run.

``run(input_ids, state) -> (logits, new_state)``: state is a dict keyed by the
graph's input names (past_max.{i} or past_key_values.{i}.key/.value), so the
state one call returns feeds the next call unchanged. Arrays stay in the
backend's own type (numpy for ONNX Runtime, torch tensors for torch, device
arrays for TensorRT) so a decode loop never copies through the host;
``to_numpy`` is for comparing. Every runner is a context manager: leaving the
``with`` block frees its session, context, stream and buffers.

Any length is one ``run``: a call longer than the graph takes (a cummax export's
max_seq, an engine's longest prefill profile) or than the runner's micro-batch
(``ubatch``, artifact/graph.py PREFILL_UBATCH, 256 tokens by default) is fed in chunks with the
state carried, which is exact (SamOut has no positions; a running max over chunks
is the running max over the whole; the linear scan and a softmax cache carry
theirs alike). The micro-batch bounds a prefill's working memory whatever
max_seq is: a call's activations scale with its tokens. How long a context a target holds at all is
``check_context``'s one rule: a cummax state never grows; a softmax KV cache is
bounded by an engine's profiles and by memory.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np

from samout_edge.artifact import graph
from samout_edge.artifact.arch import ArchSpec
from samout_edge.artifact.config import ModelConfig
from samout_edge.errors import SamoutError

State = dict[str, Any]


def check_feed(info: RunnerInfo, input_ids: Any, state: State) -> None:
    shape = getattr(input_ids, "shape", None)
    if shape is None:
        shape = np.shape(input_ids)
    if len(shape) != 2 or not shape[0] or not shape[1]:
        raise SamoutError(f"input_ids must be [batch, seq] with at least one token, got shape {tuple(shape)}")
    states = info.spec.states(info.config.num_layers)
    names = [t.past for t in states]
    if set(state) != set(names):
        missing = sorted(set(names) - set(state)) or sorted(set(state) - set(names))
        raise SamoutError(f"the state does not match the graph's inputs ({', '.join(missing[:3])}); "
                          "start from initial_state()")
    for t in states:  # a KV cache's NaN propagates through every runtime's attention; a running max's may not
        value = state[t.past]
        if t.running_max and isinstance(value, np.ndarray) and not np.isfinite(value).all():
            raise SamoutError(f"the state is not finite ({t.past} holds NaN or inf): it was poisoned by a call longer "
                              "than the export's max_seq, or corrupted; start again from initial_state()")


@dataclass(frozen=True)
class RunnerInfo:
    backend: str  # the registered name (runtime/registry.py)
    device: str  # what it runs on, as the backend labels it: the ORT provider, cuda, the engine's profile
    spec: ArchSpec  # the arch, decoded (its name: ``arch``)
    dtype: str  # fp32 | fp16
    logits: str  # last | all
    max_seq: int | None  # the most tokens one graph call takes; run() feeds longer inputs in chunks (None: any)
    config: ModelConfig
    max_batch: int | None = None  # None: no limit (a TensorRT engine has one per profile)
    max_context: int | None = None  # the most tokens a state may hold (a softmax engine's profiles); None: any
    rtol: float | None = None  # a runner computing coarser than the graph's dtype (OpenVINO bf16): verify's tolerance
    kernel_family: str = "x86"  # int8 activations: whose MatMulNBits rounding it computes (ACTIVATION_FAMILIES)
    computes_fp16: bool = False  # an fp16 graph computed in fp16, not upcast (verify needs no onnx.reference pass)
    memory: str | None = "host"  # where a peak is read: host (RSS), cuda (torch's allocator), None (no readable peak)

    @property
    def arch(self) -> str:
        """The arch's name, as export.json and users spell it."""
        return self.spec.name


# An unfused attention call holds about this many score-sized fp32 buffers at once (scores,
# scaled, masked, softmax, the product's input): ONNX Runtime 1.32 CPU, the trained set's
# softmax export, 1024 queries over 24k keys: 3.4 GB above the model for 0.8 GB of scores.
SCORE_BUFFERS = 5
MIN_CALL = 64  # a softmax prompt is fed in calls of at least this many tokens
CALL_SCORES_MAX = 2 << 30  # ... and of at most as many as keep one call's score buffers within this


def check_context(info: RunnerInfo, tokens: int, batch: int = 1, what: str = "this request") -> None:
    """The one rule for how much context a target takes, asked by every command.

    cummax: any length (its state does not grow; run() chunks). softmax: what an
    engine's profiles hold, and what memory holds: the KV cache (and its copy as
    the next call's input), plus the attention scores of at least one short call.
    """
    if info.max_context is not None and tokens > info.max_context:
        raise SamoutError(f"{what} needs a context of {tokens:,} tokens; this {info.backend} target holds at most "
                          f"{info.max_context:,} (its optimization profiles): rebuild it with a longer profile")
    if info.spec.grows:
        from samout_edge.artifact.resources import check_memory, human_bytes

        cache = graph.state_bytes(info.config, info.spec, batch, tokens, info.dtype)
        shortest = min(tokens, MIN_CALL)
        check_memory(2 * cache + _scores_bytes(info, batch, shortest, tokens),
                     f"{what} ({tokens:,} tokens of context: a {human_bytes(cache)} KV cache and the attention "
                     f"scores of a call of {shortest} tokens)")




def _least(*limits: int | None) -> int | None:
    given = [n for n in limits if n]
    return min(given) if given else None


def call_tokens(info: RunnerInfo, batch: int, context: int, ubatch: int | None = None) -> int | None:
    """The most tokens one call takes when the state will hold ``context`` tokens: the
    graph's limit, the micro-batch ``ubatch`` (None or 0: none), and for a softmax cache
    what its attention scores leave memory for (so a long prompt is fed in shorter
    calls rather than not at all)."""
    if not info.spec.grows:
        return _least(info.max_seq, ubatch)
    from samout_edge.artifact.resources import available_memory

    free = available_memory() - 2 * graph.state_bytes(info.config, info.spec, batch, context, info.dtype)
    room = min(free // 4, CALL_SCORES_MAX)  # a runtime's allocator keeps more than one call's peak
    fit = max(MIN_CALL, room // max(1, _scores_bytes(info, batch, 1, context)))
    return _least(info.max_seq, fit, ubatch)


def past_length(info: RunnerInfo, state: State) -> int:
    """Tokens a growing state holds (0 for one that does not grow)."""
    return info.spec.past_length(info.config.num_layers, state)


def _scores_bytes(info: RunnerInfo, batch: int, queries: int, keys: int) -> int:
    return SCORE_BUFFERS * batch * info.config.num_heads * queries * keys * 4


class Runner(ABC):
    info: RunnerInfo
    ubatch: int | None = graph.PREFILL_UBATCH  # the most tokens one call takes (None: what the graph takes); verify sets None

    @abstractmethod
    def initial_state(self, batch: int) -> State:
        """The state before any token."""

    def run(self, input_ids: np.ndarray, state: State) -> tuple[Any, State]:
        """Logits for ``input_ids`` ([batch, seq] int64) after ``state``, and the new state.

        The feed is checked here, once for every backend (Polygraphy's infer ->
        infer_impl): ids [batch, seq], the state's names, and a running-max state
        given on the host must be finite. A NaN there is a poisoned state (a call
        past max_seq) or a corrupted one, and a runtime whose Max(NaN, x) is x would
        quietly forget it."""
        check_feed(self.info, input_ids, state)
        batch, seq = np.shape(input_ids)
        past = past_length(self.info, state)
        limit = call_tokens(self.info, batch, past + seq, self.ubatch)
        if limit is None or seq <= limit:
            return self.run_impl(input_ids, state)
        ids = np.asarray(input_ids)
        pieces = []
        for start in range(0, seq, limit):  # chunks of at most max_seq and ubatch, the state carried: exact
            logits, state = self.run_impl(ids[:, start : start + limit], state)
            if self.info.logits == "all":
                pieces.append(self.to_numpy(logits))
        return (np.concatenate(pieces, axis=1) if pieces else logits), state

    @abstractmethod
    def run_impl(self, input_ids: np.ndarray, state: State) -> tuple[Any, State]:
        """The backend's call, on a checked feed."""

    def to_numpy(self, value: Any) -> np.ndarray:
        return np.asarray(value)

    def host_state(self, state: State) -> dict[str, np.ndarray]:
        """The state as numpy arrays in the graph's own dtypes: to store it, or to
        stack several sessions' states into one batch."""
        return {name: np.asarray(self.to_numpy(value)) for name, value in state.items()}

    def synchronize(self) -> None:  # noqa: B027 - deliberately optional
        """Wait for queued device work (timing needs it); a no-op on the CPU."""

    def close(self) -> None:  # noqa: B027 - deliberately optional
        """Free what the runner holds; it cannot run afterwards."""

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def name(self) -> str:
        return f"{self.info.backend}:{self.info.device}"
