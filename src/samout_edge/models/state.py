"""The decode state as the exported graph names it (DESIGN.md, graph contract).

Every runtime passes state as a dict keyed by the graph's *input* names, so the
state a run returns feeds the next run unchanged, whatever the backend.
"""

from __future__ import annotations

import numpy as np

from samout_edge.models.config import ModelConfig

NP_DTYPES = {"fp32": np.float32, "fp16": np.float16}


def past_names(arch: str, num_layers: int) -> list[str]:
    if arch == "cummax":
        return [f"past_max.{i}" for i in range(num_layers)]
    return [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def present_names(arch: str, num_layers: int) -> list[str]:
    if arch == "cummax":
        return [f"present_max.{i}" for i in range(num_layers)]
    return [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def present_to_past(arch: str, num_layers: int) -> dict[str, str]:
    return dict(zip(present_names(arch, num_layers), past_names(arch, num_layers)))


def flatten(arch: str, layer_states: list) -> list:
    """Per-layer states (tensor, or (key, value)) -> the flat list in graph order."""
    if arch == "cummax":
        return list(layer_states)
    return [t for kv in layer_states for t in kv]


def unflatten(arch: str, flat: list) -> list:
    if arch == "cummax":
        return list(flat)
    return [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]


def empty_state(config: ModelConfig, arch: str, batch: int, dtype: str) -> dict[str, np.ndarray]:
    """The state before any token, as numpy arrays keyed by graph input name."""
    np_dtype = NP_DTYPES[dtype]
    names = past_names(arch, config.num_layers)
    if arch == "cummax":
        low = np.finfo(np_dtype).min
        shape = (batch, config.num_heads, 1, config.head_dim)
        return {n: np.full(shape, low, dtype=np_dtype) for n in names}
    shape = (batch, config.num_heads, 0, config.head_dim)
    return {n: np.zeros(shape, dtype=np_dtype) for n in names}


def state_bytes(config: ModelConfig, arch: str, batch: int, context: int, dtype: str) -> int:
    """Bytes of the decode state after ``context`` tokens: constant for cummax, linear for softmax."""
    itemsize = np.dtype(NP_DTYPES[dtype]).itemsize
    per_layer = batch * config.num_heads * config.head_dim * itemsize
    if arch == "cummax":
        return config.num_layers * per_layer
    return config.num_layers * 2 * per_layer * context
