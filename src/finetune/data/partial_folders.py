"""Folders built under a hidden name and renamed into place when complete, with a lock that marks a build alive,
so concurrent runs never see half a folder and a killed build's leftovers are reclaimed (the demo data set)."""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial-"
# Where flock is unavailable we cannot tell a killed build from a running one,
# so its leftovers are only reclaimed once they are clearly abandoned.
STALE_PARTIAL_AGE_S = 24 * 3600


def make_partial(root: Path) -> tuple[Path, int | None]:
    """Create and lock an empty, hidden build folder next to ``root``.

    The lock (where the OS and file system support flock) is what marks the
    folder as alive: the kernel drops it when the builder dies, however it dies,
    so a later run can tell a killed build from one in progress and reclaim it.
    """
    while True:
        partial = root.with_name(f".{root.name}{PARTIAL_SUFFIX}{uuid.uuid4().hex}")
        partial.mkdir()
        try:
            lock_fd = try_lock(partial)
        except OSError:
            return partial, None  # no locking here; clean-up falls back to age
        if lock_fd is not None:
            return partial, lock_fd
        # A concurrent clean-up locked it between our mkdir and flock and will
        # delete it; leave it to that process and start over under a new name.


def try_lock(folder: Path) -> int | None:
    """Lock ``folder`` exclusively without blocking.

    Returns:
        A file descriptor holding the lock, or None if another process holds it.

    Raises:
        OSError: If the folder cannot be opened or locking is unsupported.
    """
    if fcntl is None:
        raise OSError("flock is not available on this platform")
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError:
        os.close(fd)
        raise
    return fd


def remove_abandoned_partials(parent: Path) -> None:
    """Removes the build folders under `parent` whose builder died (unlocked), or, without flock, that are old."""
    for candidate in parent.iterdir():
        if not (candidate.name.startswith(".") and PARTIAL_SUFFIX in candidate.name):
            continue
        try:
            lock_fd = try_lock(candidate)
        except OSError:
            lock_fd = -1  # cannot tell from a lock; judge by age below
        if lock_fd is None:
            continue  # its builder is still running
        if lock_fd >= 0:
            try:
                logger.debug("Removing abandoned partial folder %s", candidate)
                shutil.rmtree(candidate, ignore_errors=True)
            finally:
                os.close(lock_fd)
            continue
        try:
            age = time.time() - candidate.stat().st_mtime
        except OSError:
            continue  # vanished: its builder finished or cleaned up
        if age > STALE_PARTIAL_AGE_S:
            logger.debug("Removing old partial folder %s", candidate)
            shutil.rmtree(candidate, ignore_errors=True)
