"""What a run saves to resume: ``last.ckpt`` (Lightning's, optimizer and step) and
``model.safetensors`` (the weights, for the Reconstruct tab and export), every N steps, at a stop
and at the end, each written beside its target, fsynced and renamed (:class:`AtomicCheckpointIO`,
:func:`~mae_core.weights.save_weights`)."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO

from mae_core.callbacks import ProgressRecorder, optimizer_stepped
from mae_core.fileio import atomic_write, fsync_file, remove_stale_temp_files
from mae_core.model import MAELightning
from mae_core.rundir import RunPaths
from mae_core.weights import save_weights


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
        atomic_write(path, lambda tmp: _save_to(checkpoint, tmp))


def _save_to(checkpoint: dict[str, Any], tmp: str) -> None:
    """``torch.save`` through a file this code closes: on a full disk, torch's own writer (given a
    path) kept its descriptor open after failing, so the removed temp file still held its blocks
    until the process exited, and status.json found no room to say why the run failed."""
    with open(tmp, "wb") as handle:
        torch.save(checkpoint, handle)


class SaveCheckpoints(pl.Callback):
    """``last.ckpt`` (Lightning, for resume) and ``model.safetensors`` every N steps and at the end.

    Both are written atomically beside their target (:class:`AtomicCheckpointIO`,
    :func:`save_weights`), so a kill never leaves a half-written file; the temp files of a kill are
    removed when the next trainer starts in the run directory.
    """

    def __init__(self, paths: RunPaths, every_n_steps: int,
                 recorder: ProgressRecorder | None = None) -> None:
        self.paths = paths
        self.every_n_steps = every_n_steps
        self.recorder = recorder  # its pending lines go to disk before the checkpoint
        self._saved_step: int | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.is_global_zero:
            removed = remove_stale_temp_files(self.paths.root)
            if removed:
                print(f"removed {len(removed)} temporary file(s) left by an interrupted save",
                      flush=True)

    def save(self, trainer: pl.Trainer, pl_module: MAELightning) -> None:
        if self.recorder is not None:
            self.recorder.flush(trainer)
        if trainer.is_global_zero and self.paths.metrics.exists():
            fsync_file(self.paths.metrics)  # the curve up to this step survives what the ckpt does
        # Weights first: a kill between the two writes then leaves weights at or ahead of the
        # checkpoint, never a resumable run with no (or older) weights for the Reconstruct tab.
        if trainer.is_global_zero:
            save_weights(pl_module.mae, self.paths.weights, step=trainer.global_step)
        trainer.save_checkpoint(self.paths.last_ckpt, weights_only=False)  # optimizer too, for resume

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if not optimizer_stepped(trainer):
            return
        step = trainer.global_step
        # A stop (StopOnRequest runs first) and the last of max_steps are saved here, mid-epoch,
        # as the periodic checkpoints are. Saved in on_train_end, after Lightning has closed the
        # epoch, the checkpoint named the next epoch: a resume skipped the rest of the stopped one,
        # and a run trained by epochs finished steps short.
        if step % self.every_n_steps == 0 or trainer.should_stop or step == trainer.max_steps:
            self.save(trainer, pl_module)
            self._saved_step = step

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._saved_step != trainer.global_step:  # the last epoch ended (max_epochs)
            self.save(trainer, pl_module)
