"""``python -m tests.rank_digest OUT_DIR [mae_core.train flags]``: the trainer, each rank writing a
digest of every parameter it holds when training ends to ``OUT_DIR/rank<global rank>.txt``.

DDP keeps the ranks' copies identical only if every gradient is all-reduced before the optimizer
steps: ranks that train on different images and end with different weights have skipped one.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from mae_core import train
from mae_core.model import MAELightning
from mae_core.process import exit_quickly


def _record(self: MAELightning) -> None:
    digest = hashlib.sha256()
    for name, param in sorted(self.named_parameters()):
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().numpy().tobytes())
    (Path(sys.argv[1]) / f"rank{self.global_rank}.txt").write_text(digest.hexdigest())


if __name__ == "__main__":
    MAELightning.on_train_end = _record
    Path(sys.argv[1]).mkdir(parents=True, exist_ok=True)
    exit_quickly(train.main(sys.argv[2:]))
