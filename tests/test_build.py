"""TensorRT build plans, the lint and the engine runner's pure logic, tested here;
the engine build and run tests at the bottom need TensorRT and a GPU."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from samout_edge.artifact.arch import arch_spec
from samout_edge.artifact.engine import (
    EngineMeta,
    OptimizationProfile,
    ShapeRange,
    check_compatible,
    resolve_engine,
)
from samout_edge.errors import SamoutError
from samout_edge.profiles import load_profile
from samout_edge.runtime.tensorrt_runner import ProfileRanges, profile_ranges, select_profile
from samout_edge.tensorrt import versions
from samout_edge.tensorrt.build import engine_paths, engine_plugins, parser_error_message, read_timing_cache
from samout_edge.tensorrt.lint import lint_model, needs_constant
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
    for old in ("8.6", "9.0"):  # 9.0 parses local functions, but not the body's CastLike
        with pytest.raises(SamoutError, match="--lowering native"):
            make_plan(d, NANO, tensorrt=old)
    plan = make_plan(d, NANO, tensorrt="10.3")
    assert plan.cummax == "function" and any("local-function body" in n for n in plan.notes)
    # 10.6 has quickly deployable plugins, but its parser takes the local function first
    plan = make_plan(d, NANO, tensorrt="10.6")
    assert plan.cummax == "function" and any("prefers a model-local function" in n for n in plan.notes)
    assert "samout-edge plugin" not in plan.trtexec and engine_plugins(plan) == []  # the build registers nothing
    assert make_plan(d, NANO, tensorrt="10.7").cummax == "jit"
    plan = make_plan(d, NANO, tensorrt="10.13")
    assert plan.plugins == ["samout_edge::CumMax"] and plan.cummax == "aot" and engine_plugins(plan) == plan.plugins
    assert any("ahead-of-time" in n for n in plan.notes) and "samout-edge plugin" in plan.trtexec


def test_versions_table():
    v = versions.version_tuple
    assert v("10.3") == (10, 3) and v("10.13.0.35") == (10, 13) and v("10.0.0b6") == (10, 0) and v("11.1") == (11, 1)
    for garbage in ("7.0", "-1.-5", "abc", "", "10", "12.0", "10.3.x", "8.4"):
        with pytest.raises(SamoutError, match="TensorRT|not a TensorRT version"):
            v(garbage)
    assert versions.STRONGLY_TYPED.available("9.0") and not versions.STRONGLY_TYPED.available("8.6")
    assert versions.EXPLICIT_BATCH_REQUIRED.available("9.3") and not versions.EXPLICIT_BATCH_REQUIRED.available("10.0")
    assert versions.EXPLICIT_BATCH_FLAG.available("10.13") and not versions.EXPLICIT_BATCH_FLAG.available("11.0")
    assert not versions.WEAK_TYPING.available("11.0") and versions.WEAK_TYPING.available("10.13")
    runner = versions.cummax_runner
    assert [runner(x) for x in ("8.6", "9.0", "9.1", "10.3", "10.6", "10.7", "10.8", "10.9", "11.1")] == \
        ["none", "none", "function", "function", "function", "jit", "jit", "aot", "aot"]
    assert runner("10.6", has_function=False) == "jit" and runner("10.3", has_function=False) == "none"
    names = [f.name for f in versions.FEATURES]
    assert len(names) == len(set(names))


def test_import_tensorrt_refuses_the_stubs():
    try:
        import tensorrt
    except Exception:
        tensorrt = None
    if tensorrt is not None and isinstance(getattr(tensorrt, "__version__", None), str) and hasattr(tensorrt, "Builder"):
        pytest.skip("a real TensorRT is installed here")
    with pytest.raises(SamoutError, match="TensorRT is not installed here"):
        versions.import_tensorrt()
    assert versions.installed_version() is None


def test_plan_strongly_typed_from_9_0(exported):
    plan = make_plan(exported(dtype="fp16").directory, NANO, tensorrt="9.0")
    assert plan.strongly_typed and not plan.fp16_flag and "--stronglyTyped" in plan.trtexec
    assert plan.explicit_batch_flag and "--profile=1" in plan.trtexec
    plan = make_plan(exported(dtype="fp16").directory, NANO, tensorrt="8.6")
    assert not plan.strongly_typed and plan.fp16_flag


def test_engine_paths_stay_under_the_export(exported, tmp_path):
    plan = make_plan(exported().directory, NANO, tensorrt="10.3")
    engine, meta = engine_paths(plan)
    assert engine == exported().directory / "engines" / NANO.name / "model.engine" and meta.name == "engine.json"
    plan.engine = str(tmp_path / "elsewhere.engine")
    with pytest.raises(SamoutError, match="engines live at"):
        engine_paths(plan)
    plan = make_plan(exported().directory, NANO, tensorrt="10.3")
    plan.profile = "../../escape"
    with pytest.raises(SamoutError, match="names a directory"):
        engine_paths(plan)


def test_timing_cache_that_cannot_be_used_is_a_note(tmp_path):
    assert read_timing_cache(tmp_path / "missing.cache") == (None, None)
    (tmp_path / "empty.cache").write_bytes(b"")
    data, note = read_timing_cache(tmp_path / "empty.cache")
    assert data is None and "is empty" in note
    (tmp_path / "dir.cache").mkdir()
    data, note = read_timing_cache(tmp_path / "dir.cache")
    assert data is None and "unreadable" in note
    (tmp_path / "ok.cache").write_bytes(b"bytes TensorRT judges")
    assert read_timing_cache(tmp_path / "ok.cache") == (b"bytes TensorRT judges", None)


def test_build_dry_run_cli_json(run_cli, exported):
    code, out, err = run_cli("build", exported().directory, "--profile", "jetson-orin-nano-8gb", "--dry-run", "--json")
    data = json.loads(out)
    assert code == 0, err
    assert data["profile"] == "jetson-orin-nano-8gb" and data["tensorrt"] == "10.3"
    assert len(data["optimization_profiles"]) == 2 and data["trtexec"].startswith("trtexec --onnx=")
    code, out, _ = run_cli("build", exported().directory, "--profile", "jetson-orin-nano-8gb", "--dry-run")
    assert code == 0 and "trtexec equivalent" in out


def test_real_build_without_tensorrt_says_so(run_cli, exported):
    if versions.installed_version() is not None:
        pytest.skip("TensorRT is installed here")
    code, _, err = run_cli("build", exported().directory, "--profile", "jetson-orin-nano-8gb")
    assert code == 1 and "TensorRT is not installed here" in err


def test_build_bad_input(run_cli, exported, tmp_path):
    d = exported().directory
    (tmp_path / "bad.toml").write_text('name = "x"\n')
    for args, match in [
        (["--profile", "nope", "--dry-run"], "unknown profile"),
        (["--profile", str(tmp_path / "bad.toml"), "--dry-run"], "field 'kind' is missing"),
    ]:
        code, _, err = run_cli("build", d, *args)
        assert code == 1 and match in err
    # the CLI may refuse a bad precision itself (usage error, exit 2) before the plan does (exit 1)
    code, _, err = run_cli("build", d, "--profile", "jetson-orin-nano-8gb", "--dry-run", "--precision", "int8")
    assert code in (1, 2) and "precision" in err
    with pytest.raises(SamoutError, match="--precision must be fp16 or fp32"):
        make_plan(d, NANO, tensorrt="10.3", precision="int8")


def _meta(**changes) -> EngineMeta:
    shapes = [ShapeRange("input_ids", [1, 1], [1, 1], [4, 1]), ShapeRange("past_max.0", [1, 4, 1, 8], [1, 4, 1, 8], [4, 4, 1, 8])]
    prefill = [ShapeRange("input_ids", [1, 1], [1, 64], [1, 300]),
               ShapeRange("past_max.0", [1, 4, 1, 8], [1, 4, 1, 8], [1, 4, 1, 8])]
    fields = dict(tensorrt="10.3.0.30", gpu="Orin", compute_capability="8.7", profile="jetson-orin-nano-8gb",
                  arch="cummax", precision="fp16", strongly_typed=True, dla_core=None,
                  optimization_profiles=[OptimizationProfile("decode", shapes), OptimizationProfile("prefill", prefill)],
                  plugins=[], onnx_sha256="abc", build_seconds=1.0)
    return EngineMeta(**{**fields, **changes})


def test_engine_compatibility_check(tmp_path):
    meta = _meta()
    check_compatible(meta, "10.3.0.30", "Orin", "8.7", "abc", tmp_path)
    with pytest.raises(SamoutError, match="built with TensorRT 10.3.0.30, this machine has 10.13.3.9.*samout-edge build"):
        check_compatible(meta, "10.13.3.9", "Orin", "8.7", "abc", tmp_path)
    with pytest.raises(SamoutError, match=r"built for Orin \(sm 8.7\), this machine has NVIDIA H100.*--profile jetson-orin-nano-8gb"):
        check_compatible(meta, "10.3.0.30", "NVIDIA H100", "9.0", "abc", tmp_path)
    with pytest.raises(SamoutError, match="another model.onnx"):
        check_compatible(meta, "10.3.0.30", "Orin", "8.7", "def", tmp_path)


def test_profile_ranges_from_engine_meta():
    decode, prefill = profile_ranges(_meta(), arch_spec("cummax"))
    assert (decode.name, decode.index, decode.batch, decode.seq, decode.past) == ("decode", 0, (1, 4), (1, 1), None)
    assert (prefill.index, prefill.seq) == (1, (1, 300))
    assert select_profile([decode, prefill], 1, 1, 0).index == 0 and select_profile([decode, prefill], 1, 7, 0).index == 1


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
    assert any("local functions from 9.0" in i.message for i in reports["8.6"].issues)
    assert reports["10.3"].compatible and any("local-function body" in i.message for i in reports["10.3"].issues)
    assert any("CumMax plugin" in i.message for i in reports["10.13"].issues)
    # where the body runs its problems are errors; where the plugin runs they only matter as a fallback
    body = [i for i in reports["10.13"].issues if "::CumMax/" in i.node]
    assert all(i.severity == "warning" for i in body)


def test_lint_says_10_6_runs_the_function_body(exported, monkeypatch):
    from samout_edge.tensorrt import lint

    table = dict(lint.support_table())
    table["10.6"] = table["10.3"]  # the 10.6 parser's op support is at least 10.3's
    monkeypatch.setattr(lint, "support_table", lambda: table)
    reports = lint_by_version(onnx.load(str(exported(lowering="custom").directory / "model.onnx")))
    notes = [i.message for i in reports["10.6"].issues if i.op == "CumMax"]
    assert notes and all("prefers the model-local function" in m for m in notes)
    assert not any("CumMax plugin" in m for m in notes)


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
    messages = {(i.node, i.op): i.message for i in reports["8.6"].issues}
    assert "not supported by TensorRT 8.6" in messages[("my_unique", "Unique")]
    assert "needs it constant" in messages[("bad_slice", "Slice")]
    assert not reports["8.6"].compatible
    # Slice takes computed axes from 10.3 (onnx-tensorrt 10.3 GA), Pad from 10.4
    slices = [i for i in reports["10.3"].issues if i.op == "Slice"]
    assert not slices and ("my_unique", "Unique") in {(i.node, i.op) for i in reports["10.3"].issues}
    assert needs_constant("Slice", "10.3") is None and needs_constant("Slice", "10.1") == 3
    assert needs_constant("Pad", "10.3") == 3 and needs_constant("Pad", "10.4") is None
    assert needs_constant("ReduceMax", "11.1") == 1 and needs_constant("Relu", "8.5") is None


def test_lint_data_agrees_with_the_versions_table():
    """Where a row's restriction names constant axes, the versions table must say computed ones are not yet fine."""
    from samout_edge.tensorrt.lint import support_table

    for version, data in support_table().items():
        for op in ("Slice", "Pad") if data["max_opset"] >= 18 else ("Slice",):  # Pad has axes from opset 18
            restricted = "axes" in data["ops"][op]["restrictions"]
            assert restricted == (needs_constant(op, version) is not None), (version, op)


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
    from samout_edge.runtime.registry import LoadOptions, load_runner
    from samout_edge.runtime.verify import verify
    from samout_edge.tensorrt.build import build_engine

    d = exported(dtype="fp16", lowering=lowering).directory
    plan = make_plan(d, load_profile("rtx-desktop"))
    result = build_engine(plan)
    assert result.engine.is_file() and result.engine_meta.onnx_sha256 and result.meta["onnx_sha256"]
    assert EngineMeta.from_dict(json.loads(result.engine_json.read_text())).plugins == result.engine_meta.plugins
    assert verify(result.engine.parent).passed
    with load_runner(d, "tensorrt", LoadOptions(engine="rtx-desktop")) as runner:
        logits, state = runner.run(np.ones((1, 5), np.int64), runner.initial_state(1))
        assert tuple(logits.shape) == (1, 1, 128)
        for _ in range(3):  # decode profile, state fed back on the device
            logits, state = runner.run(np.ones((1, 1), np.int64), state)
        assert np.isfinite(runner.to_numpy(logits)).all()
    with pytest.raises(SamoutError, match="closed"):
        runner.run(np.ones((1, 1), np.int64), state)


@pytest.mark.tensorrt
def test_engine_softmax_starts_from_an_empty_past(exported):
    from samout_edge.runtime.registry import LoadOptions, load_runner
    from samout_edge.tensorrt.build import build_engine

    d = exported(arch="softmax", dtype="fp16").directory
    build_engine(make_plan(d, load_profile("rtx-desktop")))
    with load_runner(d, "tensorrt", LoadOptions(engine="rtx-desktop")) as runner:
        state = runner.initial_state(1)
        assert tuple(state["past_key_values.0.key"].shape)[2] == 0
        logits, state = runner.run(np.ones((1, 4), np.int64), state)
        logits, state = runner.run(np.ones((1, 1), np.int64), state)
        assert tuple(state["past_key_values.0.key"].shape)[2] == 5 and np.isfinite(runner.to_numpy(logits)).all()


@pytest.mark.tensorrt
def test_damaged_timing_cache_starts_fresh(exported, tmp_path):
    from samout_edge.tensorrt.build import build_engine

    cache = tmp_path / "damaged.cache"
    cache.write_bytes(b"\x00not a timing cache\xff" * 64)
    result = build_engine(make_plan(exported(dtype="fp16").directory, load_profile("rtx-desktop"), timing_cache=cache))
    assert result.engine.is_file() and any("damaged" in n for n in result.notes)
    assert cache.is_file() and cache.read_bytes()[:4] != b"\x00not"  # a fresh cache was saved in its place


@pytest.mark.tensorrt
def test_engine_bench_and_generate(exported, run_cli):
    from samout_edge.tensorrt.build import build_engine

    for arch in ("cummax", "softmax"):
        d = exported(arch=arch, dtype="fp16").directory
        build_engine(make_plan(d, load_profile("rtx-desktop")))
    engine_dir = exported(dtype="fp16").directory / "engines" / "rtx-desktop"
    code, out, err = run_cli("generate", engine_dir, "--ids", "1,2,3", "--max-new-tokens", "8")
    assert code == 0, err
