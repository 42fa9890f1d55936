#!/usr/bin/env bash
# Long context on the CPU (issue 16): the seed preset (hidden 512, 8 heads, 6 layers,
# vocab 10000), fp32, batch 1, ONNX Runtime, from one export per arch (max_seq 4096:
# anything longer is fed in chunks, the state carried).
#   cpu-long.*   prefill time at 1k, 8k, 32k and 128k tokens, decode latency and peak
#                memory after that many tokens in the state; softmax runs while its KV
#                cache stays within --kv-budget 1024 MiB (32k tokens: 768 MiB; 128k would be
#                3 GiB and hours of quadratic prefill on a CPU), and its rows say where not
# Writes benchmarks/results/; takes about 40 minutes on 2 cores (most of it softmax's
# quadratic prefill: each length is prefilled for the timing and again for the memory).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
RESULTS=benchmarks/results
mkdir -p "$RESULTS"
"$BIN/samout-edge" bench --preset seed --work out/bench-long --backend ort \
    --seq 1024,8192,32768,131072 --context 1024,8192,32768,131072 \
    --warmup 0 --min-repeats 1 --repeats 3 --budget 20 --kv-budget 1024 \
    --json "$RESULTS/cpu-long.json" --plot "$RESULTS/cpu-long.png" --markdown "$RESULTS/cpu-long.md"
