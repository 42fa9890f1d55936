"""From an export and a device profile to a TensorRT build plan.

Everything here is pure logic, so it runs and is tested without TensorRT: the
plan holds every setting and shape the build will use, and the equivalent
trtexec command line. tensorrt/build.py carries a plan out with Polygraphy.
Every version rule comes from tensorrt/versions.py (EXPLICIT_BATCH before 10,
strongly typed networks from 9.0, no weak typing in 11, builder optimization
level from 8.6, several trtexec profiles from 9.0, what runs CumMax nodes).
An fp16 export is built strongly typed wherever possible; an fp32 export with an
fp16 profile uses the FP16 builder flag, which only TensorRT before 11 has.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path

from samout_edge.artifact.capabilities import zero_points_refusal
from samout_edge.artifact.engine import (
    ENGINE_FILE,
    ENGINE_JSON,
    ENGINES_DIR,
    OptimizationProfile,
    ShapeRange,
    check_profile_name,
)
from samout_edge.artifact.manifest import MODEL_FILE, Manifest, check_files, read_manifest
from samout_edge.errors import SamoutError
from samout_edge.profiles import DeviceProfile, Range
from samout_edge.tensorrt import versions
from samout_edge.tensorrt.plugin import SCAN_OF_PLUGIN
from samout_edge.tensorrt.versions import Version, version_tuple


@dataclass
class BuildPlan:
    export_dir: str
    onnx: str
    engine: str
    engine_json: str
    profile: str
    arch: str
    export_dtype: str
    tensorrt: str
    tensorrt_source: str  # installed | profile | option
    precision: str  # fp16 | fp32: what the engine computes in
    strongly_typed: bool
    fp16_flag: bool
    explicit_batch_flag: bool
    workspace_bytes: int
    builder_optimization_level: int | None  # None: this TensorRT has no such setting
    timing_cache: str
    dla_core: int | None
    gpu_fallback: bool
    plugins: list[str]  # custom-domain ops in the graph (domain::op)
    cummax: str  # what runs the scan nodes (CumMax, LinearScan): aot | jit (our plugins) | function (the body) | ""
    optimization_profiles: list[OptimizationProfile]
    max_seq: int
    notes: list[str] = field(default_factory=list)
    trtexec: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def default_timing_cache(profile: str, tensorrt: str) -> Path:
    """Timing caches are per device and TensorRT version; they live across builds and exports."""
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "samout-edge" / "timing-cache"
    return root / f"{profile}-trt{tensorrt}.cache"


def _clamp(r: Range, upper: int, lower: int = 1) -> Range:
    hi = max(lower, min(r.max, upper))
    lo = max(lower, min(r.min, hi))
    return Range(lo, min(max(r.opt, lo), hi), hi)


def optimization_profiles(manifest: Manifest, profile: DeviceProfile) -> tuple[list[OptimizationProfile], list[str]]:
    """decode (one token) and prefill (a seq range), with state shapes from export.json,
    clamped so no shape exceeds what the export is correct for."""
    cfg, notes = manifest.config, []
    h, d = cfg.num_heads, cfg.head_dim
    seq = _clamp(profile.prefill.seq, manifest.max_seq)
    if seq.max < profile.prefill.seq.max:
        notes.append(f"prefill seq capped at {seq.max} (the export's max_seq; the profile asks {profile.prefill.seq.max})")
    context = _clamp(profile.decode.context, manifest.max_seq - 1, lower=0)
    states = {t.past: t for t in manifest.spec.states(cfg.num_layers)}
    grows = {name for name, t in states.items() if t.grows}
    if grows and context.max < profile.decode.context.max:
        notes.append(f"decode context capped at {context.max} (max_seq - 1; the profile asks {profile.decode.context.max})")
    result = []
    for name, batch, tokens, past in (
        ("decode", profile.decode.batch, Range(1, 1, 1), context),
        ("prefill", profile.prefill.batch, seq, Range(0, 0, max(0, min(context.max, manifest.max_seq - seq.max)))),
    ):
        shapes = [ShapeRange("input_ids", [batch.min, tokens.min], [batch.opt, tokens.opt], [batch.max, tokens.max])]
        for spec in manifest.inputs[1:]:  # a growing state's past ranges; fixed slots (1, a window W) stay
            t = states[spec.name]
            shapes.append(ShapeRange(spec.name, t.shape(batch.min, h, d, past.min), t.shape(batch.opt, h, d, past.opt),
                                     t.shape(batch.max, h, d, past.max)))
        result.append(OptimizationProfile(name, shapes))
    return result, notes


def custom_ops(model_path: Path) -> list[str]:
    """domain::op of every custom-domain node, read without loading the weights."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    return sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node if n.domain not in ("", "ai.onnx")})


def scan_runner(plugins: list[str], v: Version, tensorrt: str, has_function: bool, notes: list[str]) -> str:
    """What runs the graph's scan nodes (CumMax, LinearScan; one rule for all, versions.cummax_runner),
    noted; "" where there are none. Refuses a TensorRT that cannot run them."""
    ops = [p.split("::", 1)[1] for p in plugins if p in SCAN_OF_PLUGIN]
    if not ops:
        return ""
    nodes = " and ".join(ops) + " nodes"
    runner = versions.cummax_runner(v, has_function=has_function)
    if runner == "aot":
        notes.append(f"{nodes}: the samout-edge plugins, ahead-of-time kernels (no Python at run time)")
    elif runner == "jit":
        notes.append(f"{nodes}: the samout-edge plugins, JIT (TensorRT calls back into Python at run time; "
                     "10.9+ bakes the kernels into the engine)")
    elif runner == "function" and versions.QUICK_PLUGINS.available(v):
        notes.append(f"{nodes} run their local-function body (the native scan): TensorRT {tensorrt}'s "
                     "parser prefers a model-local function over a registered plugin (plugins win from 10.7), "
                     "so the plugins are not registered")
    elif runner == "function":
        notes.append(f"{nodes} run their local-function body (the native scan): the plugins need TensorRT 10.6+")
    else:
        raise SamoutError(
            f"TensorRT {tensorrt} cannot run {nodes} (local functions need 9.0, the bodies' CastLike 9.1, "
            "the plugins 10.6); export with --lowering native"
        )
    return runner


def _tensorrt_version(tensorrt: str | None, profile: DeviceProfile, notes: list[str]) -> tuple[str, str]:
    """The TensorRT to plan for and where it came from: the option, the installed one, else the profile's."""
    installed = versions.installed_version()
    if tensorrt:
        source = "option"
    elif installed:
        tensorrt, source = installed, "installed"
    else:
        tensorrt, source = profile.tensorrt, "profile"
    if source != "installed":
        notes.append(f"TensorRT {tensorrt} assumed ({'--tensorrt' if source == 'option' else 'the profile'}); "
                     "the build uses whatever is installed")
    return tensorrt, source


def _check_dla(profile: DeviceProfile, dla_core: int, precision: str, notes: list[str]) -> None:
    if profile.dla_cores == 0:
        raise SamoutError(f"profile {profile.name} has no DLA cores; drop --dla-core")
    if not 0 <= dla_core < profile.dla_cores:
        raise SamoutError(f"--dla-core must be 0..{profile.dla_cores - 1} on {profile.name}, got {dla_core}")
    if precision != "fp16":
        raise SamoutError("DLA runs fp16 (or int8) only; use --precision fp16")
    notes.append("DLA with GPU fallback: layers DLA cannot run (shape ops, the scan) run on the GPU")


def make_plan(
    export_dir: str | Path,
    profile: DeviceProfile,
    tensorrt: str | None = None,
    precision: str | None = None,
    dla_core: int | None = None,
    timing_cache: str | Path | None = None,
) -> BuildPlan:
    """The whole build, decided: every flag, every shape, for this export, profile and TensorRT."""
    export_dir = Path(export_dir)
    manifest = read_manifest(export_dir)
    check_files(export_dir, manifest)  # a plan for an edited or truncated model.onnx is no plan
    notes: list[str] = []
    tensorrt, source = _tensorrt_version(tensorrt, profile, notes)
    v = version_tuple(tensorrt)

    if manifest.weights.grid == "asymmetric" and not versions.CAPABILITIES.zero_points:
        raise SamoutError(zero_points_refusal(versions.CAPABILITIES.title))
    precision = precision or profile.precision
    if precision not in ("fp16", "fp32"):
        raise SamoutError(f"--precision must be fp16 or fp32, got {precision!r}")
    dtype = manifest.dtype
    if dtype == "fp16" and precision == "fp32":
        raise SamoutError("the export is fp16; an fp32 engine needs an fp32 export (--dtype fp32)")
    strongly_typed = versions.STRONGLY_TYPED.available(v) and (dtype == "fp16" or not versions.WEAK_TYPING.available(v))
    fp16_flag = precision == "fp16" and not strongly_typed
    if not versions.WEAK_TYPING.available(v) and dtype == "fp32" and precision == "fp16":
        raise SamoutError(
            f"TensorRT {tensorrt} takes precision from the graph (no FP16 builder flag): "
            "export with --dtype fp16, or build with --precision fp32"
        )
    if fp16_flag and dtype == "fp32":
        notes.append("fp32 graph built with the FP16 flag (weak typing): TensorRT picks fp16 kernels where it can; "
                     "export with --dtype fp16 for an fp16 graph with LayerNorm kept in fp32")
    if fp16_flag and versions.FP16_FLAG_DEPRECATED.available(v):
        notes.append(f"BuilderFlag.FP16 is deprecated from TensorRT "
                     f"{'.'.join(map(str, versions.FP16_FLAG_DEPRECATED.since or ()))} (removed in 11)")

    if dla_core is not None:
        _check_dla(profile, dla_core, precision, notes)

    plugins = custom_ops(export_dir / MODEL_FILE)
    cummax = scan_runner(plugins, v, tensorrt, manifest.lowering == "custom", notes)
    others = [p for p in plugins if p not in SCAN_OF_PLUGIN]
    if others:
        raise SamoutError(f"the graph has custom nodes no plugin of ours implements: {', '.join(others)}")

    profiles, shape_notes = optimization_profiles(manifest, profile)
    engine_dir = export_dir / ENGINES_DIR / check_profile_name(profile.name)
    plan = BuildPlan(
        export_dir=str(export_dir),
        onnx=str(export_dir / MODEL_FILE),
        engine=str(engine_dir / ENGINE_FILE),
        engine_json=str(engine_dir / ENGINE_JSON),
        profile=profile.name,
        arch=manifest.arch,
        export_dtype=dtype,
        tensorrt=tensorrt,
        tensorrt_source=source,
        precision=precision,
        strongly_typed=strongly_typed,
        fp16_flag=fp16_flag,
        explicit_batch_flag=versions.EXPLICIT_BATCH_REQUIRED.available(v),
        workspace_bytes=profile.workspace_mib * 2**20,
        builder_optimization_level=(profile.builder_optimization_level
                                    if versions.BUILDER_OPTIMIZATION_LEVEL.available(v) else None),
        timing_cache=str(timing_cache or default_timing_cache(profile.name, tensorrt)),
        dla_core=dla_core,
        gpu_fallback=dla_core is not None,
        plugins=plugins,
        cummax=cummax,
        optimization_profiles=profiles,
        max_seq=manifest.max_seq,
        notes=notes + shape_notes,
    )
    plan.trtexec = trtexec_command(plan)
    if not versions.TRTEXEC_PROFILES.available(v):
        plan.notes.append("trtexec before 9.0 builds one optimization profile: its line has prefill's only")
    return plan


def _shapes(shapes: list[ShapeRange], which: str) -> str:
    return ",".join(f"{s.name}:{'x'.join(str(d) for d in getattr(s, which))}" for s in shapes)


def trtexec_command(plan: BuildPlan) -> str:
    """The same build as one trtexec command line, for users who build on the device by hand."""
    v = version_tuple(plan.tensorrt)
    several = versions.TRTEXEC_PROFILES.available(v)
    args = ["trtexec", f"--onnx={plan.onnx}", f"--saveEngine={plan.engine}"]
    profiles = plan.optimization_profiles if several else [p for p in plan.optimization_profiles if p.name == "prefill"]
    for index, prof in enumerate(profiles):
        if several:
            args.append(f"--profile={index}")
        args += [f"--minShapes={_shapes(prof.shapes, 'min')}", f"--optShapes={_shapes(prof.shapes, 'opt')}",
                 f"--maxShapes={_shapes(prof.shapes, 'max')}"]
    if plan.strongly_typed and versions.WEAK_TYPING.available(v):  # 11 has only strongly typed networks
        args.append("--stronglyTyped")
    if plan.fp16_flag:
        args.append("--fp16")
    args.append(f"--memPoolSize=workspace:{plan.workspace_bytes // 2**20}")
    if plan.builder_optimization_level is not None:
        args.append(f"--builderOptimizationLevel={plan.builder_optimization_level}")
    args.append(f"--timingCacheFile={plan.timing_cache}")
    if plan.dla_core is not None:
        args += [f"--useDLACore={plan.dla_core}", "--allowGPUFallback"]
    args.append("--skipInference" if versions.TRTEXEC_SKIP_INFERENCE.available(v) else "--buildOnly")
    line = " ".join(shlex.quote(a) for a in args)
    if plan.cummax in ("aot", "jit"):
        line += ("  # the scan nodes need the samout-edge plugins: build with `samout-edge build` "
                 "(trtexec loads no Python plugins)")
    return line
