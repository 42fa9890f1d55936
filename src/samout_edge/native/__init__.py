"""SamOut on the CPU with no runtime under it: a C forward pass (samout.c) compiled on the
machine that runs it (build.py), over the weights an export writes for it (weights.py).
The ``native`` backend (runtime/native_runner.py) runs it. Below the runtime and the
exporter: it imports nothing of ours but errors and the artifact contracts."""
