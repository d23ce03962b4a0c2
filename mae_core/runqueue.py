"""The run queue: runs waiting for the devices, in order, kept on disk in the runs directory.

A queued run is a run directory in state ``queued`` (its config checked, nothing launched) plus its
place in ``.queue.json``. The run manager changes the order only under the runs directory's lock
(the one that serialises runs sharing devices), so two apps sharing the directory keep one queue;
an app restart loses nothing.
"""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mae_core.channels import resolve_data
from mae_core.config import RunConfig
from mae_core.data import check_data
from mae_core.fileio import atomic_write_json, read_json
from mae_core.process import process_record
from mae_core.rundir import RunError, RunPaths, RunState, run_folders

QUEUE_NAME = ".queue.json"


class RunQueue:
    """The order of the queued runs of one runs directory (callers hold the runs lock)."""

    def __init__(self, runs_dir: str | Path) -> None:
        self.path = Path(runs_dir) / QUEUE_NAME

    def ids(self) -> list[str]:
        order = (read_json(self.path) or {}).get("order")
        return [r for r in order if isinstance(r, str)] if isinstance(order, list) else []

    def _write(self, ids: list[str]) -> None:
        atomic_write_json(self.path, {"order": list(dict.fromkeys(ids))})

    def add(self, run_id: str) -> int:
        """Append ``run_id``; its 1-based position."""
        ids = [r for r in self.ids() if r != run_id] + [run_id]
        self._write(ids)
        return len(ids)

    def extend(self, run_ids: list[str]) -> None:
        """Append ``run_ids`` in their order (one write)."""
        self._write([r for r in self.ids() if r not in run_ids] + run_ids)

    def remove(self, run_id: str) -> bool:
        ids = self.ids()
        if run_id not in ids:
            return False
        self._write([r for r in ids if r != run_id])
        return True

    def move(self, run_id: str, offset: int) -> int:
        """Move ``run_id`` by ``offset`` places (negative: earlier), clamped; its new position."""
        ids = self.ids()
        if run_id not in ids:
            raise KeyError(run_id)
        index = ids.index(run_id)
        ids.pop(index)
        target = max(0, min(len(ids), index + offset))
        ids.insert(target, run_id)
        self._write(ids)
        return target + 1


class QueuedRuns:
    """The queue's side of :class:`mae_core.runs.RunManager` (its base): Queue, reorder, and the
    launch of the first queued run once its devices are free, under the manager's locks."""

    # Used from the manager: queue, _exclusive, _create, _require_room, _launch, _state, paths,
    # conflicting_run, runs_dir, _queue_worker.

    def enqueue(self, cfg: RunConfig) -> tuple[str, int]:
        """Check ``cfg`` and its data as :meth:`start` does, and queue it behind the live run and
        the runs already waiting; (run id, position). :meth:`advance_queue` launches it."""
        from mae_core.resumecheck import require_one_node  # (runs builds on this module)

        require_one_node(cfg)
        cfg, summary = resolve_data(cfg.resolved())  # in_chans and statistics from the data
        self._require_room(cfg, self.runs_dir)
        with self._exclusive():
            paths = self._create(cfg, state=RunState.QUEUED, data_files=summary.files)
            try:
                return paths.run_id, self.queue.add(paths.run_id)
            except OSError as err:  # a run that is in no queue would wait forever: none is made
                shutil.rmtree(paths.root, ignore_errors=True)
                raise RunError(f"the run cannot be queued: {self.queue.path} cannot be "
                               f"written ({err.strerror or err})") from None

    def queued(self, statuses: Iterable[Mapping[str, Any]] | None = None) -> list[str]:
        """The queued runs, in the order they will start. ``statuses``: every run's, read already
        (the Runs tab's listing), so the runs folder is not read a second time."""
        ids = self.queue.ids()
        if statuses is None:
            return [r for r in ids + self._strays(ids) if self._state(r) == RunState.QUEUED]
        waiting = [s for s in statuses if s.get("state") == RunState.QUEUED]
        named = {s["run_id"] for s in waiting}
        return [r for r in ids if r in named] + _strays_among(waiting, set(ids))

    def _strays(self, listed: list[str]) -> list[str]:
        """Runs in state ``queued`` that the queue file does not list, oldest first: the app was
        killed between making the run and queueing it, or ``.queue.json`` was damaged. They read
        "queued" for ever and never started, and Sooner/Later said "not queued"."""
        known = set(listed)
        return _strays_among([p.read_status() | {"run_id": p.run_id}
                              for p in run_folders(self.runs_dir) if p.run_id not in known], known)

    def _adopt_strays(self) -> None:
        """Put the :meth:`_strays` at the end of the queue (callers hold the locks)."""
        strays = self._strays(self.queue.ids())
        if strays:
            self.queue.extend(strays)

    def move_queued(self, run_id: str, offset: int) -> int:
        """Move a queued run ``offset`` places (negative: sooner); its new position."""
        with self._exclusive():
            self._adopt_strays()
            if self._state(run_id) != RunState.QUEUED or run_id not in self.queue.ids():
                raise RunError(f"run {self.paths(run_id).run_id} is not queued")
            return self.queue.move(run_id, offset)

    def advance_queue(self) -> str | None:
        """Launch the first queued run once its devices are free; the run launched, or None.

        The queue keeps its order: the first run waits for its devices, and those behind it
        wait too. A queued run that cannot be launched (its data gone, say) is marked failed and
        the next one is tried, so one bad run never blocks the queue. Its data is scanned outside
        the locks, as Start's is: a slow disk must not freeze every status call meanwhile.
        """
        while True:
            with self._exclusive():
                first = self._first_queued()
                if first is None or self.conflicting_run(first[1]) is not None:
                    return None
            run_id, cfg = first
            try:
                self._require_room(cfg, self.paths(run_id).root)
            except RunError as err:  # the disk's state, not the run's fault: it keeps its place
                self._note_waiting(run_id, f"waiting for disk space: {err}")
                return None
            try:
                check_data(cfg.train.data)
                problem = None
            except Exception as err:  # noqa: BLE001 - recorded in the run, the queue goes on
                problem = err
            with self._exclusive():
                if (self._first_queued(clean=False) or ("",))[0] != run_id:
                    continue  # moved, deleted or started meanwhile: look again
                if self.conflicting_run(cfg) is not None:
                    return None
                self.queue.remove(run_id)
                if problem is None and self._launch_queued(run_id):
                    return run_id
                if problem is not None:
                    _fail(self.paths(run_id), problem)

    def _first_queued(self, clean: bool = True) -> tuple[str, RunConfig] | None:
        """The first queued run and its config (under the locks); with ``clean``, entries that
        are no longer queued leave the queue, and a run whose config cannot load is failed."""
        if clean:
            self._adopt_strays()
        for run_id in self.queue.ids():
            if self._state(run_id) != RunState.QUEUED:
                if not clean:
                    return None
                self.queue.remove(run_id)
                continue  # deleted or started meanwhile
            paths = self.paths(run_id)
            try:
                return run_id, RunConfig.load(paths.config)
            except Exception as err:  # noqa: BLE001 - recorded in the run, the queue goes on
                if not clean:
                    return None
                self.queue.remove(run_id)
                _fail(paths, err)
        return None

    def _note_waiting(self, run_id: str, why: str) -> None:
        """Say in a queued run's status why it has not started (once, not at every retry)."""
        with self._exclusive():
            paths = self.paths(run_id)
            status = paths.read_status()
            if status.get("state") == RunState.QUEUED and status.get("error") != why:
                with contextlib.suppress(OSError):  # on a full disk this may not fit either
                    paths.write_status(error=why)

    def _launch_queued(self, run_id: str) -> bool:
        paths = self.paths(run_id)
        try:
            paths.write_status(state=RunState.STARTING, error=None, launcher=process_record())
            self._launch(paths, resume=False)
        except Exception as err:  # noqa: BLE001 - recorded in the run, the queue goes on
            _fail(paths, err)
            return False
        return True

    def start_queue_worker(self, every_s: float = 2.0) -> None:
        """Advance the queue in the background, so queued runs start with no page open."""
        if self._queue_worker is not None:
            return

        def work() -> None:
            while True:
                try:
                    self.advance_queue()
                except Exception:  # noqa: BLE001 - a disk hiccup must not end the worker
                    pass
                time.sleep(every_s)

        self._queue_worker = threading.Thread(target=work, name="run-queue", daemon=True)
        self._queue_worker.start()


def _fail(paths: RunPaths, err: BaseException) -> None:
    paths.write_status(state=RunState.FAILED, error=f"could not start from the queue: {err}")


def _strays_among(statuses: Iterable[Mapping[str, Any]], listed: set[str]) -> list[str]:
    """The runs of ``statuses`` in state ``queued`` that are not ``listed``, oldest first."""
    strays = [s for s in statuses if s.get("state") == RunState.QUEUED and s["run_id"] not in listed]
    return [s["run_id"] for s in sorted(strays, key=lambda s: (s.get("created") or 0, s["run_id"]))]
