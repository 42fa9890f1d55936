"""--arch linear (issue 28): SamOut's block with the sequence cummax replaced by a gated linear
recurrence, h_t = a_t * h_{t-1} + (1 - a_t) * out_t with a_t = sigmoid(out1_t). The eager scan
against a float64 loop, the state spec, exports native and custom (fp32, fp16) verified in ONNX
Runtime and onnx.reference, any length by chunks, the length guard, generate and eval, and
TensorRT's refusal where a plugin would be needed. Tiny preset, max_seq 32."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx.reference
import onnxruntime as ort
import pytest
import torch

from samout_edge.artifact import graph
from samout_edge.artifact.arch import arch_spec
from samout_edge.artifact.config import PRESETS
from samout_edge.artifact.quantization import RTOL
from samout_edge.errors import SamoutError
from samout_edge.exporter.onnx_export import ExportOptions, export
from samout_edge.generate import generate
from samout_edge.models.checkpoint import load_checkpoint
from samout_edge.models.model import SamOut
from samout_edge.models.ops import blocked_linear_scan
from samout_edge.runtime.registry import load_runner
from samout_edge.runtime.torch_runner import load_torch_runner
from samout_edge.runtime.verify import verify
from tests.splits import check_any_split

TINY = PRESETS["tiny"]
MAX_SEQ = 32


def loop(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """The recurrence one step at a time, in float64."""
    h, out = h0.double(), []
    for t in range(a.shape[2]):
        h = a[:, :, t : t + 1].double() * h + b[:, :, t : t + 1].double()
        out.append(h)
    return torch.cat(out, 2)


@pytest.mark.parametrize("seq", [1, 2, 15, 16, 17, 100])
def test_the_eager_scan_is_the_float64_loop(seq):
    torch.manual_seed(seq)
    a = torch.sigmoid(2 * torch.randn(2, 3, seq, 4))
    a[0, 0, :: 3] = 0.0  # forgets everything
    a[0, 1, :: 2] = 1.0  # keeps everything
    b, h0 = torch.randn(2, 3, seq, 4), torch.randn(2, 3, 1, 4)
    want = loop(a, b, h0)
    assert (blocked_linear_scan(a, b, h0).double() - want).abs().max() <= 1e-6 * max(1.0, want.abs().max())
    assert (blocked_linear_scan(a.double(), b.double(), h0.double(), block=4) - want).abs().max() < 1e-12


def test_the_eager_scan_has_the_loops_gradients():
    a = torch.sigmoid(torch.randn(1, 2, 11, 3, dtype=torch.float64)).requires_grad_()
    b = torch.randn(1, 2, 11, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(1, 2, 1, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *x: blocked_linear_scan(*x, block=4), (a, b, h0))


def test_the_mixer_is_samouts_block_with_the_recurrence():
    """The same parameters as SamOut, and the math of the docstring written out."""
    torch.manual_seed(0)
    model = SamOut(TINY, "linear").eval()
    assert model.state_dict().keys() == SamOut(TINY, "cummax").state_dict().keys()
    mixer, x = model.decoder_layers[0].self_attention, torch.randn(2, 9, TINY.hidden_size)
    out, out1, out2 = (t.view(2, 9, TINY.num_heads, -1).transpose(1, 2) for t in mixer.combined(x).chunk(3, -1))
    a = torch.sigmoid(out1)
    h = loop(a, (1 - a) * out, torch.zeros(2, TINY.num_heads, 1, TINY.head_dim)).float()
    y = (torch.cummax(h, 1).values + out1) * out2 + out1
    with torch.no_grad():
        got, present = mixer(x, torch.zeros(2, TINY.num_heads, 1, TINY.head_dim))
    assert torch.allclose(got, y.transpose(1, 2).reshape(2, 9, -1), atol=1e-5)
    assert torch.allclose(present, h[:, :, -1:], atol=1e-6)


def test_the_state_spec():
    spec = arch_spec("linear")
    (state,) = spec.layer_states(1)
    assert (state.past, state.present, state.slots, state.scan) == ("past_linear.1", "present_linear.1", 1, "linear")
    assert spec.guarded and not spec.grows and not spec.attends and not state.running_max
    empty = graph.empty_state(TINY, spec, 2, "fp16")
    assert list(empty) == ["past_linear.0", "past_linear.1"] and all(not v.any() and v.shape == (2, 4, 1, 8) for v in empty.values())
    assert graph.state_bytes(TINY, spec, 1, 10, "fp32") == graph.state_bytes(TINY, spec, 1, 10**6, "fp32")


VARIANTS = {
    "native": dict(logits="all"),
    "custom": dict(lowering="custom", logits="all"),
    "fp16": dict(dtype="fp16"),
}


@pytest.fixture(scope="module")
def linear(tmp_path_factory, tiny_checkpoint, tiny_vocab, calibration_text):
    """The linear arch exported (and verified) once per variant."""
    root, made = tmp_path_factory.mktemp("linear"), {}

    def get(name: str):
        if name not in made:
            text = calibration_text if VARIANTS[name].get("dtype") == "fp16" else None
            options = ExportOptions(arch="linear", max_seq=MAX_SEQ, calibration_text=text, **VARIANTS[name])
            made[name] = export(root / name, options, checkpoint=tiny_checkpoint, vocab=tiny_vocab if text else None)
        return made[name]

    return get


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_export_verifies(linear, variant):
    result = linear(variant)
    v = result.verification
    assert v.passed and v.op_exact, [c for c in v.checks if not c.passed]
    linear_rows = [r for r in v.op_checks if "tolerance" in r]
    assert linear_rows and all(r["error"] <= r["tolerance"] for r in linear_rows)
    assert len(linear_rows) < len(v.op_checks)  # the heads' running max is checked bit for bit
    assert {c.check.split()[0] for c in v.checks} >= {"prefill", "decode", "calls", "long", "every"}
    if variant == "fp16":
        assert v.fp16_arithmetic.startswith("onnx.reference") and {"fp16", "text"} <= {c.check.split()[0] for c in v.checks}
    model = onnx.load(str(result.directory / "model.onnx"))
    scans = [n.op_type for n in model.graph.node if n.domain == "samout_edge"]
    assert scans == ([] if variant != "custom" else ["LinearScan", "CumMax"] * TINY.num_layers)
    assert [f.name for f in model.functions] == ([] if variant != "custom" else ["CumMax", "LinearScan"])


@pytest.mark.parametrize("variant", ["native", "custom"])
def test_verify_in_onnx_reference(linear, variant):
    """onnx.reference runs the custom export with its functions inlined."""
    assert verify(linear(variant).directory, backend="reference").passed


@pytest.mark.parametrize("variant", ["native", "fp16"])
def test_verify_in_openvino(linear, variant):
    """The third runtime: OpenVINO runs the native export (fp32 at 1e-4, the fp16 export at fp16's bound)."""
    pytest.importorskip("openvino")
    result = verify(linear(variant).directory, backend="openvino")
    assert result.passed, [c for c in result.checks if not c.passed]
    assert result.rtol == (RTOL["fp32"] if variant == "native" else RTOL["fp16"])


def pytorch(directory: Path, checkpoint: Path, logits: str = "all"):
    return load_torch_runner(load_checkpoint(checkpoint), "linear", "fp32", logits, export_dir=directory)


def close(a, b, rtol: float) -> bool:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max()) <= rtol * max(1.0, float(np.abs(b).max()))


@pytest.mark.parametrize("variant", ["native", "custom"])
def test_chunked_equals_whole_equals_token_by_token(linear, tiny_checkpoint, variant):
    d = linear(variant).directory
    ids = np.random.default_rng(1).integers(0, 128, (2, 8 * MAX_SEQ))
    with load_runner(d, "ort") as runner, pytorch(d, tiny_checkpoint) as reference:
        check_any_split(runner, reference, ids, RTOL["fp32"])  # 8 graph calls


@pytest.mark.parametrize("runtime", ["ort", "onnx.reference"])
def test_the_length_guard_and_a_poisoned_state(linear, runtime):
    """One call past max_seq gives NaN, logits and state; a state holding NaN gives NaN again."""
    path = str(linear("native").directory / "model.onnx")
    if runtime == "ort":
        run = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run
    else:
        run = onnx.reference.ReferenceEvaluator(path).run
    empty = graph.empty_state(TINY, arch_spec("linear"), 1, "fp32")
    ids = np.ones((1, MAX_SEQ + 1), np.int64)
    logits, *state = run(None, {"input_ids": ids, **empty})
    assert np.isnan(logits).all() and all(np.isnan(s).all() for s in state)
    fine, *_ = run(None, {"input_ids": ids[:, :MAX_SEQ], **empty})
    assert np.isfinite(fine).all()
    poisoned = {**empty, "past_linear.0": np.where(np.arange(8) == 3, np.nan, 0.0).astype(np.float32).reshape(1, 1, 1, 8)
                .repeat(4, 1)}
    logits, *_ = run(None, {"input_ids": ids[:, :1], **poisoned})
    assert np.isnan(logits).all()


def test_generate_and_eval_past_max_seq_match_pytorch(linear, tiny_checkpoint, tmp_path):
    from samout_edge.evaluate import eval_target

    d = linear("native").directory
    prompt = np.random.default_rng(4).integers(1, 128, 4 * MAX_SEQ).tolist()
    with load_runner(d, "ort") as runner, pytorch(d, tiny_checkpoint, "last") as reference:
        assert generate(runner, prompt, MAX_SEQ).new_ids == generate(reference, prompt, MAX_SEQ).new_ids
    text, vocab = tmp_path / "t.txt", tmp_path / "v.json"
    text.write_text("".join(chr(32 + i) for i in np.random.default_rng(0).integers(0, 90, 6 * MAX_SEQ)))
    vocab.write_text(json.dumps([chr(i) for i in range(128)]))
    result = eval_target(d, text, window=4 * MAX_SEQ, vocab=vocab, checkpoint=tiny_checkpoint)
    assert result.top1_agreement == 1.0 and result.max_logit_error < 1e-4 and result.tokens > 4 * MAX_SEQ


def test_tensorrt_runs_linear_scan_nodes_by_the_scan_plugins(linear):
    """LinearScan nodes follow CumMax's rules: the plugin (AOT from 10.9, JIT 10.7/10.8), the function body
    up to 10.6, nothing before 9.1; lint says the same per node."""
    from samout_edge.profiles import load_profile
    from samout_edge.tensorrt.build import engine_plugins
    from samout_edge.tensorrt.lint import lint_model
    from samout_edge.tensorrt.plan import make_plan

    custom, nano = linear("custom").directory, load_profile("jetson-orin-nano-8gb")
    plan = make_plan(custom, nano, tensorrt="10.13")
    assert plan.cummax == "aot" and sorted(engine_plugins(plan)) == ["samout_edge::CumMax", "samout_edge::LinearScan"]
    assert any("LinearScan" in n and "ahead-of-time" in n for n in plan.notes)
    assert make_plan(custom, nano, tensorrt="10.7").cummax == "jit"
    plan = make_plan(custom, nano, tensorrt="10.6")
    assert plan.cummax == "function" and engine_plugins(plan) == []
    with pytest.raises(SamoutError, match="cannot run .*LinearScan.*--lowering native"):
        make_plan(custom, nano, tensorrt="9.0")
    reports = {r.version: r for r in lint_model(onnx.load(str(custom / "model.onnx")))}
    notes = [i.message for i in reports["10.13"].issues if i.op == "LinearScan"]
    assert notes and all("samout-edge LinearScan plugin" in m for m in notes)
    assert not any("no samout-edge TensorRT plugin" in i.message for r in reports.values() for i in r.issues)
    assert make_plan(linear("native").directory, nano, tensorrt="10.13").cummax == ""


def test_a_triton_repository_starts_h_at_zeros(linear):
    from samout_edge.artifact.manifest import read_manifest
    from samout_edge.triton_server.plan import model_io

    _, _, states, files = model_io(read_manifest(linear("native").directory))
    assert [(s.input_name, s.data_file) for s in states] == [("past_linear.0", "empty_linear.fp32"), ("past_linear.1", "empty_linear.fp32")]
    assert set(files) == {"empty_linear.fp32"} and not np.frombuffer(files["empty_linear.fp32"], np.float32).any()


# --------------------------------------------------------------------------- on a GPU, and on TensorRT + GPU


@pytest.mark.gpu
def test_torch_runner_uses_the_linear_kernel_on_cuda(linear):
    """The eager linear scan on CUDA goes through the Triton kernel (ops.FAST_LINEAR_KERNELS) and agrees
    with the CPU's blocked scan."""
    from samout_edge.models import ops
    from samout_edge.runtime.registry import LoadOptions

    d = linear("native").directory
    fast = load_runner(d, "torch", LoadOptions(device="cuda"))
    cpu = load_runner(d, "torch", LoadOptions(device="cpu"))
    assert fast.info.device == "cuda+triton" and "cuda" in ops.FAST_LINEAR_KERNELS
    ids = np.random.default_rng(0).integers(1, 128, (2, 77))
    a = fast.to_numpy(fast.run(ids, fast.initial_state(2))[0])
    b = cpu.to_numpy(cpu.run(ids, cpu.initial_state(2))[0])
    assert np.abs(a - b).max() < 1e-4 * max(1.0, np.abs(b).max())


@pytest.mark.tensorrt
def test_linear_scan_plugin_engine_builds_and_verifies(linear):
    """A custom linear export's LinearScan (and CumMax) nodes run by the samout-edge plugins in a real engine,
    verified against the export's golden outputs."""
    from samout_edge.profiles import load_profile
    from samout_edge.runtime.verify import verify
    from samout_edge.tensorrt.build import build_engine
    from samout_edge.tensorrt.plan import make_plan

    plan = make_plan(linear("custom").directory, load_profile("rtx-desktop"))
    result = build_engine(plan)
    assert ("samout_edge::LinearScan" in result.engine_meta.plugins) == (plan.cummax in ("aot", "jit"))
    assert verify(result.engine.parent).passed
