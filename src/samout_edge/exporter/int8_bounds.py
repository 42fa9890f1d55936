"""int8 activations: verify's bounds per CPU kernel family, from PyTorch emulations of the
checkpoint's quantized model alone (never the exported graph: a wrong graph must not set
its own tolerance). models/quantize.py emulates the kernels; artifact/quantization.py
holds the ceilings and reads the bounds back.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from samout_edge.artifact import graph
from samout_edge.artifact.manifest import Manifest
from samout_edge.artifact.quantization import ACTIVATION_CEILING
from samout_edge.models.model import SamOut
from samout_edge.models.quantize import activation_rounding
from samout_edge.runtime.compare import agreement, max_abs_error

# int8 activations: verify's bound on each statistic = max(floor, factor x the kernel emulation's spread against
# itself in float64). The factors cover what ONNX Runtime showed beyond that spread: on the trained SamOut int4
# GPTQ (x86), its largest error 1.5x and its mean KL 3.4x the spread's (the roundings it flips are few, and their
# count varies); the floors serve models whose emulations agree exactly (the tiny preset).
ACTIVATION_MARGINS = {"rtol": (3, 1e-4), "kl": (8, 1e-6), "median_kl": (100, 1e-9), "max_kl": (8, 1e-5),
                      "disagree": (4, 0.002)}


def emulate(model: SamOut, manifest: Manifest, golden, rounding: str,
            dtype: torch.dtype = torch.float32) -> list[dict[str, np.ndarray]]:
    """``model`` (a quantized reference with int8 activations) on every golden case, its kernel
    emulated with ``rounding`` (models/quantize.py: x86, arm or fp) and computed in ``dtype``:
    logits and state. A case that takes its state from an earlier one takes this emulation's
    own state, as a runner of that family feeds its own back in verify. Each case keeps the outputs
    the golden one recorded, no more: the every-id cases record layer 0's state (and logits only
    where small), and the seed preset's other outputs there (10,000 rows of logits) made the arm and
    fp golden files 700 MB (over MAX_GOLDEN_FILE_BYTES: unreadable) and their bounds' statistics
    10,055 rows where verify compares 55."""
    arch, layers = manifest.spec, manifest.config.num_layers
    past_names, present_names = graph.past_names(arch, layers), graph.present_names(arch, layers)
    model = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
    outputs: list[dict[str, np.ndarray]] = []
    presents: list[list[torch.Tensor]] = []
    with activation_rounding(rounding), torch.inference_mode():
        for case, feed, recorded in zip(golden.index.cases, golden.feeds, golden.outputs):
            if case.state_from is None:
                past = [torch.from_numpy(feed[n]).to(dtype) for n in past_names]
            else:
                past = presents[case.state_from]
            logits, present = model(torch.from_numpy(feed[graph.INPUT_IDS]), graph.unflatten(arch, past),
                                    last_only=manifest.logits == "last")
            flat = graph.flatten(arch, present)
            presents.append(flat)
            out = {graph.LOGITS: logits.float().numpy(), **{n: t.float().numpy() for n, t in zip(present_names, flat)}}
            outputs.append({n: v for n, v in out.items() if n in recorded})
    return outputs


def _spread(reference: list[dict[str, np.ndarray]], other: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """How far ``other`` is from ``reference`` over the golden cases: the largest relative error
    of any output, and the logits' mean KL and top-1 disagreement."""
    worst = 0.0
    for want, got in zip(reference, other):
        for name, ref in want.items():
            err, scale = max_abs_error(ref, got[name])
            worst = max(worst, err / max(1.0, scale))
    agree = agreement(reference, other)
    return {"rtol": worst, "kl": agree.kl, "median_kl": agree.median_kl, "max_kl": agree.max_kl,
            "disagree": 1.0 - agree.top1}


def int8_bounds(reference: SamOut, manifest: Manifest, golden) -> tuple[float, dict, dict]:
    """int8 activations: each kernel family's golden outputs (``golden.family_outputs``: arm, fp;
    the golden outputs are x86's) and verify's bounds for a runner of that family, from PyTorch
    emulations of the checkpoint's quantized model alone, never from the exported graph (a
    wrong graph must not set its own tolerance). Each family's emulation against itself in
    float64 shows the roundings an ulp flips (a kernel's own summation order flips the same);
    the bounds are multiples of its statistics (ACTIVATION_MARGINS), with floors, and never
    above the ceilings (ACTIVATION_CEILING).
    Returns (x86 rtol, what was measured, the bounds per family)."""
    runs = {"x86": golden.outputs}
    runs.update({family: emulate(reference, manifest, golden, family) for family in ("arm", "fp")})
    golden.family_outputs = {family: runs[family] for family in ("arm", "fp")}
    flips, bounds = {}, {}
    for family, outputs in runs.items():
        flips[family] = _spread(outputs, emulate(reference, manifest, golden, family, torch.float64))
        spread = flips[family]
        # at most the ceiling: a model whose kernels' own roundings move it further (random weights: the seed
        # preset's top token changes in 1.8% of rows between ONNX Runtime and its emulation) fails verify, loudly
        bounds[family] = {name: min(ACTIVATION_CEILING[name], max(floor, float(f"{factor * spread[name]:.2g}")))
                          for name, (factor, floor) in ACTIVATION_MARGINS.items()}
    check = {"flips": flips, "x86_vs": {family: _spread(golden.outputs, runs[family]) for family in ("arm", "fp")},
             "rule": "per kernel family, from PyTorch emulations only (never the graph): the family's float32 "
                     "emulation against the same in float64; bound = max(floor, factor x that spread) per statistic "
                     f"(factor, floor: {ACTIVATION_MARGINS}), at most the ceilings {ACTIVATION_CEILING}"}
    return bounds["x86"]["rtol"], check, bounds
