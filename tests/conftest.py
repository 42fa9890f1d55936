from __future__ import annotations

import os
from pathlib import Path

# Two test workers share two cores: a runtime that forks threads per operator (the native backend's
# OpenMP) would wait at every barrier for a thread the other worker's process holds the core from.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from samout_edge.artifact.config import PRESETS
from samout_edge.models.checkpoint import random_checkpoint, save_checkpoint

TINY = PRESETS["tiny"]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(random_checkpoint(TINY, seed=0), path)
    return path


CALIBRATION = "def f(x):\n    return [x + i for i in range(9)]  # text\n" * 40


@pytest.fixture(scope="session")
def calibration_text(tmp_path_factory) -> Path:
    """Text for --calibration-text, which an fp16 export of a checkpoint needs; read with ``tiny_vocab``."""
    path = tmp_path_factory.mktemp("text") / "calibration.txt"
    path.write_text(CALIBRATION)
    return path


@pytest.fixture(scope="session")
def tiny_vocab(tmp_path_factory) -> Path:
    """A vocab for the tiny preset's 128 ids: printable ASCII and newline (the tiny model reads no bytes)."""
    import json

    path = tmp_path_factory.mktemp("vocab") / "vocab.json"
    path.write_text(json.dumps([chr(i) if 32 <= i < 127 or i == 10 else "" for i in range(128)]))
    return path


@pytest.fixture(scope="session")
def exported(tmp_path_factory, tiny_checkpoint, calibration_text, tiny_vocab):
    """export(arch=..., dtype=..., lowering=..., ...) -> directory, each variant exported once."""
    from samout_edge.exporter.onnx_export import ExportOptions, export

    cache: dict[tuple, object] = {}
    root = tmp_path_factory.mktemp("exports")

    def get(arch="cummax", dtype="fp32", lowering="native", max_seq=300, logits="last", scan="auto"):
        key = (arch, dtype, lowering, max_seq, logits, scan)
        if key not in cache:
            out = root / "-".join(str(k) for k in key)
            options = ExportOptions(arch=arch, dtype=dtype, lowering=lowering, max_seq=max_seq, logits=logits, scan=scan,
                                    calibration_text=calibration_text if dtype == "fp16" else None)
            cache[key] = export(out, options, checkpoint=tiny_checkpoint, vocab=tiny_vocab if dtype == "fp16" else None)
        return cache[key]

    return get


@pytest.fixture
def run_cli(capsys):
    """Run the CLI in-process: returns (exit code, stdout, stderr)."""
    from samout_edge.cli.app import main

    def run(*args: str) -> tuple[int, str, str]:
        code = 0
        try:
            main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


def _tensorrt_available() -> bool:
    """Real TensorRT (not tensorrt-stubs' namespace package) and a CUDA GPU."""
    from samout_edge.tensorrt.versions import installed_version

    return installed_version() is not None and torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    """gpu and tensorrt tests run where the hardware is, and say why they skip elsewhere."""
    cuda = torch.cuda.is_available()
    trt = _tensorrt_available()
    for item in items:
        if "tensorrt" in item.keywords and not trt:
            item.add_marker(pytest.mark.skip(reason="needs TensorRT and a CUDA GPU; TensorRT cannot be installed "
                                                    "on this machine (its registry packages are download stubs)"))
        elif "gpu" in item.keywords and not cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU; this machine has none"))
