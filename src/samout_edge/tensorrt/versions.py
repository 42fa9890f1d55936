"""The one TensorRT versions table: every version threshold samout-edge relies on.

lint, plan, build, the CumMax plugin and the engine runner ask this module, never
compare version tuples of their own, so a threshold is stated (and sourced) once.
Sources: TensorRT release notes, onnx-tensorrt docs/Changelog.md and
docs/operators.md per release, and the tensorrt.plugin module's sources.

Also here: strict version parsing (``version_tuple``) and ``import_tensorrt``,
which tells the real module from the ``tensorrt-stubs`` namespace package that
type-checking installs (no ``__version__``, no ``Builder``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from types import ModuleType

from samout_edge.artifact.capabilities import Capabilities, Requirement
from samout_edge.errors import SamoutError, install_hint

Version = tuple[int, int]

OLDEST: Version = (8, 5)  # JetPack 5.1
NEWEST_MAJOR = 11  # 11.x is the newest major this table describes
SUPPORTED = "8.5 to 11.x"

INSTALL_HINT = ("on a Jetson TensorRT comes with JetPack; elsewhere pip install tensorrt on a CUDA machine, "
                f"and {install_hint('tensorrt')} for Polygraphy")
NOT_INSTALLED = "TensorRT is not installed here; `build --dry-run` shows the plan without it (" + INSTALL_HINT + ")"
# What TensorRT computes, as every backend declares it: the build plan and the engine runner ask it.
CAPABILITIES = Capabilities(
    "TensorRT", zero_points=False, gpu=True, engines=True,
    requires=(Requirement("tensorrt", "TensorRT", INSTALL_HINT),
              Requirement("polygraphy", "Polygraphy", install_hint("tensorrt"))),
)


@dataclass(frozen=True)
class Feature:
    """A TensorRT capability: present from ``since`` (inclusive) until ``until`` (exclusive)."""

    name: str
    what: str
    since: Version | None = None  # None: every supported version has it
    until: Version | None = None  # None: still there in the newest

    def available(self, version: str | Version) -> bool:
        v = version if isinstance(version, tuple) else version_tuple(version)
        return (self.since is None or v >= self.since) and (self.until is None or v < self.until)


# Network creation and builder flags.
EXPLICIT_BATCH_REQUIRED = Feature(
    "explicit_batch_required", "networks must be created with NetworkDefinitionCreationFlag.EXPLICIT_BATCH",
    until=(10, 0))
EXPLICIT_BATCH_FLAG = Feature(
    "explicit_batch_flag", "the EXPLICIT_BATCH flag exists (deprecated in 10, removed in 11)", until=(11, 0))
STRONGLY_TYPED = Feature(
    "strongly_typed", "strongly typed networks (NetworkDefinitionCreationFlag.STRONGLY_TYPED, trtexec --stronglyTyped)",
    since=(9, 0))
WEAK_TYPING = Feature(
    "weak_typing", "weakly typed networks: BuilderFlag.FP16/INT8 and calibrators (11 takes precision from the graph)",
    until=(11, 0))
FP16_FLAG_DEPRECATED = Feature("fp16_flag_deprecated", "BuilderFlag.FP16 is deprecated", since=(10, 12))
BUILDER_OPTIMIZATION_LEVEL = Feature(
    "builder_optimization_level", "IBuilderConfig.builder_optimization_level", since=(8, 6))
PROGRESS_MONITOR = Feature("progress_monitor", "IBuilderConfig.progress_monitor (IProgressMonitor)", since=(10, 0))

# trtexec.
TRTEXEC_PROFILES = Feature("trtexec_profiles", "trtexec builds several optimization profiles (--profile=N)",
                           since=(9, 0))
TRTEXEC_SKIP_INFERENCE = Feature("trtexec_skip_inference", "trtexec --skipInference (before: --buildOnly)",
                                 since=(8, 6))

# The ONNX parser.
INT64 = Feature("int64", "INT64 tensors (8.x's parser casts INT64 to INT32; engine inputs are int32)", since=(9, 0))
LOCAL_FUNCTIONS = Feature("local_functions", "the ONNX parser imports model-local functions", since=(9, 0))
CASTLIKE = Feature("castlike", "the ONNX parser has a CastLike importer", since=(9, 1))
# The CumMax local function's body uses CastLike, so the body runs only where both exist.
CUMMAX_FUNCTION_BODY = Feature("cummax_function_body", "the CumMax node's local-function body (the native scan) "
                               "parses: local functions (9.0) and CastLike (9.1)", since=(9, 1))
SLICE_TENSOR_AXES = Feature("slice_tensor_axes", "Slice takes computed (tensor) axes (onnx-tensorrt 10.3 GA)",
                            since=(10, 3))
PAD_TENSOR_AXES = Feature("pad_tensor_axes", "Pad takes computed (tensor) axes (onnx-tensorrt 10.4 GA)",
                          since=(10, 4))

# Quantized weights: DequantizeLinear (`export --weights int8|int4`). From the parser's
# QuantDequantLinearHelper of each release (onnx-tensorrt builtin_op_importers.cpp, from 10.0
# onnxOpImporters.cpp) and docs/operators.md; data/tensorrt_onnx_ops.toml's header has the commits.
DQ_OPTIONAL_ZERO_POINT = Feature(
    "dq_optional_zero_point", "DequantizeLinear without its zero-point input (8.x's importer needs all three; "
    "optional from onnx-tensorrt 9.0 GA)", since=(9, 0))
DQ_HALF_SCALE = Feature(
    "dq_half_scale", "DequantizeLinear with FP16/BF16 scales (8.x reads every scale as FP32; typed from 9.0 GA)",
    since=(9, 0))
DQ_INT4_BLOCKED = Feature(
    "dq_int4_blocked", "DequantizeLinear of INT4 weights with blocked scales (block_size): INT4 weight-only "
    "quantization (onnx-tensorrt 10.0 EA, docs/Changelog.md 'Added support for INT4 quantization'; "
    "9.3 takes only per-axis scales)", since=(10, 0))

# Plugins (tensorrt.plugin, "quickly deployable plugins").
QUICK_PLUGINS = Feature("quick_plugins", "quickly deployable Python plugins (tensorrt.plugin), JIT: "
                        "TensorRT calls back into Python at run time", since=(10, 6))
AOT_PLUGINS = Feature("aot_plugins", "ahead-of-time quickly deployable plugins (tensorrt.plugin.aot_impl): "
                      "the kernel's PTX is baked into the engine", since=(10, 9))
PLUGIN_BEFORE_FUNCTION = Feature(
    "plugin_before_function", "the ONNX parser prefers a registered plugin over a same-named local function "
    "(onnx-tensorrt 10.7 GA); on 10.6 the function body runs even with the plugin registered", since=(10, 7))

FEATURES: tuple[Feature, ...] = (
    EXPLICIT_BATCH_REQUIRED, EXPLICIT_BATCH_FLAG, STRONGLY_TYPED, WEAK_TYPING, FP16_FLAG_DEPRECATED,
    BUILDER_OPTIMIZATION_LEVEL, PROGRESS_MONITOR, TRTEXEC_PROFILES, TRTEXEC_SKIP_INFERENCE, INT64, LOCAL_FUNCTIONS,
    CASTLIKE, CUMMAX_FUNCTION_BODY, SLICE_TENSOR_AXES, PAD_TENSOR_AXES, DQ_OPTIONAL_ZERO_POINT, DQ_HALF_SCALE,
    DQ_INT4_BLOCKED, QUICK_PLUGINS, AOT_PLUGINS, PLUGIN_BEFORE_FUNCTION,
)

# Parser inputs that must be build-time constants, and from when a computed one is fine
# (None: never, per the operators.md of every release in the lint table).
CONSTANT_AXES: dict[str, tuple[int, Feature | None]] = {
    "Slice": (3, SLICE_TENSOR_AXES),
    "Pad": (3, PAD_TENSOR_AXES),
    "Squeeze": (1, None),  # the docs still say "axes must be resolvable to a constant"
    "Unsqueeze": (1, None),
    "ReduceProd": (1, None),
    "ReduceMean": (1, None),
    "ReduceSum": (1, None),
    "ReduceMax": (1, None),
}

_VERSION = re.compile(r"(\d+)\.(\d+)(?:\.\d+){0,2}(?:(?:a|b|rc|\.post|\.dev)\d*)?")


def version_tuple(version: str) -> Version:
    """(major, minor) of a TensorRT version such as '10.3', '10.13.0.35' or '10.0.0b6'.

    Anything else, or a version outside the range this table describes, is a
    SamoutError: a wrong guess here would silently pick wrong build flags.
    """
    match = _VERSION.fullmatch(version.strip()) if isinstance(version, str) else None
    if match is None:
        raise SamoutError(f"not a TensorRT version: {version!r} (expected MAJOR.MINOR, e.g. 10.3; "
                          f"supported: {SUPPORTED})")
    v = int(match.group(1)), int(match.group(2))
    if v < OLDEST or v[0] > NEWEST_MAJOR:
        raise SamoutError(f"TensorRT {version} is outside the supported range {SUPPORTED}")
    return v


def cummax_runner(version: str | Version, has_function: bool = True) -> str:
    """What runs a scan node (CumMax, LinearScan: their function bodies use the same ops,
    CastLike included) of a ``--lowering custom`` export on this TensorRT:
    'aot' or 'jit' (the samout-edge plugin), 'function' (the node's local-function
    body, the native scan), or 'none' (the parser fails: export with --lowering native)."""
    if has_function and CUMMAX_FUNCTION_BODY.available(version) and not PLUGIN_BEFORE_FUNCTION.available(version):
        return "function"  # up to 10.6 the parser takes the function even with the plugin registered
    if AOT_PLUGINS.available(version):
        return "aot"
    if QUICK_PLUGINS.available(version):
        return "jit"
    return "none"


def _is_real(module: ModuleType) -> bool:
    """The stubs' namespace package has neither a version nor the builder."""
    return isinstance(getattr(module, "__version__", None), str) and hasattr(module, "Builder")


def import_tensorrt() -> ModuleType:
    """The real tensorrt module, or one SamoutError saying it is not installed."""
    try:
        import tensorrt
    except Exception:  # not installed, or the registry's download stub failing at import
        raise SamoutError(NOT_INSTALLED) from None
    if not _is_real(tensorrt):
        raise SamoutError(NOT_INSTALLED)
    return tensorrt


def installed_version() -> str | None:
    """The installed TensorRT's version string, or None where there is none (or only stubs)."""
    try:
        return str(import_tensorrt().__version__)
    except SamoutError:
        return None
