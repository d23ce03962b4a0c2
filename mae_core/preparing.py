"""The app's side of prepared data: what a data field holds (:func:`survey`, :func:`data_note`), and
preparing a large folder in the background, with its progress and a cancel that leaves nothing
half-written.

A preparation is its own process (``python -m mae_core.preparing FOLDER PROGRESS_DIR``, in its own
session like a trainer): a cancel then ends it and its LitData encoding workers with one signal to
the process group, and the app's process never holds LitData's workers or their memory. The job
prepares into the same cache a run's start uses (:func:`mae_core.prepared.prepare_cached`, under its
file lock), so a run started afterwards finds the set ready, and a run started meanwhile waits for
it. Progress comes back through files in ``PROGRESS_DIR``: ``job.json`` (the file count and the
target, once the walk is done), ``waiting`` (while it waits on the set's lock: another process is
preparing the same set), ``done-<pid>`` (each encoding process's count) and ``result.json``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from mae_core.diskspace import full_disk_message, size_text
from mae_core.fileio import (atomic_write_json, atomic_write_text, is_disk_full, read_json,
                             says_disk_full)
from mae_core.process import launch, process_start_time
from mae_core.proctree import terminate_group

if TYPE_CHECKING:
    from mae_core.data import DataSummary
    from mae_core.datasource import DataSource

JOB_NAME = "job.json"
RESULT_NAME = "result.json"
WAITING_NAME = "waiting"
LOG_NAME = "prepare.log"


# --- what the data field holds ------------------------------------------------------------------

def survey(data: str, summary: DataSummary | None = None) -> DataSource:
    """What the data field holds, for a person before Start: :func:`describe`, plus a folder's
    size on disk and, for a folder read in memory, how many of its files are not images (from
    their headers: a large folder's unreadable files are counted when it is prepared).
    ``summary``, :func:`mae_core.data.check_data`'s for ``data``, saves a second walk and scan."""
    # (imported here: mae_core.datasource imports torch and Lightning, the app's page need not wait)
    from mae_core.channels import scan_headers
    from mae_core.data import find_images
    from mae_core.datasource import describe
    from mae_core.prepared import is_prepared, is_remote

    if is_remote(data) or is_prepared(data):
        return describe(data)
    paths = list(summary.paths) if summary is not None and summary.paths else find_images(data)
    found = describe(data, paths=paths)
    if found.kind == "prepared":
        return found
    size = 0
    for path in paths:
        try:
            size += os.stat(path).st_size
        except OSError:
            continue
    skipped = None
    if found.kind == "memory":
        skipped = (summary.unreadable if summary is not None and summary.unreadable is not None
                   else scan_headers(paths, data).unreadable)
    return replace(found, bytes=size, skipped=skipped)


def data_note(data: str, found: DataSource | None = None) -> str:
    """How ``data`` will be read, for a person (the UI shows it beside the data field)."""
    from mae_core.prepared import AUTO_PREPARE_ABOVE, cache_root

    found = found or survey(data)
    if found.kind == "remote":
        return "a remote prepared data set: LitData streams it at start (credentials from the environment)."
    if found.kind == "memory":
        bad = f", {found.skipped:,} of them not images (skipped)" if found.skipped else ""
        return (f"{size_text(found.bytes)} on disk{bad}; up to {AUTO_PREPARE_ABOVE:,} images: decoded "
                "into memory by each process.")
    if found.kind == "folder":
        return (f"{size_text(found.bytes)} on disk; not prepared yet. More than {AUTO_PREPARE_ABOVE:,} "
                f"images: prepared once (re-encoded into streamed shards under {cache_root()}) "
                "when the run starts, or now with Prepare; unreadable files are counted then.")
    return (f"prepared: {found.count:,} images ({found.skipped or 0:,} unreadable skipped), "
            f"{size_text(found.bytes)} on disk at {found.path}.")


# --- the encoding processes' count of files done ---------------------------------------------

# Files done by this encoding process since it started: counted into ``<progress>/done-<pid>``.
_DONE: dict[str, Any] = {"count": 0, "written": 0.0, "progress": None}
PROGRESS_EVERY_S = 0.5


def count_done(progress: str | None) -> None:
    """One more file done (:func:`mae_core.prepared.prepare`'s encoder); every half second the
    total goes to this process's progress file (each ``optimize`` worker has its own, the reader
    sums them: no lock, no shared counter)."""
    if _DONE["progress"] != progress:  # a new preparation in this (long-lived) process
        _DONE.update(count=0, written=0.0, progress=progress)
    _DONE["count"] += 1
    now = time.monotonic()
    if progress and now - _DONE["written"] >= PROGRESS_EVERY_S:
        _DONE["written"] = now
        atomic_write_text(Path(progress) / f"done-{os.getpid()}", str(_DONE["count"]))


@contextlib.contextmanager
def waiting_said(progress: str | Path | None) -> Iterator[None]:
    """While the block waits (on a set's lock that another process holds), ``<progress>/waiting``
    says so: the page shows "waiting", not "0 of N files done"."""
    marker = Path(progress) / WAITING_NAME if progress else None
    if marker is not None:
        atomic_write_text(marker, str(os.getpid()))
    try:
        yield
    finally:
        if marker is not None:
            marker.unlink(missing_ok=True)


# How often a preparation says how far it got, in the terminal or the log it writes to.
REPORT_EVERY_S = 10.0


@contextlib.contextmanager
def reported_progress(progress: str | Path, total: int,
                      every_s: float = REPORT_EVERY_S) -> Iterator[None]:
    """Print "encoded N of M images (P %)" every ``every_s`` while the block runs. LitData's own
    progress bar redraws with terminal escapes (unreadable in a log file), and comes with its
    advert and a line per worker."""
    stop = threading.Event()

    def report() -> None:
        while not stop.wait(every_s):
            done = min(progress_done(progress), total)
            print(f"encoded {done:,} of {total:,} images ({100 * done / max(total, 1):.0f} %)",
                  flush=True)

    reporter = threading.Thread(target=report, name="preparation-progress", daemon=True)
    reporter.start()
    try:
        yield
    finally:
        stop.set()
        reporter.join()


def progress_done(progress: str | Path) -> int:
    """Files the encoding processes that report into ``progress`` have done (read or skipped)."""
    done = 0
    for path in Path(progress).glob("done-*"):
        try:
            done += int(path.read_text() or 0)
        except (OSError, ValueError):  # a file being replaced: counted at the next look
            continue
    return done


# --- a preparation in the background -------------------------------------------------------------

@dataclass(frozen=True)
class Progress:
    """Where a preparation stands: ``state`` is walking, waiting (on another process preparing
    the same set), encoding, done, failed or cancelled."""

    state: str
    done: int = 0
    total: int | None = None
    seconds: float = 0.0
    target: str | None = None
    message: str = ""

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed", "cancelled")

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total else 0.0


class Preparation:
    """One background preparation of ``folder`` (``""``: the sample photos) into the cache."""

    def __init__(self, folder: str, workers: int | None = None) -> None:
        self.folder = folder
        self.progress_dir = Path(tempfile.mkdtemp(prefix="mae-prepare-"))
        # (the app's pid: an app that exits at once may be gone before the job asks for its parent)
        command = [sys.executable, "-m", "mae_core.preparing", folder, str(self.progress_dir),
                   "--app-pid", str(os.getpid())]
        if workers:
            command += ["--workers", str(workers)]
        self.started = time.monotonic()
        self._cancelled = False
        self.process = launch(command, self.progress_dir / LOG_NAME)
        self.start_time = process_start_time(self.process.pid)
        self._lock = threading.Lock()

    def progress(self) -> Progress:
        """The job's state now, read from its files (and its exit code once it has ended)."""
        seconds = round(time.monotonic() - self.started, 1)
        job = read_json(self.progress_dir / JOB_NAME) or {}
        total, target = job.get("total"), job.get("target")
        if self._cancelled:
            return Progress("cancelled", 0, total, seconds, target, "nothing was kept")
        code = self.process.poll()
        result = read_json(self.progress_dir / RESULT_NAME)
        if result:
            done = total if result["state"] == "done" else progress_done(self.progress_dir)
            return Progress(result["state"], done or 0, total, seconds, target, result["message"])
        if code is not None:  # ended without a result: killed from outside, out of memory...
            tail = self.log_tail()
            full = says_disk_full(tail)  # no room left for its result
            return Progress("failed", 0, total, seconds, target,
                            f"the preparation process ended (exit code {code})"
                            + (f": {full_disk_message(target, then='prepare the folder again')}"
                               if full and target else "")
                            + f": {tail}")
        if total is None:
            return Progress("walking", 0, None, seconds, None, "finding the image files")
        if (self.progress_dir / WAITING_NAME).exists():
            return Progress("waiting", 0, total, seconds, target,
                            "another process is preparing the same set")
        return Progress("encoding", progress_done(self.progress_dir), total, seconds, target)

    def cancel(self, grace_s: float = 3.0) -> Progress:
        """End the job and its encoding workers, and remove what they were writing.

        ``prepare`` writes into ``.<target>.tmp-<pid>`` (the pid of this job's process) and renames
        it at the very end: after the kill nothing of it remains, and the cache holds no set that
        looks whole but is not. A job that had already finished keeps its (whole) set.
        """
        with self._lock:
            if self.process.poll() is not None or self._cancelled:
                return self.progress()
            terminate_group(self.process.pid, self.start_time, grace_s)
            self.process.wait()
            if (read_json(self.progress_dir / RESULT_NAME) or {}).get("state") == "done":
                return self.progress()  # it finished in the meantime: the set is whole, keep it
            self._cancelled = True
            target = (read_json(self.progress_dir / JOB_NAME) or {}).get("target")
            if target:
                tmp = Path(target).parent / f".{Path(target).name}.tmp-{self.process.pid}"
                shutil.rmtree(tmp, ignore_errors=True)
            return self.progress()

    def log_tail(self, chars: int = 600) -> str:
        try:
            text = (self.progress_dir / LOG_NAME).read_text(errors="replace")
        except OSError:
            return ""
        return text[-chars:].strip()

    def close(self) -> None:
        """Forget the job's progress files (after it finished or was cancelled)."""
        if self.process.poll() is None:
            self.cancel()
        shutil.rmtree(self.progress_dir, ignore_errors=True)


class Preparations:
    """The app's background preparations, one per folder: a second Prepare of a folder shows the
    first one's progress instead of starting another."""

    def __init__(self) -> None:
        self._jobs: dict[str, Preparation] = {}
        self._lock = threading.Lock()

    def start(self, folder: str, workers: int | None = None) -> Preparation:
        with self._lock:
            job = self._jobs.get(folder)
            if job is not None and not job.progress().finished:
                return job
            if job is not None:
                job.close()
            job = self._jobs[folder] = Preparation(folder, workers)
            return job

    def running(self) -> list[str]:
        """The folders being prepared now."""
        return [folder for folder, job in list(self._jobs.items()) if not job.progress().finished]

    def get(self, folder: str) -> Preparation | None:
        return self._jobs.get(folder)

    def cancel(self, folder: str) -> Progress | None:
        job = self._jobs.get(folder)
        return job.cancel() if job is not None else None

    def close(self) -> None:
        with self._lock:
            for job in self._jobs.values():
                job.close()
            self._jobs.clear()

    def release(self) -> None:
        """At the app's exit: remove the progress files of the jobs that have ended. A running
        job carries on into the cache (a run started later finds it ready, as a run outlives
        the app) and removes its own progress files when it ends, its app being gone."""
        with self._lock:
            for job in self._jobs.values():
                if job.progress().finished:  # its result is written: it writes nothing more
                    shutil.rmtree(job.progress_dir, ignore_errors=True)


# --- the job's own process ---------------------------------------------------------------------

def _run(folder: str, progress_dir: Path, workers: int | None) -> dict[str, Any]:
    from mae_core import prepared
    from mae_core.data import find_images

    paths = find_images(folder)
    target = prepared.cache_dir(folder, paths, prepared.DEFAULT_SHORT_SIDE)
    atomic_write_json(progress_dir / JOB_NAME, {"total": len(paths), "target": str(target)})
    if prepared.check_set(target)[0] is not None:  # a damaged copy is made again, not "done"
        manifest = prepared.read_manifest(target)
        return {"state": "done", "message": f"already prepared: {manifest['count']:,} images at "
                                            f"{target}", "manifest": manifest}
    prepared.prepare_cached(folder, paths, workers=workers, progress=progress_dir)
    manifest = prepared.read_manifest(target)
    return {"state": "done", "manifest": manifest,  # (fields checked by read_manifest)
            "message": f"prepared {manifest['count']:,} images ({manifest.get('skipped', 0):,} "
                       f"unreadable skipped) in {manifest.get('seconds', 0):.0f} s: "
                       f"{manifest.get('bytes', 0) / 1e6:,.1f} MB at {target}"}


def main(argv: list[str] | None = None) -> int:
    import argparse

    from mae_core.checks import DataError

    parent = os.getppid()  # first: the app may exit while this process imports torch

    # README names this command (the app's own process): its help said nothing of what it is for.
    parser = argparse.ArgumentParser(
        prog="python -m mae_core.preparing",
        description="The process the app's Prepare now starts: prepares FOLDER into the data "
                    "cache, writing its progress and result in PROGRESS_DIR for the app to read. "
                    "By hand, prepare a folder with python -m mae_core.data optimize.")
    parser.add_argument("folder", help="the image folder to prepare")
    parser.add_argument("progress_dir", help="where the progress and the result are written")
    parser.add_argument("--workers", type=int, default=None, help="encoding workers (default: "
                        "from the CPU cores)")
    parser.add_argument("--app-pid", type=int, default=None, help="the app that reads the progress")
    args = parser.parse_args(argv)
    app = args.app_pid or parent
    # SIGTERM (a cancel) as an exception: prepare's ``finally`` then removes its temp folder.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    progress_dir = Path(args.progress_dir)
    try:
        result = _run(args.folder, progress_dir, args.workers)
    except DataError as err:
        result = {"state": "failed", "message": str(err)}
    except Exception as err:  # a worker's ENOSPC reaches here as LitData's RuntimeError
        from mae_core.prepared import cache_root

        if not is_disk_full(err):
            raise
        result = {"state": "failed", "message": "nothing was kept: " + full_disk_message(
            cache_root(), then="prepare the folder again")}
    finally:  # an app that has exited reads no progress: nothing is left in the temp folder
        orphaned = os.getppid() != app
        if orphaned:
            shutil.rmtree(progress_dir, ignore_errors=True)
    if not orphaned:
        atomic_write_json(progress_dir / RESULT_NAME, result)
    return 0 if result["state"] == "done" else 2


if __name__ == "__main__":
    sys.exit(main())
