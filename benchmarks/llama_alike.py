"""A llama trained alike, for llama.cpp's quantizers: what Q4_0 and Q8_0 cost a model trained as
our set was, next to what our int4 and int8 cost SamOut (issue 29, part 2: quality beside speed).

`train` trains a llama on benchmarks/trained/'s recipe (train.json: the same corpus, byte
vocabulary, width, heads, layers, steps, batches, optimizer and schedule; checked: the batches'
sha256 is the set's), its feed-forward width chosen as peers.py chooses it (the parameter
count nearest ours with n_ff a multiple of 32, Q4_0's block). RoPE rotates adjacent pairs,
as llama.cpp's llama does, so the weights go into a GGUF as they are. Files in
benchmarks/trained/llama/: model.safetensors (fp16, as the set's), train.json.

`score` writes that llama as an F32 GGUF, quantizes it with llama.cpp's own quantizer (in the
peers venv, built by peers.py), and scores every model on the same held-out windows (the
set's held-out files, windows of 256 + 1 bytes, each from an empty context): the llama in
PyTorch fp32, llama.cpp F32 (the conversion's check: its KL from PyTorch is ~0), Q8_0, Q4_0;
SamOut (cummax, and linear: the set's arch nearest the llama) in PyTorch fp32 and its exports
fp32, int8, int4, int4 + int8 compute, int4 by GPTQ (calibrated on 64 KiB of the training text,
never the held-out) through ONNX Runtime. Each: bits per byte, the cost against its own PyTorch fp32 on the
same bytes, mean KL(PyTorch fp32 || model) per byte in nats, top-1 agreement, weight bytes.

    .venv/bin/python benchmarks/llama_alike.py train [--threads 2]
    .venv/bin/python benchmarks/llama_alike.py score [--bytes 65536] [--venv .venv-peers] [--work out/llama-alike] \\
        [--markdown M.md] [--json J.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # train_set and peers, beside this script
TRAINED = HERE / "trained"
WINDOW = 256  # scored bytes per window (train_set.SEQ)
ROPE_BASE, RMS_EPS = 10000.0, 1e-5  # peers.write_gguf's


def rope(x, positions):
    """llama.cpp's llama RoPE (GGML_ROPE_TYPE_NORM): pair (2i, 2i + 1) turned by pos * base^(-2i/d)."""
    import torch

    d = x.shape[-1]
    freqs = ROPE_BASE ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)
    angle = positions[:, None].float() * freqs[None, :]  # [seq, d/2]
    cos, sin = angle.cos(), angle.sin()
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)


def llama_classes():
    """The torch llama, built on demand: the peers venv (scoring's worker) has no torch."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class RMSNorm(nn.Module):
        def __init__(self, dim: int):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(dim))

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + RMS_EPS) * self.weight

    class Block(nn.Module):
        def __init__(self, hidden: int, heads: int, n_ff: int):
            super().__init__()
            self.heads = heads
            self.attn_norm, self.ffn_norm = RMSNorm(hidden), RMSNorm(hidden)
            self.q, self.k, self.v, self.o = (nn.Linear(hidden, hidden, bias=False) for _ in range(4))
            self.gate, self.up = nn.Linear(hidden, n_ff, bias=False), nn.Linear(hidden, n_ff, bias=False)
            self.down = nn.Linear(n_ff, hidden, bias=False)

        def forward(self, x, positions):
            b, s, h = x.shape
            y = self.attn_norm(x)
            q, k, v = (p(y).view(b, s, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
            q, k = rope(q, positions), rope(k, positions)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.o(a.transpose(1, 2).reshape(b, s, h))
            y = self.ffn_norm(x)
            return x + self.down(F.silu(self.gate(y)) * self.up(y))

    class Llama(nn.Module):
        """forward(ids, last_only) -> (logits, None), as SamOut's, so train_set's scoring reads it."""

        def __init__(self, vocab: int, hidden: int, heads: int, layers: int, n_ff: int):
            super().__init__()
            self.em = nn.Embedding(vocab, hidden)  # "em.": the set keeps weight decay off the embedding
            self.blocks = nn.ModuleList(Block(hidden, heads, n_ff) for _ in range(layers))
            self.norm = RMSNorm(hidden)
            self.head = nn.Linear(hidden, vocab, bias=False)

        def forward(self, ids, past=None, last_only: bool = False):
            x = self.em(ids)
            positions = torch.arange(ids.shape[1])
            for block in self.blocks:
                x = block(x, positions)
            if last_only:
                x = x[:, -1:]
            return self.head(self.norm(x)), None

        def gguf_tensors(self) -> dict:
            """GGUF tensor name -> fp32 numpy array ([out, in], as peers.write_gguf takes them)."""
            t = {"token_embd.weight": self.em.weight, "output_norm.weight": self.norm.weight,
                 "output.weight": self.head.weight}
            for i, blk in enumerate(self.blocks):
                t.update({f"blk.{i}.attn_norm.weight": blk.attn_norm.weight, f"blk.{i}.attn_q.weight": blk.q.weight,
                          f"blk.{i}.attn_k.weight": blk.k.weight, f"blk.{i}.attn_v.weight": blk.v.weight,
                          f"blk.{i}.attn_output.weight": blk.o.weight, f"blk.{i}.ffn_norm.weight": blk.ffn_norm.weight,
                          f"blk.{i}.ffn_gate.weight": blk.gate.weight, f"blk.{i}.ffn_up.weight": blk.up.weight,
                          f"blk.{i}.ffn_down.weight": blk.down.weight})
            return {k: v.detach().float().numpy() for k, v in t.items()}

    return Llama


def set_recipe() -> dict:
    """benchmarks/trained/train.json: what the set was trained with."""
    t = json.loads((TRAINED / "train.json").read_text())
    c = t["config"]
    return {"vocab": c["vocab_size"], "hidden": c["hidden_size"], "heads": c["num_heads"], "layers": c["num_layers"],
            "steps": t["steps"], "batch": t["batch"], "seq": t["seq"], "seed": t["seed"], "lr": t["optimizer"]["lr"],
            "parameters": t["parameters"], "batches_sha256": t["archs"]["cummax"]["batches_sha256"],
            "cummax_heldout_bits_per_byte": t["archs"]["cummax"]["heldout_bits_per_byte"]}


def llama_shape_alike(recipe: dict):
    from peers import llama_shape

    return llama_shape(recipe["vocab"], recipe["hidden"], recipe["heads"], recipe["layers"], recipe["parameters"])


def train(threads: int, out: Path) -> None:
    """The set's training loop (train_set.train_turn), for the llama, in one go."""
    import hashlib

    import torch
    import torch.nn.functional as F
    import train_set as ts
    from safetensors.torch import save_file

    recipe = set_recipe()
    shape = llama_shape_alike(recipe)
    torch.set_num_threads(threads)
    root = ts.stdlib_dir()
    files = ts.corpus_files(root)
    data = torch.frombuffer(bytearray(ts.read_concatenated(root, [f for f in files if not ts.is_heldout(f)])),
                            dtype=torch.uint8)
    heldout = torch.frombuffer(bytearray(ts.read_concatenated(root, ts.read_heldout_list(TRAINED), ts.EVAL_BYTES)),
                               dtype=torch.uint8)
    torch.manual_seed(recipe["seed"])
    model = llama_classes()(shape.vocab, shape.hidden, shape.heads, shape.layers, shape.n_ff)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and not n.startswith("em.")]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and not n.startswith("em."))]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": ts.WEIGHT_DECAY},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=recipe["lr"], betas=(0.9, 0.95))
    batches = torch.Generator().manual_seed(recipe["seed"])
    chain = hashlib.sha256().digest()
    steps, seq, batch = recipe["steps"], recipe["seq"], recipe["batch"]
    span = torch.arange(seq + 1)
    params = sum(p.numel() for p in model.parameters())
    print(f"[llama] {steps} steps, n_ff {shape.n_ff}, {params:,} parameters (SamOut's {recipe['parameters']:,}), "
          f"{threads} threads", flush=True)
    losses, t0 = [], time.perf_counter()
    model.train()
    for step in range(steps):
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=batches)
        chain = hashlib.sha256(chain + starts.numpy().tobytes()).digest()
        ids = data[starts[:, None] + span].long()
        for group in optimizer.param_groups:
            group["lr"] = ts.lr_at(step, steps, recipe["lr"])
        logits, _ = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, shape.vocab), ids[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), ts.CLIP)
        optimizer.step()
        losses.append(round(loss.item(), 4))
        if step % 100 == 0 or step == steps - 1:
            print(f"[llama] step {step + 1:5d}/{steps}  loss {loss.item():.3f}", flush=True)
    seconds = time.perf_counter() - t0
    if chain.hex() != recipe["batches_sha256"]:
        raise SystemExit("the batches differ from the set's (train.json batches_sha256): not trained alike")
    model = model.half().float()  # the set ships fp16 weights and measures them as shipped
    model.eval()
    bpb = ts.bits_per_byte(model, heldout, seq, batch)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "model.safetensors.tmp"
    save_file({k: v.half().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, out / "model.safetensors")
    tail = losses[-max(1, steps // 20):]
    record = {"shape": shape.to_dict(), "recipe": recipe, "threads": threads, "train_seconds": round(seconds, 1),
              "first_loss": losses[0], "final_loss_mean_last_5pct": round(sum(tail) / len(tail), 4),
              "heldout_bits_per_byte": round(bpb, 4), "heldout_eval_bytes": len(heldout),
              "batches_sha256": chain.hex(), "machine": machine_label()}
    (out / "train.json.tmp").write_text(json.dumps(record, indent=1) + "\n")
    os.replace(out / "train.json.tmp", out / "train.json")
    print(f"[llama] held-out {bpb:.4f} bits/byte (cummax: {recipe['cummax_heldout_bits_per_byte']}); "
          f"{seconds:.0f} s; wrote {out}", flush=True)


def machine_label() -> str:
    from samout_edge.bench.machine import describe

    return describe()["label"]


def load_llama(directory: Path):
    from safetensors.torch import load_file

    record = json.loads((directory / "train.json").read_text())
    s = record["shape"]
    model = llama_classes()(s["vocab"], s["hidden"], s["heads"], s["layers"], s["n_ff"])
    model.load_state_dict({k: v.float() for k, v in load_file(str(directory / "model.safetensors")).items()})
    return model.eval(), record


def heldout_windows(n_bytes: int):
    """Non-overlapping windows of WINDOW + 1 bytes of the set's held-out files: [n, WINDOW + 1] int64."""
    import numpy as np
    import train_set as ts

    data = ts.read_concatenated(ts.stdlib_dir(), ts.read_heldout_list(TRAINED), n_bytes)
    n = (len(data) - 1) // WINDOW
    return np.stack([np.frombuffer(data[i * WINDOW: i * WINDOW + WINDOW + 1], np.uint8) for i in range(n)]).astype(np.int64)


def log_softmax(logits):
    import numpy as np

    x = logits.astype(np.float64)
    x -= x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def scores(logp, reference, targets) -> dict:
    """bits per byte, mean KL(reference || model) in nats and top-1 agreement, per scored byte."""
    import numpy as np

    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    kl = (np.exp(reference) * (reference - logp)).sum(-1)
    return {"bits_per_byte": float(nll.mean() / math.log(2)), "kl": float(kl.mean()),
            "top1_agreement": float((logp.argmax(-1) == reference.argmax(-1)).mean())}


# --------------------------------------------------------------------------- the llama.cpp worker (peers venv)


def llama_worker(spec: dict) -> None:
    """In the peers venv: quantize the F32 GGUF, then every GGUF's logits on the windows (.npy)."""
    import numpy as np
    import peers

    peers.forbid_amx()  # as peers.py: ggml's AMX kernels crash on this VM
    import llama_cpp as L

    windows = np.load(spec["windows"])
    f32 = Path(spec["f32"])
    with np.load(spec["tensors"]) as npz:
        weights = {k: npz[k] for k in npz.files}
    peers.write_gguf(f32.with_suffix(".tmp"), peers.LlamaShape(**spec["shape"]), weights=weights,
                     name="samout-edge llama trained alike")
    os.replace(f32.with_suffix(".tmp"), f32)
    out = {}
    for name in spec["types"]:
        path = Path(spec["f32"]).with_name(f"llama-alike-{name}.gguf")
        if name != "F32":  # quantized again every run: the F32 above is this run's weights (a second or two)
            peers.quantize_gguf(Path(spec["f32"]), path.with_suffix(".tmp"), peers.LLAMA_TYPES[name], spec["threads"])
            os.replace(path.with_suffix(".tmp"), path)
        engine = peers.LlamaEngine(str(path if name != "F32" else spec["f32"]), spec["threads"], WINDOW, WINDOW, "auto")
        engine._context(WINDOW)
        vocab = engine.vocab
        batch = L.llama_batch_init(WINDOW, 0, 1)
        batch.n_tokens = WINDOW
        logits = np.empty((len(windows), WINDOW, vocab), np.float32)
        for w, ids in enumerate(windows):
            L.llama_memory_clear(engine.memory, True)
            for i in range(WINDOW):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.seq_id[i][0] = int(ids[i]), i, 1, 0
                batch.logits[i] = 1
            if L.llama_decode(engine.ctx, batch) != 0:
                raise RuntimeError(f"llama_decode failed on window {w}")
            logits[w] = np.ctypeslib.as_array(L.llama_get_logits(engine.ctx), shape=(WINDOW * vocab,)).reshape(WINDOW, vocab)
        L.llama_batch_free(batch)
        engine.close_context()
        target = Path(spec["out"]) / f"logits-{name}.npy"
        np.save(target, logits)
        out[name] = {"logits": str(target), **peers.gguf_types(path if name != "F32" else Path(spec["f32"]))}
    print(json.dumps(out))


# --------------------------------------------------------------------------- scoring


CALIBRATION = "calibration.txt"  # in --work: 64 KiB of the training text (never held out), for GPTQ
OUR_FORMS = {"fp32": [], "int8": ["--weights", "int8"], "int4": ["--weights", "int4"],
             "int4 + int8 compute": ["--weights", "int4", "--activations", "int8"],
             "int4 GPTQ": ["--weights", "int4", "--quantizer", "gptq", "--calibration-text", CALIBRATION]}
LLAMA_FORMS = ("F32", "Q8_0", "Q4_0")
OUR_ARCHS = ("cummax", "linear")  # SamOut, and the arch of the set nearest the llama


def our_logits(arch: str, form: str, args_: list[str], windows, work: Path) -> tuple:
    """Our trained ``arch`` exported in ``form`` (logits for every position), run through ONNX
    Runtime on the windows: (logits [n, WINDOW, vocab], weight bytes)."""
    import numpy as np

    from samout_edge.artifact.manifest import read_manifest
    from samout_edge.evaluate import _weights_bytes
    from samout_edge.runtime.registry import load_runner

    directory = work / f"{arch}-{form.replace(' + ', '-').replace(' ', '-')}"
    # exported again every run, from the checkpoint as it is now (no stale export from an older one)
    cmd = [sys.executable, "-m", "samout_edge", "export", str(TRAINED / arch), "--arch", arch,
           "--logits", "all", "--max-seq", str(WINDOW), "-o", str(directory), "--force",
           *(str(work / a) if a == CALIBRATION else a for a in args_)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:  # export's own check against PyTorch included: score only what verified
        raise SystemExit(f"export failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    runner = load_runner(directory, "ort")
    out = np.empty((len(windows), WINDOW, runner.info.config.vocab_size), np.float32)
    for w, ids in enumerate(windows):
        logits, _ = runner.run(ids[None, :WINDOW], runner.initial_state(1))
        out[w] = runner.to_numpy(logits)[0]
    m = read_manifest(directory)
    return out, _weights_bytes(m, m.config)


def score(args) -> None:
    import numpy as np
    import peers
    import torch
    import train_set as ts

    from samout_edge.bench.machine import describe
    from samout_edge.bench.report import save_results
    from samout_edge.models.checkpoint import load_checkpoint

    started = time.time()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    windows = heldout_windows(args.bytes)
    np.save(work / "windows.npy", windows)
    ts.write_training_sample(work / CALIBRATION, TRAINED, 64 << 10)
    inputs, targets = windows[:, :WINDOW], windows[:, 1:]
    rows = []

    def add(model: str, form: str, logits, reference, weight_bytes, note: str = "") -> None:
        logp = log_softmax(logits)
        s = scores(logp, reference, targets)
        fp32 = scores(reference, reference, targets)["bits_per_byte"]
        rows.append({"model": model, "form": form, **s, "cost_bits_per_byte": s["bits_per_byte"] - fp32,
                     "weight_bytes": weight_bytes, "note": note})
        print(f"  {model} {form}: {s['bits_per_byte']:.4f} bits/byte, cost {s['bits_per_byte'] - fp32:+.4f}, "
              f"KL {s['kl']:.5f}, top-1 {s['top1_agreement']:.2%}", flush=True)

    # the llama: PyTorch fp32, then llama.cpp's GGUFs
    llama, record = load_llama(TRAINED / "llama")
    with torch.inference_mode():
        torch_logits = np.concatenate([llama(torch.from_numpy(inputs[i:i + 16]))[0].numpy()
                                       for i in range(0, len(inputs), 16)])
    reference = log_softmax(torch_logits)
    add("llama", "PyTorch fp32", torch_logits, reference, 4 * sum(p.numel() for p in llama.parameters()))
    np.savez(work / "llama-tensors.npz", **llama.gguf_tensors())  # the worker writes the GGUF: gguf is in its venv
    spec = {"f32": str(work / "llama-alike-F32.gguf"), "tensors": str(work / "llama-tensors.npz"),
            "shape": {k: v for k, v in record["shape"].items() if k != "parameters"}, "types": list(LLAMA_FORMS),
            "windows": str(work / "windows.npy"), "out": str(work), "threads": args.threads}
    proc = subprocess.run([peers.peers_python(args.venv), __file__, "--llama-worker", json.dumps(spec)],
                          capture_output=True, text=True, env={**os.environ, "OMP_WAIT_POLICY": "passive"})
    if proc.returncode != 0:
        raise SystemExit(f"the llama.cpp worker failed:\n{proc.stderr[-3000:]}")
    ggufs = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in LLAMA_FORMS:
        g = ggufs[name]
        add("llama", f"llama.cpp {name}", np.load(g["logits"]), reference, g["bytes"],
            ", ".join(f"{k} x{v}" for k, v in sorted(g["tensor_types"].items())))
        os.remove(g["logits"])

    # SamOut (cummax, and its gated linear recurrence): PyTorch fp32, then its exports through ONNX Runtime
    for arch in OUR_ARCHS:
        samout = load_checkpoint(TRAINED / arch).model(arch).float().eval()
        with torch.inference_mode():
            torch_logits = np.concatenate([samout(torch.from_numpy(inputs[i:i + 16]), last_only=False)[0].numpy()
                                           for i in range(0, len(inputs), 16)])
        reference = log_softmax(torch_logits)
        add(f"SamOut {arch}", "PyTorch fp32", torch_logits, reference, 4 * sum(p.numel() for p in samout.parameters()))
        for form, extra in OUR_FORMS.items():
            logits, weight_bytes = our_logits(arch, form, extra, inputs, work)
            add(f"SamOut {arch}", f"ours {form}", logits, reference, weight_bytes)

    report = {"machine": describe()["label"], "windows": int(len(windows)), "window": WINDOW,
              "scored_bytes": int(targets.size), "llama": record["shape"], "llama_train": {
                  k: record[k] for k in ("train_seconds", "heldout_bits_per_byte", "final_loss_mean_last_5pct")},
              "cummax_heldout_bits_per_byte": record["recipe"]["cummax_heldout_bits_per_byte"],
              "rows": rows, "elapsed_s": round(time.time() - started, 1)}
    text = markdown(report)
    print(text)
    save_results(report, text, args.json, args.markdown)


def markdown(r: dict) -> str:
    s = r["llama"]
    lines = [
        "# Quality beside llama.cpp's quantizers: a llama trained alike (issue 29)",
        "",
        f"Written by `benchmarks/llama_alike.py` on a {r['machine']} in {r['elapsed_s']:.0f} s. The llama: hidden "
        f"{s['hidden']}, {s['heads']} heads, {s['layers']} layers, n_ff {s['n_ff']}, vocab {s['vocab']} "
        f"({s['parameters']:,} parameters), trained on `benchmarks/trained/`'s recipe (the same bytes, batches, "
        f"steps, optimizer and schedule; {r['llama_train']['train_seconds']:.0f} s): held-out "
        f"{r['llama_train']['heldout_bits_per_byte']} bits per byte on 256 KiB, SamOut cummax "
        f"{r['cummax_heldout_bits_per_byte']}. Scored here: {r['windows']} windows of {r['window']} + 1 held-out bytes "
        f"({r['scored_bytes']:,} bytes), each from an empty context. Cost: bits per byte minus the same model's "
        "PyTorch fp32 on the same bytes; KL: mean KL(PyTorch fp32 || model) per byte, nats.",
        "",
        "| model | form | weights KiB | bits/byte | cost bits/byte | mean KL | top-1 agreement | tensors |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in r["rows"]:
        lines.append(f"| {row['model']} | {row['form']} | {row['weight_bytes'] / 1024:,.0f} | {row['bits_per_byte']:.4f} "
                     f"| {row['cost_bits_per_byte']:+.4f} | {row['kl']:.5f} | {row['top1_agreement']:.2%} "
                     f"| {row['note'] or '-'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    if sys.argv[1:2] == ["--llama-worker"]:
        return llama_worker(json.loads(sys.argv[2]))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train the llama on the set's recipe")
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--out", type=Path, default=TRAINED / "llama")
    s = sub.add_parser("score", help="score it beside SamOut, through llama.cpp and ONNX Runtime")
    s.add_argument("--bytes", type=int, default=64 << 10, help="held-out bytes (default 64 KiB)")
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--venv", type=Path, default=Path(".venv-peers"))
    s.add_argument("--work", type=Path, default=Path("out") / "llama-alike")
    s.add_argument("--markdown", type=Path)
    s.add_argument("--json", type=Path)
    args = p.parse_args()
    if args.command == "train":
        return train(args.threads, args.out)
    if not (TRAINED / "llama" / "train.json").exists():
        raise SystemExit("no trained llama in benchmarks/trained/llama: run `llama_alike.py train` first")
    if args.bytes < 2 * (WINDOW + 1):
        raise SystemExit(f"--bytes must be at least {2 * (WINDOW + 1)}")
    if not (args.venv / "bin" / "python").exists():
        raise SystemExit(f"no peers venv at {args.venv}: `benchmarks/peers.py` builds llama-cpp-python there on its first run")
    return score(args)


if __name__ == "__main__":
    main()
