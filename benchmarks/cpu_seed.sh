#!/usr/bin/env bash
# The benchmark behind the README's CPU numbers: the seed preset (hidden 512,
# 8 heads, 6 layers, vocab 10000), fp32, batch 1, both archs.
#   cpu-op.*        the cummax op alone, [1, 8, 8192, 64]: torch.cummax, every
#                   ONNX lowering in ONNX Runtime, a plain copy
#   cpu-seed.*      torch eager and ONNX Runtime, prefill and decode at
#                   256/1024/4096 tokens, latency and peak memory
#   cpu-lowerings-e2e.*  SamOut end to end with each cummax implementation,
#                   interleaved: ONNX Runtime native/blocked (default),
#                   native/doubling, custom; torch.cummax (and Triton on CUDA)
# Writes benchmarks/results/; takes about 15 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
RESULTS=benchmarks/results
mkdir -p "$RESULTS"
"$BIN/samout-edge" bench op --shape 1,8,8192,64 --json "$RESULTS/cpu-op.json" --markdown "$RESULTS/cpu-op.md"
"$BIN/samout-edge" bench --preset seed --work out/bench-seed \
    --json "$RESULTS/cpu-seed.json" --plot "$RESULTS/cpu-seed.png" --markdown "$RESULTS/cpu-seed.md"
"$BIN/python" benchmarks/lowerings_e2e.py --prefix cpu --work out/lowerings
