"""SamOut, its softmax baseline, their sizes, and checkpoint I/O."""

from samout_edge.models.config import ARCHS, PRESETS, ModelConfig, preset
from samout_edge.models.model import SamOut

__all__ = ["ARCHS", "PRESETS", "ModelConfig", "SamOut", "preset"]
