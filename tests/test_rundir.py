"""mae_core.rundir: the fields of status.json, creating a run directory, run ids."""

from __future__ import annotations

import json
import threading

import pytest

from mae_core.config import RunConfig
from mae_core.process import process_record
from mae_core.rundir import STATUS_FIELDS, RunPaths, RunStatus, create_run, valid_run_id


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
