"""config.pbtxt from a RepoPlan, and its check against Triton's own ModelConfig schema."""

from __future__ import annotations

from typing import Any

from samout_edge.errors import SamoutError
from samout_edge.triton_server.plan import RepoPlan, TritonTensor

# --------------------------------------------------------------------------- config.pbtxt


def _quote(text: str) -> str:
    """A protobuf text-format string literal."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _comment(text: str) -> str:
    return "# " + "".join(c if c.isprintable() else "?" for c in text)


def _dims_text(dims: list[int]) -> str:
    return "[ " + ", ".join(str(d) for d in dims) + " ]"


def _tensors(key: str, tensors: list[TritonTensor]) -> list[str]:
    lines = [f"{key} ["]
    for i, t in enumerate(tensors):
        lines += ["  {", f"    name: {_quote(t.name)}", f"    data_type: {t.data_type}", f"    dims: {_dims_text(t.dims)}",
                  "  }" + ("," if i < len(tensors) - 1 else "")]
    return [*lines, "]"]


def config_pbtxt(plan: RepoPlan) -> str:
    """config.pbtxt's text, built without tritonclient (the core install has none)."""
    src = plan.source
    lines = [
        _comment(f"Written by samout-edge from {src.get('engine') or src.get('export')}"),
        _comment(f"{src.get('arch')} {src.get('dtype')}, logits {src.get('logits')}, max_seq {src.get('max_seq')}. "
                 "Triton keeps each sequence's state (implicit state);"),
        _comment("clients send input_ids with a sequence id and the start/end flags. Edit the copy, not this file."),
        f"name: {_quote(plan.name)}",
        f"platform: {_quote(plan.platform)}",
        f"max_batch_size: {plan.max_batch_size}",
        *_tensors("input", plan.inputs),
        *_tensors("output", plan.outputs),
        "sequence_batching {",
        f"  max_sequence_idle_microseconds: {plan.idle_microseconds}",
        "  oldest {",
        f"    max_candidate_sequences: {plan.max_sequences}",
        f"    max_queue_delay_microseconds: {plan.queue_delay_microseconds}",
        "  }",
        "  state [",
    ]
    for i, s in enumerate(plan.states):
        lines += [
            "    {",
            f"      input_name: {_quote(s.input_name)}",
            f"      output_name: {_quote(s.output_name)}",
            f"      data_type: {s.data_type}",
            f"      dims: {_dims_text(s.dims)}",
            "      initial_state {",
            f"        data_type: {s.data_type}",
            f"        dims: {_dims_text(s.dims)}",
            f"        data_file: {_quote(s.data_file)}",
            f"        name: {_quote(s.initial)}",
            "      }",
            "    }" + ("," if i < len(plan.states) - 1 else ""),
        ]
    lines += ["  ]", "}", "instance_group [", "  {", "    count: 1", f"    kind: {plan.instance_kind}"]
    if plan.profiles:
        lines.append(f"    profile: [ {', '.join(_quote(p) for p in plan.profiles)} ]")
    if plan.dla_core is not None:
        lines.append(f"    secondary_devices [ {{ kind: KIND_NVDLA, device_id: {plan.dla_core} }} ]")
    lines += ["  }", "]"]
    for key, value in plan.parameters.items():
        lines.append(f"parameters {{ key: {_quote(key)} value: {{ string_value: {_quote(value)} }} }}")
    return "\n".join(lines) + "\n"


def parse_config(text: str) -> Any:
    """config.pbtxt parsed as Triton's own ModelConfig message (needs tritonclient[grpc])."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise SamoutError("checking a config.pbtxt needs tritonclient: pip install 'tritonclient[grpc]'") from None
    config = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as e:
        raise SamoutError(f"config.pbtxt does not parse as Triton's ModelConfig: {e}") from None
    return config


def _tritonclient_available() -> bool:
    try:
        import tritonclient.grpc.model_config_pb2  # noqa: F401
    except ImportError:
        return False
    return True
