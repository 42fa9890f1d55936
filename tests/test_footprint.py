"""What a loaded process holds (issue 29 part 4): running an export on ONNX Runtime imports
no onnx (the Python package: about 10 MB of RSS and 0.4 s of start-up on the device) and
nothing of ours beyond the runtime path, nor hashlib (OpenSSL: 3.6 MB of RSS), shutil or
subprocess, which only writing and checking need."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest


def test_an_ort_runner_loads_and_runs_without_the_onnx_package(exported):
    d = exported(max_seq=300).directory
    code = (
        "import sys, numpy as np\n"
        "from samout_edge.runtime.registry import load_runner\n"
        f"r = load_runner({str(d)!r}, 'ort')\n"
        "r.run(np.ones((1, 5), np.int64), r.initial_state(1))\n"
        "heavy = ('onnx', 'torch', 'openvino', 'rich', 'typer', 'fastapi', 'hashlib', 'shutil', 'subprocess')\n"
        "print(','.join(sorted(m for m in heavy if m in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def test_the_cli_generates_without_the_onnx_package(exported):
    """`samout-edge generate` on an export: the CLI's own modules (render, ui) import nothing of
    onnx either (it was 12 MB of every generate and serve process, through inspection)."""
    d = exported(max_seq=300).directory
    code = (
        "import sys\n"
        "from samout_edge.cli.app import app\n"
        "try:\n"
        f"    app(['generate', {str(d)!r}, '--ids', '1,2,3', '--max-new-tokens', '2'], standalone_mode=False)\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "heavy = ('onnx', 'torch', 'openvino', 'fastapi')\n"
        "print('\\nheavy:' + ','.join(sorted(m for m in heavy if m in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "heavy:"


def test_process_rss_reports_every_stage_and_the_cli(exported, tmp_path):
    """benchmarks/process_rss.py: each stage's RSS, and generate's own peak at least the runtime's."""
    import json
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "process_rss.py"
    d = exported(max_seq=300).directory
    out = subprocess.run([sys.executable, str(script), str(d), "--tokens", "20", "--ubatch", "8",
                          "--json", str(tmp_path / "r.json")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    names = [s["stage"] for s in report["stages"]]
    assert names[1:] == ["numpy", "ONNX Runtime (import)", "samout-edge runtime", "session (the export loaded)",
                         "prefill 20 tokens", "decode 4 steps"]
    runtime_peak = max(s["peak_kib"] for s in report["stages"])
    assert report["cli_peak_kib"] > runtime_peak * 0.8  # the CLI holds the same runtime, plus its own imports
    lib = report["library"]  # ONNX Runtime's library: what a run needs of its resident pages
    if lib is not None:  # None: a kernel before 5.4, no MADV_PAGEOUT
        assert lib["library"].startswith("onnxruntime_pybind11_state") and 0 < lib["in_use_kib"] <= lib["resident_kib"]
    bad = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "not an export directory" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or not Path("/proc/self/status").exists(),
                    reason="malloc_trim is glibc's; the RSS is read from Linux's /proc")
def test_freed_heap_goes_back_to_the_os_once_a_session_is_loaded():
    """What loading frees stays mapped under glibc until trimmed (6 MB of the seed int4 process):
    return_freed_heap gives it back. Blocks of 64 KiB (under glibc's mmap threshold: on the heap),
    the last one kept so the freed ones sit below the top, where only a trim returns them."""
    code = (
        "import ctypes\n"
        "from samout_edge.runtime.ort_runner import return_freed_heap\n"
        "libc = ctypes.CDLL(None)\n"
        "libc.malloc.restype = ctypes.c_void_p\n"
        "libc.free.argtypes = [ctypes.c_void_p]\n"
        "def rss():\n"
        "    return int([x for x in open('/proc/self/status') if x.startswith('VmRSS:')][0].split()[1])\n"
        "blocks = [libc.malloc(64 << 10) for _ in range(800)]\n"
        "for b in blocks:\n"
        "    ctypes.memset(b, 1, 64 << 10)\n"
        "for b in blocks[:-1]:\n"
        "    libc.free(b)\n"
        "before = rss()\n"
        "return_freed_heap()\n"
        "print(before - rss())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) > 40 * 1024  # of 50 MiB freed, KiB back to the OS


def test_loading_an_export_trims_the_heap(exported, monkeypatch):
    from samout_edge.runtime import ort_runner

    directory = exported(max_seq=300).directory  # first: exporting loads sessions to verify
    calls = []
    monkeypatch.setattr(ort_runner, "return_freed_heap", lambda: calls.append(1))
    ort_runner.load_ort_runner(directory)
    assert calls == [1]
