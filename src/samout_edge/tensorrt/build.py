"""Build a TensorRT engine from a BuildPlan with Polygraphy's loaders.

Needs TensorRT, Polygraphy (the `[tensorrt]` extra) and a CUDA GPU; no torch
(a Jetson has no CUDA build of it). Every version difference is decided in the
plan (tensorrt/plan.py, from tensorrt/versions.py); this module only carries it
out: NetworkFromOnnxPath (strongly typed flag; Polygraphy itself adds
EXPLICIT_BATCH before TensorRT 10, as the plan says), CreateConfig (FP16 flag,
optimization profiles, workspace limit, builder optimization level, timing cache,
DLA with GPU fallback, progress monitor), EngineBytesFromNetwork (saves the
timing cache). The engine is written atomically to EXPORT/engines/<profile>/
and engine.json is an artifact.engine.EngineMeta. Polygraphy's CreateConfig leaves
TF32 off (its default), so an fp32 engine computes in fp32, as the golden outputs do.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from samout_edge.artifact.engine import (
    ENGINE_FILE,
    ENGINE_JSON,
    ENGINES_DIR,
    EngineMeta,
    OptimizationProfile,
    check_profile_name,
)
from samout_edge.artifact.files import sha256_file, write_bytes_atomic
from samout_edge.errors import SamoutError, install_hint
from samout_edge.progress import Progress, no_progress
from samout_edge.tensorrt import versions
from samout_edge.tensorrt.driver import GpuIdentity, gpu_identity
from samout_edge.tensorrt.plan import BuildPlan

__all__ = ["BuildResult", "GpuIdentity", "build_engine", "engine_paths", "engine_plugins", "gpu_identity",
           "parser_error_message", "read_timing_cache"]

POLYGRAPHY_INSTALL = f"{install_hint('tensorrt')} (Polygraphy)"


@dataclass
class BuildResult:
    engine: Path
    engine_json: Path
    seconds: float
    engine_bytes: int
    meta: dict[str, Any]  # engine.json, as written (engine_meta.to_dict())
    engine_meta: EngineMeta
    notes: list[str] = field(default_factory=list)  # the plan's, and what the build found (e.g. a damaged cache)


def parser_error_message(description: str, node_index: int, node_name: str, node_op: str, graph_nodes: list) -> str:
    """One line naming the failing node and its op. TensorRT 9.1+ reports both;
    8.x reports only the node index, which we look up in the ONNX graph."""
    if not node_name and 0 <= node_index < len(graph_nodes):
        node_name, node_op = graph_nodes[node_index].name, graph_nodes[node_index].op_type
    where = f"node {node_name!r} ({node_op})" if node_name else "the model"
    return f"TensorRT's ONNX parser failed at {where}: {description.strip()}"


def engine_paths(plan: BuildPlan) -> tuple[Path, Path]:
    """(model.engine, engine.json), always EXPORT/engines/<profile>/: a plan edited to
    point elsewhere (or a profile name with a path in it) is refused."""
    engine_dir = Path(plan.export_dir) / ENGINES_DIR / check_profile_name(plan.profile)
    engine, meta = engine_dir / ENGINE_FILE, engine_dir / ENGINE_JSON
    if Path(plan.engine).absolute() != engine.absolute() or Path(plan.engine_json).absolute() != meta.absolute():
        raise SamoutError(f"the plan writes {plan.engine}, but engines live at {engine}; make the plan again")
    return engine, meta


def engine_plugins(plan: BuildPlan) -> list[str]:
    """The plugins the build registers, as engine.json records them: ours for the graph's scan
    ops (CumMax, LinearScan) only where they run the scan nodes (not on 10.6, whose parser takes
    the function body anyway)."""
    from samout_edge.tensorrt.plugin import SCAN_OF_PLUGIN

    return [p for p in plan.plugins if p in SCAN_OF_PLUGIN] if plan.cummax in ("aot", "jit") else []


def read_timing_cache(path: Path) -> tuple[bytes | None, str | None]:
    """The cache's bytes, or (None, why) when there is none to use; a missing file is no news."""
    if not path.exists():
        return None, None
    try:
        data = path.read_bytes()
    except OSError as e:
        return None, f"timing cache {path} is unreadable ({e.strerror or e}); building without it"
    if not data:
        return None, f"timing cache {path} is empty; building without it"
    return data, None


def _set_aside(path: Path) -> str:
    """Move a damaged cache out of the way, so the build saves a fresh one in its place."""
    damaged = path.with_name(path.name + ".damaged")
    try:
        path.replace(damaged)
        return f"; moved to {damaged}"
    except OSError:
        return ""


def usable_timing_cache(path: Path) -> tuple[str | None, str | None]:
    """(path to load, note): a cache TensorRT cannot read (damaged, truncated, or from
    another GPU or TensorRT) is noted and set aside instead of failing the build."""
    data, note = read_timing_cache(path)
    if data is None:
        return None, note
    import tensorrt as trt
    from polygraphy.backend.trt import util as trt_util

    why = "TensorRT refused it"
    try:
        config = trt.Builder(trt_util.get_trt_logger()).create_builder_config()
        cache = config.create_timing_cache(data)
        ok = cache is not None and bool(config.set_timing_cache(cache, False))
    except Exception as e:  # TensorRT raises on a damaged cache
        ok, why = False, f"{type(e).__name__}: {e}"
    if ok:
        return str(path), None
    return None, f"timing cache {path} is damaged or from another GPU/TensorRT ({why}); starting a fresh one{_set_aside(path)}"


def _progress_monitor(progress: Progress) -> Any:
    """TensorRT's IProgressMonitor (10.0+) forwarded to our progress callback, else None."""
    import tensorrt as trt

    if not versions.PROGRESS_MONITOR.available(trt.__version__) or not hasattr(trt, "IProgressMonitor"):
        return None

    class Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.phases: dict[str, int] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            self.phases[phase_name] = num_steps
            progress(f"TensorRT: {phase_name}", 0, num_steps)

        def step_complete(self, phase_name: str, step: int) -> bool:
            progress(f"TensorRT: {phase_name}", step + 1, self.phases.get(phase_name, 0))
            return True  # keep building

        def phase_finish(self, phase_name: str) -> None:
            self.phases.pop(phase_name, None)

    return Monitor()


def _parse_failure(plan: BuildPlan, ptrt: Any) -> str:
    """Parse again with a parser we hold, to name the failing node (Polygraphy only logs it)."""
    import onnx
    import tensorrt as trt
    from polygraphy.backend.trt import util as trt_util

    _, network = ptrt.CreateNetwork(strongly_typed=plan.strongly_typed)()
    parser = trt.OnnxParser(network, trt_util.get_trt_logger())
    if parser.parse_from_file(plan.onnx) and parser.num_errors == 0:
        return "TensorRT's ONNX parser failed (see the log above)"
    nodes = list(onnx.load(plan.onnx, load_external_data=False).graph.node)
    messages = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        name = err.node_name() if hasattr(err, "node_name") else ""
        op = err.node_operator() if hasattr(err, "node_operator") else ""
        messages.append(parser_error_message(err.desc(), err.node(), name, op, nodes))
    if not messages:
        return "TensorRT's ONNX parser failed (see the log above)"
    return messages[0] + (f" (+{len(messages) - 1} more errors)" if len(messages) > 1 else "")


def _polygraphy() -> Any:
    try:
        import polygraphy.backend.trt as ptrt
    except ImportError:
        raise SamoutError(f"building and running TensorRT engines uses Polygraphy: {POLYGRAPHY_INSTALL}") from None
    return ptrt


def build_engine(plan: BuildPlan, progress: Progress = no_progress) -> BuildResult:
    """Carry out a plan: parse, configure, build, write model.engine and engine.json."""
    versions.import_tensorrt()  # the real module, not the stubs' namespace package
    import tensorrt as trt

    if versions.version_tuple(trt.__version__) != versions.version_tuple(plan.tensorrt):
        raise SamoutError(f"the plan is for TensorRT {plan.tensorrt}, but {trt.__version__} is installed; "
                          "drop --tensorrt to plan for the installed one")
    engine_path, json_path = engine_paths(plan)
    ptrt = _polygraphy()
    from polygraphy.exception import PolygraphyException
    from polygraphy.logger import G_LOGGER

    identity = gpu_identity()
    notes = list(plan.notes)
    started = time.perf_counter()
    plugins = engine_plugins(plan)
    if plugins:  # before parsing: the parser looks the plugin up by name
        from samout_edge.tensorrt.plugin import register_plugins

        register_plugins(plugins, trt.__version__)

    progress("parsing model.onnx", 0, 3)
    onnx_sha256 = sha256_file(plan.onnx)  # what engine.json vouches for: the file the parser reads now
    cache_path = Path(plan.timing_cache)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with G_LOGGER.verbosity(G_LOGGER.ERROR):  # Polygraphy's info lines would break our progress display
            load_cache, cache_note = usable_timing_cache(cache_path)
            network = ptrt.NetworkFromOnnxPath(plan.onnx, strongly_typed=plan.strongly_typed)
            config = ptrt.CreateConfig(
                fp16=plan.fp16_flag,
                profiles=[_profile(ptrt, prof) for prof in plan.optimization_profiles],
                memory_pool_limits={trt.MemoryPoolType.WORKSPACE: plan.workspace_bytes},
                builder_optimization_level=plan.builder_optimization_level,
                load_timing_cache=load_cache,
                progress_monitor=_progress_monitor(progress),
                use_dla=plan.dla_core is not None,
                allow_gpu_fallback=plan.gpu_fallback,
            )
            if plan.dla_core is not None:
                config = ptrt.PostprocessConfig(config, _dla_core(plan.dla_core))
            progress("building the engine (minutes on a Jetson)", 1, 3)
            serialized = ptrt.EngineBytesFromNetwork(network, config=config, save_timing_cache=str(cache_path))()
    except PolygraphyException as e:
        if "parse ONNX" in str(e):
            raise SamoutError(_parse_failure(plan, ptrt)) from None
        raise SamoutError(f"TensorRT could not build the engine: {e}") from None
    if cache_note:
        notes.append(cache_note)
    json_path.unlink(missing_ok=True)  # never a new engine beside an old engine.json
    write_bytes_atomic(engine_path, bytes(serialized))
    seconds = time.perf_counter() - started
    meta = EngineMeta(
        tensorrt=str(trt.__version__),
        gpu=identity.gpu,
        compute_capability=identity.compute_capability,
        profile=plan.profile,
        arch=plan.arch,
        precision=plan.precision,
        strongly_typed=plan.strongly_typed,
        dla_core=plan.dla_core,
        optimization_profiles=plan.optimization_profiles,
        plugins=plugins,
        onnx_sha256=onnx_sha256,
        build_seconds=round(seconds, 1),
        plan={**plan.to_dict(), "notes": notes},
    )
    meta.save(json_path)
    progress("built", 3, 3)
    return BuildResult(engine_path, json_path, seconds, engine_path.stat().st_size, meta.to_dict(), meta, notes)


def _profile(ptrt: Any, prof: OptimizationProfile) -> Any:
    profile = ptrt.Profile()
    for s in prof.shapes:
        profile.add(s.name, s.min, s.opt, s.max)
    return profile


def _dla_core(core: int) -> Any:
    """Polygraphy's CreateConfig always picks DLA core 0; set the planned one."""

    def apply(builder: Any, network: Any, config: Any) -> None:
        if builder.num_DLA_cores <= core:
            raise SamoutError(f"this device has {builder.num_DLA_cores} DLA cores; --dla-core {core} does not exist")
        config.DLA_core = core

    return apply
