"""benchmarks/llama_alike.py without llama.cpp: the shipped llama was trained on the set's
recipe, its RoPE is llama.cpp's, its tensors are the GGUF's, and the scores are what they say."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAINED = ROOT / "benchmarks" / "trained"


@pytest.fixture(scope="module")
def alike():
    spec = importlib.util.spec_from_file_location("llama_alike_bench", ROOT / "benchmarks" / "llama_alike.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_the_shipped_llama_saw_the_sets_batches_and_loads(alike):
    record = json.loads((TRAINED / "llama" / "train.json").read_text())
    the_set = json.loads((TRAINED / "train.json").read_text())
    assert record["batches_sha256"] == the_set["archs"]["cummax"]["batches_sha256"]
    assert record["recipe"]["steps"] == the_set["steps"] and record["recipe"]["lr"] == the_set["optimizer"]["lr"]
    model, _ = alike.load_llama(TRAINED / "llama")
    assert sum(p.numel() for p in model.parameters()) == record["shape"]["parameters"]
    assert record["shape"]["n_ff"] % 32 == 0  # Q4_0's block: ffn_down's rows quantize whole


def test_rope_turns_adjacent_pairs_as_llama_cpp_does(alike):
    import torch

    x = torch.randn(1, 2, 5, 32)
    y = alike.rope(x, torch.arange(5))
    assert torch.allclose(y[:, :, 0], x[:, :, 0])  # position 0
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5)  # a rotation
    i, pos, d = 3, 4, 32  # pair (6, 7) at position 4, by hand
    angle = pos * alike.ROPE_BASE ** (-2 * i / d)
    a, b = x[0, 0, pos, 2 * i], x[0, 0, pos, 2 * i + 1]
    assert torch.allclose(y[0, 0, pos, 2 * i], a * math.cos(angle) - b * math.sin(angle), atol=1e-6)
    assert torch.allclose(y[0, 0, pos, 2 * i + 1], a * math.sin(angle) + b * math.cos(angle), atol=1e-6)


def test_its_tensors_are_the_ggufs_every_one_once(alike, monkeypatch):
    """peers.write_gguf takes the trained tensors by GGUF name and shape (a stand-in for the gguf
    package, which lives in the peers venv): every tensor lands, a wrong shape or a stray name is refused."""
    import peers  # benchmarks/ is on the path once llama_alike is loaded

    written = {}

    class Writer:
        def __init__(self, *a, **k):
            pass

        def add_tensor(self, name, value):
            written[name] = value

        def __getattr__(self, name):  # the metadata calls
            return lambda *a, **k: None

    monkeypatch.setitem(sys.modules, "gguf", types.SimpleNamespace(GGUFWriter=Writer))
    model, record = alike.load_llama(TRAINED / "llama")
    shape = peers.LlamaShape(**{k: v for k, v in record["shape"].items() if k != "parameters"})
    tensors = model.gguf_tensors()
    peers.write_gguf(Path("unused.gguf"), shape, weights=tensors)
    assert set(written) == set(tensors)
    assert all(np.array_equal(written[k], tensors[k]) for k in tensors)
    assert sum(v.size for v in written.values()) == shape.parameter_count()
    with pytest.raises(ValueError, match="stray"):
        peers.write_gguf(Path("unused.gguf"), shape, weights={**tensors, "stray.weight": np.zeros(3, np.float32)})
    bad = {**tensors, "blk.0.ffn_down.weight": tensors["blk.0.ffn_down.weight"].T.copy()}
    with pytest.raises(ValueError, match="blk.0.ffn_down.weight"):
        peers.write_gguf(Path("unused.gguf"), shape, weights=bad)


def test_scores_are_bits_kl_and_agreement(alike):
    uniform = alike.log_softmax(np.zeros((2, 3, 256), np.float32))
    targets = np.zeros((2, 3), np.int64)
    same = alike.scores(uniform, uniform, targets)
    assert same["bits_per_byte"] == pytest.approx(8.0) and same["kl"] == pytest.approx(0.0, abs=1e-12)
    sharp = np.zeros((2, 3, 256), np.float32)
    sharp[..., 0] = 20.0
    s = alike.scores(alike.log_softmax(sharp), uniform, targets)
    assert s["bits_per_byte"] < 0.01 and s["kl"] > 1.0  # right and confident: few bits, far from uniform
    assert s["top1_agreement"] == 1.0  # argmax of uniform is 0 too


def test_bad_input_is_one_line(tmp_path):
    import subprocess

    script = ROOT / "benchmarks" / "llama_alike.py"
    for args, says in ((["score", "--venv", str(tmp_path)], "no peers venv"), (["score", "--bytes", "10"], "--bytes")):
        out = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=60)
        assert out.returncode == 1 and says in out.stderr and "Traceback" not in out.stderr
