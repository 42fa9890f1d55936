#!/usr/bin/env bash
# The benchmark behind the README's CPU numbers: the seed preset (hidden 512,
# 8 heads, 6 layers, vocab 10000), fp32, both archs, torch eager and ONNX
# Runtime, prefill and decode at 256/1024/4096 tokens, plus the cummax op alone.
# Writes benchmarks/results/cpu-*.{json,md,png}. Takes about 10 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
RESULTS=benchmarks/results
mkdir -p "$RESULTS"
"$BIN/samout-edge" bench op --shape 1,8,8192,64 --json "$RESULTS/cpu-op.json" --markdown "$RESULTS/cpu-op.md"
"$BIN/samout-edge" bench --preset seed --work out/bench-seed \
    --json "$RESULTS/cpu-seed.json" --plot "$RESULTS/cpu-seed.png" --markdown "$RESULTS/cpu-seed.md"
