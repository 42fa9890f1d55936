"""benchmarks/peers.py's own logic, without llama.cpp: the llama of the same parameter count,
the statistics, the interleaving order and the tables it writes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def peers():
    spec = importlib.util.spec_from_file_location("peers_bench", ROOT / "benchmarks" / "peers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_importing_it_needs_neither_llama_cpp_nor_gguf(peers):
    assert "llama_cpp" not in sys.modules and "gguf" not in sys.modules


def test_the_llama_parameter_count_is_llamas(peers):
    s = peers.LlamaShape(vocab=128, hidden=32, heads=4, layers=2, n_ff=64)
    embedding, output = 128 * 32, 32 * 128
    per_layer = 4 * 32 * 32 + 3 * 32 * 64 + 2 * 32  # q k v o, gate up down, two RMSNorms
    assert s.parameter_count() == embedding + output + 2 * per_layer + 32  # + the final norm
    tied = peers.LlamaShape(vocab=128, hidden=32, heads=4, layers=2, n_ff=64, tied=True)
    assert s.parameter_count() - tied.parameter_count() == 128 * 32


def test_the_seed_preset_gets_the_issues_n_ff(peers):
    shape, ours = peers.shape_for_preset("seed")
    assert ours == 19_692_550  # ModelConfig.parameter_count: the weights SamOut has
    assert (shape.vocab, shape.hidden, shape.heads, shape.layers) == (10000, 512, 8, 6)
    assert shape.n_ff == 352 and shape.n_ff % peers.QUANT_BLOCK == 0  # issue 29's llama
    assert abs(shape.parameter_count() / ours - 1) < 0.01
    for other in (shape.n_ff - 32, shape.n_ff + 32):  # the closest multiple of 32
        far = peers.LlamaShape(10000, 512, 8, 6, other).parameter_count()
        assert abs(far - ours) > abs(shape.parameter_count() - ours)


def test_n_ff_rounds_to_the_nearest_block_and_refuses_too_few_parameters(peers):
    base = peers.LlamaShape(100, 64, 4, 2, 0).parameter_count()
    per_unit = 3 * 64 * 2  # parameters one more unit of n_ff adds
    assert peers.llama_shape(100, 64, 4, 2, base + 100 * per_unit).n_ff == 96  # 100 -> 96, not 128
    assert peers.llama_shape(100, 64, 4, 2, base + 120 * per_unit).n_ff == 128
    assert peers.llama_shape(100, 64, 4, 2, base + 8 * per_unit, multiple=16).n_ff == 16  # never 0
    with pytest.raises(ValueError, match="no room"):
        peers.llama_shape(100, 64, 4, 2, base)


def test_statistics_and_order_are_benchs(peers):
    samples = [5.0, 1.0, 3.0, 2.0, 10.0, 4.0]
    s = peers.summary(samples)
    assert s["median"] == pytest.approx(np.median(samples)) and s["p90"] == pytest.approx(np.percentile(samples, 90))
    assert s["n"] == 6 and peers.summary([])["median"] is None
    assert peers.interleaved_order(["a", "b", "c"], 0) == ["a", "b", "c"]
    assert peers.interleaved_order(["a", "b", "c"], 1) == ["c", "b", "a"]
    assert peers.parse_tokens("256, 1k,4K,16384") == [256, 1024, 4096, 16384]
    with pytest.raises(SystemExit):
        peers.parse_tokens("0")


def report(peers) -> dict:
    engines = [peers.Engine("ours", "cummax", f) for f in ("fp32", "int4", "int4-a8")]
    engines += [peers.Engine("llama.cpp", "llama", t, "/x.gguf") for t in ("F32", "Q4_0")]
    times = {  # (engine, mode, length) -> median ms
        ("cummax fp32", "decode", 256): 8.0, ("llama.cpp F32", "decode", 256): 4.0,
        ("cummax int4", "decode", 256): 3.0, ("llama.cpp Q4_0", "decode", 256): 2.0,
        ("cummax int4-a8", "decode", 256): 1.5,
        ("cummax fp32", "prefill", 256): 50.0, ("llama.cpp F32", "prefill", 256): 100.0,
        ("cummax int4", "prefill", 256): 60.0, ("llama.cpp Q4_0", "prefill", 256): 40.0,
    }
    timings = [{"engine": k, "threads": 1, "mode": mode, "length": n, "median_ms": v, "p90_ms": v * 1.1, "n": 5}
               for (k, mode, n), v in times.items()]
    timings.append({"engine": "cummax int4-a8", "threads": 1, "mode": "prefill", "length": 256, "median_ms": None,
                    "p90_ms": None, "n": 0, "error": "RuntimeError: boom"})
    memory = [{"engine": "cummax fp32", "length": 256, "rss_load_mb": 150.0, "prefill_peak_mb": 12.0,
               "decode_peak_mb": 1.0},
              {"engine": "llama.cpp F32", "length": 256, "rss_load_mb": 120.0, "prefill_peak_mb": 24.0,
               "decode_peak_mb": 20.0},
              {"engine": "cummax int4", "length": 256, "error": "killed"}]
    return {
        "machine": {"label": "2-core Test CPU", "memory_gib": 8, "onnxruntime": "1.0", "llama_cpp_python": "0.3.36",
                    "llama_cmake_args": "CMAKE_ARGS=...", "sharing": "Shared.", "load_start": 1.0, "load_end": 2.0},
        "config": {"preset": "seed", "threads": [1], "contexts": [256], "archs": ["cummax"], "max_seq": 300,
                   "n_batch": 512, "n_ubatch": 512, "flash_attn": ["auto"], "prefill_rounds": 5, "decode_steps": 20,
                   "warmup": 2, "seconds": 1.0, "min_rounds": 3, "memory_threads": 1},
        "command": "python benchmarks/peers.py", "elapsed_s": 10.0, "ours_parameters": 19_692_550,
        "llama_shape": peers.LlamaShape(10000, 512, 8, 6, 352).to_dict(),
        "engines": [{**e.__dict__, "key": e.key, "weights_mb": 10.0, "check": "verified"} for e in engines],
        "gguf_types": {"Q4_0": {"bytes": 2**20, "tensor_types": {"Q4_0": 43, "F32": 13, "Q6_K": 1}}},
        "timings": timings, "memory": memory, "notes": ["a note"],
    }


def test_ratio_rows_pair_our_forms_with_llamas_types(peers):
    rows = {r["ours"]: r for r in peers.ratio_rows(report(peers))}
    assert set(rows) == {"cummax fp32", "cummax int4", "cummax int4-a8"}  # no Q8_0 engine: int8 forms skipped
    assert rows["cummax fp32"]["llama"] == "llama.cpp F32" and rows["cummax int4"]["llama"] == "llama.cpp Q4_0"
    assert rows["cummax fp32"]["decode"]["ratio"] == pytest.approx(2.0)
    assert rows["cummax fp32"]["prefill"]["ratio"] == pytest.approx(0.5)
    assert rows["cummax int4-a8"]["decode"]["ratio"] == pytest.approx(0.75)
    assert rows["cummax int4-a8"]["prefill"]["ratio"] is None  # its prefill failed
    assert rows["cummax fp32"]["prefill_peak_mb"]["ratio"] == pytest.approx(0.5)
    assert rows["cummax int4"]["prefill_peak_mb"]["ours"] is None


def test_markdown_shows_every_cell_and_says_which_machine(peers):
    md = peers.markdown(report(peers))
    assert "2-core Test CPU" in md and "Shared." in md and "n_ff 352" in md and "+0.45%" in md
    assert "| 1 | 256 | cummax fp32 | llama.cpp F32 | 8.00 vs 4.00 | 2.00x | 50.0 vs 100 | 0.50x | 12.0 / 24.0 | 0.50x |" in md
    assert "| 1 | 256 | cummax int4-a8 | llama.cpp Q4_0 | 1.50 vs 2.00 | 0.75x | - vs 40.0 | - |" in md
    assert "| cummax int4-a8 | RuntimeError: boom |" in md  # a failed cell says why
    assert "| cummax fp32 | 10.0 | 150.0 | 12.0 | 1.0 |" in md
    assert "| cummax int4 | 10.0 | - | killed | - |" in md
    assert "| Q4_0 | 1.0 | F32 13, Q4_0 43, Q6_K 1 | - | - |" in md
    assert md.endswith("- a note\n")


def test_the_plot_is_written_where_matplotlib_is(peers, tmp_path):
    pytest.importorskip("matplotlib")
    assert peers.plot(report(peers), tmp_path / "p.png") and (tmp_path / "p.png").stat().st_size > 1000


def test_llama_buffers_read_where_llama_cpp_put_the_weights(peers):
    log = ("load_tensors:          CPU model buffer size =     6.78 MiB\n"
           "load_tensors:   CPU_REPACK model buffer size =     5.12 MiB\n"
           "repack: repack tensor blk.0.attn_q.weight with q4_0_8x8\n"
           ".repack: repack tensor blk.0.attn_k.weight with q4_0_8x8\n")
    assert peers.llama_buffers(log) == {"model_buffers_mib": {"CPU": 6.78, "CPU_REPACK": 5.12},
                                        "repacked": {"q4_0_8x8": 2}}


def test_our_exports_say_how_they_were_checked(peers):
    r = report(peers)
    r["engines"][2]["check"] = "verification failed: logits: median KL"
    md = peers.markdown(r)
    assert "| cummax fp32 | `--arch cummax (fp32)` | 10.0 | verified |" in md
    assert "| cummax int4-a8 | `--arch cummax --weights int4 --activations int8` | 10.0 | verification failed: logits: median KL |" in md


def test_the_headline_takes_llamas_better_setting_in_each_cell(peers):
    r = report(peers)
    off = peers.Engine("llama.cpp", "llama", "F32", "/x.gguf", "off")
    r["engines"].append({**off.__dict__, "key": off.key, "weights_mb": 10.0, "check": None})
    r["timings"] += [{"engine": off.key, "threads": 1, "mode": "decode", "length": 256, "median_ms": 2.0, "p90_ms": 2.0, "n": 5},
                     {"engine": off.key, "threads": 1, "mode": "prefill", "length": 256, "median_ms": 400.0, "p90_ms": 400.0, "n": 5}]
    r["memory"] += [{"engine": off.key, "length": 256, "prefill_peak_mb": 48.0, "peak_rss_mb": 170.0}]
    r["memory"][0]["peak_rss_mb"], r["memory"][1]["peak_rss_mb"] = 162.0, 144.0
    lines = peers.headline(r)
    assert "| 1 | decode ms/token, cummax fp32 / F32 | 8.00 / 2.00 (4.00x) |" in lines  # FA off decodes faster
    assert "| 1 | prefill ms, cummax fp32 / F32 | 50.0 / 100 (0.50x) |" in lines  # FA on prefills faster
    assert "| 1 | prefill peak MB above the model, cummax fp32 / F32 | 12.0 / 24.0 (0.50x) |" in lines
    assert "| 1 | process peak RSS MB, cummax fp32 / F32 | 162.0 / 144.0 (1.12x) |" in lines
    assert "| 1 | prefill ms, cummax int4-a8 / Q4_0 | - |" in lines  # its prefill failed: no ratio
    assert "## Headline" in peers.markdown(r)


def test_each_flash_attention_setting_is_its_own_peer(peers):
    r = report(peers)
    off = peers.Engine("llama.cpp", "llama", "Q4_0", "/x.gguf", "off")
    assert off.key == "llama.cpp Q4_0 FA off" and peers.Engine("llama.cpp", "llama", "Q4_0").key == "llama.cpp Q4_0"
    r["engines"].append({**off.__dict__, "key": off.key, "weights_mb": 10.0, "check": None})
    r["timings"].append({"engine": off.key, "threads": 1, "mode": "decode", "length": 256, "median_ms": 1.0,
                         "p90_ms": 1.0, "n": 5})
    rows = [x for x in peers.ratio_rows(r) if x["ours"] == "cummax int4"]
    assert [x["llama"] for x in rows] == ["llama.cpp Q4_0", "llama.cpp Q4_0 FA off"]
    assert rows[1]["decode"]["ratio"] == pytest.approx(3.0)


@pytest.mark.skipif(not sys.platform.startswith("linux") or __import__("platform").machine() != "x86_64",
                    reason="the filter names x86-64's arch_prctl")
def test_forbid_amx_refuses_only_the_tile_data_request():
    """In a child (the filter is for good): ARCH_REQ_XCOMP_PERM fails with EPERM, asking what is
    permitted (ARCH_GET_XCOMP_PERM) still works."""
    import subprocess

    code = f"""
import ctypes, importlib.util, sys
spec = importlib.util.spec_from_file_location("p", {str(ROOT / "benchmarks" / "peers.py")!r})
m = importlib.util.module_from_spec(spec); sys.modules["p"] = m; spec.loader.exec_module(m)
m.forbid_amx()
libc = ctypes.CDLL(None, use_errno=True)
bits = ctypes.c_ulong(0)
print(libc.syscall(158, 0x1023, 18), ctypes.get_errno(), libc.syscall(158, 0x1022, ctypes.byref(bits)))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["-1", "1", "0"]
