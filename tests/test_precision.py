"""Precision: what "auto" picks on this CPU, what is refused, and that bf16 trains like fp32.

The bf16 run is real: Lightning's ``bf16-mixed`` on the CPU wraps ``training_step`` in
``torch.autocast("cpu", dtype=torch.bfloat16)`` (its ``MixedPrecision.forward_context``), and the
test checks that the model's layers really compute in bf16 while the weights stay fp32.
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import pytorch_lightning as pl
import torch

from mae_core import precision as precision_module
from mae_core.config import ConfigError, ModelConfig, RunConfig, TrainConfig
from mae_core.precision import CPU_BF16_FLAGS
from mae_core.rundir import create_run
from mae_core.train import run_training

STEPS = 20


def _cpu(precision: str | None = None) -> RunConfig:
    return RunConfig(train=TrainConfig(accelerator="cpu", devices=1, precision=precision))


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="no /proc/cpuinfo (not Linux)")
def test_detection_reads_the_cpus_own_flags():
    with open("/proc/cpuinfo", encoding="utf-8") as file:
        words = set(file.read().split())
    flags = [name for name in CPU_BF16_FLAGS if name in words]
    # AMX first: the faster of the two where a CPU has both.
    assert precision_module.cpu_bf16_feature() == (flags[0] if flags else None)


def test_auto_precision_on_the_cpu_follows_native_bf16(monkeypatch):
    native = precision_module.cpu_bf16_feature() is not None
    assert _cpu().resolved().train.precision == ("bf16-mixed" if native else "32-true")
    # Both answers of the detection, on this machine's real resolution code:
    monkeypatch.setattr(precision_module, "cpu_bf16_feature", lambda: "amx_bf16")
    assert _cpu().resolved().train.precision == "bf16-mixed"
    assert _cpu("bf16-mixed").resolved().train.precision == "bf16-mixed"
    assert _cpu("32-true").resolved().train.precision == "32-true"
    monkeypatch.setattr(precision_module, "cpu_bf16_feature", lambda: None)
    assert _cpu().resolved().train.precision == "32-true"


def test_bf16_without_native_support_and_fp16_on_the_cpu_are_refused(monkeypatch):
    monkeypatch.setattr(precision_module, "cpu_bf16_feature", lambda: None)
    with pytest.raises(ConfigError) as err:
        _cpu("bf16-mixed").resolved()
    assert err.value.field == "precision"
    assert "natively" in str(err.value) and "avx512_bf16" in str(err.value)
    assert "32-true" in str(err.value)
    for feature in (None, "avx512_bf16"):
        monkeypatch.setattr(precision_module, "cpu_bf16_feature", lambda feature=feature: feature)
        with pytest.raises(ConfigError) as err:
            _cpu("16-mixed").resolved()
        assert err.value.field == "precision" and "GPU" in str(err.value)


class _ComputeDtypes(pl.Callback):
    """Records the dtype each training forward of the decoder embedding produced."""

    def __init__(self) -> None:
        self.dtypes: set[torch.dtype] = set()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            if module.training:  # not the previews (eval, outside autocast)
                self.dtypes.add(output.dtype)

        pl_module.mae.decoder_embed.register_forward_hook(hook)


def _run(tmp_path, precision: str) -> tuple[list[float], set[torch.dtype], torch.dtype]:
    base = RunConfig(model=ModelConfig(preset="vit-tiny", image_size=32, patch_size=8,
                                       norm_pix_loss=True),
                     # lr 1e-3 (base_lr × 4 / 256): the loss falls within these few steps.
                     train=TrainConfig(batch_size=4, base_lr=0.064, max_steps=STEPS,
                                       accelerator="cpu", devices=1,
                                       precision="32-true", num_previews=0,
                                       checkpoint_every_n_steps=STEPS, seed=3)).resolved()
    # Set after resolved(): the comparison runs on any CPU, through Lightning's real bf16 path,
    # even where resolved() would refuse bf16 (emulated there, slower but numerically the same).
    cfg = RunConfig(model=base.model, train=dataclasses.replace(base.train, precision=precision))
    paths = create_run(cfg, runs_dir=tmp_path / precision)
    probe = _ComputeDtypes()
    assert run_training(cfg, paths, extra_callbacks=[probe]) == 0
    rows = [json.loads(line) for line in paths.metrics.read_text().splitlines()]
    losses = [row["loss"] for row in rows if "lr" in row]
    weights = torch.load(paths.last_ckpt, map_location="cpu", weights_only=True)["state_dict"]
    return losses, probe.dtypes, weights["mae.decoder_embed.weight"].dtype


def test_a_short_bf16_run_ends_at_the_loss_of_fp32(tmp_path):
    fp32, fp32_dtypes, _ = _run(tmp_path, "32-true")
    bf16, bf16_dtypes, bf16_weights = _run(tmp_path, "bf16-mixed")
    assert fp32_dtypes == {torch.float32}
    assert bf16_dtypes == {torch.bfloat16}  # autocast really ran the layers in bf16 ...
    assert bf16_weights == torch.float32  # ... on fp32 master weights
    assert len(fp32) == len(bf16) == STEPS
    assert bf16[0] == pytest.approx(fp32[0], abs=0.01)  # same seed, data and masks
    end32, end16 = sum(fp32[-5:]) / 5, sum(bf16[-5:]) / 5
    assert end32 < fp32[0] - 0.05  # the runs learned, so agreeing at the end means something
    assert end16 == pytest.approx(end32, rel=0.02), (fp32, bf16)
