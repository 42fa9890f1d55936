"""Device profiles: what a target GPU offers and how engines for it are built.

Profiles ship as TOML in profiles/data/ (one file per device); a user's own file
is loaded the same way with ``--profile FILE.toml``. Loading validates every
field and names the first bad one.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (JetPack 6)
    import tomli as tomllib

from samout_edge.errors import SamoutError

KINDS = ("jetson", "desktop", "datacenter")
PRECISIONS = ("fp16", "fp32")


@dataclass(frozen=True)
class Range:
    """min <= opt <= max, the shape range of one optimization-profile dimension."""

    min: int
    opt: int
    max: int

    def as_list(self) -> list[int]:
        return [self.min, self.opt, self.max]


@dataclass(frozen=True)
class PrefillShapes:
    batch: Range
    seq: Range


@dataclass(frozen=True)
class DecodeShapes:
    batch: Range
    context: Range  # tokens already in the state (the KV cache length for softmax)


@dataclass(frozen=True)
class BenchSizes:
    seqs: list[int]
    contexts: list[int]
    batches: list[int]


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    kind: str
    gpu: str
    compute_capability: str
    memory_gib: float
    memory_budget_gib: float
    runtime_overhead_mib: int
    tensorrt: str
    precision: str
    workspace_mib: int
    builder_optimization_level: int
    dla_cores: int
    prefill: PrefillShapes
    decode: DecodeShapes
    bench: BenchSizes
    jetpack: str | None = None
    source: str = field(default="", compare=False)

    @property
    def memory_budget_bytes(self) -> int:
        return int(self.memory_budget_gib * 2**30)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for section in ("prefill", "decode"):
            data[section] = {k: [v["min"], v["opt"], v["max"]] for k, v in data[section].items()}
        return data


def _err(source: str, name: str, message: str) -> SamoutError:
    return SamoutError(f"profile {source}: field '{name}' {message}")


def _get(data: dict, key: str, kind: type | tuple, source: str, prefix: str = "", required: bool = True):
    name = f"{prefix}{key}"
    if key not in data:
        if required:
            raise _err(source, name, "is missing")
        return None
    value = data[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise _err(source, name, f"must be {expected}, got {value!r}")
    if kind is float and not math.isfinite(value):
        raise _err(source, name, f"must be a finite number, got {value!r}")
    return value


def _range(data: dict, key: str, source: str, prefix: str, minimum: int) -> Range:
    value = _get(data, key, list, source, prefix)
    if len(value) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise _err(source, prefix + key, f"must be [min, opt, max] integers, got {value!r}")
    lo, opt, hi = value
    if not minimum <= lo <= opt <= hi:
        raise _err(source, prefix + key, f"must satisfy {minimum} <= min <= opt <= max, got {value!r}")
    return Range(lo, opt, hi)


def _ints(data: dict, key: str, source: str, prefix: str) -> list[int]:
    value = _get(data, key, list, source, prefix)
    if not value or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value):
        raise _err(source, prefix + key, f"must be a non-empty list of positive integers, got {value!r}")
    return value


TOP_LEVEL = {f.name for f in fields(DeviceProfile)} - {"source"}


def parse_profile(data: dict, source: str) -> DeviceProfile:
    unknown = sorted(set(data) - TOP_LEVEL)
    if unknown:
        raise _err(source, unknown[0], f"is not a profile field (known: {', '.join(sorted(TOP_LEVEL))})")
    kind = _get(data, "kind", str, source)
    if kind not in KINDS:
        raise _err(source, "kind", f"must be one of {', '.join(KINDS)}, got {kind!r}")
    precision = _get(data, "precision", str, source)
    if precision not in PRECISIONS:
        raise _err(source, "precision", f"must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    cc = _get(data, "compute_capability", str, source)
    if not re.fullmatch(r"\d+\.\d+", cc):
        raise _err(source, "compute_capability", f"must look like '8.7', got {cc!r}")
    trt = _get(data, "tensorrt", str, source)
    if not re.fullmatch(r"\d+\.\d+(\.\d+)*", trt):
        raise _err(source, "tensorrt", f"must be a version like '10.3', got {trt!r}")
    memory = _get(data, "memory_gib", float, source)
    budget = _get(data, "memory_budget_gib", float, source)
    if not 0 < budget <= memory:
        raise _err(source, "memory_budget_gib", f"must be above 0 and at most memory_gib ({memory}), got {budget}")
    level = _get(data, "builder_optimization_level", int, source)
    if not 0 <= level <= 5:
        raise _err(source, "builder_optimization_level", f"must be 0..5, got {level}")
    for key in ("workspace_mib", "runtime_overhead_mib"):
        if _get(data, key, int, source) < 0:
            raise _err(source, key, "must be >= 0")
    dla = _get(data, "dla_cores", int, source)
    if dla < 0:
        raise _err(source, "dla_cores", "must be >= 0")
    prefill = _get(data, "prefill", dict, source)
    decode = _get(data, "decode", dict, source)
    bench = _get(data, "bench", dict, source)
    for section, allowed in ((prefill, {"batch", "seq"}), (decode, {"batch", "context"}), (bench, {"seqs", "contexts", "batches"})):
        extra = sorted(set(section) - allowed)
        if extra:
            name = next(k for k, v in (("prefill", prefill), ("decode", decode), ("bench", bench)) if v is section)
            raise _err(source, f"{name}.{extra[0]}", f"is not a field of [{name}] (known: {', '.join(sorted(allowed))})")
    return DeviceProfile(
        name=_get(data, "name", str, source),
        description=_get(data, "description", str, source),
        kind=kind,
        gpu=_get(data, "gpu", str, source),
        compute_capability=cc,
        memory_gib=memory,
        memory_budget_gib=budget,
        runtime_overhead_mib=data["runtime_overhead_mib"],
        tensorrt=trt,
        precision=precision,
        workspace_mib=data["workspace_mib"],
        builder_optimization_level=level,
        dla_cores=dla,
        prefill=PrefillShapes(_range(prefill, "batch", source, "prefill.", 1), _range(prefill, "seq", source, "prefill.", 1)),
        decode=DecodeShapes(_range(decode, "batch", source, "decode.", 1), _range(decode, "context", source, "decode.", 0)),
        bench=BenchSizes(_ints(bench, "seqs", source, "bench."), _ints(bench, "contexts", source, "bench."),
                         _ints(bench, "batches", source, "bench.")),
        jetpack=_get(data, "jetpack", str, source, required=False),
        source=source,
    )


def _data_dir():
    return resources.files("samout_edge.profiles").joinpath("data")


def list_profiles() -> list[DeviceProfile]:
    files = sorted(p for p in _data_dir().iterdir() if p.name.endswith(".toml"))
    return [parse_profile(tomllib.loads(p.read_text()), p.name) for p in files]


def load_profile(name_or_path: str | Path) -> DeviceProfile:
    """A shipped profile by name, or a user's TOML file by path."""
    text = str(name_or_path)
    if text.endswith(".toml") or "/" in text:
        path = Path(text)
        if not path.is_file():
            raise SamoutError(f"profile file not found: {path}")
        try:
            data = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise SamoutError(f"profile {path} is not valid TOML: {e}") from None
        return parse_profile(data, str(path))
    shipped = _data_dir().joinpath(f"{text}.toml")
    if not shipped.is_file():
        names = ", ".join(p.name for p in list_profiles())
        raise SamoutError(f"unknown profile {text!r}; shipped profiles: {names} (or pass a FILE.toml)")
    return parse_profile(tomllib.loads(shipped.read_text()), shipped.name)
