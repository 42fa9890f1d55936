import pytest
import torch

from samout_edge.artifact.config import PRESETS, ModelConfig
from samout_edge.errors import SamoutError
from samout_edge.models import SamOut
from samout_edge.models.checkpoint import load_checkpoint, save_checkpoint
from tests import seed_reference

TINY = PRESETS["tiny"]


def seed_state_dict(config=TINY):
    return seed_reference.SamOut(config.vocab_size, config.hidden_size, config.num_heads, config.num_layers).state_dict()


def test_directory_round_trip(tmp_path):
    model = SamOut(TINY)
    save_checkpoint(model, tmp_path / "ck")
    ckpt = load_checkpoint(tmp_path / "ck")
    assert ckpt.config == TINY and len(ckpt.sha256) == 64
    for k, v in model.state_dict().items():
        assert torch.equal(ckpt.state_dict[k], v)


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_bare_state_dict_from_seed_code_infers_sizes(tmp_path, suffix):
    path = tmp_path / f"seed{suffix}"
    torch.save(seed_state_dict(), path)
    ckpt = load_checkpoint(path, heads=TINY.num_heads)
    assert ckpt.config == TINY


def test_default_heads_is_8(tmp_path):
    config = ModelConfig(vocab_size=50, hidden_size=64, num_heads=8, num_layers=1)
    torch.save(seed_state_dict(config), tmp_path / "s.pt")
    assert load_checkpoint(tmp_path / "s.pt").config.num_heads == 8


def test_wrapped_state_dict_and_alpha_of_shape_1(tmp_path):
    state = seed_state_dict()
    state["decoder_layers.0.alpha"] = torch.tensor([0.25])
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, tmp_path / "w.pt")
    ckpt = load_checkpoint(tmp_path / "w.pt", heads=TINY.num_heads)
    assert ckpt.state_dict["decoder_layers.0.alpha"].shape == ()
    assert ckpt.model().decoder_layers[0].alpha.item() == 0.25


def test_missing_file(tmp_path):
    with pytest.raises(SamoutError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")


def test_truncated_file(tmp_path):
    torch.save(seed_state_dict(), tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(SamoutError, match="not a PyTorch state_dict file, or truncated"):
        load_checkpoint(tmp_path / "cut.pt")


def test_truncated_safetensors(tmp_path):
    save_checkpoint(SamOut(TINY), tmp_path / "ck")
    weights = tmp_path / "ck" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(SamoutError, match="cannot read|do not belong together"):
        load_checkpoint(tmp_path / "ck")


def test_foreign_keys_are_named(tmp_path):
    state = seed_state_dict()
    del state["decoder_layers.1.ffn.gate.weight"]
    state["decoder_layers.1.ffn.extra.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(SamoutError, match=r"missing decoder_layers\.1\.ffn\.gate\.weight; unexpected decoder_layers\.1\.ffn\.extra\.weight"):
        load_checkpoint(tmp_path / "bad.pt", heads=TINY.num_heads)


def test_not_samout_at_all(tmp_path):
    torch.save({"conv.weight": torch.zeros(3, 3)}, tmp_path / "other.pt")
    with pytest.raises(SamoutError, match="not SamOut's"):
        load_checkpoint(tmp_path / "other.pt")


def test_wrong_shape_is_named(tmp_path):
    state = seed_state_dict()
    state["decoder_layers.0.ffn.ffn1.weight"] = torch.zeros(TINY.hidden_size, TINY.hidden_size + 1)
    torch.save(state, tmp_path / "shape.pt")
    with pytest.raises(SamoutError, match=r"decoder_layers\.0\.ffn\.ffn1\.weight has shape \[32, 33\]"):
        load_checkpoint(tmp_path / "shape.pt", heads=TINY.num_heads)


def test_heads_that_do_not_divide_hidden(tmp_path):
    torch.save(seed_state_dict(), tmp_path / "s.pt")
    with pytest.raises(SamoutError, match="--heads 5 does not divide"):
        load_checkpoint(tmp_path / "s.pt", heads=5)


def test_not_a_state_dict(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(SamoutError, match="does not hold a state_dict"):
        load_checkpoint(tmp_path / "list.pt")


def test_directory_without_files(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SamoutError, match="not a checkpoint directory"):
        load_checkpoint(tmp_path / "empty")
