"""fp16 exports are right in fp16 arithmetic (issue 15 item 1): the trained pair's FFN
overflows fp16 on real text; the export calibrates, keeps those blocks in fp32, and
is checked where fp16 is computed as fp16 (onnx.reference, PyTorch fp16), not only
in ONNX Runtime's CPU provider, which computes fp16 graphs in fp32."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from samout_edge.artifact.manifest import read_manifest
from samout_edge.artifact.quantization import RTOL
from samout_edge.errors import SamoutError
from samout_edge.exporter import precision as fp
from samout_edge.exporter.onnx_export import ExportOptions, export
from samout_edge.models.checkpoint import load_checkpoint, random_checkpoint, save_checkpoint
from samout_edge.runtime.registry import load_runner
from samout_edge.runtime.verify import verify
from tests.test_cli import one_error_line

ROOT = Path(__file__).parents[1]
TRAINED = ROOT / "benchmarks" / "trained" / "cummax"
SCALE = 4.0


@pytest.fixture(scope="module")
def overflowing(tmp_path_factory) -> Path:
    """The trained SamOut with each FFN's inner product scaled up 4x and ffn2 scaled down 4x:
    the same function in fp32, but its FFN products (about 43,000 on held-out text) pass fp16's
    65,504, as the earlier pair's did on their own (98,900), and as real models' can."""
    model = load_checkpoint(TRAINED).model("cummax")
    with torch.no_grad():
        for layer in model.decoder_layers:
            layer.ffn.ffn1.weight.mul_(SCALE)
            layer.ffn.ffn1.bias.mul_(SCALE)
            layer.ffn.ffn2.weight.div_(SCALE)
    path = tmp_path_factory.mktemp("overflowing") / "cummax"
    save_checkpoint(model, path)
    return path
MAX_SEQ = 512


@pytest.fixture(scope="module")
def heldout(tmp_path_factory) -> Path:
    """The start of the pair's held-out text (the running Python's standard library)."""
    path = tmp_path_factory.mktemp("text") / "heldout.txt"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_set.py"), "--write-heldout", str(path),
                    "--max-bytes", "8192"], check=True, capture_output=True)
    return path


@pytest.fixture(scope="module")
def pair_fp16(tmp_path_factory, heldout, overflowing):
    out = tmp_path_factory.mktemp("pair") / "fp16"
    options = ExportOptions(dtype="fp16", max_seq=MAX_SEQ, logits="all", calibration_text=heldout)
    return export(out, options, checkpoint=overflowing)


def first_window(heldout: Path) -> np.ndarray:
    return np.frombuffer(heldout.read_bytes()[:256], np.uint8).astype(np.int64)[None]


def test_the_unprotected_fp16_model_overflows_on_real_text(heldout, overflowing):
    """The bug as found: the model in plain fp16 (PyTorch) gives non-finite logits on held-out text,
    while in fp32 it is the trained model exactly."""
    with torch.inference_mode():
        scaled, _ = load_checkpoint(overflowing).model("cummax")(torch.from_numpy(first_window(heldout)))
        trained, _ = load_checkpoint(TRAINED).model("cummax")(torch.from_numpy(first_window(heldout)))
    assert torch.allclose(scaled, trained, rtol=1e-4, atol=1e-4)
    model = load_checkpoint(overflowing).model("cummax", torch.float16)
    with torch.inference_mode():
        logits, _ = model(torch.from_numpy(first_window(heldout)))
    assert not torch.isfinite(logits).all()


def test_the_fp16_export_is_right_in_fp16_arithmetic(pair_fp16, heldout, overflowing):
    """onnx.reference computes the graph in fp16 as a Jetson does: finite, and within verify's fp16
    tolerance of PyTorch fp32, where the unprotected graph was NaN; OpenVINO (f32) and ONNX Runtime agree."""
    d = pair_fp16.directory
    precision = read_manifest(d).precision
    assert precision["fp32_islands"] and all(i.startswith("decoder_layers.") for i in precision["fp32_islands"])
    assert max(precision["peaks"].values()) > fp.FP16_MAX  # it would overflow without them
    meta = {p.key: p.value for p in onnx.load(str(d / "model.onnx"), load_external_data=False).metadata_props}
    assert json.loads(meta["samout_edge.fp32_islands"]) == precision["fp32_islands"]
    ids = first_window(heldout)
    reference = load_checkpoint(overflowing).model("cummax")
    with torch.inference_mode():
        want = reference(torch.from_numpy(ids))[0].numpy()
    tolerance = RTOL["fp16"] * max(1.0, float(np.abs(want).max()))
    for backend in ("reference", "ort"):
        with load_runner(d, backend) as runner:
            logits, _ = runner.run(ids, runner.initial_state(1))
            assert np.isfinite(logits).all(), backend
            assert np.abs(logits.astype(np.float64) - want).max() <= tolerance, backend
    ov = pytest.importorskip("openvino")
    compiled = ov.Core().compile_model(str(d / "model.onnx"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    with load_runner(d, "ort") as runner:
        feed = {"input_ids": ids, **runner.initial_state(1)}
    got = {o.get_any_name(): v for o, v in compiled(feed).items()}["logits"]
    assert np.abs(got.astype(np.float64) - want).max() <= tolerance
    # PyTorch fp16 with the export's islands: the exporter's own fp16 check, on the text
    model = load_checkpoint(overflowing).model("cummax", torch.float16)
    fp.set_islands(model, precision["fp32_islands"])
    with torch.inference_mode():
        logits = model(torch.from_numpy(ids))[0].float().numpy()
    assert np.isfinite(logits).all() and np.abs(logits - want).max() <= tolerance


def test_verify_computes_an_fp16_export_in_fp16_too(pair_fp16):
    result = verify(pair_fp16.directory)
    assert result.passed and result.fp16_arithmetic.startswith("onnx.reference")
    arithmetic = [c for c in result.checks if c.check.startswith("fp16 arithmetic:")]
    assert arithmetic and all(c.passed for c in arithmetic)
    check = read_manifest(pair_fp16.directory).precision["pytorch_fp16"]
    assert check["passed"] and check["finite"] and check["cases"] >= 8
    names = [c["name"] for c in read_manifest(pair_fp16.directory).golden["cases"]]
    assert f"text 1x{MAX_SEQ}" in names  # the calibration text is a golden case: real activations on the device


def test_verify_catches_an_fp16_graph_that_overflows(pair_fp16, tmp_path, overflowing):
    """The pair's graph traced without its islands (what export wrote before) fails verify in fp16
    arithmetic, where ONNX Runtime's CPU provider alone passes it."""
    import shutil

    from samout_edge.exporter.onnx_export import finalize, trace_to_onnx
    from tests.test_export import rehash

    d = tmp_path / "unprotected"
    shutil.copytree(pair_fp16.directory, d)
    manifest = read_manifest(d)
    manifest.precision = None
    options = ExportOptions(dtype="fp16", max_seq=MAX_SEQ, logits="all").validate()
    proto = trace_to_onnx(load_checkpoint(overflowing).model("cummax", torch.float16), options, manifest.trace["batch"],
                          manifest.trace["seq"])
    finalize(proto, manifest, static_lengths={1: manifest.config.num_heads})
    onnx.save(proto, str(d / "model.onnx"))
    rehash(d)
    assert verify(d, fp16_seconds=0).passed  # ONNX Runtime's CPU provider upcasts: it sees nothing wrong
    result = verify(d)
    assert not result.passed
    assert any(not c.passed for c in result.checks if c.check.startswith("fp16 arithmetic:"))


def test_an_fp16_export_that_cannot_be_made_safe_is_refused_in_one_line(tmp_path, run_cli, tiny_vocab,
                                                                        calibration_text):
    """The projections (and the state made of them) and the residual stream are fp16 by contract: an
    embedding that drives them past fp16's range cannot be islanded."""
    from samout_edge.artifact.config import PRESETS

    model = random_checkpoint(PRESETS["tiny"], seed=0)
    with torch.no_grad():
        model.em.weight.mul_(1e5)
    save_checkpoint(model, tmp_path / "ck")
    code, _, err = run_cli("export", tmp_path / "ck", "-o", tmp_path / "o", "--dtype", "fp16", "--max-seq", "16",
                           "--vocab", tiny_vocab, "--calibration-text", calibration_text)
    line = one_error_line(err)
    assert code == 1 and "cannot be made safe" in line and "layer 0's projections" in line and "--dtype fp32" in line
    assert not (tmp_path / "o").exists()
    code, _, err = run_cli("export", tmp_path / "ck", "-o", tmp_path / "o", "--max-seq", "16",
                           "--calibration-text", tmp_path / "ck" / "config.json")
    assert code == 1 and "applies to --dtype fp16" in one_error_line(err)


def test_islands_follow_the_peaks():
    peaks = {"decoder_layers.0.ffn": 100.0, "decoder_layers.1.ffn": 90_000.0, "decoder_layers.1.mix": 20_000.0,
             "decoder_layers.0.projection": 50.0, "stream": 40.0, "logits": 30.0}
    assert fp.choose_islands(peaks, 2) == ["decoder_layers.1.self_attention", "decoder_layers.1"]
    assert fp.choose_islands({"stream": 10.0}, 2) == []
    with pytest.raises(SamoutError, match="layer 0's projections .self_attention.combined. reaches 70,000"):
        fp.choose_islands({"decoder_layers.0.projection": 70_000.0}, 2)
    assert fp.part_of("decoder_layers.3.ffn.gate", "cummax") == "decoder_layers.3.ffn"
    assert fp.part_of("decoder_layers.3", "cummax") == "decoder_layers.3.ffn"  # the blend
    assert fp.part_of("decoder_layers.3.self_attention.combined", "softmax") == "decoder_layers.3.projection"
    assert fp.part_of("head", "cummax") == "logits" and fp.part_of("em", "cummax") == "stream"


def test_softmax_attention_scores_are_calibrated():
    """The exported graph computes every q k^T before masking: the calibration sees their peak."""
    from samout_edge.artifact.config import PRESETS

    model = random_checkpoint(PRESETS["tiny"], seed=0)
    model = type(model)(model.config, "softmax")
    model.load_state_dict(random_checkpoint(PRESETS["tiny"], seed=0).state_dict())
    with torch.no_grad():
        for layer in model.decoder_layers:
            layer.self_attention.combined.weight.mul_(300)
    peaks, _ = fp.measure_peaks(model.eval(), iter([(np.arange(1, 20)[None], False)]))
    assert peaks["decoder_layers.0.mix"] > fp.FP16_MAX > 10 * peaks["decoder_layers.0.projection"]


def test_an_fp16_int4_export_keeps_its_islands_quantized(tmp_path, heldout, overflowing):
    """fp16 activations with int4 weights (how a Jetson runs a quantized model): the island's weights
    stay int4 (DequantizeLinear, then Cast to fp32), and the export holds in fp16 arithmetic."""
    options = ExportOptions(dtype="fp16", max_seq=MAX_SEQ, logits="all", calibration_text=heldout, weights="int4",
                            weights_format="dq")
    result = export(tmp_path / "e", options, checkpoint=overflowing)
    assert result.verification.passed and result.verification.fp16_arithmetic.startswith("onnx.reference")
    islands = result.manifest.precision["fp32_islands"]
    model = onnx.load(str(result.directory / "model.onnx"))
    dequantized = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    casts = [n for n in model.graph.node if n.op_type == "Cast" and n.input[0] in dequantized]
    assert islands and len(casts) == 3 * len(islands)  # ffn1, ffn2, gate of each FFN island
    assert not any(t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2 and min(t.dims) >= 32
                   for t in model.graph.initializer)  # no float weight matrix left
