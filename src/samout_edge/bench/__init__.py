"""Latency and memory of SamOut against the softmax baseline, and of the cummax op alone."""
