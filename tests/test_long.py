"""Any length, exactly (issue 16): a cummax export with max_seq 128 takes 4x and 8x that
in generate, eval, serve, bench and verify, fed in chunks with the state carried, and
matches PyTorch on the whole sequence (which has no length limit)."""

import json
from pathlib import Path

import numpy as np
import pytest

from samout_edge.artifact.manifest import read_manifest
from samout_edge.artifact.quantization import RTOL
from samout_edge.exporter.onnx_export import ExportOptions, export
from samout_edge.generate import generate
from samout_edge.models.checkpoint import load_checkpoint
from samout_edge.runtime.registry import load_runner
from samout_edge.runtime.torch_runner import load_torch_runner
from tests.splits import check_any_split

MAX_SEQ = 128
PAIR = Path(__file__).parents[1] / "benchmarks" / "trained" / "cummax"
VARIANTS = {
    "native-fp32": dict(),
    "custom-fp32": dict(lowering="custom"),
    "native-fp16": dict(dtype="fp16"),
    "int4": dict(weights="int4"),
}


@pytest.fixture(scope="module")
def short(tmp_path_factory, tiny_checkpoint, tiny_vocab, calibration_text):
    """Exports with max_seq 128 and logits for every position, made once each."""
    root, made = tmp_path_factory.mktemp("short"), {}

    def get(name: str) -> Path:
        if name not in made:
            text = calibration_text if VARIANTS[name].get("dtype") == "fp16" else None
            options = ExportOptions(max_seq=MAX_SEQ, logits="all", calibration_text=text, **VARIANTS[name])
            made[name] = export(root / name, options, checkpoint=tiny_checkpoint, run_verify=False,
                                vocab=tiny_vocab if text else None).directory
        return made[name]

    return get


def pytorch(directory: Path, checkpoint: Path, logits: str = "all"):
    """PyTorch fp32 on the export's checkpoint with the export's (dequantized) weights: no length limit."""
    m = read_manifest(directory)
    return load_torch_runner(load_checkpoint(checkpoint), m.arch, "fp32", logits, export_dir=directory)


def close(a: np.ndarray, b: np.ndarray, rtol: float) -> bool:
    return float(np.abs(np.asarray(a, np.float64) - b).max()) <= rtol * max(1.0, float(np.abs(b).max()))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_chunked_equals_whole_equals_token_by_token(short, tiny_checkpoint, variant):
    d = short(variant)
    rtol = RTOL[read_manifest(d).dtype]
    ids = np.random.default_rng(1).integers(0, 128, (2, 8 * MAX_SEQ))
    with load_runner(d, "ort") as runner, pytorch(d, tiny_checkpoint) as reference:
        check_any_split(runner, reference, ids, rtol)  # one call of the API, 8 graph calls


@pytest.mark.parametrize("factor", [4, 8])
def test_generate_takes_any_prompt_and_matches_pytorch(short, tiny_checkpoint, factor):
    d = short("native-fp32")
    prompt = np.random.default_rng(factor).integers(1, 128, factor * MAX_SEQ).tolist()
    with load_runner(d, "ort") as runner, pytorch(d, tiny_checkpoint, "last") as reference:
        got = generate(runner, prompt, 2 * MAX_SEQ).new_ids
        assert got == generate(reference, prompt, 2 * MAX_SEQ).new_ids


def test_the_trained_pair_answers_long_text_as_pytorch_does(tmp_path):
    """Real text, 4x max_seq of prompt: the same greedy continuation as PyTorch on the checkpoint."""
    d = export(tmp_path / "pair", ExportOptions(max_seq=MAX_SEQ), checkpoint=PAIR, run_verify=False).directory
    source = (Path(json.__file__).parent / "decoder.py").read_bytes()[: 4 * MAX_SEQ]
    prompt = list(source)
    with load_runner(d, "ort") as runner, pytorch(d, PAIR, "last") as reference:
        assert generate(runner, prompt, 64).new_ids == generate(reference, prompt, 64).new_ids


@pytest.mark.parametrize("factor", [4, 8])
def test_eval_windows_past_max_seq_match_pytorch(short, tmp_path, factor):
    from samout_edge.evaluate import eval_target

    text, vocab = tmp_path / "t.txt", tmp_path / "v.json"
    text.write_text("".join(chr(32 + i % 90) for i in np.random.default_rng(0).integers(0, 90, 3 * factor * MAX_SEQ)))
    vocab.write_text(json.dumps([chr(i) for i in range(128)]))
    result = eval_target(short("native-fp32"), text, window=factor * MAX_SEQ, vocab=vocab)
    assert result.window == factor * MAX_SEQ and result.top1_agreement == 1.0 and result.max_logit_error < 1e-4
    buckets = {(b["from"], b["to"]) for b in result.by_position}
    assert (256, 1024) in buckets  # positions past max_seq were scored
    assert sum(b["tokens"] for b in result.by_position) == result.tokens


def test_eval_stream_is_one_context_and_equals_one_window(short, tmp_path):
    """--stream scores the file as one context in pieces: the same numbers as one window over all of it,
    and PyTorch agrees on the stream's first tokens."""
    from samout_edge.evaluate import eval_target

    text, vocab = tmp_path / "t.txt", tmp_path / "v.json"
    text.write_text("".join(chr(32 + i) for i in np.random.default_rng(2).integers(0, 90, 1500)))
    vocab.write_text(json.dumps([chr(i) for i in range(128)]))
    stream = eval_target(short("native-fp32"), text, vocab=vocab, stream=True)
    whole = eval_target(short("native-fp32"), text, vocab=vocab, window=1500, with_reference=False)
    assert stream.mode == "stream" and stream.window == 1500 and stream.tokens == whole.tokens == 1499
    assert stream.bits_per_byte == pytest.approx(whole.bits_per_byte, rel=1e-6)
    assert stream.top1_agreement == 1.0 and stream.max_logit_error < 1e-4 and stream.compared_tokens == 1499
    for a, b in zip(stream.by_position, whole.by_position, strict=True):
        assert (a["from"], a["to"], a["tokens"]) == (b["from"], b["to"], b["tokens"])
        assert a["bits_per_byte"] == pytest.approx(b["bits_per_byte"], rel=1e-6)


def test_eval_stream_reads_the_text_in_pieces(short, tmp_path, monkeypatch):
    """The file is read a piece at a time while it is scored, not whole first (flat memory)."""
    import samout_edge.artifact.vocab as vocab_module
    from samout_edge.evaluate import eval_target

    text, vocab = tmp_path / "t.txt", tmp_path / "v.json"
    text.write_text("".join(chr(32 + i) for i in np.random.default_rng(3).integers(0, 90, 5000)))
    vocab.write_text(json.dumps([chr(i) for i in range(128)]))
    events = []
    real_iter = vocab_module.iter_tokens

    def small_pieces(*args, **kwargs):
        for piece in real_iter(*args, **{**kwargs, "piece_bytes": 1000}):
            events.append("read")
            yield piece

    monkeypatch.setattr("samout_edge.evaluate.iter_tokens", small_pieces)
    runner_run = type(load_runner(short("native-fp32"), "ort")).run_impl

    def run_impl(self, ids, state):
        events.append("run")
        return runner_run(self, ids, state)

    monkeypatch.setattr(type(load_runner(short("native-fp32"), "ort")), "run_impl", run_impl)
    result = eval_target(short("native-fp32"), text, vocab=vocab, stream=True, with_reference=False)
    assert result.tokens == 4999 and events.count("read") == 5
    assert events.index("run") < len(events) - 1 - events[::-1].index("read")  # scoring began before the last read


@pytest.mark.parametrize("factor", [4, 8])
def test_serve_takes_a_long_prompt_into_a_session(short, factor):
    from fastapi.testclient import TestClient

    from samout_edge.serve import open_server
    from samout_edge.serve.app import create_app
    from samout_edge.serve.options import ServeOptions

    d = short("native-fp32")
    prompt = np.random.default_rng(factor).integers(1, 128, factor * MAX_SEQ).tolist()
    server = open_server(d, "ort", ServeOptions())
    try:
        with TestClient(create_app(server)) as http:
            sid = http.post("/v1/sessions").json()["id"]
            r = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 8, "temperature": 0, "session": sid})
            assert r.status_code == 200, r.text
            with load_runner(d, "ort") as runner:
                assert r.json()["choices"][0]["token_ids"] == generate(runner, prompt, 8).new_ids
            assert r.json()["session"]["position"] == factor * MAX_SEQ + 7  # positions are unbounded
    finally:
        server.close()


def test_bench_contexts_past_max_seq(run_cli, short, tiny_checkpoint, tmp_path):
    d = short("native-fp32")
    code, out, err = run_cli("bench", d, "--work", tmp_path / "w", "--context", "512,1024", "--seq", "512",
                             "--backend", "ort", "--budget", "0.05", "--repeats", "2", "--min-repeats", "1",
                             "--no-memory", "--json", tmp_path / "b.json")
    assert code == 0, err
    records = json.loads((tmp_path / "b.json").read_text())["records"]
    decode = {r["context"]: r for r in records if r["arch"] == "cummax" and r["mode"] == "decode"}
    assert set(decode) == {512, 1024} and decode[512]["state_bytes"] == decode[1024]["state_bytes"]
    assert all(r["refused"] is None for r in records)
