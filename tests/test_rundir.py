"""mae_core.rundir: the fields of status.json, creating a run directory, run ids."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from helpers import resume_state
from mae_core import display
from mae_core.config import ConfigError, RunConfig
from mae_core.evaluate import read_result
from mae_core.fileio import read_json
from mae_core.process import process_record
from mae_core.lastckpt import checkpoint_step
from mae_core.rundir import (RUN_ID_RULE, STATUS_FIELDS, RunError, RunPaths, RunStatus,
                             create_run, preview_step, snapshot_step, valid_run_id)
from mae_core.weights import WeightsError, read_metadata


def small_config(**overrides) -> RunConfig:
    return RunConfig().with_overrides(devices=1, accelerator="cpu", max_steps=9,
                                      **overrides).resolved()


def test_status_json_holds_only_the_fields_run_status_defines(tmp_path):
    paths = RunPaths(tmp_path / "run")
    paths.root.mkdir()
    written = paths.write_status(state="running", step=3, loss=0.5)
    assert written["run_id"] == "run" and written["updated"] > 0
    with pytest.raises(ValueError, match="no field lossy"):
        paths.write_status(lossy=1.0)  # a typo is a bug, caught where it is made
    with pytest.raises(ValueError, match="state must be one of"):
        paths.write_status(state="paused")
    assert paths.read_status()["step"] == 3 and "lossy" not in paths.read_status()
    record = paths.read_record()
    assert (record.state, record.step, record.loss, record.error) == ("running", 3, 0.5, None)

    # A file from another version: unknown keys are dropped on read and on the next write, and
    # the status stays a plain dict holding only what is stored.
    paths.status.write_text(json.dumps({"state": "stopped", "step": 4, "legacy": True}))
    assert paths.read_status() == {"state": "stopped", "step": 4}
    paths.write_status(epoch=1)
    assert "legacy" not in json.loads(paths.status.read_text())
    assert RunStatus.from_dict({"state": "failed", "extra": 1}).state == "failed"
    assert {"state", "step", "total_steps", "loss", "error", "log_tail", "created", "preset",
            "policy", "run_id", "world_size", "images", "skipped_files", "updated",
            "resumed_from_step", "data_files"} <= STATUS_FIELDS


def test_a_trainers_status_stays_fresh_between_steps_and_keeps_what_the_trainer_wrote(tmp_path):
    """An app on another node judges a run by status.json's time alone: a trainer there that
    was preparing its data set (hours for a large folder), or on a step slower than 10 minutes,
    was marked failed while it ran, and offered for a Resume that would train it twice."""
    import time

    from helpers import poll
    from mae_core.runs import RunManager

    runs = tmp_path / "runs"
    paths = create_run(small_config(), runs_dir=runs, state="running",
                       process=process_record(command=["train"]) | {"host": "another-node"})
    status = read_json(paths.status) | {"updated": time.time() - 700}  # silent for too long
    paths.status.write_text(json.dumps(status))
    stop = paths.keep_status_fresh(every_s=0.05)
    try:
        assert poll(lambda: time.time() - paths.read_status()["updated"] < 5, 10)
        assert RunManager(runs).status(paths.run_id)["state"] == "running"
        for step in range(1, 41):  # the trainer's own writes, meanwhile: none is lost
            paths.write_status(step=step)
        paths.write_status(state="finished")
        time.sleep(0.2)  # a few beats more
        assert (paths.read_status()["state"], paths.read_status()["step"]) == ("finished", 40)
    finally:
        stop.set()


def test_missing_status_reads_as_failed(tmp_path):
    paths = RunPaths(tmp_path / "run")
    assert paths.read_status()["state"] == "failed"


def test_a_damaged_status_breaks_neither_its_run_nor_the_listing_of_the_others(tmp_path):
    """A hand-edited or damaged status.json (a date as text, a list as the state, a string as the
    time) made every listing, the Runs table and Compare raise for all runs."""
    from mae_core.runs import RunManager

    good = create_run(small_config(), runs_dir=tmp_path)
    damaged = create_run(small_config(), runs_dir=tmp_path)
    damaged.status.write_text(json.dumps({
        "state": ["running"], "created": "yesterday", "elapsed_s": "x", "step": 2.5,
        "loss": float("nan"), "images_per_s": True, "error": 5, "world_size": "2", "pid": None}))
    status = damaged.read_status()
    assert status["state"] == "failed" and "damaged" in status["error"] and "running" in status["error"]
    assert not {"created", "elapsed_s", "step", "images_per_s", "world_size"} & set(status)
    assert "pid" in status and status["loss"] != status["loss"]  # no process; a diverged loss
    listed = RunManager(tmp_path).list()
    assert {s["run_id"] for s in listed} == {good.run_id, damaged.run_id}
    assert RunStatus.from_dict(damaged.read_status()).step == 0
    good.status.write_text(json.dumps({"state": "stopped", "step": 7, "loss": 0.25,
                                       "created": 1.5e9, "elapsed_s": 12}))
    assert good.read_status() == {"state": "stopped", "step": 7, "loss": 0.25, "created": 1.5e9,
                                  "elapsed_s": 12}


def test_create_run_writes_status_then_config_under_a_fresh_name(tmp_path):
    cfg = small_config()
    paths = create_run(cfg, runs_dir=tmp_path / "runs", data_files=17)
    status = paths.read_status()
    assert status["state"] == "starting" and status["step"] == 0 and status["total_steps"] == 9
    assert status["created"] > 0 and status["data_files"] == 17
    assert status["preset"] == cfg.model.preset and status["world_size"] == 1
    assert RunConfig.load(paths.config) == cfg
    assert not paths.process.exists()  # the manager records the process once it launched it
    assert paths.run_id.endswith(f"{cfg.model.preset}-{cfg.model.policy}")
    with pytest.raises(ValueError, match="no field"):
        create_run(cfg, runs_dir=tmp_path / "runs", bogus=1)


def test_create_run_in_a_named_directory_records_the_trainer_first(tmp_path):
    record = process_record(command=["python", "-m", "mae_core.train"])
    paths = create_run(small_config(), run_dir=tmp_path / "shared" / "mae-base", process=record)
    assert paths.run_id == "mae-base"
    assert json.loads(paths.process.read_text())["pid"] == record["pid"]
    assert paths.config.stat().st_mtime_ns >= paths.process.stat().st_mtime_ns


def test_runs_created_at_the_same_moment_get_different_directories(tmp_path):
    cfg = small_config()
    made: list[str] = []
    barrier = threading.Barrier(8)

    def create() -> None:
        barrier.wait()
        made.append(create_run(cfg, runs_dir=tmp_path).run_id)

    threads = [threading.Thread(target=create) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(made) == 8 and len(set(made)) == 8
    assert all(RunPaths(tmp_path / run_id).read_status()["state"] == "starting" for run_id in made)


@pytest.mark.parametrize("run_id, ok", [
    ("20261126-141502-vit-tiny-ddp-clean", True), ("mae-base", True), ("run.2", True),
    ("x" * 255, True), ("x" * 256, False), ("x" * 5000, False), ("", False), (".", False),
    ("..", False), ("../etc", False), ("a/b", False), (".hidden", False), ("a\x00b", False),
    ("-rf", False), (None, False), (7, False),
])
def test_run_ids_are_plain_directory_names(run_id, ok):
    assert valid_run_id(run_id) is ok


def test_the_run_id_rule_in_words_says_what_valid_run_id_accepts():
    listed = RUN_ID_RULE.split(" (not first: ")[0].split("digits and ")[1].split()
    not_first = RUN_ID_RULE.split("(not first: ")[1].split(")")[0].split()
    assert all(valid_run_id(f"a{char}b") for char in listed)
    assert not any(valid_run_id(f"{char}b") for char in not_first)
    assert valid_run_id("_b") and "_" not in not_first and "255 bytes" in RUN_ID_RULE


def test_run_file_names_stay_what_existing_runs_hold(tmp_path):
    """Renaming any of them would orphan the files of every run already on disk."""
    paths = RunPaths(tmp_path)
    names = {name: getattr(paths, name).relative_to(tmp_path).as_posix() for name in (
        "config", "status", "process", "metrics", "log", "last_ckpt", "weights", "data_record",
        "tensorboard", "previews", "snapshots", "evaluation", "encoder", "metrics_csv",
        "stop_request")}
    assert names == {
        "config": "config.yaml", "status": "status.json", "process": "process.json",
        "metrics": "metrics.jsonl", "log": "train.log", "last_ckpt": "last.ckpt",
        "weights": "model.safetensors", "data_record": "data.json", "tensorboard": "tensorboard",
        "previews": "previews", "snapshots": "snapshots", "evaluation": "evaluation.json",
        "encoder": "encoder.safetensors", "metrics_csv": "metrics.csv", "stop_request": "STOP"}
    assert paths.preview(40) == tmp_path / "previews" / "step_0000040.png"
    assert paths.snapshot(40) == tmp_path / "snapshots" / "step_0000040.safetensors"


def test_preview_and_snapshot_names_give_back_their_step(tmp_path):
    paths = RunPaths(tmp_path)
    assert preview_step(paths.preview(0)) == 0 and preview_step(paths.preview(12345678)) == 12345678
    assert snapshot_step(paths.snapshot(150)) == 150
    assert preview_step("step_000010.png") == 10  # an older or hand-made width reads too
    for other in ("step_0000010.safetensors", ".step_0000010.png.123.abcd1234.tmp", "step_.png",
                  "step_x.png", "notes.png", "step_0000010.png.bak"):
        assert preview_step(other) is None, other
    assert snapshot_step(paths.preview(10)) is None


def test_a_folder_is_a_run_once_it_holds_a_config_file(tmp_path):
    paths = RunPaths(tmp_path / "run")
    assert not paths.is_run()  # no folder at all
    paths.config.mkdir(parents=True)
    assert not paths.is_run()  # a folder named config.yaml is no config
    paths.config.rmdir()
    paths.config.write_text("model: {}\n")
    assert paths.is_run()


def test_numbers_no_reader_can_handle_are_dropped_from_the_status(tmp_path):
    """A 400-digit elapsed time or a step of 10**30 made the Runs table and the live view raise
    OverflowError (int too large to convert to float); True is no count."""
    paths = create_run(small_config(), runs_dir=tmp_path)
    paths.status.write_text(
        '{"state": "running", "elapsed_s": ' + "9" * 400 + ', "step": ' + str(10**30)
        + ', "total_steps": 1e400, "created": -1e300, "images": true, "epoch": 3, "loss": NaN,'
        ' "updated": 1.7e9, "peak_flops": 4e15, "flops_per_image": 2e9}')
    status = paths.read_status()
    assert not {"elapsed_s", "step", "total_steps", "created", "images"} & set(status)
    assert status["state"] == "running" and status["epoch"] == 3 and status["updated"] == 1.7e9
    assert status["peak_flops"] == 4e15 and status["flops_per_image"] == 2e9  # an H200's FP8 peak
    assert status["loss"] != status["loss"]  # a diverged loss stays: it is news
    assert display.format_duration(status.get("elapsed_s")) == "–"
    assert display.progress_fraction(status) is None and display.format_steps(status) == "0"
    paths.status.write_text(json.dumps({"state": "stopped", "loss": 1e30, "step": 10**15}))
    assert paths.read_status() == {"state": "stopped", "loss": 1e30, "step": 10**15}


def _lightning_checkpoint(path: Path, step: int = 3) -> None:
    """A checkpoint shaped like the trainer's: a real model's weights, written by its CheckpointIO."""
    import pytorch_lightning as pl

    from mae_core.checkpointing import AtomicCheckpointIO
    from mae_core.config import ModelConfig
    from mae_core.model import MaskedAutoencoder

    model = MaskedAutoencoder(ModelConfig(image_size=32, patch_size=8))
    AtomicCheckpointIO().save_checkpoint({
        "epoch": 0, "global_step": step, "pytorch-lightning_version": pl.__version__,
        "state_dict": model.state_dict(), "loops": {}, "callbacks": {},
        **resume_state()}, path)


def test_a_checkpoint_with_overwritten_bytes_is_corrupt(tmp_path):
    """4 KiB of random bytes in the middle of last.ckpt were accepted: torch.load memory-maps the
    tensors and never reads them, so Resume would have trained on damaged weights."""
    path = tmp_path / "run" / "last.ckpt"
    _lightning_checkpoint(path, step=3)
    assert checkpoint_step(path) == 3
    whole = bytearray(path.read_bytes())
    middle = len(whole) // 2
    whole[middle:middle + 4096] = os.urandom(4096)
    path.write_bytes(bytes(whole))
    with pytest.raises(RunError, match=r"corrupt \(archive/data/\d+ fails its CRC check"):
        checkpoint_step(path)


def test_a_torch_file_that_is_no_lightning_checkpoint_is_refused(tmp_path):
    """``torch.save({"global_step": 2})`` was accepted; the resumed run then failed with
    KeyError: 'pytorch-lightning_version'."""
    import torch

    path = tmp_path / "run" / "last.ckpt"
    path.parent.mkdir()
    for stranger in ({"global_step": 2}, [1, 2], {"global_step": 2, "state_dict": {}}):
        torch.save(stranger, path)
        with pytest.raises(RunError, match="is not a checkpoint of this run.*pytorch-lightning_"
                                           "version"):
            checkpoint_step(path)


def _without_blocking(read: Callable[[], Any], fifo: Path, timeout_s: float = 20.0) -> Any:
    """``read()``'s value, or its exception's type, got in a forked child; the test fails if it
    blocks on ``fifo``. Not a thread: safetensors blocks in open() holding the GIL, which would
    hang the test run itself."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_send_outcome, args=(read, send), daemon=True)
    child.start()
    child.join(timeout_s)
    if child.is_alive():
        child.kill()
        child.join()
        pytest.fail(f"reading {fifo.name} blocked on the FIFO in its place")
    return receive.recv()


def _send_outcome(read: Callable[[], Any], send: Any) -> None:
    try:
        send.send(read())
    except Exception as err:  # noqa: BLE001 - its type goes back to the test
        send.send(type(err))


# Each run-folder file's reader, and what it gives when that file is missing: a FIFO in its place
# reads the same (a value, or an exception of this type).
FIFO_READERS: dict[str, tuple[Callable[[RunPaths], Any], Any]] = {
    "train.log": (lambda paths: paths.log_tail(), ""),
    "metrics.jsonl": (lambda paths: paths.read_metrics(), []),
    "status.json": (lambda paths: paths.read_status()["error"],
                    "status.json is missing or unreadable"),
    "process.json": (lambda paths: read_json(paths.process), None),
    "evaluation.json": (lambda paths: read_result(paths.root), None),
    "config.yaml": (lambda paths: RunConfig.load(paths.config), ConfigError),
    "model.safetensors": (lambda paths: read_metadata(paths.weights), WeightsError),
    "last.ckpt": (lambda paths: checkpoint_step(paths.last_ckpt), RunError),
}


@pytest.mark.parametrize("name", sorted(FIFO_READERS))
def test_a_fifo_in_a_run_folder_reads_as_no_file_instead_of_blocking(tmp_path, name):
    """A FIFO in place of train.log hung whoever read its tail: the log view forever, and the run
    manager, which reads it under its lock, the whole app. Every run-folder reader is checked."""
    paths = create_run(small_config(), runs_dir=tmp_path)
    fifo = paths.root / name
    fifo.unlink(missing_ok=True)
    os.mkfifo(fifo)
    read, expected = FIFO_READERS[name]
    got = _without_blocking(lambda: read(paths), fifo)
    if isinstance(expected, type):
        assert isinstance(got, type) and issubclass(got, expected), got
    else:
        assert got == expected, got


def test_a_run_file_replaced_by_a_folder_or_a_folder_by_a_file_is_refused_before_any_trainer(
        tmp_path, run_module):
    """What a person put in place of a run's file or folder (a folder named model.safetensors, a
    file named previews, a link for metrics.jsonl) refuses Resume, the trainer's --resume, Export
    and the CSV in words, and nothing is written. A resumed trainer used to be launched into it
    and failed at its first save or preview, the steps since lost; Export and the CSV said
    "Internal error: IsADirectoryError"."""
    from mae_core.runs import RunManager
    from ui.common import AppContext, UserError
    from ui.compare import metrics_csv

    runs = tmp_path / "runs"
    done = run_module("mae_core.train", "--runs-dir", runs, "--image-size", "32", "--patch-size",
                      "8", "--batch-size", "8", "--max-steps", "2", "--devices", "1",
                      "--accelerator", "cpu", "--num-previews", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    manager = RunManager(runs)
    [status] = manager.list()
    paths = manager.paths(status["run_id"])
    before = paths.status.read_bytes()
    for name, folder, said in (("model.safetensors", False, "is a folder (a file belongs there)"),
                               ("metrics.jsonl", False, "is a link (a file belongs there)"),
                               ("previews", True, "is a file (a folder belongs there)")):
        place = paths.root / name
        aside = place.rename(tmp_path / name)
        if name == "metrics.jsonl":
            place.symlink_to(aside)
        elif folder:
            place.write_text("")
        else:
            place.mkdir()
        with pytest.raises(RunError, match=f"cannot be resumed: `{name}` {re.escape(said)}"):
            manager.resume(paths.run_id, max_steps=4)
        by_hand = run_module("mae_core.train", "--run-dir", paths.root, "--resume",
                             "--max-steps", "4")
        assert by_hand.returncode == 2 and f"`{name}` {said}" in by_hand.stderr, by_hand.stderr
        if place.is_dir() and not place.is_symlink():
            place.rmdir()
        else:
            place.unlink()
        aside.rename(place)
    assert paths.status.read_bytes() == before  # no trainer was launched, nothing recorded
    ctx = AppContext(manager)
    paths.encoder.mkdir()
    paths.metrics_csv.mkdir()
    with pytest.raises(RunError, match="`encoder.safetensors` is a folder where the file goes"):
        manager.export(paths.run_id)
    with pytest.raises(UserError, match="`metrics.csv` of .* is a folder where the file goes"):
        metrics_csv(ctx, paths.run_id)


def test_a_resumes_cut_of_a_million_step_curve_reads_it_a_line_at_a_time(tmp_path):
    """A resume drops the lines after its checkpoint's step. It read the whole metrics.jsonl as
    dicts, twice (for the time trained before): a million-step run's 120 MB file cost rank 0
    1.1 GB and ~20 s at each resume, before its first step. Here 200,000 lines, in a process of
    its own whose peak memory is measured."""
    import subprocess
    import sys

    paths = RunPaths(tmp_path / "run")
    paths.root.mkdir()
    line = '{{"step": {0}, "epoch": 0, "loss": 0.5, "lr": 0.0001, "elapsed_s": {0}.5}}\n'
    with open(paths.metrics, "w") as out:
        out.writelines(line.format(step) for step in range(200_000))
        out.write("not json\n")
    # VmHWM, not ru_maxrss: that keeps the peak of the forked pytest across the exec.
    script = ("import re, sys; from pathlib import Path; from mae_core.rundir import RunPaths\n"
              "def peak(): return int(re.search(r'VmHWM:\\s*(\\d+)', "
              "Path('/proc/self/status').read_text())[1])\n"
              "before = peak()\n"
              "elapsed = RunPaths(Path(sys.argv[1])).truncate_metrics(int(sys.argv[2]))\n"
              "print(elapsed, (peak() - before) // 1024)\n")
    for last, lines in ((300_000, 200_001), (150_000, 150_001)):
        done = subprocess.run([sys.executable, "-c", script, str(paths.root), str(last)],
                              capture_output=True, text=True, timeout=120,
                              cwd=Path(__file__).resolve().parent.parent)
        assert done.returncode == 0, done.stderr
        elapsed, grown_mb = done.stdout.split()
        assert int(grown_mb) < 32, f"the cut grew its process by {grown_mb} MB"
        assert float(elapsed) == min(last, 199_999) + 0.5
        kept = paths.metrics.read_text().splitlines()
        assert len(kept) == lines  # nothing to cut: the file is left as it was, "not json" too
    assert kept[-1] == line.format(150_000).rstrip("\n")  # copied as written
    assert [row["step"] for row in paths.read_metrics(149_998)] == [149_999, 150_000]
