"""TensorRT engines behind the same Runner interface (needs TensorRT and a CUDA GPU).

Buffers are torch CUDA tensors: the state a step returns is the next step's input,
never copied through the host. One-token calls use the engine's decode
optimization profile, longer ones its prefill profile.

An engine is only valid for the TensorRT version and GPU that built it, so the
runner checks engine.json first and says how to rebuild.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from samout_edge.artifact import graph
from samout_edge.artifact.engine import ENGINE_FILE, ENGINE_JSON, check_compatible, resolve_engine
from samout_edge.artifact.files import read_json
from samout_edge.artifact.manifest import read_manifest
from samout_edge.errors import SamoutError
from samout_edge.runtime.base import Runner, RunnerInfo, State


@dataclass(frozen=True)
class ProfileRanges:
    name: str
    index: int
    batch: tuple[int, int]
    seq: tuple[int, int]
    past: tuple[int, int] | None  # softmax past_seq range; None for cummax


def profile_ranges(meta: dict, arch: str) -> list[ProfileRanges]:
    out = []
    for index, prof in enumerate(meta["optimization_profiles"]):
        ids = prof["shapes"]["input_ids"]
        past = None
        if arch == "softmax":
            first = next(v for k, v in prof["shapes"].items() if k != "input_ids")
            past = (first["min"][2], first["max"][2])
        out.append(ProfileRanges(prof["name"], index, (ids["min"][0], ids["max"][0]), (ids["min"][1], ids["max"][1]), past))
    return out


def select_profile(ranges: list[ProfileRanges], batch: int, seq: int, past: int) -> ProfileRanges:
    """The decode profile for one token, else the first whose ranges hold the call's shapes."""
    def holds(r: ProfileRanges) -> bool:
        ok = r.batch[0] <= batch <= r.batch[1] and r.seq[0] <= seq <= r.seq[1]
        return ok and (r.past is None or r.past[0] <= past <= r.past[1])

    preferred = sorted(ranges, key=lambda r: (r.name != "decode") if seq == 1 else (r.name != "prefill"))
    for r in preferred:
        if holds(r):
            return r
    described = "; ".join(f"{r.name}: batch {r.batch[0]}..{r.batch[1]}, seq {r.seq[0]}..{r.seq[1]}"
                          + (f", past {r.past[0]}..{r.past[1]}" if r.past else "") for r in ranges)
    raise SamoutError(f"batch {batch}, seq {seq}, past {past} is outside every optimization profile of the engine ({described})")


class TensorRTRunner(Runner):
    def __init__(self, engine, meta: dict, manifest, export_dir: Path):
        import tensorrt as trt
        import torch

        self.trt, self.torch = trt, torch
        self.engine = engine
        self.context = engine.create_execution_context()
        self.manifest = manifest
        self.meta = meta
        self.ranges = profile_ranges(meta, manifest.arch)
        self.active = 0
        self.stream = torch.cuda.Stream()
        self.placeholder = torch.zeros(1, device="cuda")
        self.names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in self.names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in self.names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: _torch_dtype(trt, torch, engine.get_tensor_dtype(n)) for n in self.names}
        self.to_past = graph.present_to_past(manifest.arch, manifest.config.num_layers)
        longest = max(r.seq[1] for r in self.ranges)
        self.info = RunnerInfo("tensorrt", meta["profile"], manifest.arch, meta["precision"], manifest.logits,
                               min(manifest.max_seq, longest), manifest.config,
                               max_batch=min(r.batch[1] for r in self.ranges))

    def initial_state(self, batch: int) -> State:
        torch = self.torch
        cfg = self.manifest.config
        dtype = self.dtypes[self.inputs[1]]
        if self.manifest.arch == "cummax":
            shape = (batch, cfg.num_heads, 1, cfg.head_dim)
            return {n: torch.full(shape, torch.finfo(dtype).min, dtype=dtype, device="cuda") for n in self.inputs[1:]}
        shape = (batch, cfg.num_heads, 0, cfg.head_dim)
        return {n: torch.zeros(shape, dtype=dtype, device="cuda") for n in self.inputs[1:]}

    def run(self, input_ids, state: State):
        torch = self.torch
        ids = torch.as_tensor(np.asarray(input_ids), device="cuda").to(self.dtypes["input_ids"]).contiguous()
        batch, seq = ids.shape
        past = next(iter(state.values())).shape[2] if self.manifest.arch == "softmax" else 0
        chosen = select_profile(self.ranges, batch, seq, past)
        if chosen.index != self.active:
            if not self.context.set_optimization_profile_async(chosen.index, self.stream.cuda_stream):
                raise SamoutError(f"TensorRT refused to switch to the {chosen.name} optimization profile")
            self.active = chosen.index
        feeds = {"input_ids": ids, **{k: v.contiguous() for k, v in state.items()}}
        for name in self.inputs:
            if not self.context.set_input_shape(name, tuple(feeds[name].shape)):
                raise SamoutError(f"TensorRT refused shape {tuple(feeds[name].shape)} for {name}")
            # an empty tensor (the first softmax past) has no storage; TensorRT wants a valid address anyway
            self.context.set_tensor_address(name, feeds[name].data_ptr() or self.placeholder.data_ptr())
        outputs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            outputs[name] = torch.empty(shape, dtype=self.dtypes[name], device="cuda")
            self.context.set_tensor_address(name, outputs[name].data_ptr() or self.placeholder.data_ptr())
        self.stream.wait_stream(torch.cuda.current_stream())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise SamoutError("TensorRT failed to run the engine (see the TensorRT log)")
        torch.cuda.current_stream().wait_stream(self.stream)
        new_state = {self.to_past[k]: v for k, v in outputs.items() if k in self.to_past}
        return outputs["logits"], new_state

    def to_numpy(self, value) -> np.ndarray:
        return value.detach().float().cpu().numpy()

    def synchronize(self) -> None:
        self.torch.cuda.synchronize()


def _torch_dtype(trt, torch, dtype):
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.bool: torch.bool}
    if hasattr(trt, "int64"):
        table[trt.int64] = torch.int64
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    return table[dtype]


def load_trt_runner(path: str | Path, profile: str | None = None) -> TensorRTRunner:
    export_dir, engine_dir = resolve_engine(path, profile)
    meta = read_json(engine_dir / ENGINE_JSON, "engine.json")
    try:
        import tensorrt as trt
    except Exception:
        raise SamoutError("TensorRT is not installed here; engines run where TensorRT and a CUDA GPU are") from None
    from samout_edge.tensorrt.build import gpu_identity

    identity = gpu_identity()
    check_compatible(meta, trt.__version__, identity["gpu"], identity["compute_capability"], export_dir)
    manifest = read_manifest(export_dir)
    if meta.get("plugins"):
        from samout_edge.tensorrt.plugin import plugin_supported, register_cummax_plugin

        if plugin_supported(trt.__version__):  # else the parser runs the function body
            register_cummax_plugin(trt.__version__)
    logger = trt.Logger(trt.Logger.WARNING)
    trt.init_libnvinfer_plugins(logger, "")
    engine = trt.Runtime(logger).deserialize_cuda_engine((engine_dir / ENGINE_FILE).read_bytes())
    if engine is None:
        raise SamoutError(f"TensorRT could not deserialize {engine_dir / ENGINE_FILE}; rebuild it with `samout-edge build`")
    return TensorRTRunner(engine, meta, manifest, export_dir)
