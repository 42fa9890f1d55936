"""File helpers: hashing, and writes that never leave a half-written artifact and
never remove what samout-edge did not write.

- Single files are written to a temporary name beside the target and renamed
  into place (``write_bytes_atomic``), with the mode a plain ``open`` would give.
- Directories are built in a staging directory beside the target and published
  with renames (``staging_dir`` + ``publish``). Replacing an earlier artifact of
  ours removes only the files its manifest lists; anything else in it (a user's
  notes, engines built from it) is carried over into the new one.
- Staging names are short and fixed-length (a 250-character target name still
  fits the file system's 255) and carry the writer's pid; a later run removes
  those of processes that died (kill -9), first putting back any user files a
  dead replace was carrying.
- A recorded file is ours to remove only while its sha256 matches the record;
  a symbolic link to an artifact is followed, and the link stays a link.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from samout_edge.errors import SamoutError

# hashlib (OpenSSL) and shutil (bz2, lzma) are imported where they are used: a process that only
# runs an export never needs them, and they are 4 MB of its RSS (tests/test_footprint.py).

STAGE_PREFIX = ".samout-stage-"
OLD_PREFIX = ".samout-old-"
TMP_PREFIX = ".samout-tmp-"
CARRIED_MARKER = ".samout-carried.json"  # inside a stage: user entries moved in from the target


def sha256_file(path: str | Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def safe_relative(name: str) -> bool:
    """A path inside its directory: relative, without '..'."""
    return bool(name) and not Path(name).is_absolute() and ".." not in Path(name).parts


def recorded_files(entries: dict, record_file: str) -> dict[str, str | None]:
    """The files a record of ours lists, each with its sha256 (the record itself:
    None), keeping only safe relative names: what a rewrite may remove."""
    files: dict[str, str | None] = {}
    for name, entry in entries.items():
        digest = entry.get("sha256") if isinstance(entry, dict) else None
        if isinstance(name, str) and isinstance(digest, str) and safe_relative(name):
            files[name] = digest
    files[record_file] = None
    return files


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _unique(prefix: str) -> str:
    return f"{prefix}{os.getpid()}-{os.urandom(4).hex()}"


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


def _dead_writer(name: str, prefix: str) -> bool:
    pid = name[len(prefix):].split("-", 1)[0]
    return pid.isdigit() and not _pid_alive(int(pid))


def _remove_entry(entry: Path) -> None:
    """A file, a symbolic link (never what it points to) or a directory tree."""
    if entry.is_symlink() or not entry.is_dir():
        entry.unlink(missing_ok=True)
    else:
        _rmtree(entry)


def remove_stale_stages(parent: Path) -> None:
    """Clean up after writers that died (kill -9) in ``parent``.

    A stage that was carrying a user's files (it holds CARRIED_MARKER) is undone
    first: the earlier artifact goes back in place and the user's files back into
    it, so a killed replace leaves the target as it was. Then the remaining
    stages, old directories and temporary files of dead writers are removed.
    """
    if not parent.is_dir():
        return
    entries = list(parent.iterdir())
    for entry in entries:
        if entry.name.startswith(STAGE_PREFIX) and _dead_writer(entry.name, STAGE_PREFIX) \
                and not entry.is_symlink() and (entry / CARRIED_MARKER).is_file():
            _restore_carried(entry)
    for entry in parent.iterdir():
        for prefix in (STAGE_PREFIX, OLD_PREFIX, TMP_PREFIX):
            if entry.name.startswith(prefix) and _dead_writer(entry.name, prefix):
                _remove_entry(entry)


def _restore_carried(stage: Path) -> None:
    """Undo a replace whose writer died: see _swap_keeping_unlisted for the steps it may have died between."""
    try:
        record = json.loads((stage / CARRIED_MARKER).read_text())
        target = stage.parent / record["target"]
        old = stage.parent / record["old"]
        carried = [Path(rel) for rel in record["carried"]]
    except (OSError, ValueError, KeyError, TypeError):
        raise SamoutError(f"{stage} holds files an interrupted samout-edge write carried out of its target, but its "
                          f"record {CARRIED_MARKER} is unreadable: move your files out of it by hand") from None
    if not target.exists() and not old.exists():  # the swap itself completed but for the last rename: finish it
        os.replace(stage, target)
        (target / CARRIED_MARKER).unlink(missing_ok=True)
        return
    if not target.exists():  # died between the two renames: the earlier artifact goes back
        os.replace(old, target)
    blocked = [rel for rel in carried if (stage / rel).exists() and (target / rel).exists()]
    if blocked:
        raise SamoutError(f"an interrupted samout-edge write left your {blocked[0]} in {stage}, and {target / blocked[0]} "
                          f"exists again: move yours back by hand, then remove {stage}")
    for rel in carried:
        if (stage / rel).exists() or (stage / rel).is_symlink():
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(stage / rel, target / rel)
    _rmtree(stage)


# What an earlier artifact of ours at a target holds: relative path -> its recorded
# sha256, or None for the file that names the artifact ours (export.json, config.json,
# the Triton marker). None as a whole: what is there is not ours.
Previous = Callable[[Path], "dict[str, str | None] | None"]


def real_target(target: str | Path) -> Path:
    """The directory a write goes to: a symbolic link to a directory is followed, so
    the artifact behind it is replaced in place and the link stays a link."""
    target = Path(target).absolute()
    if target.is_symlink():
        resolved = target.resolve()
        if not resolved.is_dir():
            what = "a file" if resolved.exists() else "nothing"
            raise SamoutError(f"{target} is a symbolic link to {resolved}, which is {what}; give a directory")
        return resolved
    return target


@contextmanager
def staging_dir(target: str | Path, previous: Previous, force: bool = False) -> Iterator[Path]:
    """Yield an empty directory beside ``target``; on success it is published there.

    ``previous(target)`` names the files of an earlier artifact of ours at
    ``target`` with their sha256 (None: what is there is not ours). On any
    exception the stage is removed and ``target`` is untouched.
    """
    target = real_target(target)
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
    if (stage / CARRIED_MARKER).exists():
        _restore_carried(stage)  # the failure came mid-swap: the user's files go back
    else:
        _rmtree(stage)


def publish(stage: Path, target: Path, previous: dict[str, str | None] | None, force: bool, last: str = "") -> None:
    """Put the staged artifact at ``target``.

    - nothing (or an empty directory) there: one rename;
    - an earlier artifact of ours (``previous`` names its files and their
      sha256): every entry that is not one of its files as recorded is carried
      into the stage, then two renames swap the directories, and only the files
      that still hold what we wrote go;
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


def ours_as_recorded(target: Path, previous: dict[str, str | None]) -> set[Path]:
    """The recorded files that still hold what we wrote: a regular file whose sha256
    matches the record (the self-naming manifest: a regular file). Anything a user
    edited, replaced or put under a recorded name is theirs."""
    ours = set()
    for name, digest in previous.items():
        path = target / name
        if path.is_symlink() or not path.is_file():
            continue
        if digest is None or sha256_file(path) == digest:
            ours.add(Path(name))
    return ours


def _swap_keeping_unlisted(stage: Path, target: Path, previous: dict[str, str | None]) -> None:
    """Replace ``target`` by ``stage``, keeping everything in ``target`` that is not ours.

    Steps, each undone by remove_stale_stages if the writer dies after it:
    1. the record (CARRIED_MARKER: target, old, carried) is written into the stage;
    2. the user's entries move from the target into the stage;
    3. target -> old; 4. stage -> target; 5. the record and old go.
    """
    (target / CARRIED_MARKER).unlink(missing_ok=True)  # a record a dead writer left behind after step 4
    listed = ours_as_recorded(target, previous)
    listed_dirs = {parent for name in listed for parent in name.parents if str(parent) != "."}
    carried: list[Path] = []
    for path in sorted(target.rglob("*"), key=lambda p: len(p.parts)):
        rel = path.relative_to(target)
        if rel in listed or (rel in listed_dirs and path.is_dir() and not path.is_symlink()):
            continue
        if any(parent in carried for parent in rel.parents):
            continue  # inside an entry already carried whole
        if (stage / rel).exists():
            why = "it differs from what samout-edge recorded for it" if str(rel) in previous else "it is not ours"
            raise SamoutError(f"{path} is in the way: the new artifact writes it, and {why}; move it first")
        carried.append(rel)
    old = target.parent / _unique(OLD_PREFIX)
    if carried:
        record = {"target": target.name, "old": old.name, "carried": [str(c) for c in carried]}
        (stage / CARRIED_MARKER).write_text(json.dumps(record))
        for rel in carried:
            (stage / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(target / rel, stage / rel)
    os.replace(target, old)
    os.replace(stage, target)
    (target / CARRIED_MARKER).unlink(missing_ok=True)
    _rmtree(old)  # now only the files that held what we wrote


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
