"""The run's loggers (mae_core/loggers.py): metrics.jsonl gets one line per log call, on disk at
once, counting completed optimizer steps; TensorBoard gets Lightning's scalars at that same count
and a metrics.jsonl row's numbers at the row's own step."""

from __future__ import annotations

import json
from types import SimpleNamespace

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mae_core.loggers import BoardLogger, JsonlLogger, board_scalars, tensorboard


def test_each_log_call_is_a_line_on_disk_at_once_counting_completed_steps(tmp_path):
    path = tmp_path / "metrics.jsonl"
    logger = JsonlLogger(path)
    logger.log_metrics({"loss": torch.tensor(0.5), "lr": 1e-3}, step=4)  # the 5th batch trained
    assert json.loads(path.read_text()) == {"step": 5, "loss": 0.5, "lr": 1e-3}  # no flush needed
    logger.log_metrics({"epoch_loss": 0.25, "epoch": 0}, step=None)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows[1] == {"step": 1, "epoch_loss": 0.25, "epoch": 0}
    assert isinstance(rows[0]["loss"], float)  # a tensor is written as its number


def test_the_board_counts_steps_as_metrics_jsonl_does(tmp_path):
    jsonl = JsonlLogger(tmp_path / "metrics.jsonl")
    board = BoardLogger(save_dir=str(tmp_path), name="tensorboard", version="",
                        default_hp_metric=False)
    assert tensorboard(SimpleNamespace(loggers=[jsonl, board])) is board
    assert tensorboard(SimpleNamespace(loggers=[jsonl])) is None  # the benchmark's runs
    board.log_metrics({"epoch_loss": 0.5}, step=3)  # Lightning's 0-based batch index
    board_scalars(board, {"step": 7, "epoch": 1, "loss": 0.25, "note": "text"})  # from 1 already
    board.experiment.flush()
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert [(e.step, e.value) for e in events.Scalars("epoch_loss")] == [(4, 0.5)]
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(7, 0.25)]
    assert set(events.Tags()["scalars"]) == {"epoch_loss", "loss"}  # no step, epoch or text
