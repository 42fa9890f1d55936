"""fp16 exports that are right in fp16 arithmetic: calibrate, keep fp32 islands, or refuse.

An fp16 graph computes in fp16 on a Jetson (TensorRT strongly typed, the CUDA
provider, onnx.reference); only ONNX Runtime's CPU provider quietly computes in
fp32. Trained SamOut models leave fp16's range inside the gated FFN (the product
ffn1(x) * relu(gate(x)) of the trained SamOut reaches 108,000; fp16 ends at 65,504),
so an fp16 export that verifies on a CPU can give NaN on the device.

So before tracing, the fp32 model (with the export's weights) runs on calibration
inputs: the golden cases' shapes (1 token, a prime near 100, max_seq, the decode
run, every id once) and, with ``--calibration-text``, real text carried through
the state chunk by chunk as a long prompt is. A dispatch mode records the largest
|value| of every operator's output, by the part of the model it belongs to:

- per layer, the mix (head cummax and the combination; softmax: the attention
  scores too) and the FFN block (FFN, blend, LayerNorm): either can be computed
  in fp32 inside the fp16 graph (``MaxState.fp32``, ``DecoderLayer.fp32``);
- the projections, the state, the residual stream and the logits are fp16 by the
  graph's contract: if they leave the range, the export is refused.

A part is kept in fp32 when its peak exceeds fp16's largest value divided by
HEADROOM (inputs the calibration never saw may go higher). The islands, the peaks
and the inputs are recorded in export.json (``precision``), and the export is then
checked in fp16 arithmetic: PyTorch fp16 with the same islands on every golden
case at export, onnx.reference on the device (runtime/verify.py).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from samout_edge.artifact.golden import (
    BATCH2_UP_TO,
    DECODE_PREFILL,
    DECODE_STEPS,
    every_id_chunks,
    every_id_row_bytes,
    golden_ids,
    golden_lengths,
)
from samout_edge.artifact.quantization import RTOL
from samout_edge.errors import SamoutError
from samout_edge.models.model import SamOut

FP16_MAX = 65504.0
HEADROOM = 4.0  # a part stays fp16 only while its calibrated peak is below FP16_MAX / HEADROOM
LIMIT = FP16_MAX / HEADROOM
MAX_CALIBRATION_TOKENS = 1 << 20

FACTORIES = {"new_full", "new_zeros", "new_empty", "new_ones", "full", "zeros", "empty", "ones", "fill", "full_like"}
_LAYER = re.compile(r"decoder_layers\.(\d+)(?:\.(\w+))?(?:\.(\w+))?")


@dataclass
class Precision:
    """export.json's ``precision``: how an fp16 export stays in fp16's range."""

    dtype: str
    fp32_islands: list[str] = field(default_factory=list)  # module names computed in fp32
    headroom: float = HEADROOM
    limit: float = LIMIT
    peaks: dict[str, float] = field(default_factory=dict)  # part -> largest |value| seen in fp32
    calibration: dict[str, Any] = field(default_factory=dict)  # what the peaks were measured on
    widened: bool = False  # the calibrated islands failed the fp16 check: every layer's mix and FFN went fp32
    pytorch_fp16: dict[str, Any] = field(default_factory=dict)  # check_fp16_arithmetic on the golden cases

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def part_of(module: str, arch: str) -> str:
    """The part of the model an operator inside ``module`` belongs to (see the module docstring)."""
    m = _LAYER.fullmatch(module)
    if m is None:
        return "logits" if module == "head" else "stream"
    layer, child, grandchild = m.groups()
    if child == "self_attention":
        return f"decoder_layers.{layer}.projection" if grandchild == "combined" else f"decoder_layers.{layer}.mix"
    # the FFN, the blend (the layer's own ops) and LayerNorm, whose input is the blend (it computes in
    # fp32 always; its output joins the stream, checked where the stream adds it)
    return f"decoder_layers.{layer}.ffn"


class _PeakRecorder(TorchDispatchMode):
    """Largest |value| of every floating operator output, by part; attention scores too."""

    def __init__(self, arch: str) -> None:
        super().__init__()
        self.arch, self.modules, self.peaks = arch, ["top"], {}

    def note(self, part: str, value: float) -> None:
        self.peaks[part] = max(self.peaks.get(part, 0.0), value)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.__name__.split(".")[0] in FACTORIES:  # the empty state's lowest value: not a computed value
            return out
        part = part_of(self.modules[-1], self.arch)
        if "scaled_dot_product" in func.__name__:
            self.note(part, _score_peak(args[0], args[1], kwargs.get("scale")))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and tensor.numel():
                self.note(part, float(tensor.detach().abs().max()))
        return out


def _score_peak(q: torch.Tensor, k: torch.Tensor, scale: float | None) -> float:
    """max |q k^T| * scale over every (query, key) pair, masked ones too: an exported graph
    computes all of them before it masks."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    peak = 0.0
    for start in range(0, q.shape[-2], 256):
        peak = max(peak, float((q[..., start : start + 256, :] @ k.transpose(-1, -2)).abs().max()) * scale)
    return peak


def calibration_batches(model: SamOut, max_seq: int, trace_seq: int,
                        text_ids: np.ndarray | None) -> Iterator[tuple[np.ndarray, bool]]:
    """(ids, carry): the golden cases' shapes, then the text in chunks of max_seq
    (``carry``: continue from the previous chunk's state, as a long prompt does)."""
    cfg = model.config
    rng = np.random.default_rng(20261128)
    for length in golden_lengths(max_seq, trace_seq):
        yield golden_ids(rng, cfg.vocab_size, 2 if length <= BATCH2_UP_TO else 1, length), False
    yield golden_ids(rng, cfg.vocab_size, 2, min(max_seq, DECODE_PREFILL + DECODE_STEPS)), False
    for ids in every_id_chunks(cfg.vocab_size, *every_id_row_bytes(cfg, model.spec)):
        yield ids[:, None], False
    if text_ids is not None:
        for start in range(0, len(text_ids), max_seq):
            yield text_ids[None, start : start + max_seq], start > 0 and not model.spec.grows


def measure_peaks(model: SamOut, batches: Iterator[tuple[np.ndarray, bool]]) -> tuple[dict[str, float], int]:
    """Run the fp32 model on the batches; the peaks by part and the tokens seen."""
    recorder = _PeakRecorder(model.arch)
    hooks = []
    for name, module in model.named_modules():
        if name:
            hooks.append(module.register_forward_pre_hook(lambda mod, args, n=name: recorder.modules.append(n)))
            hooks.append(module.register_forward_hook(lambda mod, args, out: recorder.modules.pop() and None))
    tokens, state = 0, None
    try:
        with torch.inference_mode(), recorder:
            for ids, carry in batches:
                _, present = model(torch.from_numpy(np.ascontiguousarray(ids)), state if carry else None,
                                   last_only=True)
                state, tokens = present, tokens + ids.size
    finally:
        for hook in hooks:
            hook.remove()
    return recorder.peaks, tokens


def choose_islands(peaks: dict[str, float], num_layers: int, limit: float = LIMIT) -> list[str]:
    """The modules to compute in fp32, or SamoutError where fp16 cannot hold a part the
    graph's contract makes fp16."""
    islands: list[str] = []
    for i in range(num_layers):
        layer = f"decoder_layers.{i}"
        if peaks.get(f"{layer}.projection", 0.0) > limit:
            raise _refuse(f"{layer}.projection", peaks[f"{layer}.projection"], limit)
        if peaks.get(f"{layer}.mix", 0.0) > limit:
            islands.append(f"{layer}.self_attention")
        if peaks.get(f"{layer}.ffn", 0.0) > limit:
            islands.append(layer)
    for part in ("stream", "logits"):
        if peaks.get(part, 0.0) > limit:
            raise _refuse(part, peaks[part], limit)
    return islands


def _refuse(part: str, peak: float, limit: float) -> SamoutError:
    layer = _LAYER.match(part)
    what = {"stream": "the residual stream", "logits": "the logits"}.get(
        part, f"layer {layer.group(1)}'s projections (self_attention.combined)" if layer else part)
    return SamoutError(f"--dtype fp16 cannot be made safe: {what} reaches {peak:,.0f} on the calibration inputs, above "
                       f"{limit:,.0f} (fp16's {FP16_MAX:,.0f} / headroom {HEADROOM:g}), and the graph keeps it in "
                       "fp16 by contract; export --dtype fp32")


def all_islands(num_layers: int) -> list[str]:
    """Every part that can be an fp32 island."""
    return [name for i in range(num_layers) for name in (f"decoder_layers.{i}.self_attention", f"decoder_layers.{i}")]


def set_islands(model: SamOut, islands: list[str]) -> None:
    """Mark the modules that compute in fp32 (MaxState.fp32, DecoderLayer.fp32), and only those."""
    modules = dict(model.named_modules())
    for name in all_islands(model.config.num_layers):
        modules[name].fp32 = name in islands


def plan_fp16(reference: SamOut, max_seq: int, trace_seq: int, text_ids: np.ndarray | None = None,
              text: dict[str, Any] | None = None) -> Precision:
    """Calibrate ``reference`` (fp32, the export's weights) and choose the fp32 islands."""
    if text_ids is not None and len(text_ids) > MAX_CALIBRATION_TOKENS:
        text_ids = text_ids[:MAX_CALIBRATION_TOKENS]
    peaks, tokens = measure_peaks(reference, calibration_batches(reference, max_seq, trace_seq, text_ids))
    islands = choose_islands(peaks, reference.config.num_layers)
    calibration = {"inputs": "the golden cases' shapes (random ids, every id)" + (" and text" if text else ""),
                   "tokens": tokens, **({"text": text} if text else {})}
    return Precision("fp16", islands, peaks={k: round(v, 3) for k, v in sorted(peaks.items())},
                     calibration=calibration)


def check_fp16_arithmetic(model_fp16: SamOut, feeds: list[dict[str, np.ndarray]],
                          outputs: list[dict[str, np.ndarray]], last_only: bool, rtol: float) -> dict[str, Any]:
    """Every golden case computed by PyTorch in fp16 (with the export's islands) against
    the fp32 golden outputs: the worst error relative to each output's scale, and
    whether every value stayed finite (an overflow is inf, then NaN)."""
    from samout_edge.artifact import graph

    arch, layers = model_fp16.spec, model_fp16.config.num_layers
    past_names, present_names = graph.past_names(arch, layers), graph.present_names(arch, layers)
    worst, finite = 0.0, True
    with torch.inference_mode():
        for feed, want in zip(feeds, outputs):
            past = [torch.from_numpy(np.ascontiguousarray(feed[n])) for n in past_names]
            logits, present = model_fp16(torch.from_numpy(feed[graph.INPUT_IDS]), graph.unflatten(arch, past),
                                         last_only=last_only)
            got = {graph.LOGITS: logits, **dict(zip(present_names, graph.flatten(arch, present)))}
            for key, ref in want.items():
                value = got[key].float().numpy()
                finite = finite and bool(np.isfinite(value).all())
                err = float(np.abs(value.astype(np.float64) - ref).max()) if value.shape == ref.shape else math.inf
                worst = max(worst, (err if math.isfinite(err) else math.inf) / max(1.0, float(np.abs(ref).max())))
    return {"runner": "pytorch-fp16", "cases": len(feeds), "worst_relative_error": worst, "finite": finite,
            "rtol": rtol, "passed": finite and worst <= rtol}


def apply_plan(plan: Precision, model: SamOut, manifest, golden) -> dict:
    """Make the fp16 ``model`` right in fp16 arithmetic: mark the calibrated fp32 islands on
    it, then compute every golden case with it in fp16. If that fails, every layer's mix and
    FFN go to fp32; if even that fails, the export is refused in one line. Returns
    export.json's ``precision``."""
    set_islands(model, plan.fp32_islands)
    last_only = manifest.logits == "last"
    check = check_fp16_arithmetic(model, golden.feeds, golden.outputs, last_only, RTOL["fp16"])
    everything = all_islands(manifest.config.num_layers)
    if not check["passed"] and plan.fp32_islands != everything:
        plan.fp32_islands, plan.widened = everything, True
        set_islands(model, everything)
        check = check_fp16_arithmetic(model, golden.feeds, golden.outputs, last_only, RTOL["fp16"])
    if not check["passed"]:
        raise SamoutError(f"--dtype fp16 cannot be made safe: computed in fp16 with every layer's mix and FFN in fp32, "
                          f"the golden cases are {'non-finite' if not check['finite'] else 'off by'} "
                          f"{check['worst_relative_error']:.2g} of their scale (tolerance {RTOL['fp16']:g}); "
                          "export --dtype fp32")
    plan.pytorch_fp16 = check
    return plan.to_dict()


def text_tokens(path: Path, vocab_size: int, vocab, limit: int = MAX_CALIBRATION_TOKENS) -> tuple[np.ndarray, dict[str, Any]]:
    """--calibration-text's first ``limit`` token ids (the export's vocab, else UTF-8 bytes), and
    its record: only what calibration uses is read and encoded (GPTQ takes 32,768 tokens; a
    57 MB file encoded whole cost minutes and gigabytes for nothing)."""
    from samout_edge.artifact.files import sha256_file
    from samout_edge.artifact.vocab import head_tokens

    ids = head_tokens(path, vocab_size, vocab, limit)
    return ids, {"path": str(Path(path).absolute()), "sha256": sha256_file(path), "tokens": int(len(ids))}
