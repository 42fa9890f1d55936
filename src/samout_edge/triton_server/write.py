"""Writing REPO/NAME/ atomically, and `package --triton` end to end."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

from samout_edge.artifact.files import (
    check_output_dir,
    read_json,
    recorded_files,
    staging_dir,
    write_bytes_atomic,
    write_json_atomic,
)
from samout_edge.errors import SamoutError
from samout_edge.triton_server.pbtxt import _tritonclient_available, config_pbtxt, parse_config
from samout_edge.triton_server.plan import (
    CONFIG_FILE,
    DEFAULT_IDLE_SECONDS,
    INITIAL_STATE_DIR,
    MARKER_FILE,
    MARKER_KIND,
    MARKER_SCHEMA,
    PackageResult,
    RepoPlan,
    plan_repo,
)

# --------------------------------------------------------------------------- writing


def previous_model_files(model_dir: Path) -> dict[str, str | None] | None:
    """The files an earlier package of ours wrote into ``model_dir`` with their sha256
    (the marker itself: None); None when it is not ours."""
    marker = Path(model_dir) / MARKER_FILE
    if not marker.is_file():
        return None
    try:
        data = read_json(marker, "model marker", max_bytes=1 << 20)
    except SamoutError:
        return None
    if not isinstance(data, dict) or data.get("producer") != "samout-edge" or data.get("kind") != MARKER_KIND \
            or not isinstance(data.get("files"), dict):
        return None
    return recorded_files(data["files"], MARKER_FILE)


def _is_model_dir(path: Path) -> bool:
    try:
        if path.is_symlink() or not path.is_dir():
            return False
        return (path / CONFIG_FILE).is_file() or (path / MARKER_FILE).is_file() or \
            any(c.name.isdigit() and c.is_dir() for c in path.iterdir())
    except OSError:
        return False


def check_repository(repo: Path, force: bool) -> None:
    """An existing -o must already look like a model repository (every entry a model
    directory), or --force; a user's directory of other things is never written into by default."""
    if repo.exists() and not repo.is_dir():
        raise SamoutError(f"{repo} exists and is a file; choose another -o")
    if not repo.exists() or force:
        return
    foreign = sorted(p.name for p in repo.iterdir() if not p.name.startswith(".") and not _is_model_dir(p))
    if foreign:
        raise SamoutError(f"{repo} exists and is not a Triton model repository ({foreign[0]!r} is not a model "
                          "directory); choose another -o, or pass --force to add the model beside what is there "
                          "(nothing of it is removed)")


def _copy_verified(source: Path, dest: Path, sha256: str | None) -> tuple[str, int]:
    """Copy, hashing what was read: a file that changed since check_files fails here."""
    digest, size = hashlib.sha256(), 0
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(source, "rb") as src, open(dest, "wb") as out:
        for block in iter(lambda: src.read(1 << 20), b""):
            digest.update(block)
            out.write(block)
            size += len(block)
    shutil.copymode(source, dest)
    if sha256 is not None and digest.hexdigest() != sha256:
        raise SamoutError(f"{source} changed while it was copied (its sha256 no longer matches export.json); re-export")
    return digest.hexdigest(), size


def write_repo(plan: RepoPlan, repo: str | Path, force: bool = False) -> PackageResult:
    """Write REPO/NAME/ atomically: built in a stage beside it and renamed into place.
    An earlier package of ours there is replaced (a user's extra files in it are kept);
    anything else is refused, or with --force added to without removing anything."""
    repo = check_output_dir(repo, "-o")
    check_repository(repo, force)
    model_dir = repo / plan.name
    for src in (plan.source.get("export"), plan.source.get("engine")):
        if src and (Path(src).resolve() == model_dir.resolve() or model_dir.resolve() in Path(src).resolve().parents):
            raise SamoutError(f"the model directory {model_dir} would hold the source {src}; choose another -o or --name")
    text = config_pbtxt(plan)
    validated = False
    if _tritonclient_available():  # the core install may have none: the text never needs it
        parse_config(text)
        validated = True
    files: dict[str, dict[str, Any]] = {}
    with staging_dir(model_dir, previous_model_files, force) as stage:
        for rel, (source, sha256) in plan.copies.items():
            digest, size = _copy_verified(source, stage / rel, sha256)
            files[rel] = {"sha256": digest, "bytes": size}
        for file_name, data in plan.initial_states.items():
            rel = f"{INITIAL_STATE_DIR}/{file_name}"
            write_bytes_atomic(stage / rel, data)
            files[rel] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        write_bytes_atomic(stage / CONFIG_FILE, text.encode())
        files[CONFIG_FILE] = {"sha256": hashlib.sha256(text.encode()).hexdigest(), "bytes": len(text.encode())}
        write_json_atomic(stage / MARKER_FILE, {"producer": "samout-edge", "kind": MARKER_KIND,
                                                "schema_version": MARKER_SCHEMA, "backend": plan.backend,
                                                "source": plan.source, "files": files})
        written = {rel: entry["bytes"] for rel, entry in sorted(files.items())}
        written[MARKER_FILE] = (stage / MARKER_FILE).stat().st_size
    return PackageResult(repo, model_dir, plan.name, plan.backend, plan.platform, plan.max_batch_size, written,
                         validated, plan.notes, text)


def package_triton(
    target: str | Path,
    repo: str | Path,
    name: str | None = None,
    engine: str | None = None,
    max_batch_size: int | None = None,
    max_sequences: int | None = None,
    idle_seconds: float = DEFAULT_IDLE_SECONDS,
    queue_delay_us: int = 0,
    kind: str = "gpu",
    force: bool = False,
) -> PackageResult:
    """`samout-edge package TARGET --triton -o REPO`: plan (checking every file), then write."""
    check_output_dir(repo, "-o")  # before hashing gigabytes
    plan = plan_repo(target, name, engine, max_batch_size, max_sequences, idle_seconds, queue_delay_us, kind)
    return write_repo(plan, repo, force)
