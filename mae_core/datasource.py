"""What a run trains on: a small folder decoded in memory, a prepared set, or one at a URL.

:func:`describe` says what ``--data`` is without preparing anything; :func:`resolve` also prepares
a large folder into the cache (:func:`mae_core.prepared.prepare_cached`). :func:`run_data` decides
it once per run, in the job's first process, and records it in ``<run>/data.json``
(:func:`read_run_data`, the one place it is read), where every other rank and node reads it. The
data module (:func:`make_datamodule`) and the preview images (:func:`source_previews`) follow
from it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pytorch_lightning as pl
from torch import Tensor

from mae_core.checks import StopRequested, is_remote
from mae_core.data import DataError, MAEDataModule, find_images
from mae_core.data import preview_images as folder_previews
from mae_core.fileio import atomic_write_json, read_json
from mae_core.prepared import (
    AUTO_PREPARE_ABOVE,
    DEFAULT_SHORT_SIDE,
    _whole,
    cache_dir,
    check_set,
    is_prepared,
    prepare_cached,
    read_manifest,
)
from mae_core.rundir import RunPaths, RunState, state_unknown


@dataclass(frozen=True)
class DataSource:
    """Where a run's images come from: ``memory`` (a small folder decoded per process),
    ``prepared`` (a local prepared directory), ``remote`` (a prepared set at a URL) or, from
    :func:`describe` only, ``folder`` (a large folder not prepared yet)."""

    kind: str
    path: str
    source: str  # what the run was given (--data)
    files: int | None = None
    count: int | None = None
    skipped: int | None = None
    bytes: int | None = None
    short_side: int | None = None


def describe(data: str, auto_prepare_above: int = AUTO_PREPARE_ABOVE,
             paths: list[str] | None = None) -> DataSource:
    """What ``data`` is, without preparing anything (a folder's cache is looked up, not made)."""
    if is_remote(data):
        return DataSource("remote", data, data)
    if is_prepared(data):
        m = read_manifest(Path(data).expanduser())
        return DataSource("prepared", str(Path(data).expanduser()), data, m.get("files"),
                          m["count"], m.get("skipped"), m.get("bytes"), m.get("short_side"))
    paths = paths if paths is not None else find_images(data)
    if len(paths) <= auto_prepare_above:
        return DataSource("memory", data, data, files=len(paths))
    cached = cache_dir(data, paths, DEFAULT_SHORT_SIDE)
    if check_set(cached)[0] is not None:  # a damaged copy counts as none: it is made again
        found = describe(str(cached))
        return DataSource("prepared", found.path, data, len(paths), found.count, found.skipped,
                          found.bytes, found.short_side)
    return DataSource("folder", data, data, files=len(paths))


def held_in_memory(data: str, files: int | None) -> bool:
    """Whether a run on ``data`` (a folder of ``files`` images) reads it in memory rather than
    streaming a prepared set: what :func:`describe` decides, without walking the folder again."""
    if is_remote(data) or is_prepared(data):
        return False
    return (files or 0) <= AUTO_PREPARE_ABOVE


def resolve(data: str, workers: int | None = None,
            auto_prepare_above: int = AUTO_PREPARE_ABOVE, reader: Path | None = None
            ) -> DataSource:
    """:func:`describe`, preparing a large folder into the cache when it is not there yet
    (``reader``: the run asking, see :func:`~mae_core.prepared.prepare_cached`; its ``STOP``
    file ends the preparation, or the wait for another one, with :class:`StopRequested`)."""
    paths = None if is_remote(data) or is_prepared(data) else find_images(data)
    found = describe(data, auto_prepare_above, paths)
    if found.kind != "folder":
        return found
    stop_file = RunPaths(reader).stop_request if reader is not None else None
    prepared = prepare_cached(data, paths, workers=workers, reader=reader, stop_file=stop_file)
    return replace(describe(str(prepared)), source=data, files=len(paths or []))


def first_process() -> bool:
    """Global rank 0 of the job (:func:`mae_core.process.first_process`, which the trainer asks
    too: the process that creates the run is the one that records its data)."""
    from mae_core.process import first_process as first

    return first()


def read_run_data(run_root: str | Path) -> DataSource | None:
    """``<run>/data.json``, the one place it is read; None when it is missing or names no data set
    (a kind, path or source of another type). A count of another type, or out of range, reads as
    unknown (None): the set the run resumes on is its path, not its count."""
    known = read_json(RunPaths(Path(run_root)).data_record) or {}
    kind, path, source = known.get("kind"), known.get("path"), known.get("source", "")
    if kind not in ("memory", "prepared", "remote") or not all(
            isinstance(text, str) and "\0" not in text for text in (path, source)):
        return None
    return DataSource(kind, path, source, **{key: known[key] if _whole(known.get(key)) else None
                                             for key in ("files", "count", "skipped", "bytes",
                                                         "short_side")})


def run_data(data: str, run_root: Path, timeout_s: float = 6 * 3600.0,
             auto_prepare_above: int = AUTO_PREPARE_ABOVE) -> DataSource:
    """The run's data source, decided once per run by the job's first process and recorded in
    ``<run>/data.json``; every other rank and node reads it there (no walk per rank). A resumed run
    keeps the prepared set it started on, so the saved loader position still matches."""
    from mae_core.caches import register_use

    paths = RunPaths(Path(run_root))
    if first_process():
        known = read_run_data(run_root)
        # A set found damaged since (a reader marked its samples undecodable) is not kept: the
        # cache's copy of the folder is made again, under the same key, so the saved loader
        # position still matches; a set prepared by hand is refused with the reason.
        if known and known.source == data and (
                known.kind in ("memory", "remote") or check_set(known.path)[0] is not None):
            if known.kind == "prepared":  # a run recorded before runs noted their sets
                register_use(known.path, run_root)
            return known
        found = resolve(data, auto_prepare_above=auto_prepare_above, reader=paths.root)
        atomic_write_json(paths.data_record, asdict(found))
        if found.kind == "prepared":
            register_use(found.path, run_root)
        return found
    started, deadline = time.time(), time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not paths.root.is_dir():  # moved or deleted: no record will ever come (it waited 6 h)
            raise DataError(f"the run folder {paths.root} went (moved or deleted) while this "
                            "process waited for the first process to record the data set")
        known = read_run_data(run_root)
        # A record of a set being made again (damaged since) is not taken before it is whole.
        if known and known.source == data and (known.kind != "prepared"
                                               or check_set(known.path)[0] is not None):
            return known
        status = paths.read_status()
        updated = status.get("updated")
        # Failed in this session (a resumed run's status may still say a previous one failed); a
        # missing or damaged status.json is no news from the first process.
        if (status["state"] in (RunState.FAILED, RunState.STOPPED) and not state_unknown(status)
                and updated is not None and updated >= started - 5):
            if status["state"] == RunState.STOPPED:  # a Stop during its preparation
                raise StopRequested("the first process stopped before it recorded the data set")
            raise DataError(f"the first process failed before it recorded the data set: "
                            f"{status.get('error')}")
        time.sleep(0.5)
    raise DataError(f"the first process recorded no data set in {paths.data_record} within "
                    f"{timeout_s:.0f} s")


def make_datamodule(source: DataSource, image_size: int, batch_size: int, num_workers: int,
                    seed: int = 0, pin_memory: bool | None = None,
                    channels: int = 3, decode_on_device: bool = False) -> pl.LightningDataModule:
    """The datamodule for ``source``: in memory for a small folder, streamed otherwise (prepared
    sets are 8-bit RGB: :func:`mae_core.prepared.prepare` refuses other images)."""
    if source.kind == "memory":
        return MAEDataModule(source.path, image_size, batch_size, num_workers,
                             pin_memory=pin_memory, channels=channels)
    from mae_core.shards import StreamingMAEDataModule  # LitData loads only where a set is read

    return StreamingMAEDataModule(source.path, image_size, batch_size, num_workers, seed,
                                  pin_memory, decode_on_device)


def source_previews(source: DataSource, image_size: int, count: int, channels: int = 3) -> Tensor:
    if source.kind == "memory":
        return folder_previews(source.path, image_size, count, channels)
    from mae_core.shards import preview_images

    return preview_images(source.path, image_size, count)
