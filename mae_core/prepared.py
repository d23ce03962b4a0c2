"""Prepared data sets: a folder of images re-encoded once into LitData shards, streamed to every rank.

``prepare`` walks a folder once and writes each readable image, its short side bounded, as JPEG
bytes at three resolutions (:mod:`mae_core.crops`, which also cuts the training crops) into LitData
chunks (``litdata.optimize``) plus ``mae_manifest.json`` (source, count,
skipped, sizes, date), into a temporary folder renamed into place at the end, so a prepared
directory is always whole. ``StreamingDataset``/``StreamingDataLoader`` then read it: each rank
(and each node) reads only its own share of the chunks, nothing is held in memory per rank, and the
loader's position is saved in Lightning's checkpoint so a resumed run continues mid-epoch.

A plain folder above :data:`AUTO_PREPARE_ABOVE` images is prepared automatically into a cache keyed
by its path and content (file list, sizes, mtimes), by one process under a file lock. Smaller
folders (the 17 embedded photos) keep the in-memory path of :mod:`mae_core.data`: decoding a few
hundred images takes a second, preparing them would take longer than the run. Which of them a
run trains on, and its record of it, is :mod:`mae_core.datasource`'s.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import glob
import hashlib
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mae_core.checks import REMOTE_SCHEMES, StopRequested, is_remote, shown  # noqa: F401 - for callers
from mae_core.crops import (
    JPEG_QUALITY,
    SMALL_SIDE,
    encode_copies,
    mid_side,
)
from mae_core.data import DataError, find_images
from mae_core.fileio import atomic_write_json, cache_home, fsync_dir, read_json
from mae_core.images import ImageError, open_rgb
from mae_core.preparing import count_done, reported_progress, waiting_said

MANIFEST_NAME = "mae_manifest.json"
# 2 added the half-pixel copy ("mid") and stores a copy no smaller than the image empty; the
# reader takes both (a version-1 set reads as it did, without the faster copy).
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
# 2 × the MAE paper's 224 px (and config.MAX_IMAGE_SIZE): one prepared set serves every size up
# to 224 at full resolution, even for MAE's smaller random crops; larger sizes upsample them.
DEFAULT_SHORT_SIDE = 448
MIN_SHORT_SIDE = 256
# Up to this many image files a folder is decoded into memory per process (today's path, which
# starts in about a second); above it the folder is prepared once and streamed.
AUTO_PREPARE_ABOVE = 1000
CACHE_ENV = "MAE_STUDIO_DATA_CACHE"
DAMAGED_NAME = "damaged.json"  # written by a reader that could not decode the set's samples


def is_prepared(data: str) -> bool:
    if not data or is_remote(data):
        return False
    try:
        return (Path(data).expanduser() / MANIFEST_NAME).is_file()
    except (OSError, ValueError, RuntimeError):
        # A name too long for the file system, a NUL, "~nosuchuser": no prepared set there; the
        # folder check that follows says what is wrong with the path.
        return False


UNREADABLE = f"its {MANIFEST_NAME} is missing or unreadable"
_NUMBERS = ("count", "files", "skipped", "bytes", "short_side", "mid_side", "small_side", "quality")
_TEXTS = ("source", "created", "litdata")


# How a prepared set's fields may be stored: as prepare writes them (an id, JPEG bytes). LitData
# decodes each field by the name its index.json gives, and some of its decoders run code ("pickle"
# unpickles): a set naming any other is refused before an item of it is read.
FIELD_FORMATS = frozenset({"int", "bytes"})


def unsafe_format(index: Any) -> str | None:
    """Why a set with this ``index.json`` (as read) is not read, or None: fields stored in a
    format :func:`prepare` never writes."""
    config = index.get("config") if isinstance(index, dict) else None
    formats = config.get("data_format") if isinstance(config, dict) else None
    if not isinstance(formats, list) or not formats or \
            not all(isinstance(name, str) for name in formats):
        return "its index.json records no format for its fields"
    other = sorted(set(formats) - FIELD_FORMATS)
    if other:
        return (f"its index.json stores fields as {', '.join(map(shown, other))}, which this app "
                "never writes (and will not decode: a field can run code when read)")
    return None


def _whole(value: Any, least: int | bool = 0) -> bool:
    """Whether ``value`` (read from JSON) is a whole number in [least, 2**63): no bool, no float."""
    return type(value) is int and least <= value < 2**63


def check_set(folder: str | Path) -> tuple[dict[str, Any] | None, str | None]:
    """(manifest, None) for a whole prepared set this version reads, else (None, why not): the one
    check of the manifest's fields (each present one of its type and range) and of the shards, so
    every reader may format them."""
    manifest = read_json(Path(folder) / MANIFEST_NAME)
    if not manifest or type(manifest.get("format")) is not int or \
            manifest["format"] not in READABLE_FORMATS or "count" not in manifest:
        return None, UNREADABLE
    seconds = manifest.get("seconds", 0)
    bad = [key for key in _NUMBERS if key in manifest and not _whole(manifest[key], key == "count")]
    bad += [key for key in _TEXTS if not isinstance(manifest.get(key, ""), str)]
    bad += ["seconds"] * (type(seconds) not in (int, float) or not 0 <= seconds < float("inf"))
    if bad:
        kind = {"count": "a whole number of at least 1", "seconds": "a duration"}.get(
            bad[0], "a whole number" if bad[0] in _NUMBERS else "text")
        return None, f"its {MANIFEST_NAME} records {bad[0]} {shown(manifest[bad[0]])}, not {kind}"
    damage = _damage(Path(folder))
    return (None, damage) if damage else (manifest, None)


def read_manifest(folder: str | Path) -> dict[str, Any]:
    manifest, damage = check_set(folder)
    if manifest is None:
        what = (f"{folder} is not a prepared data set of this version" if damage == UNREADABLE
                else f"the prepared data set {folder} is damaged")
        raise DataError(f"{what} ({damage}): prepare it again with python -m mae_core.data optimize")
    return manifest


def mark_damaged(folder: str | None, reason: str) -> None:
    """Note in a local set that a reader found its samples undecodable (bytes damaged behind
    chunk sizes that still match): :func:`check_set` then reports it, so the cache's copy of a
    folder is prepared again at the next start, where it was refused for ever under its key
    ("Already prepared"). A set that cannot be written (read-only, remote) is left as it is."""
    if not folder or is_remote(folder):
        return
    with contextlib.suppress(OSError):
        atomic_write_json(Path(folder) / DAMAGED_NAME, {"reason": reason[:500]}, make_dirs=False)


def _damage(folder: Path) -> str | None:
    """What keeps LitData from reading ``folder``'s shards whole, or None: a reader's note that
    its samples do not decode (:func:`mark_damaged`), a missing or malformed index, a missing
    chunk, or a chunk of another size than its index records (a copy cut short).
    One ``stat`` per 64 MB chunk: a run fails here, with the reason, not hours in."""
    marked = read_json(folder / DAMAGED_NAME)
    if marked is not None:
        reason = marked.get("reason") if isinstance(marked, dict) else None
        return (f"a run could not decode its samples ({DAMAGED_NAME} in it; delete that file "
                f"if the set is whole): {str(reason or 'no reason kept')[:300]}")
    index = read_json(folder / "index.json")
    if not index or not index.get("chunks"):
        return "its index.json is missing or unreadable"
    chunks, config = index["chunks"], index.get("config") or {}
    if not isinstance(chunks, list) or not isinstance(config, dict) or not all(
            isinstance(c, dict) and isinstance(c.get("filename"), str) and c["filename"] and
            "\0" not in c["filename"] and _whole(c.get("chunk_bytes", 0)) and
            _whole(c.get("chunk_size", 0)) for c in chunks):
        return "its index.json is not as LitData writes it"
    unsafe = unsafe_format(index)
    if unsafe:
        return unsafe
    for chunk in chunks:
        name = chunk["filename"]
        try:
            size = (folder / name).stat().st_size
        except OSError:
            return f"its chunk {name} is missing"
        if not config.get("compression") and size != chunk.get("chunk_bytes", size):
            return (f"its chunk {name} holds {size:,} bytes, not the {chunk['chunk_bytes']:,} its "
                    "index records")
    return None


# --- preparation -----------------------------------------------------------------------------

def _encode(item: tuple[int, str], short_side: int, progress: str | None = None,
            stop_file: str | None = None) -> dict[str, Any] | None:
    """One image as ``{"id", "image", "mid", "small"}`` (:func:`mae_core.crops.encode_copies`);
    None (skipped by ``optimize``) for a file that cannot be read. Raises :class:`StopRequested`
    once ``stop_file`` (a run's ``STOP``) exists: LitData then ends every encoding process."""
    index, path = item
    _stop_if_asked(stop_file)  # one stat per image
    try:
        return {"id": index, **encode_copies(open_rgb(path), short_side)}
    except ImageError as err:
        print(f"skipping {err}", file=sys.stderr, flush=True)
    except OSError as err:  # PIL's JPEG encoder refused the decoded image
        print(f"skipping {path}: it cannot be stored as JPEG ({err})", file=sys.stderr, flush=True)
    finally:
        count_done(progress)
    return None


def _refuse_non_rgb8(source: str, paths: list[str]) -> None:
    """Shards hold 8-bit RGB JPEGs: grayscale, multi-band or 16-bit images would be silently
    converted, so they are refused (they train from memory, up to AUTO_PREPARE_ABOVE images)."""
    from mae_core.channels import scan_format

    fmt = scan_format(paths, source)
    if not fmt.is_rgb8:
        raise DataError(f"{source or 'the sample photos'} holds {fmt.describe()} images; a prepared "
                        "set stores 8-bit RGB JPEGs and would lose their channels or precision: "
                        f"train on the folder itself (at most {AUTO_PREPARE_ABOVE:,} images)")


@contextlib.contextmanager
def _ctrl_c_kept() -> Iterator[None]:
    """Ctrl+C a KeyboardInterrupt while ``litdata.optimize`` runs, and its handler as it was once
    it returns. LitData installs its own, which ends the process with ``os._exit(0)``: a Ctrl+C
    while a trainer prepared its data ended the run as if it had finished (nothing recorded), and
    ``python -m mae_core.data optimize`` exited 0 leaving its ``.OUT.tmp-<pid>`` folder. It is
    LitData's clean-up (each encoding process told to stop) and then the interrupt, in this
    process; the encoding processes keep LitData's own exit."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers are the main thread's
        return
    from litdata.processing.data_processor import DataProcessor

    previous = signal.getsignal(signal.SIGINT)
    litdatas = DataProcessor.__dict__.get("_signal_handler")
    here, asked = os.getpid(), threading.Event()

    def interrupted(processor: Any, signum: int, frame: Any) -> None:
        if os.getpid() != here:  # an encoding process forked with the handler
            return litdatas(processor, signum, frame)
        asked.set()
        for queue in getattr(processor, "stop_queues", []):
            queue.put(None)
        for worker in getattr(processor, "workers", []):
            worker.join(0)
        raise KeyboardInterrupt

    if litdatas is not None:  # a LitData without it installs none of its own to replace
        DataProcessor._signal_handler = interrupted
    try:
        yield
        # Raised where Python swallows exceptions (a fork's logging hook, a __del__) the interrupt
        # is lost, and LitData returns once the stopped encoders end: a partial set, never kept.
        if asked.is_set():
            raise KeyboardInterrupt
    finally:
        if litdatas is not None:
            DataProcessor._signal_handler = litdatas
        signal.signal(signal.SIGINT, previous)


def _shard_count(folder: Path) -> tuple[int, int]:
    """(samples, bytes) of the LitData shards in ``folder``, from its ``index.json``."""
    index = read_json(folder / "index.json") or {}
    count = sum(int(chunk.get("chunk_size", 0)) for chunk in index.get("chunks", []))
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    return count, size


def prepare(source: str, out: str | Path, short_side: int = DEFAULT_SHORT_SIDE,
            workers: int | None = None, paths: list[str] | None = None,
            verbose: bool = True, progress: str | Path | None = None,
            stop_file: str | Path | None = None) -> dict[str, Any]:
    """Prepare ``source`` (a folder, ``""`` for the sample photos) into ``out``; its manifest.

    ``progress``: a folder the encoding processes count their files into
    (:func:`mae_core.preparing.progress_done`). ``stop_file``: a run's ``STOP`` file; once it
    exists the preparation ends, keeping nothing, with :class:`StopRequested`.
    Everything is written into ``.<out>.tmp-<pid>`` beside ``out`` and renamed at the end: a kill
    leaves no half-prepared set that looks whole.
    """
    import litdata

    if not isinstance(short_side, int) or short_side < MIN_SHORT_SIDE:
        raise DataError(f"short side must be an integer of at least {MIN_SHORT_SIDE}, got {shown(short_side)}")
    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()):
        raise DataError(f"output folder {out} already exists and is not empty: choose a new one")
    paths = paths if paths is not None else find_images(source)
    _refuse_non_rgb8(source, paths)
    _stop_if_asked(stop_file)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    workers = max(1, min(workers or (os.cpu_count() or 1), len(paths)))
    started = time.monotonic()
    try:
        with contextlib.ExitStack() as reporting:
            if verbose:  # our own progress lines: LitData's (verbose) are a redrawn bar and an advert
                print(f"preparing {len(paths):,} images of {source or 'the sample photos'} into "
                      f"{out} ({workers} encoding process{'es' if workers > 1 else ''})", flush=True)
                progress = progress or reporting.enter_context(
                    tempfile.TemporaryDirectory(prefix="mae-encode-"))
                reporting.enter_context(reported_progress(progress, len(paths)))
            encode = functools.partial(_encode, short_side=short_side,
                                       progress=str(progress) if progress else None,
                                       stop_file=str(stop_file) if stop_file else None)
            try:
                reporting.enter_context(_ctrl_c_kept())
                litdata.optimize(fn=encode,
                                 inputs=[(i, str(p)) for i, p in enumerate(paths)],
                                 output_dir=str(tmp), chunk_bytes="64MB", num_workers=workers,
                                 verbose=False, start_method="fork")
            except Exception:  # an encoder's StopRequested reaches here as LitData's RuntimeError
                _stop_if_asked(stop_file)
                raise
            _stop_if_asked(stop_file)  # asked as the last images were encoded
        count, size = _shard_count(tmp)
        if count == 0:
            raise DataError(f"none of the {len(paths)} image files in {source or 'the sample photos'} "
                            "can be read: all are corrupt or not images")
        manifest = {"format": FORMAT_VERSION, "source": os.path.abspath(source) if source else "",
                    "files": len(paths), "count": count, "skipped": len(paths) - count,
                    "short_side": short_side, "mid_side": mid_side(short_side),
                    "small_side": SMALL_SIDE, "bytes": size,
                    "quality": JPEG_QUALITY,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "seconds": round(time.monotonic() - started, 2),
                    "litdata": litdata.__version__}
        atomic_write_json(tmp / MANIFEST_NAME, manifest)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
        fsync_dir(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


# --- the cache of automatically prepared folders ---------------------------------------------

def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or cache_home() / "prepared")


def require_cache_folder() -> Path:
    """:func:`cache_root`, made if need be; a :class:`DataError` naming it and the setting that
    moves it when it cannot be written (a read-only home, a file in its place): a large folder is
    prepared there, and the preparation or the run failed with a bare traceback."""
    root = cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
        if not os.access(root, os.W_OK | os.X_OK):
            raise PermissionError(13, "not writable")
    except OSError as err:
        raise DataError(f"the data cache {root} cannot be used ({err.strerror or err}): a folder of "
                        f"more than {AUTO_PREPARE_ABOVE:,} images is prepared there first; set "
                        f"{CACHE_ENV} (or XDG_CACHE_HOME) to a writable folder", "data") from None
    return root


def cache_key(folder: str, paths: list[str], short_side: int) -> str:
    """A digest of the folder's real path and content (each file's path, size and mtime): an
    added, removed, replaced or touched file makes a new prepared set; nothing is read."""
    digest = hashlib.sha256(json.dumps([FORMAT_VERSION, short_side, os.path.realpath(folder)]).encode())
    for path in paths:
        try:
            st = os.stat(path)
            digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{path}\0missing\n".encode())
    return digest.hexdigest()[:24]


def cache_dir(folder: str, paths: list[str], short_side: int) -> Path:
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(folder).name)[:40]
    return cache_root() / f"{name or 'data'}-{cache_key(folder, paths, short_side)}"


def prepare_cached(folder: str, paths: list[str] | None = None,
                   short_side: int = DEFAULT_SHORT_SIDE, workers: int | None = None,
                   progress: str | Path | None = None, reader: Path | None = None,
                   stop_file: str | Path | None = None) -> Path:
    """The prepared copy of ``folder`` in :func:`cache_root`, made once: the first process takes
    the lock and prepares, the others wait on the lock and find it done. ``reader``: the run
    asking (a resumed run, live itself, may have its own damaged set made again). ``stop_file``:
    that run's ``STOP`` file, which ends the wait on the lock and the preparation
    (:class:`StopRequested`)."""
    paths = paths if paths is not None else find_images(folder)
    target = cache_dir(folder, paths, short_side)
    if check_set(target)[0] is not None:
        return target
    require_cache_folder()
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{target.name}.lock", "w") as lock:
        _take_lock(lock, progress, stop_file)  # released when the file closes, or the process dies
        manifest, damage = check_set(target)
        if manifest is None and target.exists():
            # Damaged since it was made (a chunk lost, a copy cut short): the cache's own copy of
            # a folder that is still there is made again, not refused for ever under its key;
            # but never under a live run that reads it.
            _refuse_if_read(target, damage, reader)
            print(f"the cached set {target} is damaged ({damage}): preparing it again", flush=True)
            aside = target.with_name(f".{target.name}.damaged-{os.getpid()}")
            target.rename(aside)
            shutil.rmtree(aside, ignore_errors=True)
        if manifest is None:
            _remove_abandoned_preparations(target)
            prepare(folder, target, short_side, workers, paths=paths, progress=progress,
                    stop_file=stop_file)
    return target


LOCK_POLL_S = 0.25


def _take_lock(lock: Any, progress: str | Path | None,
               stop_file: str | Path | None = None) -> None:
    """Lock a set's lock file; held elsewhere (a run's start, another app preparing the same
    folder), the wait is said in ``progress`` (:func:`mae_core.preparing.waiting_said`), or in
    this process's output (a run's log: its start otherwise sat silent for the whole wait).
    The wait ends with :class:`StopRequested` once ``stop_file`` exists: a run stopped while
    another process prepared its set waited for all of that preparation."""
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        if progress is None:
            print(f"waiting for another process (the app's Prepare, or another run) that is "
                  f"preparing the same set ({Path(lock.name).with_suffix('')})", flush=True)
        with waiting_said(progress):
            if stop_file is None:
                fcntl.flock(lock, fcntl.LOCK_EX)
                return
            while True:
                _stop_if_asked(stop_file)
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return
                except BlockingIOError:
                    time.sleep(LOCK_POLL_S)


def _stop_if_asked(stop_file: str | Path | None) -> None:
    if stop_file and os.path.isfile(stop_file):
        raise StopRequested("the run was asked to stop while it prepared its data set (nothing of "
                            "the preparation was kept)")


def _remove_abandoned_preparations(target: Path) -> None:
    """The ``.<target>.tmp-<pid>`` folders of preparations of ``target`` that were killed (a Force
    stop, a SIGKILL, a power cut): partial shards, up to the whole set's size, that nothing
    removed. Called under the target's lock, so no preparation of it is running, here or on
    another host sharing the cache."""
    for abandoned in target.parent.glob(f".{glob.escape(target.name)}.tmp-*"):
        if abandoned.is_dir() and not abandoned.is_symlink():
            shutil.rmtree(abandoned, ignore_errors=True)


def _refuse_if_read(target: Path, damage: str | None, reader: Path | None = None) -> None:
    from mae_core.caches import registered_runs
    from mae_core.rundir import LIVE_STATES, RunPaths

    asking = os.path.realpath(reader) if reader else None
    live = [run for run in registered_runs(target) if os.path.realpath(run) != asking
            and RunPaths(Path(run)).read_status().get("state") in LIVE_STATES]
    if live:
        raise DataError(f"the cached set {target} is damaged ({damage}), and the live run {live[0]} "
                        "reads it: stop that run, then start again to prepare the folder anew")
