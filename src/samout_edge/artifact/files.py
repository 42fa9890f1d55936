"""File helpers: hashing, and writes that never leave a half-written artifact and
never remove what samout-edge did not write.

- Single files are written to a temporary name beside the target and renamed
  into place (``write_bytes_atomic``), with the mode a plain ``open`` would give.
- Directories are built in a staging directory beside the target and published
  with renames (``staging_dir`` + ``publish``). Replacing an earlier artifact of
  ours removes only the files its manifest lists; anything else in it (a user's
  notes, engines built from it) is carried over into the new one.
- Staging names are short and fixed-length (a 250-character target name still
  fits the file system's 255), carry the writer's pid, and a later run removes
  those of processes that died (kill -9) unless they hold carried user files.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from samout_edge.errors import SamoutError

STAGE_PREFIX = ".samout-stage-"
OLD_PREFIX = ".samout-old-"
TMP_PREFIX = ".samout-tmp-"
CARRIED_MARKER = ".samout-carried.json"  # inside a stage: user entries moved in from the target


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _unique(prefix: str) -> str:
    return f"{prefix}{os.getpid()}-{secrets.token_hex(4)}"


def make_readable(path: str | Path) -> None:
    """Give a file another library wrote privately (safetensors: 0600) the mode a plain open would."""
    os.chmod(path, 0o666 & ~_umask())


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write beside the target, then rename it into place; readable as a plain write would be."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / _unique(TMP_PREFIX)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 & ~_umask())
    except OSError as e:
        raise SamoutError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise SamoutError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, data: Any) -> None:
    write_bytes_atomic(path, (json.dumps(data, indent=2) + "\n").encode())


def check_writable_file(path: str | Path, option: str) -> Path:
    """Fail before hours of work, not after: the file's directory must exist and be writable."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir() or not parent.is_dir() or not os.access(parent, os.W_OK):
        raise SamoutError(f"{option} {path}: cannot write there (the directory must exist and be writable)")
    return path


def check_output_dir(path: str | Path, option: str = "-o") -> Path:
    """Refuse targets whose replacement would take the user's world with it:
    an empty path, '.', the home directory, '/', and the working directory or any parent of it."""
    text = str(path)
    if not text.strip() or text.strip() in (".", "./"):
        raise SamoutError(f"{option} must name a new or earlier output directory, not {text!r}")
    target = Path(path).expanduser().absolute()
    resolved = target.resolve()
    cwd = Path.cwd().resolve()
    if resolved == Path(resolved.anchor) or resolved == Path.home().resolve() or cwd == resolved or resolved in cwd.parents:
        raise SamoutError(f"{option} {text!r} is {resolved}, which holds the working directory, home or /; choose a new directory")
    if len(target.name.encode()) > 255:
        raise SamoutError(f"{option}: the directory name is longer than 255 bytes")
    return target


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_stages(parent: Path) -> list[Path]:
    """Remove staging and old directories left by processes that died (kill -9),
    except stages holding user entries carried from a target: those are reported, not removed."""
    kept = []
    if not parent.is_dir():
        return kept
    for entry in parent.iterdir():
        for prefix in (STAGE_PREFIX, OLD_PREFIX, TMP_PREFIX):
            if not entry.name.startswith(prefix):
                continue
            pid = entry.name[len(prefix):].split("-", 1)[0]
            if not pid.isdigit() or _pid_alive(int(pid)):
                continue
            if (entry / CARRIED_MARKER).exists():
                kept.append(entry)  # a user's files were moving through it: never remove them
            elif entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
    return kept


@contextmanager
def staging_dir(target: str | Path, previous: Callable[[Path], list[str] | None], force: bool = False) -> Iterator[Path]:
    """Yield an empty directory beside ``target``; on success it is published there.

    ``previous(target)`` lists the files of an earlier artifact of ours at
    ``target`` (None: what is there is not ours). On any exception the stage is
    removed and ``target`` is untouched.
    """
    target = Path(target).absolute()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_stages(target.parent)
        stage = target.parent / _unique(STAGE_PREFIX)
        stage.mkdir(mode=0o777 & ~_umask())
    except OSError as e:
        raise SamoutError(f"cannot create {target}: {e.strerror or e}") from None
    try:
        yield stage
        publish(stage, target, previous(target) if target.exists() else None, force)
    except OSError as e:
        _discard(stage)
        raise SamoutError(f"cannot write {target}: {e.strerror or e}") from None
    except BaseException:
        _discard(stage)
        raise


def _discard(stage: Path) -> None:
    if not (stage / CARRIED_MARKER).exists():
        shutil.rmtree(stage, ignore_errors=True)


def publish(stage: Path, target: Path, previous: list[str] | None, force: bool, last: str = "") -> None:
    """Put the staged artifact at ``target``.

    - nothing (or an empty directory) there: one rename;
    - an earlier artifact of ours (``previous`` lists its files): every entry it
      does not list is carried into the stage, then two renames swap the
      directories, and only the listed files go;
    - anything else: refused, unless ``force``, which adds our entries beside
      what is there (``last``, the manifest, goes in last) and removes nothing.
    """
    if target.exists() and not target.is_dir():
        raise SamoutError(f"{target} exists and is a file; choose another -o")
    if not target.exists() or not any(target.iterdir()):
        os.replace(stage, target)
        return
    if previous is not None:
        _swap_keeping_unlisted(stage, target, previous)
        return
    if not force:
        raise SamoutError(f"{target} exists and is not a samout-edge artifact; choose another -o, or pass --force "
                          "to add ours beside what is there (nothing of it is removed)")
    staged = sorted(stage.iterdir(), key=lambda p: p.name == last)
    in_the_way = [p.name for p in staged if (target / p.name).exists() or (target / p.name).is_symlink()]
    if in_the_way:
        raise SamoutError(f"{target / in_the_way[0]} is in the way and was not written by samout-edge; "
                          "move it, or choose another -o")
    for entry in staged:
        os.replace(entry, target / entry.name)
    stage.rmdir()


def _swap_keeping_unlisted(stage: Path, target: Path, previous: list[str]) -> None:
    listed = {Path(name) for name in previous}
    listed_dirs = {parent for name in listed for parent in name.parents if str(parent) != "."}
    carried = []
    for path in sorted(target.rglob("*"), key=lambda p: len(p.parts)):
        rel = path.relative_to(target)
        if rel in listed or (rel in listed_dirs and path.is_dir() and not path.is_symlink()):
            continue
        if any(parent in carried for parent in rel.parents):
            continue  # inside an entry already carried whole
        if (stage / rel).exists():
            raise SamoutError(f"{path} is not listed in the earlier artifact and the new one writes it too; move it first")
        carried.append(rel)
    if carried:
        (stage / CARRIED_MARKER).write_text(json.dumps([str(c) for c in carried]))
        for rel in carried:
            (stage / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(target / rel, stage / rel)
    old = target.parent / _unique(OLD_PREFIX)
    os.replace(target, old)
    os.replace(stage, target)
    (target / CARRIED_MARKER).unlink(missing_ok=True)
    shutil.rmtree(old, ignore_errors=True)  # now only the files the earlier manifest listed


def read_json(path: str | Path, what: str, max_bytes: int = 64 << 20) -> Any:
    """Read a JSON file, turning every failure into one clear SamoutError."""
    path = Path(path)
    if not path.is_file():
        raise SamoutError(f"{what} not found: {path}")
    try:
        if path.stat().st_size > max_bytes:
            raise SamoutError(f"{what} {path} is larger than {max_bytes >> 20} MiB; not a file samout-edge wrote")
        return json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise SamoutError(f"{what} {path} is not valid JSON: {e}") from None
