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

from ..errors import OutputError

log = logging.getLogger(__name__)


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
    try:
        # os.access says yes to root everywhere; a real (immediately removed) file is the proof.
        fd, probe = tempfile.mkstemp(prefix=".prefix-export-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"--out {folder}: nothing can be written in {existing} ({exc.strerror or exc}); choose "
                          "another output folder.") from exc


@contextlib.contextmanager
def atomic_folder(folder: Path, force: bool):
    """Yield a temporary sibling to fill; on success it replaces `folder` in one rename."""
    folder = folder.resolve() if folder.exists() else Path(os.path.abspath(folder))
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"--out {folder}: its parent folder could not be created ({exc}).") from exc
    lock_path = folder.parent / f".{folder.name}.lock"
    with _exclusive_lock(lock_path, folder):
        _remove_stale_temporaries(folder)
        check_destination(folder, force)  # again, now that we hold the lock
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
        try:
            yield tmp
            _publish(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path, folder: Path):
    """flock on `.NAME.lock` beside the destination; the kernel releases it if the process dies.

    The file is removed on the way out. Another process may have opened it just before: it would
    then lock an unlinked file, so after locking we check the path still names the file we hold.
    """
    for _ in range(5):
        handle = open(lock_path, "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            handle.close()
            raise OutputError(f"another prefix-export is writing {folder} right now (it holds {lock_path}); wait "
                              "for it to finish or choose another --out.") from exc
        try:
            same = os.stat(lock_path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        handle.close()  # we locked a lock file its owner had just removed: try the new one
    else:
        raise OutputError(f"could not take the lock {lock_path} for {folder}; another prefix-export keeps "
                          "replacing it. Try again.")
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            lock_path.unlink()
        handle.close()


def _remove_stale_temporaries(folder: Path) -> None:
    for stale in folder.parent.glob(f".{folder.name}.tmp-*"):
        log.info("removing %s left by an interrupted export", stale)
        shutil.rmtree(stale, ignore_errors=True)
    for stale in folder.parent.glob(f".{folder.name}.old-*"):
        # Only the two-rename fallback of _publish makes these; killed between its renames, the
        # previous complete export sits here while the destination is absent: put it back.
        if not folder.exists() and (stale / folder.name).is_dir():
            log.warning("restoring the previous export %s from %s", folder, stale)
            os.rename(stale / folder.name, folder)
        shutil.rmtree(stale, ignore_errors=True)


def _publish(tmp: Path, folder: Path) -> None:
    _fsync_tree(tmp)
    if folder.exists():
        if _exchange(tmp, folder):
            # One atomic step: `folder` is now the new export, `tmp` the old one.
            shutil.rmtree(tmp, ignore_errors=True)
            _fsync_dir(folder.parent)
            return
        # No renameat2 here: move the old export aside first. Between the two renames the
        # destination is briefly absent, never partial; the old one is deleted only after.
        old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
        os.rename(folder, old / folder.name)
        os.rename(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, folder)
    _fsync_dir(folder.parent)


_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with Linux renameat2(RENAME_EXCHANGE); False where unavailable."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # file system or kernel without it
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


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
