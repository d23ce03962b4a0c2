"""The run's loggers: ``metrics.jsonl`` (the app's source, one flushed line per log call) and
TensorBoard with every scalar at the optimizer steps completed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import Logger, TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only

from mae_core.fileio import append_line


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


class BoardLogger(TensorBoardLogger):
    """TensorBoard with Lightning's own scalars (``epoch_loss``, ``epoch``) at the optimizer steps
    completed, as ``metrics.jsonl`` and this project's step scalars count them.

    Lightning passes the 0-based index of the batch just trained: the epoch's mean sat one step
    before the last step it averages, beside step scalars counted from 1.
    """

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        super().log_metrics(metrics, None if step is None else step + 1)


def tensorboard(trainer: pl.Trainer) -> TensorBoardLogger | None:
    """The run's TensorBoard logger, if it has one (the benchmark's runs do not)."""
    return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)


def board_scalars(board: TensorBoardLogger, row: dict[str, Any]) -> None:
    """A metrics.jsonl row's numbers on the board, at its own step (already counted from 1, so
    not through :class:`BoardLogger`'s shift)."""
    TensorBoardLogger.log_metrics(board, {k: v for k, v in row.items() if k not in ("step", "epoch")
                                          and isinstance(v, (int, float))}, step=row["step"])


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, torch.Tensor) else value
