import pytest
import torch

from samout_edge.artifact.config import PRESETS, ModelConfig
from samout_edge.errors import SamoutError
from samout_edge.models import SamOut
from tests import seed_reference

TINY = PRESETS["tiny"]


def test_seed_state_dict_loads_strict_and_gives_same_logits():
    torch.manual_seed(1)
    seed = seed_reference.SamOut(TINY.vocab_size, TINY.hidden_size, TINY.num_heads, TINY.num_layers).eval()
    with torch.no_grad():
        for p in seed.parameters():  # move LayerNorm/alpha off their init so a mix-up shows
            p.add_(0.1 * torch.randn_like(p))
    ours = SamOut(TINY).eval()
    ours.load_state_dict(seed.state_dict(), strict=True)
    ids = torch.randint(0, TINY.vocab_size, (2, 37))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids)[0], seed(ids), rtol=0, atol=1e-5)


def test_parameter_names_follow_the_seed():
    names = set(SamOut(TINY).state_dict())
    assert {"em.weight", "head.weight", "decoder_layers.0.self_attention.combined.weight",
            "decoder_layers.1.ffn.ffn1.bias", "decoder_layers.1.ffn.gate.weight", "decoder_layers.0.alpha",
            "decoder_layers.0.layer_norm.weight"} <= names
    assert "head.bias" not in names and "decoder_layers.0.self_attention.combined.bias" not in names


def test_baseline_has_identical_parameters():
    a, b = SamOut(TINY, "cummax"), SamOut(TINY, "softmax")
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    assert sum(p.numel() for p in a.parameters()) == TINY.parameter_count()


@pytest.mark.parametrize("arch", ["cummax", "softmax"])
def test_prefill_equals_chunks_equals_token_by_token(arch):
    model = SamOut(TINY, arch).eval()
    ids = torch.randint(1, TINY.vocab_size, (2, 23))
    with torch.no_grad():
        full, full_state = model(ids)
        chunked, state = [], None
        for chunk in ids.split(7, dim=1):
            logits, state = model(chunk, state)
            chunked.append(logits)
        stepped, step_state = [], None
        for t in range(ids.shape[1]):
            logits, step_state = model(ids[:, t : t + 1], step_state)
            stepped.append(logits)
    torch.testing.assert_close(torch.cat(chunked, 1), full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(stepped, 1), full, rtol=1e-5, atol=1e-5)
    flat = lambda s: [t for x in s for t in (x if isinstance(x, tuple) else (x,))]
    for a, b in zip(flat(full_state), flat(step_state)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_cummax_state_is_constant_size_and_kv_cache_grows():
    ids = torch.randint(1, TINY.vocab_size, (1, 50))
    with torch.no_grad():
        _, cm = SamOut(TINY, "cummax").eval()(ids)
        _, kv = SamOut(TINY, "softmax").eval()(ids)
    assert cm[0].shape == (1, TINY.num_heads, 1, TINY.head_dim)
    assert kv[0][0].shape == (1, TINY.num_heads, 50, TINY.head_dim)


def test_empty_cummax_state_is_lowest_finite():
    state = SamOut(TINY).half().empty_state(3)
    assert state[0].dtype == torch.float16 and torch.all(state[0] == torch.finfo(torch.float16).min)


def test_last_only_returns_last_position():
    model = SamOut(TINY).eval()
    ids = torch.randint(1, TINY.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, last_only=True)[0], model(ids)[0][:, -1:])


def test_fp16_layernorm_runs_in_fp32():
    model = SamOut(TINY).eval()
    ids = torch.randint(1, TINY.vocab_size, (1, 16))
    with torch.no_grad():
        ref = model(ids)[0]
        half = SamOut(TINY).eval()
        half.load_state_dict(model.state_dict())
        got = half.half()(ids)[0]
    assert got.dtype == torch.float16
    assert (got.float() - ref).abs().max() < 5e-3 * max(1.0, ref.abs().max().item())


def test_config_rejects_heads_that_do_not_divide_hidden():
    with pytest.raises(SamoutError, match="must divide"):
        ModelConfig(vocab_size=10, hidden_size=30, num_heads=4, num_layers=1)
