"""`eval`: quality of the deployed artifact, against PyTorch fp32 on the same windows."""

import json
import math

import numpy as np
import pytest

from samout_edge.evaluate import batches, eval_target, evaluate, log_softmax, read_tokens, token_nll, windows
from samout_edge.runtime.ort_runner import load_ort_runner
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
    assert result.top1_agreement == 1.0 and result.max_logit_error < 1e-4 and 0 <= result.kl_from_fp32 < 1e-9
    assert 0 < result.bits_per_byte < 20 and math.isclose(result.perplexity, 2 ** result.bits_per_byte, rel_tol=1e-9)


def test_eval_reports_the_mean_kl_of_a_quantized_export_from_fp32(tmp_path, tiny_checkpoint, text_and_vocab):
    """Issue 19: fidelity next to agreement; KL(fp32 || int4) per token, computed here from the logits."""
    from samout_edge.artifact.vocab import Vocab
    from samout_edge.exporter.onnx_export import ExportOptions, export
    from samout_edge.models.checkpoint import load_checkpoint
    from samout_edge.runtime.torch_runner import load_torch_runner

    text, vocab = text_and_vocab
    d = export(tmp_path / "q", ExportOptions(weights="int4", block_size=16, max_seq=64, logits="all"),
               checkpoint=tiny_checkpoint, run_verify=False).directory
    result = eval_target(d, text, window=64, vocab=vocab)
    ids, _ = read_tokens(text, 128, Vocab.load(vocab))
    window = np.asarray(ids[:64])[None]
    with load_ort_runner(d) as runner, load_torch_runner(load_checkpoint(tiny_checkpoint), "cummax") as ref:
        q = log_softmax(runner.run(window, runner.initial_state(1))[0][0, :-1])
        p = log_softmax(ref.to_numpy(ref.run(window, ref.initial_state(1))[0])[0, :-1])
    first_window_kl = float((np.exp(p) * (p - q)).sum(-1).mean())
    assert result.kl_from_fp32 > 1e-4 and result.top1_agreement < 1
    assert result.kl_from_fp32 == pytest.approx(first_window_kl, rel=0.5)  # the mean over every compared window


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
        (b"", [], "at least 2 tokens are needed"),
        (b"\xff\xfe abc", [], "is not UTF-8 text"),
        (b"hello world", ["--window", "16", "--stride", "17"], "--stride must be 1..window"),
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


def test_batches_group_consecutive_windows_of_one_length():
    for n, window, stride, batch in ((1000, 64, 63, 8), (1000, 64, 16, 3), (50, 64, 63, 8), (130, 64, 63, 2)):
        spans = windows(n, window, stride)
        calls = batches(spans, batch)
        assert [s for call in calls for s in call] == spans
        assert all(1 <= len(call) <= batch and len({e - s for s, e, _ in call}) == 1 for call in calls)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_token_nll_matches_float64_log_softmax(dtype):
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((3, 40, 256)) * 8 + 30).astype(dtype)  # large offsets: the shift matters
    ids = rng.integers(0, 256, (3, 40))
    want = -np.take_along_axis(log_softmax(logits[:, :-1]), ids[:, 1:, None], axis=-1)[..., 0]
    got = token_nll(logits, ids)
    assert got.dtype == np.float32 and got.shape == (3, 39)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("arch", ["cummax", "softmax"])
def test_batched_and_concurrent_eval_equals_one_window_at_a_time(exported, text_and_vocab, arch):
    """Batch size, worker threads and the reference's window count change nothing but speed."""
    text, vocab = text_and_vocab
    from samout_edge.generate import Vocab

    directory = exported(arch=arch, logits="all").directory
    with load_ort_runner(directory) as one, load_ort_runner(directory, intra_op_threads=1, spinning=False) as many:
        tokens, sizes = read_tokens(text, one.info.config.vocab_size, Vocab.load(vocab))
        for window, stride in ((64, 63), (48, 20)):
            base = evaluate(one, tokens, sizes, window, stride, batch=1, workers=1)
            fast = evaluate(many, tokens, sizes, window, stride, reference=one, batch=8, workers=2,
                            reference_windows=10)
            assert (fast["tokens"], fast["bytes"]) == (base["tokens"], base["bytes"]) == (2999, 2999)
            assert math.isclose(fast["bits_per_byte"], base["bits_per_byte"], rel_tol=1e-6)
            # the reference covers whole calls: the first two (16 windows) hold the first 10
            spans = windows(len(tokens), window, stride)
            assert fast["compared_tokens"] == sum(e - first for _, e, first in spans[:16])
            assert fast["top1_agreement"] == 1.0 and fast["max_logit_error"] < 1e-4


def test_eval_record_keeps_the_cost_in_the_export(run_cli, tmp_path, tiny_checkpoint, text_and_vocab):
    """Issue 19: what a precision costs on held-out text travels with the export (export.json quality)."""
    from samout_edge.artifact.manifest import read_manifest
    from samout_edge.exporter.onnx_export import ExportOptions, export

    text, vocab = text_and_vocab
    d = export(tmp_path / "q", ExportOptions(weights="int4", block_size=16, max_seq=64, logits="all"),
               checkpoint=tiny_checkpoint, run_verify=False).directory
    for _ in range(2):  # the same text, mode and window: replaced, not appended
        code, out, err = run_cli("eval", d, "--text", text, "--vocab", vocab, "--window", "64", "--record", "--json")
        assert code == 0, err
    result = json.loads(out)[0]
    quality = read_manifest(d).quality
    assert len(quality) == 1 and quality[0]["bits_per_byte"] == result["bits_per_byte"]
    # every window was compared (47 < 64): the cost is the whole difference from PyTorch fp32
    assert result["compared_tokens"] == result["tokens"]
    assert result["cost_bits_per_byte"] == pytest.approx(result["bits_per_byte"] - result["fp32_bits_per_byte"], abs=1e-9)
    assert quality[0]["cost_bits_per_byte"] == result["cost_bits_per_byte"] and quality[0]["kl_from_fp32"] > 0
    code, out, _ = run_cli("inspect", d)
    assert "quality (eval --record" in out and "vs PyTorch fp32" in out
    code, out, err = run_cli("eval", tiny_checkpoint, "--text", text, "--vocab", vocab, "--record")
    assert code == 1 and "is a checkpoint" in err


NON_ASCII = "café naïve — 5€, 中文, \ufeffBOM and ASCII"


def test_the_byte_vocab_round_trips_non_ascii_text_as_training_saw_it(tmp_path):
    """Issue 20: "é" is the UTF-8 bytes C3 A9 (what a byte-level model trained on), not the id 233
    a latin-1 string list gives it; streamed decoding never splits a character."""
    from samout_edge.artifact.vocab import ByteVocab, Vocab

    v = Vocab.load("bytes")
    assert isinstance(v, ByteVocab) and v.encode("é") == [0xC3, 0xA9]
    ids = v.encode(NON_ASCII)
    assert ids == list(NON_ASCII.encode()) and v.decode_ids(ids) == NON_ASCII
    piece = v.stream()
    pieces = [piece(i) for i in ids]
    assert "".join(pieces) == NON_ASCII and all(p in NON_ASCII for p in pieces if p)
    assert pieces[ids.index(0xA9) - 1] == ""  # the first byte of "é" alone is no text yet
    assert v.decode_ids([0x63, 0xC3, 0x28]) == "c\ufffd("  # an invalid sequence shows as U+FFFD
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps(v.to_json()))
    assert isinstance(Vocab.load(path), ByteVocab)
    latin1 = Vocab([chr(i) for i in range(256)])  # the old trained pair's vocab.json: a character per id
    assert latin1.encode("é") == [233]  # its rule, stated: one id per character, not per byte


def test_eval_of_non_ascii_text_scores_the_bytes_training_saw(tmp_path):
    """With the byte vocab the export's eval equals its checkpoint's (bytes in both), where the
    latin-1 string list scored other ids and fewer tokens."""
    from samout_edge.artifact.config import ModelConfig
    from samout_edge.exporter.onnx_export import ExportOptions, export
    from samout_edge.models.checkpoint import random_checkpoint, save_checkpoint

    ckpt = tmp_path / "ckpt"
    save_checkpoint(random_checkpoint(ModelConfig(256, 32, 4, 2)), ckpt)
    text = tmp_path / "t.txt"
    text.write_text(NON_ASCII * 20)
    d = export(tmp_path / "e", ExportOptions(max_seq=64, logits="all"), checkpoint=ckpt, vocab="bytes",
               run_verify=False).directory
    exported = eval_target(d, text, window=64)
    checkpoint = eval_target(ckpt, text, window=64)
    assert exported.tokens == checkpoint.tokens == len((NON_ASCII * 20).encode()) - 1
    assert exported.bits_per_byte == pytest.approx(checkpoint.bits_per_byte, rel=1e-5)


def _hf_tokenizer(tmp_path, vocab_size: int = 120):
    """A byte-level BPE tokenizer.json trained here with Hugging Face's tokenizers library."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [NON_ASCII, "def main():\n    return 0\n", "the cat sat on the mat " * 4] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


def test_a_hugging_face_tokenizer_json_round_trips_and_streams_whole_characters(tmp_path):
    from samout_edge.artifact.vocab import HFTokenizer, Vocab, iter_tokens

    v = Vocab.load(_hf_tokenizer(tmp_path, 300))
    assert isinstance(v, HFTokenizer) and v.size <= 300
    ids = v.encode(NON_ASCII)
    assert v.decode_ids(ids) == NON_ASCII and len(ids) < len(NON_ASCII.encode())  # merges happened
    piece = v.stream()
    pieces = [piece(i) for i in ids]
    assert "".join(pieces) == NON_ASCII and not any("\ufffd" in p for p in pieces)
    text = tmp_path / "t.txt"
    text.write_text((NON_ASCII + " the cat\n") * 40)
    parts = list(iter_tokens(text, 300, v, piece_bytes=37))  # small pieces: tokens never split at a boundary
    streamed = np.concatenate([i for i, _ in parts])
    assert streamed.tolist() == v.encode(text.read_text())
    assert int(np.concatenate([b for _, b in parts]).sum()) == text.stat().st_size  # every byte counted once


def test_eval_with_a_tokenizer_json_equals_its_checkpoint(tmp_path):
    from samout_edge.artifact.config import ModelConfig
    from samout_edge.exporter.onnx_export import ExportOptions, export
    from samout_edge.models.checkpoint import random_checkpoint, save_checkpoint

    tokenizer = _hf_tokenizer(tmp_path, 300)
    save_checkpoint(random_checkpoint(ModelConfig(320, 32, 4, 2)), tmp_path / "ckpt")
    text = tmp_path / "t.txt"
    text.write_text(NON_ASCII * 10)
    d = export(tmp_path / "e", ExportOptions(max_seq=64, logits="all"), checkpoint=tmp_path / "ckpt",
               vocab=tokenizer, run_verify=False).directory
    exported = eval_target(d, text, window=64)
    checkpoint = eval_target(tmp_path / "ckpt", text, window=64, vocab=tokenizer)
    from samout_edge.artifact.vocab import Vocab

    _, sizes, _ = Vocab.load(tokenizer).encode_sized(text.read_text(), final=True)
    assert exported.tokens == checkpoint.tokens == len(sizes) - 1  # every token but the first is predicted
    assert exported.bytes == checkpoint.bytes == len(text.read_bytes()) - sizes[0]  # bits per UTF-8 byte
    assert exported.bits_per_byte == pytest.approx(checkpoint.bits_per_byte, rel=1e-5)


def test_generate_takes_non_ascii_prompts_as_utf8_bytes(tmp_path, run_cli):
    from samout_edge.artifact.config import ModelConfig
    from samout_edge.exporter.onnx_export import ExportOptions, export
    from samout_edge.models.checkpoint import random_checkpoint, save_checkpoint

    save_checkpoint(random_checkpoint(ModelConfig(256, 32, 4, 2)), tmp_path / "ckpt")
    d = export(tmp_path / "e", ExportOptions(max_seq=64), checkpoint=tmp_path / "ckpt", vocab="bytes",
               run_verify=False).directory
    for target, extra in ((d, []), (tmp_path / "ckpt", ["--vocab", "bytes"])):
        code, out, err = run_cli("generate", target, "--prompt", NON_ASCII, "--max-new-tokens", "8", "--json", *extra)
        assert code == 0, err
        result = json.loads(out)
        assert result["prompt_ids"] == list(NON_ASCII.encode())  # the ids training saw
        assert result["text"] == bytes(result["new_ids"]).decode("utf-8", errors="replace")
