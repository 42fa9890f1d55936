"""What a hostile user tries, each a test that failed before issue 9's fixes:
nothing lost, nothing silently wrong, one clear line per bad input."""

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from samout_edge.artifact.manifest import read_manifest
from samout_edge.errors import SamoutError
from samout_edge.exporter.onnx_export import ExportOptions, export
from samout_edge.lowering import all_nodes
from samout_edge.runtime.ort_runner import load_ort_runner
from tests.test_cli import one_error_line

CLI = [sys.executable, "-m", "samout_edge"]


# ------------------------------------------------------------------ data loss


def test_a_foreign_export_json_does_not_make_a_directory_ours(run_cli, tmp_path):
    p = tmp_path / "P"
    (p / "src").mkdir(parents=True)
    (p / "export.json").write_text('{"name": "x"}')
    (p / "src" / "main.py").write_text("code")
    code, _, err = run_cli("export", "--preset", "tiny", "-o", p, "--max-seq", "8")
    assert code == 1 and "not a samout-edge export" in one_error_line(err)
    code, _, err = run_cli("export", "--preset", "tiny", "-o", p, "--max-seq", "8", "--force")
    assert code == 1 and "export.json is in the way" in one_error_line(err)
    assert (p / "src" / "main.py").read_text() == "code" and (p / "export.json").read_text() == '{"name": "x"}'


def test_force_adds_beside_foreign_files_and_removes_nothing(run_cli, tmp_path):
    p = tmp_path / "P"
    (p / "src").mkdir(parents=True)
    (p / "src" / "main.py").write_text("code")
    code, _, err = run_cli("export", "--preset", "tiny", "-o", p, "--max-seq", "8", "--force")
    assert code == 0, err
    assert (p / "src" / "main.py").read_text() == "code" and read_manifest(p).max_seq == 8


def test_replacing_an_export_keeps_what_its_manifest_does_not_list(run_cli, tmp_path):
    p = tmp_path / "P"
    assert run_cli("export", "--preset", "tiny", "-o", p, "--max-seq", "8")[0] == 0
    (p / "notes.txt").write_text("mine")
    (p / "engines" / "x").mkdir(parents=True)
    (p / "engines" / "x" / "engine.json").write_text("{}")
    (p / "golden" / "my-extra.json").write_text("[]")
    code, _, err = run_cli("export", "--preset", "tiny", "-o", p, "--max-seq", "16")
    assert code == 0, err
    assert read_manifest(p).max_seq == 16
    assert (p / "notes.txt").read_text() == "mine" and (p / "engines" / "x" / "engine.json").exists()
    assert (p / "golden" / "my-extra.json").exists()
    assert not [e for e in tmp_path.iterdir() if e.name.startswith(".samout")]


def test_a_hand_written_manifest_cannot_get_a_file_removed(run_cli, tmp_path):
    """Issue 15 item 12: a recorded file is ours to remove only while it holds what we recorded."""
    p = tmp_path / "P"
    p.mkdir()
    (p / "notes.txt").write_text("mine")
    (p / "export.json").write_text(json.dumps({"producer": "samout-edge", "files": {
        "notes.txt": {"sha256": "0" * 64, "bytes": 4}, "model.onnx": {"sha256": "1" * 64}}}))
    code, _, err = run_cli("export", "--preset", "tiny", "-o", p, "--max-seq", "8")
    assert code == 0, err
    assert (p / "notes.txt").read_text() == "mine" and read_manifest(p).max_seq == 8
    # an export whose model.onnx a user edited keeps the edit: the replace stops, naming it
    (p / "model.onnx").write_bytes(b"my edit")
    code, _, err = run_cli("export", "--preset", "tiny", "-o", p, "--max-seq", "16")
    assert code == 1 and "model.onnx is in the way" in one_error_line(err)
    assert (p / "model.onnx").read_bytes() == b"my edit"


def test_a_link_to_an_export_is_replaced_behind_the_link(run_cli, tmp_path):
    """Issue 15 item 13: the export behind the link is replaced in place; the link stays a link."""
    real, link = tmp_path / "real", tmp_path / "link"
    assert run_cli("export", "--preset", "tiny", "-o", real, "--max-seq", "8")[0] == 0
    (real / "notes.txt").write_text("mine")
    link.symlink_to(real, target_is_directory=True)
    code, _, err = run_cli("export", "--preset", "tiny", "-o", link, "--max-seq", "16")
    assert code == 0, err
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert read_manifest(real).max_seq == 16 and (real / "notes.txt").read_text() == "mine"
    assert sorted(e.name for e in tmp_path.iterdir()) == ["link", "real"]
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    code, _, err = run_cli("export", "--preset", "tiny", "-o", tmp_path / "dangling", "--max-seq", "8")
    assert code == 1 and "symbolic link" in one_error_line(err) and not (tmp_path / "nowhere").exists()


def test_a_dead_writers_symlink_is_removed_not_followed(tmp_path):
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "data").write_text("keep")
    (tmp_path / ".samout-old-999999999-abcd").symlink_to(keep, target_is_directory=True)
    export(tmp_path / "e", ExportOptions(max_seq=8), preset_name="tiny", run_verify=False)
    assert sorted(e.name for e in tmp_path.iterdir()) == ["e", "keep"] and (keep / "data").read_text() == "keep"


KILL_AT = {
    # os.replace calls of a replace, in order: the user's files into the stage, target -> old, stage -> target
    "while carrying": "if src.name == 'notes.txt': real(src, dst); os.kill(os.getpid(), signal.SIGKILL)",
    "between the renames": "if src.name.startswith('.samout-stage-') and dst.name == 'P': os.kill(os.getpid(), 9)",
}


@pytest.mark.parametrize("when", list(KILL_AT))
def test_a_replace_killed_midway_gives_the_users_files_back(tmp_path, when):
    """Issue 15 item 15: kill -9 mid-replace, then any later write into the parent restores the
    earlier export with the user's files, instead of leaving them in a dead stage."""
    p = tmp_path / "P"
    export(p, ExportOptions(max_seq=8), preset_name="tiny", run_verify=False)
    before = (p / "model.onnx").read_bytes()
    (p / "notes.txt").write_text("mine")
    (p / "sub").mkdir()
    (p / "sub" / "more.txt").write_text("also mine")
    script = f"""
import os, signal
from pathlib import Path
real = os.replace
def replace(src, dst):
    src, dst = Path(src), Path(dst)
    {KILL_AT[when]}
    real(src, dst)
os.replace = replace
from samout_edge.exporter.onnx_export import ExportOptions, export
export({str(p)!r}, ExportOptions(max_seq=16), preset_name="tiny", run_verify=False)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert any(e.name.startswith(".samout-stage-") for e in tmp_path.iterdir())
    export(tmp_path / "other", ExportOptions(max_seq=8), preset_name="tiny", run_verify=False)
    assert sorted(e.name for e in tmp_path.iterdir()) == ["P", "other"]
    assert (p / "notes.txt").read_text() == "mine" and (p / "sub" / "more.txt").read_text() == "also mine"
    assert (p / "model.onnx").read_bytes() == before and read_manifest(p).max_seq == 8


def test_a_checkpoint_replace_removes_only_weights_we_wrote(run_cli, tmp_path):
    c = tmp_path / "C"
    c.mkdir()
    (c / "config.json").write_text(json.dumps({"format": "samout-edge", "vocab_size": 128, "hidden_size": 32,
                                               "num_heads": 4, "num_layers": 2}))
    (c / "model.safetensors").write_bytes(b"my own weights")
    code, _, err = run_cli("init", "--preset", "tiny", "-o", c, "--force")
    assert code == 1 and "model.safetensors is in the way" in one_error_line(err)
    assert (c / "model.safetensors").read_bytes() == b"my own weights"
    d = tmp_path / "D"
    assert run_cli("init", "--preset", "tiny", "-o", d)[0] == 0
    assert run_cli("init", "--preset", "tiny", "-o", d, "--force", "--seed", "3")[0] == 0  # ours: replaced


def test_bench_work_never_replaces_what_is_not_ours(run_cli, tmp_path):
    work = tmp_path / "WK"
    (work / "cummax").mkdir(parents=True)
    (work / "cummax" / "data.bin").write_text("keep")
    code, _, err = run_cli("bench", "--preset", "tiny", "--work", work, "--seq", "8", "--context", "8",
                           "--backend", "ort", "--budget", "0.05", "--no-memory")
    assert code == 1 and "bench did not make" in one_error_line(err)
    assert (work / "cummax" / "data.bin").read_text() == "keep"


def test_bench_work_keeps_a_users_export_of_another_checkpoint(run_cli, tmp_path):
    """Issue 15 item 14: WK/softmax, the user's export of another checkpoint, is refused, not re-exported."""
    a, work = tmp_path / "A", tmp_path / "WK"
    assert run_cli("export", "--preset", "tiny", "-o", a, "--max-seq", "64")[0] == 0
    assert run_cli("export", "--preset", "tiny", "--seed", "5", "--arch", "softmax", "-o", work / "softmax",
                   "--max-seq", "64")[0] == 0
    before = (work / "softmax" / "model.onnx").read_bytes()
    args = ["bench", a, "--work", work, "--seq", "8", "--context", "8", "--backend", "ort", "--budget", "0.05",
            "--no-memory", "--repeats", "2", "--min-repeats", "1"]
    code, _, err = run_cli(*args)
    assert code == 1 and "bench did not make" in one_error_line(err)
    assert (work / "softmax" / "model.onnx").read_bytes() == before
    code, _, err = run_cli(*args[:3], tmp_path / "WK2", *args[4:])  # its own work directory: made, then reused
    assert code == 0, err
    made = (tmp_path / "WK2" / "softmax" / "model.onnx").read_bytes()
    assert run_cli(*args[:3], tmp_path / "WK2", *args[4:])[0] == 0
    assert (tmp_path / "WK2" / "softmax" / "model.onnx").read_bytes() == made


def test_exporting_an_exports_own_checkpoint_into_it_is_refused(run_cli, tmp_path):
    d = tmp_path / "D"
    assert run_cli("export", "--preset", "tiny", "-o", d, "--max-seq", "8")[0] == 0
    code, _, err = run_cli("export", d / "checkpoint", "-o", d, "--max-seq", "8")
    assert code == 1 and "is inside -o" in one_error_line(err)
    assert run_cli("verify", d)[0] == 0


@pytest.mark.parametrize("target", ["", ".", "~", "/", ".."])
def test_dangerous_output_paths_are_refused(run_cli, tmp_path, monkeypatch, target):
    work = tmp_path / "cwd"
    work.mkdir()
    (work / "keep.txt").write_text("keep")
    monkeypatch.chdir(work)
    for command in (["init", "--preset", "tiny"], ["export", "--preset", "tiny", "--max-seq", "8"]):
        code, _, err = run_cli(*command, "-o", target, "--force")
        assert code == 1 and "error:" in err, (command, target, err)
    assert (work / "keep.txt").read_text() == "keep" and sorted(p.name for p in work.iterdir()) == ["keep.txt"]


def test_a_250_character_directory_name_works(tmp_path):
    out = tmp_path / ("d" * 250)
    export(out, ExportOptions(max_seq=8), preset_name="tiny", run_verify=False)
    assert read_manifest(out).max_seq == 8


def test_artifacts_are_readable_by_others_under_umask_022(tmp_path):
    old = os.umask(0o022)
    try:
        export(tmp_path / "e", ExportOptions(max_seq=8), preset_name="tiny", run_verify=False)
    finally:
        os.umask(old)
    for path in (tmp_path / "e").rglob("*"):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o044 == 0o044, f"{path} is {oct(mode)}"


def export_until_staging(tmp_path) -> subprocess.Popen:
    """An export in a child process, returned once its staging directory exists."""
    proc = subprocess.Popen([*CLI, "export", "--preset", "tiny", "-o", str(tmp_path / "e"), "--max-seq", "8"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not [p for p in tmp_path.iterdir() if p.name.startswith(".samout-stage-")]:
        time.sleep(0.05)
    return proc


def test_stale_staging_of_a_killed_export_is_removed_by_the_next_run(tmp_path):
    """kill -9 mid-export leaves a staging directory; the next run into that parent removes it."""
    proc = export_until_staging(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".samout-stage-")], "no staging dir seen"
    assert not (tmp_path / "e").exists()
    export(tmp_path / "f", ExportOptions(max_seq=8), preset_name="tiny", run_verify=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_sigterm_removes_the_staging_directory(tmp_path):
    proc = export_until_staging(tmp_path)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode != 0 and list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ wrong results


@pytest.mark.parametrize("lowering", ["native", "custom"])
def test_past_max_seq_the_graph_returns_nan_never_a_finite_wrong_answer(exported, lowering):
    """The graph alone (a bare ONNX Runtime session) is NaN past its max_seq; our runners never call it
    that long: they feed chunks of max_seq with the state carried, which is exact."""
    import onnxruntime as ort

    d = exported(lowering=lowering).directory  # max_seq 300
    session = ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"])
    runner = load_ort_runner(d)
    ids = np.random.default_rng(0).integers(0, 128, (1, 1000))
    for seq in (300, 301, 400, 1000):
        logits = session.run(["logits"], {"input_ids": ids[:, :seq], **runner.initial_state(1)})[0]
        assert np.isnan(logits).all() == (seq > 300) and np.isfinite(logits).all() == (seq <= 300)
        chunked, _ = runner.run(ids[:, :seq], runner.initial_state(1))
        assert np.isfinite(chunked).all()
    names = session.get_outputs()
    poisoned = dict(zip([o.name for o in names], session.run(None, {"input_ids": ids, **runner.initial_state(1)})))
    state = {k.replace("present_max", "past_max"): v for k, v in poisoned.items() if k != "logits"}
    assert all(np.isnan(v).all() for v in state.values())
    with pytest.raises(SamoutError, match="poisoned"):  # our runners refuse a poisoned state on the host
        runner.run(ids[:, :1], state)


def _graph_runtimes(path: Path) -> dict:
    """The export's graph in ONNX Runtime (a bare session), OpenVINO and onnx.reference: feed -> outputs."""
    import onnxruntime as ort
    from onnx.reference import ReferenceEvaluator

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    evaluator = ReferenceEvaluator(str(path))
    runtimes = {"onnxruntime": lambda feed: dict(zip(names, session.run(None, feed))),
                "onnx.reference": lambda feed: dict(zip(names, evaluator.run(None, feed)))}
    ov = pytest.importorskip("openvino")
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    runtimes["openvino"] = lambda feed: {o.get_any_name(): v for o, v in compiled(feed).items()}
    return runtimes


def test_the_nan_poison_stays_in_every_runtime_whatever_its_max(exported):
    """Issue 15 item 2: a poisoned state gives NaN on the next call in ONNX Runtime, OpenVINO (whose
    Max(NaN, x) is x) and onnx.reference, row by row: a batch's healthy rows keep their answers."""
    d = exported().directory  # max_seq 300
    rng = np.random.default_rng(3)
    long_ids, ids = rng.integers(0, 128, (1, 301)), rng.integers(0, 128, (2, 1))
    names = [f"past_max.{i}" for i in range(2)]
    for name, run in _graph_runtimes(d / "model.onnx").items():
        empty = {n: np.full((1, 4, 1, 8), np.finfo(np.float32).min, np.float32) for n in names}
        poisoned = run({"input_ids": long_ids, **empty})
        assert np.isnan(poisoned["logits"]).all(), name
        healthy = run({"input_ids": long_ids[:, :200], **empty})
        state = {n: np.concatenate([poisoned[n.replace("past_max", "present_max")],
                                    healthy[n.replace("past_max", "present_max")]]) for n in names}
        for _ in range(3):  # decode steps keep the poison in row 0 and leave row 1 alone
            out = run({"input_ids": ids, **state})
            assert np.isnan(out["logits"][0]).all() and np.isfinite(out["logits"][1]).all(), name
            state = {n: out[n.replace("past_max", "present_max")] for n in names}
        inf_state = {n: np.concatenate([v[1:], v[1:]]) for n, v in state.items()}
        inf_state[names[1]][0, 0, 0, 0] = np.inf  # an infinity is refused the same way
        out = run({"input_ids": ids, **inf_state})
        assert np.isnan(out["logits"][0]).all() and np.isfinite(out["logits"][1]).all(), name


def test_max_seq_in_the_graph_wins_over_an_edited_manifest(exported, tmp_path):
    d = tmp_path / "edited"
    shutil.copytree(exported().directory, d)
    data = json.loads((d / "export.json").read_text())
    data["max_seq"] = 4096
    (d / "export.json").write_text(json.dumps(data))
    with pytest.raises(Exception, match="one of them was edited"):
        load_ort_runner(d)


# ------------------------------------------------------------------ output


def test_markup_in_paths_is_printed_verbatim(run_cli, tmp_path):
    for name in ("a[/]b", "[bold]loud"):
        out = tmp_path / name
        code, stdout, err = run_cli("export", "--preset", "tiny", "-o", out, "--max-seq", "8")
        assert code == 0, err
        assert name in stdout.replace("\n", "")


def test_a_closed_pipe_is_quiet(exported):
    d = exported().directory
    proc = subprocess.run(f"{sys.executable} -m samout_edge inspect {d} | head -1", shell=True, capture_output=True,
                          text=True, executable="/bin/bash")
    assert proc.stderr == "" and proc.stdout.count("\n") == 1


# ------------------------------------------------------------------ portable graphs


def test_exports_have_no_dead_nodes_and_onnxruntime_warns_nothing(exported):
    script = ("import onnxruntime as ort, sys; o = ort.SessionOptions(); o.log_severity_level = 1; "
              "ort.InferenceSession(sys.argv[1], o, providers=['CPUExecutionProvider'])")
    for arch in ("cummax", "softmax"):
        for lowering in ("native", "custom"):
            path = exported(arch=arch, lowering=lowering).directory / "model.onnx"
            model = onnx.load(str(path))
            used = {i for n in all_nodes(model.graph.node) for i in n.input} | {o.name for o in model.graph.output}
            dead = [n.name for n in model.graph.node if not any(o in used for o in n.output)]
            assert not dead, f"{arch}/{lowering}: dead nodes {dead[:3]}"
            proc = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True)
            warnings = [line for line in proc.stderr.splitlines() if "W:onnxruntime" in line or "not used" in line]
            assert proc.returncode == 0 and not warnings, warnings[:3]


def _golden(directory):
    from samout_edge.artifact.golden import GoldenIndex, load_golden

    return load_golden(directory, GoldenIndex.from_dict(read_manifest(directory).golden))


def test_an_inlined_custom_export_runs_where_local_functions_do_not(exported, tmp_path):
    """OpenVINO and the ONNX reference evaluator refuse a custom export; its inlined copy matches the golden outputs."""
    from onnx.reference import ReferenceEvaluator

    from samout_edge.inlining import inline_export
    from samout_edge.runtime.verify import verify

    out = inline_export(exported(lowering="custom").directory, tmp_path / "inlined")
    assert verify(out).passed and read_manifest(out).lowering == "inlined"
    golden = _golden(out)
    feed, want = golden.feeds[1], golden.outputs[1]  # prefill 2x97
    got = ReferenceEvaluator(str(out / "model.onnx")).run(["logits"], feed)[0]
    assert np.abs(got - want["logits"]).max() <= 1e-4 * max(1, np.abs(want["logits"]).max())
    ov = pytest.importorskip("openvino")
    compiled = ov.Core().compile_model(str(out / "model.onnx"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    result = compiled(feed)
    got = result[compiled.output("logits")]
    assert np.abs(got - want["logits"]).max() <= 1e-4 * max(1, np.abs(want["logits"]).max())


# ------------------------------------------------------------------ bad input, one line each


def _export_copy(exported, tmp_path, edit):
    d = tmp_path / "copy"
    shutil.copytree(exported().directory, d)
    data = json.loads((d / "export.json").read_text())
    edit(data)
    (d / "export.json").write_text(json.dumps(data))
    return d


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda m: m.update(max_seq="abc"), "max_seq must be a positive integer"),
        (lambda m: m.update(max_seq=-5), "max_seq must be a positive integer"),
        (lambda m: m.update(max_seq=64.5), "max_seq must be a positive integer"),
        (lambda m: m.update(scan={"scan": "zigzag"}), "is not a scan plan"),
        (lambda m: m.update(dtype="fp64"), "dtype 'fp64'"),
        (lambda m: m["config"].update(hidden_size=2**40, num_heads=2**10), "one of them was edited"),
        (lambda m: m.update(config=[1, 2]), "must be a JSON object"),
    ],
)
def test_edited_manifest_fails_in_one_line(run_cli, exported, tmp_path, edit, match):
    d = _export_copy(exported, tmp_path, edit)
    code, _, err = run_cli("verify", d)
    assert code == 1 and match in one_error_line(err), err


def test_edited_checkpoint_config_fails_before_building_a_model(run_cli, tiny_checkpoint, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(tiny_checkpoint, ck)
    data = json.loads((ck / "config.json").read_text())
    data["num_layers"] = 10**6
    (ck / "config.json").write_text(json.dumps(data))
    started = time.time()
    code, _, err = run_cli("export", ck, "-o", tmp_path / "o")
    assert code == 1 and "do not belong together" in one_error_line(err) and time.time() - started < 30
    (ck / "config.json").write_text("[1, 2]")
    code, _, err = run_cli("export", ck, "-o", tmp_path / "o")
    assert code == 1 and "must be a JSON object" in one_error_line(err)


@pytest.mark.parametrize(
    "args,match",
    [
        (["export", "--preset", "tiny", "-o", "{tmp}/o", "--max-seq", "1000000000"], "needs about"),
        (["bench", "op", "--shape", "1,8,1000000000,64", "--device", "cpu"], "needs about"),
        (["plan", "--profile", "jetson-orin-nano-8gb", "--contexts=-1024"], "positive lengths"),
        (["inspect", "{tmp}/empty.onnx"], "is not an ONNX model (it is empty)"),
        (["inspect", "{tmp}/text.onnx"], "is not an ONNX model"),
        (["generate", "{exp}", "--ids", "1", "--temperature", "nan"], "finite number"),
        (["generate", "{exp}", "--prompt", "a", "--vocab", "{tmp}/empty-vocab.json"], "at least one of them non-empty"),
        (["profiles", "show", "{tmp}/inf.toml"], "must be a finite number"),
        (["bench", "{exp}", "{exp}", "--budget", "-5"], "--budget must be a positive"),
        (["bench", "{exp}", "{exp}", "--budget", "nan"], "--budget must be a positive"),
        (["bench", "{exp}", "{exp}", "--json", "/proc/nope/x.json"], "cannot write there"),
        (["export", "--preset", "tiny", "-o", "/proc/x", "--max-seq", "8"], "cannot"),
    ],
)
def test_bad_input_gets_one_clear_line(run_cli, exported, tmp_path, args, match):
    (tmp_path / "empty.onnx").write_bytes(b"")
    (tmp_path / "text.onnx").write_text("not a model")
    (tmp_path / "empty-vocab.json").write_text('[""]')
    shipped = Path(__file__).parents[1] / "src/samout_edge/profiles/data/jetson-orin-nano-8gb.toml"
    (tmp_path / "inf.toml").write_text(shipped.read_text().replace("memory_gib = 8.0", "memory_gib = inf", 1))
    exp = exported().directory
    code, _, err = run_cli(*[a.format(tmp=tmp_path, exp=exp) for a in args])
    assert code == 1 and match in one_error_line(err), err
    assert "unexpected" not in err


@pytest.mark.parametrize("args", [["bench", "op", "--repeats", "0"], ["bench", "{exp}", "--warmup", "-3"],
                                  ["init", "--preset", "tiny", "-o", "{tmp}/c", "--seed", "100000000000000000000000"]])
def test_out_of_range_numbers_are_usage_errors(run_cli, exported, tmp_path, args):
    code, _, err = run_cli(*[a.format(tmp=tmp_path, exp=exported().directory) for a in args])
    assert code == 2 and "Traceback" not in err


def test_a_pickle_is_refused_without_advice_to_unpickle(run_cli, tmp_path):
    import torch

    torch.save({"em.weight": torch.zeros(2, 2), "obj": Path("x")}, tmp_path / "evil.pt")
    code, _, err = run_cli("export", tmp_path / "evil.pt", "-o", tmp_path / "o")
    assert code == 1 and "never unpickles" in one_error_line(err) and "weights_only=False" not in err


def test_tiny_temperature_is_greedy_and_quiet(exported):
    import warnings

    from samout_edge.generate import Sampler, generate

    runner = load_ort_runner(exported().directory)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny = generate(runner, [1, 2, 3], 8, Sampler(temperature=1e-320)).new_ids
    assert tiny == generate(runner, [1, 2, 3], 8, Sampler()).new_ids


def test_control_characters_in_paths_are_escaped(run_cli, tmp_path):
    code, _, err = run_cli("verify", tmp_path / "bad\x1b[31mname")
    assert code == 1 and "\x1b" not in err and "\\x1b" in err


@pytest.mark.parametrize("max_seq", [1, 2])
def test_softmax_exports_with_the_shortest_max_seq(tmp_path, max_seq):
    result = export(tmp_path / "s", ExportOptions(arch="softmax", max_seq=max_seq), preset_name="tiny")
    assert result.verification.passed


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--tensorrt", "7.0"], "outside the supported range"),
        (["--tensorrt=-1.-5"], "not a TensorRT version"),
        (["--profile", ""], "unknown profile ''"),
        (["--profile", "{tmp}/evil.toml"], "names a directory"),
    ],
)
def test_build_refuses_bad_versions_and_profile_names(run_cli, exported, tmp_path, extra, match):
    shipped = Path(__file__).parents[1] / "src/samout_edge/profiles/data/jetson-orin-nano-8gb.toml"
    text = "\n".join('name = "../../../../tmp/x"' if line.startswith("name =") else line
                     for line in shipped.read_text().splitlines())
    (tmp_path / "evil.toml").write_text(text)
    args = ["build", exported().directory, "--dry-run", *[a.format(tmp=tmp_path) for a in extra]]
    if "--profile" not in " ".join(extra):
        args += ["--profile", "jetson-orin-nano-8gb"]
    code, _, err = run_cli(*args)
    assert code == 1 and match in one_error_line(err), err


def test_build_plan_refuses_an_empty_model(run_cli, exported, tmp_path):
    d = tmp_path / "d"
    shutil.copytree(exported().directory, d)
    (d / "model.onnx").write_bytes(b"")
    code, _, err = run_cli("build", d, "--profile", "jetson-orin-nano-8gb", "--dry-run")
    assert code == 1 and "does not match the sha256" in one_error_line(err)


def test_inspect_counts_absurd_initializers_without_overflow(tmp_path):
    from onnx import TensorProto, helper

    from samout_edge.inspection import inspect_path

    big = onnx.TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[2**32, 2**32])  # dims only, no data
    node = helper.make_node("Identity", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], [big])
    onnx.save(helper.make_model(graph), str(tmp_path / "big.onnx"))
    assert inspect_path(tmp_path / "big.onnx", lint=False).parameter_count == 2**64


def test_bench_without_work_leaves_no_temporary_directory(run_cli, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    code, _, err = run_cli("bench", "--preset", "tiny", "--seq", "8", "--context", "8", "--backend", "ort",
                           "--budget", "0.05", "--repeats", "2", "--min-repeats", "1", "--no-memory")
    assert code == 0, err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("samout-bench-")]


def test_an_edited_checkpoint_config_is_caught(run_cli, tmp_path):
    d = tmp_path / "d"
    assert run_cli("export", "--preset", "tiny", "-o", d, "--max-seq", "16")[0] == 0
    config = json.loads((d / "checkpoint" / "config.json").read_text())
    config["num_heads"] = 8
    (d / "checkpoint" / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli("verify", d)
    assert code == 1 and "does not match the sha256" in one_error_line(err)
    code, _, err = run_cli("generate", d, "--ids", "1,2", "--backend", "torch")
    assert code == 1 and "has config" in one_error_line(err)


def test_a_huge_sparse_file_is_not_read(run_cli, tmp_path):
    path = tmp_path / "huge.onnx"
    with open(path, "wb") as f:
        f.write(b"\x08")
        f.truncate(2**31 + 1)
    started = time.time()
    code, _, err = run_cli("inspect", path)
    assert code == 1 and "over 2 GiB" in one_error_line(err) and time.time() - started < 5


def test_a_full_disk_is_one_line_and_leaves_nothing(run_cli, tmp_path, monkeypatch):
    import errno

    import samout_edge.exporter.onnx_export as onnx_export

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(onnx_export.onnx, "save_model", full)
    code, _, err = run_cli("export", "--preset", "tiny", "-o", tmp_path / "o", "--max-seq", "8")
    assert code == 1 and "No space left on device" in one_error_line(err) and "unexpected" not in err
    assert list(tmp_path.iterdir()) == []


def test_eval_of_an_export_whose_checkpoint_moved_names_options_eval_has(run_cli, tmp_path):
    """Issue 15 item 16: the advice names eval's own options, and --checkpoint takes the copy."""
    d, text = tmp_path / "d", tmp_path / "t.txt"
    text.write_text("".join(chr(32 + i % 90) for i in range(200)))
    assert run_cli("init", "--preset", "tiny", "-o", tmp_path / "ck")[0] == 0
    assert run_cli("export", tmp_path / "ck", "-o", d, "--max-seq", "32", "--logits", "all")[0] == 0
    shutil.move(tmp_path / "ck", tmp_path / "moved")
    vocab = tmp_path / "v.json"
    vocab.write_text(json.dumps([chr(i) for i in range(128)]))
    code, _, err = run_cli("eval", d, "--text", text, "--vocab", vocab, "--window", "16")
    line = one_error_line(err)
    assert code == 1 and "--checkpoint PATH" in line and "--no-reference" in line
    code, out, err = run_cli("eval", d, "--text", text, "--vocab", vocab, "--window", "16", "--checkpoint",
                             tmp_path / "moved", "--json")
    assert code == 0 and json.loads(out)[0]["top1_agreement"] == 1.0, err
    code, _, err = run_cli("generate", d, "--ids", "1,2", "--backend", "torch")
    assert code == 1 and "--checkpoint" not in one_error_line(err)


def test_inline_of_an_export_whose_weights_point_outside_it_is_one_line(run_cli, exported, tmp_path):
    """Issue 15 item 17: refused safely, and said in one line (not 'unexpected ValidationError')."""
    from samout_edge.artifact.files import sha256_file

    d = tmp_path / "e"
    shutil.copytree(exported(lowering="custom").directory, d)
    model = onnx.load(str(d / "model.onnx"))
    onnx.save_model(model, str(d / "model.onnx"), save_as_external_data=True, location="w.data", size_threshold=0)
    (d / "w.data").rename(tmp_path / "outside.data")
    model = onnx.load(str(d / "model.onnx"), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../outside.data"
    onnx.save_model(model, str(d / "model.onnx"))
    data = json.loads((d / "export.json").read_text())
    data["files"]["model.onnx"] = {"sha256": sha256_file(d / "model.onnx"), "bytes": (d / "model.onnx").stat().st_size}
    (d / "export.json").write_text(json.dumps(data))
    code, _, err = run_cli("inline", d, "-o", tmp_path / "i")
    assert code == 1 and "points outside the directory" in one_error_line(err) and "unexpected" not in err
    assert not (tmp_path / "i").exists()
