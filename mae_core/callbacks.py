"""The trainer's callbacks: what a run writes while it trains, and how it stops.

``ProgressRecorder`` (each optimizer step's line in ``metrics.jsonl``, ``status.json``, MFU),
``StopOnRequest`` (the ``STOP`` file, decided across ranks) and ``Previews`` (fixed
reconstructions every N steps); what a run saves to resume is :mod:`mae_core.checkpointing`, the
loggers are :mod:`mae_core.loggers`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.utilities import rank_zero_only

from mae_core.config import ModelConfig
from mae_core.fileio import (
    append_lines,
    atomic_write,
    atomic_write_text,
    read_regular_bytes,
)
from mae_core.flops import training_flops_per_image
from mae_core.hardware import device_peak, mfu
from mae_core.loggers import board_scalars, tensorboard
from mae_core.model import MAELightning
from mae_core.reconstruct import grid_image, reconstruct
from mae_core.rundir import RunPaths, RunState
from mae_core.slurm import note_requeue_signal, on_slurm, requeue_signal_seen

# Flushed rows the status panel's images/s, MFU and ETA are the median and pace of.
RECENT_ROWS = 20
# A progress line on rank 0's stdout at most this often (the terminal of a run started by hand,
# the app's train.log): the trainer printed no loss at all, only Lightning's start-up lines.
SAY_EVERY_S = 30.0

PREVIEW_SEED = 0


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

    The step never waits for the device: each step's loss stays a device tensor until the rows are
    flushed, once a second (``flush_every_s``), before a checkpoint and at the end, with one read
    for all of them. (A per-step ``loss.item()`` stalls a GPU: the host can no longer queue the
    next step while the device runs this one, and measured on an H200 that halved throughput.)
    :class:`SaveCheckpoints` flushes before it saves, so a kill between the two never leaves a
    checkpoint newer than the curve: a resume finds a line for every step up to the checkpoint's.
    """

    def __init__(self, paths: RunPaths, status_every_s: float = 1.0, log_every_n_steps: int = 1,
                 flush_every_s: float = 1.0, say_every_s: float = SAY_EVERY_S) -> None:
        self.paths = paths
        self.say_every_s = say_every_s
        self._last_said = -math.inf  # the first flushed step is said: the run has started
        self.status_every_s = status_every_s
        self.log_every_n_steps = log_every_n_steps
        self.flush_every_s = flush_every_s
        self._last_status = 0.0
        self._last_flush = 0.0
        self._elapsed_before = 0.0
        self._fit_start = 0.0
        self._step_start = 0.0
        self._step_loss: torch.Tensor | None = None  # accumulation: the step's micro-batches
        self._step_images = 0
        self._step_lr: float | None = None
        self._pending: list[tuple[dict[str, Any], torch.Tensor]] = []  # rows, their device loss
        self.last_row: dict[str, Any] | None = None  # the last flushed row (rank 0)
        # The last flushed rows (rank 0): the status panel's speed and ETA are theirs, not the
        # last step's alone (one step's rate swung 131 → 8 → 31 images/s on a busy machine).
        self._recent: deque[dict[str, Any]] = deque(maxlen=RECENT_ROWS)
        self.flops_per_image: float | None = None  # training FLOPs of one image (rank 0)
        self.peak_flops: float | None = None  # one device's peak FLOP/s (rank 0)
        self._own: dict[str, Any] = {}  # the status fields this trainer owns while it lives
        self._config_text = ""  # config.yaml as the run started (rank 0)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:  # once per run, before the clock starts (a first probe: ~1 s)
            self.flops_per_image, self.peak_flops = _flops_and_peak(trainer, pl_module)
        self._fit_start = self._step_start = self._last_flush = time.perf_counter()
        if trainer.is_global_zero:
            # A resume continues from the checkpoint's step: later lines of the killed run go.
            self._elapsed_before = self.paths.truncate_metrics(trainer.global_step)
            dataset = getattr(trainer.datamodule, "dataset", None)
            self._own = {"state": RunState.RUNNING, "pid": os.getpid(),
                         "world_size": trainer.world_size,
                         "images": getattr(dataset, "num_images", None),
                         "skipped_files": getattr(dataset, "skipped", None),
                         "flops_per_image": self.flops_per_image, "peak_flops": self.peak_flops}
            self._config_text = _text_or_empty(self.paths.config)  # none: a bare trainer
            before = self.paths.read_status()  # the last session's, until written below
            if trainer.global_step > 0 and (note := data_shrink_note(
                    before, self._own["images"], self._own["skipped_files"])):
                print(note, file=sys.stderr, flush=True)  # the app's log view shows the trainer's
            created = before.get("created")
            if created is not None:
                self._own["created"] = created
            self.paths.write_status(step=trainer.global_step, total_steps=_total_steps(trainer),
                                    epoch=trainer.current_epoch, error=None, log_tail=None,
                                    requeued_job=None, mfu=None, step_at=None, **self._own)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        # The rate this step trains at, read before it: Lightning steps the scheduler before
        # on_train_batch_end, where the line used to read the next step's (the warm-up's first
        # rate never showed, and the last step always read 0).
        if self._step_loss is None:  # the step's first micro-batch
            self._step_lr = trainer.optimizers[0].param_groups[0]["lr"]

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
        # Host clock reads: summed over the steps between two flushes they are the wall time.
        images_per_s = images / max(now - self._step_start, 1e-9)
        self._step_start = now
        if not trainer.is_global_zero or trainer.global_step % self.log_every_n_steps:
            return
        row = {"step": trainer.global_step, "epoch": trainer.current_epoch,
               "lr": self._step_lr, "images_per_s": images_per_s,
               "elapsed_s": self._elapsed_before + now - self._fit_start,
               "mfu": mfu(images_per_s, self.flops_per_image, self.peak_flops, trainer.world_size)}
        self._pending.append((row, loss))
        if now - self._last_flush >= self.flush_every_s:
            self.flush(trainer)

    def flush(self, trainer: pl.Trainer) -> None:
        """Write the pending rows (one read of their losses from the device) and ``status.json``."""
        now = time.perf_counter()
        self._last_flush = now
        if not trainer.is_global_zero or not self._pending:
            return
        losses = torch.stack([loss.float() for _, loss in self._pending]).tolist()
        rows = [{**row, "loss": value} for (row, _), value in zip(self._pending, losses)]
        self._pending = []
        append_lines(self.paths.metrics, [json.dumps(_ordered(row)) for row in rows])
        board = tensorboard(trainer)
        if board is not None:  # the same scalars for `tensorboard --logdir checkpoints`
            for row in rows:
                board_scalars(board, row)
        self.last_row = rows[-1]
        self._recent.extend(rows)
        if now - self._last_said >= self.say_every_s:
            self._last_said = now
            print(progress_line(rows[-1], _total_steps(trainer)), flush=True)
        if now - self._last_status >= self.status_every_s:
            self._last_status = now
            self.write_progress(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning logs the epoch's mean loss right after this hook: the step lines go first,
        # so metrics.jsonl stays in step order (an incremental reader relies on it).
        self.flush(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.flush(trainer)

    def write_progress(self, trainer: pl.Trainer, **fields: Any) -> None:
        """status.json with the latest figures, and again what this trainer said of itself at the
        start (its state first): a status.json damaged or rewritten while it trains (by hand, or
        by an app that took it for dead) is made whole by the next write, not left "failed" with
        a live trainer behind it."""
        if "state" in fields:
            self._own["state"] = fields["state"]
        if self._config_text and not self.paths.config.is_file():
            # Without it the folder is no run to the app: unlisted, unstoppable, and another run
            # could start on the devices this one holds.
            atomic_write_text(self.paths.config, self._config_text)
        images_per_s = _median([row["images_per_s"] for row in self._recent])
        self.paths.write_status(
            step=trainer.global_step, total_steps=_total_steps(trainer), epoch=trainer.current_epoch,
            loss=(self.last_row or {}).get("loss"), images_per_s=images_per_s,
            mfu=mfu(images_per_s, self.flops_per_image, self.peak_flops, trainer.world_size)
            if images_per_s is not None else None, step_s=_pace(self._recent),
            elapsed_s=self._elapsed_before + time.perf_counter() - self._fit_start,
            step_at=time.time(), **{**self._own, **fields})


def progress_line(row: dict[str, Any], total_steps: int) -> str:
    """One metrics row as a line for a person: "step 16/60  loss 1.0673  lr 2.4e-06  89.6
    images/s  epoch 9"."""
    step = f"{row['step']:,}/{total_steps:,}" if total_steps > 0 else f"{row['step']:,}"
    lr = row.get("lr")
    rate = row.get("images_per_s")
    return (f"step {step}  loss {row['loss']:.4f}"
            + (f"  lr {lr:.2g}" if lr is not None else "")
            + (f"  {rate:,.1f} images/s" if rate is not None else "")
            + f"  epoch {row['epoch']}")


def _median(values: list[float]) -> float | None:
    return float(np.median(values)) if values else None


def _pace(rows: deque[dict[str, Any]]) -> float | None:
    """Wall seconds per step over ``rows`` (evaluations and data waits included), or None."""
    if len(rows) < 2 or rows[-1]["step"] <= rows[0]["step"]:
        return None
    return (rows[-1]["elapsed_s"] - rows[0]["elapsed_s"]) / (rows[-1]["step"] - rows[0]["step"])


def data_shrink_note(status: dict[str, Any], images: int | None,
                     skipped: int | None) -> str | None:
    """A resumed run's word on data that lost files since the run last trained (its status's
    ``images`` and ``skipped_files`` of then, the training part alone as now): it trains on what
    is left, which read as the same data."""
    before = status.get("images")
    if images is None or type(before) is not int:
        return None
    before += status.get("skipped_files") if type(status.get("skipped_files")) is int else 0
    now = images + (skipped or 0)
    if now >= before:
        return None
    return (f"warning: the data now holds {now:,} image files to train on, {before - now:,} fewer "
            f"than the {before:,} this run last read; the resumed run trains on the {images:,} left")


def _text_or_empty(path: Path) -> str:
    try:
        return read_regular_bytes(path).decode()
    except (OSError, UnicodeDecodeError):
        return ""


_ROW_ORDER = ("step", "epoch", "loss", "lr", "images_per_s", "elapsed_s", "mfu")


def _ordered(row: dict[str, Any]) -> dict[str, Any]:
    """The row's keys in the file's usual order (readers do not care; people reading it do)."""
    return {**{k: row[k] for k in _ROW_ORDER if k in row}, **row}


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
    """Stops after the current step once the run directory holds a ``STOP`` file or a rank got
    Ctrl-C (``requested``), or once a rank got SIGTERM (``docker stop``, a shutdown, ``kill``,
    ``timeout``: ``terminated``). The stop saves that step's checkpoint (:class:`SaveCheckpoints`).

    Every rank must stop at the same step, so the decision is reduced across ranks (any rank that
    saw the file or the signal stops them all); setting ``should_stop`` on one rank alone would
    hang DDP. The reduction runs over gloo on host tensors: on GPUs a side group, so the check
    never waits for the device (an NCCL reduction read back on the host would, every step).

    SIGTERM and SIGINT are only noted in their handlers. Lightning's own SIGTERM handler
    broadcasts from inside the signal, and that broadcast met the other rank's gradient
    all-reduce: a group SIGTERM hung the run until gloo's 10-minute timeout. Its per-step
    broadcast of the flag (a device sync every step on GPUs) has nothing left to carry, and is
    switched off.

    Under SLURM, the requeue signal (``sbatch --signal=USR1@90``) stops the run the same way
    (``requeue``; :mod:`mae_core.slurm`), not Lightning's handler, which saved inside the signal.
    """

    def __init__(self, paths: RunPaths, recorder: ProgressRecorder) -> None:
        self.paths = paths
        self.recorder = recorder
        self.requested = False
        self.terminated = False
        self.signalled = False  # SIGTERM reached this rank
        self.interrupted = False  # Ctrl-C (SIGINT) did
        self.requeue = False  # SLURM's requeue signal stopped the run
        self._slurm = False  # a SLURM job Lightning knows (SIGUSR1 is its requeue signal)
        self._group: Any = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Every rank creates the group at the same point (new_group is collective).
        if _distributed(trainer) and dist.get_backend() != "gloo":
            self._group = dist.new_group(backend="gloo")
        self._take_signals(trainer)
        # A stop asked while the run started (the other ranks' start-up, their rendezvous, the
        # model's set-up) ends it before its first step, which it used to train first.
        (asked,) = self._any_rank(trainer, self.paths.stop_requested())
        if asked:
            self.requested = True
            trainer.should_stop = True
            if trainer.is_global_zero:
                self.recorder.write_progress(trainer, state=RunState.STOPPING)

    def _take_signals(self, trainer: pl.Trainer) -> None:
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return  # signals reach the main thread only (a trainer run from a test's thread)
        launcher = trainer.strategy.launcher

        def noted(signum: int, frame: Any) -> None:
            self.signalled = True
            if launcher is not None:  # the ranks it started, sent SIGTERM to rank 0 alone
                launcher.kill(signum)

        def interrupted(signum: int, frame: Any) -> None:
            # Ctrl-C is a Stop; pressed again, the usual KeyboardInterrupt at once.
            self.interrupted = True
            signal.signal(signal.SIGINT, signal.default_int_handler)

        # Lightning puts back the handlers it found when fit ends, so these go with its own.
        signal.signal(signal.SIGTERM, noted)
        signal.signal(signal.SIGINT, interrupted)
        self._slurm = on_slurm(trainer)
        if self._slurm:
            signal.signal(signal.SIGUSR1, note_requeue_signal)
        epoch_loop = trainer.fit_loop.epoch_loop
        if hasattr(epoch_loop, "_broadcast_sigterm_tensor"):
            epoch_loop._broadcast_sigterm_tensor = lambda: None

    def _any_rank(self, trainer: pl.Trainer, *seen: bool) -> tuple[bool, ...]:
        if not _distributed(trainer):
            return seen
        flags = torch.tensor([int(s) for s in seen], dtype=torch.int32)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._group)
        return tuple(bool(f) for f in flags.tolist())  # a host tensor: no device wait

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if not optimizer_stepped(trainer):
            return  # stop on a step boundary (and reduce across ranks once per step)
        requested, terminated, requeue = self._any_rank(
            trainer, self.interrupted or self.paths.stop_requested(), self.signalled,
            self._slurm and requeue_signal_seen())
        if requested or terminated or requeue:
            self.requested, self.terminated, self.requeue = requested, terminated, requeue
            trainer.should_stop = True
            if trainer.is_global_zero:
                self.recorder.flush(trainer)
                self.recorder.write_progress(trainer, state=RunState.STOPPING)


def _distributed(trainer: pl.Trainer) -> bool:
    return trainer.world_size > 1 and dist.is_available() and dist.is_initialized()


class EveryNSteps(pl.Callback):
    """Does :meth:`act` for the untrained model (step 0), every ``every_n_steps`` optimizer steps
    and once more at the end, unless :meth:`done_at` says that step's is already there: the
    cadence of the previews, the held-out evaluation and the weight snapshots."""

    every_n_steps: int

    def act(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        raise NotImplementedError

    def done_at(self, step: int) -> bool:
        raise NotImplementedError

    _start_step: int | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start_step = trainer.global_step
        if trainer.global_step == 0 and not trainer.should_stop:  # a stop before the first step
            self.act(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any
                           ) -> None:
        if optimizer_stepped(trainer) and trainer.global_step % self.every_n_steps == 0:
            self.act(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.should_stop and trainer.global_step == self._start_step:
            return  # stopped before its first step: nothing new to show, the stop is not delayed
        if not self.done_at(trainer.global_step):
            self.act(trainer, pl_module)


class Previews(EveryNSteps):
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
        target = self.paths.preview(trainer.global_step)
        atomic_write(target, lambda tmp: image.save(tmp, format="PNG"))
        board = tensorboard(trainer)
        if board is not None:
            board.experiment.add_image("previews", np.asarray(image), trainer.global_step,
                                       dataformats="HWC")

    def act(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.write(trainer, pl_module)

    def done_at(self, step: int) -> bool:
        return self.paths.preview(step).exists()
