"""PyTorch eager: the reference every export is checked against, and the ``torch`` backend
(an export's source checkpoint computing what the export computes, or a checkpoint itself).

Importable without torch, so the backend registers on the device install too: torch and
the models are imported where a runner is made, after the registry has said what is missing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from samout_edge.artifact import graph
from samout_edge.artifact.arch import ArchSpec
from samout_edge.artifact.capabilities import Capabilities, Requirement
from samout_edge.errors import EXPORT_INSTALL, SamoutError
from samout_edge.runtime.backend import Backend, BackendOptions, option
from samout_edge.runtime.base import Runner, RunnerInfo, State

TORCH_DEVICES = ("auto", "cpu", "cuda")


class TorchRunner(Runner):
    def __init__(self, model, dtype: str = "fp32", logits: str = "all", device: str = "cpu"):
        import torch

        from samout_edge.models.model import torch_dtype

        self.model = model.to(device=device, dtype=torch_dtype(dtype)).eval()
        self.device = torch.device(device)
        self.names = graph.past_names(model.spec, model.config.num_layers)
        self.info = RunnerInfo("torch", self.device.type, model.spec, dtype, logits, None, model.config,
                               computes_fp16=True, memory="cuda" if self.device.type == "cuda" else "host")

    def initial_state(self, batch: int) -> State:
        return dict(zip(self.names, graph.flatten(self.model.spec, self.model.empty_state(batch))))

    def run_impl(self, input_ids, state: State):
        import torch

        with torch.inference_mode():
            ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long, device=self.device)
            past = graph.unflatten(self.model.spec, [torch.as_tensor(state[n], device=self.device) for n in self.names])
            logits, present = self.model(ids, past, last_only=self.info.logits == "last")
        return logits, dict(zip(self.names, graph.flatten(self.model.spec, present)))

    def to_numpy(self, value) -> np.ndarray:
        import torch

        return value.detach().float().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)

    def host_state(self, state: State) -> dict[str, np.ndarray]:
        return {name: value.detach().cpu().numpy() for name, value in state.items()}  # in the model's dtype

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)


def torch_device(device: str | None) -> str:
    """'auto' or None -> cuda when available, else cpu; a named device is checked."""
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise SamoutError(f"unknown torch device {device!r}; choose auto, cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SamoutError(f"device {device!r} asked for, but torch sees no CUDA device here")
    return device


def load_torch_runner(
    checkpoint: Any, arch: ArchSpec | str, dtype: str = "fp32", logits: str = "all", device: str = "cpu",
    fast_kernel: bool = True, export_dir: Path | None = None, alpha: float | None = None,
) -> TorchRunner:
    """On CUDA, ``fast_kernel`` swaps torch.cummax and the blocked linear scan for the Triton scans (when Triton is there).
    ``export_dir``: a quantized export whose dequantized weights (read from its graph) the
    model takes, so the runner computes what the graph computes. ``alpha``: a hybrid made
    of SamOut weights at a stated blend (``stated_alpha`` of its export). ``arch``: the spec, or
    a name a user gave (decoded by ``Checkpoint.model``)."""
    from samout_edge.models.ops import FAST_KERNELS, FAST_LINEAR_KERNELS

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
            FAST_LINEAR_KERNELS.pop("cuda", None)
        label = "cuda+triton" if fast_kernel else "cuda"
        runner.info = dataclasses.replace(runner.info, device=label)
    return runner


def fp32_reference(source: Path, manifest: Any, checkpoint: Path | None, arch: str, heads: int | None,
                   hint: str, logits: str = "all") -> TorchRunner:
    """The PyTorch fp32 model a target is scored against: an export's float source checkpoint
    (``checkpoint``: a copy of it, where it has moved; ``hint``: what to do when it is gone), or
    ``source`` itself when it is a checkpoint (``manifest`` None), as ``arch``."""
    from samout_edge.artifact.manifest import stated_alpha
    from samout_edge.models.checkpoint import COPY_HINT, load_checkpoint, source_checkpoint

    if manifest is not None:
        ckpt = source_checkpoint(Path(source), manifest, checkpoint, COPY_HINT if checkpoint else hint)
        return load_torch_runner(ckpt, manifest.spec, "fp32", logits, alpha=stated_alpha(manifest))
    return load_torch_runner(load_checkpoint(source, heads), arch, "fp32", logits)


@dataclass(frozen=True)
class TorchOptions(BackendOptions):
    device: str = option("auto", "torch device: auto (cuda when present), cpu or cuda.", choices=TORCH_DEVICES)
    fast_kernel: bool = option(True, "torch on CUDA: the Triton cummax (default) or torch.cummax.")
    checkpoint: str | Path | None = option(None, "The export's source checkpoint, where it has moved.", cli=False)

    def for_bench(self) -> list[TorchOptions]:
        """Bench names the device it ran on (its machine row describes that GPU)."""
        return [TorchOptions(torch_device(self.device), self.fast_kernel, self.checkpoint)]


def _load(directory: Path, options: TorchOptions) -> TorchRunner:
    """The export's source checkpoint, eagerly, with the export's arch, dtype, logits mode and
    (quantized exports) dequantized weights, so it computes what the graph computes."""
    from samout_edge.artifact.manifest import read_manifest, stated_alpha
    from samout_edge.models.checkpoint import COPY_HINT, source_checkpoint

    manifest = read_manifest(directory)
    hint = "put it back there, or run the export on another backend (ort)"
    ckpt = source_checkpoint(directory, manifest, options.checkpoint, COPY_HINT if options.checkpoint else hint)
    return load_torch_runner(ckpt, manifest.spec, manifest.dtype, manifest.logits, torch_device(options.device),
                             options.fast_kernel, export_dir=directory, alpha=stated_alpha(manifest))


def _load_checkpoint(path: Path, options: TorchOptions, arch: ArchSpec, heads: int | None, logits: str) -> TorchRunner:
    """A checkpoint itself, in fp32, as ``arch`` (``heads``: a bare state_dict's head count)."""
    from samout_edge.models.checkpoint import load_checkpoint

    return load_torch_runner(load_checkpoint(path, heads), arch, "fp32", logits, torch_device(options.device),
                             options.fast_kernel)


BACKEND = Backend(
    "torch", TorchOptions, _load, "PyTorch eager on the export's source checkpoint (--device; needs torch)",
    # int8 activations: it emulates the kernel's quantization (models/quantize.py)
    Capabilities("PyTorch", activations=("fp", "int8"), requires=(Requirement("torch", "PyTorch", EXPORT_INSTALL),)),
    load_checkpoint=_load_checkpoint,
)
