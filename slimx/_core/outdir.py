"""The output-folder transaction: a run writes into a hidden staging folder inside OUT and moves every finished
file into place at the end, so a failed or killed run leaves no half-written file and no folder it created."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

from slimx._core.errors import UsageError


def default_out_dir(model: str, target: str) -> str:
    slug = "".join(c if c.isalnum() or c in "-_" else "-" for c in Path(model[:400]).stem if c)
    return str(Path("out") / f"{slug.strip('-')[:80] or 'model'}-{target}")  # a name the file system takes


def first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` that does not exist yet (what creating it would create), or None."""
    path = Path(path).absolute()
    missing = None
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing = folder
    return missing


def remove_empty(path: Path, up_to: Path | None) -> None:
    """Remove ``path`` and its parents while they are empty, stopping at ``up_to`` (a failed run leaves no folder
    it created)."""
    if up_to is None:
        return
    folder = Path(path).absolute()
    while True:
        if not folder.is_dir() or any(folder.iterdir()):
            return
        folder.rmdir()
        if folder == up_to or up_to not in folder.parents:
            return
        folder = folder.parent


def stale_stagings(out: Path) -> list[tuple[int, Path]]:
    """Staging folders in OUT whose run is gone (killed by a signal that cannot be caught, or a power cut)."""
    found = []
    if not Path(out).is_dir():
        return found
    for item in Path(out).glob(".slimx-staging-*"):
        try:
            pid = int(item.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        if pid != os.getpid() and not _alive(pid):
            found.append((pid, item))
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def publish(staging: Path, out: Path) -> None:
    """Move every finished file from the staging folder into OUT, replacing older ones."""
    for item in sorted(staging.iterdir()):
        dest = out / item.name
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        os.replace(item, dest)


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def check_out_dir(out: Path) -> None:
    """Refuse an OUT that cannot hold a run's files, before any work (UsageError)."""
    if any(len(part) > 255 for part in out.parts):
        raise UsageError(f"--out {str(out)[:60]}...", "has a folder name longer than file systems allow (255)",
                         "give a shorter path")
    if out.is_symlink() and not out.exists():
        raise UsageError(f"--out {out}", f"is a symbolic link to {os.readlink(out)}, which does not exist",
                         "remove the link or give another folder")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}", "exists and is not a folder", "give a folder path")
    existing = next((f for f in (out.absolute(), *out.absolute().parents) if f.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}", f"cannot be written: {existing} is not writable by this user",
                         "give a folder you can write to")


@contextlib.contextmanager
def temp_files_in(folder: Path):
    """Point Python's temporary files (``tempfile``: a converter's scratch files) at ``folder`` for the block, then
    remove the folder with whatever was left in it."""
    import tempfile

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    saved = tempfile.tempdir
    tempfile.tempdir = str(folder)
    try:
        yield folder
    finally:
        tempfile.tempdir = saved
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def staged(out: Path, warn=None):
    """A staging folder inside ``out`` for the run to write into; on success the caller ``publish``es it, and
    on any failure (or signal) the staging folder and every folder the run created go again. Staging folders
    left by killed runs are removed first, each with a ``warn``."""
    out = Path(out)
    created = first_missing(out)  # the top folder this run creates (removed again if the run fails)
    staging = out / f".slimx-staging-{os.getpid()}"
    for pid, stale in stale_stagings(out):
        shutil.rmtree(stale, ignore_errors=True)
        if warn is not None:
            warn(f"removed {stale.name}, left in {out} by a run that was killed (process {pid} is gone)")
    try:
        try:
            staging.mkdir(parents=True, exist_ok=False)
        except OSError as exc:
            raise UsageError(f"--out {out}", f"cannot be created ({exc.strerror or type(exc).__name__})",
                             "give a folder on a writable file system") from None
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        remove_empty(out, created)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
