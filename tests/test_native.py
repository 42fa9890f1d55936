"""The native backend (issue 29): SamOut's forward pass in C over native.safetensors, no ONNX
Runtime in the process. It must compute what the graph computes, on every kernel path this
CPU can build (AVX-512, AVX2, plain C, which is also what a CPU without them gets), and refuse
what it does not compute."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from samout_edge.artifact.config import ModelConfig
from samout_edge.errors import SamoutError
from samout_edge.exporter.onnx_export import ExportOptions, export
from samout_edge.models.checkpoint import random_checkpoint, save_checkpoint
from samout_edge.native import build
from samout_edge.native.weights import FILE, NativeWeights
from samout_edge.runtime.registry import load_runner

# vocab 100 and 3 x 64 rows: the last panel of the head and of no matrix is full; head_dim 16
ODD = ModelConfig(vocab_size=100, hidden_size=64, num_heads=4, num_layers=2)


@pytest.fixture(scope="module")
def odd_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "odd"
    save_checkpoint(random_checkpoint(ODD, seed=3), path)
    return path


@pytest.fixture(scope="module")
def native_exports(tmp_path_factory, odd_checkpoint):
    """fp32, int4 (symmetric, blocks of 64: written as 32s) and int4 asymmetric, each with --native."""
    root = tmp_path_factory.mktemp("native")
    forms = {"fp32": {}, "int4": {"weights": "int4", "block_size": 64},
             "int4-asym": {"weights": "int4", "weights_grid": "asymmetric"}}
    return {name: export(root / name, ExportOptions(max_seq=96, native=True, **kw), checkpoint=odd_checkpoint).directory
            for name, kw in forms.items()}


@pytest.mark.parametrize("form", ["fp32", "int4", "int4-asym"])
def test_export_verifies_it_and_it_matches_onnx_runtime(native_exports, form):
    d = native_exports[form]
    manifest = json.loads((d / "export.json").read_text())
    assert FILE in manifest["files"] and manifest["verification"]["passed"]
    rng = np.random.default_rng(0)
    with load_runner(d, "ort") as ort, load_runner(d, "native") as native:
        assert native.info.backend == "native" and native.info.max_seq is None
        for shape in [(1, 1), (2, 7), (1, 200)]:  # past max_seq: ort chunks, native needs not
            ids = rng.integers(0, ODD.vocab_size, shape)
            a, sa = ort.run(ids, ort.initial_state(shape[0]))
            b, sb = native.run(ids, native.initial_state(shape[0]))
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)
            for name in sa:  # the running max is exact given the same projections
                np.testing.assert_allclose(sb[name], sa[name], rtol=1e-5, atol=1e-5)
            step, _ = native.run(ids[:, :1], sb)  # and the state carries
            ref, _ = ort.run(ids[:, :1], sa)
            np.testing.assert_allclose(step, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch_flag", ["-march=haswell", "-march=x86-64"])
def test_every_kernel_path_verifies(native_exports, run_cli, tmp_path, monkeypatch, arch_flag):
    """AVX2 and plain C (an aarch64 build's loops, here on x86) compute what the widest build does."""
    if not build.platform.machine().startswith(("x86", "AMD64")):
        pytest.skip("x86 kernel flags")
    env = {**os.environ, "SAMOUT_EDGE_NATIVE_ARCH": arch_flag, "SAMOUT_EDGE_CACHE": str(tmp_path)}
    for form in ("int4", "fp32"):
        done = subprocess.run([sys.executable, "-m", "samout_edge", "verify", str(native_exports[form]), "--backend",
                               "native", "--json"], capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["passed"]
    kernels = subprocess.run([sys.executable, "-c", "from samout_edge.native import build; print(build.kernels())"],
                             capture_output=True, text=True, env=env).stdout.strip()
    assert kernels == {"-march=haswell": "avx2", "-march=x86-64": "c"}[arch_flag]


def test_a_changed_weights_file_fails_verify_and_a_wrong_one_fails_to_load(native_exports, run_cli, tmp_path):
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(native_exports["int4"], d)
    data = bytearray((d / FILE).read_bytes())
    data[-100] ^= 0x11  # a weight's bits
    (d / FILE).write_bytes(bytes(data))
    code, _, err = run_cli("verify", d, "--backend", "native")
    assert code != 0 and "native.safetensors does not match the sha256" in err
    (d / FILE).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(SamoutError, match="is not a native weights file of this version"):
        NativeWeights(d / FILE)
    (d / FILE).unlink()  # listed in export.json, gone from the directory: the loader says so
    with pytest.raises(SamoutError, match="has no native.safetensors: export it with --native"):
        NativeWeights(d / FILE)


def test_what_it_does_not_compute_is_refused_in_one_line(exported, odd_checkpoint, tmp_path, run_cli):
    with pytest.raises(SamoutError, match="--native: the native backend cannot run this export: it computes the "
                                          "cummax arch only"):
        export(tmp_path / "s", ExportOptions(arch="softmax", native=True), checkpoint=odd_checkpoint)
    with pytest.raises(SamoutError, match="its quantized matrices are int4"):
        export(tmp_path / "i8", ExportOptions(weights="int8", native=True), checkpoint=odd_checkpoint)
    assert not (tmp_path / "s").exists() and not (tmp_path / "i8").exists()
    code, _, err = run_cli("generate", exported("softmax").directory, "--ids", "1", "--backend", "native")
    assert code != 0 and err.count("\n") == 1 and "(a softmax KV cache), which the native backend does not hold" in err
    code, _, err = run_cli("generate", exported("linear").directory, "--ids", "1", "--backend", "native")
    assert code != 0 and err.count("\n") == 1 and "computes the cummax mixer only (this export is linear)" in err
    code, _, err = run_cli("generate", exported().directory, "--ids", "1", "--backend", "native")
    assert code != 0 and "carries no native.safetensors, which the native backend runs (export --native" in err
    code, out, _ = run_cli("inspect", exported().directory)
    assert "the native backend" not in out.split("runs in:")[1].splitlines()[0]


def test_bad_ids_and_a_poisoned_state_are_refused(native_exports):
    with load_runner(native_exports["int4"], "native") as r:
        with pytest.raises(SamoutError, match=r"input_ids must be in \[0, 100\)"):
            r.run(np.array([[1, 100]]), r.initial_state(1))
        state = r.initial_state(1)
        name = next(iter(state))
        state[name] = state[name].copy()
        state[name][0, 0, 0, 0] = np.nan
        with pytest.raises(SamoutError, match="the state is not finite"):
            r.run(np.array([[1]]), state)


def test_no_compiler_is_one_line(monkeypatch, tmp_path, native_exports, run_cli):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("SAMOUT_EDGE_CACHE", str(tmp_path))
    with pytest.raises(SamoutError, match="compiles its kernels with this machine's C compiler, and there is none"):
        build.build()
    code, _, err = run_cli("generate", native_exports["int4"], "--ids", "1", "--backend", "native")
    assert code != 0 and err == ("error: the native backend needs a C compiler (cc, or the one $CC names), which this "
                                 "install does not have: apt install gcc\n")
    code, out, _ = run_cli("doctor", "--json")
    native = next(b for b in json.loads(out)["backends"] if b["name"] == "native")
    assert native["missing"] == ["a C compiler (cc, or the one $CC names) (apt install gcc)"]


def test_a_failed_build_leaves_nothing_behind(monkeypatch, tmp_path):
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\nfor a; do case $a in -o) shift; esac; done\necho 'cc: broken' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    monkeypatch.setenv("SAMOUT_EDGE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(SamoutError, match="compiling the native kernels failed"):
        build.build()
    assert list((tmp_path / "cache" / "native").iterdir()) == []


def test_threads_share_the_panels_and_change_no_bit(native_exports):
    """Each output is one thread's sum, whoever computes it: 1 and 3 threads agree exactly."""
    from samout_edge.runtime.native_runner import load_native_runner

    ids = np.random.default_rng(1).integers(0, ODD.vocab_size, (1, 40))
    with load_native_runner(native_exports["int4"], threads=1) as one, \
            load_native_runner(native_exports["int4"], threads=3) as three:
        assert "3 threads" in three.info.device and build.threaded()
        a, sa = one.run(ids, one.initial_state(1))
        b, sb = three.run(ids, three.initial_state(1))
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(one.run(ids[:, :1], sa)[0], three.run(ids[:, :1], sb)[0])
    with pytest.raises(SamoutError, match="threads must be at least 1"):
        load_native_runner(native_exports["int4"], threads=0)


def test_omp_num_threads_is_the_default(native_exports, monkeypatch):
    from samout_edge.runtime.native_runner import load_native_runner

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    with load_native_runner(native_exports["int4"]) as r:
        assert r.threads == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "x")
    with load_native_runner(native_exports["int4"]) as r:
        assert r.threads == len(os.sched_getaffinity(0))


def test_a_native_process_has_no_onnx_runtime_and_runs_no_program(native_exports):
    """What the native backend is for: a process that loads and runs an export imports neither
    ONNX Runtime nor onnx, and a cached library is loaded without running the compiler (nor
    hashlib, shutil, subprocess: 4 MB)."""
    build.build()  # cached for the child
    code = (
        "import sys, numpy as np\n"
        "from samout_edge.runtime.registry import load_runner\n"
        f"r = load_runner({str(native_exports['int4'])!r}, 'native')\n"
        "r.run(np.ones((1, 5), np.int64), r.initial_state(1))\n"
        "heavy = ('onnxruntime', 'onnx', 'torch', 'rich', 'typer', 'hashlib', 'shutil', 'subprocess')\n"
        "print(','.join(sorted(m for m in heavy if m in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def test_a_cached_library_is_trusted_only_with_its_records(monkeypatch, tmp_path):
    """An edited source or a stale record builds again; a build killed before its records is redone."""
    monkeypatch.setenv("SAMOUT_EDGE_CACHE", str(tmp_path))
    first = build.build()
    record = first.with_suffix(".key")
    record.write_text(record.read_text() + "tampered")
    mtime = first.stat().st_mtime_ns
    assert build.build() == first and first.stat().st_mtime_ns != mtime  # rebuilt, records rewritten
    first.with_suffix(".c").unlink()  # as if killed after the library, before its records
    assert build.build() == first and first.with_suffix(".c").read_bytes() == build.SOURCE.read_bytes()
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".samout-tmp-")]
