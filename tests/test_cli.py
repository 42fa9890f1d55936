"""The CLI as a user runs it: results on stdout, one-line errors on stderr, exit codes."""

import json

import pytest
import torch

from tests.seed_reference import SamOut as SeedSamOut


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error:"), err
    assert "Traceback" not in err
    return lines[0]


def test_init_export_verify_inspect(run_cli, tmp_path):
    code, out, _ = run_cli("init", "--preset", "tiny", "-o", tmp_path / "ck")
    assert code == 0 and "tiny" in out
    code, out, err = run_cli("export", tmp_path / "ck", "-o", tmp_path / "ex", "--max-seq", "64", "--arch", "softmax")
    assert code == 0, err
    assert "verification passed" in out
    code, out, _ = run_cli("verify", tmp_path / "ex", "--lengths", "1,33,64", "--json")
    data = json.loads(out)
    assert code == 0 and data["passed"] and data["lengths"] == [1, 33, 64]
    code, out, _ = run_cli("inspect", tmp_path / "ex", "--json")
    data = json.loads(out)
    assert data["arch"] == "softmax" and data["max_seq"] == 64 and data["custom_nodes"] == {}
    assert data["inputs"][0] == {"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]}
    assert data["verification"]["passed"] is True
    code, out, _ = run_cli("inspect", tmp_path / "ex")
    assert code == 0 and "[batch, seq]" in out and "standard ONNX ops only" in out


def test_inspect_onnx_file_and_custom_nodes(run_cli, exported):
    path = exported(lowering="custom").directory / "model.onnx"
    code, out, _ = run_cli("inspect", path, "--json")
    data = json.loads(out)
    assert code == 0 and data["custom_nodes"] == {"samout_edge::CumMax": 4}
    assert data["functions"] == ["samout_edge::CumMax"] and data["max_seq"] == 300


def test_export_seed_state_dict_with_heads(run_cli, tmp_path):
    torch.save(SeedSamOut(128, 32, 4, 2).state_dict(), tmp_path / "seed.pth")
    code, out, err = run_cli("export", tmp_path / "seed.pth", "--heads", "4", "-o", tmp_path / "o", "--max-seq", "16")
    assert code == 0, err


def test_doctor_json(run_cli):
    code, out, _ = run_cli("doctor", "--json")
    data = json.loads(out)
    assert code == 0 and data["torch"] and "CPUExecutionProvider" in data["onnxruntime_providers"]


@pytest.mark.parametrize(
    "args,match",
    [
        (["export", "{tmp}/missing.pt", "-o", "{tmp}/o"], "checkpoint not found"),
        (["export", "--preset", "tiny", "-o", "{tmp}/o", "--max-seq", "0"], "--max-seq must be at least 1"),
        (["export", "--preset", "tiny", "-o", "{tmp}/o", "--heads", "3"], "--heads 3 contradicts"),
        (["export", "-o", "{tmp}/o"], "give either a CHECKPOINT or --preset"),
        (["verify", "{tmp}"], "is not an export directory"),
        (["verify", "{tmp}/nowhere"], "not found"),
        (["inspect", "{tmp}/nowhere"], "not found"),
    ],
)
def test_bad_input_gets_one_line(run_cli, tmp_path, args, match):
    code, _, err = run_cli(*[a.format(tmp=tmp_path) for a in args])
    assert code == 1
    assert match in one_error_line(err)
    assert not (tmp_path / "o").exists()


def test_truncated_checkpoint(run_cli, tmp_path):
    torch.save(SeedSamOut(128, 32, 4, 2).state_dict(), tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[:2000])
    code, _, err = run_cli("export", tmp_path / "cut.pt", "-o", tmp_path / "o")
    assert code == 1 and "truncated" in one_error_line(err)
    assert not (tmp_path / "o").exists()


def test_wrong_keys_are_named(run_cli, tmp_path):
    state = SeedSamOut(128, 32, 4, 2).state_dict()
    state["decoder_layers.0.self_attention.extra"] = state.pop("decoder_layers.0.self_attention.combined.weight")
    torch.save(state, tmp_path / "k.pt")
    code, _, err = run_cli("export", tmp_path / "k.pt", "--heads", "4", "-o", tmp_path / "o")
    line = one_error_line(err)
    assert "missing decoder_layers.0.self_attention.combined.weight" in line
    assert "unexpected decoder_layers.0.self_attention.extra" in line


def test_wrong_shape_checkpoint(run_cli, tmp_path):
    state = SeedSamOut(128, 32, 4, 2).state_dict()
    state["head.weight"] = torch.zeros(128, 31)
    torch.save(state, tmp_path / "s.pt")
    code, _, err = run_cli("export", tmp_path / "s.pt", "--heads", "4", "-o", tmp_path / "o")
    assert "head.weight has shape [128, 31]" in one_error_line(err)


def test_heads_not_dividing_hidden(run_cli, tmp_path):
    torch.save(SeedSamOut(128, 32, 4, 2).state_dict(), tmp_path / "s.pt")
    code, _, err = run_cli("export", tmp_path / "s.pt", "--heads", "5", "-o", tmp_path / "o")
    assert code == 1 and "--heads 5 does not divide" in one_error_line(err)


def test_existing_directory_says_how_to_overwrite(run_cli, tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "x.txt").write_text("x")
    code, _, err = run_cli("export", "--preset", "tiny", "-o", tmp_path / "o", "--max-seq", "8")
    assert code == 1 and "--force" in one_error_line(err)
    code, _, err = run_cli("export", "--preset", "tiny", "-o", tmp_path / "o", "--max-seq", "8", "--force")
    assert code == 0, err


def test_verify_lengths_past_max_seq_are_chunked_and_zero_is_refused(run_cli, exported):
    code, out, err = run_cli("verify", exported().directory, "--lengths", "1,301,900", "--json")
    assert code == 0 and json.loads(out)["lengths"] == [1, 301, 900], err  # 3x max_seq, against PyTorch whole
    code, _, err = run_cli("verify", exported().directory, "--lengths", "0,5")
    assert code == 1 and "--lengths must be positive" in one_error_line(err)


def test_unknown_provider(run_cli, exported):
    code, _, err = run_cli("verify", exported().directory, "--provider", "cuda")
    assert code == 1 and "not available here" in one_error_line(err)


def test_corrupt_onnx_file(run_cli, tmp_path):
    (tmp_path / "bad.onnx").write_bytes(b"\x00garbage" * 10)
    code, _, err = run_cli("inspect", tmp_path / "bad.onnx")
    assert code == 1 and "is not an ONNX model" in one_error_line(err)


def test_unknown_option_exits_2(run_cli):
    code, _, err = run_cli("export", "--bogus")
    assert code == 2 and "No such option" in err


def test_debug_shows_traceback(run_cli, tmp_path):
    code, _, err = run_cli("--debug", "verify", tmp_path)
    assert code == 1 and "Traceback" in err


@pytest.mark.parametrize(
    "args,match",
    [
        (["bench", "{tmp}"], "is not an export directory"),
        (["bench", "{exp}", "--backend", "ort", "--provider", "cuda"], "not available here"),
        (["bench", "{exp}", "--seq", "5000", "--batch", "0"], "--batch needs positive integers"),
        (["bench", "{exp}", "--plot", "{tmp}/p.jpg"], "should end in .png"),
        (["bench", "op", "--shape", "1,8,x"], "--shape takes comma-separated integers"),
        (["generate", "{exp}", "--ids", "1,2,999"], "outside the vocabulary"),
        (["generate", "{exp}"], "give either --ids"),
        (["generate", "{exp}", "--prompt", "hi"], "--prompt needs --vocab"),
        (["generate", "{tmp}/nothing", "--ids", "1"], "not found"),
    ],
)
def test_bench_and_generate_bad_input(run_cli, tmp_path, exported, args, match):
    exp = exported().directory
    code, _, err = run_cli(*[a.format(tmp=tmp_path, exp=exp) for a in args])
    assert code == 1 and match in one_error_line(err)


def test_generate_streams_ids(run_cli, exported):
    code, out, err = run_cli("generate", exported().directory, "--ids", "1,2,3", "--max-new-tokens", "5")
    assert code == 0 and len(out.split()) == 5 and "tok/s" in err


def test_bench_op_cli(run_cli, tmp_path):
    code, out, _ = run_cli("bench", "op", "--shape", "1,2,64,4", "--repeats", "2", "--budget", "0.01",
                           "--json", tmp_path / "op.json")
    data = json.loads((tmp_path / "op.json").read_text())
    assert code == 0 and all(r["exact"] in (True, None) for r in data["rows"])
    assert "fraction of copy" in out


@pytest.mark.parametrize(
    "args,option",
    [
        (["export", "--preset", "huge", "-o", "{tmp}/o"], "--preset"),
        (["init", "--preset", "nope", "-o", "{tmp}/c"], "--preset"),
        (["export", "--preset", "tiny", "-o", "{tmp}/o", "--dtype", "fp64"], "--dtype"),
        (["export", "--preset", "tiny", "-o", "{tmp}/o", "--scan", "zigzag"], "--scan"),
        (["bench", "{tmp}", "--backend", "tflite"], "--backend"),
        (["bench", "{tmp}", "--mode", "train"], "--mode"),
        (["bench", "{tmp}", "--device", "banana"], "--device"),
        (["generate", "{tmp}", "--ids", "1", "--backend", "tflite"], "--backend"),
        (["build", "{tmp}", "--profile", "x", "--precision", "int3"], "--precision"),
    ],
)
def test_bad_choice_is_a_usage_error(run_cli, tmp_path, args, option):
    """Choices are Enums: Typer rejects a bad one before any work, exit 2, naming the option."""
    code, _, err = run_cli(*[a.format(tmp=tmp_path) for a in args])
    assert code == 2 and option in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_version(run_cli):
    from samout_edge import __version__

    code, out, _ = run_cli("--version")
    assert code == 0 and out.strip() == f"samout-edge {__version__}"


def test_generate_from_a_checkpoint_names_its_arch_plainly(run_cli, tiny_checkpoint):
    """Issue 16: an Enum leaked into the output ("Arch.cummax")."""
    code, _, err = run_cli("generate", tiny_checkpoint, "--ids", "1,2,3", "--max-new-tokens", "2")
    assert code == 0 and "torch:cpu cummax:" in err and "Arch." not in err


def test_tensorrt_without_an_engine_does_not_take_the_provider_for_one(run_cli, exported):
    """Issue 16: --backend tensorrt without --engine used the ORT provider name ("cpu") as the profile."""
    code, _, err = run_cli("generate", exported().directory, "--ids", "1", "--backend", "tensorrt")
    line = one_error_line(err)
    assert code == 1 and "no TensorRT engine" in line and "'cpu'" not in line
