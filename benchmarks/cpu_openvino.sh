#!/usr/bin/env bash
# OpenVINO beside ONNX Runtime (issue 17): the seed preset (hidden 512, 8 heads, 6 layers,
# vocab 10000), fp32, batch 1, prefill and decode at 256/1024/4096 tokens, both archs,
# both backends timed in one run on one machine. OpenVINO runs at f32 inference
# precision (verify's tolerance; its CPU default would be bf16 where the CPU has it).
# Writes benchmarks/results/cpu-openvino.*; takes about 10 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
RESULTS=benchmarks/results
mkdir -p "$RESULTS"
"$BIN/samout-edge" bench --preset seed --work out/bench-seed --backend ort,openvino \
    --seq 256,1024,4096 --context 256,1024,4096 \
    --json "$RESULTS/cpu-openvino.json" --plot "$RESULTS/cpu-openvino.png" --markdown "$RESULTS/cpu-openvino.md"
