"""Issue 28: a backend is its runner file and one `register` call. This file adds one, here and
nowhere else (ONNX Runtime under another name, with an option of its own and its own
capabilities), and every command that picks a backend takes it: its flag is in --help, its
value reaches its runner, verify and generate run on it, and what it cannot compute is refused
in one line from its capabilities."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from samout_edge.artifact.capabilities import Capabilities, Requirement
from samout_edge.runtime.backend import Backend, option
from samout_edge.runtime.ort_runner import OrtOptions, OrtRunner, load_ort_runner
from samout_edge.runtime.registry import BACKENDS, Settings, load_runner, register, unregister


@dataclass(frozen=True)
class ToyOptions(OrtOptions):
    toy_label: str = option("plain", "A label the toy backend puts on its runner's device.")


def load_toy(directory: Path, options: ToyOptions) -> OrtRunner:
    runner = load_ort_runner(directory, options.provider or "cpu", spinning=options.spinning)
    runner.info = replace(runner.info, backend="toy", device=f"{runner.info.device}+{options.toy_label}")
    return runner


TOY = Backend("toy", ToyOptions, load_toy, "ONNX Runtime under another name (a test's)",
              Capabilities("Toy Runtime", custom_ops=False))


@pytest.fixture
def toy():
    register(TOY)
    yield TOY
    unregister(TOY.name)


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    return lines[0]


@pytest.mark.parametrize("command", ["verify", "generate", "eval", "serve", "bench run"])
def test_its_flag_and_name_are_in_every_command_that_picks_a_backend(toy, run_cli, command):
    code, out, _ = run_cli(*command.split(), "--help")
    text = " ".join(out.split())  # --help wraps lines
    assert code == 0 and "--toy-label" in text and "toy" in text.split("--toy-label")[0]
    assert "(the toy backend)" in text or command == "bench run"
    assert "--provider" in text and "--openvino-device" in text  # the others' flags stay


def test_its_flag_is_gone_when_it_is(run_cli):
    assert "toy" not in BACKENDS
    code, out, _ = run_cli("verify", "--help")
    assert code == 0 and "--toy-label" not in out


def test_verify_and_generate_run_on_it_with_its_option(toy, run_cli, exported):
    d = exported().directory
    code, out, err = run_cli("verify", d, "--backend", "toy", "--toy-label", "shiny", "--json")
    assert code == 0, err
    assert json.loads(out)["provider"] == "CPUExecutionProvider+shiny"  # the value reached its runner
    code, _, err = run_cli("generate", d, "--ids", "1,2,3", "--max-new-tokens", "3", "--backend", "toy",
                           "--toy-label", "bright")
    assert code == 0 and "toy:CPUExecutionProvider+bright" in err, err
    code, _, err = run_cli("generate", d, "--ids", "1", "--max-new-tokens", "1", "--backend", "toy")
    assert code == 0 and "toy:CPUExecutionProvider+plain" in err, err  # its default


def test_options_it_shares_with_ort_are_one_flag(toy, exported):
    settings = Settings(provider="cpu", toy_label="x", openvino_device="GPU")
    assert toy.options_from(settings) == ToyOptions(provider="cpu", toy_label="x")
    assert BACKENDS["ort"].options_from(settings) == OrtOptions(provider="cpu")
    with load_runner(exported().directory, "toy", settings) as runner:
        assert runner.name == "toy:CPUExecutionProvider+x"


def test_what_it_cannot_compute_is_refused_from_its_capabilities(toy, run_cli, exported):
    d = exported(lowering="custom").directory
    code, _, err = run_cli("generate", d, "--ids", "1", "--backend", "toy")
    line = one_error_line(err)
    assert code == 1 and "Toy Runtime does not run model-local functions" in line and "samout-edge inline" in line
    code, out, _ = run_cli("inspect", d)
    runs_in = " ".join(out.split())  # which backends run a custom export
    assert "not OpenVINO or Toy Runtime, which do not run model-local functions" in runs_in


def test_what_it_needs_installed_is_one_line(run_cli, exported):
    nobody = Requirement("samout_no_such_module", "NoSuch", "pip install nosuch")
    needy = Backend("needy", ToyOptions, load_toy, "needs what nobody has", Capabilities("Needy", requires=(nobody,)))
    register(needy)
    try:
        code, _, err = run_cli("generate", exported().directory, "--ids", "1", "--backend", "needy")
        assert code == 1 and one_error_line(err).endswith(
            "the needy backend needs NoSuch, which this install does not have: pip install nosuch")
    finally:
        unregister("needy")


def test_a_clash_is_refused_at_registration():
    @dataclass(frozen=True)
    class Clash(OrtOptions):
        provider: str | None = option("cuda", "Another default for ONNX Runtime's flag.")

    with pytest.raises(ValueError, match="option 'provider' is declared by another backend"):
        register(Backend("clash", Clash, load_toy, "clash", Capabilities("Clash")))
    with pytest.raises(ValueError, match="already registered"):
        register(BACKENDS["ort"])
    assert "clash" not in BACKENDS
    with pytest.raises(TypeError, match="unknown backend option"):
        Settings(toy_label="x")  # not registered now: a typo is caught, not ignored


def test_a_dtype_or_a_growing_state_it_cannot_hold_is_refused_in_one_line(exported):
    from samout_edge.artifact.capabilities import refusal
    from samout_edge.artifact.manifest import read_manifest

    fp32_only = Capabilities("Small", dtypes=("fp32",), growing_state=False)
    manifest = read_manifest(exported(arch="softmax").directory)
    assert fp32_only.lacks(manifest) == "growing_state"
    assert refusal("growing_state", manifest, "small", fp32_only, "d", ["ort"]) == (
        "this export's state grows with every token (a softmax KV cache), which the small backend does not hold: "
        "run it on ort")
    manifest.dtype = "fp16"
    assert fp32_only.lacks(manifest) == "dtype" and Capabilities("Any").lacks(manifest) is None
    assert "does not compute fp16 graphs (fp32)" in refusal("dtype", manifest, "small", fp32_only, "d", [])
