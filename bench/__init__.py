"""MAE Studio's benchmark, ``python -m bench``: beside the library, as timm keeps its benchmark.

It times ``mae_core``'s own functions, never copies of them. Four jobs, each its own module:

- ``train`` (:mod:`bench.training`, :mod:`bench.worker`): DDP training throughput of the project's
  trainer (``ddp-clean``) against the naive recipe, through real Lightning DDP launches, with the
  FLOPs per image, the peak FLOP/s and the MFU of every row.
- ``recon`` (:mod:`bench.reconstruction`): one uploaded photo through the Reconstruct tab's path,
  :func:`mae_core.images.open_rgb` then :func:`mae_core.reconstruct.reconstruct_uploads`.
- ``app`` (:mod:`bench.app_startup`): ``python app.py`` from launch to serving, and its memory.
- ``poll`` (:mod:`bench.poll`): a live view polling a 1,000,000-line ``metrics.jsonl`` with
  :class:`mae_core.metrics.MetricsReader`: time per poll and the size of what goes to the browser.

``python -m bench --gpu`` (:mod:`bench.gpu`) is the one-command GPU check: vit-base 224 px bf16 on
every visible GPU, its MFU and the gap to 30% MFU, in ``bench/results-gpu.md``.

:mod:`bench.report` writes ``bench/results.md`` and ``bench/results.json``; :mod:`bench.procs` holds
the process helpers (environment, group kill, peak RSS, free ports) that the tests share.
"""

from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
JOBS = ("train", "recon", "app", "poll")  # the report's section order
