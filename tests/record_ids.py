"""``python -m tests.record_ids IDS_DIR [mae_core.train flags]``: the trainer, each rank appending the
sample ids of every step it trains to ``IDS_DIR/rank<global rank>.jsonl``.

A real process (Lightning's DDP re-executes this same command for the other ranks, which then
record too); it only wraps :meth:`StreamingMAEDataModule.on_before_batch_transfer`, which sees each
batch once, just before the step that trains on it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mae_core import prepared, train

_original = prepared.StreamingMAEDataModule.on_before_batch_transfer


def _recording(self, batch, dataloader_idx):
    images = _original(self, batch, dataloader_idx)
    trainer = self.trainer
    line = {"step": trainer.global_step, "epoch": trainer.current_epoch,
            "ids": [int(i) for i in self.last_ids]}
    with open(Path(sys.argv[1]) / f"rank{trainer.global_rank}.jsonl", "a") as out:
        out.write(json.dumps(line) + "\n")
    return images


if __name__ == "__main__":
    prepared.StreamingMAEDataModule.on_before_batch_transfer = _recording
    Path(sys.argv[1]).mkdir(parents=True, exist_ok=True)
    sys.exit(train.main(sys.argv[2:]))
