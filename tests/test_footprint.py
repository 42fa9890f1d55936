"""What a loaded process holds (issue 29 part 4): running an export on ONNX Runtime imports
no onnx (the Python package: about 10 MB of RSS and 0.4 s of start-up on the device) and
nothing of ours beyond the runtime path, nor hashlib (OpenSSL: 3.6 MB of RSS), shutil or
subprocess, which only writing and checking need."""

from __future__ import annotations

import subprocess
import sys


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
    bad = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "not an export directory" in bad.stderr and "Traceback" not in bad.stderr
