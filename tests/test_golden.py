"""Golden outputs travel with the export, so the device verifies with numpy alone,
and NVIDIA's Polygraphy reads the same files."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from samout_edge.artifact.golden import GoldenIndex, load_golden
from samout_edge.artifact.manifest import read_manifest
from samout_edge.errors import SamoutError
from samout_edge.runtime.verify import verify
from tests.test_export import rehash


def test_golden_cases_cover_what_breaks_graphs(exported):
    d = exported().directory
    m = read_manifest(d)
    golden = load_golden(d, GoldenIndex.from_dict(m.golden))
    names = [c.name for c in golden.index.cases]
    assert names[:4] == ["prefill 2x1", "prefill 2x97", "prefill 1x299", "prefill 1x300"]
    calls = [c for c in golden.index.cases if c.name.startswith("calls")]
    assert [c.seq for c in calls] == [*range(1, 17), 17]  # every short length and the block's far side
    ids = np.concatenate([f["input_ids"].ravel() for f in golden.feeds])
    assert 0 in ids and m.config.vocab_size - 1 in ids
    steps = [c for c in golden.index.cases if c.state_from is not None and c.name.startswith("decode")]
    assert len(steps) == 4 and all(c.seq == 1 and c.batch == 2 for c in steps)
    long = [c for c in golden.index.cases if c.name.startswith("long 1x751")]  # 2.5 x max_seq in calls of 300
    assert [(c.seq, c.past) for c in long] == [(300, 0), (300, 300), (151, 600), (1, 751), (1, 752)]
    assert golden.feeds[0]["past_max.0"].dtype == np.float32
    assert m.files["golden/inputs.json"]["sha256"] and m.files["golden/outputs.json"]["sha256"]


def test_fp16_golden_feeds_are_fp16(exported):
    d = exported(dtype="fp16").directory
    m = read_manifest(d)
    golden = load_golden(d, GoldenIndex.from_dict(m.golden))
    assert golden.feeds[0]["past_max.0"].dtype == np.float16
    assert golden.feeds[0]["past_max.0"].min() == np.finfo(np.float16).min


def _edit_embedding_row0(directory, values):
    model = onnx.load(str(directory / "model.onnx"))
    table = next(t for t in model.graph.initializer if list(t.dims) == [128, 32])
    array = onnx.numpy_helper.to_array(table).copy()
    array[0] = values
    table.CopyFrom(onnx.numpy_helper.from_array(array, table.name))
    onnx.save(model, str(directory / "model.onnx"))


@pytest.mark.parametrize("row", ["linspace", "nan"])
def test_verify_catches_an_edited_padding_row_even_with_hashes_updated(exported, tmp_path, row):
    d = tmp_path / "edited"
    shutil.copytree(exported().directory, d)
    _edit_embedding_row0(d, np.linspace(-40, 40, 32) if row == "linspace" else np.full(32, np.nan))
    with pytest.raises(SamoutError, match="does not match the sha256"):
        verify(d)
    rehash(d)
    result = verify(d)
    assert not result.passed
    assert any(not c.passed for c in result.checks if c.check.startswith("prefill 2x"))


def test_verify_needs_no_torch_reference(exported, monkeypatch):
    """The golden path never builds a torch runner."""
    import samout_edge.runtime.torch_runner as tr

    monkeypatch.setattr(tr, "load_torch_runner", lambda *a, **k: pytest.fail("torch used"))
    result = verify(exported().directory)
    assert result.passed and result.reference == "golden"


def polygraphy(directory: Path, command: str) -> subprocess.CompletedProcess:
    """A `polygraphy ...` line as a user runs it, in the export directory."""
    args = command.split()
    args[0] = str(Path(sys.executable).parent / "polygraphy")
    return subprocess.run(args, cwd=directory, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("variant", [dict(), dict(arch="softmax"), dict(lowering="custom"), dict(dtype="fp16"),
                                     dict(arch="softmax", dtype="fp16"), dict(arch="hybrid-w8", dtype="fp16")])
def test_the_documented_polygraphy_line_passes(exported, variant):
    """NVIDIA's Polygraphy, given our files and the line inspect prints, runs the graph in ONNX Runtime
    and agrees (issue 15 item 3: its default 1e-5 on every element fails correct softmax exports)."""
    from samout_edge.inspection import inspect_path

    pytest.importorskip("polygraphy")
    d = exported(**variant).directory
    line = inspect_path(d, lint=False).polygraphy
    assert line.startswith("polygraphy run model.onnx --onnxrt") and "--rtol 0 --atol" in line
    proc = polygraphy(d, line)
    assert proc.returncode == 0 and "PASSED" in proc.stdout + proc.stderr, proc.stdout[-3000:] + proc.stderr[-3000:]


def _ids_outside_every_id(directory) -> set[int]:
    """Token ids the golden inputs select, the "every id" cases aside."""
    from samout_edge.artifact.golden import EVERY_ID

    golden = load_golden(directory, GoldenIndex.from_dict(read_manifest(directory).golden))
    return {int(i) for c, f in zip(golden.index.cases, golden.feeds) if not c.name.startswith(EVERY_ID)
            for i in f["input_ids"].ravel()}


@pytest.mark.parametrize("weights", ["fp", "int4"])
def test_verify_catches_a_corrupted_row_the_random_ids_never_select(tmp_path, tiny_checkpoint, weights):
    """Issue 15 item 4: multiply the int4 scale of one embedding row (or the fp32 row itself) that no random
    golden input selects by 50 and fix the sha256: the "every id" cases still catch it."""
    from samout_edge.exporter.onnx_export import ExportOptions, export

    d = export(tmp_path / "e", ExportOptions(max_seq=40, weights=weights), checkpoint=tiny_checkpoint).directory
    unused = sorted(set(range(128)) - _ids_outside_every_id(d))
    assert unused, "every id is selected by the random cases: pick another seed for this test"
    row = unused[0]
    model = onnx.load(str(d / "model.onnx"))
    rows = {"fp": [128, 32], "int4": [128, 1]}[weights]  # the embedding table, or its int4 scales (block 32)
    table = next(t for t in model.graph.initializer if list(t.dims) == rows)
    array = onnx.numpy_helper.to_array(table).copy()
    array[row] *= 50
    table.CopyFrom(onnx.numpy_helper.from_array(array, table.name))
    onnx.save(model, str(d / "model.onnx"))
    rehash(d)
    result = verify(d)
    assert not result.passed
    failed = {c.check.split(" ")[0] + " " + c.check.split(" ")[1] for c in result.checks if not c.passed}
    assert failed == {"every id"}


def test_every_id_chunks_cover_the_vocabulary_within_the_output_limit():
    from samout_edge.artifact.golden import MAX_OUTPUT_BYTES, every_id_chunks

    chunks = every_id_chunks(10000, 512 * 4)  # the seed preset: 20 calls of 512 one-token rows
    assert (chunks[0][0], chunks[0][-1], chunks[-1][0], chunks[-1][-1], len(chunks)) == (0, 511, 9728, 9999, 20)
    assert list(np.concatenate(chunks)) == list(range(10000)) and 512 * 512 * 4 <= MAX_OUTPUT_BYTES
    assert [list(c) for c in every_id_chunks(128, 32 * 4)] == [list(range(128))]


def test_every_id_cases_keep_a_windowed_state_within_memory():
    """The seed preset's softmax-w64 feeds 1.5 MiB of empty KV window a row: every id would be
    15 GiB of golden inputs (an export was OOM-killed at 24 GB). Cases stay small; the golden
    files take every k-th id (and the last), and say so in the case's name."""
    from samout_edge.artifact.arch import arch_spec
    from samout_edge.artifact.config import PRESETS
    from samout_edge.artifact.golden import (
        EVERY_ID_FEED_BYTES,
        MAX_CASE_STATE_BYTES,
        MAX_OUTPUT_BYTES,
        every_id_chunks,
        every_id_name,
        every_id_row_bytes,
        every_id_step,
    )

    cfg = PRESETS["seed"]
    assert every_id_step(cfg.vocab_size, every_id_row_bytes(cfg, arch_spec("cummax"))[1]) == 1  # every id
    first, row = every_id_row_bytes(cfg, arch_spec("softmax-w64"))
    assert first == 8 * 64 * 64 * 4 and row > 1 << 20  # a 64-slot key window; 1.5 MiB of empty state
    step = every_id_step(cfg.vocab_size, row)
    chunks = every_id_chunks(cfg.vocab_size, first, row, step)
    ids = np.concatenate(chunks)
    assert step > 1 and ids[0] == 0 and ids[-1] == cfg.vocab_size - 1 and len(set(ids)) == len(ids)
    assert len(ids) * row <= EVERY_ID_FEED_BYTES + row  # the last id on top
    assert all(len(c) * row <= MAX_CASE_STATE_BYTES and len(c) * first <= MAX_OUTPUT_BYTES for c in chunks)
    assert every_id_name(chunks[0]) == f"every id 0..{chunks[0][-1]} by {step}"
    assert every_id_name(np.arange(0, 512)) == "every id 0..511"


def test_a_case_wider_than_the_runner_runs_in_slices(exported):
    """An engine takes at most its profiles' batch: verify runs wider cases in slices, with the same result."""
    from samout_edge.runtime.registry import load_runner
    from samout_edge.runtime.verify import run_rows

    with load_runner(exported().directory, "ort") as runner:
        ids = np.random.default_rng(0).integers(0, 128, (7, 5))
        whole, whole_state = runner.run(ids, runner.initial_state(7))
        sliced, sliced_state = run_rows(runner, ids, runner.initial_state(7), max_batch=3)
        assert np.array_equal(whole, sliced)
        assert all(np.array_equal(whole_state[k], sliced_state[k]) for k in whole_state)
