"""An inlined copy of a ``--lowering custom`` export, for backends that do not run
model-local functions (their capabilities say: OpenVINO's).

The CumMax nodes are replaced by their function bodies (the native scan), so the
copy is a standard-ops graph; everything else, the golden files included, is
carried over, the manifest says ``lowering: inlined`` and lists the new hashes,
and the copy is verified like any export.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx
import onnx.inliner

from samout_edge.artifact.files import check_output_dir, staging_dir
from samout_edge.artifact.manifest import (
    META_LOWERING,
    MODEL_FILE,
    check_files,
    previous_export_files,
    read_manifest,
    record_file,
)
from samout_edge.errors import SamoutError


def runs_in(lowering: str) -> str | None:
    """Which registered backends run the graph of an export of ``lowering``, from their capabilities
    (custom: those that run model-local functions; the others get the ``inline`` hint). A backend
    that runs a file of its own instead of the graph (the native backend) is not among them."""
    from samout_edge.runtime.registry import BACKENDS

    graph = [b for b in BACKENDS.values() if b.capabilities.needs_file is None]
    if lowering in ("native", "inlined"):
        return "every backend: " + ", ".join(b.capabilities.title for b in graph)
    if lowering != "custom":
        return None
    able = [b.capabilities.title for b in graph if b.capabilities.custom_ops]
    unable = [b.capabilities.title for b in graph if not b.capabilities.custom_ops]
    if not unable:
        return ", ".join(able)
    one = len(unable) == 1
    return (f"{', '.join(able)}; not {' or '.join(unable)}, which {'does' if one else 'do'} not run model-local "
            f"functions: `samout-edge inline DIR -o OUT` makes a copy {'it runs' if one else 'they run'}")


def inline_export(source: str | Path, out: str | Path, force: bool = False) -> Path:
    source = Path(source)
    manifest = read_manifest(source)
    check_files(source, manifest)
    if manifest.lowering != "custom":
        raise SamoutError(f"{source} is a {manifest.lowering} export: it has no local functions to inline")
    out = check_output_dir(out)
    if out.resolve() == source.resolve() or source.resolve() in out.resolve().parents:
        raise SamoutError("-o must be another directory than the export itself")
    try:
        model = onnx.load(str(source / MODEL_FILE))
    except Exception as e:  # onnx raises ValidationError, DecodeError, OSError for what it cannot load
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SamoutError(f"cannot load {source / MODEL_FILE}: {reason}") from None
    inlined = onnx.inliner.inline_local_functions(model)
    del inlined.functions[:]
    kept = [o for o in inlined.opset_import if o.domain != "samout_edge"]
    del inlined.opset_import[:]
    inlined.opset_import.extend(kept)
    for prop in inlined.metadata_props:
        if prop.key == META_LOWERING:
            prop.value = "inlined"
    onnx.checker.check_model(inlined)
    manifest.lowering = "inlined"
    manifest.verification = None
    manifest.files = {k: v for k, v in manifest.files.items() if k != MODEL_FILE}
    with staging_dir(out, previous_export_files, force) as stage:
        onnx.save_model(inlined, str(stage / MODEL_FILE))
        for name in list(manifest.files):
            (stage / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / name, stage / name)
        record_file(stage, manifest, MODEL_FILE)
        manifest.save(stage)
    return out
