#!/usr/bin/env bash
# One call on a CUDA machine without network (torch with CUDA and Triton there,
# ONNX Runtime CPU only, no TensorRT), done in about 8 minutes:
#   1. make the repo importable: pip install -e . offline if it can, else PYTHONPATH=src
#   2. the `gpu` tests (pytest -m gpu): the Triton kernel bit-exact on CUDA
#   3. `samout-edge bench op --device cuda`: Triton kernel vs torch.cummax vs a copy
#      (GB/s, fraction of copy), plus the ONNX Runtime CPU lowerings for reference
#   4. benchmarks/gpu_seed.py: seed-size prefill at 2k/8k/32k and decode after 1k/32k,
#      cummax (Triton kernel, and torch.cummax) vs softmax (SDPA), torch eager fp16
# Every step has its own time limit (60+20+120+90+180 s = 7.8 min at worst) and a
# failed step does not stop the others.
# Writes JSON + Markdown with the card's name into $OUT (default
# benchmarks/results/gpu-<card>/): summary.{json,md}, op.{json,md},
# gpu-seed.{json,md}, and each step's log.
#
#   bash benchmarks/gpu_check.sh            # or: OUT=/some/dir PYTHON=python3 bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 TRITON_DEFAULT_FP_FUSION=1 PYTHONUNBUFFERED=1

CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1)
[ -n "$CARD" ] || CARD=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name(0))" 2>/dev/null)
[ -n "$CARD" ] || CARD=unknown-gpu
SLUG=$(printf '%s' "$CARD" | tr '[:upper:]' '[:lower:]' | sed -e 's/^nvidia //' -e 's/[^a-z0-9]\+/-/g' -e 's/^-//' -e 's/-$//')
OUT=${OUT:-benchmarks/results/gpu-$SLUG}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
STEPS="$OUT/steps.tsv"
: > "$STEPS"

# step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, record status and seconds
step() {
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    echo "== $name (limit ${limit}s)"
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    local status=ok
    [ $rc -eq 0 ] || status=failed
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && status=timeout
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$((SECONDS - t0))" >> "$STEPS"
    tail -n 5 "$OUT/$name.log"
    return 0
}

# 1. importable without network: an editable install needs setuptools and wheel already here
step install 60 "$PYTHON" -m pip install --no-deps --no-build-isolation --no-index -e "$REPO"
if ! "$PYTHON" -c "import samout_edge" 2>/dev/null; then
    export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
    echo "pip install -e failed; using PYTHONPATH=$REPO/src" | tee -a "$OUT/install.log"
fi
step environment 20 "$PYTHON" - <<'EOF'
import importlib, platform
print("python", platform.python_version())
for name in ("samout_edge", "torch", "triton", "numpy", "onnx", "onnxruntime", "typer", "rich", "pytest", "safetensors"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"), getattr(module, "__file__", ""))
    except Exception as e:
        print(name, "MISSING", type(e).__name__, e)
import torch
print("cuda", torch.version.cuda, torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
EOF

# 2. the gpu tests (collection errors in modules whose dependencies are missing are not ours to fix here)
step pytest-gpu 120 "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors -rs tests

# 3. the op alone, through the CLI (python -m works with or without the entry point)
step bench-op 90 "$PYTHON" -m samout_edge bench op --shape 1,8,8192,64 --dtype fp16 --device cuda \
    --repeats 30 --budget 1.5 --json "$OUT/op.json" --markdown "$OUT/op.md"

# 4. seed-size model, torch eager on CUDA
step gpu-seed 180 "$PYTHON" benchmarks/gpu_seed.py --out "$OUT" --budget-s 130

"$PYTHON" - "$OUT" "$CARD" <<'EOF'
import json, sys
from pathlib import Path
out, card = Path(sys.argv[1]), sys.argv[2]
steps = [dict(zip(("step", "status", "rc", "seconds"), line.split("\t"))) for line in (out / "steps.tsv").read_text().splitlines()]
summary = {"card": card, "steps": steps, "files": sorted(p.name for p in out.iterdir() if p.suffix in (".json", ".md"))}
for name in ("op.json", "gpu-seed.json"):
    if (out / name).is_file():
        summary[name.split(".")[0]] = json.loads((out / name).read_text())
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
lines = [f"# GPU check on {card}", "", "| step | status | seconds |", "|---|---|---|"]
lines += [f"| {s['step']} | {s['status']} (rc {s['rc']}) | {s['seconds']} |" for s in steps]
for name in ("op.md", "gpu-seed.md"):
    if (out / name).is_file():
        lines += ["", (out / name).read_text()]
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
echo "results in $OUT"
