"""OpenVINO behind the Runner interface: Intel CPUs, integrated GPUs and NPUs.

Needs ``openvino`` (the ``[openvino]`` extra); no torch. The export runs with the
settings that keep it the verified function (manifest.runtime_settings): f32
inference precision (OpenVINO's CPU default is bf16 where the CPU has it: offered
as ``precision="bf16"``, with its own looser tolerance), and for quantized weights
no dynamic quantization of the activations (OpenVINO's default quantizes them,
1-4% of the logit scale off on our exports). Model-local functions (a custom
export's CumMax) are not run by OpenVINO: such an export is refused with the
``inline`` hint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from samout_edge.artifact import graph
from samout_edge.artifact.capabilities import Capabilities, Requirement
from samout_edge.artifact.manifest import (
    MODEL_FILE,
    Manifest,
    check_graph_metadata,
    read_manifest,
    runtime_settings,
)
from samout_edge.errors import SamoutError, install_hint
from samout_edge.runtime.backend import Backend, BackendOptions, option
from samout_edge.runtime.base import Runner, RunnerInfo, State

INSTALL = install_hint("openvino")
# What each inference precision costs, relative to an output's scale (verify's rule); f32 is the
# export's own tolerance. bf16 keeps 8 bits of mantissa (eps 7.8e-3): the seed preset's logits
# measured about 1e-2 of the scale off through six layers.
PRECISIONS = {"f32": None, "bf16": 5e-2, "f16": 2e-2}


OPENVINO_TYPES = {"f32": "f32", "float32": "f32", "f16": "f16", "float16": "f16", "bf16": "bf16", "bfloat16": "bf16"}


def runs_in(compiled, asked: str) -> str:
    """The precision the compiled model really computes in: OpenVINO takes its hint as a wish, and
    on a CPU with bf16 but no fp16 arithmetic its f16 hint runs bf16 (then bf16's label and
    tolerance apply, not f16's). A value it does not name is refused, never guessed."""
    try:
        value = compiled.get_property("INFERENCE_PRECISION_HINT")
    except Exception:  # a device without the property computes what it was asked
        return asked
    name = getattr(value, "get_type_name", lambda: str(value))()
    ran = OPENVINO_TYPES.get(str(name).lower().replace("<type: '", "").rstrip("'>"))
    if ran is None:
        raise SamoutError(f"OpenVINO computes in {name}, which samout-edge has no tolerance for")
    return ran


class OpenVINORunner(Runner):
    def __init__(self, compiled, manifest: Manifest, device: str, precision: str):
        self.compiled, self.manifest = compiled, manifest
        self.request = compiled.create_infer_request()
        self.to_past = graph.present_to_past(manifest.spec, manifest.config.num_layers)
        self.outputs = [o.get_any_name() for o in compiled.outputs]
        ran = runs_in(compiled, precision)
        label = ran if ran == precision else f"{ran} ({precision} asked)"
        self.info = RunnerInfo("openvino", f"{device}:{label}", manifest.spec, manifest.dtype, manifest.logits,
                               manifest.max_seq, manifest.config, rtol=PRECISIONS[ran],
                               computes_fp16="CPU" not in device,
                               memory="host" if device.startswith("CPU") else None)  # a GPU's peak is not readable

    def initial_state(self, batch: int) -> State:
        return graph.empty_state(self.manifest.config, self.manifest.spec, batch, self.manifest.dtype)

    def run_impl(self, input_ids, state: State):
        feeds = {graph.INPUT_IDS: np.ascontiguousarray(input_ids, dtype=np.int64), **state}
        results = self.request.infer(feeds)
        values = {name: np.array(results[i]) for i, name in enumerate(self.outputs)}  # copies: the request reuses them
        return values[graph.LOGITS], {self.to_past[k]: v for k, v in values.items() if k in self.to_past}

    def close(self) -> None:
        self.request = self.compiled = None


def load_openvino_runner(directory: str | Path, device: str = "CPU", precision: str = "f32") -> OpenVINORunner:
    """Refusals that every backend shares (model-local functions, int8 activations, OpenVINO not
    installed) are the registry's, from ``CAPABILITIES``."""
    import onnx
    import openvino as ov

    if precision not in PRECISIONS:
        raise SamoutError(f"--openvino-precision {precision!r} is not one of: {', '.join(PRECISIONS)}")
    manifest = read_manifest(directory)
    path = Path(directory) / MODEL_FILE
    model = onnx.load(str(path), load_external_data=False)
    check_graph_metadata({p.key: p.value for p in model.metadata_props}, manifest)
    core = ov.Core()
    if device not in core.available_devices:
        raise SamoutError(f"OpenVINO device {device!r} is not available here; available: "
                          f"{', '.join(core.available_devices)}")
    config = {**runtime_settings(manifest)["openvino"], "INFERENCE_PRECISION_HINT": precision}
    try:
        compiled = core.compile_model(str(path), device, config)
    except Exception as e:  # OpenVINO raises RuntimeError with multi-line text
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SamoutError(f"OpenVINO cannot compile {path} for {device}: {reason}") from None
    return OpenVINORunner(compiled, manifest, device, precision)


@dataclass(frozen=True)
class OpenVINOOptions(BackendOptions):
    openvino_device: str = option("CPU", "OpenVINO device: CPU, GPU, NPU.")
    openvino_precision: str = option("f32", "OpenVINO inference precision: f32 keeps verify's tolerance; bf16/f16 "
                                     "are faster where the hardware has them, with a looser tolerance.",
                                     choices=tuple(PRECISIONS))


def _load(directory: Path, options: OpenVINOOptions) -> OpenVINORunner:
    return load_openvino_runner(directory, options.openvino_device, options.openvino_precision)


CAPABILITIES = Capabilities("OpenVINO", custom_ops=False, requires=(Requirement("openvino", "OpenVINO", INSTALL),))
BACKEND = Backend("openvino", OpenVINOOptions, _load,
                  "OpenVINO (--openvino-device, --openvino-precision; pip install openvino)", CAPABILITIES)
