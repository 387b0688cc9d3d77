"""Atomic output folders: build in a temporary sibling, publish with a rename, never leave a half.

The temporary folder lives beside the destination (same file system, so the final `rename` is
atomic). A failed or interrupted export leaves at most a `.<name>.tmp-*` sibling, which the next
export to the same destination removes; the destination is either absent, the previous complete
export, or the new complete export.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import tempfile
from pathlib import Path

from .errors import OutputError

log = logging.getLogger(__name__)


def resolve_output(out: str | Path) -> tuple[Path, str]:
    """`out/model.onnx` -> (out/, 'model.onnx'); `out/` -> (out/, 'model.onnx')."""
    out = Path(out).expanduser()
    if out.suffix == ".onnx":
        return out.parent if str(out.parent) else Path("."), out.name
    return out, "model.onnx"


def check_destination(folder: Path, force: bool) -> None:
    """Refuse, before any work is done, what would fail or overwrite at the end."""
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"--out {folder} is a file; expected a folder (or a path ending in .onnx inside one).")
    if folder.exists() and any(folder.iterdir()) and not force:
        raise OutputError(f"--out {folder} already exists and is not empty; pass --force to replace it "
                          "(the old export is kept until the new one is complete).")
    parent = folder.parent if str(folder.parent) else Path(".")
    existing = parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"--out {folder}: {existing} is a file, so no folder can be made under it.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"--out {folder}: {existing} is not writable; choose another output folder.")


@contextlib.contextmanager
def atomic_folder(folder: Path, force: bool):
    """Yield a temporary sibling to fill; on success it replaces `folder` in one rename."""
    folder = folder.resolve() if folder.exists() else Path(os.path.abspath(folder))
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"--out {folder}: its parent folder could not be created ({exc}).") from exc
    lock_path = folder.parent / f".{folder.name}.lock"
    with open(lock_path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise OutputError(f"another prefix-export is writing {folder} right now; wait for it to finish or "
                              "choose another --out.") from exc
        _remove_stale_temporaries(folder)
        check_destination(folder, force)  # again, now that we hold the lock
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
        try:
            yield tmp
            _publish(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            with contextlib.suppress(OSError):
                lock_path.unlink()


def _remove_stale_temporaries(folder: Path) -> None:
    for stale in folder.parent.glob(f".{folder.name}.tmp-*"):
        log.info("removing %s left by an interrupted export", stale)
        shutil.rmtree(stale, ignore_errors=True)
    for stale in folder.parent.glob(f".{folder.name}.old-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _publish(tmp: Path, folder: Path) -> None:
    _fsync_tree(tmp)
    if folder.exists():
        # Move the old export aside first: between the two renames the destination is briefly
        # absent, never partial. The old one is deleted only after the new one is in place.
        old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
        os.rename(folder, old / folder.name)
        os.rename(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, folder)


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def translate_os_error(exc: OSError, folder: Path) -> OutputError:
    if exc.errno == errno.ENOSPC:
        return OutputError(f"the disk is full while writing {folder}; nothing was published. Free space or choose "
                           "another --out.")
    return OutputError(f"writing {folder} failed: {exc}. Nothing was published.")
