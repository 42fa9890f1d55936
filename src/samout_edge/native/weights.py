"""native.safetensors: an export's weights as the native forward pass reads them.

The safetensors layout (a little-endian u64 header length, a JSON header, the tensors'
bytes), so any safetensors reader opens it, and the runner maps it without copying: its
pages are the model's memory, shared with the page cache. Parameters keep the checkpoint's
names. A matrix is stored in panels of 32 rows, the layout the kernels read (samout.c says
why): fp32 as ``NAME.panels`` [panel, cols, 32]; int4 as ``NAME.q4`` [panel, cols / 32, 16, 32]
(byte j of a row's block holds its entries 2j and 2j + 1, low nibble first, offset by 8 on
a symmetric grid), ``NAME.scales`` [panel, cols / 32, 32] and on an asymmetric grid
``NAME.zero_points``; rows past the last are zeros with scale 0. The quantized embedding is
``em.weight.q8`` (int8 [vocab, hidden]) with its scales (and zero points), one per
``em.weight.block`` entries of a row (metadata). Larger int4 blocks are written as blocks
of 32 with their scale repeated: the same values.

The exporter writes it (``export --native``) from the weights it traced, and verify checks
the native backend against the golden outputs like every other.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path
from typing import Any

import numpy as np

from samout_edge.errors import SamoutError

FILE = "native.safetensors"
FORMAT = "samout-native/1"
Q4_BLOCK = 32  # the kernels' int4 block
PANEL = 32  # rows a matrix is stored in (samout.c P)
DTYPES = {"F32": np.float32, "U8": np.uint8, "I8": np.int8}
MATRICES = ("self_attention.combined", "ffn.ffn1", "ffn.gate", "ffn.ffn2")


def unsupported(spec: Any, dtype: str, weights: Any, hidden_size: int) -> str | None:
    """Why the native forward pass cannot compute this export (None: it can)."""
    if any(layer.mixer != "cummax" for layer in spec.layers):
        return f"it computes the cummax arch only (this export is {spec.name})"
    if dtype != "fp32":
        return f"it computes fp32 exports only (this one is {dtype})"
    if weights.activations != "fp":
        return "it computes with float activations (this export has --activations int8)"
    if weights.quantized and weights.bits != 4:
        return f"its quantized matrices are int4 (this export's are {weights.kind})"
    if weights.quantized and weights.block_size % Q4_BLOCK and weights.block_size != hidden_size:
        return f"its int4 blocks are multiples of {Q4_BLOCK} (this export's are {weights.block_size})"
    if hidden_size % Q4_BLOCK:
        return f"its hidden size is a multiple of {Q4_BLOCK} (this model's is {hidden_size})"
    return None


def _panels(a: np.ndarray) -> np.ndarray:
    """[rows, ...] -> [ceil(rows / 32), 32, ...], the last panel padded with zeros."""
    pad = -a.shape[0] % PANEL
    if pad:
        a = np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)])
    return a.reshape(-1, PANEL, *a.shape[1:])


def _fp32_matrix(w: np.ndarray) -> np.ndarray:
    """W [rows, cols] -> [panel, cols, 32]: a panel's 32 rows side by side, column by column."""
    return np.ascontiguousarray(_panels(w.astype(np.float32)).transpose(0, 2, 1))


def _q4(qw: Any) -> dict[str, np.ndarray]:
    """An int4 grid -> q4 [panel, block, 16, 32] (byte j of each row's block: entries 2j, 2j + 1),
    scales and zero points [panel, block, 32]; padded rows have scale 0."""
    rows, cols = qw.q.shape
    if qw.bits != 4 or cols % Q4_BLOCK or qw.block % Q4_BLOCK and not qw.per_row:
        raise SamoutError(f"the native weights take int4 blocks of a multiple of {Q4_BLOCK} entries "
                          f"(got {qw.bits} bits, blocks of {qw.block}, {cols} columns)")
    blocks = cols // Q4_BLOCK
    repeat = (cols if qw.per_row else qw.block) // Q4_BLOCK
    u = (qw.q.astype(np.int16) + (0 if qw.asymmetric else 8)).astype(np.uint8)
    packed = (u[:, 0::2] | (u[:, 1::2] << 4)).astype(np.uint8).reshape(rows, blocks, 16)
    per_block = lambda a, dtype: _panels(np.repeat(a.astype(dtype), repeat, axis=1)[:, :blocks]).transpose(0, 2, 1)  # noqa: E731
    out = {"q4": _panels(packed).transpose(0, 2, 3, 1), "scales": per_block(qw.scale, np.float32)}
    if qw.asymmetric:
        out["zero_points"] = per_block(qw.zero, np.uint8)
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def is_matrix(name: str) -> bool:
    return name == "head.weight" or any(name.endswith(f".{m}.weight") for m in MATRICES)


def native_tensors(params: dict[str, np.ndarray], quantized: dict[str, Any] | None) -> tuple[dict, dict]:
    """The file's tensors and metadata from the model's parameters (fp32, on the grid where
    quantized) and the grids of the quantized ones."""
    quantized = quantized or {}
    tensors: dict[str, np.ndarray] = {}
    metadata = {"format": FORMAT}
    for name, value in params.items():
        qw = quantized.get(name)
        if name == "em.weight" and qw is not None:
            tensors[name + ".q8"] = qw.q.astype(np.int8)
            tensors[name + ".scales"] = qw.scale.astype(np.float32)
            if qw.asymmetric:
                tensors[name + ".zero_points"] = qw.zero.astype(np.int8)
            metadata[name + ".block"] = str(qw.q.shape[1] if qw.per_row else qw.block)
        elif qw is not None:
            tensors.update({f"{name}.{k}": v for k, v in _q4(qw).items()})
        elif is_matrix(name):
            tensors[name + ".panels"] = _fp32_matrix(value)
        else:
            tensors[name] = np.array(value, dtype=np.float32, order="C")  # 0-d stays 0-d (alpha)
    return tensors, metadata


def write_native(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """The file at ``path`` (the exporter's stage: the directory is renamed into place whole)."""
    order = sorted(tensors, key=lambda n: (tensors[n].dtype != np.float32, n))  # fp32 first: 4-byte aligned
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name in order:
        a = tensors[name]
        kind = next(k for k, v in DTYPES.items() if a.dtype == v)
        header[name] = {"dtype": kind, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 64)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name in order:
            f.write(np.array(tensors[name], order="C").tobytes())


class NativeWeights:
    """The file mapped read-only: ``tensors`` are views of its pages."""

    def __init__(self, path: Path):
        try:
            with open(path, "rb") as f:
                # mapped in at once (MAP_POPULATE): the model is in memory once loaded, as a peak above it
                # assumes, and the first token does not fault the weights in page by page
                self._map = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                                      prot=mmap.PROT_READ)
        except FileNotFoundError:
            raise SamoutError(f"{path.parent} has no {FILE}: export it with --native for the native backend") from None
        except (OSError, ValueError) as e:
            raise SamoutError(f"cannot read {path}: {e}") from None
        try:
            size = struct.unpack("<Q", self._map[:8])[0]
            header = json.loads(self._map[8 : 8 + size])
            self.metadata: dict[str, str] = header.pop("__metadata__", {})
            if self.metadata.get("format") != FORMAT:
                raise ValueError(f"format {self.metadata.get('format')!r}, not {FORMAT}")
            base = 8 + size
            self.tensors: dict[str, np.ndarray] = {}
            for name, entry in header.items():
                begin, end = entry["data_offsets"]
                dtype = np.dtype(DTYPES[entry["dtype"]])
                count = int(np.prod(entry["shape"], dtype=np.int64))
                if base + end > len(self._map) or end - begin != count * dtype.itemsize:
                    raise ValueError(f"{name} runs past the file or does not fill its bytes")
                self.tensors[name] = np.frombuffer(self._map, dtype, count, base + begin).reshape(entry["shape"])
        except (ValueError, KeyError, TypeError, struct.error) as e:
            raise SamoutError(f"{path} is not a native weights file of this version: {e}") from None

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        value = self.tensors.get(name)
        if value is None:
            raise SamoutError(f"the native weights lack {name}: export again with --native")
        if shape is not None and tuple(value.shape) != shape:
            raise SamoutError(f"the native weights' {name} is {tuple(value.shape)}, the model needs {shape}")
        return value
