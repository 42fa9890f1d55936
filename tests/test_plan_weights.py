"""`plan` on a quantized export counts its weights as stored; bench and export show them."""

import json

import pytest

from samout_edge.artifact.config import PRESETS
from samout_edge.exporter.onnx_export import ExportOptions, export

TINY = PRESETS["tiny"]


@pytest.fixture(scope="module")
def int4_export(tmp_path_factory, tiny_checkpoint):
    options = ExportOptions(arch="cummax", max_seq=40, weights="int4", weights_format="dq")
    return export(tmp_path_factory.mktemp("q") / "int4", options, checkpoint=tiny_checkpoint, run_verify=False)


def plan_json(run_cli, *args) -> dict:
    code, out, err = run_cli("plan", *args, "--profile", "jetson-orin-nano-8gb", "--contexts", "1024", "--json")
    assert code == 0, err
    return json.loads(out)


def test_plan_counts_an_int4_exports_weights_as_stored(run_cli, exported, int4_export):
    fp = plan_json(run_cli, exported().directory)
    q = plan_json(run_cli, int4_export.directory)
    assert (fp["weights_kind"], q["weights_kind"]) == ("fp", "int4")
    assert q["weights_bytes"] == int4_export.manifest.weights.bytes
    assert q["rows"][0]["cummax"]["weights"] == q["weights_bytes"] < 0.5 * fp["weights_bytes"]
    assert q["rows"][0]["cummax"]["total"] < fp["rows"][0]["cummax"]["total"]
    # quantized weights keep their integers whatever the activations' dtype
    assert plan_json(run_cli, int4_export.directory, "--dtype", "fp16")["weights_bytes"] == q["weights_bytes"]
    # float weights in another dtype than the export's are recounted: parameters x 2 bytes
    fp16 = plan_json(run_cli, exported().directory, "--dtype", "fp16")
    assert fp16["weights_kind"] == "fp" and fp16["weights_bytes"] == 2 * TINY.parameter_count()


def test_plan_table_names_the_weights_kind(run_cli, int4_export):
    code, out, err = run_cli("plan", int4_export.directory, "--profile", "jetson-orin-nano-8gb", "--contexts", "1024")
    assert code == 0, err
    assert "int4 weights" in out and "weights: int4 as stored" in out


def test_export_summary_shows_quantized_weights(capsys, exported, int4_export):
    from samout_edge.cli import render

    render.export_summary(int4_export)
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("weights:"))
    w = int4_export.manifest.weights
    assert f"int4, block {w.block_size}, format dq" in line and "stored" in line and "x of" in line
    assert w.reason.split(":")[0] in out
    render.export_summary(exported())
    assert "weights:" not in capsys.readouterr().out  # float weights: nothing to add
