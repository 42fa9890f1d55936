"""`eval`: quality of the deployed artifact, against PyTorch fp32 on the same windows."""

import json
import math

import numpy as np
import pytest

from samout_edge.evaluate import eval_target, windows
from tests.test_cli import one_error_line


@pytest.fixture(scope="module")
def text_and_vocab(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    rng = np.random.default_rng(0)
    (root / "t.txt").write_text("".join(chr(c) for c in rng.integers(32, 127, 3000)))
    (root / "vocab.json").write_text(json.dumps([chr(i) if 32 <= i < 127 else "" for i in range(128)]))
    return root / "t.txt", root / "vocab.json"


def test_windows_score_every_position_once():
    for n, window, stride in ((10, 4, 2), (100, 16, 16), (5, 8, 4), (33, 7, 3)):
        scored = [t for _, end, first in windows(n, window, stride) for t in range(first, end)]
        assert scored == list(range(1, n))
        assert all(end - start <= window for start, end, _ in windows(n, window, stride))


@pytest.mark.parametrize("arch", ["cummax", "softmax"])
def test_eval_of_an_fp32_export_matches_pytorch(exported, text_and_vocab, arch):
    text, vocab = text_and_vocab
    result = eval_target(exported(arch=arch, logits="all").directory, text, window=64, vocab=vocab)
    assert result.tokens == 2999 and result.bytes == 2999
    assert result.top1_agreement == 1.0 and result.max_logit_error < 1e-4
    assert 0 < result.bits_per_byte < 20 and math.isclose(result.perplexity, 2 ** result.bits_per_byte, rel_tol=1e-9)


def test_eval_of_the_checkpoint_on_torch_gives_the_same_number(exported, tiny_checkpoint, text_and_vocab):
    text, vocab = text_and_vocab
    onnx_result = eval_target(exported(logits="all").directory, text, window=64, vocab=vocab, with_reference=False)
    torch_result = eval_target(tiny_checkpoint, text, window=64, vocab=vocab)
    assert math.isclose(onnx_result.bits_per_byte, torch_result.bits_per_byte, rel_tol=1e-5)


def test_eval_two_targets_side_by_side(run_cli, exported, text_and_vocab):
    text, vocab = text_and_vocab
    a, b = exported(logits="all").directory, exported(arch="softmax", logits="all").directory
    code, out, err = run_cli("eval", a, b, "--text", text, "--vocab", vocab, "--window", "32", "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert [r["arch"] for r in rows] == ["cummax", "softmax"] and rows[0]["state_bytes"] < rows[1]["state_bytes"]


@pytest.mark.parametrize(
    "content,extra,match",
    [
        (b"", [], "eval needs at least 2 tokens"),
        (b"\xff\xfe abc", [], "is not UTF-8 text"),
        (b"hello world", ["--window", "301"], "longer than the target's max_seq 300"),
        (b"hello world", ["--no-logits-all"], "export with --logits all"),
    ],
)
def test_eval_bad_input(run_cli, exported, text_and_vocab, tmp_path, content, extra, match):
    _, vocab = text_and_vocab
    (tmp_path / "x.txt").write_bytes(content)
    logits = "last" if "--no-logits-all" in extra else "all"
    extra = [e for e in extra if e != "--no-logits-all"]
    code, _, err = run_cli("eval", exported(logits=logits).directory, "--text", tmp_path / "x.txt", "--vocab", vocab,
                           *extra)
    assert code == 1 and match in one_error_line(err), err
