"""Whether a run's trainer lives, told from this machine: the run manager's watch over the
processes it (or another app, or a person by hand) launched.

``process.json`` names the trainer; a record missing or damaged is looked past to the process
itself (its command line names the run folder), so a live trainer is never taken for dead. A
trainer found gone is recorded ``failed`` with the reason (its exit code or signal, a full disk)
and the log tail; its orphaned ranks and the temp files of its interrupted save go with it.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

from mae_core import process as proc
from mae_core import proctree
from mae_core.checks import _is_number
from mae_core.diskspace import full_disk_failure
from mae_core.fileio import (atomic_write_json, disk_nearly_full, read_json,
                             remove_stale_temp_files, says_disk_full)
from mae_core.lastckpt import saved_step
from mae_core.rundir import LIVE_STATES, RunError, RunPaths, RunState

# A run on another node counts as alive while its status.json was rewritten this recently: its
# trainer rewrites it every minute (RunPaths.keep_status_fresh), so 5 missed beats.
REMOTE_SILENCE_S = 300.0
# A Force stop (or a second Stop) may end a run recorded on another host once it has been silent
# this long: a trainer writes its status at every progress save, and that host may be this
# machine renamed.
REMOTE_FORCE_STOP_S = 60.0
# What Lightning's launcher (rank 0's child-process observer) logs of the first rank it started
# that ended badly, before it SIGKILLs every other rank and rank 0 itself: then rank 0's own end
# (SIGKILL, or gloo's "Connection reset by peer") says nothing of the cause.
_RANK_ENDED = re.compile(r"\[rank: (\d+)\] Child process with PID \d+ terminated with code (-?\d+)")
# A run with no recorded process yet counts as alive this long after its status was written.
LAUNCH_GRACE_S = 30.0
# How far ahead of this machine's clock a status.json time may be and still count as recent
# (another node's clock runs a little ahead). Further ahead, this clock was stepped back since.
CLOCK_SKEW_S = 10.0


def silent_for(status: dict[str, Any]) -> float:
    """Seconds since status.json was last written (negative: dated ahead of this clock)."""
    return time.time() - (status.get("updated") or 0)


def heard_within(status: dict[str, Any], window_s: float) -> bool:
    """Whether status.json was written less than ``window_s`` ago. A time dated ahead of this
    clock by more than CLOCK_SKEW_S is no sign of life: the clock was stepped back since, and a
    dead run stayed live (refusing Start, Delete and the queue) until the clock caught up."""
    return -CLOCK_SKEW_S < silent_for(status) < window_s


def launcher_gone(status: dict[str, Any]) -> bool:
    """Whether the app process that set the run "starting" (its ``launcher`` record) is known to
    have ended on this machine before recording a trainer: the launch will never come."""
    launcher = status.get("launcher")
    return (isinstance(launcher, dict) and proc.on_this_host(launcher)
            and proc.record_pid(launcher) is not None and not proc.record_alive(launcher))


class TrainerWatch:
    """The run manager's part that watches trainer processes, their deaths and their stops (a base
    of :class:`mae_core.runs.RunManager`, whose attributes below, and ``_terminate``, it uses)."""

    _lock: threading.RLock
    _exit_codes: dict[int, int]  # pid -> return code of trainers this manager reaped
    _terminating: set[Path]  # run directories whose trainer a force stop is ending (it records)
    _stop_watches: dict[tuple[Path, int, str], threading.Thread]  # the stop watchdog of each
    stop_timeout_s: float  # how long a plain stop may go unanswered (then the watchdog ends it)
    _terminate: Any  # ends a trainer and records it stopped (RunManager)

    def _on_exit(self, paths: RunPaths, record: dict[str, Any], code: int) -> None:
        """A trainer this manager launched has exited (not yet reaped): record a death at once.

        The process-group kill ends DDP ranks the trainer left behind; the unreaped trainer still
        holds its pid, so the group cannot be a stranger's.
        """
        with self._lock:
            self._exit_codes[record["pid"]] = code
            current = self._process(paths)
            ours = (current.get("pid"), current.get("start_time")) == (record["pid"],
                                                                       record["start_time"])
            live = paths.read_status().get("state") in LIVE_STATES
            if code != 0 or (ours and live):
                proctree.kill_group(record["pid"], signal.SIGKILL)
            if ours and live and paths.root.exists() and paths.root not in self._terminating:
                # A full disk or a read-only runs folder: nothing to record the death in, and
                # nobody to tell from this thread. The next status read finds it again and says why.
                with contextlib.suppress(OSError):
                    self._mark_dead(paths)

    @staticmethod
    def _process(paths: RunPaths) -> dict[str, Any]:
        """The run's process record, or {} where process.json is missing or, on this machine,
        names no process (hand-edited: a pid of 0 would have named this app's own process
        group). Another node's pid is never used here, whatever it is."""
        record = read_json(paths.process) or {}
        if proc.on_this_host(record) and proc.record_pid(record) is None:
            return {}
        return record

    def _alive(self, paths: RunPaths, status: dict[str, Any]) -> bool:
        info = self._process(paths)
        if info and not proc.on_this_host(info):
            # Launched on another node (torchrun/SLURM): its pid means nothing here, so a
            # status the trainer keeps refreshing is the sign of life.
            return heard_within(status, REMOTE_SILENCE_S)
        if (not info and status.get("state") == RunState.STARTING and not launcher_gone(status)
                and heard_within(status, LAUNCH_GRACE_S)):
            return True  # between "starting" and the launch being recorded (another app's manager)
        pid = self._trainer_pid(paths)
        if pid is not None and pid != info.get("pid"):
            # A trainer process.json does not name (the file deleted or replaced while it
            # trained): recorded again, so Stop reaches it and the run is never taken for dead,
            # then resumed or deleted under it.
            with contextlib.suppress(OSError):
                atomic_write_json(paths.process, proc.process_record(pid, command=["(found)"]))
        return pid is not None

    def _trainer_pid(self, paths: RunPaths) -> int | None:
        """The live trainer of this run on this machine, whatever its status.json says."""
        return proc.live_trainer(self._process(paths), paths.root)

    def _wait_for_exit(self, paths: RunPaths, timeout_s: float = 15.0) -> None:
        """A stopped trainer writes its final state just before it exits: let it finish exiting
        before a resume starts another one on the same files."""
        info = self._process(paths)
        if info and not proc.on_this_host(info):
            return
        pid = proc.record_pid(info) or proc.find_trainer(paths.root)
        if pid is not None and not proctree.wait_gone(pid, info.get("start_time"), timeout_s):
            raise RunError(f"run {paths.run_id}'s previous trainer process "
                           f"(pid {pid}) is still exiting; try again in a moment")

    def _end_remote(self, paths: RunPaths, record: dict[str, Any], status: dict[str, Any]) -> None:
        """A Force stop (or a second Stop) of a run recorded on another host (callers hold
        ``_lock``): nothing here can signal it, so it is refused while the run is heard from.
        Silent for over REMOTE_FORCE_STOP_S, it is marked failed: that host may be this very
        machine under a new name (a container re-created on the same volume), and the run, dead,
        read "running" for REMOTE_SILENCE_S with nothing to end it."""
        host = record.get("host")
        if heard_within(status, REMOTE_FORCE_STOP_S):
            raise RunError(f"run {paths.run_id} runs on {host}: it stops after its current step, "
                           "or end it there")
        age = silent_for(status)
        silence = (f"for {age:.0f} s" if age >= 0 else
                   f"since a time {-age:.0f} s ahead of this machine's clock")
        paths.clear_stop_request()
        paths.write_status(state=RunState.FAILED, log_tail=paths.log_tail(),
                           error=f"not heard from {silence} (it ran on host {host}): marked "
                                 "failed; if it still runs there, end it there")

    def _mark_dead(self, paths: RunPaths) -> dict[str, Any]:
        """The process is gone; unless it recorded its own end just before exiting, it failed."""
        info = self._process(paths)
        pid = proc.record_pid(info)
        # Orphaned DDP ranks go too. A pid that now belongs to another process (other start time)
        # means our group is already empty: Linux does not reuse a pid that still names a group.
        # Another node's pid names nothing here, and its temp files are not ours to judge.
        local = proc.on_this_host(info)
        if local and pid is not None and proc.process_start_time(pid) in (
                None, info.get("start_time")):
            proctree.kill_group(pid, signal.SIGKILL)
        # A kill during a save leaves the save's temp file: its writer is dead now, so it goes
        # (a failed run's folder holds only files that load).
        if local:
            remove_stale_temp_files(paths.root)
        status = paths.read_status()
        if status.get("state") not in LIVE_STATES:
            return status
        code = None
        if pid is not None:
            code = self._exit_codes.get(pid)
            code = proc.child_exit_code(pid) if code is None else code
        log_tail = paths.log_tail()
        error = (_rank_ended(log_tail, status.get("world_size"))
                 or f"the trainer process {ended_how(code)} before finishing")
        # A folder moved under a trainer (renamed) fails it at its next write, with a bare
        # FileNotFoundError of the old path. Said whatever its exit code: a rank that failed so
        # has Lightning's launcher SIGKILL rank 0.
        moved_from = _moved_from(info, paths.root) if local else None
        if moved_from and code != 0:
            error += (f": its folder was moved here from {moved_from} while it trained, and it "
                      "could no longer write its files")
        if pid is None and status.get("state") == RunState.STARTING and launcher_gone(status):
            error = "the trainer was never launched: the app launching it ended first"
        # A process that hit the full disk first (any rank, any write) may have had no room left
        # to say so; the disk, or the log, still can.
        if disk_nearly_full(paths.root) or says_disk_full(log_tail):
            error += f": {full_disk_failure(paths.root, paths.last_ckpt, saved_step(paths))}"
        return paths.write_status(state=RunState.FAILED, log_tail=log_tail, error=error)

    def _watch_stop(self, paths: RunPaths) -> threading.Thread | None:
        """The watchdog ending this host's trainer unless it obeys its pending stop within
        ``stop_timeout_s`` of the request (the STOP file's time), started where this manager has
        none for that trainer: the app that asked may have been killed since, its timer with it.
        None where no stop of a live trainer of this host is pending. Callers hold ``_lock``."""
        asked_at = paths.stop_asked_at()
        if asked_at is None:  # the common case, on every status read of a live run: one stat
            return None
        record = self._process(paths)
        if not record or not proc.on_this_host(record):
            return None
        launched = record.get("launched")
        if _is_number(launched) and asked_at < launched - 1.0:  # a file time is coarse
            return None  # left from an earlier trainer: not asked of this one
        key = (paths.root, record["pid"], str(record.get("start_time")))
        if key not in self._stop_watches:
            self._stop_watches[key] = threading.Thread(
                target=self._enforce_stop, args=(paths, record, asked_at), daemon=True,
                name=f"stop-{paths.run_id}")
            self._stop_watches[key].start()
        return self._stop_watches[key]

    def _stop_overdue(self, paths: RunPaths, watch: threading.Thread | None) -> bool:
        """Whether the pending stop ``watch`` times has gone unanswered past ``stop_timeout_s``."""
        asked_at = paths.stop_asked_at()
        return (watch is not None and asked_at is not None
                and time.time() - asked_at >= self.stop_timeout_s)

    def _enforce_stop(self, paths: RunPaths, record: dict[str, Any], asked_at: float) -> None:
        """Terminate the trainer ``record`` names if it outlives ``stop_timeout_s`` from
        ``asked_at``, when its stop was asked (at once, if that is past)."""
        pid, start_time = record["pid"], record.get("start_time")
        # At most the timeout from now: a request dated ahead (the clock stepped back since the
        # Stop, NTP or a restored VM) left a trainer that never answered running for that long.
        left_s = min(asked_at + self.stop_timeout_s - time.time(), self.stop_timeout_s)
        if proctree.wait_gone(pid, start_time, max(0.0, left_s), every_s=0.2):
            return
        if proc.pid_alive(pid, start_time):
            reason = f"stopped by force: the trainer did not stop within {self.stop_timeout_s:.0f} s"
            if left_s < 0:  # no watchdog here at its time: asked in an app gone since, or another
                reason += (f" of its Stop, asked {time.time() - asked_at:.0f} s ago (in an app "
                           "restarted since, or another one)")
            with contextlib.suppress(RunError):  # unkillable: its status says it is live still
                self._terminate(paths, record, reason=reason)


def ended_how(code: int | None) -> str:
    """How a process with exit status ``code`` (negative: the signal; None: unknown) ended."""
    if code is None:
        return "is gone (killed, or out of memory)"
    return f"was killed by {_signal_name(-code)}" if code < 0 else f"exited with code {code}"


def _rank_ended(log_tail: str, world_size: Any) -> str | None:
    """The rank that ended first, and how, where Lightning's launcher logged it (:data:`_RANK_ENDED`):
    the real cause of a DDP run whose rank 0 it then killed. None where it logged none."""
    found = None
    for found in _RANK_ENDED.finditer(log_tail):  # the last: a resumed run's log holds earlier ones
        pass
    if found is None:
        return None
    of = f" (of {world_size})" if isinstance(world_size, int) else ""
    return (f"rank {found[1]}{of} {ended_how(int(found[2]))}; the other ranks were ended by "
            "Lightning's launcher")


def _moved_from(record: dict[str, Any], root: Path) -> str | None:
    """The folder the trainer of ``record`` (a process of this machine) was writing, where that is
    gone and not ``root``: the run folder was renamed or moved under it."""
    written = record.get("run_dir")  # every trainer's record names it (the app's, one by hand)
    if not isinstance(written, str) or not os.path.isabs(written):
        return None
    with contextlib.suppress(OSError):
        if Path(written) != root.resolve() and not os.path.lexists(written):
            return written
    return None


def _signal_name(number: int) -> str:
    """SIGKILL, SIGTERM...; a real-time signal (34 to 64) has no name of its own."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
