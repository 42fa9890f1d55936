"""What prompt scoring (echo + logprobs, lm-eval's loglikelihood) costs, and what it costs
plain generation, measured against `samout-edge serve` over loopback.

1. Plain generation, this tree against a baseline commit (``--baseline REF``: its src/
   from git, served beside this one): both servers run at once, their requests
   alternate round by round (8 concurrent greedy completions of --tokens tokens),
   tokens/s medians and the ratio. The issue's bound: at most 5% slower.
2. Scoring speed: prompt tokens per second of echo + logprobs + max_tokens 0 on a
   graph with every position's logits (``--logits all``: one call) and on one with
   the last position's only (a token per call, batched with the decode steps).

    python benchmarks/echo_cost.py --baseline b18f645 --markdown benchmarks/results/cpu-echo.md \
        --json benchmarks/results/cpu-echo.json
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from samout_edge.artifact.files import write_bytes_atomic, write_json_atomic
from samout_edge.serve.process import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
TRAINED = ROOT / "benchmarks" / "trained"


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def sh(*command: str, cwd: Path | None = None) -> None:
    subprocess.run(command, check=True, cwd=cwd, stdout=subprocess.DEVNULL)


def make_exports(work: Path) -> dict[str, Path]:
    """The trained SamOut at int4 (as `make demo` and docs/serving.md serve it) twice: every
    position's logits and the last one's."""
    calibration = work / "calibration.txt"
    if not calibration.exists():
        sh(sys.executable, str(ROOT / "benchmarks/train_set.py"), "--write-training-sample", str(calibration),
           "--max-bytes", "32768")
    exports = {}
    for logits in ("all", "last"):
        out = work / f"cummax-int4-{logits}"
        if not (out / "export.json").exists():
            sh(sys.executable, "-m", "samout_edge", "export", str(TRAINED / "cummax"), "--arch", "cummax", "--logits",
               logits, "--max-seq", "1024", "--vocab", "bytes", "--weights", "int4", "--calibration-text",
               str(calibration), "-o", str(out))
        exports[logits] = out
    return exports


def baseline_src(ref: str, work: Path) -> Path:
    """The baseline commit's src/, extracted from git (nothing of this checkout changes)."""
    target = work / f"baseline-{ref}"
    if not (target / "src").is_dir():
        target.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", ref, "src"], cwd=ROOT, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target / "src"


def serve(export: Path, src: Path | None, store: Path) -> ServerProcess:
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(src) if src else str(ROOT / "src")
    store.unlink(missing_ok=True)
    try:
        return ServerProcess(export, "--host", "127.0.0.1", "--max-batch", "32", "--store", str(store))
    finally:
        if previous is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = previous


def generation_round(url: str, tokens: int, clients: int) -> float:
    """Tokens per second of ``clients`` concurrent greedy completions."""
    body = {"prompt": "def main(argv):\n    ", "max_tokens": tokens, "temperature": 0}

    def one(_: int) -> int:
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        made = sum(pool.map(one, range(clients)))
    return made / (time.perf_counter() - t0)


def scoring_round(url: str, text: str, batch: int) -> float:
    """Prompt tokens scored per second: ``batch`` prompts in one lm-eval-style request."""
    body = {"prompt": [text] * batch, "echo": True, "logprobs": 1, "max_tokens": 0, "temperature": 0}
    t0 = time.perf_counter()
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=600)
    r.raise_for_status()
    seconds = time.perf_counter() - t0
    return r.json()["usage"]["prompt_tokens"] / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="b18f645", help="the commit plain generation is compared with")
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "echo-cost")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per plain completion")
    parser.add_argument("--clients", type=int, default=8, help="concurrent plain completions per round")
    parser.add_argument("--prompt-tokens", type=int, default=1024, help="tokens of each scored prompt")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    exports = make_exports(args.work)
    heldout = args.work / "heldout.txt"
    if not heldout.exists():
        sh(sys.executable, str(ROOT / "benchmarks/train_set.py"), "--write-heldout", str(heldout), "--max-bytes",
           "65536")
    text = heldout.read_bytes()[: args.prompt_tokens].decode("utf-8", errors="ignore")

    current = serve(exports["all"], None, args.work / "current.sqlite")
    try:
        base = serve(exports["all"], baseline_src(args.baseline, args.work), args.work / "baseline.sqlite")
    except BaseException:
        current.stop()  # never leave a server behind
        raise
    plain: dict[str, list[float]] = {"current": [], "baseline": []}
    try:
        for server in (current, base):
            generation_round(server.url, 8, 2)  # warm-up
        for r in range(args.rounds):
            order = [("current", current), ("baseline", base)] if r % 2 == 0 else [("baseline", base),
                                                                                   ("current", current)]
            for name, server in order:
                plain[name].append(generation_round(server.url, args.tokens, args.clients))
    finally:
        current.stop()
        base.stop()

    scoring: dict[str, list[float]] = {}
    for logits, export in exports.items():
        server = serve(export, None, args.work / f"scoring-{logits}.sqlite")
        try:
            scoring_round(server.url, text[:64], 1)  # warm-up
            scoring[logits] = [scoring_round(server.url, text, 4) for _ in range(3)]
        finally:
            server.stop()

    cur, bas = statistics.median(plain["current"]), statistics.median(plain["baseline"])
    result = {"machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version()},
              "baseline": args.baseline, "tokens": args.tokens, "clients": args.clients, "rounds": args.rounds,
              "plain_tokens_per_s": plain, "plain_median": {"current": cur, "baseline": bas, "ratio": cur / bas},
              "prompt_tokens": args.prompt_tokens,
              "scoring_prompt_tokens_per_s": {k: statistics.median(v) for k, v in scoring.items()},
              "scoring_rounds": scoring, "when": time.strftime("%Y-%m-%d")}
    lines = [
        "# Prompt scoring (echo + logprobs) and what it costs plain generation",
        "",
        f"`benchmarks/echo_cost.py`, one run, {result['when']}, {cpu_name()} ({os.cpu_count()} cores), the trained "
        "SamOut int4 (GPTQ, max_seq 1024, byte-level), `samout-edge serve` over loopback, ONNX Runtime CPU.",
        "",
        f"Plain generation: {args.clients} concurrent greedy completions of {args.tokens} tokens, this tree and "
        f"commit {args.baseline} served side by side, alternating, {args.rounds} rounds, median tokens/s:",
        "",
        "| | tokens/s (median) | rounds |",
        "|---|---|---|",
        f"| this tree | {cur:.1f} | {', '.join(f'{v:.0f}' for v in plain['current'])} |",
        f"| {args.baseline} | {bas:.1f} | {', '.join(f'{v:.0f}' for v in plain['baseline'])} |",
        f"| ratio | **{cur / bas:.3f}x** | |",
        "",
        f"Scoring: 4 prompts of {args.prompt_tokens} tokens in one request (echo, logprobs 1, max_tokens 0), "
        "median of 3, prompt tokens scored per second:",
        "",
        "| graph | prompt tokens/s |",
        "|---|---|",
        f"| `--logits all` (one call per prompt) | {result['scoring_prompt_tokens_per_s']['all']:.0f} |",
        f"| `--logits last` (a token per call) | {result['scoring_prompt_tokens_per_s']['last']:.0f} |",
        "",
    ]
    if args.json:
        write_json_atomic(args.json, result)
    if args.markdown:
        write_bytes_atomic(args.markdown, "\n".join(lines).encode())
    print("\n".join(lines))


if __name__ == "__main__":
    main()
