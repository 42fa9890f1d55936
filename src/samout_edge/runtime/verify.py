"""Check an export, or an engine built from it, before anyone trusts it.

Needs only numpy and a runtime (the device side): the reference is the golden
PyTorch fp32 outputs the export carries (artifact/golden.py). Where torch and
the source checkpoint are present, ``lengths`` or ``checkpoint`` recompute the
reference with PyTorch at any length instead.

1. every file export.json lists has its recorded sha256;
2. every scan of the exported graph, cut out of it, equals its definition
   (scans.py) at every call length up to 16, both sides of the block, max_seq - 1
   and max_seq: a running max bit for bit (max is exact, so any difference is a
   bug; numpy's ``maximum.accumulate`` here, ``torch.cummax`` in the tests), the
   linear recurrence within its stated tolerance of a float64 loop;
3. every golden case: prefill at 1, a prime and max_seq, batch 2, ids 0 and
   vocab-1, and a prefill followed by decode steps that feed the runner's own
   state back.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx.inliner

from samout_edge import lowering as low
from samout_edge import scan_checks
from samout_edge import scans as sc
from samout_edge.artifact import graph
from samout_edge.artifact.golden import (
    DECODE_PREFILL,
    DECODE_STEPS,
    GoldenIndex,
    chain_lengths,
    every_id_chunks,
    every_id_name,
    every_id_row_bytes,
    golden_ids,
    golden_lengths,
    load_golden,
)
from samout_edge.artifact.manifest import MODEL_FILE, Manifest, check_files, read_manifest, stated_alpha
from samout_edge.errors import SamoutError, require_torch
from samout_edge.progress import Progress, no_progress
from samout_edge.runtime.base import check_context
from samout_edge.runtime.compare import (
    OutputError,
    agreement,
    compare_arrays,
    compare_decode,
    compare_prefill,
)
from samout_edge.runtime.registry import Settings
from samout_edge.runtime.target import engine_of, open_runner, resolve_target

# The tolerance, relative to each output's scale, lives with the weights' type (artifact/quantization.py).


@dataclass
class VerifyResult:
    passed: bool
    rtol: float
    lengths: list[int]
    op_exact: bool
    reference: str  # "golden" | "pytorch"
    checks: list[OutputError] = field(default_factory=list)
    op_checks: list[dict] = field(default_factory=list)
    provider: str = "CPUExecutionProvider"
    skipped: list[str] = field(default_factory=list)  # outputs the golden files do not hold
    seconds: float = 0.0
    fp16_arithmetic: str | None = None  # an fp16 export: how its golden cases ran computed in fp16

    def to_dict(self) -> dict:
        data = asdict(self)
        data["rule"] = "max_abs_err <= rtol * max(1, max|reference|), reference = PyTorch fp32"
        return data

    @property
    def worst(self) -> dict[str, float]:
        """Largest error per output group over all checks."""
        out: dict[str, float] = {}
        for c in self.checks:
            out[c.output] = max(out.get(c.output, 0.0), c.max_abs_err)
        return out


def bit_equal(a: np.ndarray, b: np.ndarray) -> bool:
    """Same shape and the same bits (so -0.0 != 0.0 and NaN payloads count)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    as_int = {2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize]
    return bool(np.array_equal(a.view(as_int), b.view(as_int)))


def op_lengths(manifest: Manifest, lengths: list[int]) -> list[int]:
    """One call's lengths the scans are checked at: ``lengths``, every short call and both
    sides of the block (chain_lengths), max_seq - 1 and max_seq; longer ones are chunked."""
    plan = low.ScanPlan(**manifest.scan)
    wanted = set(lengths) | set(chain_lengths(manifest.max_seq, plan.block)) | {manifest.max_seq - 1, manifest.max_seq}
    return sorted({min(n, plan.max_len) for n in wanted if n >= 1})


def check_op(manifest: Manifest, lengths: list[int], export_dir: Path | None = None) -> tuple[bool, list[dict]]:
    """Every scan of the exported graph, cut out of it (its recorded sites), must equal its
    definition on its axis at every length of ``op_lengths``: a row's ``exact`` is bit for bit
    for max, and within the scan's tolerance (the row's ``tolerance``, its ``error`` relative to
    max(1, |h|)) for the linear recurrence. A graph exported before the sites were recorded gets
    a fresh copy of the op instead, and its rows say so."""
    import onnxruntime as ort

    from samout_edge.runtime.ort_runner import quiet_onnxruntime

    quiet_onnxruntime()
    lengths = op_lengths(manifest, lengths)
    cfg = manifest.config
    np_dtype = graph.numpy_dtype(manifest.dtype)
    rng = np.random.default_rng(1)
    rows = []
    for where, axis, scan, model in _scans(manifest, export_dir):
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        x_type = session.get_inputs()[0].type
        dtype = np.float16 if "float16" in x_type else np.float32 if "float" in x_type else np_dtype
        for length in lengths:
            xs = scan.sample(rng, (1, cfg.num_heads, length, cfg.head_dim), dtype)
            row = {"scan": where, "axis": axis, "seq": length}
            try:
                got = session.run(None, {i.name: x for i, x in zip(session.get_inputs(), xs)})[0]
                row |= scan_matches(scan, xs, got, axis)
            except Exception as e:  # onnxruntime raises its own types: a scan that cannot run is not exact
                row |= {"exact": False, "scan": f"{where} ({type(e).__name__}: {str(e).splitlines()[0][:80]})"}
            rows.append(row)
    return bool(rows) and all(r["exact"] for r in rows), rows


def scan_matches(scan: sc.Scan, xs: tuple[np.ndarray, ...], got: np.ndarray, axis: int) -> dict:
    """Whether ``got`` is the scan of ``xs``: bit for bit for an exact scan (max), else within
    its tolerance for the dtype, relative to max(1, |reference|) (a float64 loop of its definition)."""
    if scan.exact:
        return {"exact": bit_equal(got, scan.reference(xs, axis))}
    want = scan.reference(xs, axis)
    error = float(np.abs(got.astype(np.float64) - want).max()) / max(1.0, float(np.abs(want).max()))
    tolerance = scan.tolerance["fp16" if got.dtype == np.float16 else "fp32"]
    return {"exact": bool(error <= tolerance), "error": error, "tolerance": tolerance}


def _scans(manifest: Manifest, export_dir: Path | None):
    """(label, axis, scan, one-scan model) for every scan to check: the graph's own where it
    records its sites, else a fresh copy of the cummax op on both axes."""
    if export_dir is not None:
        model = onnx.load(str(export_dir / MODEL_FILE), load_external_data=False)
        try:
            sites = scan_checks.read_sites(model)
        except ValueError as e:
            raise SamoutError(f"{export_dir / MODEL_FILE}: {e}") from None
        if sites is not None:
            if not sites:
                raise SamoutError(f"{export_dir / MODEL_FILE} records no scan, but every arch's graph has them")
            for k, site in enumerate(sites):
                try:
                    scan = scan_checks.scan_model(model, site)
                except ValueError as e:
                    raise SamoutError(f"{export_dir / MODEL_FILE}: scan {k}: {e}") from None
                yield f"graph scan {k} ({site.y})", site.axis, sc.scan(site.scan), scan
            return
    plan = low.ScanPlan(**manifest.scan)
    static = manifest.config.num_heads if manifest.lowering == "native" else None
    lowering = "custom" if manifest.lowering == "inlined" else manifest.lowering
    for axis, static_len in ((2, None), (1, static)):
        model = low.standalone_model(lowering, plan, axis, manifest.dtype, opset=manifest.opset, static_len=static_len)
        if manifest.lowering == "inlined":  # the custom node's body, inlined as `samout-edge inline` does
            model = onnx.inliner.inline_local_functions(model)
        yield ("a fresh copy of the op (the graph records no scan sites: exported before they were)", axis,
               sc.SCANS["max"], model)


def verify(
    directory: str | Path,
    provider: str = "cpu",
    lengths: list[int] | None = None,
    engine: str | None = None,
    checkpoint: str | Path | None = None,
    progress: Progress = no_progress,
    fp16_seconds: float = 20.0,
    backend: str = "auto",
    settings: Settings | None = None,
) -> VerifyResult:
    """Verify the export in ``directory`` on ``backend`` (auto: ONNX Runtime, or a TensorRT
    engine of it: ``directory`` an engine dir, or ``engine`` a profile name). An fp16
    export is also computed in fp16 (onnx.reference) within ``fp16_seconds`` (0: not),
    unless the runner computes in fp16 itself (an engine, a GPU provider)."""
    started = time.perf_counter()
    target = resolve_target(directory, engine or engine_of(settings))
    if target.kind == "checkpoint":
        raise SamoutError(f"{directory} is a checkpoint; verify checks an export (or an engine built from one)")
    export_dir = target.export_dir
    manifest = read_manifest(export_dir)
    progress("checking file hashes", 0, 1)
    check_files(export_dir, manifest)
    recompute = bool(lengths) or checkpoint is not None
    if not recompute and manifest.golden is None:
        raise SamoutError(f"{export_dir} carries no golden outputs; verify with --checkpoint (needs torch)")
    actual = open_runner(target, backend, settings or Settings(provider=provider))
    actual.ubatch = None  # verify checks the graph: calls as long as it takes (past max_seq, chunks of max_seq)
    with actual:
        # a coarser runner says so; int8 activations: the bound of the kernel family the runner computes with
        rtol = max(manifest.weights.rtol(manifest.dtype, actual.info.kernel_family), actual.info.rtol or 0.0)
        if recompute:
            result = _against_pytorch(actual, export_dir, manifest, lengths, checkpoint, rtol, progress)
        else:
            result = _against_golden(actual, export_dir, manifest, rtol, progress)
        computes_fp16 = actual.info.computes_fp16
    if manifest.dtype == "fp16" and computes_fp16:
        result.fp16_arithmetic = f"{actual.info.backend} on {actual.info.device}: it computes fp16 in fp16 itself"
    elif manifest.dtype == "fp16" and fp16_seconds > 0 and manifest.golden is not None:
        _fp16_arithmetic(result, export_dir, manifest, rtol, fp16_seconds, progress)
    result.seconds = time.perf_counter() - started
    return result


def _fp16_arithmetic(result: VerifyResult, export_dir: Path, manifest: Manifest, rtol: float, seconds: float,
                     progress: Progress) -> None:
    """An fp16 export's golden cases once more in onnx.reference, which computes in fp16 as
    the device does (ONNX Runtime's CPU provider computed in fp32): an overflow shows here.
    Cases run in order while their estimated time fits ``seconds``; the rest are listed."""
    from samout_edge.runtime.reference_runner import estimated_seconds, load_reference_runner

    try:
        runner = load_reference_runner(export_dir)
    except SamoutError as e:  # ONNX Runtime's own ops (matmulnbits weights): checked in PyTorch fp16 at export
        result.fp16_arithmetic = f"not computed: {e}"
        return
    golden = load_golden(export_dir, GoldenIndex.from_dict(manifest.golden))
    left, ran, states = seconds, 0, {}
    runner.ubatch = None
    with runner:
        for i, (case, feed, want) in enumerate(zip(golden.index.cases, golden.feeds, golden.outputs)):
            cost = estimated_seconds(manifest, case.batch, case.seq)
            if cost > left or (case.state_from is not None and case.state_from not in states):
                result.skipped.append(f"fp16 arithmetic: {case.name} (about {cost:.0f} s in onnx.reference, over "
                                      f"the {seconds:g} s budget)")
                continue
            progress(f"fp16 arithmetic (onnx.reference): {case.name}", i, len(golden.index.cases))
            left -= cost
            state = states[case.state_from] if case.state_from is not None else \
                {k: v for k, v in feed.items() if k != graph.INPUT_IDS}
            try:
                logits, new_state = runner.run(feed[graph.INPUT_IDS], state)
            except SamoutError as e:  # a state an overflow poisoned the call before: this case fails
                result.checks.append(OutputError(f"fp16 arithmetic: {case.name}", "the call", float("inf"), 0.0, 0.0,
                                                 False, str(e)))
                continue
            states[i] = new_state
            got = {graph.LOGITS: logits, **{name: new_state[past] for name, past in
                                            graph.present_to_past(manifest.spec, manifest.config.num_layers).items()}}
            result.checks += compare_arrays(f"fp16 arithmetic: {case.name}", want, got, rtol)
            ran += 1
    result.fp16_arithmetic = f"onnx.reference, {ran} of {len(golden.index.cases)} golden cases"
    result.passed = result.passed and all(c.passed for c in result.checks)


def _op_result(manifest: Manifest, lengths: list[int], rtol: float, provider: str, reference: str,
               export_dir: Path | None = None) -> VerifyResult:
    op_exact, op_rows = check_op(manifest, lengths, export_dir)
    return VerifyResult(False, rtol, lengths, op_exact, reference, op_checks=op_rows, provider=provider)


def _against_golden(actual, export_dir: Path, manifest: Manifest, rtol: float, progress: Progress) -> VerifyResult:
    # int8 activations: the outputs of the kernel family the runner computes with (x86's where the export
    # has none other: every float export, and int8-compute exports made before they were recorded)
    family = actual.info.kernel_family if manifest.weights.activations == "int8" else "x86"
    golden = load_golden(export_dir, GoldenIndex.from_dict(manifest.golden), family)
    context = actual.info.max_context  # a softmax engine's profiles; cummax takes any context
    max_batch = actual.info.max_batch
    cases = golden.index.cases
    steps = len(cases) + 1
    lengths = sorted({c.seq for c in cases if c.past == 0})
    progress("the graph's scans, against their definitions", 0, steps)
    result = _op_result(manifest, lengths, rtol, actual.info.device, "golden", export_dir)
    results: dict[int, dict] = {}
    compared: list[tuple[dict, dict]] = []  # (golden, got) of every case that ran
    for i, (case, feed, want) in enumerate(zip(cases, golden.feeds, golden.outputs), start=1):
        progress(case.name, i, steps)
        if context is not None and case.seq + case.past > context:
            result.skipped.append(f"{case.name}: outside the engine's shapes")
            continue
        state = {k: v for k, v in feed.items() if k != graph.INPUT_IDS}
        if case.state_from is not None:
            if case.state_from not in results:
                continue  # its first step was outside the engine's shapes
            state = results[case.state_from]
        try:
            logits, new_state = run_rows(actual, feed[graph.INPUT_IDS], state, max_batch)
        except SamoutError as e:  # e.g. a state the step before poisoned: this case fails, verify goes on
            result.checks.append(OutputError(case.name, "the call", float("inf"), 0.0, 0.0, False, str(e)))
            continue
        results[i - 1] = new_state
        got = {graph.LOGITS: actual.to_numpy(logits)}
        got |= {name: actual.to_numpy(new_state[past]) for name, past in
                graph.present_to_past(manifest.spec, manifest.config.num_layers).items()}
        result.checks += compare_arrays(case.name, want, got, rtol)
        compared.append((want, got))
        result.skipped += [f"{case.name}: {name} (not recorded)" for name in case.skipped]
    if manifest.weights.activations == "int8":
        result.checks += distribution_checks(manifest, actual.info.kernel_family, compared)
    result.passed = result.op_exact and bool(result.checks) and all(c.passed for c in result.checks)
    progress("verified", steps, steps)
    return result


FAMILY_LABELS = {"x86": "x86 kernels", "arm": "ARM kernels, int8 dot product", "fp": "fp32: no int8 dot product"}


def distribution_checks(manifest: Manifest, family: str, compared: list[tuple[dict, dict]]) -> list[OutputError]:
    """int8 activations: besides each output's largest error, what a fault moves and a flipped
    rounding does not: the logits' mean, median and worst row's KL and top-1 disagreement over every golden case,
    against the bounds the export derived for the kernel ``family`` from emulations alone."""
    bounds = manifest.weights.bounds(family)
    if family not in (manifest.weights.activation_bounds or {}):  # an export older than these bounds
        family += ": the ceilings, exported before this family's bounds were recorded"
    agree = agreement([want for want, _ in compared], [got for _, got in compared])
    disagree = 1.0 - agree.top1
    where = f"all golden cases ({agree.rows} rows, {FAMILY_LABELS.get(family, family)})"
    rows = {"logits: mean KL": (agree.kl, "kl"), "logits: median KL": (agree.median_kl, "median_kl"),
            "logits: worst row's KL": (agree.max_kl, "max_kl"), "logits: top-1 disagreement": (disagree, "disagree")}
    return [OutputError(where, output, value, 0.0, bounds[key], value <= bounds[key])
            for output, (value, key) in rows.items()]


def run_rows(runner, ids: np.ndarray, state: dict, max_batch: int | None):
    """``runner.run``, in slices of at most ``max_batch`` rows where the runner takes no
    more (an engine's profiles): rows are independent, so the slices' outputs, put back
    together on the host, are the whole call's."""
    if max_batch is None or ids.shape[0] <= max_batch:
        return runner.run(ids, state)
    host = runner.host_state(state)
    logits, states = [], []
    for start in range(0, ids.shape[0], max_batch):
        rows = slice(start, start + max_batch)
        part_logits, part_state = runner.run(ids[rows], {k: v[rows] for k, v in host.items()})
        logits.append(runner.to_numpy(part_logits))
        states.append(runner.host_state(part_state))
    return np.concatenate(logits), {k: np.concatenate([s[k] for s in states]) for k in states[0]}


def _against_pytorch(actual, export_dir: Path, manifest: Manifest, lengths: list[int] | None,
                     checkpoint: str | Path | None, rtol: float, progress: Progress) -> VerifyResult:
    require_torch("verify --lengths/--checkpoint (recomputing with PyTorch)")
    from samout_edge.models.quantize import activation_rounding

    with activation_rounding(actual.info.kernel_family):  # int8 compute: PyTorch as the runner's kernels round
        return _recomputed(actual, export_dir, manifest, lengths, checkpoint, rtol, progress)


def _recomputed(actual, export_dir: Path, manifest: Manifest, lengths: list[int] | None,
                checkpoint: str | Path | None, rtol: float, progress: Progress) -> VerifyResult:
    from samout_edge.models.checkpoint import source_checkpoint
    from samout_edge.runtime.torch_runner import load_torch_runner

    limit = actual.info.max_seq or manifest.max_seq
    if lengths:
        if min(lengths) < 1:
            raise SamoutError(f"--lengths must be positive, got {min(lengths)}")
        lengths = sorted(set(lengths))  # past max_seq the runner feeds chunks: checked against PyTorch whole
        for n in lengths:
            check_context(actual.info, n, 2 if n <= 128 else 1, f"verify at seq {n}")
    else:
        lengths = golden_lengths(limit, manifest.trace["seq"])
    steps = len(lengths) + 2
    progress("the graph's scans, against their definitions", 0, steps)
    result = _op_result(manifest, lengths, rtol, actual.info.device, "pytorch", export_dir)
    ckpt = source_checkpoint(export_dir, manifest, checkpoint)
    reference = load_torch_runner(ckpt, manifest.spec, "fp32", manifest.logits, export_dir=export_dir,
                                  alpha=stated_alpha(manifest))
    reference.ubatch = None  # PyTorch whole: the definition the runner's calls (and chunks) are checked against
    rng = np.random.default_rng(0)
    vocab = manifest.config.vocab_size
    small_batch = min(2, actual.info.max_batch or 2)
    for i, length in enumerate(lengths, start=1):
        batch = small_batch if length <= 128 else 1
        progress(f"prefill seq={length}", i, steps)
        ids = golden_ids(rng, vocab, batch, length)
        result.checks += compare_prefill(reference, actual, ids, rtol, f"prefill {batch}x{length}")
    prefill = max(1, min(DECODE_PREFILL, limit - DECODE_STEPS))
    total = min(limit, prefill + DECODE_STEPS)
    progress(f"decode {prefill}+{total - prefill}", steps - 1, steps)
    if total > prefill:
        ids = golden_ids(rng, vocab, small_batch, total)
        check = f"decode {small_batch}x({prefill}+{total - prefill})"
        result.checks += compare_decode(reference, actual, ids, prefill, rtol, check)
    for chunk in every_id_chunks(vocab, *every_id_row_bytes(manifest.config, manifest.spec)):  # every id: nothing is kept
        ids = chunk[:, None]
        ref_logits, ref_state = reference.run(ids, reference.initial_state(len(ids)))
        got_logits, got_state = run_rows(actual, ids, actual.initial_state(len(ids)), actual.info.max_batch)
        want = {"logits": reference.to_numpy(ref_logits), **{k: reference.to_numpy(v) for k, v in ref_state.items()}}
        got = {"logits": actual.to_numpy(got_logits), **{k: actual.to_numpy(v) for k, v in got_state.items()}}
        result.checks += compare_arrays(every_id_name(chunk), want, got, rtol)
    result.passed = result.op_exact and all(c.passed for c in result.checks)
    progress("verified", steps, steps)
    return result
