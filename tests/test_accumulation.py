"""Gradient accumulation: the learning-rate rule uses the effective batch, and a real run steps the
optimizer once per ``accumulate_grad_batches`` batches, writing one metrics line per optimizer step."""

from __future__ import annotations

import itertools
import json

import pytest
import pytorch_lightning as pl
import torch

from mae_core.config import ConfigError, ModelConfig, RunConfig, TrainConfig
from mae_core.rundir import create_run
from mae_core.train import run_training


def test_learning_rate_follows_batch_times_processes_times_accumulation():
    t = TrainConfig(batch_size=8, devices=2, num_nodes=2, accumulate_grad_batches=4, base_lr=1e-4)
    assert t.effective_batch_size == 8 * 4 * 4
    assert t.learning_rate() == pytest.approx(1e-4 * 128 / 256)
    # The paper's 4,096 from 8 GPUs × 64 images × 8 accumulated batches: lr = 1.5e-4 × 16.
    paper = TrainConfig(batch_size=64, devices=8, accumulate_grad_batches=8)
    assert paper.effective_batch_size == 4096
    assert paper.learning_rate() == pytest.approx(2.4e-3)
    assert TrainConfig(batch_size=8).learning_rate() == TrainConfig(
        batch_size=4, accumulate_grad_batches=2).learning_rate()


@pytest.mark.parametrize("value", [0, -1, 1025, 1.5, True, "2", None])
def test_accumulation_outside_1_to_1024_is_refused_naming_the_field(value):
    with pytest.raises(ConfigError) as err:
        TrainConfig(accumulate_grad_batches=value)
    assert err.value.field == "accumulate_grad_batches"
    assert TrainConfig(accumulate_grad_batches=1024).accumulate_grad_batches == 1024


class _Batches(pl.Callback):
    """Per batch: the step counter after it, its loss as Lightning reports it, and the loss the
    model's ``training_step`` returned."""

    def __init__(self) -> None:
        self.global_steps: list[int] = []
        self.losses: list[float] = []
        self.step_losses: list[float] = []
        self.optimizer_steps = 0
        self.batches_per_epoch = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.batches_per_epoch = int(trainer.num_training_batches)
        training_step = pl_module.training_step

        def recorded(*args: object, **kwargs: object) -> torch.Tensor:
            loss = training_step(*args, **kwargs)
            self.step_losses.append(float(loss.detach()))
            return loss

        pl_module.training_step = recorded

    def on_before_optimizer_step(self, *args: object) -> None:
        self.optimizer_steps += 1

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: dict,
                           *args: object) -> None:
        self.global_steps.append(trainer.global_step)
        self.losses.append(float(outputs["loss"]))


def test_a_run_with_accumulate_2_steps_once_per_2_batches_and_ends_at_max_steps(tmp_path):
    accumulate, steps, batch = 2, 3, 4
    cfg = RunConfig(model=ModelConfig(preset="vit-tiny", image_size=32, patch_size=8),
                    train=TrainConfig(batch_size=batch, accumulate_grad_batches=accumulate,
                                      max_steps=steps, accelerator="cpu", devices=1,
                                      precision="32-true", num_previews=0,
                                      checkpoint_every_n_steps=1)).resolved()
    paths = create_run(cfg, runs_dir=tmp_path)
    probe = _Batches()
    torch.backends.cudnn.benchmark = False
    assert run_training(cfg, paths, extra_callbacks=[probe]) == 0
    # fixed shapes: the trainer lets cuDNN time its conv algorithms and keep the fastest (GPU runs)
    assert torch.backends.cudnn.benchmark

    assert probe.global_steps == [0, 1, 1, 2, 2, 3]  # one optimizer step per 2 batches
    assert probe.optimizer_steps == steps
    # A small data set is repeated to whole accumulation cycles: 4 optimizer steps per epoch.
    assert probe.batches_per_epoch == 4 * accumulate
    status = paths.read_status()
    assert status["state"] == "finished" and status["step"] == steps
    ckpt = torch.load(paths.last_ckpt, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == steps
    assert ckpt["lr_schedulers"][0]["last_epoch"] == steps  # the schedule counts optimizer steps

    rows = [json.loads(line) for line in paths.metrics.read_text().splitlines()]
    step_rows = [row for row in rows if "lr" in row]
    assert [row["step"] for row in step_rows] == [1, 2, 3]  # one line per optimizer step
    for i, row in enumerate(step_rows):
        # Lightning reports each micro-batch's loss divided by the accumulation: the line holds
        # their sum, the step's mean loss, not the last micro-batch's share.
        assert row["loss"] == pytest.approx(sum(probe.losses[2 * i:2 * i + 2]), rel=1e-5)
        # ... the mean of the losses the model computed, not half of it
        assert row["loss"] == pytest.approx(sum(probe.step_losses[2 * i:2 * i + 2]) / 2, rel=1e-5)
    assert probe.losses == pytest.approx([loss / 2 for loss in probe.step_losses], rel=1e-5)
    for before, row in itertools.pairwise(step_rows):
        # images/s × the step's duration (both from the same clock reads) is every image of
        # every micro-batch of the step.
        images = row["images_per_s"] * (row["elapsed_s"] - before["elapsed_s"])
        assert images == pytest.approx(batch * accumulate, rel=1e-6)


def test_two_process_ddp_accumulates_without_a_static_graph(run_module, tmp_path):
    """DDP skips the all-reduce of the first micro-batch (no_sync); a static graph cannot follow
    that (torch's reducer asserts), so accumulation turns it off and plain DDP trains."""
    result = run_module("mae_core.train", "--model", "vit-tiny", "--image-size", "32",
                        "--patch-size", "8", "--batch-size", "4", "--accumulate-grad-batches", "2",
                        "--max-steps", "2", "--devices", "2", "--accelerator", "cpu",
                        "--precision", "32-true", "--num-previews", "0",
                        "--runs-dir", tmp_path / "runs")
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]  # not .runs.lock
    status = json.loads((run_dir / "status.json").read_text())
    assert (status["state"], status["step"], status["world_size"]) == ("finished", 2, 2)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "lr" in row] == [1, 2]
