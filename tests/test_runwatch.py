"""mae_core.runwatch: whether a run's trainer lives, told from this machine, whatever its clock,
its host name or its disk say; a death is recorded, or found again, never a crash.

No trainer is trained here: a "starting" run no app will launch, a run recorded on a host of
another name, and a stand-in process launched as the trainer (``sleep``) are what the watch
judges.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
from helpers import poll

from mae_core import process as proc
from mae_core.config import RunConfig
from mae_core.diskspace import tensor_elements
from mae_core.fileio import atomic_write_json, read_json
from mae_core.rundir import create_run
from mae_core.runs import RunError, RunManager
from mae_core.runwatch import CLOCK_SKEW_S, REMOTE_FORCE_STOP_S


def tiny_config(**overrides) -> RunConfig:
    return RunConfig().with_overrides(**{
        "preset": "vit-tiny", "image_size": 32, "patch_size": 8, "batch_size": 4, "devices": 1,
        "accelerator": "cpu", "num_workers": 0, "num_previews": 0, "weight_snapshots": 0,
        "max_steps": 9, **overrides})


def dated(paths, updated: float, **fields) -> None:
    """Write the run's status.json as if last written at ``updated`` (by its trainer elsewhere)."""
    status = read_json(paths.status)
    atomic_write_json(paths.status, {**status, **fields, "updated": updated})


# --- a "starting" run whose launch never comes --------------------------------------------------

def test_a_starting_run_dated_ahead_of_a_clock_stepped_back_is_dead_at_once(tmp_path, monkeypatch):
    """The app died between making the run and launching it, and the clock was then stepped back
    an hour (NTP, a restored VM): the run read "starting" for that hour, refusing Start, Delete
    and the queue, since a time in the future counted as fresh."""
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 3600)
    paths = create_run(tiny_config().resolved(), runs_dir=tmp_path / "runs", state="starting")
    monkeypatch.undo()
    manager = RunManager(tmp_path / "runs")
    status = manager.status(paths.run_id)
    assert status["state"] == "failed", status
    assert manager.live_run() is None and manager.conflicting_run(tiny_config()) is None
    manager.delete(paths.run_id)
    assert manager.list() == []


def test_a_run_dated_a_little_ahead_by_another_nodes_clock_is_still_live(tmp_path):
    """The other side of the line above: a remote trainer's clock a few seconds ahead of this
    machine's is skew, not a clock stepped back; its run stays live."""
    manager = RunManager(tmp_path / "runs")
    paths = create_run(tiny_config().resolved(), runs_dir=manager.runs_dir, state="running",
                       process={"pid": 4242, "start_time": "1", "host": "gpu-node-7"})
    dated(paths, time.time() + CLOCK_SKEW_S / 2)
    assert manager.status(paths.run_id)["state"] == "running"


def _start_then_die_before_the_launch(runs_dir: str, cfg: RunConfig) -> None:
    """An app (a forked child) whose Start is killed right before it launches the trainer."""
    RunManager._launch = lambda self, paths, resume: os._exit(0)  # this child's copy only
    RunManager(runs_dir).start(cfg)
    os._exit(1)  # never reached


def test_a_run_whose_app_died_before_launching_it_is_dead_at_once(tmp_path):
    """The app was killed between Start making the run and launching its trainer: the run read
    "starting" for LAUNCH_GRACE_S, refusing Start and Delete meanwhile; now the app that was
    launching it is known to be gone, so nothing will launch it."""
    cfg = tiny_config()
    tensor_elements(cfg.model)  # the child's space check finds it worked out: no torch after fork
    runs = tmp_path / "runs"
    context = multiprocessing.get_context("fork")
    app = context.Process(target=_start_then_die_before_the_launch, args=(str(runs), cfg))
    app.start()
    app.join(60)
    assert app.exitcode == 0, f"the app did not reach its launch (exit code {app.exitcode})"
    manager = RunManager(runs)
    [status] = manager.list()
    assert status["state"] == "failed", status
    assert status["error"] == "the trainer was never launched: the app launching it ended first"
    assert manager.live_run() is None
    manager.delete(status["run_id"])


# --- a run recorded on a host of another name ---------------------------------------------------

def test_a_silent_run_recorded_on_another_host_is_ended_by_a_second_stop(tmp_path):
    """The container was re-created with the runs folder on a volume: the host name changed, so
    the run's record names the old one, and its dead trainer read "running" for
    REMOTE_SILENCE_S (10 minutes). The first Stop did nothing, the second was refused ("runs on
    <old name>: ... end it there"), on the very machine that had that name."""
    manager = RunManager(tmp_path / "runs")
    paths = create_run(tiny_config().resolved(), runs_dir=manager.runs_dir, state="running",
                       process={"pid": 4242, "start_time": "1", "host": "old-container"})
    silent_s = REMOTE_FORCE_STOP_S + 60
    dated(paths, time.time() - silent_s, step=6)
    assert manager.status(paths.run_id)["state"] == "running"
    asked = manager.stop(paths.run_id)
    assert asked["state"] == "running" and asked["stop_requested"], asked
    ended = manager.stop(paths.run_id, force=True)
    assert ended["state"] == "failed" and not ended["stop_requested"], ended
    assert ended["error"].startswith(f"not heard from for {silent_s:.0f} s"), ended["error"]
    assert ended["error"].endswith("(it ran on host old-container): marked failed; if it still "
                                   "runs there, end it there"), ended["error"]
    assert manager.live_run() is None
    manager.delete(paths.run_id)

    # A run its host still reports on is refused as before: only that host can end it.
    heard = create_run(tiny_config().resolved(), runs_dir=manager.runs_dir, state="running",
                       process={"pid": 4242, "start_time": "1", "host": "gpu-node-7"})
    dated(heard, time.time() - 5)
    manager.stop(heard.run_id)
    with pytest.raises(RunError, match="runs on gpu-node-7: it stops after its current step"):
        manager.stop(heard.run_id, force=True)
    assert manager.status(heard.run_id)["state"] == "running"


# --- a death with nowhere to write it -----------------------------------------------------------

def test_a_trainer_dying_in_a_read_only_run_folder_leaves_no_traceback(tmp_path, monkeypatch):
    """The reaper thread recorded the death, and the write raised: an uncaught traceback from
    thread reap-N on the app's console. The state is derived again on the next read, and said.
    (The folder is made read-only by a read-only bind mount over it: the live stand-in holds its
    log open for writing, so its file system cannot be remounted read-only whole.)"""
    if os.geteuid() != 0:
        pytest.skip("a read-only bind mount needs root (CI and this project's machines are)")
    crashed: list[BaseException] = []
    monkeypatch.setattr(threading, "excepthook", lambda hook: crashed.append(hook.exc_value))
    monkeypatch.setattr(proc, "trainer_command", lambda run_dir, resume=False: ["sleep", "300"])
    manager = RunManager(tmp_path / "runs")
    paths = create_run(tiny_config().resolved(), runs_dir=manager.runs_dir, state="starting")
    manager._launch(paths, resume=False)
    pid = read_json(paths.process)["pid"]
    [reaper] = [t for t in threading.enumerate() if t.name == f"reap-{pid}"]
    folder = str(paths.root)
    subprocess.run(["mount", "--bind", folder, folder], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", folder], check=True)
        os.kill(pid, signal.SIGKILL)
        reaper.join(10)
        assert not reaper.is_alive() and not crashed, f"the reaper thread raised {crashed!r}"
        status = manager.status(paths.run_id)
        assert status["state"] == "failed", status
        assert "status.json cannot be updated" in status["error"], status["error"]
        assert "Read-only file system" in status["error"], status["error"]
    finally:
        subprocess.run(["umount", folder], check=False)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# --- a DDP run whose rank 1 died first ----------------------------------------------------------

# A trainer's rank 0 as far as its end goes: rank 1 (``sleep``) started beside it, watched by
# Lightning's own launcher observer, which logs the rank's end and SIGKILLs rank 0.
RANK0_STAND_IN = """
import subprocess, time
from lightning_fabric.strategies.launchers.subprocess_script import _launch_process_observer
rank1 = subprocess.Popen(["sleep", "300"])
print("rank 1 is", rank1.pid, flush=True)
_launch_process_observer([rank1])
time.sleep(300)
"""


@pytest.mark.parametrize("moved", [False, True])
def test_a_run_whose_rank_1_died_names_that_rank_not_rank_0s_sigkill(tmp_path, moved):
    """kill -9 of rank 1 read "the trainer process was killed by SIGKILL before finishing": the
    SIGKILL Lightning's launcher sent rank 0 after it. Its log line names the rank and how it
    ended; and that SIGKILL no longer hides a folder moved under the run."""
    manager = RunManager(tmp_path / "runs")
    paths = create_run(tiny_config(devices=2).resolved(), runs_dir=manager.runs_dir)
    with open(paths.log, "wb") as log:
        rank0 = subprocess.Popen([sys.executable, "-c", RANK0_STAND_IN], stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    try:
        atomic_write_json(paths.process, proc.process_record(
            rank0.pid, command=["train.py"], run_dir=str(paths.root.resolve())))
        paths.write_status(state="running", step=3)
        rank1 = poll(lambda: re.search(r"rank 1 is (\d+)", paths.log.read_text()), 120)
        run_id = paths.root.name + ("-renamed" if moved else "")
        paths.root.rename(manager.runs_dir / run_id)
        os.kill(int(rank1[1]), signal.SIGKILL)
        assert rank0.wait(timeout=60) == -signal.SIGKILL  # by Lightning's launcher
        status = manager.status(run_id)
    finally:
        rank0.kill()
        rank0.wait()
    said = "rank 1 (of 2) was killed by SIGKILL; the other ranks were ended by Lightning's launcher"
    if moved:
        said += f": its folder was moved here from {paths.root} while it trained"
    assert status["state"] == "failed" and status["error"].startswith(said), status


def test_a_stop_dated_ahead_of_a_clock_stepped_back_is_still_forced_on_time(tmp_path, stand_in):
    """Stop pressed, then the clock stepped back an hour (NTP, a restored VM) and the app
    restarted: the watchdog counted the timeout from the STOP file's time, an hour ahead, and a
    trainer that never answers (hung, SIGSTOPped; here ``sleep``) read "running" for that hour."""
    paths = create_run(tiny_config().resolved(), runs_dir=tmp_path / "runs")
    atomic_write_json(paths.process, proc.process_record(stand_in.pid, command=["sleep", "300"]))
    paths.write_status(state="running", step=3)
    paths.request_stop()
    ahead = time.time() + 3600
    os.utime(paths.stop_request, (ahead, ahead))
    restarted = RunManager(tmp_path / "runs", stop_timeout_s=2)
    assert restarted.status(paths.run_id)["state"] == "running"
    ended = poll(lambda: (s := restarted.status(paths.run_id))["state"] != "running" and s, 30)
    assert ended and ended["state"] == "stopped", ended
    assert stand_in.wait(timeout=10) is not None
