"""`samout-edge eval`: quality measured on the artifact a user deploys.

Bits per byte and perplexity over a text file, llama-perplexity style: windows
of ``window`` tokens (no longer than the export's max_seq) every ``stride``
tokens (default window-1: each token computed once), each token scored once,
with the context its window gives it.
No state is carried between windows, so both archs see the same contexts.
Against the PyTorch fp32 model (where torch and the source checkpoint are
present) the same windows give top-1 agreement and the largest logit error:
what fp16 or quantized weights cost, next to what they save.

Tokens are the text's UTF-8 bytes (a model with a vocabulary of at least 256),
or a vocab file's greedy encoding (``--vocab``).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from samout_edge.artifact import graph
from samout_edge.artifact.engine import is_engine_dir
from samout_edge.artifact.manifest import is_export_dir, read_manifest
from samout_edge.errors import SamoutError
from samout_edge.generate import Vocab
from samout_edge.progress import Progress, no_progress
from samout_edge.runtime.base import Runner

DEFAULT_WINDOW = 512
# The PyTorch fp32 comparison runs on the first windows only: it costs more than
# the target itself on a CPU, and agreement settles within a few thousand tokens.
REFERENCE_WINDOWS = 64
MAX_TEXT_BYTES = 64 << 20


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
    window_ms: float  # median wall time of one window call (batch 1 equivalent)
    state_bytes: int  # decode state after `window` tokens
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def read_tokens(path: Path, vocab_size: int, vocab: Vocab | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, bytes per token) of a UTF-8 text file."""
    path = Path(path)
    if not path.is_file():
        raise SamoutError(f"text file not found: {path}")
    if path.stat().st_size > MAX_TEXT_BYTES:
        raise SamoutError(f"{path} is larger than {MAX_TEXT_BYTES >> 20} MiB; evaluate a part of it")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SamoutError(f"{path} is not UTF-8 text (byte {e.start}); eval reads text files") from None
    if len(data) < 2:
        raise SamoutError(f"{path} has {len(data)} bytes; eval needs at least 2 tokens to score")
    if vocab is not None:
        ids = np.asarray(vocab.encode(text), dtype=np.int64)
        sizes = np.asarray([len(vocab.tokens[i].encode()) for i in ids], dtype=np.int64)
    else:
        if vocab_size < 256:
            raise SamoutError(f"the model's vocabulary has {vocab_size} ids, fewer than the 256 byte values; "
                              "give --vocab FILE")
        ids = np.frombuffer(data, dtype=np.uint8).astype(np.int64)
        sizes = np.ones(len(ids), dtype=np.int64)
    if len(ids) < 2:
        raise SamoutError(f"{path} encodes to {len(ids)} token; eval needs at least 2")
    if ids.max() >= vocab_size:
        raise SamoutError(f"token id {int(ids.max())} is outside the model's vocabulary (0..{vocab_size - 1})")
    return ids, sizes


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


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z -= z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


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
) -> dict:
    """Score ``tokens`` with ``runner`` (logits for every position), and compare with ``reference``."""
    if runner.info.logits != "all":
        raise SamoutError("eval needs logits for every position: export with --logits all")
    if runner.info.max_batch is not None:
        batch = min(batch, runner.info.max_batch)
    spans = windows(len(tokens), window, stride)
    nll = 0.0
    scored = nbytes = agree = compared = 0
    max_err = 0.0
    call_ms: list[float] = []
    groups = [spans[i:i + batch] for i in range(0, len(spans), batch)]
    for done, group in enumerate(groups):
        if done * batch >= reference_windows:
            reference = None
        progress(f"eval: window {done * batch + 1}/{len(spans)}", done, len(groups))
        # equal lengths batch together; the last, shorter window runs alone
        for same in _same_length(group):
            ids = np.stack([tokens[s:e] for s, e, _ in same])
            t0 = time.perf_counter()
            logits, _ = runner.run(ids, runner.initial_state(len(same)))
            logits = runner.to_numpy(logits)
            runner.synchronize()
            call_ms.append((time.perf_counter() - t0) * 1e3 / len(same))
            ref = None
            if reference is not None:
                ref_logits, _ = reference.run(ids, reference.initial_state(len(same)))
                ref = reference.to_numpy(ref_logits)
            for row, (s, e, first) in enumerate(same):
                rows = slice(first - 1 - s, e - 1 - s)  # logits at t-1 predict token t
                targets = tokens[first:e]
                lp = log_softmax(logits[row, rows])
                nll -= float(lp[np.arange(len(targets)), targets].sum())
                scored += len(targets)
                nbytes += int(token_bytes[first:e].sum())
                if ref is not None:
                    agree += int((logits[row, rows].argmax(-1) == ref[row, rows].argmax(-1)).sum())
                    compared += len(targets)
                    max_err = max(max_err, float(np.abs(logits[row, rows].astype(np.float64) - ref[row, rows]).max()))
    progress("eval: done", len(groups), len(groups))
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
        "window_ms": float(np.median(call_ms)),
    }


def _same_length(group: list[tuple[int, int, int]]) -> list[list[tuple[int, int, int]]]:
    out: dict[int, list] = {}
    for span in group:
        out.setdefault(span[1] - span[0], []).append(span)
    return list(out.values())


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
) -> EvalResult:
    """Evaluate an export (any backend), an engine directory, or a checkpoint (torch)."""
    from samout_edge.runtime.registry import LoadOptions, load_runner

    started = time.perf_counter()
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
            runner = _torch_runner(target, manifest, None, "all", arch, heads, manifest.dtype)
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
        vocab_obj = Vocab.load(vocab) if vocab else None
        tokens, token_bytes = read_tokens(text, config.vocab_size, vocab_obj)
        reference = None
        if with_reference and (manifest is None or _torch_available()):
            if manifest is not None:
                reference = _torch_runner(export_dir, manifest, None, "all", manifest.arch, heads, "fp32")
            elif runner.info.dtype != "fp32":
                reference = _torch_runner(target, None, target, "all", arch, heads, "fp32")
        scores = evaluate(runner, tokens, token_bytes, window, stride, reference, progress=progress)
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


def _torch_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def _torch_runner(directory, manifest, checkpoint, logits, arch, heads, dtype):
    from samout_edge.errors import require_torch

    require_torch("eval on the torch backend, and its PyTorch fp32 reference")
    from samout_edge.models.checkpoint import load_checkpoint, source_checkpoint
    from samout_edge.runtime.torch_runner import load_torch_runner

    if manifest is not None:
        ckpt = source_checkpoint(Path(directory), manifest, None)
        return load_torch_runner(ckpt, manifest.arch, dtype, logits)
    return load_torch_runner(load_checkpoint(checkpoint, heads), arch, dtype, logits)


def _weights_bytes(export_dir: Path | None, manifest, config) -> int:
    """Bytes of the weights as deployed: the quantized export's record, else parameters x dtype size."""
    if manifest is not None:
        recorded = (getattr(manifest, "weights", None) or {}).get("bytes")
        if recorded:
            return int(recorded)
        return config.parameter_count() * graph.dtype(manifest.dtype).itemsize
    return 4 * config.parameter_count()
