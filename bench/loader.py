"""``python -m bench.loader``: can this data feed this device? The trainer's own loader, alone.

The data module a run would use (:func:`mae_core.datasource.make_datamodule`: the in-memory cache
for a small folder, the LitData stream for a prepared set), with the run's loader workers, pinned
memory on a GPU, and each batch copied to the device as Lightning copies it: images/s and the
time the host waited for each batch, beside what one worker computes alone (this process, one
thread): the loader's rate over that times the workers is the pipeline's efficiency. Compare
with the training step's images/s (``python -m bench --gpu``, ``python -m bench.step_profile``):
a loader slower than the step caps the trainer.

Example::

    python -m bench.loader --data /data/prepared --image-size 224 --batch-size 256 --workers 15
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.args import non_negative, non_negative_float, positive


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.loader", description=__doc__.split("\n")[0])
    p.add_argument("--data", default="", help="image folder or prepared set (default: the "
                                              "embedded sample photos)")
    p.add_argument("--image-size", type=positive, default=224)
    p.add_argument("--batch-size", type=positive, default=256)
    p.add_argument("--workers", type=non_negative, default=None,
                   help="loader worker processes (default: the trainer's choice for this machine)")
    p.add_argument("--batches", type=positive, default=40, help="measured batches")
    p.add_argument("--warmup", type=non_negative, default=5, help="batches excluded first")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--decode-on-device", action="store_true",
                   help="prepared sets: workers only draw the crops, the device decodes and cuts "
                        "them (TrainConfig.decode_on_device)")
    p.add_argument("--transfer-only", action="store_true",
                   help="no data: blank images, to measure what the loader's worker processes, "
                        "shared memory and pinning cost alone")
    p.add_argument("--step-ms", type=non_negative_float, default=0.0,
                   help="a training step of this many milliseconds per batch, as a device takes "
                        "it (this process sleeps, leaving the cores to the workers): does the "
                        "loader keep such a step fed, epoch ends included? (fed_fraction)")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    return p


def default_workers(device: str) -> int:
    from mae_core.config import RunConfig

    accelerator = "gpu" if device == "cuda" else "cpu"
    cfg = RunConfig().with_overrides(accelerator=accelerator, devices=1).resolved()
    return int(cfg.train.num_workers or 0)


def measure(data: str, image_size: int, batch_size: int, workers: int, batches: int,
            warmup: int, device: str, decode_on_device: bool = False,
            transfer_only: bool = False, step_ms: float = 0.0) -> dict[str, Any]:
    """Images/s of ``batches`` batches after ``warmup``, each on ``device``, and the host's waits;
    ``step_ms``: each batch is followed by a step of that length (a sleep). A loader read by a
    consumer that takes no time hides its stalls: its workers never wait for the consumer, so an
    epoch's end costs them nothing, where a device step leaves them idle from the epoch's last
    batch until the next epoch begins."""
    import torch

    from bench.data import _forever
    from mae_core import crops, datasource

    with tempfile.TemporaryDirectory(prefix="mae-bench-loader-") as root:
        if transfer_only:
            kind, deferred, per_core = "transfer only", False, None
            loader = _transfer_only_loader(image_size, batch_size, workers, device == "cuda")
        else:
            source = datasource.run_data(data, Path(root))
            per_core = per_core_rate(source, image_size, batch_size, decode_on_device)
            module = datasource.make_datamodule(source, image_size, batch_size, workers,
                                                pin_memory=device == "cuda",
                                              decode_on_device=decode_on_device)
            module.setup("fit")
            loader = module.train_dataloader()
            kind, deferred = source.kind, getattr(module, "decode_on_device", False)
        waits: list[float] = []
        started = None
        batch_iter = iter(_forever(loader))
        for index in range(warmup + batches):
            if index == warmup:
                _sync(device)
                started = time.perf_counter()
            asked = time.perf_counter()
            batch = next(batch_iter)
            if index >= warmup:
                waits.append(time.perf_counter() - asked)
            if deferred:
                images = crops.finish_on_device(batch, image_size, torch.device(device))
            else:
                images = batch["image"] if isinstance(batch, dict) else batch
            images.to(device, non_blocking=True).float()  # the copy and the model's first cast
            if step_ms:
                _sync(device)
                time.sleep(step_ms / 1000)
        _sync(device)
        seconds = time.perf_counter() - (started or 0.0)
    images_per_s = batches * batch_size / seconds
    return {"data": "" if transfer_only else data or "embedded sample photos", "kind": kind,
            "decode_on_device": deferred,
            "image_size": image_size, "batch_size": batch_size, "workers": workers,
            "device": device, "pinned": device == "cuda", "batches": batches,
            "images_per_s": round(images_per_s, 1),
            "images_per_s_per_worker": round(images_per_s / max(1, workers), 1),
            "per_core_images_per_s": per_core and round(per_core, 1),
            "pipeline_efficiency": per_core and round(images_per_s / (per_core * max(1, workers)), 2),
            "mean_wait_s": round(statistics.fmean(waits), 4),
            "max_wait_s": round(max(waits), 4), "step_ms": step_ms,
            # the share of the step-bound rate (batch / step) delivered: 1 = the step never waited
            "fed_fraction": round(images_per_s * step_ms / 1000 / batch_size, 3) if step_ms else None}


def per_core_rate(source: Any, image_size: int, batch_size: int, decode_on_device: bool,
                  batches: int = 4) -> float:
    """Images/s of the same data module in this process on one thread, no workers: what one
    loader worker computes. The loader's rate over (this × workers) is the pipeline's efficiency;
    well under 1 means the loader's plumbing (epoch ends, transfer), not the work, is the limit,
    as 4-batch epochs were on an H200: 2,600 images/s from 8 workers that deliver 7,800 when
    epochs are long."""
    import torch

    from bench.data import _forever
    from mae_core import datasource

    module = datasource.make_datamodule(source, image_size, batch_size, 0, pin_memory=False,
                                        decode_on_device=decode_on_device)
    module.setup("fit")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        batch_iter = iter(_forever(module.train_dataloader()))
        next(batch_iter)  # opens the files and chunks: not a steady rate
        started = time.perf_counter()
        for _ in range(batches):
            next(batch_iter)
        return batches * batch_size / (time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)


class _Blank:
    """Items of no work at all: what the loader's processes, shared memory and pinning cost alone
    (a loader that ships batches this slowly caps every data set)."""

    def __init__(self, image_size: int, length: int) -> None:
        self.shape, self.length = (3, image_size, image_size), length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        import torch

        return torch.full(self.shape, index % 256, dtype=torch.uint8)


def _transfer_only_loader(image_size: int, batch_size: int, workers: int, pin: bool) -> Any:
    from torch.utils.data import DataLoader

    return DataLoader(_Blank(image_size, batch_size * 64), batch_size=batch_size, shuffle=True,
                      drop_last=True, num_workers=workers, pin_memory=pin,
                      persistent_workers=workers > 0)


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: torch sees no CUDA GPU", file=sys.stderr)
        return 2
    workers = args.workers if args.workers is not None else default_workers(device)
    from mae_core.checks import DataError

    try:
        row = measure(args.data, args.image_size, args.batch_size, workers, args.batches,
                      args.warmup, device, args.decode_on_device, args.transfer_only,
                      args.step_ms)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(row, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    from mae_core.process import exit_quickly

    exit_quickly(main())
