import dataclasses
import json

import numpy as np
import pytest

from samout_edge.errors import SamoutError
from samout_edge.generate import Sampler, Vocab, generate
from samout_edge.runtime.registry import load_runner


@pytest.mark.parametrize("arch", ["cummax", "softmax"])
def test_ort_and_torch_give_the_same_greedy_tokens(exported, arch):
    d = exported(arch=arch).directory
    ort_ids = generate(load_runner(d, "ort"), [5, 9, 17, 3], 40).new_ids
    torch_ids = generate(load_runner(d, "torch"), [5, 9, 17, 3], 40).new_ids
    assert ort_ids == torch_ids and len(ort_ids) == 40


def test_vocab_greedy_longest_match():
    vocab = Vocab(["<pad>", "t", "h", "e", "th", "the", " ", "c", "a"])
    assert vocab.encode("the cat") == [5, 6, 7, 8, 1]
    assert vocab.decode(5) == "the" and vocab.decode(99) == "<99>"
    with pytest.raises(SamoutError, match="no token for 'x'"):
        vocab.encode("tax")


def test_vocab_file_errors(tmp_path):
    (tmp_path / "v.json").write_text(json.dumps({"a": 1}))
    with pytest.raises(SamoutError, match="JSON list of strings"):
        Vocab.load(tmp_path / "v.json")


def test_sampling_is_reproducible_and_top_k_restricts():
    logits = np.array([0.0, 5.0, 4.9, -2.0, 1.0])
    draws = [Sampler(1.0, 2, seed=3)(logits) for _ in range(5)]
    assert draws == [Sampler(1.0, 2, seed=3)(logits)] * 5
    sampler = Sampler(1.0, 2, seed=0)
    assert {sampler(logits) for _ in range(200)} <= {1, 2}
    assert Sampler()(logits) == 1


def test_generation_limits(exported):
    runner = load_runner(exported().directory, "ort")
    with pytest.raises(SamoutError, match="outside the vocabulary"):
        generate(runner, [1, 128], 3)
    generate(runner, [1] * 290, 20)  # past max_seq 300: the prompt is fed in chunks, nothing refused
    softmax = load_runner(exported(arch="softmax").directory, "ort")
    softmax.info = dataclasses.replace(softmax.info, max_context=300)  # e.g. an engine's profiles
    with pytest.raises(SamoutError, match="needs a context of 309 tokens; this ort target holds at most 300"):
        generate(softmax, [1] * 290, 20)
    with pytest.raises(SamoutError, match="at least 1"):
        generate(runner, [1], 0)


def test_an_export_carries_its_vocab(tmp_path, tiny_checkpoint, run_cli):
    """export --vocab copies it in (hashed); generate and serve then take text without --vocab."""
    from samout_edge.artifact.vocab import export_vocab
    from samout_edge.exporter.onnx_export import ExportOptions, export

    words = tmp_path / "words.json"
    words.write_text(json.dumps([chr(i) for i in range(128)]))
    out = export(tmp_path / "e", ExportOptions(max_seq=64), checkpoint=tiny_checkpoint, run_verify=False, vocab=words)
    assert "vocab.json" in out.manifest.files and export_vocab(out.directory).encode("hi") == [104, 105]
    code, text, err = run_cli("generate", out.directory, "--prompt", "hi", "--max-new-tokens", "4", "--json")
    assert code == 0, err
    result = json.loads(text)
    assert result["prompt_ids"] == [104, 105] and result["text"] == "".join(chr(t) for t in result["new_ids"])
    (out.directory / "vocab.json").write_text(json.dumps(["x"] * 128))
    code, _, err = run_cli("generate", out.directory, "--prompt", "hi")
    assert code == 1 and "does not match the sha256" in err
    big = tmp_path / "big.json"
    big.write_text(json.dumps(["a"] * 129))
    with pytest.raises(SamoutError, match="ids up to 128, the model only 0..127"):
        export(tmp_path / "f", ExportOptions(max_seq=64), checkpoint=tiny_checkpoint, run_verify=False, vocab=big)
    assert not (tmp_path / "f").exists()


def test_non_finite_logits_are_an_error_not_a_token(exported):
    """A NaN row (here: a prompt past max_seq) is refused, never sampled (np.argmax would say 0)."""
    with load_runner(exported(max_seq=300).directory, "ort") as runner:
        runner.info = type(runner.info)(**{**runner.info.__dict__, "max_seq": None})  # past the limit on purpose
        runner.ubatch = None  # one call of all 301 tokens
        with pytest.raises(SamoutError, match="non-finite logits at new token 1"):
            generate(runner, [1] * 301, 3)
