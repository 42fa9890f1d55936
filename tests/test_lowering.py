import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from samout_edge import lowering as low
from samout_edge.scans import SCANS


def session(model: onnx.ModelProto):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def torch_cummax(x: np.ndarray, axis: int) -> np.ndarray:
    return torch.cummax(torch.from_numpy(x), axis).values.numpy()


def bits(x: np.ndarray) -> np.ndarray:
    return x.view(np.uint16 if x.dtype == np.float16 else np.uint32)


@pytest.mark.parametrize("lowering", low.LOWERINGS)
@pytest.mark.parametrize("scan,block", [("doubling", 16), ("blocked", 4), ("blocked", 16)])
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_bit_exact_for_every_length_up_to_max_len(lowering, scan, block, dtype):
    max_len = 37
    model = low.standalone_model(lowering, low.ScanPlan(scan, max_len, block), axis=2, dtype=dtype)
    onnx.checker.check_model(model, full_check=lowering == "native")
    run = session(model)
    rng = np.random.default_rng(0)
    np_dtype = np.float16 if dtype == "fp16" else np.float32
    for length in range(1, max_len + 1):
        x = rng.standard_normal((2, 3, length, 5)).astype(np_dtype)
        y = run.run(None, {"x": x})[0]
        assert np.array_equal(bits(y), bits(torch_cummax(x, 2))), length


@pytest.mark.parametrize("lowering", low.LOWERINGS)
def test_long_axis_non_power_of_two(lowering):
    plan = low.ScanPlan("blocked", 5000)
    run = session(low.standalone_model(lowering, plan, axis=2))
    x = np.random.default_rng(1).standard_normal((1, 2, 4999, 3)).astype(np.float32)
    assert np.array_equal(run.run(None, {"x": x})[0], torch_cummax(x, 2))


def test_infinities_and_ties():
    run = session(low.standalone_model("native", low.ScanPlan("blocked", 40, 4), axis=2))
    x = np.array([-np.inf, -3.0, -3.0, np.inf, 1.0, -np.inf, 7.0, 7.0, 2.0] * 4, np.float32).reshape(1, 1, -1, 1)
    assert np.array_equal(run.run(None, {"x": x})[0], torch_cummax(x, 2))


@pytest.mark.parametrize("lowering", low.LOWERINGS)
def test_head_axis(lowering):
    static = 8 if lowering == "native" else None
    model = low.standalone_model(lowering, low.ScanPlan("blocked", 64), axis=1, static_len=static)
    x = np.random.default_rng(2).standard_normal((2, 8, 13, 4)).astype(np.float32)
    assert np.array_equal(session(model).run(None, {"x": x})[0], torch_cummax(x, 1))


def test_native_head_axis_is_a_sequential_scan():
    model = low.standalone_model("native", low.ScanPlan("blocked", 4096), axis=1, static_len=8)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Max") == 7 and "Pad" not in ops


@pytest.mark.parametrize("scan", low.SCANS)
def test_a_scan_unrolled_for_64_is_wrong_at_300(scan):
    """Why max_len must come from --max-seq, never from the traced length."""
    run = session(low.standalone_model("native", low.ScanPlan(scan, 64), axis=2))
    x = np.random.default_rng(3).standard_normal((1, 1, 300, 2)).astype(np.float32)
    x[0, 0, 0] = 100.0  # the first element is the max of everything after it
    y = run.run(None, {"x": x})[0]
    assert not np.array_equal(y, torch_cummax(x, 2))


def test_custom_model_has_one_node_per_cummax_and_a_function_body():
    model = low.standalone_model("custom", low.ScanPlan("blocked", 100), axis=2)
    assert [(n.domain, n.op_type) for n in model.graph.node] == [(low.DOMAIN, low.OP_TYPE)]
    assert [(f.domain, f.name, list(f.attribute)) for f in model.functions] == [
        (low.DOMAIN, low.OP_TYPE, ["axis", "plugin_namespace"])
    ]
    attrs = {a.name: a for a in model.graph.node[0].attribute}
    assert attrs["plugin_namespace"].s == b"samout_edge" and attrs["axis"].i == 2
    assert any(o.domain == low.DOMAIN for o in model.opset_import)


def test_native_model_has_standard_ops_only():
    model = low.standalone_model("native", low.ScanPlan("blocked", 100), axis=2)
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node) and not model.functions


def test_choose_scan_prefers_blocked_for_long_axes():
    assert low.choose_scan(8192).scan == "blocked" and low.choose_scan(64).scan == "blocked"
    assert low.choose_scan(32).scan == "doubling" and low.choose_scan(2).scan == "doubling"
    assert low.choose_scan(8192).passes < low.ScanPlan("doubling", 8192).passes / 5


def test_scan_plan_validates():
    with pytest.raises(ValueError):
        low.ScanPlan("nope", 10)
    with pytest.raises(ValueError):
        low.ScanPlan("blocked", 0)


@pytest.mark.parametrize("opset", [17, 18])
def test_opset_17_split_form(opset):
    model = low.standalone_model("native", low.ScanPlan("blocked", 40, 4), axis=2, opset=opset)
    splits = [n for n in low.all_nodes(model.graph.node) if n.op_type == "Split"]
    assert splits and all((len(n.input) == 2) == (opset < 18) for n in splits)
    x = np.random.default_rng(4).standard_normal((1, 2, 37, 3)).astype(np.float32)
    assert np.array_equal(session(model).run(None, {"x": x})[0], torch_cummax(x, 2))


@pytest.mark.parametrize("length", [1, 2, 16, 17, 40])
def test_a_dynamic_axis_takes_a_shortcut_for_one_element_and_scans_otherwise(length):
    """A decode step (length 1) runs the If's identity branch instead of the scan's ~70 nodes;
    every other length runs the scan. Both exact."""
    model = low.standalone_model("native", low.ScanPlan("blocked", 40, 4), axis=2)
    ifs = [n for n in model.graph.node if n.op_type == "If"]
    assert len(ifs) == 1
    then = next(a.g for a in ifs[0].attribute if a.name == "then_branch")
    assert [n.op_type for n in then.node] == ["Identity"]
    x = np.random.default_rng(length).standard_normal((2, 3, length, 5)).astype(np.float32)
    assert np.array_equal(session(model).run(None, {"x": x})[0], torch_cummax(x, 2))


def test_a_static_axis_and_the_function_body_have_no_if():
    assert not any(n.op_type == "If" for n in low.all_nodes(
        low.standalone_model("native", low.ScanPlan("blocked", 64), axis=1, static_len=8).graph.node))
    body = low.scan_function(SCANS["max"], low.ScanPlan("blocked", 64), 18)
    assert not any(n.op_type == "If" for n in low.all_nodes(body.node))
