"""Per-layer stacks (issue 28, part 3): ``--arch linear,softmax-w8`` names one mixer per layer,
and each layer carries its own mixer's state. The spec and its name round trip, a wrong layer
count refused in one line, checkpoints into stacks, and two stacks on the tiny preset (2 layers)
exported, verified in ONNX Runtime and onnx.reference, any length by chunks, generated and served,
planned for TensorRT and packaged for Triton (or refused there, in one line)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from samout_edge.artifact import graph
from samout_edge.artifact.arch import SEQ_AXIS, StateTensor, arch_name, arch_spec
from samout_edge.artifact.config import PRESETS
from samout_edge.artifact.manifest import read_manifest
from samout_edge.artifact.quantization import RTOL
from samout_edge.errors import SamoutError
from samout_edge.exporter.onnx_export import ExportOptions, export
from samout_edge.generate import generate
from samout_edge.models.checkpoint import load_checkpoint, save_checkpoint
from samout_edge.models.model import SamOut
from samout_edge.profiles import load_profile
from samout_edge.runtime.registry import load_runner
from samout_edge.runtime.torch_runner import load_torch_runner
from samout_edge.runtime.verify import verify
from samout_edge.tensorrt.plan import make_plan
from samout_edge.triton_server.plan import model_io, plan_repo
from tests.splits import check_any_split
from tests.test_cli import one_error_line
from tests.test_serve import Client

TINY = PRESETS["tiny"]
MAX_SEQ = 16
STACKS = ["linear,softmax-w8", "cummax,softmax"]  # fixed-shape state; a growing KV cache in layer 1


def test_the_name_round_trips_and_each_layer_has_its_mixers_state():
    spec = arch_spec("linear, softmax-w8")
    assert spec.name == "linear,softmax-w8" and arch_spec(spec.name) == spec
    assert graph.past_names(spec, 2) == ["past_linear.0", "past_key_values.1.key", "past_key_values.1.value"]
    assert graph.present_names(spec, 2) == ["present_linear.0", "present.1.key", "present.1.value"]
    assert spec.guarded and spec.attends and not spec.grows and spec.window == 8
    grows = arch_spec("cummax,softmax")
    assert grows.grows and grows.guarded and grows.window == 0 and not arch_spec("softmax-w8,softmax-w4").grows
    assert arch_spec("softmax-w8,softmax").grows and arch_spec("softmax-w8,softmax-w4").window == 8
    # a single name is that mixer in every layer: the same graph as the stack that repeats it
    assert graph.graph_io(TINY, arch_spec("cummax,cummax"), "fp32", "last") == graph.graph_io(TINY, arch_spec("cummax"), "fp32", "last")
    state = graph.empty_state(TINY, spec, 1, "fp16")
    assert state["past_key_values.1.key"].shape == (1, 4, 8, 8) and not state["past_linear.0"].any()
    assert graph.state_bytes(TINY, spec, 1, 10, "fp32") == graph.state_bytes(TINY, spec, 1, 10**6, "fp32")
    flat = [torch.zeros(1)] * 3
    assert [len(x) if isinstance(x, tuple) else 1 for x in graph.unflatten(spec, flat)] == [1, 2]
    for bad in ("linear,,softmax", "linear,foo", "linear,softmax-w0", ","):
        with pytest.raises(SamoutError, match="one per layer|unknown arch"):
            arch_spec(bad)
    with pytest.raises(SamoutError, match="not a stack"):
        arch_name("cummax,softmax", 8)


def test_the_spec_owns_the_empty_state_and_the_growth_axis():
    spec = arch_spec("cummax,softmax,linear,softmax-w4")
    assert SEQ_AXIS == StateTensor.SEQ_AXIS == 2
    for dtype in (np.float32, np.float16):
        state = spec.empty_state(4, 3, TINY.num_heads, TINY.head_dim, dtype)
        assert list(state) == spec.past_names(4) and all(v.dtype == dtype for v in state.values())
        assert state["past_max.0"].min() == np.finfo(dtype).min and state["past_max.0"].shape == (3, 4, 1, 8)
        assert state["past_key_values.1.key"].shape == (3, 4, 0, 8) and state["past_key_values.3.value"].shape == (3, 4, 4, 8)
        assert not state["past_linear.2"].any() and not state["past_key_values.3.key"].any()
        assert graph.empty_state(replace(TINY, num_layers=4), spec, 3, "fp16" if dtype == np.float16 else "fp32").keys() == state.keys()
    # the torch model fills its state by the same rule, in its own dtype (bf16 too)
    model = SamOut(replace(TINY, num_layers=4), spec).to(torch.bfloat16)
    flat = spec.flatten(model.empty_state(3))
    assert [tuple(t.shape) for t in flat] == [v.shape for v in state.values()]
    assert flat[0].min().item() == torch.finfo(torch.bfloat16).min and not any(t.any() for t in flat[1:])
    # a cache grows on SEQ_AXIS: its length is read there, a fixed state says 0
    grown = {**state, "past_key_values.1.key": np.zeros((3, 4, 7, 8)), "past_key_values.1.value": np.zeros((3, 4, 7, 8))}
    assert spec.past_length(4, grown) == 7 and arch_spec("linear").past_length(2, graph.empty_state(TINY, arch_spec("linear"), 1, "fp32")) == 0
    cache = spec.layer_states(1)[0]
    assert cache.shape("batch", 4, 8, "past") == ["batch", 4, "past", 8] and cache.length((1, 4, 5, 8)) == 5
    assert model.spec is spec and model.arch == spec.name == "cummax,softmax,linear,softmax-w4"
    assert arch_spec(spec.name) is arch_spec(spec.name)  # decoded once per name


def test_a_wrong_layer_count_is_refused_in_one_line(run_cli, tmp_path):
    with pytest.raises(SamoutError, match="names 3 layers' mixers, the model has 2 layers") as e:
        SamOut(TINY, "cummax,softmax,linear")
    assert "\n" not in str(e.value)
    with pytest.raises(SamoutError, match="names 3 layers' mixers, the model has 2 layers"):
        graph.past_names(arch_spec("cummax,softmax,linear"), 2)
    code, _, err = run_cli("export", "--preset", "tiny", "--arch", "cummax,cummax,softmax-w8,cummax",
                           "-o", str(tmp_path / "e"))
    assert code != 0 and "names 4 layers' mixers, the model has 2 layers" in one_error_line(err)
    assert not (tmp_path / "e").exists()


def test_the_model_is_one_computation_in_chunks_and_steps():
    torch.manual_seed(0)
    model = SamOut(TINY, "linear,softmax-w8").eval()
    assert model.state_dict().keys() == SamOut(TINY, "cummax").state_dict().keys()
    ids = torch.randint(1, TINY.vocab_size, (2, 29))
    with torch.no_grad():
        whole, whole_state = model(ids)
        chunks, past = [], None
        for t in range(0, ids.shape[1], 5):
            logits, past = model(ids[:, t : t + 5], past)
            chunks.append(logits)
    assert torch.allclose(torch.cat(chunks, 1), whole, atol=1e-5)
    assert isinstance(past[0], torch.Tensor) and len(past[1]) == 2 and past[1][0].shape == (2, 4, 8, 8)


def test_checkpoints_load_into_stacks_and_a_learned_blend_stays_in_its_layer(tiny_checkpoint, tmp_path):
    ckpt = load_checkpoint(tiny_checkpoint)
    model = ckpt.model("hybrid,linear", alpha=0.25)  # SamOut's weights: the hybrid layer at the stated blend
    assert torch.sigmoid(model.decoder_layers[0].self_attention.alpha_logit).item() == pytest.approx(0.25)
    assert not hasattr(model.decoder_layers[1].self_attention, "alpha_logit")
    stack = load_checkpoint(save_checkpoint(model, tmp_path / "stack"))
    assert stack.alphas == [pytest.approx(0.25), None]
    assert stack.model("hybrid-w8,softmax").decoder_layers[0].self_attention.window == 8
    with pytest.raises(SamoutError, match="learned alpha in layers 0"):
        stack.model("hybrid")
    hybrid = load_checkpoint(save_checkpoint(ckpt.model("hybrid"), tmp_path / "hybrid"))
    with pytest.raises(SamoutError, match="learned alpha in layers 0, 1"):
        hybrid.model("hybrid,linear")
    assert hybrid.model("hybrid,hybrid-w8").decoder_layers[1].self_attention.window == 8


@pytest.fixture(scope="module")
def stacks(tmp_path_factory, tiny_checkpoint, tiny_vocab, calibration_text):
    """Each stack exported (and verified) once per variant: native, custom, fp16 (calibrated islands)."""
    root, made = tmp_path_factory.mktemp("stacks"), {}

    def get(arch: str, variant: str = "native") -> Path:
        if (arch, variant) not in made:
            fp16 = variant == "fp16"
            options = ExportOptions(arch=arch, max_seq=MAX_SEQ, logits="last" if fp16 else "all",
                                    lowering="custom" if variant == "custom" else "native",
                                    dtype=variant if fp16 else "fp32", calibration_text=calibration_text if fp16 else None)
            result = export(root / f"{arch.replace(',', '+')}-{variant}", options, checkpoint=tiny_checkpoint,
                            vocab=tiny_vocab if fp16 else None)
            assert result.verification.passed, [c for c in result.verification.checks if not c.passed]
            made[arch, variant] = result.directory
        return made[arch, variant]

    return get


@pytest.mark.parametrize("arch, variant", [(a, "native") for a in STACKS] + [("linear,softmax-w8", "custom"),
                                                                              ("linear,softmax-w8", "fp16")])
def test_export_verifies_in_onnx_runtime_and_onnx_reference(stacks, arch, variant):
    d = stacks(arch, variant)
    manifest = read_manifest(d)
    assert manifest.arch == arch and arch_spec(manifest.arch) == arch_spec(arch)
    assert [t.name for t in manifest.inputs[1:]] == graph.past_names(manifest.spec, 2)
    assert verify(d, backend="reference").passed  # custom: its functions inlined; fp16: in fp16 arithmetic
    if variant == "custom":  # layer 0 scans with LinearScan, layer 1 attends; both take the heads' CumMax
        scans = [n.op_type for n in onnx.load(str(d / "model.onnx")).graph.node if n.domain == "samout_edge"]
        assert scans == ["LinearScan", "CumMax", "CumMax"]


def close(a, b, rtol: float) -> bool:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max()) <= rtol * max(1.0, float(np.abs(b).max()))


@pytest.mark.parametrize("arch", STACKS)
def test_chunked_equals_whole_equals_token_by_token_past_max_seq(stacks, tiny_checkpoint, arch):
    d, rtol = stacks(arch), RTOL["fp32"]
    ids = np.random.default_rng(1).integers(0, 128, (2, 4 * MAX_SEQ))
    with load_runner(d, "ort") as runner, \
            load_torch_runner(load_checkpoint(tiny_checkpoint), arch, "fp32", "all", export_dir=d) as reference:
        step_state = check_any_split(runner, reference, ids, rtol)  # 4 graph calls
    grown = step_state.get("past_key_values.1.key")
    assert grown.shape[2] == (4 * MAX_SEQ if arch_spec(arch).grows else 8)


@pytest.mark.parametrize("arch", STACKS)
def test_generate_and_a_session_over_two_requests(stacks, arch, tmp_path):
    d = stacks(arch)
    with load_runner(d, "ort") as runner, load_runner(d, "reference") as reference:
        want = generate(runner, [5, 9, 17], 2 * MAX_SEQ).new_ids
        assert generate(reference, [5, 9, 17], 2 * MAX_SEQ).new_ids == want
        c = Client(d, tmp_path / "sessions.sqlite")
        try:
            sid = c.http.post("/v1/sessions").json()["id"]
            first = c.tokens([5, 9], 4, session=sid)
            second = c.tokens([17, 3], 6, session=sid)
        finally:
            c.close()
        # the session consumed 5 9, then first[:-1]; first[-1] is pending and goes before 17 3
        assert second == generate(runner, [5, 9, *first, 17, 3], 6).new_ids


def test_the_tensorrt_plan_and_triton_take_each_layers_state(stacks):
    plan = make_plan(stacks("linear,softmax-w8"), load_profile("jetson-orin-nano-8gb"), tensorrt="10.3")
    decode = {s.name: s.max for s in plan.optimization_profiles[0].shapes}
    assert decode["past_linear.0"] == [4, 4, 1, 8] and decode["past_key_values.1.key"] == [4, 4, 8, 8]
    grows = make_plan(stacks("cummax,softmax"), load_profile("jetson-orin-nano-8gb"), tensorrt="10.3")
    decode = {s.name: s.max for s in grows.optimization_profiles[0].shapes}
    assert decode["past_max.0"] == [4, 4, 1, 8] and decode["past_key_values.1.key"] == [4, 4, MAX_SEQ - 1, 8]
    with pytest.raises(SamoutError, match="cannot be served with Triton implicit state"):
        plan_repo(stacks("cummax,softmax"))  # a growing KV cache in layer 1
    # Triton pairs states by name order: the pasts and the presents sort alike (past_key_* < past_linear.*,
    # present.* < present_linear.*), so a linear layer beside a window packages
    _, _, states, files = model_io(read_manifest(stacks("linear,softmax-w8")))
    assert [(s.input_name, s.output_name, s.data_file) for s in states] == [
        ("past_linear.0", "present_linear.0", "empty_linear.fp32"),
        ("past_key_values.1.key", "present.1.key", "empty_window.fp32"),
        ("past_key_values.1.value", "present.1.value", "empty_window.fp32")]
    fixed = replace(read_manifest(stacks("linear,softmax-w8")), arch="cummax,softmax-w8")
    _, _, states, files = model_io(fixed)
    assert [(s.input_name, s.output_name, s.dims, s.data_file) for s in states] == [
        ("past_max.0", "present_max.0", [4, 1, 8], "empty_max.fp32"),
        ("past_key_values.1.key", "present.1.key", [4, 8, 8], "empty_window.fp32"),
        ("past_key_values.1.value", "present.1.value", [4, 8, 8], "empty_window.fp32")]
    assert np.frombuffer(files["empty_window.fp32"], np.float32).max() == 0.0
