"""A full disk: a run its disk cannot hold is refused before anything is written, and a disk that
fills up mid-run fails the run with that reason and loses nothing: its checkpoint resumes once
space is free.

The disks are real: small tmpfs mounts (CI runs as root, as this machine does), which fail a
write with ENOSPC the way a full volume does. torch.save's own error there is "enforce fail at
inline_container.cc ... unexpected pos", which names no disk.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import poll
from mae_core import diskspace
from mae_core import process as proc
from mae_core.config import RunConfig
from mae_core.fileio import (TEMP_SUFFIX, DiskFullError, atomic_write, free_bytes,
                             is_disk_full, read_json)
from mae_core.rundir import LIVE_STATES, RunPaths, create_run, process_record
from mae_core.runs import RunError, RunManager, checkpoint_step

CHECKPOINT_EVERY = 2
STARTUP_S = 240  # generous: two CPU ranks start in ~10 s here, longer on a busy machine


def tiny_config(**overrides) -> RunConfig:
    return RunConfig().with_overrides(**{
        "preset": "vit-tiny", "image_size": 32, "patch_size": 8, "batch_size": 4, "devices": 2,
        "accelerator": "cpu", "num_workers": 0, "checkpoint_every_n_steps": CHECKPOINT_EVERY,
        "log_every_n_steps": 1, "num_previews": 0, "weight_snapshots": 0, "max_steps": 1_000_000,
        **overrides})


def fill(disk: Path, leave_bytes: int) -> Path:
    """A file that takes all but ``leave_bytes`` of ``disk``'s free space, never more, while a
    trainer may be writing there too (a save in flight can take the room meanwhile: asked again)."""
    ballast = disk / "ballast"
    with open(ballast, "wb") as handle:
        for _ in range(100):
            try:
                os.posix_fallocate(handle.fileno(), 0,
                                   handle.seek(0, os.SEEK_END) + free_bytes(disk) - leave_bytes)
                return ballast
            except OSError:
                time.sleep(0.05)
    raise AssertionError(f"{disk} could not be filled")


def fill_between_saves(disk: Path, run: RunPaths, leave_bytes: int) -> Path:
    """:func:`fill`, at a moment when no save of ``run`` is in flight. Measured while a save's
    temp file held a checkpoint's blocks, the free space was short by one checkpoint: the old
    file's blocks, freed when the temp file replaced it, were room for every later save, and the
    run trained on with a "full" disk (seen in CI under load)."""
    for _ in range(200):
        before = _saves_settled(run)
        if before is not None:
            ballast = fill(disk, leave_bytes)
            if _saves_settled(run) == before:
                return ballast
            ballast.unlink()
        time.sleep(0.05)
    raise AssertionError(f"{run.root} was saving at every try")


def _saves_settled(run: RunPaths) -> tuple[int, int] | None:
    """The saved files' inodes (a save replaces its file: a new inode), or None while a temp file
    of a save is on disk."""
    if any(p.name.endswith(TEMP_SUFFIX) for p in run.root.iterdir()):
        return None
    try:
        return run.last_ckpt.stat().st_ino, run.weights.stat().st_ino
    except FileNotFoundError:
        return None


def with_inodes(disk: Path, inodes: int) -> Path:
    """``disk`` (a small tmpfs) limited to ``inodes`` files and folders, itself included."""
    subprocess.run(["mount", "-o", f"remount,nr_inodes={inodes}", str(disk)], check=True)
    return disk


def use_up_inodes(disk: Path) -> list[Path]:
    """Empty files on ``disk`` until it can hold no more: the files, in the order made."""
    made = []
    while True:
        path = disk / f"file{len(made)}"
        try:
            path.touch()
        except OSError as err:
            assert err.errno == errno.ENOSPC, err
            return made
        made.append(path)


# --- the estimate and the check before a run starts ---------------------------------------------

def test_the_peak_counts_two_checkpoints_and_every_copy_of_the_weights():
    files = diskspace.RunFiles(checkpoint=300, weights=100, snapshots=5)
    assert files.peak == 2 * 300 + 7 * 100 + diskspace.SPARE_BYTES


def test_the_checkpoint_holds_adam_moments_for_trainable_tensors_only():
    cfg = tiny_config()
    total, trainable = diskspace.tensor_elements(cfg.model)
    frozen_by_policy = total - trainable
    assert frozen_by_policy > 0  # ddp-clean freezes the position embedding and the mask token
    files = diskspace.run_files(cfg)
    assert files.checkpoint == 4 * (total + 2 * trainable)
    assert files.weights == 4 * total


def test_a_folder_counts_each_file_once_however_many_links_name_it(tmp_path):
    """A weight snapshot is a hard link to model.safetensors of its step: deleting the run frees
    the file once."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "model.safetensors").write_bytes(b"x" * 2**20)
    os.link(tmp_path / "model.safetensors", tmp_path / "sub" / "step-4.safetensors")
    (tmp_path / "sub" / "other").write_bytes(b"y" * 2**19)
    assert 1.5 * 2**20 <= diskspace.folder_bytes(tmp_path) < 1.6 * 2**20


def test_a_run_the_disk_cannot_hold_is_refused_before_anything_is_written(small_disk):
    runs = small_disk(64) / "runs"
    manager = RunManager(runs)
    with pytest.raises(RunError) as refused:
        manager.start(tiny_config())
    message = str(refused.value)
    assert message.startswith("not enough disk space")
    assert str(runs) in message and "MB free" in message and "Runs tab" in message
    assert manager.list() == []
    with pytest.raises(RunError, match="not enough disk space"):
        manager.enqueue(tiny_config())
    assert manager.list() == [] and manager.queued() == []


def test_a_queued_run_waits_in_its_place_for_disk_space_then_starts(small_disk):
    """Room at Queue time, none when its turn comes: it stays queued, saying why (a full disk is
    not the run's fault, and a failed queued run has no checkpoint to resume), and starts once
    space is free."""
    disk = small_disk(360)
    manager = RunManager(disk / "runs")
    run_id, _ = manager.enqueue(tiny_config(devices=1, max_steps=2))
    ballast = fill(disk, leave_bytes=8 * 2**20)
    assert manager.advance_queue() is None
    waiting = manager.status(run_id)
    assert waiting["state"] == "queued" and manager.queued() == [run_id]
    assert waiting["error"].startswith("waiting for disk space: not enough disk space"), waiting
    ballast.unlink()
    assert manager.advance_queue() == run_id
    done = poll(lambda: (s := manager.status(run_id))["state"] not in LIVE_STATES and s, STARTUP_S)
    assert done and done["state"] == "finished" and done["error"] is None, done


def test_what_a_live_run_on_other_gpus_will_still_write_is_not_free_for_another(small_disk,
                                                                                 stand_in):
    """Runs on disjoint GPUs may be live together: each used to see the whole free space, and two
    that each fit alone filled the disk between them. (No GPU here: the check every Start, Queue,
    Resume and queue turn makes is asked directly; a GPU run's start would need one.)"""
    on_gpu_0 = tiny_config(devices=1, accelerator="gpu", gpus="0")
    on_gpu_1 = on_gpu_0.with_overrides(gpus="1")
    peak = diskspace.run_files(on_gpu_0).peak
    disk = small_disk(int(1.5 * peak / 2**20))  # room for one run, not two
    runs = disk / "runs"
    manager = RunManager(runs)
    manager._require_room(on_gpu_1, runs)  # alone, it fits
    live = create_run(on_gpu_0, runs_dir=runs, state="running",
                      process=process_record(stand_in.pid, command=["trainer"])).run_id
    with pytest.raises(RunError) as refused:
        manager._require_room(on_gpu_1, runs)
    assert refused.value.args[0].startswith("not enough disk space"), refused.value
    assert f"to be written yet by the live run {live}" in refused.value.args[0]
    # A run on the live run's own GPU (or on all of them) waits for it to end: nothing is held.
    assert manager.space_held(on_gpu_0, runs) == {}
    assert manager.space_held(on_gpu_0.with_overrides(gpus=""), runs) == {}
    # What the live run has saved is on the disk already: it holds only the rest.
    held = manager.space_held(on_gpu_1, runs)[live]
    assert held == diskspace.run_files(on_gpu_0).peak
    (runs / live / "last.ckpt").write_bytes(b"x" * 2**20)
    assert held - manager.space_held(on_gpu_1, runs)[live] == pytest.approx(2**20, abs=8192)
    stand_in.kill()
    stand_in.wait()
    assert manager.space_held(on_gpu_1, runs) == {}  # ended: it writes nothing more
    manager._require_room(on_gpu_1, runs)


def test_a_disk_out_of_inodes_refuses_the_run_however_many_bytes_are_free(small_disk):
    """Each file takes an inode: a disk with 500 MB free and no inodes left passed the space
    check, and the run died at its first new file, "No space left on device"."""
    runs = with_inodes(small_disk(600), 24) / "runs"
    manager = RunManager(runs)
    cfg = tiny_config(num_previews=2, preview_every_n_steps=5, max_steps=40)
    assert free_bytes(runs) > diskspace.run_files(cfg).peak  # room enough, by the bytes
    for call in (manager.enqueue, manager.start):
        with pytest.raises(RunError) as refused:
            call(cfg)
        message = str(refused.value)
        assert message.startswith(f"not enough free inodes (files) on the disk holding {runs}: "
                                  "22 more files fit there, and this run makes about "
                                  f"{diskspace.run_inodes(cfg)}"), message
        assert "Runs tab" in message
    assert manager.list() == []


def test_a_run_that_died_on_a_disk_out_of_inodes_says_so(small_disk, monkeypatch):
    """The disk ran out of inodes under a live run: it read "the trainer process is gone, and its
    status.json cannot be updated ([Errno 28] No space left on device ...)" while df showed
    hundreds of MB free, and the reaper thread printed an uncaught traceback."""
    crashed: list[BaseException] = []
    monkeypatch.setattr(threading, "excepthook", lambda hook: crashed.append(hook.exc_value))
    monkeypatch.setattr(proc, "trainer_command", lambda run_dir, resume=False: ["sleep", "300"])
    disk = with_inodes(small_disk(64), 64)
    manager = RunManager(disk / "runs")
    paths = create_run(tiny_config(), runs_dir=manager.runs_dir, state="starting")
    manager._launch(paths, resume=False)  # a stand-in trainer: it dies here, not of the disk
    pid = read_json(paths.process)["pid"]
    [reaper] = [t for t in threading.enumerate() if t.name == f"reap-{pid}"]
    fillers = use_up_inodes(disk)
    os.kill(pid, signal.SIGKILL)
    reaper.join(10)
    assert not reaper.is_alive() and not crashed, f"the reaper thread raised {crashed!r}"
    status = manager.status(paths.run_id)
    assert status["state"] == "failed"
    assert ("its status.json cannot be updated (no free inodes (files) left on the disk holding "
            f"{paths.root}: no new file fits there, though ") in status["error"], status["error"]
    for filler in fillers[:4]:  # room for a status write, still too few for a run
        filler.unlink()
    status = manager.status(paths.run_id)
    assert status["error"].startswith("the trainer process was killed by SIGKILL before "
                                      "finishing: no free inodes (files) left"), status["error"]
    assert paths.read_status()["error"] == status["error"]  # written down this time


def test_the_trainer_started_by_hand_refuses_it_too(small_disk, run_module):
    run_dir = small_disk(64) / "run"
    done = run_module("mae_core.train", "--run-dir", run_dir, "--model", "vit-tiny",
                      "--image-size", "32", "--patch-size", "8", "--accelerator", "cpu",
                      "--devices", "1", "--max-steps", "2", timeout_s=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "not enough disk space" in done.stderr
    status = RunPaths(run_dir).read_status()
    assert status["state"] == "failed" and status["error"].startswith("not enough disk space")


# --- a disk that fills up while a write is under way --------------------------------------------

def test_a_write_that_fills_the_disk_says_so_and_keeps_the_old_file(small_disk):
    disk = small_disk(8)
    target = disk / "last.ckpt"
    torch.save({"step": 1}, target)
    with pytest.raises(DiskFullError, match="the disk is full while writing") as full:
        atomic_write(target, lambda tmp: torch.save({"w": torch.zeros(4_000_000)}, tmp))
    assert is_disk_full(full.value) and full.value.filename == str(target)
    assert "unexpected pos" in str(full.value.__cause__)  # what torch.save itself says
    assert torch.load(target, weights_only=True) == {"step": 1}
    assert sorted(p.name for p in disk.iterdir()) == ["last.ckpt"]  # no temp file left


def test_other_write_errors_are_not_called_a_full_disk(tmp_path):
    with pytest.raises(ValueError, match="not a disk problem"):
        atomic_write(tmp_path / "x", lambda tmp: (_ for _ in ()).throw(ValueError("not a disk problem")))
    assert not is_disk_full(RuntimeError("enforce fail at inline_container.cc: unexpected pos"))


def test_a_full_disk_mid_run_fails_it_with_that_reason_and_loses_nothing(small_disk):
    """Two real DDP ranks; the disk fills up after a checkpoint, but for less than the weights
    file: the next save is the write that fails, and the trainer has room to say so."""
    disk = small_disk(360)
    manager = RunManager(disk / "runs", stop_timeout_s=30)
    run_id = manager.start(tiny_config())
    paths = manager.paths(run_id)

    def saved_step() -> int | None:
        try:
            return checkpoint_step(paths.last_ckpt)
        except RunError:
            return None

    assert poll(saved_step, STARTUP_S), paths.log_tail()
    files = diskspace.run_files(manager.config(run_id))
    assert paths.last_ckpt.stat().st_size == pytest.approx(files.checkpoint, rel=0.05)
    assert paths.weights.stat().st_size == pytest.approx(files.weights, rel=0.05)

    ballast = fill_between_saves(disk, paths, leave_bytes=8 * 2**20)
    failed = poll(lambda: (s := manager.status(run_id))["state"] not in LIVE_STATES and s, 120)
    assert failed, paths.log_tail()
    assert failed["state"] == "failed"
    assert failed["error"].startswith("the disk is full"), (failed["error"], paths.log_tail())
    kept = checkpoint_step(paths.last_ckpt)
    assert f"{paths.last_ckpt.name} (step {kept}) is intact" in failed["error"]
    assert load_file(paths.weights)  # the Reconstruct tab's weights still load
    assert not [p for p in paths.root.rglob("*.tmp")]

    with pytest.raises(RunError, match="not enough disk space"):
        manager.resume(run_id)
    ballast.unlink()
    manager.resume(run_id, max_steps=kept + CHECKPOINT_EVERY)
    done = poll(lambda: (s := manager.status(run_id))["state"] not in LIVE_STATES and s, STARTUP_S)
    assert done and done["state"] == "finished", paths.log_tail()
    assert checkpoint_step(paths.last_ckpt) == kept + CHECKPOINT_EVERY


def test_a_trainer_that_died_with_no_room_to_say_why_is_said_to_have_filled_the_disk(
        small_disk, stand_in):
    """Any process can be the one to find the disk full (an append of the curve, a rank's log
    line), with no room left for its status: the app says it from the disk it finds."""
    runs = small_disk(4) / "runs"
    manager = RunManager(runs)
    paths = create_run(tiny_config(), runs_dir=runs, state="running",
                       process=process_record(stand_in.pid, command=["sleep"]))
    ballast = fill(runs.parent, leave_bytes=0)
    stand_in.kill()
    stand_in.wait()
    status = manager.status(paths.run_id)  # status.json cannot be written: said, not raised
    assert status["state"] == "failed"
    assert "status.json cannot be updated (the disk is full" in status["error"], status["error"]
    with open(ballast, "r+b") as handle:
        handle.truncate(handle.seek(0, os.SEEK_END) - 256 * 1024)
    status = manager.status(paths.run_id)
    assert status["error"].startswith("the trainer process is gone (killed, or out of memory) "
                                      "before finishing: the disk is full"), status["error"]
    assert paths.read_status()["error"] == status["error"]  # written down this time


@pytest.mark.parametrize("size, text", [(0, "0 bytes"), (999, "999 bytes"), (54_321, "54 KB"),
                                        (999_499, "999 KB"), (999_600, "1.0 MB"),
                                        (812_300_000, "812.3 MB"), (1_270_000_000, "1.27 GB")])
def test_a_size_reads_in_the_unit_a_person_expects(size, text):
    """Forty-five small photos read "0.0 MB on disk"; under a megabyte a size is in KB."""
    from mae_core.diskspace import size_text

    assert size_text(size) == text
