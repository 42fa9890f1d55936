"""TensorRT build plans, the lint and the engine runner's pure logic, tested here;
the engine build and run tests at the bottom need TensorRT and a GPU."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from samout_edge.errors import SamoutError
from samout_edge.profiles import load_profile
from samout_edge.runtime.tensorrt_runner import (
    ProfileRanges,
    check_compatible,
    resolve_engine,
    select_profile,
)
from samout_edge.tensorrt.build import parser_error_message
from samout_edge.tensorrt.lint import lint_model
from samout_edge.tensorrt.plan import make_plan

NANO = load_profile("jetson-orin-nano-8gb")
NX = load_profile("jetson-orin-nx-16gb")


@pytest.mark.parametrize("arch", ["cummax", "softmax"])
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_plan_for_nano_on_tensorrt_10_3(exported, arch, dtype):
    plan = make_plan(exported(arch=arch, dtype=dtype).directory, NANO, tensorrt="10.3")
    assert plan.strongly_typed == (dtype == "fp16") and plan.fp16_flag == (dtype == "fp32")
    assert not plan.explicit_batch_flag and plan.builder_optimization_level == 3
    assert plan.workspace_bytes == 512 * 2**20 and plan.dla_core is None
    decode, prefill = plan.optimization_profiles
    assert (decode.name, prefill.name) == ("decode", "prefill")
    ids = decode.shapes[0]
    assert (ids.min, ids.opt, ids.max) == ([1, 1], [1, 1], [4, 1])
    assert prefill.shapes[0].max == [1, 300]  # capped at the export's max_seq
    assert any("capped at 300" in n for n in plan.notes)
    state = decode.shapes[1]
    if arch == "cummax":
        assert state.max == [4, 4, 1, 8]
    else:
        assert state.name == "past_key_values.0.key" and state.max == [4, 4, 299, 8]
    line = plan.trtexec
    for part in ("--profile=0", "--profile=1", "--memPoolSize=workspace:512", "--builderOptimizationLevel=3",
                 "--timingCacheFile=", "--skipInference", "--minShapes=input_ids:1x1"):
        assert part in line
    assert ("--stronglyTyped" in line) == (dtype == "fp16") and ("--fp16" in line) == (dtype == "fp32")


def test_plan_for_tensorrt_8_5(exported):
    plan = make_plan(exported().directory, NANO, tensorrt="8.5")
    assert plan.explicit_batch_flag and plan.builder_optimization_level is None and plan.fp16_flag
    assert "--profile=" not in plan.trtexec and "--buildOnly" in plan.trtexec
    assert "--builderOptimizationLevel" not in plan.trtexec


def test_tensorrt_11_needs_precision_in_the_graph(exported):
    with pytest.raises(SamoutError, match="takes precision from the graph"):
        make_plan(exported().directory, NANO, tensorrt="11.1")
    plan = make_plan(exported(dtype="fp16").directory, NANO, tensorrt="11.1")
    assert plan.strongly_typed and not plan.fp16_flag and "--stronglyTyped" not in plan.trtexec
    assert make_plan(exported().directory, NANO, tensorrt="11.1", precision="fp32").precision == "fp32"


def test_dla_only_where_the_profile_has_it(exported):
    d = exported(dtype="fp16").directory
    with pytest.raises(SamoutError, match="has no DLA cores"):
        make_plan(d, NANO, tensorrt="10.3", dla_core=0)
    with pytest.raises(SamoutError, match="--dla-core must be 0..1"):
        make_plan(d, NX, tensorrt="10.3", dla_core=2)
    plan = make_plan(d, NX, tensorrt="10.3", dla_core=1)
    assert plan.dla_core == 1 and plan.gpu_fallback
    assert "--useDLACore=1" in plan.trtexec and "--allowGPUFallback" in plan.trtexec


def test_custom_lowering_per_tensorrt_version(exported):
    d = exported(lowering="custom").directory
    with pytest.raises(SamoutError, match="--lowering native"):
        make_plan(d, NANO, tensorrt="8.6")
    assert any("local-function body" in n for n in make_plan(d, NANO, tensorrt="10.3").notes)
    plan = make_plan(d, NANO, tensorrt="10.13")
    assert plan.plugins == ["samout_edge::CumMax"] and any("ahead-of-time" in n for n in plan.notes)


def test_build_dry_run_cli_json(run_cli, exported):
    code, out, err = run_cli("build", exported().directory, "--profile", "jetson-orin-nano-8gb", "--dry-run", "--json")
    data = json.loads(out)
    assert code == 0, err
    assert data["profile"] == "jetson-orin-nano-8gb" and data["tensorrt"] == "10.3"
    assert len(data["optimization_profiles"]) == 2 and data["trtexec"].startswith("trtexec --onnx=")
    code, out, _ = run_cli("build", exported().directory, "--profile", "jetson-orin-nano-8gb", "--dry-run")
    assert code == 0 and "trtexec equivalent" in out


def test_real_build_without_tensorrt_says_so(run_cli, exported):
    pytest.importorskip("torch")
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except Exception:
        pass
    code, _, err = run_cli("build", exported().directory, "--profile", "jetson-orin-nano-8gb")
    assert code == 1 and "TensorRT is not installed here" in err


def test_build_bad_input(run_cli, exported, tmp_path):
    d = exported().directory
    (tmp_path / "bad.toml").write_text('name = "x"\n')
    for args, match in [
        (["--profile", "nope", "--dry-run"], "unknown profile"),
        (["--profile", str(tmp_path / "bad.toml"), "--dry-run"], "field 'kind' is missing"),
        (["--profile", "jetson-orin-nano-8gb", "--dry-run", "--precision", "int8"], "--precision must be"),
    ]:
        code, _, err = run_cli("build", d, *args)
        assert code == 1 and match in err


def test_engine_compatibility_check(tmp_path):
    meta = {"tensorrt": "10.3.0.30", "gpu": "Orin", "compute_capability": "8.7", "profile": "jetson-orin-nano-8gb"}
    check_compatible(meta, "10.3.0.30", "Orin", "8.7", tmp_path)
    with pytest.raises(SamoutError, match="built with TensorRT 10.3.0.30, this machine has 10.13.3.9.*samout-edge build"):
        check_compatible(meta, "10.13.3.9", "Orin", "8.7", tmp_path)
    with pytest.raises(SamoutError, match=r"built for Orin \(sm 8.7\), this machine has NVIDIA H100.*--profile jetson-orin-nano-8gb"):
        check_compatible(meta, "10.3.0.30", "NVIDIA H100", "9.0", tmp_path)


def test_profile_selection():
    ranges = [ProfileRanges("decode", 0, (1, 4), (1, 1), (0, 4095)), ProfileRanges("prefill", 1, (1, 1), (1, 2048), (0, 2048))]
    assert select_profile(ranges, 1, 1, 100).name == "decode"
    assert select_profile(ranges, 1, 300, 0).name == "prefill"
    assert select_profile(ranges, 1, 1, 3000).name == "decode"
    with pytest.raises(SamoutError, match="outside every optimization profile"):
        select_profile(ranges, 2, 300, 0)


def test_resolve_engine_dirs(exported, tmp_path):
    d = exported().directory
    with pytest.raises(SamoutError, match="has no TensorRT engine"):
        resolve_engine(d)
    with pytest.raises(SamoutError, match="no engine for profile 'jetson-thor'"):
        resolve_engine(d, "jetson-thor")
    with pytest.raises(SamoutError, match="neither an export directory nor an engine directory"):
        resolve_engine(tmp_path)


def test_parser_error_names_node_and_op():
    nodes = [helper.make_node("Relu", ["a"], ["b"], name="first"), helper.make_node("Unique", ["b"], ["c"], name="odd")]
    assert parser_error_message("no importer", -1, "n7", "CumMax", nodes) == \
        "TensorRT's ONNX parser failed at node 'n7' (CumMax): no importer"
    assert "node 'odd' (Unique)" in parser_error_message("unsupported", 1, "", "", nodes)  # TensorRT 8.x: index only


# --------------------------------------------------------------------------- lint


def lint_by_version(model):
    return {r.version: r for r in lint_model(model)}


def test_native_export_is_compatible_from_jetpack_6_1(exported):
    reports = lint_by_version(onnx.load(str(exported().directory / "model.onnx")))
    for version in ("10.3", "10.13", "11.1"):
        assert reports[version].compatible and not reports[version].issues
    assert not reports["8.5"].compatible  # LayerNormalization
    assert any(i.op == "LayerNormalization" for i in reports["8.5"].issues)


def test_opset_17_with_decomposed_layernorm_is_compatible_everywhere(tmp_path):
    from samout_edge.exporter.onnx_export import ExportOptions, export

    export(tmp_path / "e", ExportOptions(max_seq=40, opset=17, dtype="fp16", decompose_layernorm=True),
           preset_name="tiny")
    reports = lint_model(onnx.load(str(tmp_path / "e" / "model.onnx")))
    assert all(r.compatible for r in reports), [(r.version, r.issues[:2]) for r in reports if not r.compatible]


def test_custom_export_needs_plugin_or_functions(exported):
    reports = lint_by_version(onnx.load(str(exported(lowering="custom").directory / "model.onnx")))
    assert not reports["8.6"].compatible
    assert any("no local functions" in i.message for i in reports["8.6"].issues)
    assert reports["10.3"].compatible and any("local-function body" in i.message for i in reports["10.3"].issues)
    assert any("CumMax plugin" in i.message for i in reports["10.13"].issues)


def test_lint_names_unsupported_node_and_computed_axes():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, None)
    nodes = [
        helper.make_node("Unique", ["x"], ["u"], name="my_unique"),
        helper.make_node("Shape", ["x"], ["s"], name="shape"),
        helper.make_node("Slice", ["s", "s", "s"], ["axes"], name="computed_axes"),
        helper.make_node("Slice", ["x", "s", "s", "axes"], ["y"], name="bad_slice"),
        helper.make_node("Identity", ["u"], ["z"], name="id"),
    ]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y, z]), opset_imports=[helper.make_opsetid("", 18)])
    reports = lint_by_version(model)
    messages = {(i.node, i.op): i.message for i in reports["10.3"].issues}
    assert "not supported by TensorRT 10.3" in messages[("my_unique", "Unique")]
    assert "needs it constant" in messages[("bad_slice", "Slice")]
    assert not reports["10.3"].compatible


def test_inspect_shows_the_lint(run_cli, exported):
    code, out, _ = run_cli("inspect", exported().directory)
    assert code == 0 and "TensorRT compatibility" in out and "compatible" in out
    code, out, _ = run_cli("inspect", exported().directory, "--json")
    data = json.loads(out)
    assert [r["version"] for r in data["lint"]] == ["8.5", "8.6", "10.3", "10.13", "11.1"]


# --------------------------------------------------------------------------- on TensorRT + GPU


@pytest.mark.tensorrt
@pytest.mark.parametrize("lowering", ["native", "custom"])
def test_engine_builds_runs_and_verifies(exported, lowering):
    from samout_edge.profiles import load_profile
    from samout_edge.runtime.registry import LoadOptions, load_runner
    from samout_edge.runtime.verify import verify
    from samout_edge.tensorrt.build import build_engine

    d = exported(dtype="fp16", lowering=lowering).directory
    plan = make_plan(d, load_profile("rtx-desktop"))
    result = build_engine(plan)
    assert result.engine.is_file() and result.meta["onnx_sha256"]
    assert verify(result.engine.parent).passed
    runner = load_runner(d, "tensorrt", LoadOptions(engine="rtx-desktop"))
    logits, state = runner.run(np.ones((1, 5), np.int64), runner.initial_state(1))
    assert tuple(logits.shape) == (1, 1, 128)
    logits, state = runner.run(np.ones((1, 1), np.int64), state)  # decode profile, state fed back
    assert np.isfinite(runner.to_numpy(logits)).all()


@pytest.mark.tensorrt
def test_engine_bench_and_generate(exported, run_cli):
    from samout_edge.tensorrt.build import build_engine

    for arch in ("cummax", "softmax"):
        d = exported(arch=arch, dtype="fp16").directory
        build_engine(make_plan(d, load_profile("rtx-desktop")))
    engine_dir = exported(dtype="fp16").directory / "engines" / "rtx-desktop"
    code, out, err = run_cli("generate", engine_dir, "--ids", "1,2,3", "--max-new-tokens", "8")
    assert code == 0, err
