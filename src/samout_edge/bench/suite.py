"""`samout-edge bench`: SamOut and its softmax baseline, side by side, as deployed.

Both archs always run with the same weights, config, dtype, backend and machine,
timed in one interleaved loop. Each measurement is one Record; the report pairs
them into cummax/softmax ratios.
"""

from __future__ import annotations

import math
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from samout_edge.artifact import graph
from samout_edge.artifact.config import ARCHS
from samout_edge.artifact.files import check_output_dir
from samout_edge.artifact.manifest import Manifest, read_manifest
from samout_edge.bench import machine
from samout_edge.bench.memory import MemorySpec, measure_in_child
from samout_edge.bench.timing import Budget, interleaved
from samout_edge.errors import SamoutError, require_torch
from samout_edge.progress import Progress, no_progress
from samout_edge.runtime.base import Runner, check_context
from samout_edge.runtime.ort_runner import available_providers, load_ort_runner, resolve_provider
from samout_edge.runtime.registry import BACKENDS, LoadOptions, load_runner

MODES = ("prefill", "decode")
EXPORT_MAX_SEQ = 4096  # the exports bench makes take calls up to this; longer ones are chunked


@dataclass
class BenchConfig:
    modes: list[str] = field(default_factory=lambda: list(MODES))
    seqs: list[int] = field(default_factory=lambda: [256, 1024, 4096])
    contexts: list[int] = field(default_factory=lambda: [256, 1024, 4096])
    batches: list[int] = field(default_factory=lambda: [1])
    backends: list[str] = field(default_factory=lambda: ["torch", "ort"])
    providers: list[str] | None = None  # ORT providers; None = every available one
    device: str = "auto"  # torch device
    engine: str | None = None  # TensorRT engine profile, for the tensorrt backend
    fast_kernel: bool = True  # torch on CUDA: the Triton cummax instead of torch.cummax
    budget: Budget = field(default_factory=Budget)
    memory: bool = True
    kv_budget_bytes: int | None = None  # softmax: contexts whose KV cache would pass this are reported, not run
    # ONNX Runtime CPU: whether intra-op threads busy-wait between operators (ORT's own
    # default is on). Off by default here: bench interleaves two sessions (one per arch) in
    # one process, and the threads one session leaves spinning take the cores the other's
    # call needs. Seed preset, decode, ORT 1.32 on a 2-core EPYC, median ms cummax/softmax:
    # idle box, context 1024: on 9.4-10.4 / 21.4-24.1, off 7.1-7.3 / 14.0-15.5; with another
    # job on the box, context 256: on 22.8-24.4 / 24.2-31.8, off 7.9-8.6 / 10.5-11.3. A lone
    # session on an idle box is the one case on wins (cummax 6.1 vs 7.4 ms, softmax even).
    ort_spinning: bool = False

    def validate(self) -> BenchConfig:
        for mode in self.modes:
            if mode not in MODES:
                raise SamoutError(f"unknown mode {mode!r}; choose from: {', '.join(MODES)}")
        for backend in self.backends:
            if backend not in BACKENDS:
                raise SamoutError(f"unknown backend {backend!r}; choose from: {', '.join(BACKENDS)}")
        for name, values in (("--seq", self.seqs), ("--context", self.contexts), ("--batch", self.batches)):
            if not values or any(v < 1 for v in values):
                raise SamoutError(f"{name} needs positive integers, got {values}")
        if not (math.isfinite(self.budget.seconds) and self.budget.seconds > 0) or self.budget.warmup < 0:
            raise SamoutError(f"--budget must be a positive number of seconds and --warmup >= 0, got "
                              f"{self.budget.seconds} and {self.budget.warmup}")
        if self.budget.min_repeats < 1 or self.budget.max_repeats < self.budget.min_repeats:
            raise SamoutError("--repeats must be at least 1 (and at least --min-repeats)")
        return self

    def max_seq_needed(self) -> int:
        """Longest sequence a context reaches: the longest prefill, or a context plus every decode step."""
        longest = max(self.seqs) if "prefill" in self.modes else 1
        if "decode" in self.modes:
            longest = max(longest, max(self.contexts) + self.budget.total_calls() + 1)
        return longest

    def export_max_seq(self) -> int:
        """max_seq of the exports bench makes: one export serves every length (longer calls are
        fed in chunks), so it is the longest call, up to EXPORT_MAX_SEQ."""
        return min(self.max_seq_needed(), EXPORT_MAX_SEQ)


@dataclass
class Record:
    arch: str
    backend: str
    provider: str  # ORT provider, or the torch device
    mode: str
    batch: int
    seq: int | None  # prefill: tokens in the call
    context: int | None  # decode: tokens already in the state
    dtype: str
    latency_ms: dict[str, float]  # median, p90
    tokens_per_s: float
    peak_mem_mb: float | None
    state_bytes: int
    repeats: int
    machine: str
    weights: str = "fp"  # fp | int8 | int4 (export.json weights.kind)
    weights_bytes: int | None = None  # the graph's initializers: what the weights take (export.json weights.bytes)
    refused: str | None = None  # why this point was not run (a softmax cache past memory or --kv-budget)

    @property
    def length(self) -> int:
        return self.seq if self.mode == "prefill" else self.context


@dataclass
class BenchReport:
    machine: dict[str, Any]
    config: dict[str, Any]
    exports: dict[str, str]
    records: list[Record]

    def to_dict(self) -> dict[str, Any]:
        return {
            "machine": self.machine,
            "config": self.config,
            "exports": self.exports,
            "records": [asdict(r) for r in self.records],
        }


# --------------------------------------------------------------------------- exports


@contextmanager
def bench_workspace(work: Path | None) -> Iterator[Path]:
    """Where bench keeps the exports it makes: ``--work`` (kept), or a temporary
    directory removed when the bench ends, fails or is interrupted."""
    if work is not None:
        yield check_output_dir(work, "--work")
        return
    with tempfile.TemporaryDirectory(prefix="samout-bench-") as tmp:
        yield Path(tmp)


def prepare_exports(
    dirs: list[Path],
    preset: str | None,
    work_dir: Path | None,
    max_seq: int,
    dtype: str,
    lowering: str,
    progress: Progress = no_progress,
    scan: str = "auto",
) -> dict[str, Path]:
    """One export per arch from the same checkpoint: given, derived, or made from a preset."""
    if preset and dirs:
        raise SamoutError("give export directories or --preset, not both")
    if not preset and not dirs:
        raise SamoutError("give one or two export directories, or --preset NAME")
    if len(dirs) > 2:
        raise SamoutError("give at most two export directories (one per arch)")
    if preset or len(dirs) == 1:
        require_torch("bench with --preset or one export (it exports the other arch); give one export per arch")
        from samout_edge.exporter.onnx_export import ExportOptions, export

        if work_dir is None:
            raise SamoutError("bench needs a work directory for the exports it makes (see bench_workspace)")
        work = Path(work_dir)

    if preset:
        first = work / "cummax"
        options = ExportOptions("cummax", lowering, scan, max_seq=max_seq, dtype=dtype)
        if not _reusable(first, preset, options):
            check_ours_to_replace(first)
            progress(f"exporting {preset} (cummax) for ONNX Runtime", 0, 2)
            export(first, options, preset_name=preset, made_by=MADE_BY)
        dirs = [first]

    manifests = [read_manifest(d) for d in dirs]
    pair = {m.arch: d for m, d in zip(manifests, dirs)}
    if len(dirs) == 2:
        a, b = manifests
        if a.arch == b.arch:
            raise SamoutError(f"both directories are {a.arch} exports; give one cummax and one softmax")
        if (a.source["sha256"], a.dtype, a.config, _weights_key(a)) != (b.source["sha256"], b.dtype, b.config,
                                                                          _weights_key(b)):
            raise SamoutError("the two exports differ in checkpoint, dtype, config or weights (kind, block size, "
                              "format); bench compares like with like")
        return pair
    (made,) = manifests
    other = "softmax" if made.arch == "cummax" else "cummax"
    target = work / other
    if not _matches(target, made, other):
        check_ours_to_replace(target)
        progress(f"exporting the {other} counterpart of {dirs[0]}", 1, 2)
        source = Path(made.source["path"])
        if not source.is_absolute():
            source = dirs[0] / source
        w = made.weights or {}
        options = ExportOptions(other, made.lowering, made.scan["scan"], made.max_seq, made.dtype, made.logits, made.opset,
                                weights=w.get("kind", "fp"), block_size=w.get("block_size"),
                                weights_format=w.get("format") or "auto")
        export(target, options, checkpoint=source, heads=None if source.is_dir() else made.config.num_heads,
               made_by=MADE_BY)
    pair[other] = target
    return pair


MADE_BY = "bench"  # export.json extra.made_by of the exports bench makes: the only ones it replaces


def check_ours_to_replace(directory: Path) -> None:
    """bench re-exports into its work directory only where it made what is there: a
    user's export of another checkpoint under --work is refused, never replaced."""
    if not directory.exists() or (directory.is_dir() and not any(directory.iterdir())):
        return
    try:
        made_by = read_manifest(directory).extra.get("made_by")
    except SamoutError:
        made_by = None
    if made_by != MADE_BY:
        raise SamoutError(f"{directory} holds something bench did not make (an export of another checkpoint or "
                          "options, or other files); bench replaces only its own exports there: give another --work")


def _reusable(directory: Path, preset: str, options) -> bool:
    try:
        m = read_manifest(directory)
    except SamoutError:
        return False
    plan = options.scan_plan(m.config)
    return (m.source.get("preset"), m.max_seq, m.dtype, m.lowering, m.arch, m.scan["scan"], _weights_key(m)[0]) == (
        preset, options.max_seq, options.dtype, options.lowering, options.arch, plan.scan, options.weights)


def _matches(directory: Path, made: Manifest, arch: str) -> bool:
    try:
        m = read_manifest(directory)
    except SamoutError:
        return False
    same = (m.source.get("sha256"), m.dtype, m.max_seq, m.lowering, m.logits, m.scan, _weights_key(m))
    return m.arch == arch and same == (made.source.get("sha256"), made.dtype, made.max_seq, made.lowering, made.logits,
                                       made.scan, _weights_key(made))


def _weights_key(m: Manifest) -> tuple:
    w = m.weights or {}
    return w.get("kind", "fp"), w.get("block_size"), w.get("format")


def weights_bytes(directory: Path, manifest: Manifest) -> int:
    """What the export's weights take: export.json's record, else measured from
    model.onnx's initializers (exports older than the record)."""
    recorded = (manifest.weights or {}).get("bytes")
    if recorded:
        return int(recorded)
    import onnx

    from samout_edge.artifact.manifest import MODEL_FILE
    from samout_edge.exporter.quantize import initializer_bytes  # numpy and onnx only

    return initializer_bytes(onnx.load(str(Path(directory) / MODEL_FILE), load_external_data=False))


# --------------------------------------------------------------------------- running


def targets(config: BenchConfig) -> list[tuple[str, str]]:
    """(backend, provider-or-device) pairs to run."""
    out = []
    for backend in config.backends:
        if backend == "torch":
            require_torch("bench --backend torch")
            from samout_edge.runtime.torch_runner import torch_device

            out.append(("torch", torch_device(config.device)))
        elif backend == "ort":
            providers = config.providers or available_providers()
            out += [("ort", resolve_provider(p)) for p in providers]
        else:
            out.append(("tensorrt", config.engine or ""))
    return out


def run_bench(pair: dict[str, Path], config: BenchConfig, progress: Progress = no_progress) -> BenchReport:
    config.validate()
    plan = targets(config)
    manifests = {arch: read_manifest(pair[arch]) for arch in ARCHS}
    cm = manifests["cummax"]
    stored = {arch: (m.weights.get("kind", "fp"), weights_bytes(pair[arch], m)) for arch, m in manifests.items()}
    points = [(mode, batch, length) for mode in config.modes for batch in config.batches
              for length in (config.seqs if mode == "prefill" else config.contexts)]
    total = len(plan) * len(points)
    device = next((p for b, p in plan if b == "torch"), "cpu")
    info = machine.describe(device)
    records: list[Record] = []
    done = 0
    for backend, provider in plan:
        options = LoadOptions(provider=provider, device=provider if backend == "torch" else None,
                              engine=provider if backend == "tensorrt" else None, fast_kernel=config.fast_kernel)
        if backend == "ort":
            runners = {arch: load_ort_runner(pair[arch], provider, spinning=config.ort_spinning) for arch in ARCHS}
        else:
            runners = {arch: load_runner(pair[arch], backend, options) for arch in ARCHS}
        if backend in ("tensorrt", "torch"):
            label = runners["cummax"].info.device  # the engine profile loaded; cuda+triton
        else:
            label = provider
        shown = label.replace("ExecutionProvider", "")
        for mode, batch, length in points:
            progress(f"{backend}:{shown} {mode} batch {batch} {'seq' if mode == 'prefill' else 'context'} {length}", done, total)
            records += _measure_point(runners, pair, backend, provider, label, mode, batch, length, config, cm,
                                      info["label"], stored)
            done += 1
    progress("done", total, total)
    return BenchReport(
        machine=info,
        config={**cm.config.to_dict(), "dtype": cm.dtype, "lowering": cm.lowering, "scan": cm.scan["scan"],
                "max_seq": cm.max_seq, "budget": asdict(config.budget), "memory": config.memory,
                "ort_spinning": config.ort_spinning,
                "weights": {**{k: cm.weights.get(k) for k in ("kind", "block_size", "format")},
                            "bytes": {arch: stored[arch][1] for arch in ARCHS}}},
        exports={arch: str(Path(p).absolute()) for arch, p in pair.items()},
        records=records,
    )


def _measure_point(runners: dict[str, Runner], pair, backend, provider, label, mode, batch, length,
                   config: BenchConfig, manifest: Manifest, machine_label: str,
                   stored: dict[str, tuple[str, int]] | None = None) -> list[Record]:
    vocab = manifest.config.vocab_size
    steps = config.budget.total_calls() + 1
    ids = np.random.default_rng(length).integers(1, vocab, (batch, length + steps))
    calls, refused = {}, {}
    for arch, runner in runners.items():
        why = _refusal(runner, config, batch, length + (steps if mode == "decode" else 0))
        if why:
            refused[arch] = why
            continue
        empty = runner.initial_state(batch)
        if mode == "prefill":
            calls[arch] = _prefill_call(runner, ids[:, :length], empty)
        else:
            _, state = runner.run(ids[:, :length], empty)  # any length: run() chunks it
            calls[arch] = _decode_call(runner, ids, length, state)
    sync = next(iter(runners.values())).synchronize
    timings = interleaved(calls, config.budget, sync) if calls else {}
    records = []
    for arch in runners:
        timing, peak = timings.get(arch), None
        if timing is not None and config.memory:
            spec = MemorySpec(str(pair[arch]), backend, provider, mode, batch, length, fast_kernel=config.fast_kernel)
            try:
                peak = measure_in_child(spec)
            except (RuntimeError, subprocess.TimeoutExpired):  # out of memory, killed or too slow: the time
                peak = None  # stands, the peak is unknown
        tokens = batch * (length if mode == "prefill" else 1)
        records.append(Record(
            arch=arch, backend=backend, provider=label, mode=mode, batch=batch,
            seq=length if mode == "prefill" else None, context=length if mode == "decode" else None,
            dtype=manifest.dtype,
            latency_ms={} if timing is None else {"median": timing.median_ms, "p90": timing.p90_ms},
            tokens_per_s=0.0 if timing is None else tokens / (timing.median_ms / 1e3),
            peak_mem_mb=None if peak is None else peak / 2**20,
            state_bytes=graph.state_bytes(manifest.config, arch, batch, length, manifest.dtype),
            repeats=0 if timing is None else len(timing.samples_ms),
            machine=machine_label,
            weights=(stored or {}).get(arch, ("fp", None))[0],
            weights_bytes=(stored or {}).get(arch, ("fp", None))[1],
            refused=refused.get(arch),
        ))
    return records


def _refusal(runner: Runner, config: BenchConfig, batch: int, tokens: int) -> str | None:
    """Why a context of ``tokens`` is not run on ``runner`` (None: it is): past --kv-budget, or
    past what the target or the machine's memory holds (check_context, the rule every command asks)."""
    info = runner.info
    state = graph.state_bytes(info.config, info.arch, batch, tokens, info.dtype)
    if config.kv_budget_bytes is not None and info.arch == "softmax" and state > config.kv_budget_bytes:
        return f"KV cache {state / 2**20:,.1f} MiB > --kv-budget {config.kv_budget_bytes / 2**20:,.1f} MiB"
    try:
        check_context(info, tokens, batch)
    except SamoutError as e:
        return f"out of memory at {tokens:,} tokens" if "memory" in str(e) else str(e)
    return None


def _prefill_call(runner: Runner, ids: np.ndarray, state):
    return lambda: runner.run(ids, state)


def _decode_call(runner: Runner, ids: np.ndarray, context: int, state):
    """One-token steps that feed each new state back, as a decode loop does."""
    box = {"state": state, "pos": context}

    def step() -> None:
        pos = box["pos"]
        _, box["state"] = runner.run(ids[:, pos : pos + 1], box["state"])
        box["pos"] = pos + 1

    return step
