"""The devices of this machine a run uses: its usable cores, the default number of CPU
processes and loader workers, the GPUs a run may take, and whether two runs share a device.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from mae_core.checks import _require

if TYPE_CHECKING:
    from mae_core.config import RunConfig, TrainConfig


def visible_gpus(t: TrainConfig) -> int:
    """GPUs the run can use: all visible ones, or its ``gpus`` once they are checked to exist
    (indices of the GPUs this process sees: under ``CUDA_VISIBLE_DEVICES=2,3``, GPU 0 is 2)."""
    import torch

    from mae_core.process import gpus_narrowed

    visible = torch.cuda.device_count()
    if not t.gpus:
        return visible
    if gpus_narrowed(t.gpus):
        return visible  # the trainer, launched with its GPUs: they are 0..n-1 in here
    missing = [i for i in t.gpus.split(",") if int(i) >= visible]
    _require(not missing, "gpus", f"GPU {', '.join(missing)} named but {visible} visible")
    return len(t.gpus.split(","))


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, as set by taskset, cgroups or SLURM)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_cpu_processes() -> int:
    """One DDP process per two cores, and at least two where there are two cores (so DDP is real)."""
    cores = usable_cores()
    return 1 if cores < 2 else max(2, cores // 2)


def default_workers(accelerator: str, devices: int) -> int:
    """Loader workers per process: the cores left over after one per training process.

    Decoded images are cached, so on a CPU-only machine the training processes themselves are
    the best use of the cores and loading stays in-process.
    """
    cores = usable_cores()
    if accelerator == "cpu":
        return 0
    return max(0, min(8, cores // max(devices, 1) - 1))


def share_devices(cfg: RunConfig, other: RunConfig | None) -> bool:
    """Whether runs of ``cfg`` and ``other`` would share a device: a run naming no GPUs (each CPU
    run) uses them all, and an unreadable config (None) is assumed to. The one rule for the app's
    Start, Queue and Resume and for a run started by hand."""
    wanted, held = cfg.train.gpu_set, other.train.gpu_set if other is not None else None
    return wanted is None or held is None or bool(wanted & held)
