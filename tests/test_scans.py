"""The scan registry (scans.py) and its lowerings, written once over each scan's combine (issue 28):
max bit for bit, the linear recurrence within its stated tolerance of a float64 loop, at many
lengths, with both scan kinds, both lowerings, fp32 and fp16, in ONNX Runtime and onnx.reference."""

import numpy as np
import onnx
import onnx.reference
import onnxruntime as ort
import pytest

from samout_edge import lowering as low
from samout_edge import scan_checks
from samout_edge.runtime.verify import scan_matches
from samout_edge.scans import NUMPY_OPS, SCANS, combine_scan

NP = {"fp32": np.float32, "fp16": np.float16}


def session(model: onnx.ModelProto):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("name", list(SCANS))
def test_the_combine_with_its_identity_is_the_definition(name):
    """The combine and identity alone (what every lowering is built from) give the float64 loop."""
    s, rng = SCANS[name], np.random.default_rng(0)
    xs = tuple(x.astype(np.float64) for x in s.sample(rng, (3, 40, 2), np.float32))
    np.testing.assert_allclose(combine_scan(s, xs, 1), s.reference(xs, 1), rtol=1e-12, atol=1e-12)
    identity = tuple(np.full((3, 2), v) for v in s.identity)
    first = tuple(x[:, 0] for x in xs)
    for joined in (s.combine(NUMPY_OPS, identity, first), s.combine(NUMPY_OPS, first, identity)):
        assert all(np.array_equal(j, f) for j, f in zip(joined, first))


def test_the_linear_reference_is_the_recurrence():
    a, b = np.array([0.5, 0.25, 1.0]), np.array([1.0, 2.0, -3.0])
    assert SCANS["linear"].reference((a, b), 0).tolist() == [1.0, 2.25, -0.75]


MAX_LEN, BLOCK = 37, 8
LENGTHS = sorted({1, 2, 3, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK + 1, MAX_LEN - 1, MAX_LEN})


@pytest.mark.parametrize("name", list(SCANS))
@pytest.mark.parametrize("lowering", low.LOWERINGS)
@pytest.mark.parametrize("scan", low.SCANS)
@pytest.mark.parametrize("dtype", list(NP))
def test_lowerings_match_the_definition_at_every_length(name, lowering, scan, dtype):
    s = SCANS[name]
    model = low.standalone_model(lowering, low.ScanPlan(scan, MAX_LEN, BLOCK), axis=2, dtype=dtype, scan=name)
    onnx.checker.check_model(model, full_check=lowering == "native")
    run, rng = session(model), np.random.default_rng(1)
    for length in LENGTHS:
        xs = s.sample(rng, (2, 3, length, 5), NP[dtype])
        got = run.run(None, dict(zip(s.inputs, xs)))[0]
        check = scan_matches(s, xs, got, 2)
        assert check["exact"], (length, check)


@pytest.mark.parametrize("scan", low.SCANS)
@pytest.mark.parametrize("dtype", list(NP))
def test_the_linear_scan_in_onnx_reference_which_computes_fp16_in_fp16(scan, dtype):
    s = SCANS["linear"]
    model = low.standalone_model("native", low.ScanPlan(scan, 300, 16), axis=2, dtype=dtype, scan="linear")
    run, rng = onnx.reference.ReferenceEvaluator(model), np.random.default_rng(2)
    for length in (1, 15, 16, 17, 299, 300):
        xs = s.sample(rng, (1, 2, length, 4), NP[dtype])
        check = scan_matches(s, xs, run.run(None, dict(zip(s.inputs, xs)))[0], 2)
        assert check["exact"], (length, check)


def test_a_fault_in_the_combine_order_is_caught_at_the_tolerance():
    """(a, b) o (a', b') is not commutative: a scan combining in the wrong order fails the check."""
    s = SCANS["linear"]
    xs = s.sample(np.random.default_rng(3), (1, 2, 20, 4), np.float32)
    a, b = (x.astype(np.float64) for x in xs)
    wrong = np.moveaxis(np.cumsum(np.moveaxis(b, 2, 0), 0), 0, 2).astype(np.float32)  # decays ignored
    assert not scan_matches(s, xs, wrong, 2)["exact"]
    assert scan_matches(s, xs, s.reference(xs, 2).astype(np.float32), 2)["exact"]


@pytest.mark.parametrize("lowering", low.LOWERINGS)
def test_long_linear_scan_past_many_blocks(lowering):
    s = SCANS["linear"]
    run = session(low.standalone_model(lowering, low.ScanPlan("blocked", 2000), axis=2, scan="linear"))
    xs = s.sample(np.random.default_rng(4), (1, 2, 1999, 3), np.float32)
    assert scan_matches(s, xs, run.run(None, dict(zip(s.inputs, xs)))[0], 2)["exact"]


def test_a_linear_decode_step_takes_the_shortcut_b():
    """One element from h = 0 is its b: the If's identity branch reads b, and drops the decay."""
    model = low.standalone_model("native", low.ScanPlan("blocked", 40, 4), axis=2, scan="linear")
    (if_node,) = [n for n in model.graph.node if n.op_type == "If"]
    then = next(a.g for a in if_node.attribute if a.name == "then_branch")
    assert [(n.op_type, list(n.input)) for n in then.node] == [("Identity", ["b"])]
    a, b = SCANS["linear"].sample(np.random.default_rng(5), (2, 3, 1, 4), np.float32)
    assert np.array_equal(session(model).run(None, {"a": a, "b": b})[0], b)


def test_a_custom_linear_node_has_its_own_function_without_an_if():
    model = low.standalone_model("custom", low.ScanPlan("blocked", 100), axis=2, scan="linear")
    assert [(n.domain, n.op_type, list(n.input)) for n in model.graph.node] == [(low.DOMAIN, "LinearScan", ["a", "b"])]
    (function,) = model.functions
    assert (function.name, list(function.input), list(function.attribute)) == (
        "LinearScan", ["a", "b"], ["axis", "plugin_namespace"])
    assert not any(n.op_type == "If" for n in low.all_nodes(function.node))


def test_the_sequential_linear_scan_keeps_only_what_h_needs():
    """A static axis scans sequentially; the running decay is never read, so no node computes it."""
    model = low.standalone_model("native", low.ScanPlan("blocked", 64), axis=1, static_len=8, scan="linear")
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Mul") == 7 and ops.count("Add") == 7 and "Pad" not in ops
    xs = SCANS["linear"].sample(np.random.default_rng(6), (2, 8, 3, 4), np.float32)
    assert scan_matches(SCANS["linear"], xs, session(model).run(None, {"a": xs[0], "b": xs[1]})[0], 1)["exact"]


def test_sites_round_trip_and_a_max_site_is_recorded_as_before():
    model = low.standalone_model("native", low.ScanPlan("blocked", 10), axis=2)
    sites = [scan_checks.ScanSite(("x",), "y", 2), scan_checks.ScanSite(("a", "b"), "h", 2, "linear")]
    scan_checks.record_sites(model, sites)
    meta = {p.key: p.value for p in model.metadata_props}[scan_checks.SITES_KEY]
    assert meta == '[["x", "y", 2], [["a", "b"], "h", 2, "linear"]]'
    assert scan_checks.read_sites(model) == sites
    for bad in ('[[["a"], "h", 2, "linear"]]', '[["a", "h", 2, "nope"]]'):
        model.metadata_props[-1].value = bad
        with pytest.raises(ValueError, match="malformed"):
            scan_checks.read_sites(model)


def test_a_scan_in_an_fp32_island_of_an_fp16_graph_is_lowered_in_fp32():
    """The graph's recorded type of the scan's input wins over the graph's dtype (found by an fp16
    linear export whose mix is an fp32 island: its If branches were typed fp16)."""
    from onnx import TensorProto, helper

    f16, f32 = TensorProto.FLOAT16, TensorProto.FLOAT
    nodes = [helper.make_node("Cast", [x], [f"{x}32"], to=f32) for x in ("a", "b")]
    nodes += [helper.make_node("LinearScan", ["a32", "b32"], ["h32"], domain=low.DOMAIN, axis=2),
              helper.make_node("Cast", ["h32"], ["h"], to=f16)]
    dims = ["n", 2, "s", 3]
    graph = helper.make_graph(nodes, "island", [helper.make_tensor_value_info(x, f16, dims) for x in ("a", "b")],
                              [helper.make_tensor_value_info("h", f16, dims)],
                              value_info=[helper.make_tensor_value_info(x, f32, dims) for x in ("a32", "b32", "h32")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(low.DOMAIN, 1)],
                              ir_version=8)
    low.lower_scans(model, "native", low.ScanPlan("blocked", 40, 4), elem_type=f16)
    s = SCANS["linear"]
    for length in (1, 9):
        xs = s.sample(np.random.default_rng(length), (1, 2, length, 3), np.float16)
        assert scan_matches(s, xs, session(model).run(None, {"a": xs[0], "b": xs[1]})[0], 2)["exact"]
