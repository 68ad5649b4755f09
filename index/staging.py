"""Publishing a bundle folder atomically: write a hidden sibling, then swap it into place in one step.

A live service that opened the old bundle keeps reading it (its open files and mmaps survive the swap);
one that opens the path gets either the whole old bundle or the whole new one. A build killed midway
leaves only a hidden `.NAME.staging-*` folder without a manifest, removed by the next job on NAME.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


@contextlib.contextmanager
def locked(target: Path) -> Iterator[None]:
    """Hold an exclusive lock on `target` for a whole job, so two updates cannot both start from one bundle."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no advisory locks; one job at a time is then the operator's job
        yield
        return
    with open(target.parent / f".{target.name}.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as error:
            raise RuntimeError(f"{target}: another index job is updating this bundle") from error
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def staging_folder(target: Path) -> Iterator[Path]:
    """A fresh hidden sibling of `target` to write into; removed again if the job fails. Call under `locked`."""
    for stale in target.parent.glob(f".{target.name}.staging-*"):
        # Under the lock no other job is writing, so these are leftovers of killed jobs.
        logger.warning("removing %s, left by an interrupted index job", stale)
        shutil.rmtree(stale, ignore_errors=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # after a publish this holds the previous bundle


def publish(staged: Path, target: Path) -> None:
    """Make `staged` the folder at `target`; the previous bundle, if any, ends up at `staged`."""
    _fsync_tree(staged)
    if not target.exists():
        os.rename(staged, target)
    elif not _exchange(staged, target):
        # No atomic exchange here: two renames, with a moment in which `target` does not exist.
        previous = staged.with_name(staged.name + ".previous")
        os.rename(target, previous)
        os.rename(staged, target)
        os.rename(previous, staged)
    _fsync_dir(target.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Linux renameat2(RENAME_EXCHANGE): swap two paths in one step. False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # kernel or file system without it
        return False
    raise OSError(code, f"cannot swap {a} and {b}: {os.strerror(code)}")


def _fsync_tree(folder: Path) -> None:
    # Without this a power cut after the rename could publish a bundle of empty files.
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # directories cannot be opened for fsync on every platform
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def link_or_copy(source: Path, destination: Path) -> None:
    """Carry an unchanged file into the new bundle: a hard link (bundle files are never written in place)."""
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)
