"""Several runs at once on disjoint GPUs (``gpus``); a run on every device, or on the CPU, runs alone.

No GPU here: the live runs are run directories written as the trainer writes them, each followed
through a real (sleeping) process, so the manager's liveness check is the real one.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mae_core import precision as precision_module
from mae_core.config import ConfigError, ModelConfig, RunConfig, TrainConfig
from mae_core.fileio import read_json
from mae_core.process import clean_env, process_record, valid_pid
from mae_core.proctree import kill_group
from mae_core.rundir import create_run
from mae_core.runs import RunManager
from tests.helpers import REPO_ROOT


def gpu_config(gpus: str = "", accelerator: str = "gpu") -> RunConfig:
    return RunConfig(train=TrainConfig(gpus=gpus, accelerator=accelerator))


@pytest.fixture
def live(tmp_path):
    """``live(cfg)``: a run of ``cfg`` that the manager sees running; the processes end after."""
    sleepers: list[subprocess.Popen] = []

    def make(cfg: RunConfig) -> str:
        sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        sleepers.append(sleeper)
        paths = create_run(cfg, runs_dir=tmp_path, state="running",
                           process=process_record(sleeper.pid, command=["trainer"]))
        return paths.run_id

    yield make
    for sleeper in sleepers:
        sleeper.kill()
        sleeper.wait()


def test_runs_on_disjoint_gpus_may_be_live_together(tmp_path, live):
    manager = RunManager(tmp_path)
    first = live(gpu_config("0,1"))
    assert manager.status(first)["state"] == "running"
    assert manager.conflicting_run(gpu_config("2,3")) is None
    second = live(gpu_config("2,3"))
    assert manager.conflicting_run(gpu_config("4")) is None
    assert manager.conflicting_run(gpu_config("1,4")) == first  # GPU 1 is the first run's
    assert manager.conflicting_run(gpu_config("3")) == second


def test_a_run_on_every_device_runs_alone(tmp_path, live):
    manager = RunManager(tmp_path)
    named = live(gpu_config("0"))
    assert manager.conflicting_run(gpu_config("")) == named  # all GPUs include GPU 0
    assert manager.conflicting_run(gpu_config("", accelerator="cpu")) == named
    everything = RunManager(tmp_path / "other")
    whole = create_run(gpu_config(""), runs_dir=tmp_path / "other", state="running",
                       process=process_record(command=["this test"]))  # this process: alive
    assert everything.conflicting_run(gpu_config("5")) == whole.run_id


def test_a_run_is_not_in_its_own_way_when_it_resumes(tmp_path, live):
    manager = RunManager(tmp_path)
    run_id = live(gpu_config("0"))
    assert manager.conflicting_run(gpu_config("0"), exclude=run_id) is None


@pytest.mark.parametrize(("fields", "field", "says"), [
    ({"gpus": "0,0"}, "gpus", "twice"),
    ({"gpus": "0;1"}, "gpus", "separated by commas"),
    ({"gpus": "-1"}, "gpus", "separated by commas"),
    ({"gpus": "0,00"}, "gpus", "separated by commas"),  # GPU 0 twice, in two spellings
    ({"gpus": "01"}, "gpus", "separated by commas"),
    ({"gpus": "\uff10"}, "gpus", "separated by commas"),  # a full-width 0
    ({"gpus": "\u0660,\u0661"}, "gpus", "separated by commas"),  # Arabic-Indic 0 and 1
    ({"gpus": "0", "accelerator": "cpu"}, "gpus", "accelerator is cpu"),
    ({"gpus": "0,1", "devices": 3}, "devices", "make them agree"),
])
def test_bad_gpu_lists_are_refused_naming_the_field(fields, field, says):
    with pytest.raises(ConfigError) as err:
        TrainConfig(**fields)
    assert err.value.field == field and says in str(err.value)


def test_naming_gpus_on_a_machine_without_them_is_refused_before_training(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mae_core.train", "--gpus", "0",
                             "--runs-dir", str(tmp_path)], cwd=REPO_ROOT,
                            env=clean_env(CUDA_VISIBLE_DEVICES=""), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: gpus:" in result.stderr and "0 visible" in result.stderr
    assert not any(tmp_path.iterdir())


def test_a_trainer_gets_the_gpus_it_names_among_those_the_app_sees(tmp_path, monkeypatch):
    """The app started under ``CUDA_VISIBLE_DEVICES=2,3`` sees two GPUs, 0 and 1; a run on
    ``gpus=0,1`` got ``CUDA_VISIBLE_DEVICES=0,1``, two physical GPUs the user had fenced off.
    Read from the launched trainer's own /proc environment (no GPU here: it fails later)."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # what CUDA=2,3 leaves visible
    monkeypatch.setattr(precision_module, "_bf16_ok", lambda: True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    manager = RunManager(tmp_path)
    cfg = RunConfig(model=ModelConfig(image_size=32, patch_size=8),
                    train=TrainConfig(gpus="0,1", max_steps=2, num_previews=0))
    run_id = manager.start(cfg)
    pid = valid_pid((read_json(manager.paths(run_id).process) or {}).get("pid"))
    try:
        assert pid is not None
        env = dict(var.split(b"=", 1) for var in
                   Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in var)
    finally:
        if pid is not None:
            kill_group(pid)
    assert env[b"CUDA_VISIBLE_DEVICES"] == b"2,3"
