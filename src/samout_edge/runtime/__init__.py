"""Runners: one interface over PyTorch, ONNX Runtime and TensorRT."""

from samout_edge.runtime.base import Runner, RunnerInfo, State

__all__ = ["Runner", "RunnerInfo", "State"]
