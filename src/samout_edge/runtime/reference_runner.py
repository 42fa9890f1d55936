"""onnx.reference behind the Runner interface: the graph computed in its own dtype.

ONNX Runtime's CPU provider computes an fp16 graph in fp32; TensorRT, the CUDA
provider and onnx.reference compute it in fp16. So this runner is how a machine
without a GPU sees what a Jetson computes (overflow included), and verify runs an
fp16 export's golden cases here too. It is numpy, node by node: slow (about 1
GFLOP/s on one core), so verify gives it a budget (runtime/verify.py).
Model-local functions (a custom export's CumMax) are inlined first, since the
reference evaluator does not run them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from samout_edge.artifact import graph
from samout_edge.artifact.capabilities import Capabilities
from samout_edge.artifact.manifest import MODEL_FILE, Manifest, check_graph_metadata, read_manifest
from samout_edge.errors import SamoutError
from samout_edge.runtime.backend import Backend, BackendOptions
from samout_edge.runtime.base import Runner, RunnerInfo, State

# Measured: the seed preset's fp16 export, 1x1024 tokens, 28 s on one 2-core EPYC core.
FLOPS_PER_SECOND = 1.2e9


class ReferenceRunner(Runner):
    def __init__(self, evaluator, manifest: Manifest):
        self.evaluator, self.manifest = evaluator, manifest
        self.output_names = [o.name for o in evaluator.proto_.graph.output]
        self.to_past = graph.present_to_past(manifest.spec, manifest.config.num_layers)
        self.info = RunnerInfo("reference", "onnx.reference", manifest.spec, manifest.dtype, manifest.logits,
                               manifest.max_seq, manifest.config, computes_fp16=True)

    def initial_state(self, batch: int) -> State:
        return graph.empty_state(self.manifest.config, self.manifest.spec, batch, self.manifest.dtype)

    def run_impl(self, input_ids, state: State):
        feeds = {graph.INPUT_IDS: np.ascontiguousarray(input_ids, dtype=np.int64), **state}
        with warnings.catch_warnings(), np.errstate(all="ignore"):  # overflow is an answer here, not a warning
            warnings.simplefilter("ignore")
            results = dict(zip(self.output_names, self.evaluator.run(None, feeds)))
        return results[graph.LOGITS], {self.to_past[k]: v for k, v in results.items() if k in self.to_past}

    def close(self) -> None:
        self.evaluator = None


def load_reference_runner(directory: str | Path) -> ReferenceRunner:
    import onnx
    import onnx.inliner
    from onnx.reference import ReferenceEvaluator

    manifest = read_manifest(directory)
    path = Path(directory) / MODEL_FILE
    try:
        model = onnx.load(str(path))
        if model.functions:
            model = onnx.inliner.inline_local_functions(model)
        check_graph_metadata({p.key: p.value for p in model.metadata_props}, manifest)
        evaluator = ReferenceEvaluator(model)
    except SamoutError:
        raise
    except Exception as e:  # onnx raises its own types: an unknown domain (MatMulNBits), a bad file
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SamoutError(f"onnx.reference cannot run this export's graph ({reason})") from None
    return ReferenceRunner(evaluator, manifest)


def estimated_seconds(manifest: Manifest, batch: int, seq: int) -> float:
    """About how long onnx.reference takes for one call: two FLOPs per weight per token
    (the head only for the logits returned)."""
    cfg = manifest.config
    head = cfg.hidden_size * cfg.vocab_size
    per_token = cfg.parameter_count() - 2 * head  # every layer's weights (the embedding is a lookup)
    head_rows = batch * (seq if manifest.logits == "all" else 1)
    return 2.0 * (batch * seq * per_token + head_rows * head) / FLOPS_PER_SECOND


@dataclass(frozen=True)
class ReferenceOptions(BackendOptions):
    """onnx.reference has no settings: the graph, in its own dtype."""


def _load(directory: Path, options: ReferenceOptions) -> ReferenceRunner:
    return load_reference_runner(directory)


# custom_ops: the loader inlines a custom export's functions, which the evaluator does not run itself
BACKEND = Backend("reference", ReferenceOptions, _load, "onnx.reference: the graph computed in its own dtype (slow)",
                  Capabilities("onnx.reference"))
