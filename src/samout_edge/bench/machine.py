"""A short, honest description of the machine a benchmark ran on."""

from __future__ import annotations

import os
import platform
from typing import Any


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float | None:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def describe(device: str = "cpu") -> dict[str, Any]:
    import onnxruntime

    try:
        import torch
    except ImportError:  # the device install: no torch
        torch = None

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": cores,
        "memory_gib": memory_gib(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__ if torch else None,
        "onnxruntime": onnxruntime.__version__,
        "gpu": None,
    }
    if torch is not None and device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    info["label"] = info["gpu"] or f"{cores}-core {info['cpu']}"
    return info
