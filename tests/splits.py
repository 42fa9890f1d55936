"""The one check every arch's export passes: a sequence fed as one runner call (chunked inside
by max_seq and the micro-batch), as one PyTorch call on the whole, and one token at a time
gives the same logits and the same final state, within ``rtol`` of the scale."""

from __future__ import annotations

import numpy as np


def close(a, b, rtol: float) -> bool:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return a.shape == b.shape and float(np.abs(a - b).max()) <= rtol * max(1.0, float(np.abs(b).max()))


def check_any_split(runner, reference, ids: np.ndarray, rtol: float) -> dict:
    """``runner`` (an export) against ``reference`` (PyTorch on the whole, no length limit); returns the
    token-by-token final state, for an arch's own checks on it."""
    chunked, state = runner.run(ids, runner.initial_state(len(ids)))
    whole, whole_state = reference.run(ids, reference.initial_state(len(ids)))
    assert close(chunked, reference.to_numpy(whole), rtol)
    for name, value in state.items():
        assert close(value, reference.to_numpy(whole_state[name]), rtol), name
    steps, step_state = [], runner.initial_state(len(ids))
    for t in range(ids.shape[1]):
        logits, step_state = runner.run(ids[:, t : t + 1], step_state)
        steps.append(runner.to_numpy(logits)[:, 0])
    assert close(np.stack(steps, 1), chunked, rtol)
    for name, value in step_state.items():  # a running max over any split is the running max
        assert close(value, state[name], rtol), name
    return step_state
