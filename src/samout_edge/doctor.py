"""What this machine offers samout-edge: versions, providers, GPU, TensorRT, Jetson, and which backends can run."""

from __future__ import annotations

import importlib
import platform
import re
from pathlib import Path
from typing import Any

from samout_edge.runtime.cpu import cpu_features

# L4T release -> JetPack, for the releases our device profiles name.
L4T_TO_JETPACK = {
    "35.3": "5.1.1",
    "35.4": "5.1.2",
    "35.5": "5.1.3",
    "35.6": "5.1.4",
    "36.3": "6.0",
    "36.4": "6.1/6.2",
    "38.2": "7.0",
}


def _version(module: str) -> str | None:
    try:
        loaded = importlib.import_module(module)
        if getattr(loaded, "__file__", None) is None:
            return None  # a namespace package (e.g. tensorrt-stubs' .pyi files), not the module
        return getattr(loaded, "__version__", "unknown")
    except Exception:  # not installed, or a broken install (e.g. the registry's tensorrt stub)
        return None


def jetson_info(root: Path = Path("/")) -> dict[str, str] | None:
    """The Jetson model and L4T release, or None when this is not a Jetson."""
    model_file = root / "proc/device-tree/model"
    release_file = root / "etc/nv_tegra_release"
    if not model_file.exists() and not release_file.exists():
        return None
    info: dict[str, str] = {}
    if model_file.exists():
        info["model"] = model_file.read_bytes().rstrip(b"\x00").decode(errors="replace").strip()
    if release_file.exists():
        match = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", release_file.read_text(errors="replace"))
        if match:
            release = f"{match.group(1)}.{match.group(2)}"
            info["l4t"] = release
            major_minor = ".".join(release.split(".")[:2])
            info["jetpack"] = L4T_TO_JETPACK.get(major_minor, "unknown")
    if "model" in info and "jetson" not in info["model"].lower() and "l4t" not in info:
        return None
    return info


def backends() -> list[dict[str, Any]]:
    """Each registered backend: what it runs on and, from its capabilities, what is missing to run it here."""
    from samout_edge.runtime.registry import BACKENDS

    return [{"name": b.name, "title": b.capabilities.title, "gpu": b.capabilities.gpu,
             "missing": [f"{r.what} ({r.install})" for r in b.capabilities.missing()]} for b in BACKENDS.values()]


def collect() -> dict[str, Any]:
    try:
        import torch
    except ImportError:  # the device install has no torch: report it, do not fail
        torch = None
    report: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "samout_edge": _version("samout_edge"),
        "torch": torch.__version__ if torch else None,
        "onnx": _version("onnx"),
        "onnxscript": _version("onnxscript"),
        "onnxruntime": _version("onnxruntime"),
        "onnxruntime_providers": [],
        "cuda": None,
        "gpus": [],
        "tensorrt": _version("tensorrt"),
        "triton": _version("triton"),
        "jetson": jetson_info(),
        "cpu": cpu_features().to_dict(),
        "backends": backends(),
    }
    try:
        import onnxruntime

        report["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except Exception:
        pass
    if torch is not None and torch.cuda.is_available():
        report["cuda"] = torch.version.cuda
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            report["gpus"].append(
                {
                    "index": i,
                    "name": props.name,
                    "compute_capability": f"{props.major}.{props.minor}",
                    "memory_gib": round(props.total_memory / 2**30, 1),
                }
            )
    return report
