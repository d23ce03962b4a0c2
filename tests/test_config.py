"""What "auto" resolves to: the hardware defaults a run is saved with (config.yaml says what ran)."""

from __future__ import annotations

import os

import pytest
import torch

from mae_core import config as config_module
from mae_core.config import ConfigError, ModelConfig, RunConfig, TrainConfig


def test_without_gpus_cpu_ddp_over_at_least_two_processes_in_full_precision(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # a no-op here; hides a GPU elsewhere
    cfg = RunConfig().resolved()
    cores = os.cpu_count() or 1
    assert cfg.train.accelerator == "cpu" and cfg.train.precision == "32-true"
    assert cfg.train.devices == (1 if cores < 2 else max(2, cores // 2))
    assert cfg.train.num_workers == 0  # decoded images are cached; the cores go to the ranks
    assert cfg.train.find_unused_parameters is False  # ddp-clean: plain DDP
    reference = RunConfig(model=ModelConfig(policy="reference")).resolved()
    assert reference.train.find_unused_parameters is True

    with pytest.raises(ConfigError) as err:
        RunConfig(train=TrainConfig(accelerator="gpu")).resolved()
    assert err.value.field == "accelerator"
    with pytest.raises(ConfigError) as err:
        RunConfig(train=TrainConfig(precision="bf16-mixed")).resolved()
    assert err.value.field == "precision"


def test_with_gpus_every_gpu_in_bf16(monkeypatch):
    # No GPU is lent to CI: only the detection is stood in for, the resolution logic is real.
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(config_module, "_bf16_ok", lambda: True)
    cfg = RunConfig().resolved()
    assert (cfg.train.accelerator, cfg.train.devices, cfg.train.precision) == ("gpu", 4, "bf16-mixed")
    assert RunConfig(train=TrainConfig(devices=2)).resolved().train.devices == 2
    with pytest.raises(ConfigError) as err:
        RunConfig(train=TrainConfig(devices=8)).resolved()
    assert err.value.field == "devices"
    monkeypatch.setattr(config_module, "_bf16_ok", lambda: False)  # e.g. a V100
    assert RunConfig().resolved().train.precision == "32-true"
