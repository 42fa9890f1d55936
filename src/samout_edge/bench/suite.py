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
from samout_edge.artifact.files import check_output_dir
from samout_edge.artifact.graph import PREFILL_UBATCH
from samout_edge.artifact.manifest import Manifest, check_exports, read_manifest  # noqa: F401 - bench's API
from samout_edge.bench import machine
from samout_edge.bench.bandwidth import decode_step_bytes, measure_bandwidth
from samout_edge.bench.peak_memory import MemorySpec, json_ready, measure_in_child
from samout_edge.bench.timing import Budget, interleaved
from samout_edge.errors import SamoutError
from samout_edge.progress import Progress, no_progress
from samout_edge.runtime.backend import BackendOptions
from samout_edge.runtime.base import Runner, check_context
from samout_edge.runtime.registry import BACKENDS, Settings, backend_named, check_installed, load_runner

MODES = ("prefill", "decode")
EXPORT_MAX_SEQ = 4096  # the exports bench makes take calls up to this; longer ones are chunked


@dataclass
class BenchConfig:
    modes: list[str] = field(default_factory=lambda: list(MODES))
    seqs: list[int] = field(default_factory=lambda: [256, 1024, 4096])
    contexts: list[int] = field(default_factory=lambda: [256, 1024, 4096])
    batches: list[int] = field(default_factory=lambda: [1])
    backends: list[str] = field(default_factory=lambda: ["torch", "ort"])
    # Every backend's options (runtime/registry.py); each backend takes its own. ONNX Runtime: the
    # providers to run (comma-separated; None: every available one) and, off here unless asked
    # for, intra-op threads busy-waiting between operators (ORT's own default is on). Bench
    # interleaves two sessions (one per arch) in one process, and the threads one session leaves
    # spinning take the cores the other's call needs. Seed preset, decode, ORT 1.32 on a 2-core
    # EPYC, median ms cummax/softmax: idle box, context 1024: on 9.4-10.4 / 21.4-24.1, off
    # 7.1-7.3 / 14.0-15.5; with another job on the box, context 256: on 22.8-24.4 / 24.2-31.8, off
    # 7.9-8.6 / 10.5-11.3. A lone session on an idle box is the one case on wins (cummax 6.1 vs
    # 7.4 ms, softmax even).
    settings: Settings = field(default_factory=lambda: Settings(provider=None, spinning=False))
    budget: Budget = field(default_factory=Budget)
    memory: bool = True
    kv_budget_bytes: int | None = None  # softmax: contexts whose KV cache would pass this are reported, not run
    roofline: bool = True  # measure the memory bandwidth once; decode rows get their fraction of it
    ubatch: int | None = PREFILL_UBATCH  # most tokens per prefill call, as generate and serve feed them; None: max_seq

    def validate(self) -> BenchConfig:
        for mode in self.modes:
            if mode not in MODES:
                raise SamoutError(f"unknown mode {mode!r}; choose from: {', '.join(MODES)}")
        for backend in self.backends:
            if backend not in BACKENDS:
                raise SamoutError(f"unknown backend {backend!r}; choose from: {', '.join(BACKENDS)}")
            check_installed(BACKENDS[backend])  # before minutes of exporting
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
    step_bytes: int | None = None  # decode: what one step must move (weights as stored but the embedding, state in and out)
    roofline: float | None = None  # decode: the bandwidth floor of step_bytes over the measured latency (1.0: at the limit)

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


def weights_bytes(directory: Path, manifest: Manifest) -> int:
    """What the export's weights take: export.json's record, else measured from
    model.onnx's initializers (exports older than the record)."""
    recorded = manifest.weights.bytes
    if recorded:
        return int(recorded)
    import onnx

    from samout_edge.artifact.initializers import initializer_bytes
    from samout_edge.artifact.manifest import MODEL_FILE

    return initializer_bytes(onnx.load(str(Path(directory) / MODEL_FILE), load_external_data=False))


# --------------------------------------------------------------------------- running


def targets(config: BenchConfig) -> list[tuple[str, BackendOptions]]:
    """(backend, its options) to run: the runs each backend makes for bench (ONNX Runtime: one per
    provider asked for, default every available one), with the options the bench was given."""
    out = []
    for name in config.backends:
        backend = backend_named(name)
        check_installed(backend)  # for_bench may import it (torch resolves its device)
        out += [(name, options) for options in backend.options_from(config.settings).for_bench()]
    return out


def run_bench(pair: dict[str, Path], config: BenchConfig, progress: Progress = no_progress) -> BenchReport:
    config.validate()
    plan = targets(config)
    manifests = {arch: read_manifest(path) for arch, path in pair.items()}
    cm = next(iter(manifests.values()))  # the first arch's: what the report's config describes
    stored = {arch: (m.weights.kind, weights_bytes(pair[arch], m)) for arch, m in manifests.items()}
    points = [(mode, batch, length) for mode in config.modes for batch in config.batches
              for length in (config.seqs if mode == "prefill" else config.contexts)]
    total = len(plan) * len(points)
    device = next((d for _, o in plan if str(d := getattr(o, "device", "")).startswith("cuda")), "cpu")  # its GPU
    info = machine.describe(device)
    if config.roofline and "decode" in config.modes:
        progress("measuring the memory bandwidth (a parallel copy of 256 MiB)", 0, total)
        info["memory_bandwidth"] = measure_bandwidth().to_dict()
    records: list[Record] = []
    done = 0
    for backend, options in plan:
        runners = {arch: load_runner(pair[arch], backend, options) for arch in pair}
        for runner in runners.values():
            runner.ubatch = config.ubatch
        label = next(iter(runners.values())).info.device  # the provider, the engine profile, cuda+triton, CPU:f32
        shown = label.replace("ExecutionProvider", "")
        for mode, batch, length in points:
            progress(f"{backend}:{shown} {mode} batch {batch} {'seq' if mode == 'prefill' else 'context'} {length}", done, total)
            records += _measure_point(runners, pair, backend, options, label, mode, batch, length, config, cm,
                                      info["label"], stored, (info.get("memory_bandwidth") or {}).get("gb_per_s"))
            done += 1
    progress("done", total, total)
    return BenchReport(
        machine=info,
        config={**cm.config.to_dict(), "dtype": cm.dtype, "lowering": cm.lowering, "scan": cm.scan["scan"],
                "max_seq": cm.max_seq, "ubatch": config.ubatch, "budget": asdict(config.budget), "memory": config.memory,
                "settings": config.settings.to_dict(),
                "weights": {"kind": cm.weights.kind, "block_size": cm.weights.block_size, "format": cm.weights.format,
                            "bytes": {arch: stored[arch][1] for arch in pair}}},
        exports={arch: str(Path(p).absolute()) for arch, p in pair.items()},
        records=records,
    )


def _measure_point(runners: dict[str, Runner], pair, backend, options: BackendOptions, label, mode, batch, length,
                   config: BenchConfig, manifest: Manifest, machine_label: str,
                   stored: dict[str, tuple[str, int]] | None = None, gb_per_s: float | None = None) -> list[Record]:
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
        probe = runners[arch].info.memory  # None: an allocator whose peak cannot be read (a GPU's)
        if timing is not None and config.memory and probe is not None:
            spec = MemorySpec(str(pair[arch]), backend, label, mode, batch, length,
                              settings=json_ready(asdict(options)), memory=probe, ubatch=config.ubatch)
            try:
                peak = measure_in_child(spec)
            except (RuntimeError, subprocess.TimeoutExpired):  # out of memory, killed or too slow: the time
                peak = None  # stands, the peak is unknown
        tokens = batch * (length if mode == "prefill" else 1)
        state = graph.state_bytes(manifest.config, runners[arch].info.spec, batch, length, manifest.dtype)
        weights = (stored or {}).get(arch, ("fp", None))[1]
        step = roof = None
        if mode == "decode" and weights:
            cfg = manifest.config
            step = decode_step_bytes(weights, cfg.parameter_count(), cfg.vocab_size * cfg.hidden_size, state)
            if gb_per_s and timing is not None:
                roof = step / (gb_per_s * 1e9) / (timing.median_ms / 1e3)
        records.append(Record(
            arch=arch, backend=backend, provider=label, mode=mode, batch=batch,
            seq=length if mode == "prefill" else None, context=length if mode == "decode" else None,
            dtype=manifest.dtype,
            latency_ms={} if timing is None else {"median": timing.median_ms, "p90": timing.p90_ms},
            tokens_per_s=0.0 if timing is None else tokens / (timing.median_ms / 1e3),
            peak_mem_mb=None if peak is None else peak / 2**20,
            state_bytes=state,
            repeats=0 if timing is None else len(timing.samples_ms),
            machine=machine_label,
            weights=(stored or {}).get(arch, ("fp", None))[0],
            weights_bytes=(stored or {}).get(arch, ("fp", None))[1],
            refused=refused.get(arch),
            step_bytes=step,
            roofline=roof,
        ))
    return records


def _refusal(runner: Runner, config: BenchConfig, batch: int, tokens: int) -> str | None:
    """Why a context of ``tokens`` is not run on ``runner`` (None: it is): past --kv-budget, or
    past what the target or the machine's memory holds (check_context, the rule every command asks)."""
    info = runner.info
    state = graph.state_bytes(info.config, info.spec, batch, tokens, info.dtype)
    if config.kv_budget_bytes is not None and info.spec.grows and state > config.kv_budget_bytes:
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
