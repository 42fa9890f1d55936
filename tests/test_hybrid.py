"""The seed article's next step (issue 18): the hybrid ``alpha * cummax + (1 - alpha) * softmax``
with a learned alpha per layer, and a softmax window W that bounds the decode state, taken
by every command. Tiny preset, W = 8."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from samout_edge.artifact.arch import Blend, arch_name, arch_spec
from samout_edge.artifact.config import PRESETS
from samout_edge.artifact.manifest import Manifest, read_manifest, stated_alpha
from samout_edge.artifact.quantization import RTOL
from samout_edge.errors import SamoutError
from samout_edge.exporter.onnx_export import ExportOptions, export
from samout_edge.models.checkpoint import load_checkpoint, save_checkpoint
from samout_edge.models.model import SamOut, causal_attention
from samout_edge.runtime.registry import load_runner
from samout_edge.runtime.torch_runner import load_torch_runner

TINY = PRESETS["tiny"]
W = 8
NEW_ARCHS = ["hybrid", f"hybrid-w{W}", f"softmax-w{W}"]
MAX_SEQ = 16


def close(a, b, rtol: float) -> bool:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max()) <= rtol * max(1.0, float(np.abs(b).max()))


# --------------------------------------------------------------------------- the model


def test_the_window_attends_to_the_last_w_positions_with_zeros_before_the_start(monkeypatch):
    """Written out one query at a time: query p sees keys p-W+1..p, where the W slots before the
    first token hold zeros (the window is always full: a fixed state shape)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 4) for _ in range(3))
    zeros = torch.zeros(1, 2, W, 4)
    keys, values = torch.cat([zeros, k], 2), torch.cat([zeros, v], 2)
    want = torch.cat([F.scaled_dot_product_attention(q[:, :, i : i + 1], keys[:, :, i + 1 : i + 1 + W],
                                                     values[:, :, i + 1 : i + 1 + W]) for i in range(40)], 2)
    got = causal_attention(q, keys, values, W)  # eager: split into blocks of queries
    assert torch.allclose(got, want, atol=1e-6)
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)  # the exported path: one mask, every shape
    assert torch.allclose(causal_attention(q, keys, values, W), want, atol=1e-6)


def test_the_exported_softmax_keeps_exp_out_of_denormals_and_masked_keys_out_exactly(monkeypatch):
    """The exported fp32 attention raises each score to at least max - 80 (x86's exp is 11x slower on
    denormals) and zeroes the masked weights after: sharp scores (spreads far past 80) give SDPA's
    answer, and values of 1e30 behind the mask change nothing."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 40, 4) * 60, torch.randn(1, 2, 40 + W, 4), torch.randn(1, 2, 40 + W, 4)
    keys_seen = [k[:, :, i + 1 : i + 1 + W] for i in range(40)]
    want = torch.cat([F.scaled_dot_product_attention(q[:, :, i : i + 1], keys_seen[i], v[:, :, i + 1 : i + 1 + W])
                      for i in range(40)], 2)
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    assert torch.allclose(causal_attention(q, k, v, W), want, atol=1e-6)
    behind = v.clone()
    behind[:, :, 0] = 1e30  # the first slot: outside every query's window
    assert torch.equal(causal_attention(q, k, behind, W), causal_attention(q, k, v, W))


@pytest.mark.parametrize("arch", [*NEW_ARCHS, "linear"])
def test_prefill_chunks_and_decode_are_one_computation(arch):
    torch.manual_seed(0)
    model = SamOut(TINY, arch).eval()
    ids = torch.randint(1, TINY.vocab_size, (2, 5 * W + 3))
    with torch.no_grad():
        whole, whole_state = model(ids)
        steps, past = [], None
        for t in range(ids.shape[1]):
            logits, past = model(ids[:, t : t + 1], past)
            steps.append(logits)
        chunks, chunk_past = [], None
        for t in range(0, ids.shape[1], 7):
            logits, chunk_past = model(ids[:, t : t + 7], chunk_past)
            chunks.append(logits)
    assert torch.allclose(torch.cat(steps, 1), whole, atol=1e-5)
    assert torch.allclose(torch.cat(chunks, 1), whole, atol=1e-5)
    spec = arch_spec(arch)
    assert all(torch.allclose(p, w, atol=1e-6) for p, w in zip(spec.flatten(past), spec.flatten(whole_state)))
    for t, state in zip(spec.states(TINY.num_layers), spec.flatten(whole_state)):
        assert state.shape[2] == (ids.shape[1] if t.grows else t.slots)


def test_the_hybrid_is_the_blend_of_its_two_branches():
    """alpha -> 1 is SamOut, alpha -> 0 the softmax baseline, on the same weights."""
    torch.manual_seed(0)
    hybrid = SamOut(TINY, "hybrid").eval()
    weights = {k: v for k, v in hybrid.state_dict().items() if not k.endswith("alpha_logit")}
    ids = torch.randint(1, TINY.vocab_size, (1, 20))
    for logit, arch in ((30.0, "cummax"), (-30.0, "softmax")):
        other = SamOut(TINY, arch).eval()
        other.load_state_dict(weights)
        for layer in hybrid.decoder_layers:
            layer.self_attention.alpha_logit.data.fill_(logit)
        with torch.no_grad():
            assert torch.allclose(hybrid(ids)[0], other(ids)[0], atol=1e-5), arch


def test_samout_weights_load_into_a_hybrid_with_a_stated_alpha(tiny_checkpoint, tmp_path):
    ckpt = load_checkpoint(tiny_checkpoint)
    alphas = lambda m: [torch.sigmoid(x.self_attention.alpha_logit).item() for x in m.decoder_layers]  # noqa: E731
    assert alphas(ckpt.model("hybrid")) == pytest.approx([0.5, 0.5])
    assert alphas(ckpt.model("hybrid-w8", alpha=0.25)) == pytest.approx([0.25, 0.25])
    with pytest.raises(SamoutError, match="between 0 and 1"):
        ckpt.model("hybrid", alpha=1.0)
    with pytest.raises(SamoutError, match="--arch is cummax"):
        ckpt.model("cummax", alpha=0.3)
    trained = ckpt.model("hybrid", alpha=0.7)
    save_checkpoint(trained, tmp_path / "hybrid")
    again = load_checkpoint(tmp_path / "hybrid")
    assert again.alphas == pytest.approx([0.7, 0.7])
    with pytest.raises(SamoutError, match="use --arch hybrid"):
        again.model("cummax")
    with pytest.raises(SamoutError, match="has its own, learned"):
        again.model("hybrid", alpha=0.5)


def test_arch_names():
    assert arch_name("hybrid", W) == "hybrid-w8" and arch_name("softmax", 0) == "softmax"
    assert arch_spec("hybrid-w8").window == W and not arch_spec("hybrid-w8").grows and arch_spec("hybrid").grows
    for bad in ("cummax-w8", "hybrid-w0", "hybrid-w08", "hybrid-w", "softmax-w-1", "<b>x</b>"):
        with pytest.raises(SamoutError, match="unknown arch"):
            arch_spec(bad)
    with pytest.raises(SamoutError, match="not cummax"):
        arch_name("cummax", W)


# --------------------------------------------------------------------------- exports


@pytest.fixture(scope="module")
def made(tmp_path_factory, tiny_checkpoint, tiny_vocab, calibration_text):
    root, cache = tmp_path_factory.mktemp("hybrid"), {}

    def get(arch: str, **options) -> Path:
        key = (arch, *sorted(options.items()))
        if key not in cache:
            out = root / "-".join(str(k) for k in key).replace("(", "").replace(")", "").replace("'", "").replace(", ", "_")
            text = calibration_text if options.get("dtype") == "fp16" else None
            result = export(out, ExportOptions(arch=arch, max_seq=MAX_SEQ, calibration_text=text, **options),
                            checkpoint=tiny_checkpoint, vocab=tiny_vocab if text else None)
            assert result.verification.passed, (key, result.verification.to_dict())
            cache[key] = out
        return cache[key]

    return get


VARIANTS = {
    "native-fp32": dict(),
    "custom-fp32": dict(lowering="custom"),
    "native-fp16": dict(dtype="fp16"),
    "int8": dict(weights="int8"),
    "int4": dict(weights="int4", block_size=16),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("arch", NEW_ARCHS)
def test_every_export_verifies_decode_past_the_window_included(made, arch, variant):
    if arch == f"softmax-w{W}" and variant not in ("native-fp32", "int4"):
        pytest.skip("the windowed baseline: fp32 and int4 are enough (it shares the hybrid's attention)")
    d = made(arch, **VARIANTS[variant])
    m = read_manifest(d)
    cases = m.golden["cases"]
    if arch_spec(arch).window:  # decode steps with the window full of real tokens, each against PyTorch whole
        steps = [c for c in cases if c["name"].startswith("long") and "step" in c["name"]]
        assert steps and all(c["past"] > W for c in steps)
    assert m.verification["passed"]


def test_chunked_prefill_in_the_runner_equals_pytorch_on_the_whole_sequence(tmp_path, tiny_checkpoint):
    for arch in (f"hybrid-w{W}", f"softmax-w{W}"):
        d = export(tmp_path / arch, ExportOptions(arch=arch, max_seq=MAX_SEQ, logits="all"), checkpoint=tiny_checkpoint,
                   run_verify=False).directory
        ids = np.random.default_rng(3).integers(0, 128, (2, 8 * MAX_SEQ))
        with load_runner(d, "ort") as runner, load_torch_runner(load_checkpoint(tiny_checkpoint), arch, "fp32",
                                                                "all") as reference:
            got, state = runner.run(ids, runner.initial_state(2))  # 8 graph calls, the window carried
            want, want_state = reference.run(ids, reference.initial_state(2))
            assert close(got, reference.to_numpy(want), RTOL["fp32"])
            for name, value in state.items():
                assert value.shape == tuple(reference.to_numpy(want_state[name]).shape)
                assert close(value, reference.to_numpy(want_state[name]), RTOL["fp32"]), name


def test_the_hybrid_export_records_alpha_and_inspect_shows_it(made, run_cli):
    d = made(f"hybrid-w{W}")
    manifest = read_manifest(d)
    assert manifest.blend == Blend((0.5, 0.5), "stated", 0.5) and stated_alpha(manifest) == 0.5
    data = json.loads((d / "export.json").read_text())
    assert data["blend"] == {"alpha": [0.5, 0.5], "source": "stated", "stated": 0.5} and "alpha" not in data["extra"]
    old = {k: v for k, v in data.items() if k != "blend"}  # an export made before the blend was a field
    old["extra"] = {**data["extra"], "alpha": [0.5, 0.5], "alpha_from": "stated", "hybrid_alpha": 0.5}
    assert Manifest.from_dict(old).blend == manifest.blend
    assert Manifest.from_dict({**data, "blend": None}).blend is None
    with pytest.raises(SamoutError, match="export.json: blend"):
        Manifest.from_dict({**data, "blend": {"alpha": [0.5], "source": "guessed"}})
    code, out, _ = run_cli("inspect", d)
    assert code == 0 and "softmax over the last 8 positions" in out and "alpha per layer (stated" in out
    assert "constant whatever the context" in out


# --------------------------------------------------------------------------- every command


def test_export_cli_takes_the_arch_and_the_window_and_refuses_nonsense(run_cli, tiny_checkpoint, tmp_path):
    code, out, err = run_cli("export", tiny_checkpoint, "--arch", "hybrid", "--softmax-window", "8", "--hybrid-alpha",
                             "0.3", "--max-seq", "16", "-o", tmp_path / "h", "--json")
    assert code == 0, err
    m = json.loads(out)["manifest"]
    assert m["arch"] == "hybrid-w8" and m["blend"]["alpha"] == pytest.approx([0.3, 0.3]) and m["blend"]["source"] == "stated"
    assert m["blend"]["stated"] == 0.3 and "alpha" not in m["extra"]
    assert [i["shape"] for i in m["inputs"][1:4]] == [["batch", 4, 1, 8], ["batch", 4, 8, 8], ["batch", 4, 8, 8]]
    for args, match in (
        (["--arch", "cummax", "--softmax-window", "8"], "applies to archs with softmax attention"),
        (["--arch", "softmax", "--hybrid-alpha", "0.3"], "--arch is softmax"),
        (["--arch", "hybrid", "--hybrid-alpha", "2"], "between 0 and 1"),
        (["--arch", "hybrid", "--softmax-window", "99999999"], "--softmax-window must be between"),
    ):
        code, out, err = run_cli("export", tiny_checkpoint, *args, "--max-seq", "16", "-o", tmp_path / "bad")
        assert code == 1 and match in err and len(err.strip().splitlines()) == 1, (args, err)
        assert not (tmp_path / "bad").exists()


def test_plan_shows_a_bounded_state_for_a_window(run_cli):
    code, out, err = run_cli("plan", "--profile", "jetson-orin-nano-8gb", "--archs", "cummax,softmax,hybrid,hybrid-w64",
                             "--contexts", "1024,32768", "--json")
    assert code == 0, err
    rows = json.loads(out)["rows"]
    assert rows[0]["hybrid-w64"]["state"] == rows[1]["hybrid-w64"]["state"]  # bounded: the window
    assert rows[1]["hybrid"]["state"] > 30 * rows[0]["hybrid"]["state"]  # the full hybrid's cache grows
    assert rows[0]["cummax"]["state"] < rows[0]["hybrid-w64"]["state"] < rows[1]["softmax"]["state"]
    code, out, err = run_cli("plan", "--profile", "jetson-orin-nano-8gb", "--archs", "cummax,nope")
    assert code == 1 and "unknown arch 'nope'" in err


def test_bench_puts_any_set_of_archs_side_by_side(run_cli, tmp_path):
    archs = ["cummax", "softmax", "hybrid", f"hybrid-w{W}", f"softmax-w{W}"]
    code, out, err = run_cli("bench", "--preset", "tiny", "--archs", ",".join(archs), "--mode", "decode",
                             "--context", "8,64", "--backend", "ort", "--no-memory", "--budget", "0.05",
                             "--repeats", "3", "--work", tmp_path / "work", "--json", tmp_path / "b.json",
                             "--markdown", tmp_path / "b.md")
    assert code == 0, err
    records = json.loads((tmp_path / "b.json").read_text())["records"]
    by = {(r["arch"], r["context"]): r for r in records}
    assert {a for a, _ in by} == set(archs)
    for arch in ("cummax", f"hybrid-w{W}", f"softmax-w{W}"):
        assert by[(arch, 8)]["state_bytes"] == by[(arch, 64)]["state_bytes"]
    for arch in ("softmax", "hybrid"):
        assert by[(arch, 64)]["state_bytes"] > by[(arch, 8)]["state_bytes"]
    md = (tmp_path / "b.md").read_text()
    assert "| x cummax |" in md and f"| hybrid-w{W} |" in md


def test_generate_and_eval_of_a_hybrid_export_equal_its_checkpoint(made, run_cli, tiny_checkpoint, tmp_path):
    d = made(f"hybrid-w{W}", logits="all")
    outs = []
    for target, extra in ((d, []), (tiny_checkpoint, ["--arch", "hybrid", "--softmax-window", str(W)])):
        code, out, err = run_cli("generate", target, "--ids", "5,9,17,3,8,1,2,3,4,5,6,7", "--max-new-tokens",
                                 "12", "--json", *extra)
        assert code == 0, err
        outs.append(json.loads(out)["new_ids"])
    assert outs[0] == outs[1]
    text = tmp_path / "t.txt"
    text.write_text("".join(chr(32 + i % 90) for i in range(600)))
    vocab = tmp_path / "vocab.json"
    vocab.write_text(json.dumps([chr(i) for i in range(128)]))
    scores = []
    for target, extra in ((d, []), (tiny_checkpoint, ["--arch", "hybrid", "--softmax-window", str(W)])):
        code, out, err = run_cli("eval", target, "--text", text, "--window", "64", "--vocab", vocab, "--json", *extra)
        assert code == 0, err
        scores.append(json.loads(out)[0]["bits_per_byte"])
    assert scores[0] == pytest.approx(scores[1], rel=1e-5)


def test_serve_batches_windowed_sessions_at_different_positions(made):
    """A window's state has one shape at every position: sessions batch like cummax."""
    import time

    from samout_edge.generate import Sampler, generate
    from samout_edge.serve.batcher import Batcher, Job

    d = made(f"hybrid-w{W}")
    sizes = []
    batcher = Batcher(lambda: load_runner(d, "ort"), 8, on_step=lambda kind, n, s: sizes.append((kind, n)))
    runner = batcher.start()
    initial = runner.host_state(runner.initial_state(1))
    prompts = [[5, 9], list(range(1, 30)), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [9]]
    events: dict[int, list] = {i: [] for i in range(4)}
    for i, p in enumerate(prompts):
        batcher.submit(Job(p, initial, 6, Sampler(), emit=events[i].append))
    deadline = time.time() + 30
    while not all(e and e[-1][0] == "done" for e in events.values()) and time.time() < deadline:
        time.sleep(0.01)
    batcher.stop()
    with load_runner(d, "ort") as alone:
        for i, p in enumerate(prompts):
            assert [v for k, v in events[i] if k == "token"] == generate(alone, p, 6).new_ids
    assert max(n for kind, n in sizes if kind == "decode") == 4  # four positions, one call


def test_triton_packages_a_window_and_refuses_a_growing_hybrid(made, tmp_path):
    from samout_edge.triton_server import model_io, package_triton

    d = made(f"hybrid-w{W}")
    result = package_triton(d, tmp_path / "repo")
    names = sorted(result.files)
    assert "initial_state/empty_max.fp32" in names and "initial_state/empty_window.fp32" in names
    _, _, states, files = model_io(read_manifest(d))
    window = next(s for s in states if s.input_name == "past_key_values.0.key")
    assert window.dims == [4, W, 8] and not np.frombuffer(files[window.data_file], np.float32).any()
    running = next(s for s in states if s.input_name == "past_max.0")
    assert np.frombuffer(files[running.data_file], np.float32).max() == np.finfo(np.float32).min
    with pytest.raises(SamoutError, match="--softmax-window"):
        package_triton(made("hybrid"), tmp_path / "repo2")


def test_the_tensorrt_plan_gives_a_window_its_fixed_shape(made):
    import onnx

    from samout_edge.profiles import load_profile
    from samout_edge.tensorrt.lint import lint_model
    from samout_edge.tensorrt.plan import make_plan

    for arch in (f"hybrid-w{W}", "hybrid"):  # standard ops only: every TensorRT from 8.6 parses them
        lint = {r.version: r.compatible for r in lint_model(onnx.load(str(made(arch) / "model.onnx")))}
        assert lint["8.6"] and lint["10.3"] and lint["11.1"]
    plan = make_plan(made(f"hybrid-w{W}"), load_profile("jetson-orin-nano-8gb"), tensorrt="10.3")
    for profile in plan.optimization_profiles:
        shapes = {s.name: s for s in profile.shapes}
        key = shapes["past_key_values.1.key"]
        assert key.min[1:] == key.opt[1:] == key.max[1:] == [4, W, 8]
        assert shapes["past_max.1"].max[1:] == [4, 1, 8]


def test_a_stated_alpha_follows_the_export_into_every_pytorch_reference(tmp_path, tiny_checkpoint):
    """SamOut weights exported as a hybrid at alpha 0.2: verify --lengths, the torch backend and
    eval's reference compute at 0.2 too, not at the 0.5 a bare load would give."""
    from samout_edge.runtime.verify import verify

    d = export(tmp_path / "h", ExportOptions(arch=f"hybrid-w{W}", max_seq=MAX_SEQ, logits="all", hybrid_alpha=0.2),
               checkpoint=tiny_checkpoint).directory
    assert read_manifest(d).blend.stated_alpha == 0.2
    assert verify(d, lengths=[5, 40]).passed  # against PyTorch recomputed from the checkpoint
    ids = np.random.default_rng(0).integers(1, 128, (1, 30))
    with load_runner(d, "ort") as ort, load_runner(d, "torch") as torch_runner:
        a, _ = ort.run(ids, ort.initial_state(1))
        b, _ = torch_runner.run(ids, torch_runner.initial_state(1))
        assert close(a, torch_runner.to_numpy(b), RTOL["fp32"])


@pytest.mark.parametrize("backend", ["reference", "openvino"])
def test_the_new_archs_hold_in_other_runtimes(made, backend):
    """onnx.reference (the graph in its own dtype: fp16 as fp16) and OpenVINO agree with the golden outputs."""
    from samout_edge.runtime.verify import verify

    if backend == "openvino":
        pytest.importorskip("openvino")
    for arch in NEW_ARCHS:
        for variant in ("native-fp32", "native-fp16"):
            if arch == f"softmax-w{W}" and variant == "native-fp16":
                continue
            result = verify(made(arch, **VARIANTS[variant]), backend=backend)
            assert result.passed, (arch, variant, backend)
