"""Build a TensorRT engine from a BuildPlan, with TensorRT's Python API.

Needs TensorRT and a CUDA GPU. Every version difference is decided in the plan
(exporter/build.py); this module only carries it out, naming optional API
members by name and checking they exist, as Polygraphy does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from samout_edge.artifact.files import sha256_file, write_bytes_atomic, write_json_atomic
from samout_edge.errors import SamoutError
from samout_edge.progress import Progress, no_progress
from samout_edge.artifact.engine import ENGINE_SCHEMA_VERSION
from samout_edge.tensorrt.plan import BuildPlan, version_tuple


@dataclass
class BuildResult:
    engine: Path
    engine_json: Path
    seconds: float
    engine_bytes: int
    meta: dict


def parser_error_message(description: str, node_index: int, node_name: str, node_op: str, graph_nodes: list) -> str:
    """One line naming the failing node and its op. TensorRT 9.1+ reports both;
    8.x reports only the node index, which we look up in the ONNX graph."""
    if not node_name and 0 <= node_index < len(graph_nodes):
        node_name, node_op = graph_nodes[node_index].name, graph_nodes[node_index].op_type
    where = f"node {node_name!r} ({node_op})" if node_name else "the model"
    return f"TensorRT's ONNX parser failed at {where}: {description.strip()}"


def gpu_identity() -> dict:
    import torch

    if not torch.cuda.is_available():
        raise SamoutError("building or running a TensorRT engine needs a CUDA GPU; torch sees none here")
    props = torch.cuda.get_device_properties(0)
    return {"gpu": props.name, "compute_capability": f"{props.major}.{props.minor}"}


def _logger(trt):
    class Logger(trt.ILogger):
        """Keeps errors for our message; shows nothing below warnings."""

        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(msg)

    return Logger()


def _progress_monitor(trt, progress: Progress):
    """TensorRT 10's IProgressMonitor, forwarded to our progress callback (None before 10)."""
    if not hasattr(trt, "IProgressMonitor"):
        return None

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.phases: dict[str, tuple[int, int]] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.phases[phase_name] = (0, num_steps)
            progress(f"TensorRT: {phase_name}", 0, num_steps)

        def step_complete(self, phase_name, step):
            _, total = self.phases.get(phase_name, (0, 0))
            progress(f"TensorRT: {phase_name}", step + 1, total)
            return True  # keep building

        def phase_finish(self, phase_name):
            self.phases.pop(phase_name, None)

    return Monitor()


def build_engine(plan: BuildPlan, progress: Progress = no_progress) -> BuildResult:
    try:
        import tensorrt as trt
    except Exception:
        raise SamoutError(
            "TensorRT is not installed here; `build --dry-run` shows the plan without it "
            "(on a Jetson it comes with JetPack; elsewhere pip install tensorrt on a CUDA machine)"
        ) from None
    if version_tuple(trt.__version__) != version_tuple(plan.tensorrt):
        raise SamoutError(f"the plan is for TensorRT {plan.tensorrt}, but {trt.__version__} is installed; "
                          "drop --tensorrt to plan for the installed one")
    import onnx

    identity = gpu_identity()
    started = time.perf_counter()
    logger = _logger(trt)
    trt.init_libnvinfer_plugins(logger, "")
    if plan.plugins:
        from samout_edge.tensorrt.plugin import plugin_supported, register_cummax_plugin

        if plugin_supported(trt.__version__):  # else the parser runs the function body
            register_cummax_plugin(trt.__version__)

    progress("parsing model.onnx", 0, 3)
    builder = trt.Builder(logger)
    flag = trt.NetworkDefinitionCreationFlag
    flags = 0
    if plan.explicit_batch_flag:
        flags |= 1 << int(flag.EXPLICIT_BATCH)
    if plan.strongly_typed and hasattr(flag, "STRONGLY_TYPED"):
        flags |= 1 << int(flag.STRONGLY_TYPED)
    if plan.plugins and hasattr(flag, "PREFER_AOT_PYTHON_PLUGINS"):
        flags |= 1 << int(flag.PREFER_AOT_PYTHON_PLUGINS)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(plan.onnx):
        graph_nodes = list(onnx.load(plan.onnx, load_external_data=False).graph.node)
        messages = []
        for i in range(parser.num_errors):
            err = parser.get_error(i)
            name = err.node_name() if hasattr(err, "node_name") else ""
            op = err.node_operator() if hasattr(err, "node_operator") else ""
            messages.append(parser_error_message(err.desc(), err.node(), name, op, graph_nodes))
        raise SamoutError(messages[0] + (f" (+{len(messages) - 1} more errors)" if len(messages) > 1 else ""))

    progress("configuring the builder", 1, 3)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_bytes)
    if plan.fp16_flag:
        config.set_flag(trt.BuilderFlag.FP16)
    if plan.builder_optimization_level is not None:
        config.builder_optimization_level = plan.builder_optimization_level
    if plan.dla_core is not None:
        if builder.num_DLA_cores <= plan.dla_core:
            raise SamoutError(f"this device has {builder.num_DLA_cores} DLA cores; --dla-core {plan.dla_core} does not exist")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = plan.dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    cache_path = Path(plan.timing_cache)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    if not config.set_timing_cache(cache, False):  # another GPU's cache, or a damaged file: start afresh
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)
    for prof in plan.optimization_profiles:
        profile = builder.create_optimization_profile()
        for s in prof.shapes:
            profile.set_shape(s.name, s.min, s.opt, s.max)
        config.add_optimization_profile(profile)
    monitor = _progress_monitor(trt, progress)
    if monitor is not None:
        config.progress_monitor = monitor

    progress("building the engine (minutes on a Jetson)", 2, 3)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        detail = logger.errors[-1] if logger.errors else "no error was logged"
        raise SamoutError(f"TensorRT could not build the engine: {detail}")
    engine_path, json_path = Path(plan.engine), Path(plan.engine_json)
    write_bytes_atomic(engine_path, bytes(serialized))
    timing = config.get_timing_cache()
    if timing is not None:
        write_bytes_atomic(cache_path, bytes(timing.serialize()))
    seconds = time.perf_counter() - started
    meta = engine_meta(plan, trt.__version__, identity, seconds)
    write_json_atomic(json_path, meta)
    progress("built", 3, 3)
    return BuildResult(engine_path, json_path, seconds, engine_path.stat().st_size, meta)


def engine_meta(plan: BuildPlan, tensorrt_version: str, identity: dict, seconds: float) -> dict:
    """engine.json: what a runner checks before it trusts the engine."""
    return {
        "schema_version": ENGINE_SCHEMA_VERSION,
        "tensorrt": tensorrt_version,
        "gpu": identity["gpu"],
        "compute_capability": identity["compute_capability"],
        "profile": plan.profile,
        "arch": plan.arch,
        "precision": plan.precision,
        "strongly_typed": plan.strongly_typed,
        "dla_core": plan.dla_core,
        "optimization_profiles": [
            {"name": p.name, "shapes": {s.name: {"min": s.min, "opt": s.opt, "max": s.max} for s in p.shapes}}
            for p in plan.optimization_profiles
        ],
        "plugins": plan.plugins,
        "onnx_sha256": sha256_file(plan.onnx),
        "build_seconds": round(seconds, 1),
        "plan": plan.to_dict(),
    }
