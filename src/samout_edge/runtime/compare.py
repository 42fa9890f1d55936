"""Compare any two runners on the same tokens: prefill, and prefill-then-decode.

The tolerance is relative to the output's scale: an output passes when
``max|actual - reference| <= rtol * max(1, max|reference|)``.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import numpy as np

from samout_edge.runtime.base import Runner


@dataclass
class OutputError:
    check: str  # e.g. "prefill seq=97 batch=2"
    output: str  # logits, present_max.*, present.*.key, ...
    max_abs_err: float
    scale: float  # max |reference|
    tolerance: float
    passed: bool
    worst: str = ""  # the output (layer) where the error peaked

    def to_dict(self) -> dict:
        return asdict(self)


def output_group(name: str) -> str:
    """present_max.3 -> present_max.*; present.0.key -> present.*.key"""
    return re.sub(r"\.\d+(\.|$)", r".*\1", name)


def compare_arrays(check: str, reference: dict[str, np.ndarray], actual: dict[str, np.ndarray], rtol: float) -> list[OutputError]:
    """One row per output group (all layers of a state together), naming the worst layer."""
    groups: dict[str, list[OutputError]] = {}
    for name, ref in reference.items():
        err, scale = max_abs_error(ref, actual[name])
        tolerance = rtol * max(1.0, scale)
        row = OutputError(check, output_group(name), err, scale, tolerance, err <= tolerance, name)
        groups.setdefault(row.output, []).append(row)
    rows = []
    for members in groups.values():
        worst = max(members, key=lambda r: r.max_abs_err / r.tolerance)
        worst.passed = all(r.passed for r in members)
        rows.append(worst)
    return rows


def max_abs_error(reference: np.ndarray, actual: np.ndarray) -> tuple[float, float]:
    """(max |actual - reference|, max |reference|); a shape mismatch or NaN is an infinite error."""
    ref = reference.astype(np.float64)
    scale = float(np.abs(ref).max(initial=0.0))
    if actual.shape != reference.shape:
        return float("inf"), scale
    err = float(np.abs(actual.astype(np.float64) - ref).max(initial=0.0))
    return (float("inf") if np.isnan(err) else err), scale


def run_numpy(runner: Runner, input_ids: np.ndarray, state=None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    state = runner.initial_state(input_ids.shape[0]) if state is None else state
    logits, new_state = runner.run(input_ids, state)
    return runner.to_numpy(logits), new_state


def compare_prefill(reference: Runner, actual: Runner, input_ids: np.ndarray, rtol: float, check: str) -> list[OutputError]:
    ref_logits, ref_state = run_numpy(reference, input_ids)
    got_logits, got_state = run_numpy(actual, input_ids)
    ref = {"logits": ref_logits, **{k: reference.to_numpy(v) for k, v in ref_state.items()}}
    got = {"logits": got_logits, **{k: actual.to_numpy(v) for k, v in got_state.items()}}
    return compare_arrays(check, ref, got, rtol)


def compare_decode(
    reference: Runner, actual: Runner, input_ids: np.ndarray, prefill: int, rtol: float, check: str
) -> list[OutputError]:
    """``actual`` prefills ``prefill`` tokens, then decodes the rest one token at a time,
    feeding each returned state back; each step's logits must match ``reference``
    run on the whole sequence so far, and the final state its state after it all."""
    total = input_ids.shape[1]
    logits, state = run_numpy(actual, input_ids[:, :prefill])
    got_last, ref_last = [logits[:, -1]], []
    for pos in range(prefill, total):
        logits, state = actual.run(input_ids[:, pos : pos + 1], state)
        got_last.append(actual.to_numpy(logits)[:, -1])
    for end in range(prefill, total + 1):
        ref_logits, ref_state = run_numpy(reference, input_ids[:, :end])
        ref_last.append(ref_logits[:, -1])
    ref = {"logits": np.stack(ref_last, 1), **{k: reference.to_numpy(v) for k, v in ref_state.items()}}
    got = {"logits": np.stack(got_last, 1), **{k: actual.to_numpy(v) for k, v in state.items()}}
    return compare_arrays(check, ref, got, rtol)


@dataclass
class Agreement:
    """How far two runs' next-token distributions are apart over many rows of logits: what a
    fault changes everywhere (a wrong scale, a moved blend) while an int8 rounding that flips
    here and there does not. ``kl``: mean KL(reference || actual) in nats; ``median_kl``, ``max_kl``;
    ``top1``: the share of rows with the same argmax; ``rows``: how many rows were compared."""

    kl: float = 0.0
    top1: float = 1.0
    rows: int = 0
    row_kls: list = field(default_factory=list, repr=False)  # every row's KL, for the median

    @property
    def median_kl(self) -> float:
        """The middle row's KL: a rounding flip moves a few rows, a wrong weight moves most of them
        (trained SamOut, int8 compute: flips 1e-13, one negated scale row 3e-5)."""
        return float(np.median(np.concatenate(self.row_kls))) if self.row_kls else 0.0

    @property
    def max_kl(self) -> float:
        """The worst row's KL: a fault confined to a few rows (one embedding row) shows here
        before it moves the mean."""
        return float(max(k.max(initial=0.0) for k in self.row_kls)) if self.row_kls else 0.0

    def add(self, reference: np.ndarray, actual: np.ndarray) -> None:
        """Fold in one output of logits (any leading shape, vocab last)."""
        ref = reference.reshape(-1, reference.shape[-1]).astype(np.float64)
        got = actual.reshape(-1, actual.shape[-1]).astype(np.float64)
        log_ref = ref - np.logaddexp.reduce(ref, axis=-1, keepdims=True)
        log_got = got - np.logaddexp.reduce(got, axis=-1, keepdims=True)
        kl = (np.exp(log_ref) * (log_ref - log_got)).sum(-1)
        kl = np.where(np.isfinite(kl), kl, np.inf)
        self.row_kls.append(kl)
        n = self.rows + len(ref)
        same = (ref.argmax(-1) == got.argmax(-1)).sum()
        self.kl = float((self.kl * self.rows + kl.sum()) / n)
        self.top1 = float((self.top1 * self.rows + same) / n)
        self.rows = n


def agreement(references: list[dict[str, np.ndarray]], actuals: list[dict[str, np.ndarray]],
              name: str = "logits") -> Agreement:
    """``Agreement`` over every pair of outputs that both hold ``name``."""
    total = Agreement()
    for ref, got in zip(references, actuals):
        if name in ref and name in got:
            total.add(ref[name], got[name])
    return total
