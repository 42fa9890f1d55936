"""--arch ema (issue 28's count of a new mixer): SamOut's block with the sequence cummax replaced by an
exponential moving average with a learned, data-independent decay per head and channel,
h_t = lam * h_{t-1} + (1 - lam) * out_t with lam = sigmoid(decay_logit), carried by the registered
linear scan. The math, the state spec, exports native and custom verified, any length by chunks and
token by token against PyTorch, a stack with softmax, inspect and --help. Tiny preset, max_seq 32."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from samout_edge.artifact.arch import arch_spec
from samout_edge.artifact.quantization import RTOL
from samout_edge.errors import SamoutError
from samout_edge.exporter.onnx_export import ExportOptions, export
from samout_edge.models.checkpoint import load_checkpoint, save_checkpoint
from samout_edge.models.model import SamOut
from samout_edge.runtime.registry import load_runner
from samout_edge.runtime.torch_runner import load_torch_runner
from samout_edge.runtime.verify import verify
from tests.splits import check_any_split
from tests.test_linear import TINY, loop

MAX_SEQ = 32


def test_the_mixer_is_samouts_block_with_a_learned_decay(tiny_checkpoint):
    """SamOut's parameters and decay_logit, lam around 0.9 at every load, and the docstring's math written out."""
    model = load_checkpoint(tiny_checkpoint).model("ema")
    mixer = model.decoder_layers[0].self_attention
    assert model.state_dict().keys() - SamOut(TINY, "cummax").state_dict().keys() == {
        f"decoder_layers.{i}.self_attention.decay_logit" for i in range(TINY.num_layers)}
    lam = torch.sigmoid(mixer.decay_logit.detach())
    assert lam.shape == (TINY.num_heads, 1, TINY.head_dim) and 0.84 < lam.min() < lam.max() < 0.96
    assert torch.equal(load_checkpoint(tiny_checkpoint).model("ema").decoder_layers[0].self_attention.decay_logit,
                       mixer.decay_logit)  # the same model at every load: references agree
    x = torch.randn(2, 9, TINY.hidden_size)
    out, out1, out2 = (t.view(2, 9, TINY.num_heads, -1).transpose(1, 2) for t in mixer.combined(x).chunk(3, -1))
    a = lam.expand_as(out)
    past = torch.randn(2, TINY.num_heads, 1, TINY.head_dim)
    h = loop(a, (1 - a) * out, past).float()
    y = (torch.cummax(h, 1).values + out1) * out2 + out1
    with torch.no_grad():
        got, present = mixer(x, past)
    assert torch.allclose(got, y.transpose(1, 2).reshape(2, 9, -1), atol=1e-5)
    assert torch.allclose(present, h[:, :, -1:], atol=1e-6)


def test_a_trained_decay_round_trips_and_stays_in_its_layers(tiny_checkpoint, tmp_path):
    model = load_checkpoint(tiny_checkpoint).model("ema,cummax")
    with torch.no_grad():
        model.decoder_layers[0].self_attention.decay_logit.fill_(-1.0)  # as training would move it
    trained = load_checkpoint(save_checkpoint(model, tmp_path / "trained"))
    got = trained.model("ema,softmax").decoder_layers[0].self_attention.decay_logit
    assert torch.equal(got, torch.full_like(got, -1.0))
    with pytest.raises(SamoutError, match=r"parameters --arch cummax lacks \(decoder_layers.0.self_attention.decay_logit\)"):
        trained.model("cummax")


def test_the_state_spec():
    spec = arch_spec("ema")
    (state,) = spec.layer_states(1)
    assert (state.past, state.present, state.slots, state.scan) == ("past_ema.1", "present_ema.1", 1, "linear")
    assert spec.guarded and not spec.grows and not spec.attends and not state.running_max
    empty = spec.empty_state(TINY.num_layers, 2, TINY.num_heads, TINY.head_dim, np.float32)
    assert list(empty) == ["past_ema.0", "past_ema.1"] and all(not v.any() and v.shape == (2, 4, 1, 8) for v in empty.values())


ARCHS = {"native": ("ema", {}), "custom": ("ema", {"lowering": "custom"}), "stack": ("ema,softmax-w8", {})}


@pytest.fixture(scope="module")
def ema(tmp_path_factory, tiny_checkpoint):
    """Each export made (and verified by export itself) once."""
    root, made = tmp_path_factory.mktemp("ema"), {}

    def get(name: str):
        if name not in made:
            arch, extra = ARCHS[name]
            made[name] = export(root / name, ExportOptions(arch=arch, max_seq=MAX_SEQ, logits="all", **extra),
                                checkpoint=tiny_checkpoint)
        return made[name]

    return get


@pytest.mark.parametrize("name", list(ARCHS))
def test_export_verifies(ema, name):
    result = ema(name)
    assert result.verification.passed, [c for c in result.verification.checks if not c.passed]
    assert verify(result.directory).passed
    model = onnx.load(str(result.directory / "model.onnx"))
    scans = [n.op_type for n in model.graph.node if n.domain == "samout_edge"]
    assert scans == (["LinearScan", "CumMax"] * TINY.num_layers if name == "custom" else [])


@pytest.mark.parametrize("name", ["native", "custom"])
def test_chunked_equals_whole_equals_token_by_token(ema, tiny_checkpoint, name):
    d = ema(name).directory
    ids = np.random.default_rng(1).integers(0, 128, (2, 8 * MAX_SEQ))
    reference = load_torch_runner(load_checkpoint(tiny_checkpoint), "ema", "fp32", "all", export_dir=d)
    with load_runner(d, "ort") as runner, reference:
        state = check_any_split(runner, reference, ids, RTOL["fp32"])  # 8 graph calls
        assert list(state) == ["past_ema.0", "past_ema.1"]


def test_inspect_names_the_mixer_and_export_help_lists_it(ema, run_cli):
    code, out, err = run_cli("inspect", ema("custom").directory)
    assert code == 0, err
    assert "mixer: an exponential moving average" in out and "past_ema.0" in out
    code, out, _ = run_cli("inspect", ema("stack").directory)
    assert code == 0 and "0: an exponential moving average" in out and "1: causal softmax attention" in out
    code, out, _ = run_cli("export", "--help")
    assert code == 0 and "ema: an exponential moving average" in " ".join(out.split())


def test_triton_starts_h_at_zeros_and_refuses_the_stack_whose_state_names_sort_apart(ema):
    """past_ema.* sorts before past_key_values.*, present_ema.* after present.*: Triton's pairing by name
    order would feed a KV cache into h, so package --triton refuses the stack in one line (docs/architecture.md)."""
    from samout_edge.artifact.manifest import read_manifest
    from samout_edge.triton_server.plan import model_io

    _, _, states, _ = model_io(read_manifest(ema("native").directory))
    assert [(s.input_name, s.data_file) for s in states] == [("past_ema.0", "empty_linear.fp32"), ("past_ema.1", "empty_linear.fp32")]
    with pytest.raises(SamoutError, match="pairs states by name order"):
        model_io(read_manifest(ema("stack").directory))
