"""The run manager: starts, stops, resumes and watches training runs; its state is the disk.

The UI calls this and nothing below it. Each run is a ``python -m mae_core.train`` process launched
by :mod:`mae_core.process`, with its output in ``train.log``. A new manager (an app restart)
re-attaches to live runs from ``process.json`` and reports runs whose process died without
finishing as ``failed``, with the log tail. Runs that share devices are serialised (runs naming
disjoint GPU sets may be live together), also across apps sharing the runs directory: a file lock
in it is held from the live-run check to the launch.

Example:
    >>> manager = RunManager("checkpoints")
    >>> run_id = manager.start(RunConfig())
    >>> manager.metrics(run_id, since_step=-1)[-1]  # {"step": ..., "loss": ..., "lr": ...}
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mae_core import process as proc
from mae_core import proctree
from mae_core.channels import resolve_channels, resolve_data
from mae_core.checks import shown
from mae_core.config import RunConfig
from mae_core.devices import share_devices
from mae_core.data import check_data
from mae_core.diskspace import check_room, full_disk_message, same_disk, still_to_write
from mae_core.fileio import (DiskFullError, NotRegularFileError, atomic_write_json,
                             disk_nearly_full, mounted_read_only, wrong_kind)
from mae_core.process import PROJECT_ROOT  # noqa: F401 - re-exported for callers and tests
from mae_core.resumecheck import (past_the_epoch_limit, require_devices, require_no_waiting_job,
                                  require_one_node, require_same_model, require_steps_left,
                                  require_steps_past_the_end, require_weights_of,
                                  stopped_untrained)
from mae_core.lastckpt import checkpoint_step, saved_step
from mae_core.rundir import (_UNWRITABLE, DAMAGED, DAMAGED_RUN_ERROR,  # noqa: F401
                             DEFAULT_RUNS_DIR, LIVE_STATES, LOCK_NAME, RUN_ID_RULE, TRASH_PREFIX,
                             RunError, RunPaths, RunState, create_run, damaged_run_folders,
                             is_damaged_run_folder, open_lock, preview_step, run_folders,
                             state_unknown, valid_run_id)
from mae_core.rundelete import remove_interrupted_deletes, unlink_run_folder
from mae_core.runqueue import QueuedRuns, RunQueue
from mae_core.runsdirs import live_elsewhere, note_runs_dir
from mae_core.runslock import LOCK_WAIT_S, wait_for_lock
from mae_core.runwatch import TrainerWatch
from mae_core.weights import export_encoder, timm_snippet

class RunManager(QueuedRuns, TrainerWatch):
    """Owns the training processes of one runs directory.

    Args:
        runs_dir: where run directories live (``checkpoints/`` by default).
        stop_timeout_s: how long a graceful stop may take before the process group is terminated.
    """

    def __init__(self, runs_dir: str | Path = DEFAULT_RUNS_DIR, stop_timeout_s: float = 60.0) -> None:
        self.runs_dir = Path(runs_dir)
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        note_runs_dir(self.runs_dir)  # so the managers of other folders see its live runs
        self.stop_timeout_s = stop_timeout_s
        self._exit_codes: dict[int, int] = {}  # pid -> return code of trainers this manager reaped
        self._terminating: set[Path] = set()  # run directories whose trainer _terminate is ending
        # The stop watchdog of each trainer asked to stop (run directory, pid, start time): one
        # each, made again by a status read in a manager that has none (an app restarted since).
        self._stop_watches: dict[tuple[Path, int, str], threading.Thread] = {}
        self._lock = threading.RLock()
        self.queue = RunQueue(self.runs_dir)
        self._queue_worker: threading.Thread | None = None
        self.leftovers_removal = remove_interrupted_deletes(self.runs_dir)

    # --- queries ------------------------------------------------------------------------------

    def paths(self, run_id: str) -> RunPaths:
        """The files of run ``run_id``; RunError unless it names a run directory of this manager."""
        if not valid_run_id(run_id):
            raise RunError(f"no run named {shown(run_id)}: a run id is one directory name of "
                           f"{RUN_ID_RULE}")
        paths = RunPaths(self.runs_dir / run_id)
        if not paths.is_run():
            raise RunError(f"no run named {shown(run_id)} in {self.runs_dir}")
        return paths

    def status(self, run_id: str) -> dict[str, Any]:
        """The run's status.json, corrected for a process that died without saying so.

        Adds ``stop_requested`` (a stop is pending), ``resumable`` (stopped or failed, with a
        checkpoint) and ``extendable`` (finished, with a checkpoint: a resume with a higher max
        steps trains it further) to the stored fields (:class:`mae_core.rundir.RunStatus`).
        """
        with self._lock:
            paths = self.paths(run_id)
            status = paths.read_status()
            if state_unknown(status) and self._trainer_pid(paths) is not None:
                # Its trainer lives and rewrites the file at its next progress save: still live,
                # so it can be stopped, and neither deleted nor started twice meanwhile.
                status = {**status, "state": RunState.RUNNING,
                          "error": f"{status.get('error')}; the trainer still runs and writes it "
                                   "again at its next progress save"}
            if (status.get("state") in LIVE_STATES and paths.root not in self._terminating
                    and not self._alive(paths, status)):
                try:
                    status = self._mark_dead(paths)
                except OSError as err:  # a full disk, a read-only archive: report, don't break
                    why = (full_disk_message(paths.root) if disk_nearly_full(paths.root)
                           else str(err))
                    status = {**status, "state": RunState.FAILED, "error": "the trainer process is "
                              f"gone, and its status.json cannot be updated ({why})"}
            if status.get("state") in LIVE_STATES and paths.root not in self._terminating:
                self._watch_stop(paths)  # a stop asked before this app (re)started is still timed
        status["run_id"] = run_id
        status["stop_requested"] = paths.stop_requested()
        checkpoint = paths.last_ckpt.exists()
        status["resumable"] = (status.get("state") in (RunState.STOPPED, RunState.FAILED)
                               and checkpoint) or stopped_untrained(paths, status)
        # Finished, it trains further when resumed with a higher max steps.
        status["extendable"] = status.get("state") == RunState.FINISHED and checkpoint
        return status

    def list(self) -> list[dict[str, Any]]:
        """Every run, newest first."""
        runs = []
        for paths in run_folders(self.runs_dir):
            try:
                runs.append(self.status(paths.run_id))
            except RunError:
                continue
        return sorted(runs, key=lambda s: (s.get("created") or 0, s["run_id"]), reverse=True)

    def damaged(self) -> list[dict[str, Any]]:
        """Run folders without their ``config.yaml`` (:func:`damaged_run_folders`): no run, but
        listed so they can be deleted."""
        return [{"run_id": paths.run_id, "state": DAMAGED, "error": DAMAGED_RUN_ERROR}
                for paths in damaged_run_folders(self.runs_dir)]

    def live_run(self) -> str | None:
        for status in self.list():
            if status.get("state") in LIVE_STATES:
                return status["run_id"]
        return None

    def conflicting_run(self, cfg: RunConfig, exclude: str | None = None) -> str | None:
        """The live run whose devices ``cfg`` would share, or None if it may start now.

        Runs naming disjoint GPUs (``gpus``) may be live together; a run on every device (each
        CPU run, each run naming no GPUs) needs them all, so it waits for every other.
        """
        for run_id, other in self._live_configs(exclude):
            if share_devices(cfg, other):
                return run_id
        for paths, _, other in live_elsewhere(self.runs_dir):  # another app's, or started by hand
            if share_devices(cfg, other):
                return str(paths.root)
        return None

    def live_elsewhere(self) -> str | None:
        """The folder of a live run of another runs folder of this machine (another app's, or one
        started by hand), or None: a run this folder's page does not list, that holds the devices
        its Start would need."""
        return next((str(paths.root) for paths, _, _ in live_elsewhere(self.runs_dir)), None)

    def _live_configs(self, exclude: str | None = None) -> Iterator[tuple[str, RunConfig | None]]:
        """Each live run but ``exclude``, with its config (None: unreadable)."""
        for status in self.list():
            run_id = status["run_id"]
            if status.get("state") not in LIVE_STATES or run_id == exclude:
                continue
            try:
                yield run_id, self.config(run_id)
            except Exception:  # noqa: BLE001 - an unreadable config: the callers assume the worst
                yield run_id, None

    def space_held(self, cfg: RunConfig, folder: Path,
                   exclude: str | None = None) -> dict[str, int]:
        """What each live run that may run beside ``cfg`` (disjoint GPUs) may still write on the
        disk holding ``folder``: not free for ``cfg`` to take. Runs it shares devices with count
        nothing: it cannot start before they end."""
        held = {}
        for run_id, other in self._live_configs(exclude):
            if other is None or share_devices(cfg, other):
                continue
            root = self.paths(run_id).root
            if same_disk(root, folder):
                held[run_id] = still_to_write(other, root)
        return held

    def config(self, run_id: str) -> RunConfig:
        return RunConfig.load(self.paths(run_id).config)

    def metrics(self, run_id: str, since_step: int = -1) -> list[dict[str, Any]]:
        return self.paths(run_id).read_metrics(since_step)

    def previews(self, run_id: str) -> list[Path]:
        """The run's preview images, oldest first. Regular files only: a page serving a FIFO
        named like a preview would block forever, and one named so that links elsewhere served a
        file from outside the runs folder."""
        folder = self.paths(run_id).previews
        try:
            found = [(step, p) for p in folder.iterdir() if (step := preview_step(p)) is not None
                     and p.is_file() and not p.is_symlink()]
        except OSError:  # no previews yet
            return []
        return [p for _, p in sorted(found)]

    def weights(self, run_id: str) -> Path:
        path = self.paths(run_id).weights
        if not path.exists():
            raise RunError(f"run {run_id} has no saved weights yet")
        return path

    # --- actions ------------------------------------------------------------------------------

    def start(self, cfg: RunConfig) -> str:
        """Validate ``cfg`` and its data, then launch it; refused while another run is live.

        The data folder is scanned before any lock is taken (a slow disk must not freeze every
        status call); the image files it found are in the new run's status as ``data_files``.
        """
        require_one_node(cfg)
        cfg, summary = resolve_data(cfg.resolved())  # in_chans and statistics from the data
        self._require_room(cfg, self.runs_dir)
        with self._exclusive():
            self._refuse_if_busy(cfg)
            paths = self._create(cfg, data_files=summary.files, launcher=proc.process_record())
            self._launch(paths, resume=False)
        return paths.run_id

    def _state(self, run_id: str) -> str | None:
        try:
            return self.paths(run_id).read_status().get("state")
        except RunError:
            return None

    def stop(self, run_id: str, force: bool = False) -> dict[str, Any]:
        """Ask the run to stop after its current step (it saves a checkpoint first).

        ``force=True`` (the page's "Force stop"), or a stop not obeyed within ``stop_timeout_s``,
        terminates the process group of the trainer the stop was meant for (never a trainer a
        later Resume launched): the steps since its last checkpoint are lost. A plain stop only
        ever asks: pressed again, or from a page that had not yet seen the first request, it
        changes nothing (a second request used to force), unless ``stop_timeout_s`` has passed
        since the first: then the watchdog ends it now, and this returns once it has. A run
        recorded on another host is ended by force only once it has gone silent there
        (:meth:`_end_remote`).
        """
        with self._lock:
            status = self.status(run_id)
            if status.get("state") not in LIVE_STATES:
                raise RunError(f"run {run_id} is not running (it is {status.get('state')})")
            paths = self.paths(run_id)
            record = self._process(paths)
            requested = paths.stop_requested()
            if force and record and not proc.on_this_host(record):
                if not requested:  # nothing here can signal it: it is asked at least
                    paths.request_stop()
                self._end_remote(paths, record, status)
                return self.status(run_id)
            if not force and requested:  # asked already; its watchdog is running
                watch = self._watch_stop(paths)
                if not self._stop_overdue(paths, watch):
                    return status
            elif not force:
                try:
                    paths.request_stop()
                except OSError as err:  # a read-only mount: the STOP file is how a stop is asked
                    if err.errno not in _UNWRITABLE:
                        raise
                    raise RunError(f"run {run_id} cannot be asked to stop: "
                                   f"{err.filename or paths.root} cannot be written "
                                   f"({err.strerror}). Force stop ends it at once") from None
                self._watch_stop(paths)
        if force:
            self._terminate(paths, record, reason="stopped by force")
        elif requested:  # past its time: the watchdog ends it now (outside the lock it takes)
            watch.join(timeout=60.0)
        return self.status(run_id)

    def resume(self, run_id: str, max_steps: int | None = None) -> dict[str, Any]:
        """Continue a stopped or failed run from ``last.ckpt`` (optionally with a new ``max_steps``).

        Returns the run's status; ``resumed_from_step`` is the checkpoint's own step.
        """
        paths = self.paths(run_id)
        trained = RunConfig.load(paths.config)
        if problem := paths.misplaced():
            raise RunError(f"run {run_id} cannot be resumed: {problem}. Move or delete what is "
                           "in the way, then resume")
        cfg = trained if max_steps is None else trained.with_overrides(max_steps=max_steps)
        status = paths.read_status()
        cfg = past_the_epoch_limit(status, trained, cfg, run_id)
        # Said first: a finished run given no higher end was refused only after its data, devices,
        # disk room and checkpoint had been checked (and any of them could be refused instead).
        require_steps_past_the_end(status, max_steps, run_id)
        require_no_waiting_job(run_id, status)  # asks squeue: outside the locks
        require_one_node(cfg, run_id)
        require_devices(cfg, run_id)
        resolve_channels(cfg, check_data(cfg.train.data))  # outside the locks; channels still match
        self._require_room(cfg, paths.root, resuming=True, exclude=run_id)
        # Its bytes are checked outside the locks: reading a large checkpoint through takes
        # seconds, and every status call would wait for it. Under them, its step is read again.
        if paths.last_ckpt.is_file():  # a missing one is refused under them, after a live run
            checkpoint_step(paths.last_ckpt)
            require_same_model(paths, cfg)
        with self._exclusive():
            self._refuse_if_busy(cfg, exclude=run_id)
            status = self.status(run_id)
            if status.get("state") in LIVE_STATES:  # a stale page, the API, another node's run
                raise RunError(f"run {run_id} is {status['state']}: it can be resumed once it "
                               "has stopped")
            require_steps_past_the_end(status, max_steps, run_id)
            # Stopped before its first step (while its data was prepared): no checkpoint, nothing
            # trained, so it starts again from step 0 (it was refused "no checkpoint").
            fresh = stopped_untrained(paths, status)
            step = 0 if fresh else checkpoint_step(paths.last_ckpt, verify=False)
            require_steps_left(cfg, step, run_id)
            self._wait_for_exit(paths)
            cfg.save(paths.config)
            paths.clear_stop_request()
            # The old record goes first: a reader now sees a run starting, not a dead process.
            paths.process.unlink(missing_ok=True)
            paths.write_status(state=RunState.STARTING, error=None, log_tail=None, step=step,
                               requeued_job=None, resumed_from_step=step,
                               total_steps=cfg.train.max_steps, launcher=proc.process_record())
            self._launch(paths, resume=not fresh)
        return self.status(run_id)

    def delete(self, run_id: str) -> Path | None:
        """Delete a run that is not live; returns the folder a linked run's link pointed to,
        which is left in place (None for a run folder of its own).

        Under the lock the run only leaves its name (a rename into a hidden folder, at once);
        its files are removed after, so a run of 60,000 previews no longer held every status
        call for seconds. A write into it meanwhile (an export, an evaluation) finds no folder
        (:func:`mae_core.fileio.atomic_write`'s ``make_dirs=False``) instead of making it again.
        """
        with self._exclusive():
            paths = RunPaths(self.runs_dir / run_id) if valid_run_id(run_id) else None
            if paths is None or not is_damaged_run_folder(paths.root):
                status = self.status(run_id)
                if status.get("state") in LIVE_STATES:
                    raise RunError(f"run {run_id} is {status['state']}: stop it before deleting it")
                paths = self.paths(run_id)
            pid = self._trainer_pid(paths)
            if pid is not None and not paths.is_run():
                raise RunError(f"{run_id}'s trainer (pid {pid}) still runs: it writes the "
                               "missing config.yaml again at its next progress save, and then "
                               "stops as any run; a trainer hung for good, kill it by hand")
            if pid is not None:  # a trainer that wrote its end and has not exited yet
                raise RunError(f"run {run_id}'s trainer (pid {pid}) is still exiting; try again "
                               "in a moment")
            left, trash = unlink_run_folder(paths.root, self.runs_dir)
            self.queue.remove(run_id)
        for folder in [trash, *self.runs_dir.glob(f"{TRASH_PREFIX}*")]:
            if folder is not None:  # and the leftovers of a delete that was interrupted
                shutil.rmtree(folder, ignore_errors=True)
        return left

    def export(self, run_id: str) -> tuple[Path, str]:
        """Write the run's encoder as timm weights; returns the file and a snippet that loads it."""
        paths = self.paths(run_id)
        out = paths.encoder
        model = RunConfig.load(paths.config).model  # first: a refusal writes nothing
        if kind := wrong_kind(out):
            raise RunError(f"the encoder of {run_id} cannot be exported: `{out.name}` is {kind} "
                           "where the file goes. Move or delete it, then export")
        # The weights' own config: their normalisation is what the file records, and fine-tuning
        # must read images so.
        model = require_weights_of(model, self.weights(run_id), run_id)
        try:
            export_encoder(self.weights(run_id), out, make_dirs=False)
        except FileNotFoundError:
            raise RunError(f"run {run_id} was deleted while its encoder was exported") from None
        return out, timm_snippet(model, out)

    # --- processes ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """The runs directory's file lock, which every app sharing the directory takes, then this
        manager's lock (``flock`` locks belong to the open file: two managers in one process, or
        two threads, exclude each other too). The file lock first, without the manager's: held
        for good by another process (an app stopped mid-Start), it froze every status read here.

        Every section under it writes: on a runs directory this app may not write (a read-only
        mount, another user's folder) the first write refuses it in words, as RunError."""
        try:
            self.runs_dir.mkdir(parents=True, exist_ok=True)  # again if deleted under the app
            fd = open_lock(self.runs_dir)
        except OSError as err:
            raise RunError(self._cannot_write(err)) from None
        try:
            if not wait_for_lock(fd, LOCK_WAIT_S):
                raise RunError(f"{self.runs_dir / LOCK_NAME} has been locked by another process "
                               f"for over {LOCK_WAIT_S:.0f} s (an app or a trainer started by "
                               "hand, stopped or hung while it started a run): end or continue "
                               "it, then try again")
            with self._lock:
                yield
        except OSError as err:
            if err.errno not in _UNWRITABLE:
                raise
            raise RunError(self._cannot_write(err)) from None
        finally:
            os.close(fd)  # releases the lock

    def _cannot_write(self, err: OSError) -> str:
        """A write under the runs directory that its file system or its owner refused, in words."""
        if mounted_read_only(self.runs_dir):
            return (f"the runs directory {self.runs_dir} is read-only: its runs can be listed and "
                    "viewed, but none started, queued, resumed or deleted. Mount it read-write, "
                    "or run the app with another --runs-dir")
        return f"{err.filename or self.runs_dir} cannot be changed: {err.strerror or err}"

    def _create(self, cfg: RunConfig, **status: Any) -> RunPaths:
        try:
            return create_run(cfg, runs_dir=self.runs_dir, **status)
        except OSError as err:  # a full disk or a read-only runs directory: said, not a crash
            if err.errno in _UNWRITABLE:
                raise RunError(self._cannot_write(err)) from None
            raise RunError(f"the run cannot be created in {self.runs_dir}: "
                           f"{err.strerror or err}") from None

    def _require_room(self, cfg: RunConfig, folder: Path, resuming: bool = False,
                      exclude: str | None = None) -> None:
        """Refuse a run whose checkpoints the disk cannot hold, before anything is written."""
        try:
            check_room(cfg, folder, resuming, held=self.space_held(cfg, folder, exclude))
        except DiskFullError as err:
            raise RunError(err.strerror) from None

    def _refuse_if_busy(self, cfg: RunConfig, exclude: str | None = None) -> None:
        live = self.conflicting_run(cfg, exclude=exclude)
        if live is None:
            return
        if cfg.train.gpu_set is None:
            gpus = (" (runs that name disjoint GPUs, gpus=0,1 and gpus=2,3, may run together)"
                    if cfg.train.accelerator == "gpu" else "")
            raise RunError(f"run {live} is still live on the devices this run needs: stop it, or "
                           f"Queue this run to start when it ends{gpus}")
        raise RunError(f"run {live} is live on GPUs this run needs ({cfg.train.gpus}): stop it, "
                       "queue this run, or name other GPUs")

    def _launch(self, paths: RunPaths, resume: bool) -> None:
        command = proc.trainer_command(paths.root, resume)
        gpus = RunConfig.load(paths.config).train.gpus
        try:
            # The trainer sees only its GPUs, as 0..n-1 (Lightning's ranks inherit this).
            process = proc.launch(command, paths.log,
                                  env=proc.clean_env(CUDA_VISIBLE_DEVICES=gpus) if gpus else None)
        except OSError as err:
            why = (f"{paths.log} is not a regular file (a link, a FIFO, a device or a folder): "
                   "remove it"
                   if isinstance(err, NotRegularFileError) else str(err))
            paths.write_status(state=RunState.FAILED,
                               error=f"the trainer could not be launched: {why}")
            raise RunError(f"the trainer could not be launched: {why}") from None
        record = proc.process_record(process.pid, command=command,
                                     run_dir=str(paths.root.resolve()))
        atomic_write_json(paths.process, record, make_dirs=False)
        proc.watch(process, lambda code: self._on_exit(paths, record, code))

    def _terminate(self, paths: RunPaths, record: dict[str, Any] | None, reason: str) -> None:
        """End the trainer ``record`` (of this host) names and its ranks (SIGTERM, then SIGKILL);
        record it as stopped unless a newer trainer has taken over the run directory since.

        Called without ``_lock``: a hung trainer (stopped, stuck in I/O) outlives SIGTERM for
        the whole grace, and every status call, each page's refresh, waited those seconds. The
        lock is taken only to check, after, whose run directory it is."""
        # Meanwhile the trainer's death is this stop's to record: a status read (or the reaper)
        # seeing the process gone first recorded it "failed" ("the trainer process is gone").
        with self._lock:
            self._terminating.add(paths.root)
        try:
            if record and proc.record_pid(record) is not None and not proctree.terminate_group(
                    record["pid"], record.get("start_time")):
                # Recorded "stopped", it went on training and read "running" again.
                raise RunError(f"run {paths.run_id}'s trainer (pid {record['pid']}) still runs "
                               "after SIGTERM and SIGKILL: it may be stuck in the kernel (a hung "
                               "disk or driver) or belong to another user")
            # The steps since the last checkpoint are lost: say where Resume takes up (read
            # outside the lock: a large checkpoint takes seconds to check).
            step = saved_step(paths)
            reason += (f": Resume continues from step {step}, its last checkpoint"
                       if step is not None else ": it had saved no checkpoint")
            with self._lock:
                current = self._process(paths)
                if record and current.get("pid") not in (None, record.get("pid")):
                    return
                paths.clear_stop_request()
                paths.write_status(state=RunState.STOPPED, error=reason, log_tail=paths.log_tail())
        finally:
            with self._lock:
                self._terminating.discard(paths.root)
