"""The trained set shipped in benchmarks/trained/ (made by benchmarks/train_set.py).

Checks that what the script wrote belongs together and that the models learned
something: same config and size (a hybrid: plus its alpha per layer), a byte
vocab, the same initial weights, batches and steps for every arch, a training
curve, held-out bits per byte well below the 8 of a uniform guess, and a greedy
continuation that reads as text.
"""

from __future__ import annotations

import importlib.util
import json
import string
from pathlib import Path

import pytest

from samout_edge.generate import Vocab, generate
from samout_edge.models.checkpoint import load_checkpoint
from samout_edge.runtime.torch_runner import load_torch_runner

ROOT = Path(__file__).resolve().parent.parent
PAIR = ROOT / "benchmarks" / "trained"
ARCHS = ("cummax", "softmax", "hybrid", "hybrid-w64", "softmax-w64", "linear")


@pytest.fixture(scope="module")
def checkpoints():
    return {arch: load_checkpoint(PAIR / arch) for arch in ARCHS}


def test_every_checkpoint_loads_as_its_own_arch_only(checkpoints):
    for arch, ckpt in checkpoints.items():
        ckpt.model(arch)
        hybrid = arch.startswith("hybrid")
        assert (ckpt.alphas is not None) == hybrid
        if hybrid:
            assert all(0 < a < 1 for a in ckpt.alphas)


@pytest.fixture(scope="module")
def report() -> dict:
    return json.loads((PAIR / "train.json").read_text())


def test_checkpoints_have_the_same_config_and_size(checkpoints):
    config = checkpoints["cummax"].config
    assert all(c.config == config for c in checkpoints.values())
    assert config.vocab_size == 256
    counts = {arch: sum(t.numel() for t in c.state_dict.values()) for arch, c in checkpoints.items()}
    for arch, count in counts.items():  # a hybrid adds one parameter per layer: its blend
        assert count == config.parameter_count() + (config.num_layers if arch.startswith("hybrid") else 0)
    for arch in ARCHS:
        assert (PAIR / arch / "model.safetensors").stat().st_size < 8 << 20  # a few MB each


def test_vocab_is_utf8_bytes():
    from samout_edge.artifact.vocab import ByteVocab, Vocab

    assert json.loads((PAIR / "vocab.json").read_text()) == {"kind": "utf-8 bytes"}
    assert isinstance(Vocab.load(PAIR / "vocab.json"), ByteVocab)


def test_heldout_list_names_stdlib_files():
    files = [line for line in (PAIR / "heldout.txt").read_text().splitlines() if line]
    assert files
    assert all(f.endswith(".py") and not f.startswith("/") for f in files)


def test_report_has_every_arch_trained_alike(report, checkpoints):
    assert report["config"] == checkpoints["cummax"].config.to_dict()
    assert set(report["archs"]) == set(ARCHS)
    for run in report.get("added_runs", []):  # an arch added later: every arch re-timed on its machine
        assert run["archs"] and run["machine"]["cpu"] and set(run["interleaved_throughput"]["archs"]) == set(ARCHS)
    assert report["same_initial_weights"] and report["same_batches"]
    assert report["steps_done"] == report["steps"] > 0
    assert report["tokens_seen"] == report["steps"] * report["batch"] * report["seq"]
    for arch in ARCHS:
        result = report["archs"][arch]
        assert result["steps_done"] == report["steps"] and result["tokens_per_s"] > 0
        # training speed, interleaved: the set's first run, or the run that added the arch (train_set.py --archs)
        speeds = [report["interleaved_throughput"]] + [r["interleaved_throughput"] for r in report.get("added_runs", [])]
        assert any(s["archs"].get(arch, {}).get("tokens_per_s_median", 0) > 0 for s in speeds)
        # a uniform guess over bytes is 8 bits; the models must have learned a lot more than that
        assert 0 < result["heldout_bits_per_byte"] < 4
        curve = result["curve"]
        assert [p["step"] for p in curve] == sorted(p["step"] for p in curve) and curve[-1]["step"] == report["steps"]
        assert curve[-1]["heldout_bits_per_byte"] < curve[0]["heldout_bits_per_byte"] + 0.5
        assert result["alpha"] == (pytest.approx(checkpoints[arch].alphas, abs=1e-3) if checkpoints[arch].alphas
                                   else None)


def test_cummax_continues_a_prompt_with_printable_text(checkpoints):
    vocab = Vocab.load(PAIR / "vocab.json")
    # at about 3 bits per byte greedy decoding loops (", self, self, ..."), but it loops on text
    prompt = vocab.encode("class Foo:\n    def __init__(self")
    runner = load_torch_runner(checkpoints["cummax"], "cummax", "fp32", "last")
    result = generate(runner, prompt, 40)
    text = vocab.decode_ids(result.new_ids)
    assert text.strip()
    assert all(c in string.printable for c in text), repr(text)


def test_write_heldout_concatenates_the_listed_files(tmp_path):
    spec = importlib.util.spec_from_file_location("train_set", ROOT / "benchmarks" / "train_set.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    target = tmp_path / "heldout.py.txt"
    size = module.write_heldout(target, PAIR, 4096)
    assert size == len(target.read_bytes()) == 4096  # the held-out files hold far more than 4 KiB


@pytest.fixture(scope="module")
def int4_export(tmp_path_factory):
    """The trained SamOut as a user deploys it on a CPU: int4 weights, the byte vocab."""
    from samout_edge.exporter.onnx_export import ExportOptions, export

    out = tmp_path_factory.mktemp("trained") / "cummax-int4"
    return export(out, ExportOptions(weights="int4", max_seq=256), checkpoint=PAIR / "cummax", vocab="bytes").directory


def test_the_openai_sdk_against_the_trained_int4_export(int4_export):
    """Issue 20, as a user's application would run it: every completions parameter, chat
    streamed and not, a session through extra_body, non-ASCII text, and our errors."""
    openai = pytest.importorskip("openai")
    from samout_edge.serve.process import ServerProcess

    proc = ServerProcess(int4_export, "--memory-only", "--api-key", "k" * 24)
    try:
        client = openai.OpenAI(base_url=f"{proc.url}/v1", api_key="k" * 24)
        model = client.models.list().data[0].id
        r = client.completions.create(model=model, prompt=["def café(x):\n", "class Foo:\n"], n=2, max_tokens=24,
                                      temperature=0.8, top_p=0.9, presence_penalty=0.5, frequency_penalty=0.5,
                                      stop=["\n\n"], logprobs=2, seed=7, user="test")
        assert [c.index for c in r.choices] == [0, 1, 2, 3] and all("\n\n" not in c.text for c in r.choices)
        assert all(len(c.logprobs.token_logprobs) == len(c.model_extra["token_ids"]) for c in r.choices)
        assert r.usage.prompt_tokens == len("def café(x):\n".encode()) + len(b"class Foo:\n")
        echoed = client.completions.create(model=model, prompt="def café(x):\n", max_tokens=8, echo=True, seed=1)
        assert echoed.choices[0].text.startswith("def café(x):\n")
        streamed = [ch for ch in client.completions.create(model=model, prompt="import os\n", max_tokens=16,
                                                           temperature=0, stream=True,
                                                           stream_options={"include_usage": True})]
        assert streamed[-1].usage.completion_tokens == 16 and not streamed[-1].choices
        messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Sort a list: 中"}]
        whole = client.chat.completions.create(model=model, messages=messages, max_tokens=20, temperature=0)
        text = "".join(ch.choices[0].delta.content or "" for ch in client.chat.completions.create(
            model=model, messages=messages, max_tokens=20, temperature=0, stream=True) if ch.choices)
        assert whole.choices[0].message.content == text
        session = client.post("/sessions", cast_to=object, body={})
        client.completions.create(model=model, prompt="x = ", max_tokens=4, temperature=0,
                                  extra_body={"session": session["id"]})
        after = client.get(f"/sessions/{session['id']}", cast_to=object)
        assert after["position"] == len("x = ") + 3
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{proc.url}/v1", api_key="wrong-key-wrong-key").models.list()
        with pytest.raises(openai.BadRequestError, match="suffix is not supported"):
            client.completions.create(model=model, prompt="x", suffix="y")
    finally:
        proc.kill()
