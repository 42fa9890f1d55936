"""Refuse before allocating: what a request needs against what the machine has.

A config.json with a million layers, ``--max-seq 1000000000`` or an edited
export.json must end in one line naming the numbers, not in minutes of swapping
and a MemoryError (or the OOM killer).
"""

from __future__ import annotations

import os
from pathlib import Path

from samout_edge.errors import SamoutError


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


CGROUP_ROOT = Path("/sys/fs/cgroup")


def available_memory() -> int:
    """Bytes this process can allocate without swapping or the OOM killer: the least of the
    host's MemAvailable and what the container's memory cgroup leaves (a container sees the
    host's meminfo, not its own limit), else physical memory."""
    host = _host_available()
    left = cgroup_memory_left()
    return host if left is None else min(host, left)


def cgroup_memory_left(root: Path = CGROUP_ROOT, self_cgroup: str | None = None) -> int | None:
    """What the memory cgroups this process is in leave it: over its cgroup and each ancestor
    with a limit, the least of limit - usage + inactive file cache (reclaimable). cgroup v2:
    memory.max and memory.current; v1: memory.limit_in_bytes and memory.usage_in_bytes.
    None when no cgroup limits memory (or none can be read)."""
    try:
        text = self_cgroup if self_cgroup is not None else Path("/proc/self/cgroup").read_text()
    except OSError:
        return None
    left = None
    for line in text.splitlines():
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":
            base, names = root, ("memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):
            base, names = root / "memory", ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        else:
            continue
        parts = [part for part in path.split("/") if part]
        for depth in range(len(parts), -1, -1):  # its own cgroup, then each ancestor (a limit may sit higher)
            value = _cgroup_left(base.joinpath(*parts[:depth]), *names)
            if value is not None:
                left = value if left is None else min(left, value)
    return left


def _cgroup_left(directory: Path, limit_file: str, usage_file: str, inactive_key: str) -> int | None:
    try:
        limit = (directory / limit_file).read_text().strip()
        usage = int((directory / usage_file).read_text())
    except (OSError, ValueError):
        return None
    if limit == "max" or not limit.isdigit() or int(limit) >= 1 << 60:  # v1 writes "unlimited" as ~2**63
        return None
    inactive = 0
    try:
        for line in (directory / "memory.stat").read_text().splitlines():
            key, _, number = line.partition(" ")
            if key == inactive_key:
                inactive = int(number)
    except (OSError, ValueError):
        pass
    return max(0, int(limit) - usage + inactive)


def _host_available() -> int:
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
