"""GPTQ (models/quantize.py ``gptq``, ``export --quantizer gptq --calibration-text``): the
same grid and graph forms as round-to-nearest, rounded knowing the inputs; the export
records it, verifies exactly, and every PyTorch reference reads the grid from the graph.
And int4's asymmetric grid (``--weights-grid asymmetric``): a zero-point per block."""

import json

import numpy as np
import onnx
import pytest
import torch

from samout_edge.artifact.manifest import read_manifest
from samout_edge.exporter.onnx_export import ExportOptions, export
from samout_edge.models import quantize as grid
from samout_edge.models.checkpoint import load_checkpoint
from samout_edge.runtime.registry import load_runner

VOCAB = [chr(i) if 32 <= i < 127 or i == 10 else "" for i in range(128)]  # the tiny preset's 128 ids as characters
TEXT = ("def main(args):\n    for name in sorted(args):\n        print(f'{name}: {len(name)}')\n    return 0\n" * 40)


def correlated_inputs(rng, n: int, cols: int) -> np.ndarray:
    """Inputs whose features move together, as a layer's do (a low-rank mix plus noise)."""
    return (rng.normal(size=(n, 4)) @ rng.normal(size=(4, cols)) + 0.1 * rng.normal(size=(n, cols))).astype(np.float32)


@pytest.mark.parametrize("bits,block", [(4, 16), (4, 32), (8, None)])
def test_gptq_moves_the_layer_output_less_than_rounding_to_nearest(bits, block):
    rng = np.random.default_rng(bits)
    w = rng.normal(size=(24, 64)).astype(np.float32)
    x = correlated_inputs(rng, 2000, 64)
    gram = x.T.astype(np.float64) @ x / len(x)
    out = x @ w.T
    rtn, gq = grid.quantize(w, bits, block), grid.gptq(w, gram, bits, block)
    err_rtn = np.square(x @ grid.dequantize(rtn).T - out).mean()
    err_gptq = np.square(x @ grid.dequantize(gq).T - out).mean()
    assert err_gptq < 0.7 * err_rtn, (err_gptq, err_rtn)
    top = grid.qmax(bits)  # the same grid: integers in the full range, one positive scale per block or row
    assert gq.q.dtype == np.int8 and gq.q.min() >= -top - 1 and gq.q.max() <= top
    assert gq.scale.shape == rtn.scale.shape and (gq.scale > 0).all() and gq.block == rtn.block


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_with_uncorrelated_inputs_gptq_is_rounding_to_nearest(dtype):
    """No error is spread where no input predicts another: the same integers and scales,
    bit for bit, in the weight's own dtype."""
    w = np.random.default_rng(0).normal(size=(8, 64)).astype(dtype)
    a, b = grid.quantize(w, 4, 32), grid.gptq(w, np.eye(64), 4, 32)
    assert np.array_equal(a.q, b.q) and np.array_equal(a.scale, b.scale) and b.scale.dtype == dtype


def test_an_input_the_calibration_never_moved_is_rounded_not_zeroed():
    """GPTQ's usual trick zeroes such weights; an export must stay the checkpoint's
    function for inputs the calibration text never had."""
    rng = np.random.default_rng(1)
    w = rng.normal(size=(8, 32)).astype(np.float32)
    x = correlated_inputs(rng, 500, 32)
    x[:, 5] = 0
    got = grid.gptq(w, x.T.astype(np.float64) @ x / len(x), 4, 32)
    assert np.abs(grid.dequantize(got)[:, 5] - w[:, 5]).max() <= got.scale.max()


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, tiny_checkpoint):
    root = tmp_path_factory.mktemp("gptq")
    text, vocab = root / "calibration.txt", root / "vocab.json"
    text.write_text(TEXT)
    vocab.write_text(json.dumps(VOCAB))
    cache = {}

    def get(weights="int4", fmt="auto", dtype="fp32", arch="cummax", quantizer="auto", grid_kind="symmetric"):
        key = (weights, fmt, dtype, arch, quantizer, grid_kind)
        if key not in cache:
            options = ExportOptions(arch=arch, max_seq=40, weights=weights, weights_format=fmt, dtype=dtype,
                                    calibration_text=text, quantizer=quantizer, weights_grid=grid_kind)
            cache[key] = export(root / "-".join(key), options, checkpoint=tiny_checkpoint, vocab=vocab)
        return cache[key]

    return get


@pytest.mark.parametrize("weights,fmt,dtype,arch", [("int4", "auto", "fp32", "cummax"), ("int4", "dq", "fp32", "softmax"),
                                                    ("int8", "auto", "fp32", "cummax"), ("int4", "auto", "fp16", "cummax")])
def test_a_gptq_export_records_itself_and_verifies_exactly(calibrated, weights, fmt, dtype, arch):
    result = calibrated(weights, fmt, dtype, arch)
    assert result.verification.passed, result.verification.summary()
    w = read_manifest(result.directory).weights
    assert w.quantizer == "gptq" and w.calibration["tokens"] == len(TEXT) and len(w.calibration["sha256"]) == 64
    assert w.rtol(dtype) == {"fp32": 1e-4, "fp16": 5e-3}[dtype]  # no tolerance given up for it


def test_gptq_weights_differ_from_rounding_to_nearest_in_the_graph(calibrated, tiny_checkpoint):
    """What the export holds is GPTQ's grid: read back from the graph, it is not what
    round-to-nearest gives the checkpoint, though on the same grid."""
    d = calibrated().directory
    model = load_checkpoint(tiny_checkpoint).model("cummax")
    modules = grid.quantized_modules(model)
    held = grid.read_grid(onnx.load(str(d / "model.onnx")), {n: tuple(m.weight.shape) for n, m in modules},
                        {n: 8 if isinstance(m, torch.nn.Embedding) else 4 for n, m in modules})
    plain = grid.quantize_model(model, 4, 32, 8)
    linear = [n for n, m in modules if isinstance(m, torch.nn.Linear)]
    assert all(not np.array_equal(held[n].q, plain[n].q) for n in linear)
    embedding = [n for n, m in modules if isinstance(m, torch.nn.Embedding)]
    assert all(np.array_equal(held[n].q, plain[n].q) for n in embedding)  # no inputs to weigh: to nearest


@pytest.mark.parametrize("fmt", ["auto", "dq"])
def test_the_torch_backend_of_a_gptq_export_computes_the_graphs_function(calibrated, fmt):
    d = calibrated("int4", fmt).directory
    ids = np.random.default_rng(2).integers(1, 128, (2, 30))
    with load_runner(d, "ort") as a, load_runner(d, "torch") as b:
        x, _ = a.run(ids, a.initial_state(2))
        y, _ = b.run(ids, b.initial_state(2))
    assert np.abs(x - b.to_numpy(y)).max() <= 1e-4 * max(1.0, float(np.abs(x).max()))


@pytest.mark.parametrize("weights,fmt,dtype,embedding,grid_kind", [
    ("int8", "dq", "fp32", "auto", "symmetric"), ("int8", "matmulnbits", "fp16", "auto", "symmetric"),
    ("int4", "dq", "fp16", "auto", "symmetric"), ("int4", "matmulnbits", "fp32", "int4", "symmetric"),
    ("int4", "dq", "fp32", "auto", "asymmetric"), ("int4", "matmulnbits", "fp16", "int4", "asymmetric")])
def test_the_grid_read_back_from_the_graph_is_the_one_written(tmp_path, tiny_checkpoint, weights, fmt, dtype, embedding,
                                                             grid_kind, tiny_vocab, calibration_text):
    text = calibration_text if dtype == "fp16" else None  # fp16's islands only: the grid stays rounded to nearest
    options = ExportOptions(max_seq=40, weights=weights, weights_format=fmt, dtype=dtype, embedding_weights=embedding,
                            weights_grid=grid_kind, calibration_text=text, quantizer="rtn")
    d = export(tmp_path / "e", options, checkpoint=tiny_checkpoint, run_verify=False,
               vocab=tiny_vocab if text else None).directory
    m = read_manifest(d)
    model = load_checkpoint(tiny_checkpoint).model("cummax", torch.float16 if dtype == "fp16" else torch.float32)
    modules = grid.quantized_modules(model)
    written = grid.quantize_model(model, m.weights.bits, m.weights.block_size, m.weights.embedding_bits,
                                  asymmetric=grid_kind == "asymmetric")
    assert any(qw.asymmetric for qw in written.values()) == (grid_kind == "asymmetric")
    held = grid.read_grid(onnx.load(str(d / "model.onnx")), {n: tuple(x.weight.shape) for n, x in modules},
                        {n: written[n].bits for n in written})
    for name, qw in written.items():
        assert np.array_equal(held[name].q, qw.q) and np.array_equal(held[name].scale, qw.scale), name
        assert held[name].block == qw.block and held[name].scale.dtype == qw.scale.dtype
        assert (held[name].zero is None and qw.zero is None) or np.array_equal(held[name].zero, qw.zero), name


@pytest.mark.parametrize("args,match", [
    (["--weights", "int4", "--quantizer", "gptq"], "--quantizer gptq needs --calibration-text"),
    (["--quantizer", "rtn"], "--quantizer rtn applies to --weights int8/int4"),
    (["--calibration-text", "TEXT"], "--calibration-text applies to --dtype fp16"),
])
def test_gptq_options_are_refused_where_they_do_not_apply(run_cli, tiny_checkpoint, tmp_path, args, match):
    text, vocab = tmp_path / "t.txt", tmp_path / "vocab.json"
    text.write_text(TEXT)
    vocab.write_text(json.dumps(VOCAB))
    code, _, err = run_cli("export", tiny_checkpoint, "-o", tmp_path / "out", "--vocab", vocab,
                           *[str(text) if a == "TEXT" else a for a in args])
    assert code != 0 and match in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_an_explicit_rtn_export_ignores_the_text_for_its_weights(calibrated):
    w = read_manifest(calibrated(dtype="fp16", quantizer="rtn").directory).weights
    assert w.quantizer == "rtn" and w.calibration is None


# --------------------------------------------------------------------------- the asymmetric grid


def test_the_asymmetric_grid_fits_a_skewed_block_far_better():
    """A block whose values sit on one side wastes half the symmetric grid's levels."""
    rng = np.random.default_rng(3)
    w = (rng.uniform(0.2, 1.0, size=(16, 64)) * np.where(rng.random((16, 1)) < 0.5, 1, -1)).astype(np.float32)
    sym, asym = grid.quantize(w, 4, 32), grid.quantize_asymmetric(w, 4, 32)
    assert asym.q.min() >= 0 and asym.q.max() <= 15 and asym.zero.min() >= 0 and asym.zero.max() <= 15
    err = lambda qw: float(np.square(grid.dequantize(qw) - w).mean())  # noqa: E731
    assert err(asym) < 0.5 * err(sym)
    values = grid.dequantize(asym)  # on its own grid: quantizing it again changes nothing
    assert np.array_equal(grid.dequantize(grid.quantize_asymmetric(values, 4, 32)), values)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_asymmetric_gptq_with_uncorrelated_inputs_is_rounding_to_nearest(dtype):
    w = np.random.default_rng(4).normal(size=(8, 64)).astype(dtype)
    a, b = grid.quantize_asymmetric(w, 4, 32), grid.gptq(w, np.eye(64), 4, 32, asymmetric=True)
    assert np.array_equal(a.q, b.q) and np.array_equal(a.scale, b.scale) and np.array_equal(a.zero, b.zero)


@pytest.mark.parametrize("fmt,dtype", [("matmulnbits", "fp32"), ("dq", "fp32"), ("dq", "fp16")])
def test_an_asymmetric_export_verifies_exactly_and_records_its_grid(calibrated, fmt, dtype):
    result = calibrated(fmt=fmt, dtype=dtype, grid_kind="asymmetric")  # fp16: onnx.reference computes it in fp16
    assert result.verification.passed, result.verification.summary()
    w = read_manifest(result.directory).weights
    assert (w.grid, w.quantizer) == ("asymmetric", "gptq") and "zero-point" in w.scheme


def test_the_asymmetric_dq_form_verifies_in_onnx_reference_and_openvino(calibrated):
    from samout_edge.runtime.verify import verify

    d = calibrated(fmt="dq", grid_kind="asymmetric").directory
    assert verify(d, backend="reference").passed
    pytest.importorskip("openvino")
    assert verify(d, backend="openvino").passed


def test_tensorrt_refuses_an_asymmetric_export_in_one_line(calibrated, run_cli, tmp_path):
    from samout_edge.tensorrt.lint import lint_model

    d = calibrated(fmt="dq", grid_kind="asymmetric").directory
    code, _, err = run_cli("build", d, "--profile", "jetson-orin-nano-8gb", "--dry-run")
    assert code == 1 and "zero-points" in err and len(err.strip().splitlines()) == 1, err
    reports = lint_model(onnx.load(str(d / "model.onnx")))
    assert all(any("zero-point is not all zeros" in i.message for i in r.issues) for r in reports)


def test_the_asymmetric_grid_is_refused_where_it_does_not_apply(run_cli, tiny_checkpoint, tmp_path):
    code, _, err = run_cli("export", tiny_checkpoint, "-o", tmp_path / "o", "--weights", "int8",
                           "--weights-grid", "asymmetric")
    assert code != 0 and "--weights-grid asymmetric applies to --weights int4" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_the_grid_is_read_from_external_data_too(tmp_path, tiny_checkpoint, monkeypatch):
    """A model too large for one protobuf keeps its weights in model.onnx.data: the
    torch backend must read the grid from there, not from empty initializers."""
    from samout_edge.exporter import onnx_export

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 0)
    d = export(tmp_path / "e", ExportOptions(max_seq=40, weights="int4"), checkpoint=tiny_checkpoint).directory
    assert (d / "model.onnx.data").is_file()
    ids = np.random.default_rng(5).integers(1, 128, (1, 20))
    with load_runner(d, "ort") as a, load_runner(d, "torch") as b:
        x, _ = a.run(ids, a.initial_state(1))
        y, _ = b.run(ids, b.initial_state(1))
    assert np.abs(x - b.to_numpy(y)).max() <= 1e-4 * max(1.0, float(np.abs(x).max()))
