"""Background training runs through the run manager and by hand: real processes, real files.

Every run here is a real ``python -m mae_core.train``: two CPU DDP processes over gloo, or one
(``ONE_PROCESS``) where how many ranks there are is not what a test is about. The second rank costs
a whole second import of torch and Lightning (Lightning starts it once the first is ready), ~7 s of
a test on this machine.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers import SlowDisk, poll, resume_state
from mae_core.config import ConfigError, ModelConfig, RunConfig
from mae_core.data import DataError, ImageFolderDataset, find_images, sample_photo_paths
from mae_core.model import MaskedAutoencoder
from mae_core import data as data_module
from mae_core.process import pid_alive, zombie_children
from mae_core.rundir import RUN_ID_RULE, create_run
from mae_core.runs import PROJECT_ROOT, RunError, RunManager
from mae_core.weights import load_model

TINY = dict(image_size=32, patch_size=8, batch_size=8, devices=2, accelerator="cpu",
            checkpoint_every_n_steps=5, preview_every_n_steps=10, num_previews=2)
TIMEOUT_S = 240
ONE_PROCESS = dict(devices=1)


def tiny_config(**overrides) -> RunConfig:
    return RunConfig().with_overrides(**{**TINY, **overrides})


def wait_for(predicate, what: str, timeout_s: float = TIMEOUT_S, every_s: float = 0.2):
    value = poll(predicate, timeout_s, every_s)
    if not value:
        raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
    return value


def wait_until_ended(manager: RunManager, run_id: str) -> dict:
    return wait_for(lambda: (s := manager.status(run_id))["state"] not in
                    ("starting", "running", "stopping") and s, f"{run_id} to end")


def trainer_processes(runs_dir: Path) -> list[str]:
    """Command lines of the trainer processes (every DDP rank) of runs under ``runs_dir``."""
    out = subprocess.run(["ps", "-eo", "args", "--width", "4000"], capture_output=True,
                         text=True).stdout
    return [line for line in out.splitlines()
            if "mae_core.train" in line and str(runs_dir.resolve()) in line]


def wait_for_no_trainers(runs_dir: Path) -> None:
    wait_for(lambda: not trainer_processes(runs_dir), "every trainer process to exit", 30)


@pytest.fixture
def manager(tmp_path):
    manager = RunManager(tmp_path / "runs", stop_timeout_s=60)
    yield manager
    live = manager.live_run()
    if live:
        manager.stop(live, force=True)


def test_run_streams_metrics_stops_and_resumes_to_the_end(manager):
    run_id = manager.start(tiny_config(max_steps=40))
    paths = manager.paths(run_id)
    assert manager.config(run_id).train.devices == 2
    # The folder it writes, so a move of the folder under it is said as such (runwatch).
    assert json.loads(paths.process.read_text())["run_dir"] == str(paths.root.resolve())

    # Metrics appear while the run is live, one flushed line per step.
    rows = wait_for(lambda: len(manager.metrics(run_id)) >= 3 and manager.metrics(run_id),
                    "metrics to stream")
    assert manager.status(run_id)["state"] in ("running", "stopping")
    assert {"step", "loss", "lr", "images_per_s", "elapsed_s", "epoch"} <= set(rows[0])
    assert all(math.isfinite(r["loss"]) for r in rows if "epoch_loss" not in r)

    wait_for(lambda: manager.status(run_id).get("step", 0) >= 12, "12 steps")
    manager.stop(run_id)
    stopped = wait_until_ended(manager, run_id)
    assert stopped["state"] == "stopped", stopped
    assert 12 <= stopped["step"] < 40
    assert stopped["resumable"] and paths.last_ckpt.exists()
    checkpoint = torch.load(paths.last_ckpt, map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == stopped["step"]
    wait_for_no_trainers(manager.runs_dir)

    manager.resume(run_id)
    finished = wait_until_ended(manager, run_id)
    assert finished["state"] == "finished", finished
    assert finished["step"] == 40

    # The curve continues: every step once, in order, and the schedule did not restart.
    every_row = manager.metrics(run_id)
    rows = [r for r in every_row if "loss" in r]
    steps = [r["step"] for r in rows]
    assert steps == list(range(1, 41))
    # Epoch summaries (an epoch is 4 steps here: 64 crops over 2 ranks × batch 8), continuing
    # across the resume; where the resumed epoch ends depends on where the stop fell.
    epochs = [r for r in every_row if "epoch_loss" in r]
    assert len(epochs) >= 8 and epochs[-1]["step"] == 40
    assert all(a["step"] < b["step"] and a["epoch"] <= b["epoch"] for a, b in zip(epochs, epochs[1:]))
    assert all(math.isfinite(r["epoch_loss"]) for r in epochs)
    lr = {r["step"]: r["lr"] for r in rows}
    # Past the warm-up (20% of 40 steps) the cosine decays: the resumed step continues it, where
    # a restarted schedule would begin again at 1/1000 of the rate.
    assert stopped["step"] > 8
    assert 0.5 * lr[stopped["step"]] < lr[stopped["step"] + 1] <= lr[stopped["step"]], \
        "learning-rate schedule restarted on resume"
    assert rows[-1]["elapsed_s"] > rows[stopped["step"] - 1]["elapsed_s"]

    model = load_model(manager.weights(run_id))
    assert model.cfg.image_size == 32
    previews = manager.previews(run_id)
    assert len(previews) >= 3 and previews[-1].name == "step_0000040.png"
    assert Image.open(previews[-1]).size[0] > 0
    wait_for_no_trainers(manager.runs_dir)


def test_killed_trainer_is_reported_failed_and_leaves_no_corrupt_checkpoint(manager, tmp_path):
    run_id = manager.start(tiny_config(max_steps=2000))
    wait_for(lambda: manager.paths(run_id).last_ckpt.exists() and
             len(manager.metrics(run_id)) >= 8, "a checkpoint")

    # An app restart: a new manager re-attaches to the live run from the disk.
    reattached = RunManager(manager.runs_dir)
    assert reattached.status(run_id)["state"] == "running"
    with pytest.raises(RunError, match="still live on the devices this run needs: stop it, or "
                                       "Queue this run to start when it ends$"):  # no GPU talk
        reattached.start(tiny_config())

    pid = json.loads(manager.paths(run_id).process.read_text())["pid"]
    os.kill(pid, signal.SIGKILL)  # rank 0 only: rank 1 is left behind, orphaned
    failed = wait_for(lambda: (s := reattached.status(run_id))["state"] == "failed" and s,
                      "the killed run to be reported failed", timeout_s=30)
    assert "before finishing" in failed["error"]
    assert failed["log_tail"], "a failed run shows the end of its log"
    assert failed["resumable"]
    wait_for_no_trainers(manager.runs_dir)

    paths = manager.paths(run_id)
    leftovers = [p.name for p in paths.root.iterdir() if p.name.endswith(".tmp")]
    assert not leftovers
    checkpoint = torch.load(paths.last_ckpt, map_location="cpu", weights_only=True)
    load_model(paths.weights)

    # The resume names the checkpoint's step, not the last step status.json had seen.
    resumed = reattached.resume(run_id)
    assert resumed["resumed_from_step"] == checkpoint["global_step"] == resumed["step"]
    assert resumed["state"] == "starting" and not resumed["error"]
    wait_for(lambda: any(r["step"] == checkpoint["global_step"] + 1
                         for r in manager.metrics(run_id)), "a step after the checkpoint's")


def test_refusals_happen_before_any_process_starts(manager, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for i in range(3):
        (corrupt / f"photo{i}.jpg").write_bytes(os.urandom(2048))
    cases = [
        (tiny_config(data=str(tmp_path / "missing")), DataError, "does not exist"),
        (tiny_config(data=str(empty)), DataError, "holds no images"),
        (tiny_config(data=str(corrupt)), DataError, "none of the 3 image files"),
    ]
    for cfg, error, message in cases:
        with pytest.raises(error, match=message):
            manager.start(cfg)
    for bad, field in [(dict(image_size=50), "image_size"), (dict(mask_ratio=1.0), "mask_ratio"),
                       (dict(batch_size=0), "batch_size"), (dict(preset="vit-giant"), "preset"),
                       (dict(batch_size=True), "batch_size"),  # YAML `true` is not 1
                       (dict(warmup_fraction="0.1"), "warmup_fraction")]:
        with pytest.raises(ConfigError) as err:
            manager.start(tiny_config(**bad))
        assert err.value.field == field
    assert list(manager.runs_dir.iterdir()) == []
    assert not trainer_processes(manager.runs_dir)


def test_resume_of_a_run_that_is_still_live_is_refused_and_changes_nothing(tmp_path):
    """Resume is offered for stopped runs only, but a stale page or the API can ask it of a live
    one: on this host it blocked every other request for 15 s and then blamed a "previous"
    process; for a run on another node it relaunched a second trainer on the live run's files."""
    from mae_core.fileio import atomic_write_json
    from mae_core.process import process_record

    manager = RunManager(tmp_path / "runs")
    paths = create_run(tiny_config(max_steps=9).resolved(), runs_dir=manager.runs_dir)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        local = process_record(sleeper.pid, command=["sleep", "60"])
        remote = {**local, "host": "another-node", "pid": 1}
        for record in (local, remote):
            atomic_write_json(paths.process, record)
            paths.write_status(state="running", step=3)  # fresh: the remote run is alive
            before = (paths.config.read_text(), paths.process.read_text())
            with pytest.raises(RunError, match="is running: it can be resumed once it has stopped"):
                manager.resume(paths.run_id, max_steps=20)
            assert (paths.config.read_text(), paths.process.read_text()) == before
            assert manager.status(paths.run_id)["state"] == "running"
        assert sleeper.poll() is None  # nothing was killed
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_run_on_another_node_marked_dead_signals_nothing_on_this_one(tmp_path):
    """A remote run's pid names nothing here: marking it dead after its silence must not kill
    the local process group that happens to carry that number (here one whose leader exited)."""
    from mae_core.fileio import atomic_write_json
    from mae_core.proctree import group_members

    manager = RunManager(tmp_path / "runs")
    paths = create_run(tiny_config(max_steps=9).resolved(), runs_dir=manager.runs_dir)
    leader = subprocess.run(["setsid", "sh", "-c", "sleep 300 > /dev/null 2>&1 & echo $$"],
                            capture_output=True, text=True, check=True)
    pgid = int(leader.stdout)
    assert poll(lambda: group_members(pgid), 10)
    try:
        atomic_write_json(paths.process, {"pid": pgid, "start_time": "777", "host": "gpu-node-7"})
        status = json.loads(paths.status.read_text())
        atomic_write_json(paths.status, {**status, "state": "running", "updated": time.time() - 700})
        assert manager.status(paths.run_id)["state"] == "failed"
        assert group_members(pgid), "the local group was killed"
    finally:
        os.killpg(pgid, signal.SIGKILL)


def test_a_full_disk_fails_a_start_clearly_and_a_dead_run_still_lists(tmp_path, monkeypatch):
    """ENOSPC (injected at the atomic write every status goes through): Start says why and leaves
    no half-made run; a dead run whose status cannot be rewritten reads as failed in the listing
    instead of breaking it for every run."""
    import errno

    from mae_core import rundir
    from mae_core.fileio import atomic_write_json

    manager = RunManager(tmp_path / "runs")
    good = create_run(tiny_config(max_steps=9).resolved(), runs_dir=manager.runs_dir, state="stopped")
    dead = create_run(tiny_config(max_steps=9).resolved(), runs_dir=manager.runs_dir)
    gone = subprocess.Popen(["true"])
    gone.wait()
    atomic_write_json(dead.process, {"pid": gone.pid, "start_time": "1", "host": socket.gethostname()})
    dead.write_status(state="running", step=3)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(rundir, "atomic_write_json", full_disk)
    listed = {s["run_id"]: s for s in manager.list()}
    assert set(listed) == {good.run_id, dead.run_id} and listed[good.run_id]["state"] == "stopped"
    assert listed[dead.run_id]["state"] == "failed"
    assert "No space left on device" in listed[dead.run_id]["error"]
    runs = lambda: {p for p in manager.runs_dir.iterdir() if p.is_dir()}  # noqa: E731
    before = runs()
    with pytest.raises(RunError, match="cannot be created in .*No space left on device"):
        manager.start(tiny_config(max_steps=9))
    assert runs() == before


@pytest.fixture
def live_stand_in():
    """``make(manager)``: a run of ``manager`` recorded as running, its trainer a real process
    (``sleep``, its own process group) that a force stop can end; ended after the test."""
    from mae_core.fileio import atomic_write_json
    from mae_core.process import process_record

    sleepers: list[subprocess.Popen] = []

    def make(manager: RunManager):
        paths = create_run(tiny_config(max_steps=9).resolved(), runs_dir=manager.runs_dir)
        sleeper = subprocess.Popen(["sleep", "300"], start_new_session=True)
        sleepers.append(sleeper)
        atomic_write_json(paths.process, process_record(sleeper.pid, command=["sleep", "300"]))
        paths.write_status(state="running", step=3)
        return paths, sleeper

    yield make
    for sleeper in sleepers:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.parametrize("made_by", ["app", "hand"])
def test_a_run_folder_moved_under_its_trainer_fails_saying_so(tmp_path, made_by):
    """Renamed while its trainer ran, a run failed at the trainer's next write with a bare
    FileNotFoundError of the old path, as if it had crashed: the move is said. Every trainer's
    record names its folder: the app's as it launches it (a real launch is checked in
    test_run_streams_metrics_stops_and_resumes_to_the_end), a run by hand's as it is made
    (create_run). A stand-in trainer (``sleep``) that exits as the real one did."""
    from mae_core.fileio import atomic_write_json
    from mae_core.process import process_record, trainer_command

    manager = RunManager(tmp_path / "runs")
    sleeper = subprocess.Popen(["sh", "-c", "sleep 300; exit 1"], start_new_session=True)
    cfg = tiny_config(max_steps=9).resolved()
    if made_by == "hand":
        paths = create_run(cfg, runs_dir=manager.runs_dir,
                           process=process_record(sleeper.pid, command=["train.py"]))
    else:
        paths = create_run(cfg, runs_dir=manager.runs_dir)  # as RunManager._launch records it
        atomic_write_json(paths.process, process_record(
            sleeper.pid, command=trainer_command(paths.root), run_dir=str(paths.root.resolve())))
    paths.write_status(state="running", step=3)
    moved = paths.root.with_name(paths.root.name + "-renamed")
    paths.root.rename(moved)
    assert manager.status(moved.name)["state"] == "running"  # found under its new name, live
    subprocess.run(["pkill", "-P", str(sleeper.pid), "sleep"], check=True)  # the sh exits 1
    sleeper.wait()
    status = manager.status(moved.name)
    assert status["state"] == "failed"
    assert status["error"].endswith(f"before finishing: its folder was moved here from "
                                    f"{paths.root} while it trained, and it could no longer "
                                    "write its files"), status["error"]


def test_a_trainer_gone_in_its_own_folder_is_not_said_moved(tmp_path, live_stand_in):
    from mae_core.fileio import atomic_write_json
    from mae_core.process import process_record

    manager = RunManager(tmp_path / "runs")
    paths, sleeper = live_stand_in(manager)
    for command in (["python", "-m", "mae_core.train", "--run-dir", str(paths.root)],
                    [1, 2, None]):  # process.json is a file anyone can edit
        atomic_write_json(paths.process, process_record(sleeper.pid, command=command))
        assert manager.status(paths.run_id)["state"] == "running"
    sleeper.kill()
    sleeper.wait()
    status = manager.status(paths.run_id)
    assert status["state"] == "failed" and "moved" not in status["error"]
    assert status["error"].startswith("the trainer process is gone")


def test_another_nodes_silent_trainer_is_never_said_moved(tmp_path, monkeypatch):
    """Its folder is the same shared one, mounted under another path there: a path this machine
    lacks is no sign of a move."""
    from mae_core import runwatch
    from mae_core.fileio import atomic_write_json

    monkeypatch.setattr(runwatch, "REMOTE_SILENCE_S", 0.0)
    manager = RunManager(tmp_path / "runs")
    paths = create_run(tiny_config(max_steps=9).resolved(), runs_dir=manager.runs_dir)
    elsewhere = "/gpfs/home/u/checkpoints/" + paths.run_id
    atomic_write_json(paths.process, {"pid": 4242, "start_time": "1", "host": "gpu-node-7",
                                      "run_dir": elsewhere, "launched": 0})
    paths.write_status(state="running", step=3)
    status = manager.status(paths.run_id)
    assert status["state"] == "failed" and "moved" not in status["error"], status
    assert runwatch._moved_from({"run_dir": elsewhere}, paths.root) == elsewhere  # were it local


def test_a_force_stop_is_recorded_as_such_whatever_reads_the_status_meanwhile(tmp_path,
                                                                              live_stand_in):
    """The trainer is signalled outside the lock; a status read (another page's poll) that saw it
    gone before the stop wrote its record marked the run "failed: the trainer process is gone"."""
    manager = RunManager(tmp_path / "runs")
    paths, sleeper = live_stand_in(manager)
    seen: set[str] = set()
    done = threading.Event()

    def poll_status() -> None:
        while not done.is_set():
            seen.add(manager.status(paths.run_id)["state"])

    watcher = threading.Thread(target=poll_status)
    watcher.start()
    try:
        ended = manager.stop(paths.run_id, force=True)
    finally:
        done.set()
        watcher.join()
    assert ended["state"] == "stopped" and ended["error"].startswith("stopped by force"), ended
    assert seen <= {"running", "stopping", "stopped"}, seen
    assert sleeper.poll() is not None


def test_a_stop_pressed_again_or_from_a_stale_page_never_forces(tmp_path, live_stand_in):
    """Stop pressed in a second tab that had not yet seen the first request (or twice through the
    API) force-killed the run, losing the steps since its last checkpoint. A plain stop
    (force=False, the page's "Stop") only ever asks; force=True ("Force stop") ends it."""
    manager = RunManager(tmp_path / "runs", stop_timeout_s=600)
    paths, sleeper = live_stand_in(manager)
    for _ in range(3):
        assert manager.stop(paths.run_id, force=False)["state"] == "running"
    assert paths.stop_requested() and sleeper.poll() is None  # asked, never killed
    stopped = manager.stop(paths.run_id, force=True)
    assert stopped["state"] == "stopped", stopped
    assert stopped["error"] == "stopped by force: it had saved no checkpoint", stopped
    assert sleeper.wait(timeout=10) is not None


def stop_in_an_app_killed_after(runs: Path, run_id: str) -> None:
    """Stop ``run_id`` from another app process, then ``kill -9`` that app: its stop watchdog, a
    thread of it, goes with it."""
    asks = ("import os, signal, sys; from mae_core.runs import RunManager; "
            "RunManager(sys.argv[1]).stop(sys.argv[2]); os.kill(os.getpid(), signal.SIGKILL)")
    done = subprocess.run([sys.executable, "-c", asks, str(runs), run_id], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == -signal.SIGKILL, done.stderr


def test_a_stop_asked_by_an_app_killed_since_is_still_forced_on_time(tmp_path, live_stand_in):
    """The stop's watchdog was a thread of the app that asked: killed and restarted meanwhile,
    the app left a trainer that never obeys (stopped with SIGSTOP, hung; here ``sleep``)
    "running" for good. The request's time is on disk, so the restarted app times it."""
    restarted = RunManager(tmp_path / "runs", stop_timeout_s=4)
    paths, sleeper = live_stand_in(restarted)
    stop_in_an_app_killed_after(restarted.runs_dir, paths.run_id)
    asked = time.time()
    status = restarted.status(paths.run_id)
    assert status["state"] == "running" and status["stop_requested"], status
    ended = wait_for(lambda: (s := restarted.status(paths.run_id))["state"] != "running" and s,
                     "the restarted app to force the stop", timeout_s=60)
    assert time.time() - asked >= 3.5, "forced before its stop timeout"
    assert ended["state"] == "stopped", ended
    assert ended["error"] == ("stopped by force: the trainer did not stop within 4 s: it had "
                              "saved no checkpoint"), ended
    assert sleeper.wait(timeout=10) is not None and not ended["stop_requested"]


def test_a_second_stop_long_after_the_first_forces_at_once(tmp_path, live_stand_in):
    """Pressed again after the stop timeout, in an app restarted since the first Stop, Stop
    answered "Stopping" and did nothing: only Force stop ended the run. It forces now, saying so."""
    from mae_core.fileio import atomic_write_json
    from mae_core.process import process_record

    restarted = RunManager(tmp_path / "runs", stop_timeout_s=60)
    paths, sleeper = live_stand_in(restarted)
    long_ago = time.time() - 100
    atomic_write_json(paths.process, process_record(sleeper.pid, command=["sleep", "300"],
                                                    launched=long_ago - 60))
    stop_in_an_app_killed_after(restarted.runs_dir, paths.run_id)
    os.utime(paths.stop_request, (long_ago, long_ago))  # asked 100 s ago
    ended = restarted.stop(paths.run_id, force=False)
    assert ended["state"] == "stopped", ended
    assert re.fullmatch(r"stopped by force: the trainer did not stop within 60 s of its Stop, "
                        r"asked 1\d\d s ago \(in an app restarted since, or another one\): it had "
                        r"saved no checkpoint", ended["error"]), ended
    assert sleeper.wait(timeout=10) is not None


def test_a_force_stop_ends_a_trainer_started_by_hand_inside_a_script(tmp_path):
    """A trainer started from a shell script (or under timeout or nohup) leads no process group:
    Force stop signalled its pid's group, reached no one, and recorded "stopped" while it trained
    on. It ends now, and the script that started it goes on."""
    from mae_core.fileio import atomic_write_json
    from mae_core.process import pid_alive, process_record
    from mae_core.proctree import descendants

    manager = RunManager(tmp_path / "runs")
    paths = create_run(tiny_config(max_steps=9).resolved(), runs_dir=manager.runs_dir)
    script = subprocess.Popen(["sh", "-c", "sleep 300; echo script-goes-on"], text=True,
                              stdout=subprocess.PIPE, start_new_session=True)
    try:
        trainer = poll(lambda: next(iter(descendants(script.pid)), None), 30, 0.05)
        atomic_write_json(paths.process, process_record(trainer, command=["sleep", "300"]))
        paths.write_status(state="running", step=3)
        stopped = manager.stop(paths.run_id, force=True)
        assert stopped["state"] == "stopped", stopped
        assert not pid_alive(trainer)
        assert script.communicate(timeout=30)[0].strip() == "script-goes-on"
    finally:
        script.kill()
        script.wait()


def test_a_trainer_that_outlives_sigkill_is_not_recorded_stopped(tmp_path, live_stand_in,
                                                                  monkeypatch):
    """A trainer stuck in the kernel (a hung disk or driver) lives through SIGKILL: recorded
    "stopped", it read "running" again at its next save, and a Start meanwhile was not refused.
    No process here can outlive SIGKILL, so the signals are taken as having failed."""
    from mae_core import proctree

    manager = RunManager(tmp_path / "runs")
    paths, sleeper = live_stand_in(manager)
    monkeypatch.setattr(proctree, "terminate_group", lambda pid, start_time, grace_s=5.0: False)
    with pytest.raises(RunError, match=rf"pid {sleeper.pid}\) still runs after SIGTERM"):
        manager.stop(paths.run_id, force=True)
    assert manager.status(paths.run_id)["state"] == "running"


def test_a_finished_run_given_no_higher_end_is_told_so_first(tmp_path):
    """Its other checks came first: a finished run whose data folder had since gone was refused
    for the data, and once that was put back, for having finished."""
    manager = RunManager(tmp_path / "runs")
    cfg = tiny_config(max_steps=4, data=str(tmp_path / "moved-away")).resolved()
    paths = create_run(cfg, runs_dir=manager.runs_dir, state="finished")
    paths.write_status(step=4)
    for steps in (None, 4):
        with pytest.raises(RunError, match=f"run {paths.run_id} has finished: raise max steps "
                                           "above 4 to train it further"):
            manager.resume(paths.run_id, max_steps=steps)
    with pytest.raises(DataError, match="moved-away"):  # given more steps, the data is checked
        manager.resume(paths.run_id, max_steps=6)


def test_corrupt_checkpoint_is_refused_on_resume(manager):
    run_id = manager.start(tiny_config(max_steps=8, **ONE_PROCESS))
    wait_until_ended(manager, run_id)
    paths = manager.paths(run_id)
    whole = paths.last_ckpt.read_bytes()
    paths.write_status(state="stopped")
    for damaged in (whole[:1000], whole[:len(whole) // 2], b""):  # a kill mid-copy leaves 0 bytes
        paths.last_ckpt.write_bytes(damaged)
        with pytest.raises(RunError, match="corrupt"):
            manager.resume(run_id, max_steps=20)
    # A sound Lightning checkpoint of another model (copied from another run) passed every check,
    # and the launched trainer failed on a size mismatch.
    paths.last_ckpt.write_bytes(whole)
    checkpoint = torch.load(paths.last_ckpt, weights_only=True)
    other = MaskedAutoencoder(ModelConfig(preset="vit-tiny", image_size=64, patch_size=8))
    checkpoint["state_dict"] = {f"mae.{k}": v for k, v in other.state_dict().items()}
    torch.save(checkpoint, paths.last_ckpt)
    with pytest.raises(RunError, match=r"not a checkpoint of this run's model .*32 px / patch 8.*"
                                       r"pos_embed is \[1, 65, 192\] in it and \[1, 17, 192\]"):
        manager.resume(run_id, max_steps=20)
    paths.last_ckpt.unlink()
    with pytest.raises(RunError, match="no checkpoint"):
        manager.resume(run_id, max_steps=20)
    assert manager.status(run_id)["state"] == "stopped"  # a refused resume changes nothing
    with pytest.raises(RunError, match="not running"):
        manager.stop(run_id)


def test_a_run_trained_by_epochs_is_resumed_after_a_stop(manager):
    """max_steps -1 (train by max_epochs): Resume used to refuse it, asking for max steps above
    the checkpoint's step, while the Runs tab called it resumable. Then the stop's checkpoint,
    saved after Lightning had closed the epoch, named the next one: the resumed run skipped the
    rest of the stopped epoch and finished steps short."""
    run_id = manager.start(tiny_config(max_steps=-1, max_epochs=10))  # 4 steps an epoch: 40
    paths = manager.paths(run_id)
    wait_for(lambda: paths.last_ckpt.exists(), "the first checkpoint")
    manager.stop(run_id)
    stopped = wait_until_ended(manager, run_id)
    assert stopped["state"] == "stopped" and stopped["resumable"], stopped
    assert stopped["step"] < 40, "the run ended before the stop: the test proves nothing"
    resumed = manager.resume(run_id)
    assert resumed["resumed_from_step"] == stopped["step"], resumed
    ended = wait_until_ended(manager, run_id)
    assert ended["state"] == "finished" and ended["step"] == 40, ended
    rows = paths.read_metrics()
    assert [row["step"] for row in rows if "loss" in row] == list(range(1, 41))
    # One mean per epoch, over every step of both ranks: none for the stopped epoch's first part.
    assert [row["epoch"] for row in rows if "epoch_loss" in row] == list(range(10))

    # Finished at its max epochs: Resume "towards 44 steps" ended at once, still at step 40.
    with pytest.raises(RunError, match=f"run {run_id} finished its 10 epochs at step 40: raise "
                                       "max steps above 40"):
        manager.resume(run_id)
    manager.resume(run_id, max_steps=44)  # the epoch limit that ended it goes
    ended = wait_until_ended(manager, run_id)
    assert ended["state"] == "finished" and ended["step"] == 44, ended
    cfg = manager.config(run_id)
    assert (cfg.train.max_steps, cfg.train.max_epochs) == (44, None)


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    folder = tmp_path / "data" / "nested"
    folder.mkdir(parents=True)
    for path in sample_photo_paths()[:3]:
        shutil.copy(path, folder / path.name)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(100))
    (folder / "notes.txt").write_text("not an image")
    paths = find_images(str(tmp_path / "data"))
    assert len(paths) == 4  # recursive, by extension
    dataset = ImageFolderDataset(paths, image_size=32, length=16)
    assert dataset.skipped == 1 and dataset.num_images == 3 and len(dataset) == 16
    crop = dataset[7]
    assert crop.shape == (3, 32, 32) and crop.dtype == torch.uint8


def test_command_line_trains_by_hand_with_two_ddp_processes(tmp_path):
    data = tmp_path / "photos"
    data.mkdir()
    for path in sample_photo_paths()[:4]:
        shutil.copy(path, data / path.name)
    (data / "corrupt.jpg").write_bytes(os.urandom(500))
    config = tmp_path / "run.yaml"
    config.write_text("model:\n  preset: vit-tiny\n  image_size: 64\ntrain:\n  max_steps: 100\n")
    result = subprocess.run(
        [sys.executable, "-m", "mae_core.train", "--config", str(config), "--runs-dir",
         str(tmp_path / "runs"), "--data", str(data), "--image-size", "32", "--patch-size", "8",
         "--batch-size", "8", "--max-steps", "6", "--devices", "2", "--accelerator", "cpu",
         "--num-previews", "1"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [run_dir] = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]  # not .runs.lock
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == 6
    assert status["world_size"] == 2
    assert status["images"] == 4 and status["skipped_files"] == 1
    saved = RunConfig.load(run_dir / "config.yaml")
    assert saved.model.image_size == 32 and saved.train.max_steps == 6  # flags beat the file
    assert saved.train.data == str(data)
    assert load_model(run_dir / "model.safetensors").cfg.patch_size == 8
    # What a person reads in the log: no library deprecation noise or adverts from either rank.
    log = result.stdout + result.stderr
    assert "Initializing distributed: GLOBAL_RANK: 1" in log
    assert "LeafSpec" not in log and "litlogger" not in log


def test_manager_follows_and_stops_a_run_started_by_hand(tmp_path):
    """A run started from the command line shows up live in the app's manager (not as failed)
    and can be stopped from there, gracefully."""
    runs = tmp_path / "runs"
    env = {k: v for k, v in os.environ.items() if k not in ("MAE_STUDIO_RUN_DIR", "RANK")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mae_core.train", "--runs-dir", str(runs), "--image-size", "32",
         "--patch-size", "8", "--batch-size", "8", "--max-steps", "5000", "--devices", "2",
         "--accelerator", "cpu", "--num-previews", "0"],
        cwd=PROJECT_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    try:
        manager = RunManager(runs, stop_timeout_s=60)  # a fresh app: it never launched this run
        run_id = wait_for(lambda: runs.exists() and manager.live_run(), "the run to appear")
        wait_for(lambda: manager.status(run_id).get("step", 0) >= 2, "two steps")
        assert manager.status(run_id)["state"] == "running"
        manager.stop(run_id)
        assert proc.wait(timeout=TIMEOUT_S) == 0
        status = wait_until_ended(manager, run_id)
        assert status["state"] == "stopped" and status["resumable"]
        assert 2 <= status["step"] < 5000
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_stop_watchdog_never_kills_the_trainer_a_resume_launched(tmp_path):
    """Stop, then Resume at once: the stop's watchdog watches the trainer it was started for."""
    # Long enough for a graceful stop on a busy machine (~2 s here), short enough to wait out.
    manager = RunManager(tmp_path / "runs", stop_timeout_s=8)
    run_id = manager.start(tiny_config(max_steps=5000, checkpoint_every_n_steps=2, num_previews=0,
                                       **ONE_PROCESS))
    try:
        for _ in range(2):  # twice: the old watchdog lost its race with the resume only mostly
            start_step = manager.status(run_id).get("step", 0)
            status = wait_for(lambda: ((s := manager.status(run_id))["state"] not in
                                       ("starting", "running") or s.get("step", 0) >= start_step + 2)
                              and s, "two steps")
            assert status["state"] == "running", status
            manager.stop(run_id)
            stop_clicked = time.monotonic()
            wait_for(lambda: manager.status(run_id)["state"] == "stopped", "the stop", every_s=0.01)
            manager.resume(run_id)
        resumed = json.loads(manager.paths(run_id).process.read_text())
        time.sleep(max(0.0, stop_clicked + manager.stop_timeout_s + 3 - time.monotonic()))
        status = manager.status(run_id)
        assert status["state"] in ("starting", "running"), status
        assert "by force" not in (status.get("error") or "")
        assert pid_alive(resumed["pid"], resumed["start_time"])
    finally:
        if manager.live_run():
            manager.stop(run_id, force=True)
    wait_for_no_trainers(manager.runs_dir)


def test_two_apps_on_one_runs_directory_never_start_two_runs(tmp_path):
    """Apps sharing a runs directory: of four Starts at the same moment, exactly one launches.
    A stop while the trainer starts ends it: obeyed at its next start-up check, or by force
    when that check comes later than the 2 s stop timeout (its imports take longer here)."""
    managers = [RunManager(tmp_path / "runs", stop_timeout_s=2) for _ in range(4)]
    barrier = threading.Barrier(len(managers))
    outcomes: list[object] = []

    def start(manager: RunManager) -> None:
        barrier.wait()
        try:
            outcomes.append(manager.start(tiny_config(max_steps=5000, num_previews=0)))
        except Exception as err:  # noqa: BLE001 - every outcome is checked below
            outcomes.append(err)

    threads = [threading.Thread(target=start, args=(m,)) for m in managers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT_S)
    try:
        started = [o for o in outcomes if isinstance(o, str)]
        refused = [o for o in outcomes if isinstance(o, RunError) and "still live" in str(o)]
        assert len(started) == 1 and len(refused) == 3, outcomes
        assert [s["run_id"] for s in managers[3].list()] == started
        managers[0].stop(started[0])
        stopped = wait_until_ended(managers[0], started[0])
        assert stopped["state"] == "stopped", stopped
        assert stopped["error"] is None or "did not stop within 2 s" in stopped["error"], stopped
        wait_for_no_trainers(tmp_path / "runs")
        assert poll(lambda: not zombie_children(), 10), "the stopped trainer was not reaped"
    finally:
        for run_id in (o for o in outcomes if isinstance(o, str)):
            if managers[0].status(run_id)["state"] in ("starting", "running", "stopping"):
                managers[0].stop(run_id, force=True)
    wait_for_no_trainers(tmp_path / "runs")


def test_start_scans_data_outside_the_lock_and_finished_trainers_are_reaped(tmp_path, monkeypatch):
    """While Start reads a (slow) data folder every status call still answers; the count it found
    is in the status; a relative data path is stored absolute; a trainer that ends by itself does
    not stay behind as a zombie of the app."""
    data = tmp_path / "photos"
    data.mkdir()
    for path in sample_photo_paths()[:3]:
        shutil.copy(path, data / path.name)
    monkeypatch.chdir(tmp_path)
    manager = RunManager(tmp_path / "runs")
    earlier = create_run(tiny_config().resolved(), runs_dir=manager.runs_dir)
    earlier.write_status(state="finished")
    slow_disk = SlowDisk(data_module.check_data)  # the real scan, answering when told to
    scanning, release = slow_disk.scanning, slow_disk.release
    monkeypatch.setattr(data_module, "check_data", slow_disk)  # Start's scan: channels.resolve_data
    started: list[str] = []
    starter = threading.Thread(target=lambda: started.append(
        manager.start(tiny_config(data="photos", max_steps=4, num_previews=0, **ONE_PROCESS))))
    starter.start()
    assert scanning.wait(60)
    answers: list[object] = []
    asker = threading.Thread(target=lambda: answers.extend(
        [manager.status(earlier.run_id)["state"], len(manager.list()), manager.live_run()]))
    asker.start()
    asker.join(20)  # generous: without the scan in the way this takes milliseconds
    release.set()
    starter.join(TIMEOUT_S)
    assert answers == ["finished", 1, None], "a status call waited for the data scan"

    [run_id] = started
    assert manager.config(run_id).train.data == str(data)  # resolved once, against the app's cwd
    assert manager.status(run_id)["data_files"] == 3
    finished = wait_until_ended(manager, run_id)
    assert finished["state"] == "finished" and finished["images"] == 3, finished
    assert poll(lambda: not zombie_children(), 10), f"zombie trainers: {zombie_children()}"


def test_resume_without_a_run_directory_is_refused_and_creates_nothing(tmp_path, run_module):
    result = run_module("mae_core.train", "--resume", "--runs-dir", tmp_path / "runs",
                        "--max-steps", "5")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "--run-dir" in result.stderr and "resume" in result.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("run_id", ["x" * 5000, "a" * 256, "../runs", "", ".", "a/b", "\x00"],
                         ids=["5000-chars", "256-chars", "parent", "empty", "dot", "slash", "nul"])
def test_a_run_id_that_names_no_run_directory_gets_a_clear_refusal(manager, run_id):
    for call in (manager.paths, manager.status, manager.config, manager.metrics, manager.previews,
                 manager.weights, manager.stop, manager.resume, manager.delete, manager.export):
        with pytest.raises(RunError, match="no run named") as err:
            call(run_id)
        assert len(str(err.value)) < 300  # the id is cut short, not echoed 5,000 times
        assert RUN_ID_RULE in str(err.value)


def test_previews_are_listed_in_step_order_and_nothing_else(manager):
    paths = create_run(tiny_config().resolved(), runs_dir=manager.runs_dir)
    assert manager.previews(paths.run_id) == []  # no previews folder yet
    paths.previews.mkdir()
    for step in (100, 0, 20):
        paths.preview(step).write_bytes(b"png")
    (paths.previews / "notes.png").write_bytes(b"")
    (paths.previews / f".{paths.preview(30).name}.123.abcd1234.tmp").write_bytes(b"")
    paths.preview(40).mkdir()  # a folder named like one is no preview
    paths.preview(50).symlink_to(paths.preview(0))  # a link is served from where it points
    assert manager.previews(paths.run_id) == [paths.preview(0), paths.preview(20), paths.preview(100)]


def test_a_run_found_dead_loses_the_temp_files_of_its_interrupted_save(tmp_path):
    """A kill during a save leaves ``.last.ckpt.<pid>.*.tmp``; the run reported failed has none."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # a pid that ran a trainer and is gone
    record = {"pid": child.pid, "start_time": "1", "host": socket.gethostname()}
    paths = create_run(tiny_config().resolved(), runs_dir=tmp_path, state="running",
                       process=record)
    interrupted = paths.root / f".last.ckpt.{child.pid}.abcd_123.tmp"
    in_flight = paths.root / f".status.json.{os.getpid()}.wxyz_789.tmp"  # a live writer's
    interrupted.write_bytes(b"half a checkpoint")
    in_flight.write_text("{")
    status = RunManager(tmp_path).status(paths.run_id)
    assert status["state"] == "failed"
    assert not interrupted.exists() and in_flight.exists()


def test_a_runs_folder_deleted_under_the_app_is_empty_then_made_again(tmp_path):
    """``rm -rf checkpoints`` to free space while the app runs: the lists read empty, and the next
    Start or Queue makes the folder again (each raised FileNotFoundError, "Internal error")."""
    manager = RunManager(tmp_path / "checkpoints")
    shutil.rmtree(manager.runs_dir)
    assert manager.list() == [] and manager.live_run() is None and manager.queued() == []
    assert manager.advance_queue() is None
    run_id, position = manager.enqueue(tiny_config(max_steps=2))
    assert position == 1 and [s["run_id"] for s in manager.list()] == [run_id]


def _lightning_checkpoint(path: Path, cfg: RunConfig, step: int) -> None:
    """A checkpoint Resume accepts for a run of ``cfg`` (zeros of its model's shapes, no training)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in MaskedAutoencoder(cfg.model).state_dict().items()}
    torch.save({"state_dict": {f"mae.{k}": torch.zeros(shape) for k, shape in shapes.items()},
                "global_step": step, "epoch": 0, "loops": {}, **resume_state(),
                "pytorch-lightning_version": "2.0.0"}, path)


def test_a_live_run_on_a_read_only_mount_is_refused_a_stop_in_words(small_disk, live_stand_in):
    """Stop writes a STOP file into the run folder: on a read-only mount it was "Internal error"."""
    disk = small_disk(50)
    manager = RunManager(disk / "runs", stop_timeout_s=600)
    live, sleeper = live_stand_in(manager)
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    try:
        with pytest.raises(RunError, match=f"run {live.run_id} cannot be asked to stop: .*STOP "
                                           r"cannot be written \(Read-only file system\)"):
            manager.stop(live.run_id, force=False)
        assert sleeper.poll() is None and manager.status(live.run_id)["state"] == "running"
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)


def test_a_read_only_runs_folder_still_lists_and_refuses_each_change_in_words(small_disk):
    """A runs folder on a read-only mount (a backup, a volume mounted ro): Start, Queue, Resume and
    Delete each read "Internal error ... OSError: [Errno 30] Read-only file system: '.runs.lock'",
    since the lock file was opened for writing, whether there was one or not. They say why; the
    runs still list and open, and nothing in the folder changes."""
    disk = small_disk(600)  # room for the space check Start and Resume make first
    manager = RunManager(disk / "runs")
    cfg = tiny_config(max_steps=9, num_previews=0)
    stopped = create_run(cfg.resolved(), runs_dir=manager.runs_dir, state="stopped")
    stopped.write_status(step=3)
    _lightning_checkpoint(stopped.last_ckpt, cfg.resolved(), step=3)
    queued, _ = manager.enqueue(cfg)  # leaves the lock file behind
    refusal = f"the runs directory {re.escape(str(manager.runs_dir))} is read-only"
    changes = {"Start": lambda: manager.start(cfg), "Queue": lambda: manager.enqueue(cfg),
               "Resume": lambda: manager.resume(stopped.run_id, max_steps=20),
               "Delete": lambda: manager.delete(stopped.run_id),
               "move in the queue": lambda: manager.move_queued(queued, -1),
               "the queue's turn": manager.advance_queue}
    for lock_file in (True, False):  # the lock file opened read-only, or none there at all
        if not lock_file:
            subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
            (manager.runs_dir / ".runs.lock").unlink()
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        before = sorted((p, p.stat().st_mtime_ns) for p in disk.rglob("*"))
        assert {s["run_id"]: s["state"] for s in manager.list()} == {
            stopped.run_id: "stopped", queued: "queued"}
        assert manager.status(stopped.run_id)["resumable"] and manager.queued() == [queued]
        for change, call in changes.items():
            with pytest.raises(RunError, match=refusal):
                call()
        assert sorted((p, p.stat().st_mtime_ns) for p in disk.rglob("*")) == before


# --- delete ---------------------------------------------------------------------------------------

def test_a_deleted_runs_files_go_after_the_lock_so_other_runs_keep_answering(tmp_path, monkeypatch):
    """Removing a run of 60,000 previews took seconds under the run manager's lock: every status
    call and list waited. Under the lock the run now only leaves its name."""
    manager = RunManager(tmp_path / "runs")
    doomed = create_run(tiny_config().resolved(), runs_dir=manager.runs_dir, state="stopped")
    other = create_run(tiny_config().resolved(), runs_dir=manager.runs_dir, state="stopped")
    removing, release = threading.Event(), threading.Event()
    real_rmtree = shutil.rmtree

    def slow_rmtree(path, *args, **kwargs):
        removing.set()
        release.wait(60)
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", slow_rmtree)
    deleting = threading.Thread(target=manager.delete, args=(doomed.run_id,))
    deleting.start()
    try:
        assert removing.wait(60)
        answered: list[dict] = []
        asking = threading.Thread(target=lambda: answered.append(manager.status(other.run_id)))
        asking.start()
        asking.join(30)
        assert answered and answered[0]["state"] == "stopped"  # not held until the files are gone
        assert [s["run_id"] for s in manager.list()] == [other.run_id]  # already gone by name
    finally:
        release.set()
        deleting.join(60)
    assert sorted(p.name for p in manager.runs_dir.iterdir() if p.is_dir()) == [other.run_id]


def test_a_write_into_a_run_deleted_meanwhile_never_brings_its_folder_back(tmp_path):
    """An export, an evaluation or a late status record racing a Delete wrote into the path and
    made the folder again: a run without its config, invisible in the app, holding its disk."""
    from mae_core.weights import export_encoder, save_weights

    manager = RunManager(tmp_path / "runs")
    paths = create_run(tiny_config().resolved(), runs_dir=manager.runs_dir, state="stopped")
    weights = tmp_path / "kept.safetensors"
    save_weights(MaskedAutoencoder(tiny_config().model), weights)
    manager.delete(paths.run_id)
    with pytest.raises(FileNotFoundError):
        paths.write_status(state="failed", error="the trainer process is gone")
    with pytest.raises(FileNotFoundError):
        export_encoder(weights, paths.encoder, make_dirs=False)
    assert not paths.root.exists()
    with pytest.raises(RunError, match="no run named"):
        manager.export(paths.run_id)


def test_export_refuses_weights_of_another_model_than_the_runs(tmp_path):
    """A model.safetensors copied in from another run was exported, with a snippet built from
    the run's config that could not load it (size mismatch for cls_token)."""
    from mae_core.config import ModelConfig
    from mae_core.weights import save_weights

    manager = RunManager(tmp_path / "runs")
    paths = create_run(tiny_config().resolved(), runs_dir=manager.runs_dir, state="stopped")
    other = ModelConfig(preset="vit-small", image_size=32, patch_size=8)
    save_weights(MaskedAutoencoder(other), paths.weights, step=1)
    with pytest.raises(RunError, match=r"\(vit_small_patch16_224, 32 px / patch 8, 3 channels\) "
                                       r"are not of its model \(vit_tiny"):
        manager.export(paths.run_id)
    assert not paths.encoder.exists()
    save_weights(MaskedAutoencoder(tiny_config().resolved().model), paths.weights, step=1)
    file, snippet = manager.export(paths.run_id)
    assert file.is_file() and "vit_tiny_patch16_224" in snippet


def test_resume_checks_the_devices_the_run_needs_are_still_there(tmp_path):
    """A run saved on GPUs (or more CPU cores) resumed where they are not visible: Start refuses
    such a config, but Resume launched it, and the trainer failed."""
    manager = RunManager(tmp_path / "runs")
    paths = create_run(tiny_config(devices=1).resolved(), runs_dir=manager.runs_dir,
                       state="stopped")
    saved = paths.config.read_text()
    paths.config.write_text(saved.replace("accelerator: cpu", "accelerator: gpu")
                            .replace("gpus: ''", "gpus: '1'"))
    assert RunConfig.load(paths.config).train.gpus == "1"  # the edit took
    with pytest.raises(RunError, match=f"run {paths.run_id} cannot be resumed here: .*GPU"):
        manager.resume(paths.run_id)
    assert manager.status(paths.run_id)["state"] == "stopped"


def test_a_run_on_several_nodes_is_left_to_its_launcher(tmp_path):
    """Resumed from the app, a 2-node run (trained with torchrun) launched one local process that
    waited in "starting" for a node that never came."""
    manager = RunManager(tmp_path / "runs")
    with pytest.raises(RunError, match="a run on 2 nodes: the app starts one machine's processes"):
        manager.start(tiny_config(num_nodes=2, devices=1))
    with pytest.raises(RunError, match="on 2 nodes"):
        manager.enqueue(tiny_config(num_nodes=2, devices=1))
    paths = create_run(tiny_config(devices=1).resolved(), runs_dir=manager.runs_dir,
                       state="stopped")
    paths.config.write_text(paths.config.read_text().replace("num_nodes: 1", "num_nodes: 2"))
    with pytest.raises(RunError, match=f"run {paths.run_id} trains on 2 nodes: .*--resume"):
        manager.resume(paths.run_id)
    assert manager.list()[0]["state"] == "stopped" and len(manager.list()) == 1


def test_a_live_run_of_another_runs_folder_holds_its_devices_too(tmp_path, live_stand_in):
    """Two apps on two runs folders (``--runs-dir``) started a CPU run each at the same moment:
    the one-live-run rule looked in its own folder only. Each folder a manager opens is noted for
    the machine (mae_core.runsdirs), and a Start or Queue's turn waits for the other's run."""
    from mae_core import runsdirs

    first, second = RunManager(tmp_path / "runs-a"), RunManager(tmp_path / "runs-b")
    assert runsdirs.other_runs_dirs(second.runs_dir) == [(tmp_path / "runs-a").resolve()]
    paths, sleeper = live_stand_in(first)
    cfg = tiny_config(max_steps=9)
    assert second.conflicting_run(cfg) == str(paths.root)
    with pytest.raises(RunError, match=f"run {re.escape(str(paths.root))} is still live on the "
                                       "devices this run needs"):
        second.start(cfg)
    assert second.list() == []  # nothing made
    sleeper.kill()
    sleeper.wait()
    assert second.conflicting_run(cfg) is None  # its trainer gone: the other folder's app says so
    # A folder deleted since drops out of the list; a damaged list is read as empty and rewritten.
    shutil.rmtree(tmp_path / "runs-a")
    assert runsdirs.other_runs_dirs(second.runs_dir) == []
    runsdirs.registry_path().write_text("{not json")
    RunManager(tmp_path / "runs-c")
    assert runsdirs.other_runs_dirs(tmp_path) == [(tmp_path / "runs-c").resolve()]


def test_a_stop_while_the_run_prepares_its_data_stops_it_untrained_and_resume_starts_it(
        manager, tmp_path, monkeypatch):
    """A Stop while the trainer prepared (or waited for another process preparing) a large
    folder waited for the preparation, the watchdog force-killing it after 60 s, then trained a
    step. Now it ends at once, "stopped" with nothing trained, and Resume starts it."""
    from helpers import cache_lock_held
    from mae_core import prepared

    monkeypatch.setenv(prepared.CACHE_ENV, str(tmp_path / "cache"))  # the trainer inherits it
    folder = tmp_path / "large"
    folder.mkdir()
    for i in range(prepared.AUTO_PREPARE_ABOVE + 1):
        Image.new("RGB", (16, 16), (i % 251, 7, 9)).save(folder / f"{i:04d}.png")
    with cache_lock_held(folder):  # another process prepares the same set: the run waits
        run_id = manager.start(tiny_config(data=str(folder), max_steps=3, **ONE_PROCESS))
        paths = manager.paths(run_id)
        wait_for(lambda: "waiting for another process" in paths.log_tail(), "the wait")
        asked = time.monotonic()
        manager.stop(run_id)
        stopped = wait_until_ended(manager, run_id)
        took = time.monotonic() - asked
    assert stopped["state"] == "stopped" and not stopped.get("error"), stopped
    assert took < 20, f"took {took:.0f} s to stop"
    assert stopped["step"] == 0 and stopped["resumable"] and not stopped["stop_requested"]
    assert manager.metrics(run_id) == [] and not paths.last_ckpt.exists()
    wait_for_no_trainers(manager.runs_dir)

    manager.resume(run_id)  # no checkpoint: it starts from step 0, preparing the set now
    finished = wait_until_ended(manager, run_id)
    assert finished["state"] == "finished" and finished["step"] == 3, finished
    assert [r["step"] for r in manager.metrics(run_id) if "loss" in r] == [1, 2, 3]


def test_the_leftovers_of_a_delete_cut_short_go_when_the_app_starts_again(tmp_path):
    """An app killed while it removed a deleted run's files left its hidden folder, taking its
    disk unseen until some later Delete."""
    from mae_core.rundir import TRASH_PREFIX

    runs = tmp_path / "runs"
    left = runs / f"{TRASH_PREFIX}0123abcd"
    (left / "snapshots").mkdir(parents=True)
    (left / "last.ckpt").write_bytes(b"x" * 1000)
    (runs / "mine").mkdir()  # a folder of the user's own is never touched
    manager = RunManager(runs)
    manager.leftovers_removal.join(timeout=30)
    assert not left.exists() and (runs / "mine").is_dir()
    assert RunManager(runs).leftovers_removal is None  # nothing left: no thread
