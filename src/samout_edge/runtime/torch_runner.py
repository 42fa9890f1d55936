"""PyTorch eager: the reference every export is checked against."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from samout_edge.artifact import graph
from samout_edge.errors import SamoutError
from samout_edge.models.checkpoint import Checkpoint
from samout_edge.models.model import torch_dtype
from samout_edge.runtime.base import Runner, RunnerInfo, State


class TorchRunner(Runner):
    def __init__(self, model, dtype: str = "fp32", logits: str = "all", device: str = "cpu"):
        self.model = model.to(device=device, dtype=torch_dtype(dtype)).eval()
        self.device = torch.device(device)
        self.names = graph.past_names(model.arch, model.config.num_layers)
        self.info = RunnerInfo("torch", self.device.type, model.arch, dtype, logits, None, model.config)

    def initial_state(self, batch: int) -> State:
        return dict(zip(self.names, graph.flatten(self.model.arch, self.model.empty_state(batch))))

    @torch.inference_mode()
    def run_impl(self, input_ids, state: State):
        ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long, device=self.device)
        past = graph.unflatten(self.model.arch, [torch.as_tensor(state[n], device=self.device) for n in self.names])
        logits, present = self.model(ids, past, last_only=self.info.logits == "last")
        return logits, dict(zip(self.names, graph.flatten(self.model.arch, present)))

    def to_numpy(self, value) -> np.ndarray:
        return value.detach().float().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)

    def host_state(self, state: State) -> dict[str, np.ndarray]:
        return {name: value.detach().cpu().numpy() for name, value in state.items()}  # in the model's dtype

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def torch_device(device: str | None) -> str:
    """'auto' or None -> cuda when available, else cpu; a named device is checked."""
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise SamoutError(f"unknown torch device {device!r}; choose auto, cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SamoutError(f"device {device!r} asked for, but torch sees no CUDA device here")
    return device


def load_torch_runner(
    checkpoint: Checkpoint, arch: str, dtype: str = "fp32", logits: str = "all", device: str = "cpu",
    fast_kernel: bool = True, export_dir: Path | None = None, alpha: float | None = None,
) -> TorchRunner:
    """On CUDA, ``fast_kernel`` swaps torch.cummax for the Triton scan (when Triton is there).
    ``export_dir``: a quantized export whose dequantized weights (read from its graph) the
    model takes, so the runner computes what the graph computes. ``alpha``: a hybrid made
    of SamOut weights at a stated blend (``stated_alpha`` of its export)."""
    from samout_edge.models.ops import FAST_KERNELS

    model = checkpoint.model(arch, alpha=alpha)
    if export_dir is not None:
        from samout_edge.artifact.manifest import MODEL_FILE, read_manifest
        from samout_edge.models.quantize import quantize_like_export

        weights = read_manifest(export_dir).weights
        if weights.quantized:
            import onnx

            quantize_like_export(model, weights, onnx.load(str(export_dir / MODEL_FILE)))  # with model.onnx.data, if any
    runner = TorchRunner(model, dtype=dtype, logits=logits, device=device)
    if device.startswith("cuda"):
        if fast_kernel:
            from samout_edge.kernels import enable_fast_cummax

            fast_kernel = enable_fast_cummax()
        else:
            FAST_KERNELS.pop("cuda", None)
        label = "cuda+triton" if fast_kernel else "cuda"
        runner.info = RunnerInfo(**{**runner.info.__dict__, "device": label})
    return runner
