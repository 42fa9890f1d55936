"""What a graph's weights take as stored: the bytes of its initializers.

Read by the exporter (export.json's ``weights.bytes``), by bench and by plan on the
device side, so it lives here with onnx and numpy only.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

FOUR_BIT = (TensorProto.INT4, TensorProto.UINT4)


def tensor_bytes(t: onnx.TensorProto) -> int:
    """Bytes of one initializer's values as stored (4-bit types packed two a byte)."""
    if t.HasField("raw_data"):
        return len(t.raw_data)
    if t.data_location == TensorProto.EXTERNAL:
        return int(next((e.value for e in t.external_data if e.key == "length"), 0))
    count = int(np.prod(t.dims, dtype=np.int64))
    if t.data_type in FOUR_BIT:
        return -(-count // 2)
    return count * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def initializer_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the graph's initializers: what the weights take in model.onnx."""
    return sum(tensor_bytes(t) for t in model.graph.initializer)
