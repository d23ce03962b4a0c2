"""Deleting a run folder: it leaves its name at once (a rename into a hidden folder, under the run
manager's lock), and its files go after; a Delete the app's death cut short is finished when an app
next opens the runs directory."""

from __future__ import annotations

import errno
import os
import shutil
import threading
import uuid
from pathlib import Path

from mae_core.rundir import TRASH_PREFIX


def remove_interrupted_deletes(runs_dir: Path) -> threading.Thread | None:
    """Remove, in the background, the hidden folders of Deletes that never finished (an app killed
    while it removed a run's files): they went only at the next Delete, holding their disk
    unseen meanwhile (a Start could be refused for the room they took). The thread, or None."""
    try:
        leftovers = [p for p in runs_dir.glob(f"{TRASH_PREFIX}*")
                     if p.is_dir() and not p.is_symlink()]
    except OSError:
        return None
    if not leftovers:
        return None
    worker = threading.Thread(target=lambda: [shutil.rmtree(p, ignore_errors=True)
                                              for p in leftovers],
                              name="remove-interrupted-deletes", daemon=True)
    worker.start()
    return worker


def unlink_run_folder(root: Path, runs_dir: Path) -> tuple[Path | None, Path | None]:
    """Take a run folder out of the runs directory: (the target a linked run pointed to, left in
    place; the hidden folder the run now is, for the caller to remove).

    One that is a link (a run moved to another disk and linked back) goes as a link only: its
    target may hold more than the run. A hidden name is no run id, so no listing shows it."""
    if root.is_symlink():
        target = root.resolve()
        root.unlink()
        return target, None
    trash = runs_dir / f"{TRASH_PREFIX}{uuid.uuid4().hex}"
    try:
        os.rename(root, trash)
    except OSError as err:
        if err.errno not in (errno.EXDEV, errno.EBUSY):  # a run folder that is a mount point
            raise
        shutil.rmtree(root)
        return None, None
    return None, trash
