"""Peak memory of one scenario, measured in a fresh child process.

A child per scenario means one scenario's allocations cannot inflate the next
one's numbers. On CUDA the number is the torch allocator's peak above the loaded
model; on the CPU it is the peak resident set size above the loaded model
(Linux: VmHWM, reset through /proc/self/clear_refs). ONNX Runtime's CPU arena is
off in the child so freed memory really is returned.

- prefill: the peak while one prefill call runs.
- decode: the context is built first (a prefill of N tokens, not counted), freed
  memory is returned to the OS, then the peak while the decode steps run: the
  resident state (cummax max or KV cache) plus each step's working memory.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from samout_edge.artifact.graph import PREFILL_UBATCH


@dataclass
class MemorySpec:
    directory: str
    backend: str
    provider: str  # what the runner runs on, as it labels it (RunnerInfo.device)
    mode: str  # prefill | decode
    batch: int
    length: int  # prefill seq, or decode context
    steps: int = 4  # decode steps measured
    settings: dict | None = None  # the backend's options (runtime/backend.py), as a dict
    memory: str = "host"  # where the peak is read (RunnerInfo.memory): host (RSS) or cuda (torch's allocator)
    ubatch: int | None = PREFILL_UBATCH  # most tokens per call; None: what the graph takes


def json_ready(values: dict) -> dict:
    """Options as JSON (a path as its text), for the child process."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def rss_supported() -> bool:
    try:
        _status_kib("VmHWM")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def _return_freed_memory() -> None:
    from samout_edge.runtime.ort_runner import return_freed_heap

    gc.collect()
    return_freed_heap()


def measure(spec: MemorySpec) -> int | None:
    """Run in the child: the scenario's peak bytes above the loaded model."""
    from samout_edge.runtime.registry import backend_named, load_runner

    cuda = spec.memory == "cuda"
    if not cuda and not rss_supported():
        return None
    backend = backend_named(spec.backend)
    options = backend.options(**(spec.settings or {})).for_peak_memory()  # freed memory back to the OS
    runner = load_runner(spec.directory, spec.backend, options)
    runner.ubatch = spec.ubatch
    vocab = runner.info.config.vocab_size
    ids = np.random.default_rng(0).integers(1, vocab, (spec.batch, spec.length + spec.steps))
    empty = runner.initial_state(spec.batch)
    runner.run(ids[:, :1], empty)  # lazy initialisation is not the scenario's
    runner.synchronize()
    _return_freed_memory()

    if cuda:
        import torch

        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = _status_kib("VmRSS") * 1024

    def reset() -> None:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            _reset_peak()

    if spec.mode == "prefill":
        reset()
        runner.run(ids[:, : spec.length], empty)
    else:
        _, state = runner.run(ids[:, : spec.length], empty)
        _return_freed_memory()
        reset()
        for k in range(spec.steps):
            pos = spec.length + k
            _, state = runner.run(ids[:, pos : pos + 1], state)
    runner.synchronize()
    peak = torch.cuda.max_memory_allocated() if cuda else _status_kib("VmHWM") * 1024
    return max(0, peak - baseline)


def measure_in_child(spec: MemorySpec, timeout: float = 900.0) -> int | None:
    """Peak bytes of one scenario in a fresh Python process (None if not measurable)."""
    proc = subprocess.run(
        [sys.executable, "-m", "samout_edge.bench.peak_memory", json.dumps(asdict(spec))],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"memory measurement child failed: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_bytes"]


if __name__ == "__main__":
    result = measure(MemorySpec(**json.loads(sys.argv[1])))
    print(json.dumps({"peak_bytes": result}))
