"""One export per arch from the same checkpoint and options: what bench compares.

Given, derived from one export (its checkpoint re-exported as the other archs), or
made from a preset, in a work directory where bench replaces only the exports it
made itself (export.json ``extra.made_by``).
"""

from __future__ import annotations

from pathlib import Path

from samout_edge.artifact.arch import arch_spec
from samout_edge.artifact.manifest import BENCH_ARCHS, Manifest, check_exports, read_manifest
from samout_edge.errors import SamoutError
from samout_edge.exporter.onnx_export import ExportOptions, export
from samout_edge.progress import Progress, no_progress


def prepare_exports(
    dirs: list[Path],
    preset: str | None,
    work_dir: Path | None,
    max_seq: int,
    dtype: str,
    lowering: str,
    progress: Progress = no_progress,
    scan: str = "auto",
    archs: list[str] | None = None,
) -> dict[str, Path]:
    """One export per arch from the same checkpoint: given, derived, or made from a preset.
    ``archs``: the ones to compare (default: those of two or more exports given, else
    cummax and softmax), in order."""
    if preset and dirs:
        raise SamoutError("give export directories or --preset, not both")
    if not preset and not dirs:
        raise SamoutError("give one or more export directories, or --preset NAME")
    if archs is None:
        archs = list(check_exports(dirs, None)) if len(dirs) > 1 else list(BENCH_ARCHS)
    archs = [arch_spec(a).name for a in archs]
    given = check_exports(dirs, None) if dirs else {}
    if any(a not in archs for a in given):
        raise SamoutError(f"an export given is of {', '.join(a for a in given if a not in archs)}, not one of "
                          f"--archs {','.join(archs)}")
    work = None
    if preset or any(a not in given for a in archs):
        if work_dir is None:
            raise SamoutError("bench needs a work directory for the exports it makes (see bench_workspace)")
        work = Path(work_dir)

    if preset:
        first = work / archs[0]
        options = ExportOptions(archs[0], lowering, scan, max_seq=max_seq, dtype=dtype)
        if not _reusable(first, preset, options):
            check_ours_to_replace(first)
            progress(f"exporting {preset} ({archs[0]}) for ONNX Runtime", 0, 2)
            export(first, options, preset_name=preset, made_by=MADE_BY)
        dirs = [first]

    first = read_manifest(dirs[0])
    pair = check_exports(dirs, None)
    for arch in [a for a in archs if a not in pair]:  # the others, from the same checkpoint and options
        target = work / arch
        if not _matches(target, first, arch):
            check_ours_to_replace(target)
            progress(f"exporting the {arch} counterpart of {dirs[0]}", 1, 2)
            source = Path(first.source["path"])
            if not source.is_absolute():
                source = dirs[0] / source
            w = first.weights
            options = ExportOptions(arch, first.lowering, first.scan["scan"], first.max_seq, first.dtype, first.logits,
                                    first.opset, weights=w.kind, block_size=w.block_size,
                                    weights_format=w.format or "auto")
            export(target, options, checkpoint=source, heads=None if source.is_dir() else first.config.num_heads,
                   made_by=MADE_BY)
        pair[arch] = target
    return check_exports([pair[arch] for arch in archs], archs)


MADE_BY = "bench"  # export.json extra.made_by of the exports bench makes: the only ones it replaces


def check_ours_to_replace(directory: Path) -> None:
    """bench re-exports into its work directory only where it made what is there: a
    user's export of another checkpoint under --work is refused, never replaced."""
    if not directory.exists() or (directory.is_dir() and not any(directory.iterdir())):
        return
    try:
        made_by = read_manifest(directory).extra.get("made_by")
    except SamoutError:
        made_by = None
    if made_by != MADE_BY:
        raise SamoutError(f"{directory} holds something bench did not make (an export of another checkpoint or "
                          "options, or other files); bench replaces only its own exports there: give another --work")


def _reusable(directory: Path, preset: str, options) -> bool:
    try:
        m = read_manifest(directory)
    except SamoutError:
        return False
    plan = options.scan_plan(m.config)
    return (m.source.get("preset"), m.max_seq, m.dtype, m.lowering, m.arch, m.scan["scan"], m.weights.kind) == (
        preset, options.max_seq, options.dtype, options.lowering, options.arch, plan.scan, options.weights)


def _matches(directory: Path, made: Manifest, arch: str) -> bool:
    try:
        m = read_manifest(directory)
    except SamoutError:
        return False
    same = (m.source.get("sha256"), m.dtype, m.max_seq, m.lowering, m.logits, m.scan, m.weights.key)
    return m.arch == arch and same == (made.source.get("sha256"), made.dtype, made.max_seq, made.lowering, made.logits,
                                       made.scan, made.weights.key)
