"""One training measurement, run by every DDP rank: ``python -m bench --_worker spec.json``.

The parent (:mod:`bench.training`) writes the spec; this process trains through the project's own
:func:`mae_core.train.run_training`, with the naive recipe's loader when the spec asks for it, and a
callback on every rank that times each step after the warm-up and writes the timings to JSON.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from bench.procs import peak_rss_bytes

WORKER_FLAG = "--_worker"


def naive_dataset_class() -> type:
    """The naive recipe's dataset (built lazily: the parent need not import torch)."""
    from lightly.transforms import MAETransform
    from torch.utils.data import Dataset
    from torchvision.datasets.folder import pil_loader

    class NaiveImageDataset(Dataset):
        """What the common examples do: every item opens its file with PIL and applies lightly's
        ``MAETransform`` (random resized crop, flip, ``ToTensor``, ``Normalize``) on the CPU."""

        def __init__(self, paths: list[str], image_size: int, length: int | None = None) -> None:
            self.paths = [str(p) for p in paths]
            self.transform = MAETransform(input_size=image_size)
            self.num_images = len(self.paths)
            self.skipped = 0
            self.length = max(self.num_images, length or 0)

        def __len__(self) -> int:
            return self.length

        def __getitem__(self, index: int) -> Any:
            image = pil_loader(self.paths[index % self.num_images])
            return self.transform(image)[0]  # MAETransform returns a list of one view

    return NaiveImageDataset


def _run_info(trainer: Any) -> dict[str, Any]:
    """What actually ran on this rank: the DDP settings Lightning resolved, threads, loader."""
    import torch

    strategy = trainer.strategy
    ddp = dict(getattr(strategy, "_ddp_kwargs", {}) or {})
    return {
        "rank": trainer.global_rank, "world_size": trainer.world_size,
        "strategy": type(strategy).__name__,
        "find_unused_parameters": bool(ddp.get("find_unused_parameters", False)),
        "static_graph": bool(ddp.get("static_graph", False)),
        "backend": getattr(strategy, "process_group_backend", None),
        "accelerator": type(trainer.accelerator).__name__,
        "precision": str(trainer.precision),
        "torch_threads": torch.get_num_threads(),
        "batch_size": trainer.datamodule.batch_size,
        "num_workers": trainer.datamodule.num_workers,
        "files": getattr(trainer.datamodule.dataset, "num_images", None),
        "pipeline": data_pipeline(trainer.datamodule),
    }


def data_pipeline(datamodule: Any) -> str:
    """How this rank's images were read and augmented, for the report's table."""
    from mae_core.shards import StreamingMAEDataModule

    if isinstance(datamodule, StreamingMAEDataModule) and datamodule.decode_on_device:
        return "prepared set (LitData stream), decoded and cropped on the device, normalise on device"
    if isinstance(datamodule, StreamingMAEDataModule):
        return "prepared set (LitData stream), crop cut from the smallest copy, normalise on device"
    if datamodule.dataset_factory.__name__ == "NaiveImageDataset":
        return NAIVE_PIPELINE
    return "uint8 cache, v2 crop+flip, normalise on device"


NAIVE_PIPELINE = "PIL open per sample, MAETransform, normalise on CPU"


PROFILE_ENV = "MAE_BENCH_PROFILE"


class Diagnosis:
    """Where the host's time goes, for ``MAE_BENCH_PROFILE=N``: from the first measured step on,
    every CUDA operation that makes the host wait is warned about once per place
    (``torch.cuda.set_sync_debug_mode``), and N steps run under the torch profiler, whose tables
    (host time, then device time) go to the worker's log. A diagnosis, not a measurement: the
    profiled steps are slower, so the run's figures are not comparable."""

    def __init__(self, device: Any, steps: int) -> None:
        import torch

        self.device, self.left = device, steps
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profiler = torch.profiler.profile(activities=activities)
        self.profiler.__enter__()

    @classmethod
    def from_env(cls, device: Any) -> Diagnosis | None:
        import os

        steps = int(os.environ.get(PROFILE_ENV) or 0)
        return cls(device, steps) if steps > 0 else None

    def step_ended(self) -> None:
        import torch

        self.left -= 1
        if self.left != 0:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.profiler.__exit__(None, None, None)
        table = self.profiler.key_averages()
        print("=== profile: host time by op", flush=True)
        print(table.table(sort_by="self_cpu_time_total", row_limit=30), flush=True)
        if self.device.type == "cuda":
            print("=== profile: device time by op", flush=True)
            print(table.table(sort_by="self_cuda_time_total", row_limit=20), flush=True)


def step_timer(warmup: int, steps: int, result: Path) -> Any:
    """A Lightning callback timing every step; after ``warmup + steps`` steps it writes
    ``<result stem>.rank<r>.json`` with the measured steps, the data waits and the peak RSS."""
    import pytorch_lightning as pl
    import torch

    class StepTimer(pl.Callback):
        def __init__(self) -> None:
            self.starts: list[float] = []
            self.marks: list[float] = []  # train start, then the end of every step
            self.info: dict[str, Any] = {}
            self.diagnosis: Diagnosis | None = None

        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.info = _run_info(trainer)
            self.marks = [time.perf_counter()]

        def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
            if len(self.marks) == warmup + 1:
                self.diagnosis = Diagnosis.from_env(trainer.strategy.root_device)
            self.starts.append(time.perf_counter())

        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                               *args: Any) -> None:
            if len(self.marks) in (warmup, warmup + steps) and pl_module.device.type == "cuda":
                # The window's two ends wait for the device: the trainer itself never does, so
                # a step's end on the host clock is only when its work was queued.
                torch.cuda.synchronize(pl_module.device)
            self.marks.append(time.perf_counter())
            if self.diagnosis is not None:
                self.diagnosis.step_ended()
            if len(self.marks) - 1 == warmup + steps:
                self.write()

        def write(self) -> None:
            window = self.marks[warmup:warmup + steps + 1]
            step_s = [b - a for a, b in zip(window, window[1:])]
            # start of step i minus end of step i-1: fetching the batch (and Lightning's loop).
            wait_s = [self.starts[i] - self.marks[i] for i in range(warmup, warmup + steps)]
            payload = {**self.info, "warmup": warmup, "steps": steps, "step_s": step_s,
                       "wait_s": wait_s, "window_s": window[-1] - window[0],
                       "startup_to_first_step_s": self.marks[1] - self.marks[0],
                       "peak_rss_bytes": peak_rss_bytes()}
            path = result.with_name(f"{result.stem}.rank{self.info['rank']}.json")
            path.write_text(json.dumps(payload))

    return StepTimer()


def worker_main(spec_path: str) -> int:
    """Train as the spec says (:func:`bench.training.run_measurement`); the trainer's exit code."""
    spec = json.loads(Path(spec_path).read_text())
    import torch

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    from mae_core.config import RunConfig
    from mae_core.rundir import RunPaths
    from mae_core.train import run_training

    cfg = RunConfig().with_overrides(**spec["overrides"]).resolved()
    paths = RunPaths(Path(spec["run_dir"]))
    paths.root.mkdir(parents=True, exist_ok=True)
    data = None
    if spec["recipe"] == "naive":
        from mae_core.data import MAEDataModule

        t = cfg.train
        data = MAEDataModule(t.data, cfg.model.image_size, t.batch_size, int(spec["naive_workers"]),
                             pin_memory=t.accelerator == "gpu",
                             dataset_factory=naive_dataset_class())
    timer = step_timer(int(spec["warmup"]), int(spec["steps"]), Path(spec["result"]))
    return run_training(cfg, paths, datamodule=data, extra_callbacks=[timer])
