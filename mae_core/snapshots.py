"""The run's weights history: the last K weight snapshots, ``<run>/snapshots/step_*.safetensors``.

:class:`WeightSnapshots` (a trainer callback, rank 0) saves the model at step 0, every N steps
(the checkpoint cadence) and at the end, then deletes all but the newest ``keep``;
:func:`list_snapshots` reads them back, and :func:`history_image` picks the fixed image that the
Reconstruct tab's step slider reconstructs with each of them (issue 14, item 5).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only

from mae_core.callbacks import EveryNSteps
from mae_core.fileio import atomic_write
from mae_core.rundir import RunPaths, snapshot_step
from mae_core.weights import WeightsError, read_metadata, save_weights


def list_snapshots(run_root: Path) -> list[tuple[int, Path]]:
    """(step, path) of the run's weight snapshots, oldest first (temp files and others ignored)."""
    try:
        found = [(step, p) for p in RunPaths(Path(run_root)).snapshots.iterdir()
                 if (step := snapshot_step(p)) is not None]
    except OSError:  # no folder yet (or it went): no snapshots
        return []
    return sorted(found)


def nearest_snapshot(snapshots: list[tuple[int, Path]], step: float) -> tuple[int, Path] | None:
    """The snapshot whose step is closest to ``step`` (the later one on a tie)."""
    if not snapshots:
        return None
    return min(reversed(snapshots), key=lambda item: abs(item[0] - step))


def history_image(train: Any, image_size: int, channels: int = 3, source: Any = None
                  ) -> tuple[str, torch.Tensor]:
    """(name, uint8 or uint16 (C, S, S)) of the image a run's history is shown on: its first
    held-out image (never trained on) when it holds some out, else its first preview photo.

    ``source`` is the run's recorded data set (:func:`mae_core.datasource.read_run_data`): a run
    that streamed a prepared set held nothing out (the trainer splits in-memory folders only),
    and its images are read from the set, not from a folder.
    """
    from mae_core.data import DataError, preview_images
    from mae_core.splits import fixed_crops
    from mae_core.monitor import plan_evaluation

    streamed = source is not None and source.kind != "memory"
    try:
        held_out = () if streamed else plan_evaluation(train).val
    except DataError:
        held_out = ()
    for path in held_out[:8]:
        images, kept = fixed_crops([path], image_size, channels)
        if kept:
            return f"{os.path.basename(path)} (held out)", images[0]
    if streamed and source.kind == "remote":
        raise DataError(f"the run streamed the remote data set {source.source}: its weights "
                         "history is shown on a local image, and it has none")
    if streamed:
        from mae_core.datasource import source_previews

        images = source_previews(source, image_size, 1, channels)
    else:
        images = preview_images(train.data, image_size, 1, channels)
    if len(images) == 0:
        raise DataError("the run's data folder has no readable image left")
    return "the run's first preview photo (trained on)", images[0]


class WeightSnapshots(EveryNSteps):
    """Saves ``model.safetensors``-style snapshots at step 0, every ``every_n_steps`` and at the
    end, keeping the newest ``keep`` (atomic writes; rank 0)."""

    def __init__(self, run_root: Path, keep: int, every_n_steps: int) -> None:
        self.paths = RunPaths(Path(run_root))
        self.keep = keep
        self.every_n_steps = every_n_steps

    @rank_zero_only
    def save(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        target = self.paths.snapshot(step)
        if not self._link_weights(step, target):
            save_weights(pl_module.mae, target, step=step)
        for _, old in list_snapshots(self.paths.root)[:-self.keep]:
            old.unlink(missing_ok=True)

    def _link_weights(self, step: int, target: Path) -> bool:
        """Hard-link ``model.safetensors`` when SaveCheckpoints (an earlier callback) has just
        written this step's weights: no second write. Its next save renames a new file over it,
        so the snapshot keeps this content. False where it is another step or links fail."""
        weights = self.paths.weights
        try:
            if read_metadata(weights).get("step") != str(step):
                return False

            def link(tmp: str) -> None:
                os.unlink(tmp)
                os.link(weights, tmp)

            atomic_write(target, link)
        except (WeightsError, OSError):
            return False
        return True

    def act(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.save(trainer, pl_module)  # step 0: the freshly initialised model, the history's "before"

    def done_at(self, step: int) -> bool:
        return self.paths.snapshot(step).exists()
