"""`samout-edge eval`: quality measured on the artifact a user deploys.

Bits per byte and perplexity over a text file, llama-perplexity style: windows
of ``window`` tokens (no longer than the export's max_seq) every ``stride``
tokens (default window-1: each token computed once), each token scored once,
with the context its window gives it.
No state is carried between windows, so both archs see the same contexts, and
windows batch together (8 per call) and run concurrently (ONNX Runtime on the
CPU: two single-threaded calls at once); the result does not depend on either.
Against the PyTorch fp32 model (where torch and the source checkpoint are
present) the same windows give top-1 agreement and the largest logit error:
what fp16 or quantized weights cost, next to what they save.

Tokens are the text's UTF-8 bytes (a model with a vocabulary of at least 256),
or a vocab file's greedy encoding (``--vocab``).
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from samout_edge.artifact import graph
from samout_edge.artifact.engine import is_engine_dir
from samout_edge.artifact.manifest import is_export_dir, read_manifest
from samout_edge.artifact.vocab import Vocab, export_vocab, read_tokens  # noqa: F401 - read_tokens: eval's API
from samout_edge.errors import SamoutError
from samout_edge.progress import Progress, no_progress
from samout_edge.runtime.base import Runner

DEFAULT_WINDOW = 512
# The PyTorch fp32 comparison runs on the first windows only: it costs more than
# the target itself on a CPU, and agreement settles within a few thousand tokens.
REFERENCE_WINDOWS = 64


@dataclass
class EvalResult:
    target: str
    arch: str
    runner: str
    dtype: str
    weights: str  # fp | int8 | int4
    weights_bytes: int | None
    window: int
    stride: int
    tokens: int  # tokens scored
    bytes: int  # bytes those tokens cover
    bits_per_byte: float
    perplexity: float  # per token
    top1_agreement: float | None  # vs PyTorch fp32, same windows
    max_logit_error: float | None
    compared_tokens: int  # tokens the PyTorch comparison covered (the first windows)
    window_ms: float  # median wall time per window: a call's time / its windows / the calls run at once
    state_bytes: int  # decode state after `window` tokens
    seconds: float

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
    z = logits[:, :-1]
    if z.dtype != np.float32:
        z = z.astype(np.float32)
    top = z.max(-1, keepdims=True)
    shifted = np.subtract(z, top)
    np.exp(shifted, out=shifted)
    lse = np.log(shifted.sum(-1)) + top[..., 0]
    picked = np.take_along_axis(z, ids[:, 1:, None], axis=-1)[..., 0]
    return lse - picked


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Float64 log-softmax over the last axis (the reference formula token_nll is tested against)."""
    z = logits.astype(np.float64)
    z -= z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


@dataclass
class _Scored:
    nll: float  # summed in float64, in window order
    tokens: int
    bytes: int
    agree: int
    compared: int
    max_err: float
    ms_per_window: float


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
    """Score ``tokens`` with ``runner`` (logits for every position), and compare with ``reference``.

    ``workers`` > 1 runs that many runner calls at once (the runner must be
    thread-safe: an ONNX Runtime session is); results do not depend on it.
    """
    if runner.info.logits != "all":
        raise SamoutError("eval needs logits for every position: export with --logits all")
    if runner.info.max_batch is not None:
        batch = min(batch, runner.info.max_batch)
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

    def score(i: int) -> _Scored:
        same = calls[i]
        ids = _ids(tokens, same)
        t0 = time.perf_counter()
        logits, _ = runner.run(ids, runner.initial_state(len(same)))
        logits = runner.to_numpy(logits)
        runner.synchronize()
        ms = (time.perf_counter() - t0) * 1e3 / len(same)
        nll_at = token_nll(logits, ids)  # [row, t]: the loss of token t+1 of the row
        ref = ref_logits.pop(i, None)
        out = _Scored(0.0, 0, 0, 0, 0, 0.0, ms)
        for row, (s, e, first) in enumerate(same):
            rows = slice(first - 1 - s, e - 1 - s)  # logits at t-1 predict token t
            out.nll += float(nll_at[row, rows].sum(dtype=np.float64))
            out.tokens += e - first
            out.bytes += int(token_bytes[first:e].sum())
            if ref is not None:
                mine, theirs = logits[row, rows], ref[row, rows]
                out.agree += int((mine.argmax(-1) == theirs.argmax(-1)).sum())
                out.compared += e - first
                out.max_err = max(out.max_err, float(np.abs(mine.astype(np.float64) - theirs).max()))
        return out

    nll = 0.0
    scored = nbytes = agree = compared = 0
    max_err = 0.0
    call_ms: list[float] = []
    workers = max(1, min(workers, len(calls)))
    pool = ThreadPoolExecutor(workers, thread_name_prefix="eval") if workers > 1 else None
    try:
        results = pool.map(score, range(len(calls))) if pool else map(score, range(len(calls)))
        for i, r in enumerate(results):  # in window order whatever finished first: the sum is deterministic
            progress(f"eval: window {firsts[i] + 1}/{len(spans)}", i, len(calls))
            nll += r.nll
            scored += r.tokens
            nbytes += r.bytes
            agree += r.agree
            compared += r.compared
            max_err = max(max_err, r.max_err)
            call_ms.append(r.ms_per_window)
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    progress("eval: done", len(calls), len(calls))
    if not math.isfinite(nll):
        raise SamoutError("the model gave non-finite log-probabilities (NaN or inf logits): the export is broken")
    return {
        "tokens": scored,
        "bytes": nbytes,
        "bits_per_byte": nll / math.log(2) / nbytes,
        "perplexity": math.exp(nll / scored),
        "top1_agreement": agree / compared if compared else None,
        "max_logit_error": max_err if compared else None,
        "compared_tokens": compared,
        "window_ms": float(np.median(call_ms)) / workers,  # the rate eval ran at: calls overlap
    }


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
) -> EvalResult:
    """Evaluate an export (any backend), an engine directory, or a checkpoint (torch).
    ``checkpoint``: a copy of an export's source checkpoint, where it has moved (the
    PyTorch reference and the torch backend run it)."""
    from samout_edge.runtime.ort_runner import load_ort_runner, resolve_provider
    from samout_edge.runtime.registry import LoadOptions, load_runner

    started = time.perf_counter()
    workers = 1
    target = Path(target)
    if not target.exists():
        raise SamoutError(f"not found: {target}")
    manifest = None
    if is_engine_dir(target):
        export_dir = target.parent.parent
        runner = load_runner(export_dir, "tensorrt", LoadOptions(engine=target.name))
        manifest = read_manifest(export_dir)
    elif is_export_dir(target):
        export_dir = target
        manifest = read_manifest(target)
        backend = "ort" if backend == "auto" else backend
        if backend == "torch":
            runner = _torch_runner(target, manifest, checkpoint, "all", arch, heads, manifest.dtype, quantized=True)
        elif backend == "ort" and resolve_provider(provider) == "CPUExecutionProvider":
            workers, threads = cpu_workers()
            runner = load_ort_runner(target, provider, intra_op_threads=threads, spinning=False)
        else:
            runner = load_runner(target, backend, LoadOptions(provider=provider, engine=provider))
    else:
        if backend not in ("auto", "torch"):
            raise SamoutError(f"the {backend} backend runs an export directory; {target} is a checkpoint")
        export_dir = None
        runner = _torch_runner(target, None, target, "all", arch, heads, "fp32")
    with runner:
        config = runner.info.config
        limit = runner.info.max_seq
        window = window or min(DEFAULT_WINDOW, limit or DEFAULT_WINDOW)
        if window < 2:
            raise SamoutError(f"--window must be at least 2, got {window}")
        if limit is not None and window > limit:
            raise SamoutError(f"--window {window} is longer than the target's max_seq {limit}: past it the graph "
                              "is NaN by design; use a shorter window or re-export with a larger --max-seq")
        stride = stride or max(1, window - 1)  # each token computed once; its context is its place in the window
        if not 1 <= stride <= window:
            raise SamoutError(f"--stride must be 1..window ({window}), got {stride}")
        vocab_obj = Vocab.load(vocab) if vocab else export_vocab(target)  # else the export's own, if any
        tokens, token_bytes = read_tokens(text, config.vocab_size, vocab_obj)
        reference = None
        if with_reference and (manifest is None or _torch_available()):
            if manifest is not None:
                reference = _torch_runner(export_dir, manifest, checkpoint, "all", manifest.arch, heads, "fp32")
            elif runner.info.dtype != "fp32":
                reference = _torch_runner(target, None, target, "all", arch, heads, "fp32")
        scores = evaluate(runner, tokens, token_bytes, window, stride, reference, progress=progress,
                          workers=workers)
        if reference is None and manifest is None and runner.info.dtype == "fp32":  # its own reference
            scores["top1_agreement"], scores["max_logit_error"] = 1.0, 0.0
        weights = (getattr(manifest, "weights", None) or {}) if manifest is not None else {}
        return EvalResult(
            target=str(target),
            arch=runner.info.arch,
            runner=runner.name,
            dtype=runner.info.dtype,
            weights=weights.get("kind", "fp"),
            weights_bytes=_weights_bytes(export_dir, manifest, config),
            window=window,
            stride=stride,
            state_bytes=graph.state_bytes(config, runner.info.arch, 1, window, runner.info.dtype),
            seconds=time.perf_counter() - started,
            **scores,
        )


def cpu_workers() -> tuple[int, int]:
    """(concurrent runner calls, threads per call) for ONNX Runtime on the CPU.

    Windows are independent, so two single-threaded calls at once keep two cores
    busy without the per-operator hand-offs of one two-threaded call: measured on a
    shared 2-core machine, 11.1 vs 11.5 ms per 256-byte window idle and 18.7 vs
    27.0 ms with one other busy process. Threads do not spin: a waiting thread
    would take a core from the other call.
    """
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = min(2, cores)
    return workers, max(1, cores // workers)


def _torch_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def _torch_runner(directory, manifest, checkpoint, logits, arch, heads, dtype, quantized: bool = False):
    """``quantized``: the export's own function (its dequantized weights), as a target;
    else the float checkpoint, the fp32 reference every target is scored against."""
    from samout_edge.errors import require_torch

    require_torch("eval on the torch backend, and its PyTorch fp32 reference")
    from samout_edge.models.checkpoint import COPY_HINT, load_checkpoint, source_checkpoint
    from samout_edge.runtime.torch_runner import load_torch_runner

    if manifest is not None:
        hint = f"pass --checkpoint PATH to use a copy of it, or {'--backend ort' if quantized else '--no-reference'}"
        ckpt = source_checkpoint(Path(directory), manifest, checkpoint, COPY_HINT if checkpoint else hint)
        return load_torch_runner(ckpt, manifest.arch, dtype, logits, weights=manifest.weights if quantized else None)
    return load_torch_runner(load_checkpoint(checkpoint, heads), arch, dtype, logits)


def _weights_bytes(export_dir: Path | None, manifest, config) -> int:
    """Bytes of the weights as deployed: the quantized export's record, else parameters x dtype size."""
    if manifest is not None:
        recorded = (getattr(manifest, "weights", None) or {}).get("bytes")
        if recorded:
            return int(recorded)
        return config.parameter_count() * graph.dtype(manifest.dtype).itemsize
    return 4 * config.parameter_count()
