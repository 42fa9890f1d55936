"""What a backend computes, declared as data, and the one check of an export against it.

Every consumer asks a backend's ``Capabilities`` (which dtypes, whether its quantized
MatMuls take int8 activations, whether it runs model-local functions, int4 zero-points, a
growing state; whether it needs a GPU and what must be installed) instead of naming the
backend: so a new backend states what it can do once, and every refusal follows. It lives
below the runtime because TensorRT's build plan (tensorrt/plan.py) asks it too.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from samout_edge.artifact.manifest import Manifest


def which(program: str) -> str | None:
    """shutil.which without shutil (its bz2 and lzma are 2 MB of a process that runs an export)."""
    if os.sep in program:
        return program if os.access(program, os.X_OK) else None
    for directory in os.get_exec_path():
        path = os.path.join(directory, program)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


@dataclass(frozen=True)
class Requirement:
    """A module a backend imports (or a program it runs), and how to install it."""

    module: str  # the import name ("" for a program)
    what: str  # how messages name it
    install: str  # the line that installs it
    program: str = ""  # a program on PATH instead of a module: the native backend's C compiler
    env: str = ""  # the environment variable that names the program instead (CC)

    def installed(self) -> bool:
        if self.program:
            return which(os.environ.get(self.env, "") or self.program) is not None
        try:
            spec = importlib.util.find_spec(self.module)
        except (ImportError, ValueError):  # a parent package that fails to import
            return False
        return spec is not None and spec.origin is not None  # a namespace package (type stubs) is not the module


@dataclass(frozen=True)
class Capabilities:
    """What a backend can compute and needs; every field is asked somewhere, never the backend's name."""

    title: str  # how messages name the runtime: "ONNX Runtime", "OpenVINO"
    dtypes: tuple[str, ...] = ("fp32", "fp16")  # the export dtypes it computes
    activations: tuple[str, ...] = ("fp",)  # its quantized MatMuls' inputs; int8: MatMulNBits at accuracy level 4
    custom_ops: bool = True  # runs model-local functions (a custom export's CumMax nodes, our op domain)
    zero_points: bool = True  # takes int4 blocks with zero-points (--weights-grid asymmetric)
    growing_state: bool = True  # holds a state that grows every call (a softmax KV cache)
    gpu: bool = False  # needs a GPU whatever its options say
    engines: bool = False  # runs engines built from an export (EXPORT/engines/PROFILE)
    requires: tuple[Requirement, ...] = ()  # what must be installed besides samout-edge's own dependencies
    mixers: tuple[str, ...] | None = None  # the token mixers it computes (None: every one, from the graph)
    needs_file: tuple[str, str] | None = None  # a file the export must carry, and how it is made

    def missing(self) -> list[Requirement]:
        return [r for r in self.requires if not r.installed()]

    def lacks(self, manifest: Manifest) -> str | None:
        """The first thing ``manifest``'s export needs that this backend does not compute (None: nothing)."""
        if manifest.dtype not in self.dtypes:
            return "dtype"
        if manifest.weights.activations not in self.activations:
            return "activations"
        if manifest.lowering == "custom" and not self.custom_ops:
            return "custom_ops"
        if manifest.weights.grid == "asymmetric" and not self.zero_points:
            return "zero_points"
        if manifest.spec.grows and not self.growing_state:
            return "growing_state"
        if self.mixers is not None and any(layer.mixer not in self.mixers for layer in manifest.spec.layers):
            return "mixers"
        if self.needs_file is not None and self.needs_file[0] not in manifest.files:
            return "file"
        return None


def refusal(lack: str, manifest: Manifest, name: str, capabilities: Capabilities, directory: str | Path,
            able: list[str]) -> str:
    """The one-line refusal for what ``Capabilities.lacks`` found; ``able``: the backends that compute it."""
    title = capabilities.title
    others = f": run it on {', '.join(able)}" if able else ""
    if lack == "activations":
        kind = manifest.weights.activations
        return (f"this export computes its MatMuls with {kind} activations (export --activations {kind}: ONNX "
                f"Runtime's MatMulNBits at accuracy level 4), which the {name} backend does not{others}")
    if lack == "custom_ops":
        return (f"{title} does not run model-local functions (this export's CumMax nodes): make a copy that it runs "
                f"with `samout-edge inline {directory} -o OUT`")
    if lack == "zero_points":
        return zero_points_refusal(title)
    if lack == "dtype":
        return f"the {name} backend does not compute {manifest.dtype} graphs ({', '.join(capabilities.dtypes)}){others}"
    if lack == "mixers":
        return (f"the {name} backend computes the {', '.join(capabilities.mixers or ())} mixer only (this export is "
                f"{manifest.arch}){others}")
    if lack == "file" and capabilities.needs_file is not None:
        file, how = capabilities.needs_file
        return f"this export carries no {file}, which the {name} backend runs ({how}){others}"
    return (f"this export's state grows with every token (a {manifest.arch} KV cache), which the {name} backend "
            f"does not hold{others}")


def zero_points_refusal(title: str) -> str:
    return (f"the export's int4 blocks have zero-points (--weights-grid asymmetric): {title} takes zero zero-points "
            f"only; export with --weights-grid symmetric --weights-format dq for {title}")
