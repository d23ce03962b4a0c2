"""Housekeeping of the auto-prepared data cache: which sets it holds, which runs use them, and the
removal of superseded ones.

A plain folder is prepared into the cache under a key of its content (:func:`mae_core.prepared.
cache_key`), so an added or touched file makes a new full copy and the old one stays: for 10⁶
images, ~100 GB each time. An old copy cannot simply be deleted when the new one is made: a stopped
run resumes on the very set its ``data.json`` names (its saved loader position indexes it), and
the runs may live in any folder. So each run notes its use beside the set
(:func:`register_use`), and a set is removed only when a newer set of the same source exists and
no run names it (under the given run folders, or by such a note), under the set's preparation lock.
A set whose manifest or shards are damaged (:func:`mae_core.prepared.check_set`) is listed as
damaged, with the reason, and never removed here (the next run on its folder prepares it anew,
:func:`mae_core.prepared.prepare_cached`, unless a live run reads it); a damaged note of a run is
skipped.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from mae_core import datasource, prepared
from mae_core.diskspace import folder_bytes
from mae_core.fileio import atomic_write_json, read_json
from mae_core.rundir import RUN_DATA_NAME


@dataclass(frozen=True)
class CachedSet:
    path: Path
    source: str
    count: int
    bytes: int
    created: str
    runs: tuple[str, ...]  # the run directories whose data.json names this set
    superseded: bool  # a newer set of the same source is in the cache
    damage: str | None = None  # why it cannot be read (count 0, bytes measured on disk), or None


def register_use(dataset: str | Path, run_root: Path) -> None:
    """Note beside a set of the cache (``<set>.runs/``) that the run at ``run_root`` trains on it
    (:func:`mae_core.datasource.run_data`): the housekeeping then keeps a set that any run may
    resume on, wherever its runs folder is, not only the runs of the folders it is shown. Other
    sets are not the cache's."""
    real = Path(os.path.realpath(dataset))
    if real.parent != Path(os.path.realpath(prepared.cache_root())):
        return
    users = real.parent / f"{real.name}.runs"
    users.mkdir(exist_ok=True)
    run = os.path.realpath(run_root)
    atomic_write_json(users / f"{hashlib.sha256(run.encode()).hexdigest()[:16]}.json", {"run": run})


def registered_runs(dataset: Path) -> list[str]:
    """The runs :func:`register_use` noted for ``dataset`` whose ``data.json`` still names it (a
    deleted run, or one moved to another set, no longer counts; nor does a damaged note)."""
    real, runs = os.path.realpath(dataset), []
    for note in sorted((dataset.parent / f"{dataset.name}.runs").glob("*.json")):
        run = (read_json(note) or {}).get("run")
        if not isinstance(run, str) or not run or "\0" in run:  # not a note register_use wrote
            continue
        named = datasource.read_run_data(run)
        if named and named.path and os.path.realpath(named.path) == real:
            runs.append(run)
    return runs


def _users(runs_dirs: Iterable[str | Path]) -> dict[str, list[str]]:
    """{real path of a prepared set: [run directories whose data.json names it]}."""
    users: dict[str, list[str]] = {}
    for runs_dir in runs_dirs:
        for record in sorted(Path(runs_dir).glob(f"*/{RUN_DATA_NAME}")):
            named = datasource.read_run_data(record.parent)  # None: missing or damaged
            if named and named.path:
                users.setdefault(os.path.realpath(named.path), []).append(str(record.parent))
    return users


def cached_sets(runs_dirs: Iterable[str | Path]) -> list[CachedSet]:
    """The prepared sets in :func:`mae_core.prepared.cache_root` (one being prepared has no
    manifest yet and is left out), oldest first; a damaged one is listed with the reason."""
    root = prepared.cache_root()
    if not root.is_dir():
        return []
    users = _users(runs_dirs)
    found = []
    for folder in root.iterdir():
        if folder.name.startswith(".") or not folder.is_dir():  # a preparation's temp folder
            continue
        try:  # the manifest is the last file a preparation writes: its time orders the sets
            written = (folder / prepared.MANIFEST_NAME).stat().st_mtime_ns
        except OSError:  # being prepared, or a set's notes (<set>.runs)
            continue
        manifest, damage = prepared.check_set(folder)
        found.append(((written, folder.name), folder, manifest, damage))
    found.sort(key=lambda entry: entry[0])
    newest = {entry[2].get("source", ""): entry[1] for entry in found if entry[2] is not None}
    sets = []
    for _, folder, manifest, damage in found:
        runs = _runs_of(folder, users)
        if manifest is None:  # its source as written, if it is text, to say which folder it was
            source = (read_json(folder / prepared.MANIFEST_NAME) or {}).get("source")
            sets.append(CachedSet(folder, source if isinstance(source, str) else "", 0,
                                  folder_bytes(folder), "", runs, False, damage))
            continue
        source = manifest.get("source", "")
        sets.append(CachedSet(folder, source, manifest["count"], manifest.get("bytes", 0),
                              manifest.get("created", ""), runs, newest[source] != folder))
    return sets


def _runs_of(folder: Path, users: dict[str, list[str]]) -> tuple[str, ...]:
    """The runs under the given folders that name ``folder``, and those that noted their use of
    it in the cache (:func:`register_use`) from anywhere else."""
    named = users.get(os.path.realpath(folder), [])
    seen = {os.path.realpath(run) for run in named}
    noted = [run for run in registered_runs(folder) if run not in seen]
    return tuple(named + noted)


def _remove(path: Path) -> None:
    """Remove ``path``: a folder with all it holds; a symbolic link (a set linked into the cache)
    as the link alone, never followed out of the cache."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def remove_superseded(runs_dirs: Iterable[str | Path]) -> list[CachedSet]:
    """Remove every superseded set that no run names; the removed ones. A set whose preparation
    lock another process holds (or whose lock cannot be opened) is kept, and so is a damaged one."""
    removed = []
    for cached in cached_sets(list(runs_dirs)):
        if not cached.superseded or cached.runs:
            continue
        # (the lock file stays: a process waiting on it must keep locking the same file)
        try:
            lock = open(cached.path.parent / f"{cached.path.name}.lock", "w")  # noqa: SIM115
        except OSError:  # (closed by the with below)
            continue
        with lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            if registered_runs(cached.path):  # a run started on it since the listing
                continue
            _remove(cached.path)
            with contextlib.suppress(OSError):
                _remove(cached.path.parent / f"{cached.path.name}.runs")
        removed.append(cached)
    return removed


def report(runs_dirs: list[str | Path], remove: bool = False) -> list[str]:
    """``python -m mae_core.data caches``: one line per cached set (and what was removed)."""
    sets = cached_sets(runs_dirs)
    lines = [f"{len(sets)} prepared set(s) in {prepared.cache_root()}"]
    for cached in sets:
        use = f"used by {', '.join(cached.runs)}" if cached.runs else "used by no run"
        if cached.damage:
            lines.append(f"  {cached.path.name}: damaged ({cached.damage}), "
                         f"{cached.bytes / 1e9:.2f} GB, {use}; kept (the next run on its folder "
                         "prepares it again; or remove it by hand once no "
                         "run needs it)")
            continue
        lines.append(f"  {cached.path.name}: {cached.count:,} images of "
                     f"{cached.source or 'the sample photos'}, {cached.bytes / 1e9:.2f} GB, "
                     f"{cached.created}, {'superseded' if cached.superseded else 'newest'}, {use}")
    if remove:
        removed = remove_superseded(runs_dirs)
        lines.append(f"removed {len(removed)} superseded set(s) no run uses: "
                     f"{sum(cached.bytes for cached in removed) / 1e9:.2f} GB freed")
    return lines
