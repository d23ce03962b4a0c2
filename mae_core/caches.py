"""Housekeeping of the auto-prepared data cache: which sets it holds, which runs use them, and the
removal of superseded ones.

A plain folder is prepared into the cache under a key of its content (:func:`mae_core.prepared.
cache_key`), so an added or touched file makes a new full copy and the old one stays: for 10⁶
images, ~100 GB each time. An old copy cannot simply be deleted when the new one is made: a stopped
run resumes on the very set its ``data.json`` names (its saved loader position indexes it), and
the runs may live in any folder. So each run notes its use beside the set
(:func:`mae_core.prepared.register_use`), and a set is removed only when a newer set of the same
source exists and no run names it (under the given run folders, or by such a note), under the
set's preparation lock.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from mae_core import prepared
from mae_core.fileio import read_json


@dataclass(frozen=True)
class CachedSet:
    path: Path
    source: str
    count: int
    bytes: int
    created: str
    runs: tuple[str, ...]  # the run directories whose data.json names this set
    superseded: bool  # a newer set of the same source is in the cache


def _users(runs_dirs: Iterable[str | Path]) -> dict[str, list[str]]:
    """{real path of a prepared set: [run directories whose data.json names it]}."""
    users: dict[str, list[str]] = {}
    for runs_dir in runs_dirs:
        for record in sorted(Path(runs_dir).glob(f"*/{prepared.RUN_DATA_NAME}")):
            path = (read_json(record) or {}).get("path")
            if path:
                users.setdefault(os.path.realpath(path), []).append(str(record.parent))
    return users


def cached_sets(runs_dirs: Iterable[str | Path]) -> list[CachedSet]:
    """The whole prepared sets in :func:`mae_core.prepared.cache_root` (one being prepared has no
    manifest yet and is left out), oldest first."""
    root = prepared.cache_root()
    if not root.is_dir():
        return []
    users = _users(runs_dirs)
    found = []
    for folder in root.iterdir():
        if folder.name.startswith(".") or not folder.is_dir():  # a preparation's temp folder
            continue
        manifest = read_json(folder / prepared.MANIFEST_NAME)
        if not manifest:
            continue
        # the manifest is the last file a preparation writes: its time orders the sets
        found.append(((folder / prepared.MANIFEST_NAME).stat().st_mtime_ns, folder, manifest))
    found.sort(key=lambda entry: entry[0])
    newest = {manifest.get("source"): folder for _, folder, manifest in found}
    return [CachedSet(folder, str(manifest.get("source", "")), int(manifest.get("count", 0)),
                      int(manifest.get("bytes", 0)), str(manifest.get("created", "")),
                      _runs_of(folder, users), newest[manifest.get("source")] != folder)
            for _, folder, manifest in found]


def _runs_of(folder: Path, users: dict[str, list[str]]) -> tuple[str, ...]:
    """The runs under the given folders that name ``folder``, and those that noted their use of
    it in the cache (:func:`mae_core.prepared.register_use`) from anywhere else."""
    named = users.get(os.path.realpath(folder), [])
    seen = {os.path.realpath(run) for run in named}
    noted = [run for run in prepared.registered_runs(folder) if run not in seen]
    return tuple(named + noted)


def remove_superseded(runs_dirs: Iterable[str | Path]) -> list[CachedSet]:
    """Remove every superseded set that no run names; the removed ones. A set whose preparation
    lock another process holds is kept."""
    removed = []
    for cached in cached_sets(list(runs_dirs)):
        if not cached.superseded or cached.runs:
            continue
        # (the lock file stays: a process waiting on it must keep locking the same file)
        with open(cached.path.parent / f"{cached.path.name}.lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            if prepared.registered_runs(cached.path):  # a run started on it since the listing
                continue
            shutil.rmtree(cached.path)
            shutil.rmtree(cached.path.parent / f"{cached.path.name}.runs", ignore_errors=True)
        removed.append(cached)
    return removed


def report(runs_dirs: list[str | Path], remove: bool = False) -> list[str]:
    """``python -m mae_core.data caches``: one line per cached set (and what was removed)."""
    sets = cached_sets(runs_dirs)
    lines = [f"{len(sets)} prepared set(s) in {prepared.cache_root()}"]
    for cached in sets:
        use = f"used by {', '.join(cached.runs)}" if cached.runs else "used by no run"
        lines.append(f"  {cached.path.name}: {cached.count:,} images of "
                     f"{cached.source or 'the sample photos'}, {cached.bytes / 1e9:.2f} GB, "
                     f"{cached.created}, {'superseded' if cached.superseded else 'newest'}, {use}")
    if remove:
        removed = remove_superseded(runs_dirs)
        lines.append(f"removed {len(removed)} superseded set(s) no run uses: "
                     f"{sum(cached.bytes for cached in removed) / 1e9:.2f} GB freed")
    return lines
