"""export.json: what an artifact directory holds, so later steps need nothing else.

Every step after export (verify, build, bench, generate) reads only the artifact
directory, so it can run on another machine than the export did.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from samout_edge.artifact.arch import ArchSpec, Blend, arch_spec
from samout_edge.artifact.config import ModelConfig
from samout_edge.artifact.files import (
    read_json,
    recorded_files,
    safe_relative,
    sha256_file,
    write_json_atomic,
)
from samout_edge.artifact.graph import EXPORT_DTYPES, INPUT_IDS, LOGITS, TensorSpec
from samout_edge.artifact.quantization import Weights
from samout_edge.errors import SamoutError

SCHEMA_VERSION = 2
PRODUCER = "samout-edge"
MANIFEST_FILE = "export.json"
MODEL_FILE = "model.onnx"
CHECKPOINT_DIR = "checkpoint"
GOLDEN_DIR = "golden"
MAX_MANIFEST_BYTES = 16 << 20
@dataclass
class Manifest:
    arch: str
    lowering: str
    scan: dict[str, Any]  # the ScanPlan: scan, max_len, block
    opset: int
    dtype: str
    logits: str
    max_seq: int
    config: ModelConfig
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    files: dict[str, dict[str, Any]]  # name -> {sha256, bytes}
    source: dict[str, Any]  # {kind: preset|checkpoint, path, sha256, ...}
    trace: dict[str, int]  # batch and seq of the example inputs torch.export traced
    tools: dict[str, str]
    verification: dict[str, Any] | None = None
    golden: dict[str, Any] | None = None  # golden.GoldenIndex as a dict: what golden/ holds
    schema_version: int = SCHEMA_VERSION
    producer: str = PRODUCER
    exporter: str = "torch.export"
    extra: dict[str, Any] = field(default_factory=dict)
    weights: Weights = field(default_factory=Weights)  # how they are stored (artifact/quantization.py)
    # fp16 exports: the fp32 islands that keep fp16 arithmetic in range, the calibrated
    # peaks they were chosen from, and the PyTorch fp16 check (exporter/precision.py)
    precision: dict[str, Any] | None = None
    # what `eval --record` measured on held-out text: one entry per text, mode and window
    quality: list[dict[str, Any]] = field(default_factory=list)
    # a hybrid's blend, alpha per layer and where it came from (older exports: in extra)
    blend: Blend | None = None

    @property
    def spec(self) -> ArchSpec:
        """The arch, decoded: what the library passes on (export.json keeps its name, ``arch``).
        Decoded once per name (arch_spec keeps what it decoded)."""
        return arch_spec(self.arch)

    @property
    def state_inputs(self) -> list[str]:
        return [t.name for t in self.inputs if t.name != INPUT_IDS]

    @property
    def state_outputs(self) -> list[str]:
        return [t.name for t in self.outputs if t.name != LOGITS]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["config"] = self.config.to_dict()
        if self.blend is None:
            del data["blend"]
        else:
            data["blend"] = self.blend.to_dict()
        order = ["producer", "schema_version", "arch", "lowering", "scan", "opset", "dtype", "logits", "max_seq", "config"]
        return {k: data[k] for k in order} | {k: v for k, v in data.items() if k not in order}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        data = dict(data)
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise SamoutError(
                f"export.json schema_version {version!r} is not {SCHEMA_VERSION}; re-export with this samout-edge"
            )
        if data.get("producer") != PRODUCER:
            raise SamoutError(f"export.json was not written by samout-edge (producer {data.get('producer')!r})")
        try:
            data["config"] = ModelConfig.from_dict(data["config"])
            data["inputs"] = [TensorSpec(**t) for t in data["inputs"]]
            data["outputs"] = [TensorSpec(**t) for t in data["outputs"]]
            data["weights"] = Weights.from_dict(data.get("weights"))
            data["blend"] = Blend.from_dict(data.get("blend")) or Blend.from_extra(data.get("extra") or {})
            known = set(cls.__dataclass_fields__)
            manifest = cls(**{k: v for k, v in data.items() if k in known})
        except (KeyError, TypeError, AttributeError) as e:
            raise SamoutError(f"export.json is incomplete or malformed ({type(e).__name__}: {e})") from None
        manifest.check()
        return manifest

    def check(self) -> None:
        """Every field a later step relies on has a value it can use."""
        try:
            self.spec.check_layers(self.config.num_layers)
        except SamoutError as e:
            raise SamoutError(f"export.json: {e}") from None
        choices = {"dtype": EXPORT_DTYPES, "logits": ("last", "all"), "lowering": ("native", "custom", "inlined")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise SamoutError(f"export.json: {name} {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        scan = self.scan if isinstance(self.scan, dict) else {}
        ints = [scan.get(k) for k in ("max_len", "block")]
        if scan.get("scan") not in ("blocked", "doubling") or not all(isinstance(v, int) and v >= 2 for v in ints[1:]) \
                or not isinstance(ints[0], int) or ints[0] < 1:
            raise SamoutError(f"export.json: scan {self.scan!r} is not a scan plan (scan blocked|doubling, max_len, block)")
        for name in ("max_seq", "opset"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SamoutError(f"export.json: {name} must be a positive integer, got {value!r}")
        if not isinstance(self.files, dict) or MODEL_FILE not in self.files:
            raise SamoutError(f"export.json lists no {MODEL_FILE} in its files")
        self.weights.check()

    def save(self, directory: str | Path) -> None:
        write_json_atomic(Path(directory) / MANIFEST_FILE, self.to_dict())


# What a runtime needs besides the file to compute the verified function (our own
# runners apply it). Where the format allows, the file carries it itself (MatMulNBits'
# accuracy_level); these are the settings it cannot carry.
ORT_BASIC = "ORT_ENABLE_BASIC"  # below ORT's QDQ fusions, which compute DequantizeLinear -> MatMul with int8 activations


def runtime_settings(manifest: Manifest) -> dict[str, dict[str, str]]:
    """{runtime: {setting: value}} an application must set to run this export as verified.

    - ONNX Runtime, ``dq`` weights: its default optimizations fuse DequantizeLinear ->
      MatMul into int8-activation math (about 1% of the logit scale off); the session
      config entries turn that off, or graph optimization level ORT_ENABLE_BASIC does.
    - OpenVINO: fp32 inference precision (its CPU default is bf16 where the CPU has it),
      and for quantized weights no dynamic quantization of activations (its default
      quantizes them, 1-4% off).
    """
    settings: dict[str, dict[str, str]] = {"openvino": {"INFERENCE_PRECISION_HINT": "f32"}}
    weights = manifest.weights
    if weights.quantized:
        settings["openvino"]["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = "0"
    if weights.format == "dq":
        settings["onnxruntime"] = {**weights.ort_session_config, "graph_optimization_level": ORT_BASIC}
    return settings


def runtime_notes(manifest: Manifest) -> list[str]:
    """runtime_settings as lines for people: export and inspect print them, the docs list them."""
    settings = runtime_settings(manifest)
    notes = []
    ort = settings.get("onnxruntime")
    if ort:
        config = ", ".join(f"{k}={v}" for k, v in ort.items() if k != "graph_optimization_level")
        notes.append(f"ONNX Runtime: session config entries {config}, or graph optimization level {ORT_BASIC} "
                     f"(polygraphy run --graph-optimization-level {ORT_BASIC}); its default optimizations compute "
                     "DequantizeLinear -> MatMul with int8 activations, which is not the verified function")
    else:
        notes.append("ONNX Runtime: no settings needed (the file carries what it needs)")
    if manifest.weights.activations == "int8":
        notes.append("OpenVINO, TensorRT, onnx.reference: cannot run it (int8 activations are ONNX Runtime's "
                     "MatMulNBits at accuracy level 4)")
        return notes
    ov = ", ".join(f"{k}: {v}" for k, v in settings["openvino"].items())
    notes.append(f"OpenVINO: compile_model(model, 'CPU', {{{ov}}})")
    return notes


# The graph's own metadata (model.onnx's metadata_props): the file says what it is, and it
# wins over export.json, which no hash covers. Written by the exporter, checked by every runner.
META_ARCH = "samout_edge.arch"
META_LOWERING = "samout_edge.lowering"
META_SCAN = "samout_edge.scan"
META_MAX_SEQ = "samout_edge.max_seq"
META_DTYPE = "samout_edge.dtype"
META_LOGITS = "samout_edge.logits"
META_CONFIG = "samout_edge.config"
META_WEIGHTS = "samout_edge.weights"
META_ISLANDS = "samout_edge.fp32_islands"


def graph_metadata(manifest: Manifest) -> dict[str, str]:
    """What model.onnx records about itself."""
    meta = {
        META_ARCH: manifest.arch,
        META_LOWERING: manifest.lowering,
        META_SCAN: json.dumps(manifest.scan),
        META_MAX_SEQ: str(manifest.max_seq),
        META_DTYPE: manifest.dtype,
        META_LOGITS: manifest.logits,
        META_CONFIG: json.dumps(manifest.config.to_dict()),
    }
    if manifest.precision is not None:
        meta[META_ISLANDS] = json.dumps(manifest.precision["fp32_islands"])
    if manifest.weights.quantized:
        w = manifest.weights
        meta[META_WEIGHTS] = json.dumps({"kind": w.kind, "block_size": w.block_size, "format": w.format})
    return meta


def check_graph_metadata(meta: dict[str, str], manifest: Manifest) -> None:
    """The graph's own metadata wins over export.json: an edited max_seq, config or arch
    must fail when a runner loads the graph, not return wrong tokens later."""
    for key, label in ((META_MAX_SEQ, "max_seq"), (META_CONFIG, "config"), (META_ARCH, "arch")):
        expected = graph_metadata(manifest)[key]
        if meta.get(key) != expected:
            raise SamoutError(f"{MODEL_FILE} says {label} {meta.get(key)}, export.json says {expected}: "
                              "one of them was edited; re-export")


def is_export_dir(path: str | Path) -> bool:
    """True only for a directory whose export.json samout-edge wrote: a stray
    export.json of someone else's never makes a directory ours to replace."""
    path = Path(path) / MANIFEST_FILE
    try:
        if not path.is_file() or path.stat().st_size > MAX_MANIFEST_BYTES:
            return False
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and data.get("producer") == PRODUCER and isinstance(data.get("files"), dict)


def previous_export_files(directory: Path) -> dict[str, str | None] | None:
    """The files an earlier export at ``directory`` wrote, with the sha256 its
    manifest records (export.json itself: None); None when what is there is not
    an export of ours. Only files that still match their record are removed."""
    if not is_export_dir(directory):
        return None
    data = json.loads((Path(directory) / MANIFEST_FILE).read_text())
    return recorded_files(data["files"], MANIFEST_FILE)


def read_manifest(directory: str | Path) -> Manifest:
    directory = Path(directory)
    if not directory.exists():
        raise SamoutError(f"export directory not found: {directory}")
    if not is_export_dir(directory):
        raise SamoutError(f"{directory} is not a samout-edge export (no {MANIFEST_FILE}); create one with `samout-edge export`")
    if (directory / MANIFEST_FILE).stat().st_size > MAX_MANIFEST_BYTES:
        raise SamoutError(f"{directory / MANIFEST_FILE} is larger than any export.json samout-edge writes")
    data = read_json(directory / MANIFEST_FILE, "manifest")
    if not isinstance(data, dict):
        raise SamoutError(f"{directory / MANIFEST_FILE} is not a JSON object")
    manifest = Manifest.from_dict(data)
    if not (directory / MODEL_FILE).is_file():
        raise SamoutError(f"{directory} has {MANIFEST_FILE} but no {MODEL_FILE}; re-export it")
    return manifest


def check_files(directory: str | Path, manifest: Manifest) -> None:
    """Every file export.json lists is there with the recorded sha256: a device
    trusts nothing it copied until this passes."""
    directory = Path(directory)
    for name, entry in manifest.files.items():
        path = directory / name
        if not safe_relative(name):
            raise SamoutError(f"export.json lists a file outside the export: {name!r}")
        if not path.is_file():
            raise SamoutError(f"{path} is missing (export.json lists it); copy the whole export directory")
        if not isinstance(entry, dict) or "sha256" not in entry:
            raise SamoutError(f"export.json has no sha256 for {name}")
        if path.stat().st_size != entry.get("bytes", path.stat().st_size) or sha256_file(path) != entry["sha256"]:
            raise SamoutError(f"{path} does not match the sha256 in export.json: it changed after export; re-export it")


def stated_alpha(manifest: Manifest) -> float | None:
    """The blend a hybrid export was made with from SamOut weights (``export --hybrid-alpha``),
    which every PyTorch reference of it must use; None where the checkpoint has its own."""
    return manifest.blend.stated_alpha if manifest.blend is not None else None


BENCH_ARCHS = ("cummax", "softmax")  # what bench compares unless told: SamOut and its baseline


def check_exports(dirs: list[Path], archs: list[str] | tuple[str, ...] | None = BENCH_ARCHS) -> dict[str, Path]:
    """One export per arch, alike in dtype, config and weights: what bench compares,
    like with like (their checkpoints may differ: each arch trained on its own, as
    benchmarks/trained/ holds them). ``archs``: the ones that must be there (None: any).
    Needs no torch."""
    if not dirs:
        raise SamoutError("give export directories (one per arch), or --preset NAME")
    manifests = [read_manifest(d) for d in dirs]
    pair = {m.arch: Path(d) for m, d in zip(manifests, dirs)}
    if len(pair) < len(dirs):
        raise SamoutError("two directories are exports of the same arch; give one export per arch")
    first = manifests[0]
    for other in manifests[1:]:
        if (first.dtype, first.config, first.weights.key) != (other.dtype, other.config, other.weights.key):
            raise SamoutError("the exports differ in dtype, config or weights (kind, block size, format); "
                              "bench compares like with like")
    missing = [a for a in archs or () if a not in pair]
    if missing:
        raise SamoutError(f"no {' or '.join(missing)} export given: give one per arch, or one and --work to derive "
                          "the others (needs torch)")
    order = list(archs or ()) + [a for a in pair if a not in (archs or ())]
    return {arch: pair[arch] for arch in order}


def record_file(directory: str | Path, manifest: Manifest, name: str) -> None:
    path = Path(directory) / name
    manifest.files[name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
