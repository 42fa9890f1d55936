"""Where a process that runs an export holds its memory (issue 29, part 4): the resident set,
stage by stage, of a fresh interpreter that imports numpy, ONNX Runtime and samout-edge's
runtime, loads the export as `generate` and `serve` do (ONNX Runtime's arena on), prefills N
tokens in calls of --ubatch and decodes 4 steps; each stage's growth split by mapping (a
library's pages, the heap, anonymous memory; /proc/self/smaps) with the peak (VmHWM) inside
it. Then how much of ONNX Runtime's resident library is in use: its pages evicted
(madvise MADV_PAGEOUT), the same prefill and decode again, what came back. Then the peak RSS of
the `samout-edge generate` process itself on the same prompt (the CLI's own imports and the load
included). Linux only.

    .venv/bin/python benchmarks/process_rss.py out/peers/exports/seed-cummax-int4-s1024 \\
        [--tokens 256] [--threads 1] [--ubatch 256] [--markdown M.md] [--json J.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

STEPS = 4  # decode steps after the prompt, as peers.py's memory child


def smaps() -> dict[str, int]:
    """Resident KiB per mapping name: a file's base name, [heap], [stack], or [anon]."""
    out: dict[str, int] = {}
    name = "[anon]"
    with open("/proc/self/smaps") as f:
        for line in f:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                parts = line.split()
                name = os.path.basename(parts[5]) if len(parts) > 5 else "[anon]"
                name = name if name else "[anon]"
            elif line.startswith("Rss:"):
                out[name] = out.get(name, 0) + int(line.split()[1])
    return out


def _status_kib(field: str) -> int:
    """bench/peak_memory.py's, mirrored: importing that module imports numpy before the numpy stage."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def library_in_use(name: str, rerun) -> dict | None:
    """KiB of the library ``name`` resident now, and resident again after its pages are evicted
    and ``rerun()`` ran: what the run needs of it (None where the kernel cannot evict, before
    Linux 5.4). Pages another process maps too are not evicted, so this errs high."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    ranges = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 5 and os.path.basename(parts[5]) == name:
                start, end = (int(x, 16) for x in parts[0].split("-"))
                ranges.append((start, end))
    resident = smaps().get(name, 0)
    madv_pageout = 21  # <asm-generic/mman-common.h>, Linux >= 5.4
    if not ranges or any(libc.madvise(start, end - start, madv_pageout) != 0 for start, end in ranges):
        return None
    rerun()
    return {"library": name, "resident_kib": resident, "in_use_kib": smaps().get(name, 0)}


def child(export: str, tokens: int, threads: int, ubatch: int, backend: str) -> None:
    """The stages, in this fresh interpreter; one JSON line on stdout."""
    stages = []
    before = smaps()

    def stage(name: str) -> None:
        nonlocal before
        now = smaps()
        growth = {k: now.get(k, 0) - before.get(k, 0) for k in set(now) | set(before)}
        stages.append({"stage": name, "rss_kib": sum(now.values()), "peak_kib": _status_kib("VmHWM"),
                       "growth_kib": {k: v for k, v in growth.items() if v}})
        before = now
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM back to the current RSS: the next stage's peak is its own

    stage("Python (and this script)")
    import numpy as np

    stage("numpy")
    if backend == "ort":
        import onnxruntime

        stage("ONNX Runtime (import)")
    from samout_edge.runtime.registry import backend_named, load_runner
    from samout_edge.runtime.target import check_ubatch

    stage("samout-edge runtime")
    if backend == "ort":
        options = backend_named("ort").options(provider="cpu", intra_op_threads=threads)
    else:  # the native backend: its kernels built (or taken from the cache) by the load
        options = backend_named(backend).options(intra_op_threads=threads)
    runner = load_runner(export, backend, options)
    runner.ubatch = check_ubatch(ubatch)
    vocab = runner.info.config.vocab_size
    ids = (np.arange(tokens + STEPS, dtype=np.int64) * 7919 % (vocab - 1) + 1)[None, :]  # no numpy.random
    stage("session (the export loaded)")
    _, state = runner.run(ids[:, :tokens], runner.initial_state(1))
    stage(f"prefill {tokens} tokens")
    for k in range(STEPS):
        _, state = runner.run(ids[:, tokens + k: tokens + k + 1], state)
    stage(f"decode {STEPS} steps")

    def rerun() -> None:
        _, again = runner.run(ids[:, :tokens], runner.initial_state(1))
        for k in range(STEPS):
            _, again = runner.run(ids[:, tokens + k: tokens + k + 1], again)

    library = None
    if backend == "ort":
        name = os.path.basename(onnxruntime.capi.onnxruntime_pybind11_state.__file__)  # all of ONNX Runtime
        library = library_in_use(name, rerun)
    print(json.dumps({"stages": stages, "vocab": vocab, "library": library}))


def cli_peak_kib(export: str, tokens: int, vocab: int, ubatch: int, backend: str) -> int:
    """The peak RSS of `samout-edge generate` on the same ids: its own VmHWM, read at exit. (Not
    wait4's ru_maxrss: Linux carries the spawning process's RSS across fork and exec into it.)"""
    ids = ",".join(str(i * 7919 % (vocab - 1) + 1) for i in range(tokens))
    code = ("import atexit, runpy, sys\n"
            "def hwm():\n"
            "    line = [x for x in open('/proc/self/status') if x.startswith('VmHWM:')][0]\n"
            "    sys.stderr.write('VmHWM_KIB=' + line.split()[1] + '\\n')\n"
            "atexit.register(hwm)\n"
            "sys.argv = ['samout-edge'] + sys.argv[1:]\n"
            "runpy.run_module('samout_edge', run_name='__main__')\n")
    cmd = [sys.executable, "-c", code, "generate", export, "--ids", ids, "--max-new-tokens", str(STEPS),
           "--ubatch", str(ubatch), "--backend", backend]
    out = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    found = [line for line in out.stderr.splitlines() if line.startswith("VmHWM_KIB=")]
    if out.returncode != 0 or not found:
        raise SystemExit(f"samout-edge generate failed: {out.stderr[-500:]}")
    return int(found[-1].split("=")[1])


def markdown(report: dict) -> str:
    mb = 1 / 1024
    lines = [
        f"# Where the process goes: {report['export']} ({report['machine']}, Linux {report.get('kernel', '?')})",
        "",
        f"A fresh interpreter, stage by stage; {report['tokens']} tokens prefilled in calls of {report['ubatch']}, "
        f"{STEPS} decode steps; {report['threads']} thread(s); "
        + ("ONNX Runtime's arena on (as `generate` and `serve`)." if report.get("backend", "ort") == "ort" else
           f"the {report['backend']} backend (no ONNX Runtime in the process)."),
        "",
        "| stage | RSS MB after | + MB | peak inside MB | where the growth is (MB) |",
        "|---|---:|---:|---:|---|",
    ]
    previous = 0
    for s in report["stages"]:
        top = sorted(s["growth_kib"].items(), key=lambda kv: -kv[1])[:4]
        where = ", ".join(f"{k} {v * mb:+.1f}" for k, v in top if abs(v) >= 200) or "-"
        lines.append(f"| {s['stage']} | {s['rss_kib'] * mb:.1f} | {(s['rss_kib'] - previous) * mb:+.1f} "
                     f"| {s['peak_kib'] * mb:.1f} | {where} |")
        previous = s["rss_kib"]
    lib = report.get("library")
    if lib:
        lines += ["", f"ONNX Runtime's library ({lib['library']}): {lib['resident_kib'] * mb:.1f} MB resident after the "
                      f"decode, {lib['in_use_kib'] * mb:.1f} MB of it in use (its pages evicted, the same prefill and "
                      "decode again, what came back); the rest was touched at import and load (operator schemas, "
                      "kernel registrations) and stays mapped, clean, until the kernel wants the memory."]
    lines += ["", f"`samout-edge generate` on the same prompt, the whole process (the CLI's imports and the load "
                  f"included): peak RSS **{report['cli_peak_kib'] * mb:.1f} MB**.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", type=Path)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ubatch", type=int, default=256)
    parser.add_argument("--backend", choices=("ort", "native"), default="ort")
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.child:
        child(str(a.export), a.tokens, a.threads, a.ubatch, a.backend)
        return
    if not (a.export / "export.json").is_file():
        raise SystemExit(f"{a.export} is not an export directory (no export.json)")
    if a.tokens < 1 or a.threads < 1 or a.ubatch < 0:
        raise SystemExit("--tokens and --threads must be at least 1, --ubatch at least 0")
    out = subprocess.run([sys.executable, __file__, str(a.export), "--child", "--tokens", str(a.tokens),
                          "--threads", str(a.threads), "--ubatch", str(a.ubatch), "--backend", a.backend],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"the measuring child failed: {out.stderr.strip().splitlines()[-1:]}")
    measured = json.loads(out.stdout.strip().splitlines()[-1])

    from samout_edge.bench.machine import describe
    from samout_edge.bench.report import save_results

    report = {"export": str(a.export), "backend": a.backend, "tokens": a.tokens, "threads": a.threads, "ubatch": a.ubatch,
              "machine": describe()["label"], "kernel": platform.release(), "stages": measured["stages"],
              "library": measured["library"],
              "cli_peak_kib": cli_peak_kib(str(a.export), a.tokens, measured["vocab"], a.ubatch, a.backend)}
    text = markdown(report)
    print(text)
    save_results(report, text, a.json, a.markdown)


if __name__ == "__main__":
    main()
