import json

import pytest

from samout_edge.bench import report as rep
from samout_edge.bench.op import bench_op
from samout_edge.bench.peak_memory import MemorySpec, measure_in_child, rss_supported
from samout_edge.bench.suite import BenchConfig, run_bench
from samout_edge.bench.timing import Budget, interleaved
from samout_edge.errors import SamoutError
from samout_edge.exporter.counterparts import prepare_exports
from samout_edge.runtime.registry import Settings

FAST = Budget(warmup=1, min_repeats=2, max_repeats=2, seconds=0.01)


@pytest.fixture(scope="module")
def pair(exported, tmp_path_factory):
    """A cummax export and its softmax counterpart, exported by bench itself."""
    return prepare_exports([exported().directory], None, tmp_path_factory.mktemp("work"), 300, "fp32", "native")


def test_counterpart_shares_the_checkpoint(pair):
    from samout_edge.artifact.manifest import read_manifest

    a, b = read_manifest(pair["cummax"]), read_manifest(pair["softmax"])
    assert (a.arch, b.arch) == ("cummax", "softmax")
    assert a.source["sha256"] == b.source["sha256"] and a.max_seq == b.max_seq


def test_bench_records_both_archs_per_point(pair):
    config = BenchConfig(seqs=[8, 32], contexts=[8, 32], budget=FAST, memory=False)
    report = run_bench(pair, config)
    assert len(report.records) == 2 * 2 * 2 * 2  # backends x modes x lengths x archs
    r = report.records[0]
    for key in ("arch", "backend", "provider", "mode", "batch", "seq", "context", "dtype", "latency_ms",
                "tokens_per_s", "peak_mem_mb", "state_bytes", "machine"):
        assert hasattr(r, key)
    rows = rep.point_rows(report)
    assert len(rows) == 8 and all(row.ratio("softmax") > 0 and row.ratio("cummax") == 1 for row in rows)
    decode = {row.length: row.records for row in rows if row.mode == "decode" and row.backend == "ort"}
    assert decode[8]["cummax"].state_bytes == decode[32]["cummax"].state_bytes  # constant state
    assert decode[32]["softmax"].state_bytes == 4 * decode[8]["softmax"].state_bytes  # KV cache grows linearly


def test_bench_outputs(pair, tmp_path):
    config = BenchConfig(modes=["decode"], contexts=[4, 16], backends=["ort"], budget=FAST, memory=False)
    report = run_bench(pair, config)
    rep.save_json(report, tmp_path / "r.json")
    rep.save_plot(report, tmp_path / "r.png")
    rep.save_markdown(report, tmp_path / "r.md")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["machine"]["label"] and len(data["records"]) == 4
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| ort:cpu | decode | 1 | 4 | cummax |" in (tmp_path / "r.md").read_text()


def test_bench_shows_the_weights_kind_and_mib(pair, capsys):
    from samout_edge.artifact.manifest import read_manifest
    from samout_edge.cli import render

    config = BenchConfig(modes=["decode"], contexts=[4], backends=["ort"], budget=FAST, memory=False)
    report = run_bench(pair, config)
    stored = {arch: read_manifest(pair[arch]).weights.bytes for arch in ("cummax", "softmax")}
    data = report.to_dict()
    assert data["config"]["weights"]["kind"] == "fp" and data["config"]["weights"]["bytes"] == stored
    assert {(r["arch"], r["weights"], r["weights_bytes"]) for r in data["records"]} == {
        (arch, "fp", n) for arch, n in stored.items()}
    row = rep.point_rows(report)[0]
    column = rep.headers(report).index("weights MiB")
    cells = [line[column] for line in rep.table_rows(row)]
    assert cells == [f"fp {stored[arch] / 2**20:,.1f}" for arch in row.records]
    assert all(len(line) == len(rep.headers(report)) for line in rep.table_rows(row))
    render.bench(report)
    out = capsys.readouterr().out
    assert "weights MiB" in out and cells[0] in out and "fp weights" in out
    # a quantized record shows its own kind and size
    row.records["cummax"].weights, row.records["cummax"].weights_bytes = "int4", 3 * 2**20
    assert rep.table_rows(row)[0][column] == "int4 3.0"


@pytest.mark.skipif(not rss_supported(), reason="peak RSS needs Linux /proc/self/clear_refs")
def test_memory_child_measures_kv_growth(pair):
    small = measure_in_child(MemorySpec(str(pair["softmax"]), "ort", "CPUExecutionProvider", "prefill", 1, 8))
    large = measure_in_child(MemorySpec(str(pair["softmax"]), "ort", "CPUExecutionProvider", "prefill", 1, 290))
    assert small is not None and large is not None and large > small


def test_lengths_past_max_seq_are_chunked_and_softmax_past_its_budget_is_reported(pair):
    """One export serves every length (issue 16): 4x max_seq runs, chunked; a softmax context over
    --kv-budget is a row that says so, not a failure."""
    config = BenchConfig(seqs=[1200], contexts=[1200], budget=FAST, memory=False, backends=["ort"],
                         kv_budget_bytes=512 * 1000)  # tiny: 512 bytes of KV per token
    report = run_bench(pair, config)
    by = {(r.arch, r.mode): r for r in report.records}
    assert by[("cummax", "prefill")].latency_ms["median"] > 0 and by[("cummax", "decode")].refused is None
    assert by[("softmax", "decode")].refused.startswith("KV cache") and by[("softmax", "decode")].latency_ms == {}
    assert by[("cummax", "decode")].state_bytes == by[("cummax", "prefill")].state_bytes  # constant

@pytest.mark.parametrize(
    "config,match",
    [
        (BenchConfig(modes=["train"]), "unknown mode"),
        (BenchConfig(backends=["tflite"]), "unknown backend"),
        (BenchConfig(seqs=[0]), "--seq needs positive"),
    ],
)
def test_bad_config(config, match):
    with pytest.raises(SamoutError, match=match):
        config.validate()


def test_unknown_provider(pair):
    with pytest.raises(SamoutError, match="not available here"):
        run_bench(pair, BenchConfig(backends=["ort"], settings=Settings(provider="cuda"), budget=FAST, memory=False))


def test_bench_refuses_two_of_one_arch_and_unlike_exports(exported):
    from samout_edge.artifact.manifest import check_exports

    d = exported().directory
    with pytest.raises(SamoutError, match="two directories are exports of the same arch"):
        prepare_exports([d, d], None, None, 300, "fp32", "native")
    with pytest.raises(SamoutError, match="differ in dtype, config or weights"):
        check_exports([d, exported(arch="softmax", dtype="fp16").directory])
    with pytest.raises(SamoutError, match="no softmax export given"):
        check_exports([d])
    assert list(check_exports([d], None)) == ["cummax"]


def test_interleaved_alternates_and_respects_counts():
    order = []
    timings = interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")},
                          Budget(warmup=1, min_repeats=3, max_repeats=3, seconds=0))
    assert order == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert len(timings["a"].samples_ms) == 3


def test_bench_op_is_exact_and_below_copy_speed():
    report = bench_op([1, 2, 300, 8], budget=Budget(1, 2, 2, 0.01), device="cpu")
    names = [r.name for r in report.rows]
    assert names[:2] == ["copy (cpu)", "torch.cummax (cpu)"]
    assert {"ort:cpu native/blocked", "ort:cpu native/doubling", "ort:cpu custom (function body)"} <= set(names)
    assert all(r.exact for r in report.rows[1:])
    assert all(r.gb_per_s > 0 for r in report.rows)


def test_bench_op_rejects_short_max_len():
    with pytest.raises(SamoutError, match="shorter than the axis"):
        bench_op([1, 2, 300, 8], max_len=64, device="cpu")


@pytest.mark.parametrize("spinning", [None, True])
def test_bench_records_ort_spinning(pair, tmp_path, spinning):
    """Off unless asked for: interleaved sessions' spinning threads slow each other."""
    extra = {} if spinning is None else {"settings": Settings(provider=None, spinning=spinning)}
    config = BenchConfig(modes=["decode"], contexts=[4], backends=["ort"], budget=FAST, memory=False, **extra)
    report = run_bench(pair, config)
    assert report.config["settings"]["spinning"] is bool(spinning) and len(report.records) == 2
    rep.save_markdown(report, tmp_path / "r.md")
    assert f"intra-op spinning {'on' if spinning else 'off'}" in (tmp_path / "r.md").read_text()


def test_decode_rows_carry_their_bytes_and_roofline_fraction(pair):
    """Issue 19: bench measures the bandwidth once and gives each decode step its floor."""
    from samout_edge.artifact.manifest import read_manifest
    from samout_edge.bench.bandwidth import decode_step_bytes

    config = BenchConfig(modes=["prefill", "decode"], seqs=[8], contexts=[4, 16], backends=["ort"], budget=FAST,
                         memory=False)
    report = run_bench(pair, config)
    bandwidth = report.machine["memory_bandwidth"]
    assert bandwidth["gb_per_s"] > 0.1 and bandwidth["threads"] >= 1
    for r in report.records:
        if r.mode == "prefill":
            assert r.step_bytes is None and r.roofline is None
            continue
        m = read_manifest(pair[r.arch])
        cfg = m.config
        assert r.step_bytes == decode_step_bytes(m.weights.bytes, cfg.parameter_count(),
                                                 cfg.vocab_size * cfg.hidden_size, r.state_bytes)
        assert r.step_bytes > 2 * r.state_bytes
        floor_ms = r.step_bytes / (bandwidth["gb_per_s"] * 1e9) * 1e3
        assert r.roofline == pytest.approx(floor_ms / r.latency_ms["median"])
    md = rep.to_markdown(report)
    assert "| roofline |" in md and "GB/s" in md
    off = run_bench(pair, BenchConfig(modes=["decode"], contexts=[4], backends=["ort"], budget=FAST, memory=False,
                                      roofline=False))
    assert "memory_bandwidth" not in off.machine and all(r.roofline is None for r in off.records)


def test_the_bandwidth_is_a_copy_of_read_plus_write_bytes(monkeypatch):
    from samout_edge.bench import bandwidth as bw

    ticks = iter([0.0, 1.0] * 10)  # every timed copy "takes" one second
    monkeypatch.setattr(bw.time, "perf_counter", lambda: next(ticks))
    got = bw.measure_bandwidth(buffer_bytes=8 << 20, runs=2, threads=2)
    assert got.gb_per_s == round(2 * (8 << 20) / 1e9, 2) and got.buffer_bytes == 8 << 20
    assert bw.decode_step_bytes(1000, 100, 25, 7) == 750 + 14


def test_bench_op_times_the_linear_scan_within_its_tolerance():
    """--scan linear: our eager scan and every lowering against the float64 loop, at the scan's fp32 bound."""
    report = bench_op([1, 2, 300, 8], budget=Budget(1, 2, 2, 0.01), device="cpu", scan="linear")
    names = [r.name for r in report.rows]
    assert names[:2] == ["copy (cpu)", "torch blocked scan (cpu)"] and report.tolerance == 2e-6
    assert {"ort:cpu native/blocked", "ort:cpu native/doubling", "ort:cpu custom (function body)"} <= set(names)
    assert all(r.exact and 0 < r.error <= report.tolerance for r in report.rows[1:])
    with pytest.raises(SamoutError, match="--axis 2"):
        bench_op([1, 300, 8], axis=1, device="cpu", scan="linear")
    with pytest.raises(SamoutError, match="not one of: max, linear"):
        bench_op([1, 2, 300, 8], device="cpu", scan="sum")
