"""`samout-edge eval`: quality measured on the artifact a user deploys.

Bits per byte and perplexity over a text file, two ways:

- windows (the default), llama-perplexity style: windows of ``window`` tokens
  every ``stride`` tokens (default window-1: each token computed once), each
  token scored once with the context its window gives it. No state is carried
  between windows, so both archs see the same contexts; windows batch together
  (8 per call) and run concurrently (ONNX Runtime on the CPU: two
  single-threaded calls at once); the result depends on neither. A window may
  be longer than an export's max_seq: the runner feeds it in chunks.
- ``stream``: the whole file as one context, read and scored a piece at a time
  with the state carried, so memory stays flat whatever the file's size and
  the last token is scored with everything before it. This is where a model
  shows whether it uses long context; a softmax target is refused in one line
  once its KV cache would not fit.

Either way the scores are also reported by position in the context (tokens
1-255, 256-1k, 1k-4k, 4k-16k, 16k+): the same model with more context should
predict better, or it does not use it. Against the PyTorch fp32 model (where
torch and the source checkpoint are present) the first windows (or the first
tokens of the stream) give top-1 agreement and the largest logit error: what
fp16 or quantized weights cost, next to what they save.

Tokens are the text's UTF-8 bytes (a model with a vocabulary of at least 256),
or a vocab file's greedy encoding (``--vocab``).
"""

from __future__ import annotations

import importlib.util
import math
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from samout_edge.artifact import graph
from samout_edge.artifact.graph import PREFILL_UBATCH
from samout_edge.artifact.manifest import read_manifest
from samout_edge.artifact.vocab import Vocab, export_vocab, iter_tokens, read_tokens  # noqa: F401 - eval's API
from samout_edge.errors import SamoutError, require_torch
from samout_edge.progress import Progress, no_progress
from samout_edge.runtime.base import Runner, check_context
from samout_edge.runtime.registry import Settings

DEFAULT_WINDOW = 512
# The PyTorch fp32 comparison runs on the first windows only: it costs more than
# the target itself on a CPU, and agreement settles within a few thousand tokens.
REFERENCE_WINDOWS = 64
REFERENCE_STREAM_TOKENS = 16384
# Positions in the context a scored token sits at, for the by-position report.
POSITION_EDGES = (1, 256, 1024, 4096, 16384)
STREAM_CHUNK = 1024  # tokens per call in a stream where the runner has no limit of its own (torch)
STREAM_PIECE_BYTES = 64 << 10  # a stream reads its text this much at a time: memory flat whatever the file's size
LOGITS_BUDGET = 256 << 20  # windows per call are capped so one call's logits stay within this


@dataclass
class PositionBucket:
    start: int  # the first position in the context (0-based index of the predicted token)
    end: int | None  # one past the last; None: to the end
    tokens: int = 0
    bytes: int = 0
    nll: float = 0.0  # nats, summed in float64

    @property
    def bits_per_byte(self) -> float | None:
        return self.nll / math.log(2) / self.bytes if self.bytes else None

    def to_dict(self) -> dict:
        return {"from": self.start, "to": self.end, "tokens": self.tokens, "bytes": self.bytes,
                "bits_per_byte": self.bits_per_byte}


def position_buckets() -> list[PositionBucket]:
    edges = list(POSITION_EDGES)
    return [PositionBucket(a, b) for a, b in zip(edges, edges[1:] + [None])]


@dataclass
class EvalResult:
    target: str
    arch: str
    runner: str
    dtype: str
    weights: str  # fp | int8 | int4
    weights_bytes: int | None
    mode: str  # windows | stream
    window: int  # tokens per window; stream: the longest context scored (the file)
    stride: int
    tokens: int  # tokens scored
    bytes: int  # bytes those tokens cover
    bits_per_byte: float
    perplexity: float  # per token
    top1_agreement: float | None  # vs PyTorch fp32, same windows
    kl_from_fp32: float | None  # mean KL(PyTorch fp32 || target) per token, nats, same tokens: fidelity, not quality
    fp32_bits_per_byte: float | None  # PyTorch fp32 on the compared tokens
    cost_bits_per_byte: float | None  # the target minus PyTorch fp32, on the compared tokens: what the precision costs
    max_logit_error: float | None
    compared_tokens: int  # tokens the PyTorch comparison covered (the first windows)
    window_ms: float  # median wall time per window (stream: per 1000 tokens)
    state_bytes: int  # decode state after `window` tokens
    seconds: float
    by_position: list[dict] = field(default_factory=list)  # PositionBucket.to_dict, in order

    def to_dict(self) -> dict:
        return asdict(self)


def windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first scored position) for each window; every position 1..n-1 is scored once."""
    out, scored, start = [], 1, 0
    while True:
        end = min(start + window, n)
        out.append((start, end, max(scored, start + 1)))
        scored = end
        if end == n:
            return out
        start = min(start + stride, end - 1)  # a token needs one before it in its window to be scored


def batches(spans: list[tuple[int, int, int]], batch: int) -> list[list[tuple[int, int, int]]]:
    """Consecutive windows, at most ``batch`` per runner call, of one length each (only the last can be shorter)."""
    out: list[list[tuple[int, int, int]]] = []
    for span in spans:
        if out and len(out[-1]) < batch and out[-1][0][1] - out[-1][0][0] == span[1] - span[0]:
            out[-1].append(span)
        else:
            out.append([span])
    return out


def token_nll(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """-log p(ids[:, t+1] | logits[:, t]) for t < seq-1, as [batch, seq-1] float32.

    A float32 logsumexp (shifted by the row max, so it cannot overflow) is as exact
    as the logits themselves; float64 over the full vocabulary cost a copy and twice the bandwidth.
    """
    return _nll(logits[:, :-1], ids[:, 1:])


def _nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log p(targets | logits), [batch, n] from logits [batch, n, vocab]."""
    z = logits if logits.dtype == np.float32 else logits.astype(np.float32)
    top = z.max(-1, keepdims=True)
    shifted = np.subtract(z, top)
    np.exp(shifted, out=shifted)
    lse = np.log(shifted.sum(-1)) + top[..., 0]
    picked = np.take_along_axis(z, targets[..., None], axis=-1)[..., 0]
    return lse - picked


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Float64 log-softmax over the last axis (the reference formula token_nll is tested against)."""
    z = logits.astype(np.float64)
    z -= z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


@dataclass
class _Tally:
    """Scores added in a fixed order (the sum is deterministic), overall and by position."""

    nll: float = 0.0
    tokens: int = 0
    bytes: int = 0
    agree: int = 0
    compared: int = 0
    max_err: float = 0.0
    kl: float = 0.0
    compared_nll: float = 0.0  # the target's, on the compared tokens
    reference_nll: float = 0.0  # PyTorch fp32's, on the same tokens
    compared_bytes: int = 0
    buckets: list[PositionBucket] = field(default_factory=position_buckets)

    def add(self, nll: np.ndarray, sizes: np.ndarray, positions: np.ndarray) -> None:
        """``nll``, ``sizes`` and ``positions`` (in the context) of consecutive scored tokens."""
        self.nll += float(nll.sum(dtype=np.float64))
        self.tokens += len(nll)
        self.bytes += int(sizes.sum())
        for b in self.buckets:
            inside = (positions >= b.start) & (positions < (b.end if b.end is not None else np.iinfo(np.int64).max))
            if inside.any():
                b.nll += float(nll[inside].sum(dtype=np.float64))
                b.tokens += int(inside.sum())
                b.bytes += int(sizes[inside].sum())

    def compare(self, mine: np.ndarray, theirs: np.ndarray, targets: np.ndarray, sizes: np.ndarray) -> None:
        """``mine``: the target's logits, ``theirs``: PyTorch fp32's, [tokens, vocab], predicting ``targets``
        (of ``sizes`` bytes)."""
        self.compared_nll += float(_nll(mine[None], targets[None]).sum(dtype=np.float64))
        self.reference_nll += float(_nll(theirs[None], targets[None]).sum(dtype=np.float64))
        self.compared_bytes += int(sizes.sum())
        self.agree += int((mine.argmax(-1) == theirs.argmax(-1)).sum())
        self.compared += mine.shape[0]
        self.max_err = max(self.max_err, float(np.abs(mine.astype(np.float64) - theirs).max()))
        p_log, q_log = log_softmax(theirs), log_softmax(mine)
        self.kl += float((np.exp(p_log) * (p_log - q_log)).sum())

    def merge(self, other: _Tally) -> None:
        self.nll += other.nll
        self.tokens += other.tokens
        self.bytes += other.bytes
        self.agree += other.agree
        self.compared += other.compared
        self.max_err = max(self.max_err, other.max_err)
        self.kl += other.kl
        self.compared_nll += other.compared_nll
        self.reference_nll += other.reference_nll
        self.compared_bytes += other.compared_bytes
        for mine, theirs in zip(self.buckets, other.buckets):
            mine.nll += theirs.nll
            mine.tokens += theirs.tokens
            mine.bytes += theirs.bytes

    def scores(self) -> dict:
        if not math.isfinite(self.nll):
            raise SamoutError("the model gave non-finite log-probabilities (NaN or inf logits): the export is broken")
        return {
            "tokens": self.tokens,
            "bytes": self.bytes,
            "bits_per_byte": self.nll / math.log(2) / self.bytes,
            "perplexity": math.exp(self.nll / self.tokens),
            "top1_agreement": self.agree / self.compared if self.compared else None,
            "max_logit_error": self.max_err if self.compared else None,
            "kl_from_fp32": self.kl / self.compared if self.compared else None,
            "fp32_bits_per_byte": self.reference_nll / math.log(2) / self.compared_bytes if self.compared_bytes else None,
            "cost_bits_per_byte": (self.compared_nll - self.reference_nll) / math.log(2) / self.compared_bytes
            if self.compared_bytes else None,
            "compared_tokens": self.compared,
            "by_position": [b.to_dict() for b in self.buckets if b.tokens],
        }


def evaluate(
    runner: Runner,
    tokens: np.ndarray,
    token_bytes: np.ndarray,
    window: int,
    stride: int,
    reference: Runner | None = None,
    batch: int = 8,
    reference_windows: int = REFERENCE_WINDOWS,
    progress: Progress = no_progress,
    workers: int = 1,
) -> dict:
    """Score ``tokens`` in windows with ``runner`` (logits for every position), and compare with ``reference``.

    ``workers`` > 1 runs that many runner calls at once (the runner must be
    thread-safe: an ONNX Runtime session is); results do not depend on it.
    """
    if runner.info.logits != "all":
        raise SamoutError("eval needs logits for every position: export with --logits all")
    batch = max(1, min(batch, runner.info.max_batch or batch,
                       LOGITS_BUDGET // (window * runner.info.config.vocab_size * 4)))
    while True:  # fewer windows per call where memory holds fewer (a softmax cache); one that does not fit: refused
        try:
            check_context(runner.info, window, batch, f"eval's windows of {window}")
            break
        except SamoutError:
            if batch == 1:
                raise
            batch //= 2
    spans = windows(len(tokens), window, stride)
    calls = batches(spans, batch)
    firsts = np.cumsum([0] + [len(c) for c in calls])  # index of each call's first window
    # the PyTorch comparison covers the calls that start within the first reference_windows windows
    compare = [i for i in range(len(calls)) if reference is not None and firsts[i] < reference_windows]
    ref_logits: dict[int, np.ndarray] = {}
    for n, i in enumerate(compare):
        progress(f"eval: PyTorch fp32 reference, window {firsts[i] + 1}/{firsts[compare[-1] + 1]}", n, len(compare))
        ids = _ids(tokens, calls[i])
        ref_logits[i] = reference.to_numpy(reference.run(ids, reference.initial_state(len(ids)))[0])

    def score(i: int) -> tuple[_Tally, float]:
        same = calls[i]
        ids = _ids(tokens, same)
        t0 = time.perf_counter()
        logits, _ = runner.run(ids, runner.initial_state(len(same)))
        logits = runner.to_numpy(logits)
        runner.synchronize()
        ms = (time.perf_counter() - t0) * 1e3 / len(same)
        nll_at = token_nll(logits, ids)  # [row, t]: the loss of token t+1 of the row
        ref = ref_logits.pop(i, None)
        tally = _Tally()
        for row, (s, e, first) in enumerate(same):
            rows = slice(first - 1 - s, e - 1 - s)  # logits at t-1 predict token t
            tally.add(nll_at[row, rows], token_bytes[first:e], np.arange(first - s, e - s))
            if ref is not None:
                tally.compare(logits[row, rows], ref[row, rows], ids[row, first - s : e - s], token_bytes[first:e])
        return tally, ms

    total = _Tally()
    call_ms: list[float] = []
    workers = max(1, min(workers, len(calls)))
    pool = ThreadPoolExecutor(workers, thread_name_prefix="eval") if workers > 1 else None
    try:
        results = pool.map(score, range(len(calls))) if pool else map(score, range(len(calls)))
        for i, (tally, ms) in enumerate(results):  # in window order whatever finished first: the sum is deterministic
            progress(f"eval: window {firsts[i] + 1}/{len(spans)}", i, len(calls))
            total.merge(tally)
            call_ms.append(ms)
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    progress("eval: done", len(calls), len(calls))
    return {**total.scores(), "window_ms": float(np.median(call_ms)) / workers}  # the rate eval ran at: calls overlap


def evaluate_stream(
    runner: Runner,
    pieces: Iterator[tuple[np.ndarray, np.ndarray]],
    reference: Runner | None = None,
    reference_tokens: int = REFERENCE_STREAM_TOKENS,
    progress: Progress = no_progress,
    total_bytes: int | None = None,
) -> dict:
    """Score a whole text as one context: ``pieces`` of (ids, bytes per token) go to the
    runner in chunks with the state carried; the last logits of a chunk predict the
    first token of the next. Memory is one chunk's, whatever the text's length."""
    if runner.info.logits != "all":
        raise SamoutError("eval needs logits for every position: export with --logits all")
    chunk = runner.info.max_seq or STREAM_CHUNK
    state = runner.initial_state(1)
    ref_state = reference.initial_state(1) if reference is not None else None
    tally, seen, done_bytes = _Tally(), 0, 0
    previous: np.ndarray | None = None  # the last position's logits: they predict the next chunk's first token
    ref_previous: np.ndarray | None = None
    started, ms = time.perf_counter(), []

    def run_chunk(ids: np.ndarray, sizes: np.ndarray) -> None:
        nonlocal state, ref_state, previous, ref_previous, seen, done_bytes
        check_context(runner.info, seen + len(ids), 1, "eval --stream")
        t0 = time.perf_counter()
        logits, state = runner.run(ids[None], state)
        logits = runner.to_numpy(logits)[0]
        ms.append((time.perf_counter() - t0) * 1e3 / len(ids) * 1000)
        predictors = logits[:-1] if previous is None else np.concatenate([previous[None], logits[:-1]])
        targets = ids if previous is not None else ids[1:]
        first = seen if previous is not None else seen + 1  # the position of the first scored token
        tally.add(_nll(predictors[None], targets[None])[0], sizes[len(ids) - len(targets):],
                  np.arange(first, seen + len(ids)))
        if reference is not None and seen < reference_tokens:
            ref_logits, ref_state = reference.run(ids[None], ref_state)
            ref_logits = reference.to_numpy(ref_logits)[0]
            ref_predictors = ref_logits[:-1] if ref_previous is None else np.concatenate([ref_previous[None],
                                                                                          ref_logits[:-1]])
            tally.compare(predictors, ref_predictors, targets, sizes[len(ids) - len(targets):])
            ref_previous = ref_logits[-1]
        previous = logits[-1]
        seen += len(ids)
        done_bytes += int(sizes.sum())
        progress(f"eval --stream: {seen:,} tokens", done_bytes, total_bytes or done_bytes)

    pending_ids, pending_sizes = np.zeros(0, np.int64), np.zeros(0, np.int64)
    for ids, sizes in pieces:  # what is left of the last piece, then this one: one copy per piece
        pending_ids, pending_sizes = np.concatenate([pending_ids, ids]), np.concatenate([pending_sizes, sizes])
        start = 0
        while len(pending_ids) - start >= chunk:
            run_chunk(pending_ids[start : start + chunk], pending_sizes[start : start + chunk])
            start += chunk
        pending_ids, pending_sizes = pending_ids[start:], pending_sizes[start:]
    if len(pending_ids):
        run_chunk(pending_ids, pending_sizes)
    if seen < 2:
        raise SamoutError(f"the text encodes to {seen} token{'s' * (seen != 1)}; at least 2 tokens are needed")
    progress("eval --stream: done", done_bytes, done_bytes)
    result = tally.scores()
    result["window_ms"] = float(np.median(ms)) if ms else 0.0  # ms per 1000 tokens
    result["context"] = seen
    result["seconds_scoring"] = time.perf_counter() - started
    return result


def _ids(tokens: np.ndarray, same: list[tuple[int, int, int]]) -> np.ndarray:
    return np.stack([tokens[s:e] for s, e, _ in same])


def eval_target(
    target: Path,
    text: Path,
    backend: str = "auto",
    provider: str = "cpu",
    window: int | None = None,
    stride: int | None = None,
    vocab: Path | None = None,
    with_reference: bool = True,
    arch: str = "cummax",
    heads: int | None = None,
    progress: Progress = no_progress,
    checkpoint: Path | None = None,
    stream: bool = False,
    engine: str | None = None,
    settings: Settings | None = None,
    ubatch: int | None = PREFILL_UBATCH,
) -> EvalResult:
    """Evaluate an export (any backend), an engine directory, or a checkpoint (torch),
    in windows or (``stream``) as one context. ``checkpoint``: a copy of an export's
    source checkpoint, where it has moved (the PyTorch reference and the torch backend
    run it)."""
    from samout_edge.runtime.registry import backend_named
    from samout_edge.runtime.target import engine_of, open_runner, resolve_target

    started = time.perf_counter()
    settings = settings or Settings(provider=provider)
    engine = engine or engine_of(settings)
    resolved = resolve_target(target, engine)
    manifest = read_manifest(resolved.export_dir) if resolved.export_dir is not None else None
    backend = resolved.default_backend if backend == "auto" else backend
    spec = backend_named(backend)
    settings = settings.replace(checkpoint=checkpoint, engine=engine)
    grows = manifest is not None and manifest.spec.grows
    options, workers = spec.options_from(settings).for_eval(stream, grows)  # the backend's knobs for scoring
    runner = open_runner(resolved, backend, options, arch, heads, logits="all", ubatch=ubatch)
    with runner:
        config = runner.info.config
        window, stride = windowing(window, stride)
        vocab_obj = Vocab.load(vocab) if vocab else export_vocab(resolved.export_dir or target)
        reference = None
        if with_reference and (manifest is not None or runner.info.dtype != "fp32") and \
                (manifest is None or importlib.util.find_spec("torch") is not None):
            require_torch("eval on the torch backend, and its PyTorch fp32 reference")
            from samout_edge.runtime.torch_runner import fp32_reference

            reference = fp32_reference(resolved.export_dir or target, manifest, checkpoint, arch, heads,
                                       "pass --checkpoint PATH to use a copy of it, or --no-reference")
        if stream:
            size = Path(text).stat().st_size if Path(text).is_file() else None
            scores = evaluate_stream(runner, iter_tokens(text, config.vocab_size, vocab_obj, piece_bytes=STREAM_PIECE_BYTES),
                                     reference, progress=progress, total_bytes=size)
            window, stride = scores.pop("context"), 1
            scores.pop("seconds_scoring")
        else:
            tokens, token_bytes = read_tokens(text, config.vocab_size, vocab_obj)
            scores = evaluate(runner, tokens, token_bytes, window, stride, reference, progress=progress,
                              workers=workers)
        if reference is None and manifest is None and runner.info.dtype == "fp32":  # its own reference
            scores["top1_agreement"], scores["max_logit_error"], scores["kl_from_fp32"] = 1.0, 0.0, 0.0
            scores["fp32_bits_per_byte"], scores["cost_bits_per_byte"] = scores["bits_per_byte"], 0.0

        return EvalResult(
            target=str(target),
            arch=runner.info.arch,
            runner=runner.name,
            dtype=runner.info.dtype,
            weights=manifest.weights.kind if manifest is not None else "fp",
            weights_bytes=_weights_bytes(manifest, config),
            mode="stream" if stream else "windows",
            window=window,
            stride=stride,
            state_bytes=graph.state_bytes(config, runner.info.spec, 1, window, runner.info.dtype),
            seconds=time.perf_counter() - started,
            **scores,
        )


def windowing(window: int | None, stride: int | None) -> tuple[int, int]:
    """The window (default 512) and the stride (default window - 1: each token computed once;
    its context is its place in the window), checked."""
    window = window or DEFAULT_WINDOW
    if window < 2:
        raise SamoutError(f"--window must be at least 2, got {window}")
    stride = stride or max(1, window - 1)
    if not 1 <= stride <= window:
        raise SamoutError(f"--stride must be 1..window ({window}), got {stride}")
    return window, stride


def record_quality(directory: Path, result: EvalResult, text: Path) -> dict:
    """Keep ``result`` in the export's export.json (``quality``), so what its precision costs on
    held-out text travels with it; an entry for the same text, mode, window and runner is replaced."""
    from samout_edge.artifact.files import sha256_file

    manifest = read_manifest(directory)
    entry = {"text": Path(text).name, "text_sha256": sha256_file(Path(text)), "text_bytes": result.bytes,
             "mode": result.mode, "window": result.window, "stride": result.stride, "runner": result.runner,
             "tokens": result.tokens, "bits_per_byte": result.bits_per_byte,
             "fp32_bits_per_byte": result.fp32_bits_per_byte, "cost_bits_per_byte": result.cost_bits_per_byte,
             "kl_from_fp32": result.kl_from_fp32, "top1_agreement": result.top1_agreement,
             "compared_tokens": result.compared_tokens,
             "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    same = ("text_sha256", "mode", "window", "stride", "runner")
    manifest.quality = [q for q in manifest.quality if tuple(q.get(k) for k in same) != tuple(entry[k] for k in same)]
    manifest.quality.append(entry)
    manifest.save(directory)
    return entry


def _weights_bytes(manifest, config) -> int:
    """Bytes of the weights as deployed: the quantized export's record, else parameters x dtype size."""
    if manifest is not None:
        recorded = manifest.weights.bytes
        if recorded:
            return int(recorded)
        return config.parameter_count() * graph.dtype(manifest.dtype).itemsize
    return 4 * config.parameter_count()
