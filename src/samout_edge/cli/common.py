"""What every command group shares: the root Typer app, choice Enums, list parsing.

Choices are Enums, so Typer itself rejects a bad one with a usage error (exit 2)
and lists the allowed values in --help; the values come from the library's own
tables (presets, dtypes, weights kinds; --arch, a free string since a stack names a mixer
per layer, is checked by artifact/arch.py), so the CLI cannot drift from what the
library accepts; the backends' choices and flags come from their registry
(cli/backend_options.py).
"""

from __future__ import annotations

from enum import Enum

import typer

from samout_edge.artifact.config import PRESETS
from samout_edge.artifact.graph import EXPORT_DTYPES
from samout_edge.artifact.quantization import ACTIVATIONS as ACTIVATION_KINDS
from samout_edge.artifact.quantization import FORMATS as WEIGHT_FORMATS
from samout_edge.artifact.quantization import KINDS as WEIGHT_KINDS
from samout_edge.errors import SamoutError
from samout_edge.runtime.torch_runner import TORCH_DEVICES

app = typer.Typer(
    name="samout-edge",
    help="Export, verify, build and benchmark SamOut (cummax-attention) language models for edge GPUs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def choices(name: str, values: tuple[str, ...] | list[str]) -> type[Enum]:
    """A str Enum whose members are ``values`` (Typer shows and checks them)."""
    return Enum(name, {v: v for v in values}, type=str)  # type: ignore[return-value]


Preset = choices("Preset", tuple(PRESETS))
DType = choices("DType", EXPORT_DTYPES)
Lowering = choices("Lowering", ("native", "custom"))
Scan = choices("Scan", ("auto", "blocked", "doubling"))
Logits = choices("Logits", ("last", "all"))
Precision = choices("Precision", ("fp16", "fp32"))
TorchDevice = choices("TorchDevice", TORCH_DEVICES)  # bench op's own device (backend flags: cli/backend_options.py)


UBATCH_HELP = ("Most tokens per prefill call (a micro-batch; llama.cpp's is 512): a longer prompt is fed in calls "
               "of this many with the state carried, exact, so its working memory stays bounded; 0: calls as long as "
               "the graph takes (max_seq).")
WINDOW_HELP = ("softmax and hybrid: attend to the last W positions only, so the state is bounded (W keys and values "
               "per layer); 0: every position.")


def arch_of(arch: str, window: int) -> str:
    """--arch and --softmax-window as one arch name: hybrid, 64 -> hybrid-w64 (artifact/arch.py, which
    checks the name: a free string, since a stack names a mixer per layer)."""
    from samout_edge.artifact.arch import arch_name

    return arch_name(arch, window)


Weights, WeightsFormat = choices("Weights", WEIGHT_KINDS), choices("WeightsFormat", ("auto", *WEIGHT_FORMATS))
Activations = choices("Activations", ACTIVATION_KINDS)
EmbeddingWeights = choices("EmbeddingWeights", ("auto", "int8", "int4"))
Quantizer = choices("Quantizer", ("auto", "rtn", "gptq"))
WeightsGrid = choices("WeightsGrid", ("symmetric", "asymmetric"))


def value(choice: Enum | None) -> str | None:
    return None if choice is None else str(choice.value)


def parse_int_list(text: str | None, option: str) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise SamoutError(f"{option} takes comma-separated integers, got {text!r}") from None


def parse_choice_list(text: str, option: str, allowed: tuple[str, ...]) -> list[str]:
    """A comma-separated list of choices; a bad one is a usage error (exit 2)."""
    items = [part.strip() for part in text.split(",") if part.strip()]
    bad = [i for i in items if i not in allowed]
    if bad or not items:
        raise typer.BadParameter(f"{bad[0] if bad else text!r} is not one of: {', '.join(allowed)}", param_hint=option)
    return items
