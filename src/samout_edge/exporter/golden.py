"""Record the golden cases an export carries: PyTorch fp32 on fixed inputs.

The cases cover what a wrong graph gets wrong: prefill at 1 token, at a prime
length near 100, at max_seq - 1 and max_seq (a scan unrolled too short fails there); batch 2
where it is cheap; ids that include 0 (the padding row of the embedding) and
vocab-1; a prefill followed by one-token decode steps, each step's past the
state the step before returned; a chain of calls of every length from 1 to 16
and both sides of the scan's block, the state carried (a decode shortcut or a
scan wrong at 2..16 tokens fails there); for a state that does not grow (cummax, a softmax
window), a prompt of 2.5 x max_seq (or past the window) in calls of max_seq and
decode steps after it (against PyTorch on the whole sequence);
and every id once, so every embedding row a token selects is checked (its first
layer's state; logits where they are small).
"""

from __future__ import annotations

import numpy as np
import torch

from samout_edge.artifact import graph
from samout_edge.artifact.golden import (
    BATCH2_UP_TO,
    CALLS,
    DECODE_PREFILL,
    DECODE_STEPS,
    LONG,
    LONG_FACTOR,
    LONG_STEPS,
    LONG_WINDOW_FACTOR,
    MAX_OUTPUT_BYTES,
    Golden,
    GoldenCase,
    GoldenIndex,
    chain_lengths,
    every_id_chunks,
    every_id_name,
    every_id_row_bytes,
    every_id_step,
    feed_budget,
    golden_ids,
    golden_lengths,
)
from samout_edge.artifact.manifest import Manifest
from samout_edge.models.model import SamOut


def chain(model: SamOut, manifest: Manifest, ids: np.ndarray, bounds: list[tuple[int, int]], names: list[str],
          cases: list[GoldenCase], feeds: list[dict[str, np.ndarray]], outputs: list[dict[str, np.ndarray]]) -> None:
    """Calls ``ids[:, start:end]`` for each of ``bounds`` in order, each call's past the state the
    one before returned. Each call's outputs are PyTorch's on the whole sequence so far (no
    chunks), so chunked == whole is checked on the device, one Polygraphy iteration per call."""
    cfg, arch = manifest.config, manifest.spec
    past_names, present_names = graph.past_names(arch, cfg.num_layers), graph.present_names(arch, cfg.num_layers)
    batch = ids.shape[0]
    state = graph.empty_state(cfg, arch, batch, manifest.dtype)
    for k, (start, end) in enumerate(bounds):
        with torch.inference_mode():
            logits, present = model(torch.from_numpy(ids[:, :end]), None, last_only=manifest.logits == "last")
        logits = logits.numpy() if manifest.logits == "last" else logits[:, start:end].numpy()
        result = {graph.LOGITS: logits, **{n: t.numpy() for n, t in zip(present_names, graph.flatten(arch, present))}}
        skipped = [n for n, v in result.items() if v.nbytes > MAX_OUTPUT_BYTES]
        cases.append(GoldenCase(names[k], batch, end - start, start,
                                len(cases) - 1 if k else None, skipped))
        feeds.append({graph.INPUT_IDS: ids[:, start:end].astype(np.int64), **state})
        outputs.append({n: v.copy() for n, v in result.items() if n not in skipped})
        state = {p: result[n].astype(graph.numpy_dtype(manifest.dtype)) for p, n in zip(past_names, present_names)}


def calls_case(rng: np.random.Generator, model: SamOut, manifest: Manifest, cases: list[GoldenCase],
               feeds: list[dict[str, np.ndarray]], outputs: list[dict[str, np.ndarray]]) -> None:
    """One call of every short length (``chain_lengths``), the state carried: a graph whose
    decode shortcut or scan is wrong at 2..16 tokens, or at the block's edge, fails here."""
    lengths = chain_lengths(manifest.max_seq, manifest.scan["block"])
    ends = np.cumsum(lengths)
    ids = golden_ids(rng, manifest.config.vocab_size, 2 if ends[-1] <= BATCH2_UP_TO * 2 else 1, int(ends[-1]))
    bounds = [(int(e - n), int(e)) for n, e in zip(lengths, ends)]
    names = [f"{CALLS} {ids.shape[0]}x{ends[-1]}: call {k + 1} ({n} token{'s' * (n > 1)})" for k, n in enumerate(lengths)]
    chain(model, manifest, ids, bounds, names, cases, feeds, outputs)


def long_case(rng: np.random.Generator, model: SamOut, manifest: Manifest, cases: list[GoldenCase],
              feeds: list[dict[str, np.ndarray]], outputs: list[dict[str, np.ndarray]]) -> None:
    """A prompt of LONG_FACTOR x max_seq as a chain of calls of at most max_seq, then decode
    steps, against PyTorch on the whole sequence."""
    max_seq = manifest.max_seq
    total = int(LONG_FACTOR * max_seq) + 1
    window = manifest.spec.window
    if window < LONG_WINDOW_FACTOR * max_seq:  # the decode steps after it run with the window full of real tokens
        total = max(total, window + 1)
    ids = golden_ids(rng, manifest.config.vocab_size, 1, total + LONG_STEPS)
    bounds = [(a, min(a + max_seq, total)) for a in range(0, total, max_seq)]
    names = [f"{LONG} 1x{total}: call {k + 1}" for k in range(len(bounds))]
    names += [f"{LONG} 1x{total}: step {k + 1}" for k in range(LONG_STEPS)]
    bounds += [(total + k, total + k + 1) for k in range(LONG_STEPS)]
    chain(model, manifest, ids, bounds, names, cases, feeds, outputs)


def record_golden(model: SamOut, manifest: Manifest, rtol: float, text_ids: np.ndarray | None = None) -> Golden:
    """Run ``model`` (fp32, on the CPU) on every golden case; ``rtol`` is verify's
    tolerance for the export, from which Polygraphy's absolute one is derived.
    ``text_ids`` (the calibration text): one more case on real text, whose activations
    random ids may never reach (an fp16 overflow shows there on the device)."""
    model = model.float().eval()
    cfg, arch = manifest.config, manifest.spec
    past_names = graph.past_names(arch, cfg.num_layers)
    present_names = graph.present_names(arch, cfg.num_layers)
    np_dtype = graph.numpy_dtype(manifest.dtype)
    rng = np.random.default_rng(20261126)
    cases: list[GoldenCase] = []
    feeds: list[dict[str, np.ndarray]] = []
    outputs: list[dict[str, np.ndarray]] = []

    def run(name: str, ids: np.ndarray, state: list | None, past: int, state_from: int | None,
            record: set[str] | None = None) -> list:
        """Record the case; ``record``: only these outputs (None: every one that fits MAX_OUTPUT_BYTES)."""
        batch, seq = ids.shape
        if state is None:
            feed_state = graph.empty_state(cfg, arch, batch, manifest.dtype)
        else:
            flat = graph.flatten(arch, state)
            feed_state = {n: t.numpy().astype(np_dtype) for n, t in zip(past_names, flat)}
        with torch.inference_mode():
            logits, present = model(torch.from_numpy(ids), state, last_only=manifest.logits == "last")
        result = {graph.LOGITS: logits.numpy(), **{n: t.numpy() for n, t in zip(present_names, graph.flatten(arch, present))}}
        if record is not None:
            result = {n: v for n, v in result.items() if n in record}
        skipped = [n for n, v in result.items() if v.nbytes > MAX_OUTPUT_BYTES]
        cases.append(GoldenCase(name, batch, seq, past, state_from, skipped))
        feeds.append({graph.INPUT_IDS: ids.astype(np.int64), **feed_state})
        outputs.append({n: v.copy() for n, v in result.items() if n not in skipped})
        return present

    for length in golden_lengths(manifest.max_seq, manifest.trace["seq"]):
        batch = 2 if length <= BATCH2_UP_TO else 1
        run(f"prefill {batch}x{length}", golden_ids(rng, cfg.vocab_size, batch, length), None, 0, None)
    prefill = max(1, min(DECODE_PREFILL, manifest.max_seq - DECODE_STEPS))
    steps = min(DECODE_STEPS, manifest.max_seq - prefill)
    ids = golden_ids(rng, cfg.vocab_size, 2, prefill + steps)
    state = run(f"decode 2x{prefill}: prefill", ids[:, :prefill], None, 0, None)
    for k in range(steps):
        pos = prefill + k
        state = run(f"decode 2x{prefill}: step {k + 1}", ids[:, pos : pos + 1], state, pos, len(cases) - 1)
    if text_ids is not None and len(text_ids):
        window = np.asarray(text_ids[: manifest.max_seq], dtype=np.int64)[None]
        run(f"text 1x{window.shape[1]}", window, None, 0, None)
    calls_case(rng, model, manifest, cases, feeds, outputs)
    if not arch.grows:  # past max_seq: chunks of max_seq with the state carried, as every runner feeds them
        long_case(rng, model, manifest, cases, feeds, outputs)
    first_state = present_names[0]  # a linear function of each row's embedding
    first, row = every_id_row_bytes(cfg, arch)
    for ids in every_id_chunks(cfg.vocab_size, first, row, every_id_step(cfg.vocab_size, row, feed_budget(feeds))):
        small = len(ids) * cfg.vocab_size * 4 <= MAX_OUTPUT_BYTES
        run(every_id_name(ids), ids[:, None], None, 0, None, record={first_state, graph.LOGITS} if small else {first_state})
    return Golden(GoldenIndex(cases, atol=polygraphy_atol(rtol, outputs)), feeds, outputs)


def polygraphy_atol(rtol: float, outputs: list[dict[str, np.ndarray]]) -> float:
    """Polygraphy's one absolute tolerance for every case: verify's relative one at the largest
    output (3 digits, never below verify's own)."""
    scale = max(float(np.abs(v).max(initial=0.0)) for out in outputs for v in out.values())
    return float(f"{rtol * max(1.0, scale) * 1.005:.3g}")
