"""The runs folders of this machine: one list, so that a run is not started on devices that a
live run of another runs folder holds (a second app with its own ``--runs-dir``, a trainer started
by hand). Each folder a run manager opens, or a trainer makes a run in, is noted in it
(``$MAE_STUDIO_RUNS_DIRS``, else ``runs-dirs.json`` in :func:`mae_core.fileio.cache_home`).

Two apps on two runs folders started a CPU run each at the same moment: four processes on two
cores; on a GPU machine, two runs on the same GPUs. The one-live-run rule only looked in its own
folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from mae_core import process as proc
from mae_core.config import RunConfig
from mae_core.fileio import atomic_write_json, cache_home, read_json
from mae_core.rundir import LIVE_STATES, RunPaths, run_folders

REGISTRY_ENV = "MAE_STUDIO_RUNS_DIRS"
MAX_KEPT = 64  # the most recently noted folders; a machine has a handful


def registry_path() -> Path:
    return Path(os.environ.get(REGISTRY_ENV) or cache_home() / "runs-dirs.json")


def note_runs_dir(runs_dir: str | Path) -> None:
    """Put ``runs_dir`` first in the machine's list (folders gone since are dropped). Best
    effort: a home that cannot be written costs the check across folders, never a run."""
    here = os.path.realpath(runs_dir)
    registry = registry_path()
    with contextlib.suppress(OSError):
        registry.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(f"{registry}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # two apps starting at once keep both their folders
            known = [here] + [d for d in _listed(registry) if d != here and os.path.isdir(d)]
            atomic_write_json(registry, {"runs_dirs": known[:MAX_KEPT]})
        finally:
            os.close(fd)


def other_runs_dirs(runs_dir: str | Path) -> list[Path]:
    """The machine's runs folders other than ``runs_dir`` that still exist."""
    here = os.path.realpath(runs_dir)
    return [Path(d) for d in _listed(registry_path()) if d != here and os.path.isdir(d)]


def live_elsewhere(runs_dir: str | Path) -> Iterator[tuple[RunPaths, int, RunConfig | None]]:
    """:func:`live_runs` of the machine's other runs folders."""
    return live_runs(other_runs_dirs(runs_dir))


def live_runs(folders: list[Path]) -> Iterator[tuple[RunPaths, int, RunConfig | None]]:
    """Each run of ``folders`` whose trainer lives on this machine: its folder, the trainer's pid
    and its config (None: unreadable). Read only: a folder's own app marks its dead runs."""
    for folder in folders:
        for paths in run_folders(folder):
            if paths.read_status().get("state") not in LIVE_STATES:
                continue
            pid = proc.live_trainer(read_json(paths.process) or {}, paths.root)
            if pid is None:
                continue  # another node's, or dead (its app marks it failed when it next looks)
            try:
                yield paths, pid, RunConfig.load(paths.config)
            except Exception:  # noqa: BLE001 - unreadable: the caller assumes the worst
                yield paths, pid, None


def _listed(registry: Path) -> list[str]:
    listed = (read_json(registry) or {}).get("runs_dirs")
    return [d for d in listed if isinstance(d, str)] if isinstance(listed, list) else []
