"""engine.json and where engines live: ``EXPORT/engines/<profile>/model.engine``.

An engine is valid only for the TensorRT version and GPU that built it, and only
for the model.onnx it was built from, so engine.json records all three and a
runner checks them before it trusts the engine.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from samout_edge.artifact.files import read_json, write_json_atomic
from samout_edge.artifact.manifest import is_export_dir
from samout_edge.errors import SamoutError

ENGINES_DIR = "engines"
ENGINE_FILE = "model.engine"
ENGINE_JSON = "engine.json"
ENGINE_SCHEMA_VERSION = 2
PROFILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


@dataclass
class ShapeRange:
    name: str
    min: list[int]
    opt: list[int]
    max: list[int]


@dataclass
class OptimizationProfile:
    name: str  # decode | prefill
    shapes: list[ShapeRange]

    def shape(self, name: str) -> ShapeRange:
        return next(s for s in self.shapes if s.name == name)


@dataclass
class EngineMeta:
    """engine.json: what a runner checks before it runs the engine."""

    tensorrt: str
    gpu: str
    compute_capability: str
    profile: str
    arch: str
    precision: str
    strongly_typed: bool
    dla_core: int | None
    optimization_profiles: list[OptimizationProfile]
    plugins: list[str]
    onnx_sha256: str
    build_seconds: float
    plan: dict[str, Any] = field(default_factory=dict)
    schema_version: int = ENGINE_SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, source: str = ENGINE_JSON) -> EngineMeta:
        if not isinstance(data, dict):
            raise SamoutError(f"{source} is not a JSON object")
        if data.get("schema_version") != ENGINE_SCHEMA_VERSION:
            raise SamoutError(f"{source}: schema_version {data.get('schema_version')!r} is not {ENGINE_SCHEMA_VERSION}; "
                              "rebuild the engine with this samout-edge")
        try:
            data = dict(data)
            data["optimization_profiles"] = [
                OptimizationProfile(p["name"], [ShapeRange(**s) for s in p["shapes"]]) for p in data["optimization_profiles"]
            ]
            known = set(cls.__dataclass_fields__)
            return cls(**{k: v for k, v in data.items() if k in known})
        except (KeyError, TypeError) as e:
            raise SamoutError(f"{source} is incomplete or malformed ({type(e).__name__}: {e})") from None

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_dict())


def check_profile_name(name: str) -> str:
    """A profile name becomes a directory under engines/: letters, digits, '.', '_', '-' only."""
    if not PROFILE_NAME.fullmatch(name or ""):
        raise SamoutError(f"profile name {name!r} must be letters, digits, '.', '_' or '-' (it names a directory)")
    return name


def read_engine_meta(engine_dir: Path) -> EngineMeta:
    return EngineMeta.from_dict(read_json(engine_dir / ENGINE_JSON, "engine.json"), str(engine_dir / ENGINE_JSON))


def engine_dirs(export_dir: Path) -> list[Path]:
    root = export_dir / ENGINES_DIR
    return sorted(p for p in root.iterdir() if (p / ENGINE_JSON).is_file()) if root.is_dir() else []


def is_engine_dir(path: Path) -> bool:
    path = Path(path)
    return (path / ENGINE_JSON).is_file() and path.parent.name == ENGINES_DIR and is_export_dir(path.parent.parent)


def resolve_engine(path: str | Path, profile: str | None = None) -> tuple[Path, Path]:
    """(export dir, engine dir) from an engine dir, or an export dir and a profile name."""
    path = Path(path)
    if is_engine_dir(path):
        return path.parent.parent, path
    if not is_export_dir(path):
        raise SamoutError(f"{path} is neither an export directory nor an engine directory (engines/<profile>)")
    built = engine_dirs(path)
    if profile:
        engine = path / ENGINES_DIR / check_profile_name(profile)
        if not (engine / ENGINE_JSON).is_file():
            have = ", ".join(p.name for p in built) or "none"
            raise SamoutError(f"no engine for profile {profile!r} in {path} (built: {have}); "
                              f"run `samout-edge build {path} --profile {profile}`")
        return path, engine
    if len(built) == 1:
        return path, built[0]
    if not built:
        raise SamoutError(f"{path} has no TensorRT engine; run `samout-edge build {path} --profile NAME`")
    raise SamoutError(f"{path} has engines for {', '.join(p.name for p in built)}; pick one with --engine NAME")


def check_compatible(meta: EngineMeta, tensorrt_version: str, gpu: str, compute_capability: str, onnx_sha256: str,
                     export_dir: Path) -> None:
    """Refuse an engine built by another TensorRT, for another GPU or from another model.onnx."""
    rebuild = f"rebuild it here: samout-edge build {export_dir} --profile {meta.profile}"
    if meta.tensorrt != tensorrt_version:
        raise SamoutError(f"the engine was built with TensorRT {meta.tensorrt}, this machine has "
                          f"{tensorrt_version}; engines only run on the TensorRT that built them; {rebuild}")
    if meta.compute_capability != compute_capability or meta.gpu != gpu:
        raise SamoutError(f"the engine was built for {meta.gpu} (sm {meta.compute_capability}), this "
                          f"machine has {gpu} (sm {compute_capability}); {rebuild}")
    if meta.onnx_sha256 != onnx_sha256:
        raise SamoutError(f"the engine was built from another model.onnx than the one in {export_dir}; {rebuild}")
