"""Commands that make and check artifacts: init and export (the workstation side: torch),
verify and inline (either side: no torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from samout_edge.artifact.arch import ARCH_HELP
from samout_edge.artifact.files import check_output_dir
from samout_edge.artifact.quantization import CALIBRATION_TOKENS
from samout_edge.cli import render
from samout_edge.cli.backend_options import backend_options
from samout_edge.cli.common import (
    WINDOW_HELP,
    Activations,
    DType,
    EmbeddingWeights,
    Logits,
    Lowering,
    Preset,
    Quantizer,
    Scan,
    Weights,
    WeightsFormat,
    WeightsGrid,
    app,
    arch_of,
    parse_int_list,
    value,
)
from samout_edge.cli.ui import console, print_json, progress_bar
from samout_edge.errors import SamoutError, require_torch
from samout_edge.runtime.registry import Settings


@app.command()
def init(
    preset: Preset = typer.Option("seed", "--preset", help="Model size: seed (the article's) or tiny."),
    output: Path = typer.Option(..., "-o", "--output", help="Checkpoint directory to create."),
    seed: int = typer.Option(0, min=0, max=2**63 - 1, help="Random seed for the initial weights."),
    force: bool = typer.Option(False, "--force", help="Replace an earlier checkpoint at OUTPUT (other files there are kept)."),
) -> None:
    """Write a randomly initialised checkpoint (config.json + model.safetensors)."""
    require_torch("init")
    from samout_edge.artifact.config import preset as get_preset
    from samout_edge.models.checkpoint import random_checkpoint, save_checkpoint

    config = get_preset(preset.value)
    output = check_output_dir(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not force:
        raise SamoutError(f"{output} exists; choose another -o, or pass --force to replace an earlier checkpoint "
                          "(or to add one beside other files, removing none of them)")
    save_checkpoint(random_checkpoint(config, seed), output, force)
    console.print(f"wrote {escape(str(output))} ({preset.value}: {config.parameter_count():,} parameters)", highlight=False)


@app.command()
def export(
    checkpoint: Optional[Path] = typer.Argument(
        None, help="Checkpoint directory, or a state_dict file (.pt/.pth/.bin) saved from the seed code."
    ),
    preset: Optional[Preset] = typer.Option(None, "--preset", help="Export a randomly initialised preset instead."),
    output: Path = typer.Option(..., "-o", "--output", help="Artifact directory to write."),
    arch: str = typer.Option("cummax", help=ARCH_HELP),
    softmax_window: int = typer.Option(0, "--softmax-window", min=0, help=WINDOW_HELP),
    hybrid_alpha: Optional[float] = typer.Option(
        None, "--hybrid-alpha", help="--arch hybrid from SamOut weights (no learned blend): alpha in every layer "
        "(default 0.5)."),
    lowering: Lowering = typer.Option("native", help="native (standard ONNX ops) or custom (CumMax node + fallback body)."),
    scan: Scan = typer.Option("auto", help="Scan the lowering uses: auto, blocked or doubling."),
    max_seq: int = typer.Option(2048, "--max-seq", help="Longest sequence the graph must be correct for."),
    dtype: DType = typer.Option("fp32", help="fp32 or fp16 (a genuinely fp16 graph, LayerNorm kept in fp32)."),
    logits: Logits = typer.Option("last", help="last (decode, [batch,1,vocab]) or all ([batch,seq,vocab])."),
    opset: Optional[int] = typer.Option(
        None, help="ONNX opset (default 18, 21 with --weights int8/int4): 17 for TensorRT 8.5/8.6 (JetPack 5, 6.0); "
        "int4 needs 21."),
    decompose_layernorm: bool = typer.Option(
        False, "--decompose-layernorm", help="Write LayerNorm as mean/variance ops (TensorRT 8.5 has no LayerNormalization)."
    ),
    weights: Weights = typer.Option(
        "fp", "--weights", help="fp (the dtype's floats), int8 (one scale per output channel) or int4 (one per block): "
        "weight-only, round-to-nearest, symmetric; verified against PyTorch with the same dequantized weights."),
    block_size: Optional[int] = typer.Option(
        None, "--block-size", help="int4: inputs per scale, a power of two from 16 that divides the hidden size "
        "(default 32)."),
    weights_format: WeightsFormat = typer.Option(
        "auto", "--weights-format", help="dq (DequantizeLinear: ONNX Runtime and TensorRT 10+, int8 also 8.x), "
        "matmulnbits (ONNX Runtime's MatMulNBits: ONNX Runtime only) or auto (export.json says which, and why)."),
    embedding_weights: EmbeddingWeights = typer.Option(
        "auto", "--embedding-weights", help="--weights int4: the embedding table at int8 (auto: one row is read per "
        "token, so its bits cost file size, not decode time) or int4 (the smallest file)."),
    activations: Activations = typer.Option(
        "fp", "--activations", help="int8 (with --weights int8/int4): the MatMuls quantize their inputs to int8 too "
        "(ONNX Runtime's MatMulNBits at accuracy level 4): faster decode on CPUs, verified at a tolerance measured "
        "at export; fp: the dequantized weights' exact function."),
    heads: Optional[int] = typer.Option(None, help="Head count for a bare state_dict (default 8)."),
    vocab: Optional[Path] = typer.Option(
        None, help="The vocabulary to carry in the export (vocab.json): 'bytes' (UTF-8 bytes, id b is byte b: a "
        "byte-level model's), or a JSON list of token strings (id i is the i-th, matched longest first); generate, "
        "eval and serve then take text."),
    weights_grid: WeightsGrid = typer.Option(
        "symmetric", "--weights-grid", help="--weights int4: symmetric (zero-point 0: every runtime, TensorRT included) "
        "or asymmetric (a zero-point per block, the 16 levels where the block's values are: closer to fp32; ONNX "
        "Runtime only)."),
    quantizer: Quantizer = typer.Option(
        "auto", "--quantizer", help="--weights int8/int4: how weights are put on the grid: rtn (round to nearest) or "
        "gptq (each rounding error weighed by the activations of --calibration-text and spread onto the weights not "
        "yet rounded: the same file format, a model closer to fp32). auto: gptq when --calibration-text is given."),
    calibration_text: Optional[Path] = typer.Option(
        None, "--calibration-text", help="A UTF-8 text like what the model will read (tokenized with --vocab, else as "
        "bytes): fp16: its activations the fp32 islands must cover too, on top of the golden inputs; int8/int4: "
        f"what GPTQ calibrates on (its first {CALIBRATION_TOKENS:,} tokens)."),
    native: bool = typer.Option(
        False, "--native", help="Also write native.safetensors, the weights the native backend runs (cummax, fp32, "
        "float or int4 weights; no ONNX Runtime in the process: `--backend native`), verified with the export."),
    seed: int = typer.Option(0, min=0, max=2**63 - 1, help="Random seed for --preset weights."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Check the export against PyTorch."),
    force: bool = typer.Option(False, "--force", help="Write into OUTPUT even if it is not an earlier export (nothing there is removed)."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Export a checkpoint to a verified ONNX artifact directory (model.onnx + export.json)."""
    require_torch("export")
    from samout_edge.exporter.onnx_export import ExportOptions
    from samout_edge.exporter.onnx_export import export as run_export

    options = ExportOptions.from_values({**locals(), "arch": arch_of(arch, softmax_window)})
    with progress_bar(not json_out) as progress:
        result = run_export(output, options, checkpoint=checkpoint, preset_name=value(preset), heads=heads, seed=seed,
                            run_verify=verify, force=force, progress=progress, vocab=vocab)
    if json_out:
        print_json(result.to_dict())
    else:
        render.export_summary(result)
    if result.verification is not None and not result.verification.passed:
        raise SamoutError(f"verification failed; the export is in {result.directory} for inspection")


@app.command()
@backend_options()
def verify(
    directory: Path = typer.Argument(..., help="Export directory."),
    checkpoint: Optional[Path] = typer.Option(None, help="Recompute with PyTorch from this source checkpoint (needs torch)."),
    lengths: Optional[str] = typer.Option(None, help="Recompute with PyTorch at these lengths, e.g. 1,1000,9000 (needs torch)."),
    backend: str = "auto",
    settings: Optional[Settings] = None,
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Check an export (or its engine: DIR/engines/PROFILE) against its golden PyTorch outputs; exits 1 on failure.

    Needs no torch. --lengths or --checkpoint recompute the reference with PyTorch instead."""
    from samout_edge.runtime.verify import verify as run_verify

    with progress_bar(not json_out) as progress:
        result = run_verify(directory, lengths=parse_int_list(lengths, "--lengths"), checkpoint=checkpoint,
                            progress=progress, backend=backend, settings=settings)
    if json_out:
        print_json(result.to_dict())
    else:
        render.verification(result)
    if not result.passed:
        raise SamoutError("verification failed")


@app.command()
def inline(
    directory: Path = typer.Argument(..., help="A --lowering custom export."),
    output: Path = typer.Option(..., "-o", "--output", help="Directory for the inlined copy."),
    force: bool = typer.Option(False, "--force", help="Write into OUTPUT even if it is not an earlier export."),
) -> None:
    """A copy of a custom export with its CumMax functions inlined, for OpenVINO and onnx.reference (no torch)."""
    from samout_edge.inlining import inline_export
    from samout_edge.runtime.verify import verify as run_verify

    with progress_bar() as progress:
        progress("inlining", 0, 2)
        out = inline_export(directory, output, force)
        result = run_verify(out, progress=progress)
    console.print(escape(f"wrote {out} (lowering inlined)"), highlight=False)
    render.verification(result)
    if not result.passed:
        raise SamoutError(f"the inlined copy does not verify; it is in {out} for inspection")
