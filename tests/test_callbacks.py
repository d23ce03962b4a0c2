"""The trainer's per-step callbacks never wait for the device, and still lose no line of the curve."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import pytorch_lightning as pl
import torch

from mae_core.callbacks import (
    ProgressRecorder,
    StopOnRequest,
    progress_line,
)
from mae_core.checkpointing import SaveCheckpoints
from mae_core.config import ModelConfig
from mae_core.loggers import JsonlLogger
from mae_core.data import MAEDataModule
from mae_core.model import MAELightning, warmup_cosine
from mae_core.rundir import RunPaths
from mae_core.weights import read_metadata
from tests.helpers import SYNC_OPS, TensorCalls

SMALL = ModelConfig(preset="vit-tiny", image_size=32, patch_size=8)
NEVER = 1e9  # seconds: no flush by the clock within a test


class Watched(pl.Callback):
    """Runs another callback's step hooks under :class:`TensorCalls`."""

    def __init__(self, inner: pl.Callback) -> None:
        self.inner = inner
        self.calls = TensorCalls()

    def on_train_start(self, *args: Any) -> None:
        self.inner.on_train_start(*args)

    def on_train_batch_start(self, *args: Any) -> None:
        with self.calls:
            self.inner.on_train_batch_start(*args)

    def on_train_batch_end(self, *args: Any) -> None:
        with self.calls:
            self.inner.on_train_batch_end(*args)


class LossProbe(pl.Callback):
    """Each step's loss as training_step returned it, and the curve's lines at each checkpoint."""

    def __init__(self, paths: RunPaths) -> None:
        self.paths = paths
        self.losses: list[float] = []
        self.lines_at_step: dict[int, int] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, *args: Any
                           ) -> None:
        self.losses.append(outputs["loss"].item())
        if self.paths.last_ckpt.exists() and trainer.global_step not in self.lines_at_step:
            self.lines_at_step[trainer.global_step] = len(self.paths.read_metrics())


def _fit(paths: RunPaths, callbacks: list[pl.Callback], steps: int, logger: Any = False
         ) -> pl.Trainer:
    paths.root.mkdir(parents=True, exist_ok=True)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=logger,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=callbacks)
    trainer.fit(MAELightning(model=SMALL.__dict__, lr=1e-3, warmup_fraction=0.0),
                datamodule=MAEDataModule("", SMALL.image_size, 4, 0))
    return trainer


def test_the_step_callbacks_read_nothing_back_from_the_device_between_flushes(tmp_path):
    """Writing the curve and checking for STOP queue nothing that waits for the device; the
    losses are read once, at the flush, and every step's line holds its own loss."""
    paths = RunPaths(tmp_path / "run")
    recorder = ProgressRecorder(paths, flush_every_s=NEVER)
    watched = [Watched(recorder), Watched(StopOnRequest(paths, recorder))]
    probe = LossProbe(paths)
    _fit(paths, [*watched, recorder_end(recorder), probe], steps=5)
    for watch in watched:
        assert not set(watch.calls.names) & SYNC_OPS, watch.calls.names
    rows = [row for row in paths.read_metrics() if "lr" in row]
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5]
    assert [row["loss"] for row in rows] == [
        torch.tensor(loss).item() for loss in probe.losses]  # float32 values, as the loss was
    assert all(math.isfinite(row["images_per_s"]) and row["images_per_s"] > 0 for row in rows)
    status = json.loads(paths.status.read_text())
    assert status["loss"] == rows[-1]["loss"] and status["step"] == 5
    # Each line's lr is the rate its step trained at (5 steps, no warm-up, cosine from 1e-3). It
    # used to be the next step's: the first rate never showed and the last line always read 0.
    assert [row["lr"] for row in rows] == pytest.approx(
        [1e-3 * warmup_cosine(step - 1, warmup=0, total=5) for step in range(1, 6)])
    assert rows[-1]["lr"] > 0


def test_rank_0_prints_a_progress_line_at_the_first_flush_then_by_the_clock(tmp_path, capsys):
    """A run started by hand printed no loss at all: Lightning's start-up lines, then nothing."""
    paths = RunPaths(tmp_path / "run")
    recorder = ProgressRecorder(paths, flush_every_s=0.0, say_every_s=NEVER)
    _fit(paths, [recorder], steps=3)
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    first = next(row for row in paths.read_metrics() if "lr" in row)
    assert said == [progress_line(first, 3)]  # once: the next is 30 s away
    assert said[0].startswith(f"step 1/3  loss {first['loss']:.4f}  lr ")
    assert progress_line({"step": 1200, "epoch": 3, "loss": 0.5, "lr": None,
                          "images_per_s": None}, -1) == "step 1,200  loss 0.5000  epoch 3"


def recorder_end(recorder: ProgressRecorder) -> pl.Callback:
    """The recorder's own end-of-training flush (the watched wrapper forwards the step hooks only)."""

    class End(pl.Callback):
        def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
            recorder.on_train_end(trainer, pl_module)

    return End()


def test_a_checkpoint_never_gets_ahead_of_the_curve(tmp_path):
    """With no flush by the clock, the lines up to a checkpoint's step are on disk when it lands."""
    paths = RunPaths(tmp_path / "run")
    recorder = ProgressRecorder(paths, flush_every_s=NEVER)
    probe = LossProbe(paths)
    _fit(paths, [recorder, SaveCheckpoints(paths, 2, recorder), probe], steps=4)
    assert probe.lines_at_step[2] == 2 and probe.lines_at_step[4] == 4
    assert len(paths.read_metrics()) == 4


class WeightsAtCheckpoint(pl.Callback):
    """The step of ``model.safetensors`` at the moment each checkpoint is being written."""

    def __init__(self, paths: RunPaths) -> None:
        self.paths = paths
        self.seen: dict[int, str | None] = {}

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: Any, checkpoint: dict) -> None:
        step = read_metadata(self.paths.weights).get("step") if self.paths.weights.exists() else None
        self.seen[trainer.global_step] = step


def test_the_weights_are_on_disk_before_their_checkpoint(tmp_path):
    """A kill between the two writes never leaves a resumable run without this step's weights."""
    paths = RunPaths(tmp_path / "run")
    probe = WeightsAtCheckpoint(paths)
    _fit(paths, [SaveCheckpoints(paths, 2), probe], steps=4)
    assert probe.seen == {2: "2", 4: "4"}


def test_the_curve_stays_in_step_order_across_epoch_ends(tmp_path):
    """The epoch's mean loss is logged after the epoch's step lines, not before the pending ones
    (an incremental reader of metrics.jsonl keeps its place by step)."""
    paths = RunPaths(tmp_path / "run")
    recorder = ProgressRecorder(paths, flush_every_s=NEVER)
    _fit(paths, [recorder], steps=12, logger=JsonlLogger(paths.metrics))
    rows = paths.read_metrics()
    assert any("epoch_loss" in row for row in rows[:-1]), "an epoch ended within the run"
    steps = [row["step"] for row in rows]
    assert steps == sorted(steps)
    assert [row["step"] for row in rows if "loss" in row] == list(range(1, 13))


def test_a_stop_asked_while_the_run_started_trains_no_step(tmp_path):
    """A Stop that came between the data and the first step (the other ranks' start-up, their
    rendezvous) used to be seen only after that step, which was trained first. It now ends the
    run before any, with a checkpoint at its step that Resume continues."""
    paths = RunPaths(tmp_path / "run")
    paths.root.mkdir(parents=True)
    paths.request_stop()
    recorder = ProgressRecorder(paths, log_every_n_steps=1)
    stopper = StopOnRequest(paths, recorder)
    trainer = _fit(paths, [recorder, stopper, SaveCheckpoints(paths, 100, recorder)], steps=5,
                   logger=JsonlLogger(paths.metrics))
    assert trainer.global_step == 0 and stopper.requested
    assert paths.read_metrics() == []
    assert torch.load(paths.last_ckpt, weights_only=True)["global_step"] == 0
    assert paths.read_status()["state"] == "stopping"  # the trainer's end writes "stopped"
