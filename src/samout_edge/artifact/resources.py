"""Refuse before allocating: what a request needs against what the machine has.

A config.json with a million layers, ``--max-seq 1000000000`` or an edited
export.json must end in one line naming the numbers, not in minutes of swapping
and a MemoryError (or the OOM killer).
"""

from __future__ import annotations

import os

from samout_edge.errors import SamoutError


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def available_memory() -> int:
    """Bytes this process can allocate without swapping: MemAvailable on Linux, else physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: do not refuse


def check_memory(needed: int, what: str) -> None:
    available = available_memory()
    if needed > available:
        raise SamoutError(f"{what} needs about {human_bytes(needed)}, but this machine has {human_bytes(available)} "
                          "of memory available")
