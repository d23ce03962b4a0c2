"""mae_core.runslock: the runs directory's file lock, held by another process for good (an app
stopped with SIGSTOP or Ctrl+Z in the middle of a Start, a hung node on a shared disk)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from mae_core import runs as runs_module
from mae_core.config import RunConfig
from mae_core.rundir import LOCK_NAME, create_run
from mae_core.runs import RunError, RunManager

HOLD = ("import fcntl, sys, time\n"
        "lock = open(sys.argv[1], 'w')\n"
        "fcntl.flock(lock, fcntl.LOCK_EX)\n"
        "print('held', flush=True)\n"
        "time.sleep(120)\n")


def test_a_lock_held_for_good_elsewhere_freezes_no_status_and_refuses_changes_in_words(
        tmp_path, monkeypatch):
    """The queue worker took the manager's lock, then waited on the file lock for as long as
    the other process held it: every status read, so every page of the app, waited too."""
    monkeypatch.setattr(runs_module, "LOCK_WAIT_S", 1.0, raising=False)
    runs = tmp_path / "runs"
    cfg = RunConfig().with_overrides(devices=1, accelerator="cpu", max_steps=9).resolved()
    finished = create_run(cfg, runs_dir=runs, state="finished")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(runs / LOCK_NAME)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        manager = RunManager(runs)
        manager.start_queue_worker(every_s=0.2)
        time.sleep(1.0)  # the worker is waiting on the file lock by now
        listed = threading.Event()
        threading.Thread(target=lambda: manager.list() and listed.set(), daemon=True).start()
        assert listed.wait(5), "a status read waited on another process's runs lock"
        with pytest.raises(RunError, match=f"{LOCK_NAME} has been locked by another process for "
                                           "over 1 s"):
            manager.delete(finished.run_id)
        assert finished.root.is_dir()
    finally:
        holder.kill()
        holder.wait()
    manager.delete(finished.run_id)  # the lock is free again: done at once
    assert manager.list() == []
