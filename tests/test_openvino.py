"""The OpenVINO backend (issue 17's proof that a backend is one runner file and one
registration): every command takes --backend openvino, with the settings that keep
each export the verified function."""

import json

import numpy as np
import pytest

from samout_edge.errors import SamoutError
from samout_edge.exporter.onnx_export import ExportOptions, export
from samout_edge.generate import generate
from samout_edge.runtime.registry import BACKENDS, Settings, load_runner
from samout_edge.runtime.verify import verify
from tests.test_cli import one_error_line

pytest.importorskip("openvino")


def test_openvino_is_a_registered_backend_with_its_own_options():
    backend = BACKENDS["openvino"]
    assert backend.options_from(Settings(openvino_device="CPU", provider="cuda")).openvino_device == "CPU"
    assert not hasattr(backend.options_from(Settings()), "provider")  # it reads its own options only


@pytest.mark.parametrize("arch", ["cummax", "softmax"])
def test_verify_on_openvino(exported, arch):
    result = verify(exported(arch=arch).directory, backend="openvino")
    assert result.passed and result.provider == "CPU:f32" and result.rtol == 1e-4


@pytest.mark.parametrize("weights,fmt", [("int8", "dq"), ("int4", "matmulnbits")])
def test_quantized_exports_hold_on_openvino(tmp_path, tiny_checkpoint, weights, fmt):
    """OpenVINO's default would quantize the activations (1-4% off): the runner sets what keeps them exact."""
    d = export(tmp_path / "q", ExportOptions(max_seq=40, weights=weights, weights_format=fmt),
               checkpoint=tiny_checkpoint, run_verify=False).directory
    assert verify(d, backend="openvino").passed


def test_bf16_precision_is_an_option_with_its_own_tolerance(exported):
    result = verify(exported().directory, backend="openvino", settings=Settings(openvino_precision="bf16"))
    assert result.passed and result.rtol == 5e-2 and result.provider == "CPU:bf16"


def test_generate_and_eval_on_openvino_match_onnx_runtime(exported, tmp_path):
    from samout_edge.evaluate import eval_target

    d = exported(logits="all").directory
    prompt = np.random.default_rng(0).integers(1, 128, 700).tolist()  # past max_seq 300: chunked on OpenVINO too
    with load_runner(d, "openvino") as ov, load_runner(d, "ort") as ort:
        assert generate(ov, prompt, 16).new_ids == generate(ort, prompt, 16).new_ids
    text, vocab = tmp_path / "t.txt", tmp_path / "v.json"
    text.write_text("".join(chr(32 + i) for i in np.random.default_rng(1).integers(0, 90, 600)))
    vocab.write_text(json.dumps([chr(i) for i in range(128)]))
    on_ov = eval_target(d, text, backend="openvino", window=64, vocab=vocab, with_reference=False)
    on_ort = eval_target(d, text, backend="ort", window=64, vocab=vocab, with_reference=False)
    assert on_ov.runner == "openvino:CPU:f32"
    assert on_ov.bits_per_byte == pytest.approx(on_ort.bits_per_byte, rel=1e-5)


def test_the_cli_takes_openvino_everywhere(run_cli, exported, tmp_path):
    d = exported().directory
    code, _, err = run_cli("generate", d, "--ids", "1,2,3", "--max-new-tokens", "4", "--backend", "openvino")
    assert code == 0 and "openvino:CPU:f32" in err, err
    code, out, err = run_cli("verify", d, "--backend", "openvino", "--json")
    assert code == 0 and json.loads(out)["provider"] == "CPU:f32", err
    code, _, err = run_cli("bench", d, "--work", tmp_path / "w", "--backend", "openvino", "--seq", "16",
                           "--context", "16", "--budget", "0.05", "--repeats", "2", "--min-repeats", "1", "--no-memory")
    assert code == 0 and "openvino" in _, err
    code, _, err = run_cli("generate", d, "--ids", "1", "--backend", "openvino", "--openvino-device", "TPU")
    assert code == 1 and "OpenVINO device 'TPU' is not available" in one_error_line(err)


def test_a_custom_export_is_refused_with_the_inline_hint(exported):
    with pytest.raises(SamoutError, match="samout-edge inline"):
        load_runner(exported(lowering="custom").directory, "openvino")


def test_serve_on_openvino(exported):
    from fastapi.testclient import TestClient

    from samout_edge.serve import open_server
    from samout_edge.serve.app import create_app
    from samout_edge.serve.options import ServeOptions

    d = exported().directory
    server = open_server(d, "openvino", ServeOptions())
    try:
        with TestClient(create_app(server)) as http:
            r = http.post("/v1/completions", json={"prompt": [5, 9, 17], "max_tokens": 6, "temperature": 0})
            assert r.status_code == 200 and http.get("/health").json()["backend"] == "openvino"
            with load_runner(d, "ort") as ort:
                assert r.json()["choices"][0]["token_ids"] == generate(ort, [5, 9, 17], 6).new_ids
    finally:
        server.close()
