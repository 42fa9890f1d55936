"""Train SamOut, its softmax baseline and their hybrids, of identical size, on the Python standard library.

A trained set that anyone can reproduce offline: the corpus is the running
Python's own standard library (``*.py`` files, test directories left out), read
at run time and never copied into the repository; tokens are bytes (vocab 256),
so ``samout-edge generate --prompt`` prints readable text. Every arch gets the
same config, initial weights (one seed; a hybrid's blend starts at 0.5), batches
(one seeded generator), step count, optimizer and schedule.

The archs train in turns of --block steps, each turn in its own child process
that resumes from OUT/resume/<arch>.pt (model, optimizer, batch generator; not in
git): stop it any time, and a later run with the same --steps continues where it
stopped. After every turn the arch's checkpoint and train.json are rewritten, so
the set on disk is always at equal steps, with its training curve.

--archs trains only the named archs and adds them to the set already in --out:
the others' checkpoints are neither read for training nor rewritten, their
results in train.json stay as recorded, and the added run (its machine, its
wall time, an interleaved speed check of every arch on this machine) goes into
train.json's "added_runs". The added archs must match the set's recipe (config,
steps, batch, seq, seed, learning rate), so they see the same initial weights
and batches (checked: init_sha256, batches_sha256).

Files left in --out (default benchmarks/trained/):
  <arch>/             checkpoints (config.json + model.safetensors, fp16 weights), one per arch:
                      cummax, softmax, hybrid, hybrid-w64, softmax-w64, linear; export or run each
                      with its own --arch (hybrid-w64: --arch hybrid --softmax-window 64)
  vocab.json          {"kind": "utf-8 bytes"}: id b is byte b of the text's UTF-8 (export --vocab bytes)
  heldout.txt         the held-out files (relative to the stdlib directory)
  train.json          config, steps, curve, learned alpha, throughput, bits per byte
  train.log           this script's output

    .venv/bin/python benchmarks/train_set.py [--steps 1200] [--block 200] [--threads 1] [--out DIR]
    .venv/bin/python benchmarks/train_set.py --steps 1500 --block 300 --archs linear   # add one arch
    .venv/bin/python benchmarks/train_set.py --write-heldout FILE [--max-bytes N]
    .venv/bin/python benchmarks/train_set.py --write-training-sample FILE [--max-bytes N]
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import platform
import resource
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

ARCHS = ("cummax", "softmax", "hybrid", "hybrid-w64", "softmax-w64", "linear")
HIDDEN, HEADS, LAYERS, VOCAB = 256, 8, 4, 256
BATCH, SEQ = 16, 256
# On one idle AMD EPYC core (torch 2.13 CPU, fp32, batch 16 x 256 bytes) a step takes
# 0.53 s (cummax) to 0.69 s (hybrid): 1200 steps of the five archs take about 65 minutes.
# Every arch always does the same steps, so a busy machine makes the run longer, never shorter.
STEPS = 1200
BLOCK = 200
CURVE_BYTES = 64 << 10  # held-out bytes scored after every turn: the training curve
LR, MIN_LR_FRACTION, WARMUP_FRACTION, WEIGHT_DECAY, CLIP = 2e-3, 0.1, 0.05, 0.1, 1.0
HELDOUT_PERCENT = 5
EVAL_BYTES = 256 << 10
EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
DEFAULT_OUT = Path(__file__).resolve().parent / "trained"


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(root: Path) -> list[str]:
    """The stdlib's *.py files as sorted relative paths, without tests or per-build files,
    so the list is as close as can be on every CPython 3.10-3.13 install."""
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        dirs = rel.parts[:-1]
        if any(d in EXCLUDED_DIRS or d.startswith("config-") for d in dirs):
            continue  # tests, installed packages, the build's python-config
        if rel.name.startswith("_sysconfigdata"):
            continue  # differs per platform and build
        files.append(rel.as_posix())
    return sorted(files)


def is_heldout(rel: str) -> bool:
    """A fixed split: a hash of the relative path, so a file's side never depends on
    which other files this Python has."""
    return int(hashlib.sha256(rel.encode()).hexdigest(), 16) % 100 < HELDOUT_PERCENT


def read_concatenated(root: Path, files: list[str], max_bytes: int | None = None) -> bytes:
    """The files' bytes in the listed order; files missing on this Python are skipped."""
    parts, size = [], 0
    for rel in files:
        try:
            data = (root / rel).read_bytes()
        except OSError:
            continue
        parts.append(data)
        size += len(data)
        if max_bytes is not None and size >= max_bytes:
            break
    out = b"".join(parts)
    return out if max_bytes is None else out[:max_bytes]


def read_heldout_list(out: Path) -> list[str]:
    return [line for line in (out / "heldout.txt").read_text().splitlines() if line.strip()]


def write_heldout(target: Path, out: Path, max_bytes: int) -> int:
    """For evaluation elsewhere: the held-out text that heldout.txt names, written to ``target``."""
    data = read_concatenated(stdlib_dir(), read_heldout_list(out), max_bytes)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return len(data)


def write_training_sample(target: Path, out: Path, max_bytes: int) -> int:
    """Text the models trained on (none of it held out): what an fp16 export calibrates on, so
    its fp32 islands cover real activations without touching the evaluation text."""
    heldout = set(read_heldout_list(out))
    files = [f for f in corpus_files(stdlib_dir()) if f not in heldout and not is_heldout(f)]
    data = read_concatenated(stdlib_dir(), files, max_bytes)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return len(data)


def peak_rss_bytes() -> int:
    """This process's peak resident set: VmHWM on Linux, else getrusage's maxrss."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def cpu_seconds() -> tuple[float, float]:
    """(this process's CPU seconds, the whole machine's busy CPU seconds), to tell
    how much of the cores other work took while we trained."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    own = usage.ru_utime + usage.ru_stime
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle, iowait
    except (OSError, ValueError, IndexError):
        busy = float("nan")
    return own, busy


def lr_at(step: int, steps: int, peak: float) -> float:
    """Linear warm-up, then cosine decay to MIN_LR_FRACTION of the peak."""
    warmup = max(1, int(steps * WARMUP_FRACTION))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress)))


def bits_per_byte(model, data, seq: int, batch: int) -> float:
    """Mean next-byte cross-entropy in bits over non-overlapping windows of seq + 1 bytes."""
    import torch
    import torch.nn.functional as F

    n = (len(data) - 1) // seq
    windows = torch.stack([data[i * seq : i * seq + seq + 1] for i in range(n)]).long()
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, n, batch):
            ids = windows[start : start + batch]
            logits, _ = model(ids[:, :-1], last_only=False)
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1),
                                     reduction="sum").item()
            count += ids[:, 1:].numel()
    return total / count / math.log(2)


def shared_init_sha256(model) -> str:
    """The initial weights every arch shares (a hybrid's blend, its own, left out)."""
    return hashlib.sha256(b"".join(v.numpy().tobytes() for k, v in model.state_dict().items()
                                   if not k.endswith("alpha_logit"))).hexdigest()


def learned_alpha(model) -> list[float] | None:
    """A hybrid's blend per layer: the weight of cummax (1 - alpha goes to softmax)."""
    import torch

    logits = [layer.self_attention.alpha_logit for layer in model.decoder_layers
              if hasattr(layer.self_attention, "alpha_logit")]
    return [round(torch.sigmoid(x).item(), 4) for x in logits] or None


def train_turn(arch: str, steps: int, block: int, seed: int, out: Path, threads: int, lr: float) -> dict[str, Any]:
    """Train ``arch`` for one turn of ``block`` steps (at most up to ``steps``), resuming
    from its saved state; save the state, the fp16 checkpoint and a point of the curve."""
    import torch
    import torch.nn.functional as F

    from samout_edge.artifact.config import ModelConfig
    from samout_edge.models.checkpoint import load_checkpoint, save_checkpoint
    from samout_edge.models.model import SamOut

    torch.set_num_threads(threads)
    root = stdlib_dir()
    files = corpus_files(root)
    data = torch.frombuffer(bytearray(read_concatenated(root, [f for f in files if not is_heldout(f)])),
                            dtype=torch.uint8)
    heldout = torch.frombuffer(bytearray(read_concatenated(root, read_heldout_list(out), EVAL_BYTES)),
                               dtype=torch.uint8)

    config = ModelConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_heads=HEADS, num_layers=LAYERS)
    torch.manual_seed(seed)
    model = SamOut(config, arch)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and not n.startswith("em.")]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and not n.startswith("em."))]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
    batches = torch.Generator().manual_seed(seed)  # the same windows, in the same order, for every arch
    resume = out / "resume" / f"{arch}.pt"
    if resume.exists():
        saved = torch.load(resume, weights_only=False)  # our own file, written below
        if saved["steps"] != steps or saved["seed"] != seed:
            sys.exit(f"{resume} is a run of {saved['steps']} steps, seed {saved['seed']}: remove it to start over")
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        batches.set_state(saved["batches"])
        record = saved["record"]
    else:
        record = {"step": 0, "losses": [], "seconds": 0.0, "cpu_seconds": 0.0, "other_cpu_seconds": 0.0,
                  "init_sha256": shared_init_sha256(model), "batches_sha256": hashlib.sha256().hexdigest(),
                  "curve": []}
    chain = bytes.fromhex(record["batches_sha256"])  # sha256 over every batch so far, chained step by step
    offsets_span = torch.arange(SEQ + 1)
    first, last = record["step"], min(steps, record["step"] + block)
    print(f"[{arch}] steps {first + 1}-{last} of {steps} ({config.parameter_count():,} parameters, "
          f"{threads} threads, load {os.getloadavg()[0]:.2f})", flush=True)
    model.train()
    own0, busy0 = cpu_seconds()
    t0 = time.perf_counter()
    for step in range(first, last):
        starts = torch.randint(0, len(data) - SEQ - 1, (BATCH,), generator=batches)
        chain = hashlib.sha256(chain + starts.numpy().tobytes()).digest()
        ids = data[starts[:, None] + offsets_span].long()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        logits, _ = model(ids[:, :-1], last_only=False)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        record["losses"].append(round(loss.item(), 4))
        if step % 50 == 0 or step == last - 1:
            print(f"[{arch}] step {step + 1:5d}/{steps}  loss {loss.item():.3f}  lr {lr_at(step, steps, lr):.2e}",
                  flush=True)
    own1, busy1 = cpu_seconds()
    record["seconds"] += time.perf_counter() - t0
    record["cpu_seconds"] += own1 - own0
    record["other_cpu_seconds"] += max(0.0, (busy1 - busy0) - (own1 - own0))
    record["step"] = last
    record["batches_sha256"] = chain.hex()
    resume.parent.mkdir(parents=True, exist_ok=True)
    tmp = resume.with_suffix(".tmp")

    # Ship fp16 weights (half the size; the loader reads them back as fp32) and
    # measure the checkpoint as shipped, so train.json describes the files.
    target = out / arch
    save_checkpoint(copy.deepcopy(model).half(), target)  # the fp32 model trains on next turn
    shipped = load_checkpoint(target).model(arch)
    final = last == steps
    bpb = bits_per_byte(shipped, heldout if final else heldout[:CURVE_BYTES], SEQ, BATCH)
    if last > first:
        record["curve"].append({"step": last, "train_loss_mean": round(sum(record["losses"][first:last]) / (last - first), 4),
                                "heldout_bits_per_byte": round(bpb, 4),
                                "heldout_bytes": len(heldout) if final else CURVE_BYTES, "alpha": learned_alpha(shipped)})
        torch.save({"steps": steps, "seed": seed, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "batches": batches.get_state(), "record": record}, tmp)  # with this curve point
        os.replace(tmp, resume)  # the turn counts once the checkpoint it describes is on disk
    tail = record["losses"][-max(1, last // 20):]
    result = {
        "steps_done": last,
        "tokens_seen": last * BATCH * SEQ,
        "train_seconds": round(record["seconds"], 1),
        "tokens_per_s": round(last * BATCH * SEQ / record["seconds"], 1),
        "cpu_seconds": round(record["cpu_seconds"], 1),
        "other_processes_cpu_seconds": round(record["other_cpu_seconds"], 1),
        "peak_rss_mib_last_turn": round(peak_rss_bytes() / 2**20, 1),
        "first_loss": record["losses"][0],
        "final_loss_mean_last_5pct": round(sum(tail) / len(tail), 4),
        "heldout_bits_per_byte": round(bpb, 4) if final else None,
        "heldout_eval_bytes": len(heldout),
        "alpha": learned_alpha(shipped),
        "curve": record["curve"],
        "init_sha256": record["init_sha256"],
        "batches_sha256": record["batches_sha256"],
        "checkpoint_bytes": (target / "model.safetensors").stat().st_size,
    }
    print(f"[{arch}] {last}/{steps} steps: held-out {bpb:.3f} bits/byte"
          + (f", alpha {result['alpha']}" if result["alpha"] else ""), flush=True)
    return result


def interleaved_throughput(out: Path, threads: int, rounds: int, steps_per_round: int,
                           archs: tuple[str, ...] = ARCHS) -> dict[str, Any]:
    """Training-step speed of the shipped models, measured alternately in one process.

    Others share this machine, so a long run's tokens/s depends on what else ran
    meanwhile; short alternating blocks see the same load, and the median and best
    step times compare the archs fairly."""
    import statistics

    import torch
    import torch.nn.functional as F

    from samout_edge.models.checkpoint import load_checkpoint

    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (BATCH, SEQ + 1), generator=generator)
    models, optimizers = {}, {}
    for arch in archs:
        models[arch] = load_checkpoint(out / arch).model(arch).train()  # the same weights' own arch
        optimizers[arch] = torch.optim.AdamW(models[arch].parameters(), lr=1e-5)

    def step(arch: str) -> float:
        t = time.perf_counter()
        logits, _ = models[arch](ids[:, :-1], last_only=False)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        optimizers[arch].zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(models[arch].parameters(), CLIP)
        optimizers[arch].step()
        return time.perf_counter() - t

    for arch in archs:
        step(arch)  # warm-up: allocates the optimizer state
    times: dict[str, list[float]] = {arch: [] for arch in archs}
    for r in range(rounds):
        for arch in archs if r % 2 == 0 else archs[::-1]:
            times[arch] += [step(arch) for _ in range(steps_per_round)]
    tokens = BATCH * SEQ
    return {arch: {"steps": len(t), "median_s_per_step": round(statistics.median(t), 4),
                   "tokens_per_s_median": round(tokens / statistics.median(t), 1),
                   "tokens_per_s_best": round(tokens / min(t), 1)} for arch, t in times.items()}


def run_child(arch: str, args: argparse.Namespace, log) -> dict[str, Any]:
    """One turn of ``arch`` in a fresh process, echoing its output to stdout and the log."""
    cmd = [sys.executable, "-u", str(Path(__file__).resolve()), "--only", arch, "--steps", str(args.steps),
           "--block", str(args.block), "--seed", str(args.seed), "--lr", str(args.lr), "--out", str(args.out),
           "--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    result = None
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
            continue
        print(line, end="", flush=True)
        log.write(line)
        log.flush()
    if proc.wait() != 0 or result is None:
        sys.exit(f"training {arch} failed (exit {proc.returncode})")
    return result


def write_report(args: argparse.Namespace, results: dict[str, Any], speed: dict[str, Any] | None,
                 started: float) -> dict[str, Any]:
    from samout_edge.artifact.config import ModelConfig
    from samout_edge.bench.machine import describe

    root = stdlib_dir()
    files = corpus_files(root)
    heldout = [f for f in files if is_heldout(f)]
    config = ModelConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_heads=HEADS, num_layers=LAYERS)
    done = {r["steps_done"] for r in results.values()}
    report = {
        "config": config.to_dict(),
        "parameters": config.parameter_count(),
        "parameters_hybrid": config.parameter_count() + LAYERS,
        "steps": args.steps,
        "steps_done": min(done) if done else 0,
        "batch": BATCH,
        "seq": SEQ,
        "tokens_seen": (min(done) if done else 0) * BATCH * SEQ,
        "seed": args.seed,
        "same_initial_weights": len({r["init_sha256"] for r in results.values()}) == 1,
        "same_batches": len({r["batches_sha256"] for r in results.values()}) == 1,
        "optimizer": {"name": "AdamW", "lr": args.lr, "betas": [0.9, 0.95], "weight_decay": WEIGHT_DECAY,
                      "schedule": f"linear warm-up {WARMUP_FRACTION:.0%}, cosine to {MIN_LR_FRACTION:.0%} "
                                  f"over {args.steps} steps", "grad_clip": CLIP},
        "corpus": {"source": "the running Python's standard library, *.py, no test directories",
                   "python": platform.python_version(), "files": len(files), "heldout_files": len(heldout),
                   "train_bytes": sum((root / f).stat().st_size for f in files if not is_heldout(f)),
                   "heldout_bytes": sum((root / f).stat().st_size for f in heldout),
                   "heldout_rule": f"sha256(relative path) % 100 < {HELDOUT_PERCENT}"},
        "eval": f"held-out bits per byte: first {EVAL_BYTES // 1024} KiB of the held-out files (the curve: "
                f"first {CURVE_BYTES // 1024} KiB), non-overlapping windows of {SEQ} + 1 bytes, fp16 checkpoint "
                "read back as fp32",
        "checkpoint_dtype": "fp16",
        "machine": {**describe("cpu"), "threads": args.threads},
        "measurement": f"archs trained in turns of {args.block} steps, each turn in its own process; the "
                       "machine is shared, so other work may have run meanwhile: see each arch's "
                       "other_processes_cpu_seconds, and interleaved_throughput",
        "interleaved_throughput": speed and {
            "rounds": args.rounds, "steps_per_round": 3,
            "what": "training steps of the shipped models, alternating arch every 3 steps in one process, "
                    "after training; fairer than the runs' own tokens/s when others load the machine",
            "archs": speed},
        "wall_seconds_this_run": round(time.time() - started, 1),
        "archs": results,
    }
    tmp = args.out / "train.json.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, args.out / "train.json")
    return report


def add_archs(args: argparse.Namespace) -> None:
    """Train ``args.archs`` alike and add them to the set in ``args.out``, leaving the others'
    checkpoints and recorded results as they are."""
    import torch

    from samout_edge.bench.machine import describe

    unknown = [a for a in args.archs if a not in ARCHS]
    if unknown:
        sys.exit(f"unknown archs {unknown}: choose from {', '.join(ARCHS)}")
    existing = json.loads((args.out / "train.json").read_text())
    config = {"vocab_size": VOCAB, "hidden_size": HIDDEN, "num_heads": HEADS, "num_layers": LAYERS}
    recipe = {"config": config, "steps": args.steps, "batch": BATCH, "seq": SEQ, "seed": args.seed}
    differs = {k: (existing.get(k), v) for k, v in recipe.items() if existing.get(k) != v}
    if existing["optimizer"]["lr"] != args.lr:
        differs["lr"] = (existing["optimizer"]["lr"], args.lr)
    if differs:
        sys.exit(f"{args.out / 'train.json'} was trained otherwise (recorded, asked): {differs}")
    kept = [a for a in existing["archs"] if a not in args.archs]
    started, start_date = time.time(), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    results: dict[str, Any] = {}
    with open(args.out / "train.log", "a") as log:
        header = (f"\nadding {', '.join(args.archs)} to the set ({', '.join(kept)} kept as recorded), {start_date}\n"
                  f"python {platform.python_version()} torch {torch.__version__}, {describe('cpu')['label']}, "
                  f"{args.threads} threads, {args.steps} steps in turns of {args.block}, batch {BATCH}, seq {SEQ}, "
                  f"seed {args.seed}, load average {os.getloadavg()[0]:.2f}\n")
        print(header, end="", flush=True)
        log.write(header)
        while not results or any(r["steps_done"] < args.steps for r in results.values()):
            for arch in args.archs:
                results[arch] = run_child(arch, args, log)
            existing["archs"] = {**existing["archs"], **results}
            write_json(args.out / "train.json", existing)  # every turn, as the whole set's run does
        everyone = tuple(a for a in ARCHS if a in existing["archs"])
        speed = interleaved_throughput(args.out, args.threads, args.rounds, 3, everyone)
        lines = f"interleaved training steps on this machine ({args.rounds} rounds of 3 steps per arch):\n"
        lines += "".join(f"  {a}: median {s['tokens_per_s_median']:.0f} tokens/s, best {s['tokens_per_s_best']:.0f}\n"
                         for a, s in speed.items())
        lines += "".join(f"{a}: held-out {r['heldout_bits_per_byte']:.3f} bits/byte\n" for a, r in results.items())
        print(lines, end="", flush=True)
        log.write(lines)
    inits = {r["init_sha256"] for r in existing["archs"].values()}
    batches = {r["batches_sha256"] for r in existing["archs"].values()}
    existing["same_initial_weights"], existing["same_batches"] = len(inits) == 1, len(batches) == 1
    existing.setdefault("added_runs", []).append({
        "archs": list(args.archs),
        "started": start_date,
        "machine": {**describe("cpu"), "threads": args.threads},
        "measurement": f"trained in turns of {args.block} steps, each turn in its own process, after the "
                       "set's first run and on another machine: compare its tokens/s with the others' through "
                       "this run's interleaved_throughput, not through their recorded runs",
        "interleaved_throughput": {
            "rounds": args.rounds, "steps_per_round": 3,
            "what": "training steps of every shipped model, alternating arch every 3 steps in one process, "
                    "after this run, on this run's machine",
            "archs": speed},
        "wall_seconds": round(time.time() - started, 1),
    })
    write_json(args.out / "train.json", existing)
    if not (existing["same_initial_weights"] and existing["same_batches"]):
        sys.exit("the added archs did not start from the set's weights or see its batches")


def write_json(path: Path, report: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=STEPS, help=f"steps per arch (default {STEPS})")
    parser.add_argument("--block", type=int, default=BLOCK, help=f"steps per turn (default {BLOCK})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=LR, help=f"peak learning rate (default {LR})")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--rounds", type=int, default=6, help="rounds of the interleaved speed check (default 6)")
    parser.add_argument("--write-heldout", type=Path, metavar="FILE",
                        help="write the held-out files named in OUT/heldout.txt to FILE and exit")
    parser.add_argument("--write-training-sample", type=Path, metavar="FILE",
                        help="write the start of the training text (for fp16 calibration) to FILE and exit")
    parser.add_argument("--max-bytes", type=int, default=1 << 20,
                        help="with --write-heldout or --write-training-sample (default 1 MiB)")
    parser.add_argument("--archs", type=lambda s: tuple(s.split(",")), metavar="A,B",
                        help="train only these archs and add them to the set in --out (its train.json kept)")
    parser.add_argument("--only", choices=ARCHS, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()

    if args.write_heldout:
        size = write_heldout(args.write_heldout, args.out, args.max_bytes)
        print(f"wrote {size:,} held-out bytes to {args.write_heldout}")
        return
    if args.write_training_sample:
        size = write_training_sample(args.write_training_sample, args.out, args.max_bytes)
        print(f"wrote {size:,} bytes of training text to {args.write_training_sample}")
        return
    if args.only:
        result = train_turn(args.only, args.steps, args.block, args.seed, args.out, args.threads, args.lr)
        print("RESULT " + json.dumps(result), flush=True)
        return
    if args.archs:
        add_archs(args)
        return

    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    root = stdlib_dir()
    files = corpus_files(root)
    heldout = [f for f in files if is_heldout(f)]
    (args.out / "heldout.txt").write_text("".join(f + "\n" for f in heldout))
    (args.out / "vocab.json").write_text(json.dumps({"kind": "utf-8 bytes"}) + "\n")  # samout-edge's byte vocab
    started = time.time()
    results: dict[str, Any] = {}
    with open(args.out / "train.log", "a") as log:
        header = (f"python {platform.python_version()} stdlib {root}: {len(files)} files, {len(heldout)} held out\n"
                  f"torch {torch.__version__}, {args.threads} threads, {args.steps} steps in turns of {args.block}, "
                  f"batch {BATCH}, seq {SEQ}, seed {args.seed}, load average {os.getloadavg()[0]:.2f}\n")
        print(header, end="", flush=True)
        log.write(header)
        while not results or any(r["steps_done"] < args.steps for r in results.values()):
            for arch in ARCHS:  # in turns, so the set on disk is always at equal steps
                results[arch] = run_child(arch, args, log)
            write_report(args, results, None, started)
        speed = interleaved_throughput(args.out, args.threads, args.rounds, 3)
        lines = f"interleaved training steps ({args.rounds} rounds of 3 steps per arch):\n"
        lines += "".join(f"  {a}: median {s['tokens_per_s_median']:.0f} tokens/s, best {s['tokens_per_s_best']:.0f}\n"
                         for a, s in speed.items())
        print(lines, end="", flush=True)
        log.write(lines)
    report = write_report(args, results, speed, started)
    summary = "".join(f"{a}: held-out {r['heldout_bits_per_byte']:.3f} bits/byte"
                      + (f", alpha {r['alpha']}" if r["alpha"] else "") + "\n" for a, r in results.items())
    print(summary, end="")
    with open(args.out / "train.log", "a") as log:
        log.write(summary)
    if not (report["same_initial_weights"] and report["same_batches"]):
        sys.exit("the archs did not start from the same weights or see the same batches")


if __name__ == "__main__":
    main()
