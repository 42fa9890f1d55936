"""`samout-edge plan`: will the model fit a device, and up to which context?

An estimate, not a measurement: it says how memory scales for each arch so the
two can be compared on a device we may not have. Serving is modelled as a
chunked prefill (chunks of the profile's opt prefill length) and then decode:

- weights: parameters x bytes per element; for an export, the bytes its
  export.json records (``weights.bytes``: the graph's initializers, so int8/int4
  weights count as stored, with their scales)
- runtime: the profile's resident CUDA/TensorRT overhead + builder workspace
- state, double-buffered (a step reads past and writes present):
  cummax 2 x layers x batch x heads x head_dim; softmax 2 x the KV cache,
  2 x layers x batch x heads x context x head_dim
- activations, the larger of one prefill chunk and one decode step:
  ACTIVATION_VALUES hidden-sized values per token (one layer's live tensors:
  projections, the scan's temporaries, FFN, fp32 LayerNorm) plus the last-token
  logits; softmax adds its scores and probabilities, 2 x batch x heads x chunk x
  context, as if unfused (an upper bound; fused attention needs less).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from samout_edge.artifact.arch import ArchSpec, arch_spec
from samout_edge.artifact.config import ModelConfig
from samout_edge.artifact.graph import PREFILL_UBATCH
from samout_edge.artifact.manifest import BENCH_ARCHS, Manifest
from samout_edge.errors import SamoutError
from samout_edge.profiles import DeviceProfile

ACTIVATION_VALUES = 16
BYTES = {"fp16": 2, "fp32": 4}
DEFAULT_CONTEXTS = [1024, 4096, 16384, 65536, 262144, 1048576]
SEARCH_LIMIT = 1 << 26  # 67M tokens: beyond this we call it unbounded


@dataclass
class Breakdown:
    weights: int
    runtime: int
    state: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.runtime + self.state + self.activations


@dataclass
class PlanRow:
    context: int
    archs: dict[str, Breakdown]  # every planned arch at this context
    budget: int

    def fits(self, arch: str) -> bool:
        return self.archs[arch].total <= self.budget


@dataclass
class MemoryPlan:
    profile: str
    config: ModelConfig
    dtype: str
    batch: int
    chunk: int
    budget: int
    rows: list[PlanRow]
    longest: dict[str, int | None]  # None: memory does not bound it
    assumptions: list[str] = field(default_factory=list)
    weights_kind: str = "fp"  # fp | int8 | int4: the export's weights (export.json weights.kind)
    weights_bytes: int = 0  # what the plan counts for the weights

    def to_dict(self) -> dict:
        data = asdict(self)
        data["config"] = self.config.to_dict()
        for row, raw in zip(self.rows, data["rows"]):
            for arch, breakdown in raw.pop("archs").items():  # flat: rows[i][arch]
                raw[arch] = {**breakdown, "total": row.archs[arch].total, "fits": row.fits(arch)}
        return data


def export_weights(manifest: Manifest, dtype: str | None = None) -> tuple[int | None, str]:
    """(bytes, kind) of an export's weights for the plan: the recorded bytes where
    they hold for ``dtype`` (quantized weights keep their integers whatever the
    activations' dtype; float weights only in the export's own dtype), else None."""
    kind, recorded = manifest.weights.kind, manifest.weights.bytes
    if recorded and (kind != "fp" or dtype in (None, manifest.dtype)):
        return int(recorded), kind
    return None, kind


def estimate(config: ModelConfig, spec: ArchSpec, dtype: str, batch: int, context: int, chunk: int,
             profile: DeviceProfile, weights_bytes: int | None = None) -> Breakdown:
    e = BYTES[dtype]
    h, heads, d, layers = config.hidden_size, config.num_heads, config.head_dim, config.num_layers
    weights = config.parameter_count() * e if weights_bytes is None else weights_bytes
    runtime = (profile.runtime_overhead_mib + profile.workspace_mib) * 2**20
    state = 2 * spec.state_bytes(layers, heads, d, batch, context, e)  # the state, and its copy as the next input
    logits = batch * config.vocab_size * e

    def call(tokens: int) -> int:
        acts = ACTIVATION_VALUES * batch * tokens * h * e + logits
        if spec.attends:  # attention over the cache (or the window): the scores
            keys = tokens + spec.window if spec.window else max(context, tokens)
            acts += 2 * batch * heads * tokens * keys * e
        return acts

    return Breakdown(weights, runtime, state, max(call(min(chunk, max(context, 1))), call(1)))


def longest_context(config: ModelConfig, spec: ArchSpec, dtype: str, batch: int, chunk: int, profile: DeviceProfile,
                    weights_bytes: int | None = None) -> int | None:
    """The longest context that fits the budget; None when memory does not bound it."""
    budget = profile.memory_budget_bytes

    def fits(n: int) -> bool:
        return estimate(config, spec, dtype, batch, n, chunk, profile, weights_bytes).total <= budget

    if not fits(1):
        return 0
    if fits(SEARCH_LIMIT):
        return None
    lo, hi = 1, SEARCH_LIMIT  # fits(lo), not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def memory_plan(config: ModelConfig, profile: DeviceProfile, dtype: str | None = None, batch: int = 1,
                contexts: list[int] | None = None, weights_bytes: int | None = None,
                weights_kind: str = "fp", archs: list[str] | None = None, ubatch: int | None = PREFILL_UBATCH) -> MemoryPlan:
    """``weights_bytes``/``weights_kind``: an export's stored weights (``export_weights``);
    None counts parameters x the dtype's size. ``archs``: side by side (default: cummax, softmax), by
    name as the user gives them (decoded here once; the plan's rows are keyed by each spec's name).
    ``ubatch``: the most tokens a prefill call takes (runtime/base.py); None: the profile's opt length."""
    specs = [arch_spec(a) for a in archs or BENCH_ARCHS]
    dtype = dtype or profile.precision
    if weights_bytes is not None and weights_bytes < 1:
        raise SamoutError(f"weights bytes must be positive, got {weights_bytes}")
    if batch < 1:
        raise SamoutError(f"--batch must be at least 1, got {batch}")
    if contexts is not None and (not contexts or any(n < 1 for n in contexts)):
        raise SamoutError(f"--contexts needs positive lengths, got {contexts}")
    if ubatch is not None and ubatch < 1:
        raise SamoutError(f"--ubatch must be at least 1 token, got {ubatch}")
    chunk = min(profile.prefill.seq.opt, ubatch or profile.prefill.seq.opt)
    contexts = contexts or DEFAULT_CONTEXTS
    rows = [
        PlanRow(n, {s.name: estimate(config, s, dtype, batch, n, chunk, profile, weights_bytes) for s in specs},
                profile.memory_budget_bytes)
        for n in contexts
    ]
    return MemoryPlan(
        profile=profile.name,
        config=config,
        dtype=dtype,
        batch=batch,
        chunk=chunk,
        budget=profile.memory_budget_bytes,
        rows=rows,
        longest={s.name: longest_context(config, s, dtype, batch, chunk, profile, weights_bytes) for s in specs},
        weights_kind=weights_kind,
        weights_bytes=next(iter(rows[0].archs.values())).weights if rows else config.parameter_count() * BYTES[dtype],
        assumptions=[
            (f"weights: {weights_kind} as stored in model.onnx ({weights_bytes / 2**20:.1f} MiB"
             + (" with scales)" if weights_kind != "fp" else ")")
             if weights_bytes is not None else f"weights: {config.parameter_count():,} parameters x {BYTES[dtype]} bytes"),
            f"chunked prefill of {chunk} tokens (the smaller of the profile's opt prefill length and --ubatch), "
            "then decode",
            f"activations: {ACTIVATION_VALUES} hidden-sized values per token per call, plus last-token logits",
            "softmax scores as if unfused (upper bound), over the window where there is one; state "
            "double-buffered (past in, present out)",
            f"runtime: {profile.runtime_overhead_mib} MiB resident overhead + {profile.workspace_mib} MiB workspace",
        ],
    )
