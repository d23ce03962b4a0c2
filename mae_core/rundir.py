"""The run directory: where a run's files live, and creating a run (what ``status.json`` may
hold is :mod:`mae_core.runstatus`).

:class:`RunPaths` names every file of a run; no other module spells one. ``checkpoints/<run-id>/``
(:data:`DEFAULT_RUNS_DIR`) holds ``config.yaml`` (the resolved config; the file that makes a folder a
run), ``status.json`` (state and progress, fields defined by :class:`RunStatus`), ``process.json``
(the trainer's process), ``data.json`` (the data set it trains on, :mod:`mae_core.datasource`),
``metrics.jsonl`` (one line per logged step), ``train.log``, ``last.ckpt`` (for resume),
``model.safetensors`` (weights), ``previews/step_<step>.png``, ``snapshots/step_<step>.safetensors``
(the weights history, :mod:`mae_core.snapshots`), ``tensorboard/``, and once asked for
``evaluation.json``, ``encoder.safetensors`` (the timm export) and ``metrics.csv``. A ``STOP`` file
asks the trainer to stop. :func:`create_run` is the one place a run directory is made, by the run
manager and the trainer alike.
"""

from __future__ import annotations

import datetime
import json
import re
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mae_core.fileio import (atomic_write, atomic_write_json, open_regular,
                             read_json, wrong_kind)
from mae_core.process import process_record, process_start_time  # noqa: F401 - re-exported
from mae_core.runslock import (_UNWRITABLE, LOCK_NAME, open_lock,  # noqa: F401 - re-exported
                               runs_folder_lock)
from mae_core.runstatus import (DAMAGED_STATUS, LIVE_STATES, STATES,  # noqa: F401 - re-exported
                                STATUS_FIELDS, UNREADABLE_STATUS, RunState, RunStatus,
                                check_status_fields, state_unknown, status_from_json)

if TYPE_CHECKING:
    from mae_core.config import RunConfig

# Longest directory name most file systems accept (bytes); a longer run id names no run.
NAME_MAX = 255
# Where runs live unless the app, the trainer or a tool is told otherwise.
DEFAULT_RUNS_DIR = "checkpoints"
# A deleted run's folder while its files are removed: hidden, and no run id (mae_core.runs).
TRASH_PREFIX = ".deleting-"
# Named here, not only by RunPaths.data_record: mae_core.caches globs every run's record by it.
RUN_DATA_NAME = "data.json"
_RUN_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=@,-]*")
# _RUN_ID and NAME_MAX in words, for every message that refuses a name.
RUN_ID_RULE = (f"ASCII letters, digits and _ . + = @ , - (not first: . + = @ , -), "
               f"at most {NAME_MAX} bytes")
# A preview's or weight snapshot's name, without its suffix (written by _step_name).
_STEP_NAME = re.compile(r"step_(\d+)")


# Held for each read-merge-write of a status.json by this process (a trainer writes from its
# loop and from its heartbeat thread).
_STATUS_WRITE = threading.RLock()  # re-entrant: a signal handler may write in the holder thread


class RunError(RuntimeError):
    """A request the run manager refuses; the message says why, for a person to read."""


def valid_run_id(run_id: Any) -> bool:
    """Whether ``run_id`` can name a run directory: one plain name, no path, not too long."""
    return (isinstance(run_id, str) and len(run_id.encode("utf-8", "replace")) <= NAME_MAX
            and _RUN_ID.fullmatch(run_id) is not None)


def _step_name(step: int, suffix: str) -> str:
    # Zero-padded: a folder sorted by name is in step order.
    return f"step_{step:07d}{suffix}"


def _named_step(path: str | Path, suffix: str) -> int | None:
    path = Path(path)
    match = _STEP_NAME.fullmatch(path.stem) if path.suffix == suffix else None
    return int(match.group(1)) if match else None


def preview_step(path: str | Path) -> int | None:
    """The step of a preview named by :meth:`RunPaths.preview`; None for any other name."""
    return _named_step(path, ".png")


def snapshot_step(path: str | Path) -> int | None:
    """The step of a weight snapshot named by :meth:`RunPaths.snapshot`; None for any other name
    (a save's temp file, a note left beside them)."""
    return _named_step(path, ".safetensors")


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def run_id(self) -> str:
        return self.root.name

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def status(self) -> Path:
        return self.root / "status.json"

    @property
    def process(self) -> Path:
        return self.root / "process.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def log(self) -> Path:
        return self.root / "train.log"

    @property
    def last_ckpt(self) -> Path:
        return self.root / "last.ckpt"

    @property
    def weights(self) -> Path:
        return self.root / "model.safetensors"

    @property
    def data_record(self) -> Path:
        return self.root / RUN_DATA_NAME

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def previews(self) -> Path:
        return self.root / "previews"

    def preview(self, step: int) -> Path:
        return self.previews / _step_name(step, ".png")

    @property
    def snapshots(self) -> Path:
        return self.root / "snapshots"

    def snapshot(self, step: int) -> Path:
        return self.snapshots / _step_name(step, ".safetensors")

    @property
    def evaluation(self) -> Path:
        return self.root / "evaluation.json"

    @property
    def encoder(self) -> Path:
        return self.root / "encoder.safetensors"

    @property
    def metrics_csv(self) -> Path:
        return self.root / "metrics.csv"

    @property
    def stop_request(self) -> Path:
        return self.root / "STOP"

    def is_run(self) -> bool:
        """Whether the folder holds a run: its ``config.yaml``, the file :func:`create_run` writes
        last (a folder or an unreadable entry in its place makes none)."""
        try:
            return self.config.is_file()
        except OSError:
            return False

    def misplaced(self) -> str | None:
        """The files and folders a trainer writes whose place holds what it cannot use, in words
        (for a refusal: "`model.safetensors` is a folder (a file belongs there)"), or None.
        A trainer launched into them failed at its first save or preview (a folder where
        ``model.safetensors`` goes, a file where ``previews/`` goes), or at once (one for
        ``metrics.jsonl``)."""
        entries = [(p, False, False) for p in (self.config, self.status, self.process,
                                               self.data_record, self.last_ckpt, self.weights)]
        entries.append((self.metrics, False, True))  # (train.log: the app's launch checks it)
        entries += [(p, True, False) for p in (self.previews, self.snapshots, self.tensorboard)]
        found = [f"`{path.name}` is {kind} ({'a folder' if folder else 'a file'} belongs there)"
                 for path, folder, appended in entries
                 if (kind := wrong_kind(path, folder=folder, appended=appended))]
        return "; ".join(found) or None

    def stop_requested(self) -> bool:
        """Whether a stop is asked: a STOP file (anything else in its place, a folder made by
        hand, is no request, and goes with the next :meth:`clear_stop_request`)."""
        return self.stop_request.is_file()

    def request_stop(self) -> None:
        self.clear_stop_request()
        self.stop_request.touch()  # empty: it needs an inode, no block (a Stop on a full disk)

    def stop_asked_at(self) -> float | None:
        """When the pending stop was asked: its STOP file's time, on disk, so an app restarted
        since (or another app) still knows how long it has gone unanswered. (The trainer judges a
        STOP left from before its start by that time too.) None where no stop is asked."""
        try:
            made = self.stop_request.stat()
        except OSError:
            return None
        return made.st_mtime if stat.S_ISREG(made.st_mode) else None

    def clear_stop_request(self) -> None:
        if self.stop_request.is_dir() and not self.stop_request.is_symlink():
            shutil.rmtree(self.stop_request, ignore_errors=True)
        else:
            self.stop_request.unlink(missing_ok=True)

    def read_status(self) -> dict[str, Any]:
        """status.json as a plain dict of the :class:`RunStatus` fields it holds; a value of the
        wrong type (a hand-edited or damaged file) is dropped, so one run cannot break a listing."""
        return status_from_json(read_json(self.status), self.run_id)

    def read_record(self) -> RunStatus:
        """status.json as a typed :class:`RunStatus` (fields it lacks take their defaults)."""
        return RunStatus.from_dict(self.read_status())

    def write_status(self, **fields: Any) -> dict[str, Any]:
        """Merge ``fields`` into status.json (atomically) and return the new status.

        Raises:
            ValueError: a field :class:`RunStatus` does not define, or an unknown state.
        """
        check_status_fields(fields)
        with _STATUS_WRITE:  # a read-merge-write: another thread's write between would be lost
            status = read_json(self.status) or {}
            status = {k: v for k, v in status.items() if k in STATUS_FIELDS}
            status.update(fields, run_id=self.run_id, updated=time.time())
            atomic_write_json(self.status, status, make_dirs=False)  # never brings back a deleted run
        return status

    def keep_status_fresh(self, every_s: float = 60.0) -> threading.Event:
        """Rewrite status.json's ``updated`` every ``every_s`` seconds from a thread, for as long
        as this process lives (or the event returned is set). An app on another node judges a run
        by that time alone (:data:`mae_core.runwatch.REMOTE_SILENCE_S`): a trainer there preparing
        its data set, or on a step slower than that, was marked failed while it ran."""
        done = threading.Event()

        def beat() -> None:
            while not done.wait(every_s):
                try:
                    self.write_status()  # the fields as they are: only the time is new
                except (OSError, ValueError):  # a full disk, the run deleted: the next beat
                    continue

        threading.Thread(target=beat, name="status-heartbeat", daemon=True).start()
        return done

    def log_tail(self, lines: int = 40) -> str:
        return tail_lines(self.log, lines)

    def read_metrics(self, since_step: int = -1) -> list[dict[str, Any]]:
        """Metric lines with ``step > since_step``; a line being written right now is skipped."""
        return [row for _, row in _metric_rows(self.metrics) if row["step"] > since_step]

    def truncate_metrics(self, last_step: int) -> float:
        """Drop lines logged after ``last_step`` (a resume restarts from the checkpoint's step);
        the training time before it, the last kept line's ``elapsed_s`` (0.0 if none).

        Read a line at a time and copied as written, rewritten only where a line goes: a
        million-step run's 120 MB file took 12 s and 1.1 GB as dicts, twice, at each resume."""
        elapsed, later = 0.0, False
        for _, row in _metric_rows(self.metrics):
            if row["step"] > last_step:
                later = True
            elif isinstance(row.get("elapsed_s"), (int, float)):
                elapsed = float(row["elapsed_s"])
        if later:
            atomic_write(self.metrics, self._copy_metrics_to(last_step), make_dirs=False)
        return elapsed

    def _copy_metrics_to(self, last_step: int) -> Callable[[str], None]:
        def copy(tmp: str) -> None:
            with open(tmp, "wb") as out:
                for line, row in _metric_rows(self.metrics):
                    if row["step"] <= last_step:
                        out.write(line.rstrip(b"\n") + b"\n")
        return copy


def _metric_rows(path: Path) -> Iterator[tuple[bytes, dict[str, Any]]]:
    """``path``'s lines that are JSON objects with a whole ``step``, each with its object, a line
    at a time; none
    where it is missing, unreadable or not a regular file (a FIFO in its place would block)."""
    try:
        with open_regular(path) as handle:
            for line in handle:
                try:
                    row = json.loads(line)
                except (ValueError, RecursionError):
                    continue
                step = row.get("step") if isinstance(row, dict) else None
                if isinstance(step, int) and not isinstance(step, bool):
                    yield line, row  # a hand-edited step of null or "2" is no step
    except OSError:
        return


def run_folders(runs_dir: str | Path) -> list[RunPaths]:
    """The runs of a runs folder: its children the app lists (a run id for a name, a
    ``config.yaml``). None where the folder is missing or unreadable."""
    try:
        roots = sorted(Path(runs_dir).iterdir())
    except OSError:  # none yet, deleted under the app (to free space), or not readable
        return []
    return [RunPaths(root) for root in roots if valid_run_id(root.name) and RunPaths(root).is_run()]


# create_run writes config.yaml last: a folder without it younger than this may be a run being made.
DAMAGED_AFTER_S = 60.0
DAMAGED = "damaged"  # how a listing names such a folder's state; never in a status.json
DAMAGED_RUN_ERROR = ("its config.yaml is missing (deleted, or the run was killed while being "
                     "made), so it cannot be opened or resumed: delete it, or put its config.yaml "
                     "back")
DAMAGED_RUN_NOTE = "config.yaml missing: delete it, or put the file back"  # the same, in a cell
# Files only a run writes. A folder of the user's own in the runs directory holds none of them, and
# is neither listed nor deleted.
_RUN_WRITES = ("status.json", "process.json", "train.log", "metrics.jsonl", "last.ckpt")
_MADE_RUN_ID = re.compile(r"\d{8}-\d{6}-")  # the start of a name new_run_id gives


def damaged_run_folders(runs_dir: str | Path) -> list[RunPaths]:
    """The runs folder's children that are runs which lost their ``config.yaml``
    (:func:`is_damaged_run_folder`)."""
    try:
        roots = sorted(Path(runs_dir).iterdir())
    except OSError:
        return []
    now = time.time()
    return [RunPaths(root) for root in roots if is_damaged_run_folder(root, now)]


def is_damaged_run_folder(root: Path, now: float | None = None) -> bool:
    """Whether ``root`` is a run folder that lost its ``config.yaml``: one deleted by hand, or a
    kill between a new run's ``mkdir`` and its config. No run listing shows such a folder, yet it
    holds its disk, so the app lists it to be deleted. Only a folder holding a file a run writes,
    or nothing at all under a name the app gives, and unchanged for :data:`DAMAGED_AFTER_S`."""
    now = time.time() if now is None else now
    if not valid_run_id(root.name) or RunPaths(root).is_run():
        return False
    try:
        if not root.is_dir() or now - root.stat().st_mtime < DAMAGED_AFTER_S:
            return False
        names = {child.name for child in root.iterdir()}
    except OSError:
        return False
    # Empty: a kill right after a new run's mkdir, if the name is one the app gives (an empty
    # folder of your own, "backup", is yours).
    return bool(names.intersection(_RUN_WRITES) or (not names and _MADE_RUN_ID.match(root.name)))


def create_run(cfg: RunConfig, runs_dir: str | Path | None = None, run_dir: str | Path | None = None,
               process: dict[str, Any] | None = None, state: str = RunState.STARTING,
               **status: Any) -> RunPaths:
    """Make a run directory for ``cfg`` (already resolved): the one place runs are created.

    A new unique directory under ``runs_dir``, or ``run_dir`` itself (a run started by hand with
    ``--run-dir``). Written in this order: status ``state`` ("starting", or "queued" for a run that
    waits for the devices) with its created time, then
    ``process.json`` when the caller is the trainer itself (with the folder it writes, so a move of
    the folder under it is told as such), then ``config.yaml``, the file that makes a directory a
    run, so a reader never sees a run without a status. ``status`` adds fields.
    """
    check_status_fields(status)
    if run_dir is not None:
        paths = RunPaths(Path(run_dir))
        paths.root.mkdir(parents=True, exist_ok=True)
    else:
        if runs_dir is None:
            raise ValueError("create_run needs runs_dir or run_dir")
        paths = _new_run_directory(Path(runs_dir), cfg.model.label, cfg.model.policy)
    try:
        paths.write_status(state=state, step=0, total_steps=cfg.train.max_steps,
                           preset=cfg.model.label, policy=cfg.model.policy,
                           world_size=cfg.train.world_size, created=time.time(), **status)
        if process is not None:
            atomic_write_json(paths.process, process | {"run_dir": str(paths.root.resolve())})
        cfg.save(paths.config)
    except OSError:  # a full disk: no half-made run left behind (a named directory stays)
        if run_dir is None:
            shutil.rmtree(paths.root, ignore_errors=True)
        raise
    return paths


def _new_run_directory(runs_dir: Path, preset: str, policy: str) -> RunPaths:
    """Create a fresh run directory; ``mkdir`` without ``exist_ok`` makes the name ours even when
    two processes pick the same one in the same second."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    for _ in range(1000):
        root = runs_dir / new_run_id(runs_dir, preset, policy)
        try:
            root.mkdir()
        except FileExistsError:
            continue
        return RunPaths(root)
    raise FileExistsError(f"could not find a free run directory name in {runs_dir}")


def new_run_id(runs_dir: Path, preset: str, policy: str) -> str:
    """A readable, unique run id: date, time, preset and policy."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = f"{stamp}-{preset}-{policy}"
    run_id, n = base, 1
    while (runs_dir / run_id).exists():
        n += 1
        run_id = f"{base}-{n}"
    return run_id


def tail_lines(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a (log) file, reading only its end; "" if it cannot be read or
    is no regular file (a FIFO in its place would block the reader, and the run manager reads it
    under its lock)."""
    try:
        with open_regular(path) as handle:
            handle.seek(0, 2)
            handle.seek(max(0, handle.tell() - 64 * 1024))
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
