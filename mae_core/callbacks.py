"""The trainer's callbacks: what a run writes while it trains, and how it stops.

``ProgressRecorder`` (each optimizer step's line in ``metrics.jsonl``, ``status.json``, MFU),
``StopOnRequest`` (the ``STOP`` file, decided across ranks), ``SaveCheckpoints`` with
``AtomicCheckpointIO`` (checkpoints and weights written beside their target, fsynced, renamed),
``Previews`` (fixed reconstructions every N steps) and ``JsonlLogger`` (per-epoch summaries).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import Logger, TensorBoardLogger
from pytorch_lightning.plugins.io import TorchCheckpointIO
from pytorch_lightning.utilities import rank_zero_only

from mae_core.config import ModelConfig
from mae_core.fileio import append_line, atomic_write, fsync_file, remove_stale_temp_files
from mae_core.flops import training_flops_per_image
from mae_core.hardware import device_peak, mfu
from mae_core.model import MAELightning
from mae_core.reconstruct import grid_image, reconstruct
from mae_core.rundir import RunPaths
from mae_core.weights import save_weights

PREVIEW_SEED = 0


class JsonlLogger(Logger):
    """A Lightning logger that appends one flushed JSON line per log call to ``metrics.jsonl``.

    Lightning's own CSV logger buffers 100 steps; a live curve needs each line on disk at once.
    It carries the per-epoch summaries; the per-step lines are written by :class:`ProgressRecorder`
    itself, before the step's checkpoint (Lightning logs a step only after every callback ran).
    """

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    @property
    def name(self) -> str:
        return "jsonl"

    @property
    def version(self) -> str:
        return "0"

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass  # config.yaml already holds them

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        # Lightning passes the 0-based index of the batch just trained; the file counts completed
        # optimizer steps, as status.json and the checkpoints do.
        row = {"step": (step or 0) + 1, **{k: _plain(v) for k, v in metrics.items()}}
        append_line(self.path, json.dumps(row))


def tensorboard(trainer: pl.Trainer) -> TensorBoardLogger | None:
    """The run's TensorBoard logger, if it has one (the benchmark's runs do not)."""
    return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, torch.Tensor) else value


def optimizer_stepped(trainer: pl.Trainer) -> bool:
    """Whether the batch that just ended closed an optimizer step (in ``on_train_batch_end``).

    Always true without gradient accumulation; with it, only the last batch of each group of
    ``accumulate_grad_batches`` (or of the epoch). Step-keyed work (a metrics line, a checkpoint,
    a preview, the stop check) runs once per optimizer step, not once per micro-batch.
    """
    return not trainer.fit_loop._should_accumulate()


class ProgressRecorder(pl.Callback):
    """Writes loss, lr, throughput and time each step to ``metrics.jsonl`` and keeps
    ``status.json`` current (rank 0).

    The step's line is on disk before :class:`SaveCheckpoints` (a later callback) saves that
    step: a kill between the two then never leaves a checkpoint newer than the curve, so a resume
    finds a line for every step up to the checkpoint's.
    """

    def __init__(self, paths: RunPaths, status_every_s: float = 1.0, log_every_n_steps: int = 1
                 ) -> None:
        self.paths = paths
        self.status_every_s = status_every_s
        self.log_every_n_steps = log_every_n_steps
        self._last_status = 0.0
        self._elapsed_before = 0.0
        self._fit_start = 0.0
        self._step_start = 0.0
        self._step_loss: torch.Tensor | None = None  # accumulation: the step's micro-batches
        self._step_images = 0
        self.flops_per_image: float | None = None  # training FLOPs of one image (rank 0)
        self.peak_flops: float | None = None  # one device's peak FLOP/s (rank 0)
        self._mfu: float | None = None  # the last step's

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:  # once per run, before the clock starts (a first probe: ~1 s)
            self.flops_per_image, self.peak_flops = _flops_and_peak(trainer, pl_module)
        self._fit_start = self._step_start = time.perf_counter()
        if trainer.is_global_zero:
            # A resume continues from the checkpoint's step: later lines of the killed run go.
            self.paths.truncate_metrics(trainer.global_step)
            elapsed = [row["elapsed_s"] for row in self.paths.read_metrics() if "elapsed_s" in row]
            self._elapsed_before = float(elapsed[-1]) if elapsed else 0.0
            dataset = getattr(trainer.datamodule, "dataset", None)
            self.paths.write_status(state="running", pid=os.getpid(), step=trainer.global_step,
                                    total_steps=_total_steps(trainer), epoch=trainer.current_epoch,
                                    world_size=trainer.world_size, error=None, log_tail=None,
                                    images=getattr(dataset, "num_images", None),
                                    skipped_files=getattr(dataset, "skipped", None),
                                    flops_per_image=self.flops_per_image,
                                    peak_flops=self.peak_flops, mfu=None)

    def exclude_time(self, seconds: float) -> None:
        """Leave ``seconds`` of work between steps (an evaluation) out of the next step's
        throughput; the elapsed time still counts them."""
        self._step_start += seconds

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        # Gradient accumulation: called after every micro-batch, whose loss Lightning divides by
        # accumulate_grad_batches; the step's line sums them on the device (the step's mean loss)
        # and counts the images of every micro-batch.
        loss = outputs["loss"].detach()
        self._step_loss = loss if self._step_loss is None else self._step_loss + loss
        self._step_images += batch.shape[0] * trainer.world_size
        if not optimizer_stepped(trainer):
            return
        loss, images, self._step_loss, self._step_images = self._step_loss, self._step_images, None, 0
        now = time.perf_counter()
        row = {"step": trainer.global_step, "epoch": trainer.current_epoch,
               "loss": loss.item(),
               "lr": trainer.optimizers[0].param_groups[0]["lr"],
               "images_per_s": images / max(now - self._step_start, 1e-9),
               "elapsed_s": self._elapsed_before + now - self._fit_start}
        row["mfu"] = self._mfu = mfu(row["images_per_s"], self.flops_per_image, self.peak_flops,
                                     trainer.world_size)
        for name in ("loss", "images_per_s"):  # for status.json; the file gets `row` directly
            pl_module.log(name, row[name], rank_zero_only=True, logger=False)
        if trainer.is_global_zero and trainer.global_step % self.log_every_n_steps == 0:
            append_line(self.paths.metrics, json.dumps(row))
            board = tensorboard(trainer)
            if board is not None:  # the same scalars for `tensorboard --logdir checkpoints`
                board.log_metrics({k: v for k, v in row.items() if k not in ("step", "epoch")
                                   and isinstance(v, (int, float))}, step=row["step"])
        self._step_start = now
        if trainer.is_global_zero and (now - self._last_status >= self.status_every_s):
            self._last_status = now
            self.write_progress(trainer, row["loss"])

    def write_progress(self, trainer: pl.Trainer, loss: float | None = None, **fields: Any) -> None:
        metrics = trainer.callback_metrics
        self.paths.write_status(
            step=trainer.global_step, total_steps=_total_steps(trainer), epoch=trainer.current_epoch,
            loss=loss if loss is not None else _plain(metrics.get("loss")),
            images_per_s=_plain(metrics.get("images_per_s")), mfu=self._mfu,
            elapsed_s=self._elapsed_before + time.perf_counter() - self._fit_start, **fields)


def _flops_and_peak(trainer: pl.Trainer, pl_module: pl.LightningModule
                    ) -> tuple[float | None, float | None]:
    """The model's training FLOPs per image and one device's peak FLOP/s: MFU's two constants.

    The peak comes from :mod:`mae_core.hardware` (on the CPU a matmul probe with this process's
    threads, cached per machine; on a known GPU its datasheet). Neither may stop a run: a failure
    leaves MFU unreported.
    """
    cfg = getattr(pl_module, "cfg", None)
    flops = training_flops_per_image(cfg) if isinstance(cfg, ModelConfig) else None
    try:
        device = pl_module.device
        peak = device_peak(device.type, str(trainer.precision), index=device.index or 0).flops
    except Exception as err:  # noqa: BLE001 - MFU is a report, not a reason to fail the run
        print(f"peak FLOP/s not measured ({type(err).__name__}: {err}): no MFU", flush=True)
        peak = None
    return flops, peak


def _total_steps(trainer: pl.Trainer) -> int:
    if trainer.max_steps > 0:
        return trainer.max_steps
    return int(trainer.estimated_stepping_batches)


class StopOnRequest(pl.Callback):
    """Stops after the current step once the run directory holds a ``STOP`` file.

    Every rank must stop at the same step, so the decision is reduced across ranks (any rank that
    saw the file stops them all); setting ``should_stop`` on one rank alone would hang DDP.
    """

    def __init__(self, paths: RunPaths, recorder: ProgressRecorder) -> None:
        self.paths = paths
        self.recorder = recorder
        self.requested = False

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if not optimizer_stepped(trainer):
            return  # stop on a step boundary (and reduce across ranks once per step)
        seen = self.paths.stop_request.exists()
        if trainer.strategy.reduce_boolean_decision(seen, all=False):
            self.requested = True
            trainer.should_stop = True
            if trainer.is_global_zero:
                self.recorder.write_progress(trainer, state="stopping")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``torch.save`` checkpoints, written beside the target and renamed into place.

    Lightning's own IO writes to a temp file in ``$TMPDIR`` and moves it; where ``$TMPDIR`` is
    another file system (a tmpfs ``/tmp``) the move is a copy that truncates the old checkpoint
    first, and a kill mid-copy leaves a 0-byte ``last.ckpt``. :func:`atomic_write` never does.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


class SaveCheckpoints(pl.Callback):
    """``last.ckpt`` (Lightning, for resume) and ``model.safetensors`` every N steps and at the end.

    Both are written atomically beside their target (:class:`AtomicCheckpointIO`,
    :func:`save_weights`), so a kill never leaves a half-written file; the temp files of a kill are
    removed when the next trainer starts in the run directory.
    """

    def __init__(self, paths: RunPaths, every_n_steps: int) -> None:
        self.paths = paths
        self.every_n_steps = every_n_steps

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.is_global_zero:
            removed = remove_stale_temp_files(self.paths.root)
            if removed:
                print(f"removed {len(removed)} temporary file(s) left by an interrupted save",
                      flush=True)

    def save(self, trainer: pl.Trainer, pl_module: MAELightning) -> None:
        if trainer.is_global_zero and self.paths.metrics.exists():
            fsync_file(self.paths.metrics)  # the curve up to this step survives what the ckpt does
        trainer.save_checkpoint(self.paths.last_ckpt, weights_only=False)  # optimizer too, for resume
        if trainer.is_global_zero:
            save_weights(pl_module.mae, self.paths.weights, step=trainer.global_step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if not optimizer_stepped(trainer):
            return
        if trainer.global_step % self.every_n_steps == 0 and not trainer.should_stop:
            self.save(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.save(trainer, pl_module)


class Previews(pl.Callback):
    """Reconstructions of a fixed set of images on a fixed mask, every N steps: ``previews/step_*.png``."""

    def __init__(self, paths: RunPaths, images: torch.Tensor, every_n_steps: int) -> None:
        self.paths = paths
        self.images = images
        self.every_n_steps = every_n_steps

    @rank_zero_only
    def write(self, trainer: pl.Trainer, pl_module: MAELightning) -> None:
        if len(self.images) == 0:
            return
        results = reconstruct(pl_module.mae, self.images, seed=PREVIEW_SEED)
        image = grid_image(results, size=max(96, pl_module.cfg.image_size))
        target = self.paths.previews / f"step_{trainer.global_step:07d}.png"
        atomic_write(target, lambda tmp: image.save(tmp, format="PNG"))
        board = tensorboard(trainer)
        if board is not None:
            board.experiment.add_image("previews", np.asarray(image), trainer.global_step,
                                       dataformats="HWC")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step == 0:
            self.write(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if optimizer_stepped(trainer) and trainer.global_step % self.every_n_steps == 0:
            self.write(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not (self.paths.previews / f"step_{trainer.global_step:07d}.png").exists():
            self.write(trainer, pl_module)
