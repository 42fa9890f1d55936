"""export.json: what an artifact directory holds, so later steps need nothing else.

Every step after export (verify, build, bench, generate) reads only the artifact
directory, so it can run on another machine than the export did.
"""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from samout_edge.errors import SamoutError
from samout_edge.fsutil import read_json, write_json_atomic
from samout_edge.models.config import ModelConfig

if TYPE_CHECKING:
    from samout_edge.models.checkpoint import Checkpoint

SCHEMA_VERSION = 1
MANIFEST_FILE = "export.json"
MODEL_FILE = "model.onnx"
CHECKPOINT_DIR = "checkpoint"


@dataclass
class TensorSpec:
    name: str
    dtype: str  # "int64" | "float32" | "float16"
    shape: list[int | str]  # ints are fixed, strings name a dynamic dimension


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
    schema_version: int = SCHEMA_VERSION
    exporter: str = "torch.export"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def state_inputs(self) -> list[str]:
        return [t.name for t in self.inputs if t.name != "input_ids"]

    @property
    def state_outputs(self) -> list[str]:
        return [t.name for t in self.outputs if t.name != "logits"]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["config"] = self.config.to_dict()
        order = ["schema_version", "arch", "lowering", "scan", "opset", "dtype", "logits", "max_seq", "config"]
        return {k: data[k] for k in order} | {k: v for k, v in data.items() if k not in order}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        data = dict(data)
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise SamoutError(
                f"export.json schema_version {version!r} is not {SCHEMA_VERSION}; re-export with this samout-edge"
            )
        try:
            data["config"] = ModelConfig.from_dict(data["config"])
            data["inputs"] = [TensorSpec(**t) for t in data["inputs"]]
            data["outputs"] = [TensorSpec(**t) for t in data["outputs"]]
            known = set(cls.__dataclass_fields__)
            return cls(**{k: v for k, v in data.items() if k in known})
        except (KeyError, TypeError) as e:
            raise SamoutError(f"export.json is incomplete or malformed ({type(e).__name__}: {e})") from None

    def save(self, directory: str | Path) -> None:
        write_json_atomic(Path(directory) / MANIFEST_FILE, self.to_dict())


def is_export_dir(path: str | Path) -> bool:
    return (Path(path) / MANIFEST_FILE).is_file()


def read_manifest(directory: str | Path) -> Manifest:
    directory = Path(directory)
    if not directory.exists():
        raise SamoutError(f"export directory not found: {directory}")
    if not is_export_dir(directory):
        raise SamoutError(f"{directory} is not a samout-edge export (no {MANIFEST_FILE}); create one with `samout-edge export`")
    data = read_json(directory / MANIFEST_FILE, "manifest")
    if not isinstance(data, dict):
        raise SamoutError(f"{directory / MANIFEST_FILE} is not a JSON object")
    manifest = Manifest.from_dict(data)
    if not (directory / MODEL_FILE).is_file():
        raise SamoutError(f"{directory} has {MANIFEST_FILE} but no {MODEL_FILE}; re-export it")
    return manifest


def source_checkpoint(directory: Path, manifest: Manifest, override: str | Path | None) -> Checkpoint:
    """The checkpoint the export came from, checked against the recorded sha256."""
    src = manifest.source
    path = Path(override) if override else Path(src["path"])
    if not path.is_absolute() and not override:
        path = directory / path
    if not path.exists():
        raise SamoutError(
            f"the source checkpoint {path} is not here; pass --checkpoint PATH to verify against a copy of it"
        )
    from samout_edge.models.checkpoint import load_checkpoint  # torch, only when needed

    heads = manifest.config.num_heads
    ckpt = load_checkpoint(path, None if path.is_dir() else heads)
    if ckpt.sha256 != src.get("sha256"):
        raise SamoutError(f"checkpoint {path} does not match the one exported (sha256 differs)")
    return ckpt


def tool_versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import onnxscript
    import torch

    from samout_edge import __version__

    return {
        "samout_edge": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxscript": onnxscript.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
