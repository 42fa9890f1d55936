"""SamOut, its softmax baseline, their sizes, and checkpoint I/O.

``SamOut`` is imported lazily so that tools which only read configs (the
ONNX Runtime path, bench's memory children) do not pay for importing torch.
"""

from samout_edge.artifact.config import ARCHS, PRESETS, ModelConfig, preset

__all__ = ["ARCHS", "PRESETS", "ModelConfig", "SamOut", "preset"]


def __getattr__(name: str):
    if name == "SamOut":
        from samout_edge.models.model import SamOut

        return SamOut
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
