import json

import numpy as np
import onnx
import pytest

from samout_edge.artifact.files import sha256_file
from samout_edge.artifact.golden import golden_lengths
from samout_edge.artifact.manifest import read_manifest
from samout_edge.errors import SamoutError
from samout_edge.exporter.onnx_export import ExportOptions, export
from samout_edge.lowering import all_nodes
from samout_edge.runtime.ort_runner import load_ort_runner
from samout_edge.runtime.verify import verify

VARIANTS = [(a, d, lo) for a in ("cummax", "softmax") for d in ("fp32", "fp16") for lo in ("native", "custom")]


@pytest.mark.parametrize("arch,dtype,lowering", VARIANTS)
def test_export_verifies(exported, arch, dtype, lowering):
    result = exported(arch=arch, dtype=dtype, lowering=lowering)
    v = result.verification
    assert v.passed and v.op_exact
    # fp16 exports are also computed in fp16 arithmetic (onnx.reference), and carry their calibration text's case
    expected = {"prefill", "decode", "calls", "every"} | ({"long"} if arch == "cummax" else set())
    assert {c.check.split()[0] for c in v.checks} == expected | ({"fp16", "text"} if dtype == "fp16" else set())
    assert v.lengths == [1, 11, 97, 299, 300]  # the golden prefills, and the decode run's
    manifest = read_manifest(result.directory)
    assert manifest.verification["passed"] is True
    assert (manifest.arch, manifest.dtype, manifest.lowering) == (arch, dtype, lowering)


def test_manifest_contract(exported):
    result = exported()
    data = json.loads((result.directory / "export.json").read_text())
    for key in ("schema_version", "arch", "lowering", "opset", "dtype", "logits", "max_seq", "config", "inputs",
                "outputs", "files", "verification", "tools", "source"):
        assert key in data, key
    assert data["config"] == {"vocab_size": 128, "hidden_size": 32, "num_heads": 4, "num_layers": 2}
    assert data["files"]["model.onnx"]["sha256"] == sha256_file(result.directory / "model.onnx")
    assert data["source"]["kind"] == "checkpoint" and len(data["source"]["sha256"]) == 64
    assert data["trace"]["seq"] not in data["verification"]["lengths"]


def test_graph_io_contract(exported):
    model = onnx.load(str(exported(arch="softmax").directory / "model.onnx"))
    shapes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(model.graph.input) + list(model.graph.output)}
    assert shapes["input_ids"] == ["batch", "seq"]
    assert shapes["past_key_values.1.value"] == ["batch", 4, "past_seq", 8]
    assert shapes["present.0.key"] == ["batch", 4, "total_seq", 8]
    assert shapes["logits"] == ["batch", 1, 128]
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["samout_edge.arch"] == "softmax" and meta["samout_edge.max_seq"] == "300"


def test_native_export_has_no_custom_nodes_and_custom_has_cummax_nodes(exported):
    native = onnx.load(str(exported().directory / "model.onnx"))
    assert all(n.domain in ("", "ai.onnx") for n in native.graph.node)
    custom = onnx.load(str(exported(lowering="custom").directory / "model.onnx"))
    assert sum(n.op_type == "CumMax" for n in custom.graph.node) == 2 * 2  # seq + heads, per layer


def test_logits_all(exported):
    result = exported(logits="all")
    runner = load_ort_runner(result.directory)
    logits, _ = runner.run(np.ones((2, 5), np.int64), runner.initial_state(2))
    assert logits.shape == (2, 5, 128) and result.verification.passed


def test_max_seq_4096_matches_at_1_1000_4096(exported):
    result = exported(max_seq=4096)
    v = verify(result.directory, lengths=[1, 1000, 4096])
    assert v.passed and v.lengths == [1, 1000, 4096]


def test_verify_lengths_above_max_seq_are_fed_in_chunks(exported):
    """Issue 16: 301 and 1200 tokens on a max_seq 300 export, against PyTorch on the whole sequence."""
    result = verify(exported().directory, lengths=[301, 1200])
    assert result.passed and result.op_exact
    with pytest.raises(SamoutError, match="must be positive"):
        verify(exported().directory, lengths=[0])


def test_verify_catches_a_wrong_graph(exported, tmp_path):
    """A graph whose weights differ from the checkpoint must fail verification."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(exported().directory, broken)
    model = onnx.load(str(broken / "model.onnx"))
    weight = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    array = onnx.numpy_helper.to_array(weight).copy()
    array *= 1.01  # a 1% weight error, far above the fp32 tolerance
    weight.CopyFrom(onnx.numpy_helper.from_array(array, weight.name))
    onnx.save(model, str(broken / "model.onnx"))
    with pytest.raises(SamoutError, match="does not match the sha256"):
        verify(broken)
    rehash(broken)
    assert not verify(broken).passed


def rehash(directory):
    """What an attacker (or a careless script) does after editing a file: update export.json to match."""
    from samout_edge.artifact.manifest import read_manifest, record_file

    manifest = read_manifest(directory)
    for name in manifest.files:
        record_file(directory, manifest, name)
    manifest.save(directory)


def test_verify_lengths_avoid_trace_length():
    assert golden_lengths(2048, 6) == [1, 97, 2047, 2048]
    assert golden_lengths(5, 5) == [1, 3, 4, 5]
    assert golden_lengths(1, 2) == [1]


def test_export_from_preset_writes_its_checkpoint(tmp_path):
    result = export(tmp_path / "p", ExportOptions(max_seq=8), preset_name="tiny", run_verify=False)
    m = result.manifest
    assert m.source["kind"] == "preset" and (tmp_path / "p" / "checkpoint" / "model.safetensors").is_file()
    assert verify(tmp_path / "p").passed  # finds the checkpoint inside the artifact


def test_opset_17_for_tensorrt_8(tmp_path):
    result = export(tmp_path / "o17", ExportOptions(max_seq=40, opset=17), preset_name="tiny")
    model = onnx.load(str(tmp_path / "o17" / "model.onnx"))
    assert result.verification.passed
    assert {o.domain or "ai.onnx": o.version for o in model.opset_import}["ai.onnx"] == 17
    ops = {n.op_type for n in all_nodes(model.graph.node)}
    assert "CastLike" not in ops and "ReduceProd" not in ops  # TensorRT 8.x parses neither on shapes


def test_max_seq_1(tmp_path):
    result = export(tmp_path / "one", ExportOptions(max_seq=1), preset_name="tiny")
    assert result.verification.passed and result.verification.lengths == [1]


def test_export_from_seed_state_dict(tmp_path):
    import torch

    from tests.seed_reference import SamOut as SeedSamOut

    torch.save(SeedSamOut(128, 32, 4, 2).state_dict(), tmp_path / "seed.pt")
    result = export(tmp_path / "out", ExportOptions(max_seq=40), checkpoint=tmp_path / "seed.pt", heads=4)
    assert result.verification.passed


def test_existing_foreign_directory_is_refused_and_untouched(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(SamoutError, match="pass --force"):
        export(out, ExportOptions(max_seq=8), preset_name="tiny")
    assert (out / "notes.txt").read_text() == "keep me"


def test_earlier_export_is_replaced(tmp_path):
    out = tmp_path / "e"
    export(out, ExportOptions(max_seq=8), preset_name="tiny", run_verify=False)
    export(out, ExportOptions(max_seq=9), preset_name="tiny", run_verify=False)
    assert read_manifest(out).max_seq == 9
    assert [p.name for p in tmp_path.iterdir()] == ["e"]  # no staging leftovers


def test_failure_leaves_no_partial_artifact(tmp_path, monkeypatch):
    import samout_edge.exporter.onnx_export as ex

    def boom(*a, **k):
        raise SamoutError("simulated failure while writing")

    monkeypatch.setattr(ex, "save_model", boom)
    with pytest.raises(SamoutError, match="simulated"):
        export(tmp_path / "x", ExportOptions(max_seq=8), preset_name="tiny")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "options,match",
    [
        (ExportOptions(max_seq=0), "--max-seq must be at least 1"),
        (ExportOptions(arch="rnn"), "unknown arch"),
        (ExportOptions(dtype="int8"), "--dtype"),
        (ExportOptions(opset=16), "--opset must be 17"),
        (ExportOptions(lowering="magic"), "--lowering"),
    ],
)
def test_bad_options(tmp_path, options, match):
    with pytest.raises(SamoutError, match=match):
        export(tmp_path / "x", options, preset_name="tiny")
    assert not (tmp_path / "x").exists()
