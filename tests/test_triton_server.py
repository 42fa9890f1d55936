"""`package --triton`: the Triton model repository an export or engine becomes.

No Triton server runs here (it cannot be installed on this machine), so these tests
check what can be checked without one: every config.pbtxt parses as Triton's own
ModelConfig message (tritonclient's model_config_pb2), its states match the graph
contract, the initial state file holds the empty running max byte for byte, the
files land where Triton's sources read them, and bad input fails in one line.
"""

import dataclasses
import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from samout_edge import triton_server as tr
from samout_edge.artifact import graph
from samout_edge.artifact.arch import arch_spec
from samout_edge.artifact.engine import ENGINE_FILE, ENGINE_JSON, EngineMeta, OptimizationProfile, ShapeRange
from samout_edge.artifact.manifest import MANIFEST_FILE, read_manifest
from samout_edge.errors import SamoutError
from tests.test_cli import one_error_line

try:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2
except ImportError:  # the workstation venv has it ([dev]); say why instead of failing
    model_config_pb2 = None
needs_tritonclient = pytest.mark.skipif(model_config_pb2 is None, reason="needs tritonclient[grpc] to parse config.pbtxt "
                                        "as Triton's ModelConfig: pip install 'tritonclient[grpc]'")


def parse(model_dir: Path):
    config = model_config_pb2.ModelConfig()
    text_format.Parse((model_dir / "config.pbtxt").read_text(), config)
    return config


@pytest.fixture
def export_dir(exported) -> Path:
    return exported().directory


@pytest.fixture
def own_export(export_dir, tmp_path) -> Path:
    """A private copy of the export, for tests that edit it or add engines to it."""
    return Path(shutil.copytree(export_dir, tmp_path / "samout"))


def edit_manifest(directory: Path, **changes) -> None:
    data = json.loads((directory / MANIFEST_FILE).read_text())
    data.update(changes)
    (directory / MANIFEST_FILE).write_text(json.dumps(data))


def variant(manifest, **changes):
    """The manifest of an export with another arch/dtype/logits, with that graph's I/O:
    planning the config of a variant without exporting it."""
    changed = dataclasses.replace(manifest, **changes)
    changed.inputs, changed.outputs = graph.graph_io(changed.config, changed.spec, changed.dtype, changed.logits)
    return changed


# --------------------------------------------------------------------------- ONNX Runtime


@needs_tritonclient
def test_onnxruntime_repository(export_dir, tmp_path):
    manifest = read_manifest(export_dir)
    result = tr.package_triton(export_dir, tmp_path / "repo", name="samout")
    model = tmp_path / "repo" / "samout"
    assert result.model_dir == model and result.validated and result.backend == "onnxruntime"
    assert sorted(result.files) == ["1/model.onnx", "config.pbtxt", "initial_state/empty_max.fp32", "samout-edge.json"]
    # the model file is the export's, byte for byte
    assert hashlib.sha256((model / "1" / "model.onnx").read_bytes()).hexdigest() == manifest.files["model.onnx"]["sha256"]

    config = parse(model)
    assert config.name == "samout" and config.platform == "onnxruntime_onnx" and config.max_batch_size == 8
    assert [(i.name, model_config_pb2.DataType.Name(i.data_type), list(i.dims)) for i in config.input] == \
        [("input_ids", "TYPE_INT64", [-1])]  # batch is implicit; the state inputs are not listed (implicit state)
    assert [(o.name, model_config_pb2.DataType.Name(o.data_type), list(o.dims)) for o in config.output] == \
        [("logits", "TYPE_FP32", [1, manifest.config.vocab_size])]
    sb = config.sequence_batching
    assert sb.WhichOneof("strategy_choice") == "oldest" and sb.oldest.max_candidate_sequences == 32
    assert sb.max_sequence_idle_microseconds == 60_000_000
    assert not sb.control_input  # both backends count controls as model inputs; the graph has none

    inputs, outputs = graph.graph_io(manifest.config, arch_spec("cummax"), "fp32", "last")
    specs = {t.name: t for t in inputs}
    pairs = graph.present_to_past(arch_spec("cummax"), manifest.config.num_layers)
    assert {s.output_name: s.input_name for s in sb.state} == pairs
    h, d = manifest.config.num_heads, manifest.config.head_dim
    for state in sb.state:
        assert list(state.dims) == specs[state.input_name].shape[1:] == [h, 1, d]
        assert model_config_pb2.DataType.Name(state.data_type) == "TYPE_FP32"
        (initial,) = state.initial_state
        assert list(initial.dims) == list(state.dims) and initial.data_type == state.data_type
        assert initial.WhichOneof("state_data") == "data_file"
        # core reads <model dir>/initial_state/<data_file> (LocalizedModelPath is the model dir, not 1/)
        data = (model / "initial_state" / initial.data_file).read_bytes()
        assert len(data) == h * 1 * d * 4
        values = np.frombuffer(data, dtype="<f4")
        assert np.all(values == np.finfo(np.float32).min) and values[0] == np.finfo(np.float32).min  # not zeros
    (group,) = config.instance_group
    assert model_config_pb2.ModelInstanceGroup.Kind.Name(group.kind) == "KIND_GPU" and not group.profile

    marker = json.loads((model / "samout-edge.json").read_text())
    assert marker["producer"] == "samout-edge" and marker["backend"] == "onnxruntime"
    assert any("max_seq 300" in n for n in result.notes) and any("ONNX Runtime 1." in n for n in result.notes)


def test_initial_state_bytes_per_dtype():
    running_max, (window, _) = arch_spec("cummax").layer_states(0)[0], arch_spec("softmax-w4").layer_states(0)
    fp16 = tr.initial_state_bytes(running_max, "fp16", [8, 1, 64])
    assert len(fp16) == 8 * 64 * 2
    assert np.all(np.frombuffer(fp16, "<f2") == np.float16(-65504.0))
    fp32 = tr.initial_state_bytes(running_max, "fp32", [2, 1, 3])
    assert fp32 == np.full(6, np.finfo(np.float32).min, "<f4").tobytes() and fp32 != bytes(24)
    assert tr.initial_state_bytes(window, "fp16", [4, 4, 8]) == bytes(4 * 4 * 8 * 2)  # a window starts as zeros


@needs_tritonclient
@pytest.mark.parametrize("dtype,logits", [("fp16", "last"), ("fp32", "all")])
def test_variants_plan_their_types_and_dims(export_dir, dtype, logits):
    """fp16 states and logits, and all-position logits, from the graph contract."""
    manifest = variant(read_manifest(export_dir), dtype=dtype, logits=logits)
    inputs, outputs, states, files = tr.model_io(manifest)
    triton_type = "TYPE_FP16" if dtype == "fp16" else "TYPE_FP32"
    vocab = manifest.config.vocab_size
    assert outputs == [tr.TritonTensor("logits", triton_type, [1 if logits == "last" else -1, vocab])]
    assert {s.data_type for s in states} == {triton_type} and set(files) == {f"empty_max.{dtype}"}
    plan = tr.RepoPlan("m", "onnxruntime", "onnxruntime_onnx", "model.onnx", 4, inputs, outputs, states, files, {},
                       16, 1_000_000, 0, "KIND_GPU")
    config = model_config_pb2.ModelConfig()
    text_format.Parse(tr.config_pbtxt(plan), config)
    assert model_config_pb2.DataType.Name(config.sequence_batching.state[0].initial_state[0].data_type) == triton_type
    assert len(files[f"empty_max.{dtype}"]) == np.prod(states[0].dims) * graph.dtype(dtype).itemsize


def test_softmax_is_refused(export_dir):
    manifest = variant(read_manifest(export_dir), arch="softmax")
    for backend in ("onnxruntime", "tensorrt"):
        with pytest.raises(SamoutError, match="softmax export cannot be served.*starts empty"):
            tr.refuse_unsupported(manifest, backend)


def test_ort_session_config_entries(export_dir, own_export, tmp_path):
    """Quantized exports need ONNX Runtime session settings; Triton's onnxruntime backend
    passes only one. The graph here is the float one relabelled: this tests the config logic."""
    manifest = read_manifest(export_dir)
    dq = dataclasses.replace(manifest.weights, kind="int8", format="dq",
                             ort_session_config={"session.qdq_matmulnbits_accuracy_level": "1",
                                                 "session.disable_quant_qdq": "1"})
    with pytest.raises(SamoutError, match="session config entry session.qdq_matmulnbits_accuracy_level=1.*matmulnbits"):
        tr.refuse_unsupported(dataclasses.replace(manifest, weights=dq), "onnxruntime")
    tr.refuse_unsupported(dataclasses.replace(manifest, weights=dq), "tensorrt")  # TensorRT takes dq graphs itself

    edit_manifest(own_export, weights=dict(manifest.weights.to_dict(), kind="int4", block_size=32, format="matmulnbits",
                                           ort_session_config={"session.use_device_allocator_for_initializers": "1"}))
    result = tr.package_triton(own_export, tmp_path / "repo")
    assert 'parameters { key: "session.use_device_allocator_for_initializers" value: { string_value: "1" } }' in result.config
    assert any("MatMulNBits" in n for n in result.notes)
    if model_config_pb2 is not None:
        assert parse(result.model_dir).parameters["session.use_device_allocator_for_initializers"].string_value == "1"


def test_corrupted_export_fails_before_writing(own_export, tmp_path):
    data = bytearray((own_export / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (own_export / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(SamoutError, match="sha256"):
        tr.package_triton(own_export, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


def test_edited_manifest_is_caught_by_the_graph(own_export, tmp_path):
    """export.json has no hash; the config is written from it, so the graph must agree."""
    data = json.loads((own_export / MANIFEST_FILE).read_text())
    data["config"]["num_heads"] = 8  # still a valid config (32 / 8), not the graph's
    (own_export / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(SamoutError, match="config"):
        tr.package_triton(own_export, tmp_path / "repo")


def test_rerun_replaces_only_ours(export_dir, tmp_path):
    repo = tmp_path / "repo"
    tr.package_triton(export_dir, repo, name="m")
    (repo / "m" / "README.txt").write_text("a user's note")
    (repo / "other" / "1").mkdir(parents=True)  # another model in the same repository
    (repo / "other" / "config.pbtxt").write_text('name: "other"\n')
    result = tr.package_triton(export_dir, repo, name="m", max_batch_size=2)
    assert (repo / "m" / "README.txt").read_text() == "a user's note"
    assert (repo / "other" / "config.pbtxt").read_text() == 'name: "other"\n'
    assert "max_batch_size: 2" in (repo / "m" / "config.pbtxt").read_text() and result.max_batch_size == 2
    assert not [p for p in repo.iterdir() if p.name.startswith(".samout")]  # no stage left behind


def test_foreign_directories(export_dir, tmp_path):
    repo = tmp_path / "stuff"
    repo.mkdir()
    (repo / "notes.txt").write_text("mine")
    with pytest.raises(SamoutError, match="not a Triton model repository.*--force"):
        tr.package_triton(export_dir, repo, name="m")
    assert sorted(p.name for p in repo.iterdir()) == ["notes.txt"]
    tr.package_triton(export_dir, repo, name="m", force=True)
    assert (repo / "notes.txt").read_text() == "mine" and (repo / "m" / "config.pbtxt").is_file()

    models = tmp_path / "models"  # a model repository with a model directory someone else wrote
    (models / "theirs").mkdir(parents=True)
    (models / "theirs" / "config.pbtxt").write_text('name: "theirs"\n')
    with pytest.raises(SamoutError, match="not a samout-edge artifact"):
        tr.package_triton(export_dir, models, name="theirs")
    with pytest.raises(SamoutError, match="in the way"):
        tr.package_triton(export_dir, models, name="theirs", force=True)
    assert [p.name for p in (models / "theirs").iterdir()] == ["config.pbtxt"]
    assert (models / "theirs" / "config.pbtxt").read_text() == 'name: "theirs"\n'


def test_model_directory_must_not_be_the_source(own_export, tmp_path):
    with pytest.raises(SamoutError, match="would hold the source"):
        tr.package_triton(own_export, tmp_path, force=True)  # REPO/samout is the export itself


def test_names():
    assert tr.default_model_name(Path("/x/my export[1]")) == "my_export_1_"
    assert tr.default_model_name(Path("/x/out"), Path("/x/out/engines/orin-nano")) == "out-orin-nano"
    assert tr.default_model_name(Path("/x/...")) == "samout"
    assert tr.check_model_name("samout-fp16_v1.2") == "samout-fp16_v1.2"
    for bad in ("[red]x[/]", "../x", "", ".hidden", "a/b", "x" * 129, "naïve"):
        with pytest.raises(SamoutError, match="not a usable Triton model name"):
            tr.check_model_name(bad)


def test_state_pairing_follows_triton_name_order():
    tr.check_state_pairing(graph.present_to_past(arch_spec("cummax"), 12))  # past_max.10 sorts before past_max.2 on both sides
    tr.check_state_pairing(graph.present_to_past(arch_spec("softmax"), 12))
    with pytest.raises(SamoutError, match="pairs states by name order"):
        tr.check_state_pairing({"a_out": "z_in", "b_out": "a_in"})


def test_no_tritonclient_still_packages(export_dir, tmp_path, monkeypatch):
    """The core install has no tritonclient: the text needs none, the check is skipped and says so."""
    for module in ("tritonclient", "tritonclient.grpc", "tritonclient.grpc.model_config_pb2"):
        monkeypatch.setitem(sys.modules, module, None)
    result = tr.package_triton(export_dir, tmp_path / "repo")
    assert not result.validated and (result.model_dir / "config.pbtxt").read_text() == result.config
    with pytest.raises(SamoutError, match="pip install 'tritonclient"):
        tr.parse_config(result.config)
    from tests.test_layers import PACKAGE, imports

    for path in (PACKAGE / "triton_server").glob("*.py"):
        assert not {n for n in imports(path, module_level_only=True) if n.startswith("tritonclient")}, path


# --------------------------------------------------------------------------- TensorRT (fake engine dirs)


def fake_engine(export: Path, dla_core=None, cummax="", onnx_sha256=None, batches=((1, 64), (1, 16))) -> Path:
    """An engine dir with a made-up engine.json and dummy engine bytes: TensorRT never
    sees it; it tests how the config is derived from engine.json, nothing more."""
    manifest = read_manifest(export)
    h, d = manifest.config.num_heads, manifest.config.head_dim
    profiles = []
    for name, (lo, hi), seq in zip(("decode", "prefill"), batches, ((1, 1), (1, manifest.max_seq))):
        shapes = [ShapeRange("input_ids", [lo, seq[0]], [lo, seq[0]], [hi, seq[1]])]
        shapes += [ShapeRange(n, [lo, h, 1, d], [lo, h, 1, d], [hi, h, 1, d]) for n in manifest.state_inputs]
        profiles.append(OptimizationProfile(name, shapes))
    engine_dir = export / "engines" / "fake"
    engine_dir.mkdir(parents=True, exist_ok=True)
    (engine_dir / ENGINE_FILE).write_bytes(b"not a real engine " * 10)
    EngineMeta(tensorrt="10.13.0.35", gpu="NVIDIA H200", compute_capability="9.0", profile="fake", arch="cummax",
               precision="fp16", strongly_typed=False, dla_core=dla_core, optimization_profiles=profiles, plugins=[],
               onnx_sha256=onnx_sha256 or manifest.files["model.onnx"]["sha256"], build_seconds=0.0,
               plan={"cummax": cummax}).save(engine_dir / ENGINE_JSON)
    return engine_dir


@needs_tritonclient
def test_fake_engine_dir_tensorrt_config(own_export, tmp_path):
    engine_dir = fake_engine(own_export)
    result = tr.package_triton(engine_dir, tmp_path / "repo")
    model = tmp_path / "repo" / "samout-fake"
    assert result.model_dir == model and result.backend == "tensorrt"
    assert (model / "1" / "model.plan").read_bytes() == (engine_dir / ENGINE_FILE).read_bytes()
    assert not (model / "1" / "model.onnx").exists()
    config = parse(model)
    assert config.platform == "tensorrt_plan"
    assert config.max_batch_size == 16  # a batch of prefills must fit every profile Triton may pick
    (group,) = config.instance_group
    assert list(group.profile) == ["0", "1"] and not group.secondary_devices  # else Triton uses profile 0 only
    assert len(config.sequence_batching.state) == read_manifest(own_export).config.num_layers
    assert any("TensorRT 10.13.0.35" in n for n in result.notes)
    # the same engine by --engine NAME on the export
    assert tr.plan_repo(own_export, engine="fake").platform == "tensorrt_plan"


@needs_tritonclient
def test_fake_engine_dir_dla(own_export, tmp_path):
    result = tr.package_triton(fake_engine(own_export, dla_core=1), tmp_path / "repo")
    (group,) = parse(result.model_dir).instance_group
    (device,) = group.secondary_devices
    assert device.device_id == 1 and model_config_pb2.ModelInstanceGroup.SecondaryDevice.SecondaryDeviceKind.Name(
        device.kind) == "KIND_NVDLA"


@pytest.mark.parametrize("engine_kwargs,options,match", [
    ({"cummax": "jit"}, {}, "just in time"),
    ({"onnx_sha256": "0" * 64}, {}, "another model.onnx"),
    ({}, {"kind": "cpu"}, "GPU only"),
    ({}, {"max_batch_size": 32}, "outside what every profile"),
    ({"batches": ((2, 8), (4, 8))}, {}, "starts above batch 1"),
])
def test_fake_engine_dir_refusals(own_export, tmp_path, engine_kwargs, options, match):
    with pytest.raises(SamoutError, match=match):
        tr.package_triton(fake_engine(own_export, **engine_kwargs), tmp_path / "repo", **options)
    assert not (tmp_path / "repo").exists()


# --------------------------------------------------------------------------- the CLI


def test_cli_package_json(run_cli, export_dir, tmp_path):
    code, out, err = run_cli("package", export_dir, "--triton", "-o", tmp_path / "repo", "--name", "samout", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["platform"] == "onnxruntime_onnx" and data["model_dir"] == str(tmp_path / "repo" / "samout")
    assert "initial_state/empty_max.fp32" in data["files"]
    code, out, err = run_cli("package", export_dir, "--triton", "-o", tmp_path / "repo", "--name", "samout")
    assert code == 0, err
    assert "config.pbtxt parsed as Triton's ModelConfig" in out or model_config_pb2 is None


@pytest.mark.parametrize("args,match", [
    (["package", "{export}", "-o", "{tmp}/repo"], "pass --triton"),
    (["package", "{tmp}", "--triton", "-o", "{tmp}/repo"], "is not an export directory"),
    (["package", "{tmp}/nowhere", "--triton", "-o", "{tmp}/repo"], "not found"),
    (["package", "{export}", "--triton", "-o", "{tmp}/foreign"], "not a Triton model repository"),
    (["package", "{export}", "--triton", "-o", "{tmp}/repo", "--name", "[red]x[/red]"], "not a usable Triton model name"),
    (["package", "{softmax}", "--triton", "-o", "{tmp}/repo"], "softmax export cannot be served"),
])
def test_cli_bad_input_gets_one_line(run_cli, export_dir, own_export, tmp_path, args, match):
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    edit_manifest(own_export, arch="softmax")
    values = {"export": export_dir, "tmp": tmp_path, "softmax": own_export}
    code, _, err = run_cli(*[a.format(**values) for a in args])
    assert code == 1
    line = one_error_line(err)
    assert match in line
    assert not (tmp_path / "repo").exists()
    assert sorted(p.name for p in (tmp_path / "foreign").iterdir()) == ["notes.txt"]
