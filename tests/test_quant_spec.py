"""The one quantization spec (artifact/quantization.py ``Weights``): built once from export's
options, every ``auto`` resolved, carried as it is into export.json, and described in the
same words by export's summary and by inspect."""

from dataclasses import replace

import pytest

from samout_edge.artifact.manifest import read_manifest
from samout_edge.artifact.quantization import DISABLE_KLEIDIAI, ORT_SESSION_CONFIG, REASONS, SCHEME, Weights
from samout_edge.errors import SamoutError
from samout_edge.exporter.onnx_export import ExportOptions, export


def test_the_autos_resolve_once():
    fp = Weights.from_options()
    assert fp == Weights() and not fp.quantized and fp.describe() == []
    int4 = Weights.from_options("int4")
    assert (int4.block_size, int4.format, int4.embedding, int4.quantizer, int4.grid) == \
        (32, "matmulnbits", "int8", "rtn", "symmetric")
    assert int4.reason == REASONS["auto"]["int4"] and int4.scheme == SCHEME
    assert int4.ort_session_config == ORT_SESSION_CONFIG["matmulnbits"]
    int8 = Weights.from_options("int8", opset=13)
    assert (int8.block_size, int8.format, int8.embedding) == (None, "dq", None)
    assert Weights.from_options("int4", quantizer="auto", calibrated=True).quantizer == "gptq"
    compute = Weights.from_options("int4", activations="int8")
    assert compute.format == "matmulnbits" and compute.ort_session_config[DISABLE_KLEIDIAI] == "1"
    asymmetric = Weights.from_options("int4", format="dq", grid="asymmetric")
    assert "not TensorRT" in asymmetric.reason and asymmetric.scheme != SCHEME
    for spec in (int4, int8, asymmetric):  # int8 activations: complete once export measured their bounds
        assert Weights.from_dict(spec.to_dict()) == spec  # what export.json holds checks as it is


@pytest.mark.parametrize("kwargs,match", [
    (dict(kind="int3"), "--weights 'int3' is not one of"),
    (dict(kind="int4", format="gguf"), "--weights-format 'gguf'"),
    (dict(kind="fp", quantizer="rtn"), "--quantizer rtn applies to --weights int8/int4"),
    (dict(kind="int4", quantizer="gptq"), "needs --calibration-text"),
    (dict(kind="int4", format="dq", activations="int8"), "takes --weights int8 or int4"),
    (dict(kind="int8", embedding="int4"), "--embedding-weights applies to --weights int4"),
    (dict(kind="int8", grid="asymmetric"), "applies to --weights int4"),
    (dict(kind="fp", block_size=32), "--block-size applies to --weights int4 only"),
    (dict(kind="int4", block_size=24), "power of two"),
    (dict(kind="int4", opset=18), "needs --opset 21"),
])
def test_each_option_is_refused_in_the_clis_words(kwargs, match):
    with pytest.raises(SamoutError, match=match):
        Weights.from_options(**kwargs)


def test_what_depends_on_the_model_is_checked_against_its_hidden_size():
    with pytest.raises(SamoutError, match="does not divide the hidden size 48"):
        Weights.from_options("int4", 32, "dq").check_model(48)
    with pytest.raises(SamoutError, match="with int8 needs a hidden size divisible by 16"):
        Weights.from_options("int8", format="matmulnbits").check_model(40)
    Weights.from_options("int8", format="dq").check_model(40)


def test_the_spec_is_built_once_and_is_export_jsons_record(tmp_path, tiny_checkpoint):
    options = ExportOptions(max_seq=16, weights="int4", block_size=16, weights_format="dq").validate()
    built = options.quantization
    result = export(tmp_path / "q", options, checkpoint=tiny_checkpoint, run_verify=False)
    # validate() ran again inside export: a fresh spec, the one object the manifest then carried and completed
    assert result.manifest.weights is options.quantization
    assert replace(options.quantization, bytes=None, float_bytes=None) == built
    recorded = read_manifest(tmp_path / "q").weights
    assert recorded == result.manifest.weights and recorded.bytes > 0


def test_export_and_inspect_describe_the_weights_in_the_same_words(tmp_path, tiny_checkpoint, calibration_text,
                                                                     tiny_vocab, run_cli):
    out = tmp_path / "gptq"
    code, exported, err = run_cli("export", tiny_checkpoint, "-o", out, "--max-seq", "24", "--weights", "int4",
                                  "--weights-grid", "asymmetric", "--activations", "int8",
                                  "--calibration-text", calibration_text, "--vocab", tiny_vocab)
    assert code == 0, err
    lines = read_manifest(out).weights.describe()
    tokens = read_manifest(out).weights.calibration["tokens"]
    assert lines[0].startswith("weights: int4, block 32, format matmulnbits, embedding table int8, asymmetric grid")
    assert lines[1].startswith(f"rounded with GPTQ on {tokens:,} tokens of the calibration text")
    assert lines[2].startswith("activations: int8 in the MatMuls")
    code, inspected, err = run_cli("inspect", out)
    assert code == 0, err
    for line in lines:
        assert line in exported.splitlines() and line in inspected.splitlines()
    code, as_json, err = run_cli("inspect", out, "--json")
    assert '"quantization"' in as_json
