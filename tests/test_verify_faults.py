"""verify cannot be fooled: faults put into an export the way an exporter bug would (the
graph edited, its hashes updated so only the golden comparison can catch it), each of which
an earlier verify passed (issue 30's audit). Each test fails on that tree."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from samout_edge.artifact.golden import chain_lengths
from samout_edge.exporter.onnx_export import ExportOptions, export
from samout_edge.runtime.registry import Settings
from samout_edge.runtime.verify import verify
from tests.test_export import rehash


def edit_graph(directory, change) -> None:
    """``change(model)`` on model.onnx in place, then the hashes made to match."""
    model = onnx.load(str(directory / "model.onnx"))
    change(model)
    onnx.save(model, str(directory / "model.onnx"))
    rehash(directory)


def shortcut_up_to(bound: int, op: str = "Equal"):
    """Layer 0's sequence scan takes its ``length == 1`` shortcut for longer calls too:
    ``Equal(length, bound)`` or ``LessOrEqual(length, bound)``, so those calls skip the running max."""
    def change(model: onnx.ModelProto) -> None:
        if_node = next(n for n in model.graph.node if n.op_type == "If")
        producers = {o: n for n in model.graph.node for o in n.output}
        squeeze = producers[if_node.input[0]]
        equal = producers[squeeze.input[0]]
        assert equal.op_type == "Equal"
        const = producers[equal.input[1]]
        const.attribute[0].t.CopyFrom(numpy_helper.from_array(np.array([bound], np.int64), const.output[0]))
        equal.op_type = op
    return change


@pytest.fixture(scope="module")
def clean(tmp_path_factory, tiny_checkpoint):
    out = tmp_path_factory.mktemp("faults") / "cummax"
    export(out, ExportOptions(max_seq=64), checkpoint=tiny_checkpoint)
    return out


@pytest.mark.parametrize("bound,op", [(2, "Equal"), (10, "LessOrEqual")])
def test_a_decode_shortcut_taken_by_short_calls_fails(clean, tmp_path, bound, op):
    broken = tmp_path / "broken"
    shutil.copytree(clean, broken)
    edit_graph(broken, shortcut_up_to(bound, op))
    result = verify(broken)
    assert not result.passed
    failed = {c.check for c in result.checks if not c.passed}
    assert any(name.startswith("calls") for name in failed), failed  # the golden calls of 2..16 tokens
    assert not result.op_exact  # and the graph's own scan, cut out of it
    inexact = {(r["scan"], r["seq"]) for r in result.op_checks if not r["exact"]}
    assert {seq for _, seq in inexact} == set(range(2, bound + 1)), inexact
    assert all(scan.startswith("graph scan 0") for scan, _ in inexact)


def test_every_short_call_length_is_a_golden_call(clean):
    from samout_edge.artifact.golden import GoldenIndex
    from samout_edge.artifact.manifest import read_manifest

    index = GoldenIndex.from_dict(read_manifest(clean).golden)
    calls = [c for c in index.cases if c.name.startswith("calls")]
    assert [c.seq for c in calls] == chain_lengths(64, 16) == [*range(1, 17), 17]
    assert all(c.state_from is not None for c in calls[1:])  # each continues the state of the one before
    assert {c.seq for c in index.cases if c.past == 0} >= {1, 63, 64}  # max_seq - 1 and max_seq


def negate_scales(model: onnx.ModelProto, name: str, rows: int) -> None:
    """Negate the scales of the first ``rows`` output rows of one weight, as a sign bug would."""
    init = next(i for i in model.graph.initializer if i.name == name)
    scales = numpy_helper.to_array(init).copy()
    scales.reshape(scales.shape[0], -1)[:rows] *= -1
    init.CopyFrom(numpy_helper.from_array(scales, name))


def export_int8_compute(out, checkpoint, monkeypatch=None, rows: int = 0):
    """int4 weights with int8 compute; ``rows`` > 0: an exporter bug negates that many rows'
    scales of layer 0's ffn1 just before the graph is written."""
    from samout_edge.exporter import quantize as qz

    if rows:
        original = qz.quantize_graph

        def buggy(model, *args, **kwargs):
            report = original(model, *args, **kwargs)
            negate_scales(model, "decoder_layers.0.ffn.ffn1.weight.scales", rows)
            return report
        monkeypatch.setattr(qz, "quantize_graph", buggy)
    return export(out, ExportOptions(max_seq=64, weights="int4", activations="int8"), checkpoint=checkpoint)


@pytest.mark.parametrize("rows", [1, 16])
def test_a_wrong_int8_compute_export_cannot_set_its_own_tolerance(tmp_path, tiny_checkpoint, monkeypatch, rows):
    clean = export_int8_compute(tmp_path / "clean", tiny_checkpoint)
    broken = export_int8_compute(tmp_path / "broken", tiny_checkpoint, monkeypatch, rows)
    assert clean.verification.passed
    # the bounds come from PyTorch emulations of the checkpoint's model, never from the graph
    assert broken.manifest.weights.activation_bounds == clean.manifest.weights.activation_bounds
    assert broken.manifest.weights.activation_rtol == clean.manifest.weights.activation_rtol
    assert not broken.verification.passed
    failed = {c.output for c in broken.verification.checks if not c.passed}
    assert "logits: mean KL" in failed, failed  # what a fault moves everywhere
    assert not verify(tmp_path / "broken").passed  # and a fresh verify agrees


def test_an_edited_export_json_cannot_loosen_the_int8_bounds(tmp_path, tiny_checkpoint, monkeypatch):
    import json

    export_int8_compute(tmp_path / "broken", tiny_checkpoint, monkeypatch, rows=16)
    path = tmp_path / "broken" / "export.json"
    data = json.loads(path.read_text())
    data["weights"]["activation_rtol"] = 0.99
    data["weights"]["activation_bounds"] = {f: {"rtol": 0.99, "kl": 0.99, "disagree": 0.99} for f in ("x86", "arm")}
    path.write_text(json.dumps(data))
    result = verify(tmp_path / "broken")
    assert not result.passed and result.rtol <= 0.06  # the ceilings hold whatever export.json says


def test_openvino_labels_and_tolerates_what_it_runs_not_what_it_was_asked(exported, monkeypatch):
    """On a CPU with bf16 but no fp16 arithmetic, OpenVINO's f16 hint computes bf16: verify
    must say bf16 and hold it to bf16's tolerance (this CPU may run f16 as asked, so the
    compile is made to behave as such a CPU's does)."""
    ov = pytest.importorskip("openvino")
    from samout_edge.runtime.openvino_runner import PRECISIONS

    compile_model = ov.Core.compile_model

    def as_on_a_bf16_cpu(self, model, device, config):
        return compile_model(self, model, device, {**config, "INFERENCE_PRECISION_HINT": "bf16"})
    monkeypatch.setattr(ov.Core, "compile_model", as_on_a_bf16_cpu)
    result = verify(exported(arch="softmax").directory, backend="openvino",
                    settings=Settings(openvino_precision="f16"))
    assert result.provider == "CPU:bf16 (f16 asked)"
    assert result.rtol == PRECISIONS["bf16"]


def test_fp16_of_a_trained_checkpoint_without_text_is_refused_in_one_line(tmp_path, run_cli):
    """The audit's softmax fp16, calibrated on random ids only, reached 65,942 on ordinary text (every
    logit NaN in fp16 arithmetic): a checkpoint's fp16 export needs text like what it will read."""
    from pathlib import Path

    trained = Path(__file__).parents[1] / "benchmarks" / "trained" / "softmax"
    code, _, err = run_cli("export", trained, "--arch", "softmax", "--vocab", "bytes", "--dtype", "fp16",
                           "--max-seq", "16", "-o", tmp_path / "o")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and "--calibration-text" in lines[0], err
    assert not (tmp_path / "o").exists()


def test_inspect_says_what_fp16_was_calibrated_on(exported, run_cli):
    code, out, _ = run_cli("inspect", exported(dtype="fp16").directory)
    assert code == 0 and "calibrated on" in out and "tokens of text" in out
