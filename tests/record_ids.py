"""``python -m tests.record_ids IDS_DIR [mae_core.train flags]``: the trainer, each rank appending the
sample ids (and crop boxes) of every step it trains to ``IDS_DIR/rank<global rank>.jsonl``.

A real process (Lightning's DDP re-executes this same command for the other ranks, which then
record too); it only wraps :meth:`StreamingMAEDataModule.on_before_batch_transfer`, which sees each
batch once, just before the step that trains on it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from mae_core import crops, shards, train
from mae_core.process import exit_quickly

_original = shards.StreamingMAEDataModule.on_before_batch_transfer
_original_box = crops.DecodeAugment.draw_box
_BOXES: list[list[int]] = []  # the crop boxes this process drew since the last batch


def _recording_box(self, width, height):
    box = _original_box(self, width, height)
    _BOXES.append(list(box))
    return box


def _recording(self, batch, dataloader_idx):
    images = _original(self, batch, dataloader_idx)
    trainer = self.trainer
    line = {"step": trainer.global_step, "epoch": trainer.current_epoch,
            "ids": [int(i) for i in self.last_ids],
            "boxes": _BOXES[:], "torch_seed": torch.initial_seed(),
            "decoded_here": "jpeg" in batch}  # decode_on_device: the step's process decoded
    _BOXES.clear()
    with open(Path(sys.argv[1]) / f"rank{trainer.global_rank}.jsonl", "a") as out:
        out.write(json.dumps(line) + "\n")
    return images


if __name__ == "__main__":
    shards.StreamingMAEDataModule.on_before_batch_transfer = _recording
    crops.DecodeAugment.draw_box = _recording_box
    Path(sys.argv[1]).mkdir(parents=True, exist_ok=True)
    exit_quickly(train.main(sys.argv[2:]))
