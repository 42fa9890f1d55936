"""Prefill in micro-batches (issue 29 part 3): a long prompt is fed in calls of at most
``ubatch`` tokens (256 by default; llama.cpp's 512), the state carried, whatever the
export's max_seq, so the working memory of a call is bounded; the result is the
result of the whole. verify still checks the graph at the lengths it takes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from samout_edge.artifact.graph import PREFILL_UBATCH
from samout_edge.artifact.quantization import RTOL
from samout_edge.profiles import load_profile
from samout_edge.profiles.memory_plan import memory_plan
from samout_edge.runtime.target import open_runner, resolve_target
from samout_edge.runtime.verify import verify


class Counting:
    """Records the length of every backend call a runner makes."""

    def __init__(self, runner):
        self.lengths: list[int] = []
        inner = runner.run_impl

        def run_impl(ids, state):
            self.lengths.append(int(np.shape(ids)[1]))
            return inner(ids, state)

        runner.run_impl = run_impl


def close(a, b) -> bool:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max()) <= RTOL["fp32"] * max(1.0, float(np.abs(b).max()))


@pytest.mark.parametrize("arch", ["cummax", "softmax", "linear"])
def test_calls_of_ubatch_tokens_give_the_whole(exported, arch):
    d = exported(arch=arch, max_seq=300, logits="all").directory
    ids = np.random.default_rng(0).integers(1, 128, (2, 700))
    target = resolve_target(d)
    with open_runner(target, "ort", ubatch=128) as small, open_runner(target, "ort", ubatch=0) as whole:
        assert small.ubatch == 128 and whole.ubatch is None
        calls = Counting(small)
        got, got_state = small.run(ids, small.initial_state(2))
        want, want_state = whole.run(ids, whole.initial_state(2))
        assert calls.lengths == [128] * 5 + [60]  # never more than ubatch per call
        assert close(got, want) and got.shape == want.shape == (2, 700, 128)
        assert all(close(got_state[k], want_state[k]) for k in want_state)


def test_the_default_micro_batch_and_the_graphs_limit(exported):
    d = exported(max_seq=300).directory
    with open_runner(resolve_target(d), "ort") as runner:
        assert runner.ubatch == PREFILL_UBATCH == 256
        calls = Counting(runner)
        runner.run(np.ones((1, 700), np.int64), runner.initial_state(1))
        assert calls.lengths == [256, 256, 188]  # the micro-batch is shorter than max_seq here
        runner.ubatch = None
        calls.lengths.clear()
        runner.run(np.ones((1, 700), np.int64), runner.initial_state(1))
        assert calls.lengths == [300, 300, 100]  # no micro-batch: the graph's limit


def test_verify_checks_the_graph_at_its_own_lengths(exported):
    """A runner's micro-batch is not verify's: it feeds the graph calls of max_seq."""
    d = exported(max_seq=300).directory
    result = verify(d, lengths=[1, 300, 700])
    assert result.passed and any("x300" in c.check for c in result.checks)


def test_the_cli_takes_ubatch(run_cli, exported, tmp_path):
    d = exported(max_seq=300).directory
    a = run_cli("generate", str(d), "--ids", ",".join(["5"] * 600), "--max-new-tokens", "4", "--json", "--ubatch", "64")
    b = run_cli("generate", str(d), "--ids", ",".join(["5"] * 600), "--max-new-tokens", "4", "--json", "--ubatch", "0")
    assert a[0] == b[0] == 0 and json.loads(a[1])["new_ids"] == json.loads(b[1])["new_ids"]
    code, _, err = run_cli("generate", str(d), "--ids", "1,2", "--ubatch", "-1")
    assert code == 2 and "--ubatch" in err


def test_plan_counts_a_call_of_ubatch_tokens():
    from samout_edge.artifact.config import PRESETS

    profile = load_profile("jetson-orin-nano-8gb")
    wide = memory_plan(PRESETS["seed"], profile, "fp16", contexts=[4096], ubatch=None)
    narrow = memory_plan(PRESETS["seed"], profile, "fp16", contexts=[4096], ubatch=64)
    assert narrow.chunk == 64 < wide.chunk == profile.prefill.seq.opt
    assert narrow.rows[0].archs["cummax"].activations < wide.rows[0].archs["cummax"].activations
    assert any("64 tokens" in line for line in narrow.assumptions)
