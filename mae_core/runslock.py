"""The runs directory's file lock (``.runs.lock``): apps sharing the directory, and trainers
started by hand in it, take it from their check that a run's devices are free to its launch, so
two never start on the same devices. ``flock``: released when the file closes, by a killed process
too.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

# The lock file apps sharing a runs directory take before they check for a live run and launch.
LOCK_NAME = ".runs.lock"
# What a write refused for the file system's sake (not a bug) fails with: said in words.
_UNWRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def open_lock(runs_dir: Path) -> int:
    """A descriptor of the runs directory's lock file to ``flock``, made if missing. Where it
    cannot be opened for writing (a read-only mount), read-only: ``flock`` needs no write access,
    and Start, Resume and Delete then say why they cannot write instead of failing on the lock.
    With no lock file there, the directory itself is locked: nobody can write in it anyway."""
    path = runs_dir / LOCK_NAME
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        if err.errno not in _UNWRITABLE:
            raise
    try:
        return os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return os.open(runs_dir, os.O_RDONLY | os.O_DIRECTORY)


@contextlib.contextmanager
def runs_folder_lock(runs_dir: Path, make: bool = True) -> Iterator[bool]:
    """The runs folder's file lock (:func:`open_lock`), which every app sharing the folder takes
    to check the devices free and make a run (``RunManager._exclusive``), and a run started by
    hand too: between its own check and its config, an app's Start went ahead beside it.
    ``flock``: released when the file closes, by a killed process too.

    ``make``: make the lock file if missing. Without it, a folder no app has locked (the parent of
    a ``--run-dir`` of your choosing: your home) is left as it is: no app there to exclude.
    Yields whether the folder is locked: False on a file system without ``flock`` (Lustre
    without ``-o flock``, NFS without lockd), which is no reason to refuse a run."""
    if not make and not (runs_dir / LOCK_NAME).exists():
        yield True
        return
    runs_dir.mkdir(parents=True, exist_ok=True)
    fd = open_lock(runs_dir)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            locked = True
        except OSError as err:
            if err.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            locked = False
        yield locked
    finally:
        os.close(fd)


# How long a Start, Queue, Resume or Delete (or the queue worker) waits for the runs directory's
# file lock, which others hold for a launch's fraction of a second, before it gives up in words.
LOCK_WAIT_S = 30.0


def wait_for_lock(fd: int, timeout_s: float = LOCK_WAIT_S) -> bool:
    """Whether ``fd`` could be ``flock``ed within ``timeout_s``; True at once where the file system
    has no ``flock`` (Lustre without ``-o flock``, NFS without lockd): no reason to refuse a run."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        except OSError as err:
            if err.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
                return True
            raise
