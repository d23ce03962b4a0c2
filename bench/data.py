"""``python -m bench.data [--images 20000] [--out bench/results-data.json]``: data at scale.

Generates a folder of JPEGs at 640×480 (random crops, flips and colour jitter of the embedded
photos, quality 90), then measures, in one sitting on this machine:

- loader-only images/s on one core (one thread, no loader workers) of (a) today's per-sample PIL
  folder path (:class:`mae_core.data.ImageFolderDataset` decoding from disk on every access, as it
  does above its cache limit) and (b) the prepared set (:mod:`mae_core.prepared`);
- the time to prepare the folder (``prepare``, 2 encoding processes here);
- each training process's peak RSS with 1 and 2 CPU DDP processes on prepared sets of the
  small count (``--small``, 2,000) and the full count, and the time from launch to the first step,
  beside the time a fresh process takes only to import ``mae_core.train`` (its floor).

Run it niced on a shared machine; the report prints the load average it ran under.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.procs import child_env, load_average, peak_rss_bytes, stop_group
from mae_core.rundir import RunPaths

SIZE = (640, 480)


def _make_images(args: tuple[int, int, str]) -> None:
    """JPEGs ``start..stop`` of the generated folder (one process's share)."""
    from PIL import Image, ImageEnhance

    from mae_core.data import sample_photo_paths
    from mae_core.images import open_rgb

    start, stop, folder = args
    photos = [open_rgb(p) for p in sample_photo_paths()]
    rng = np.random.default_rng(start)
    for i in range(start, stop):
        photo = photos[i % len(photos)]
        w, h = photo.size
        scale = rng.uniform(0.4, 1.0)
        cw, ch = max(16, int(w * scale)), max(16, int(h * scale))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        image = photo.crop((x, y, x + cw, y + ch)).resize(SIZE, Image.Resampling.BILINEAR)
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            image = enhance(image).enhance(rng.uniform(0.7, 1.3))
        sub = Path(folder) / f"{i // 1000:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        image.save(sub / f"{i:06d}.jpg", quality=90)


def generate(folder: Path, count: int, procs: int = 2) -> float:
    started = time.monotonic()
    bounds = np.linspace(0, count, procs + 1).astype(int)
    with mp.get_context("fork").Pool(procs) as pool:
        pool.map(_make_images, [(int(a), int(b), str(folder)) for a, b in itertools.pairwise(bounds)])
    return time.monotonic() - started


def _forever(loader: Any) -> Any:
    """Batches of ``loader``, epoch after epoch (``itertools.cycle`` would replay the first
    epoch's batches from memory, without loading anything)."""
    while True:
        yield from loader


def _rate(iterator: Any, seconds: float) -> tuple[int, float]:
    """(images, seconds) drawn from ``iterator`` of batches for about ``seconds``."""
    seen, started = 0, time.monotonic()
    while time.monotonic() - started < seconds:
        images = next(iterator)
        seen += len(images["image"] if isinstance(images, dict) else images)
    return seen, time.monotonic() - started


def loaders(folder: Path, prepared_dir: Path, image_size: int, rounds: int = 6,
            seconds: float = 4.0, batch: int = 32) -> dict[str, float]:
    """Loader-only images/s on one thread, no workers: (a) and (b) measured in alternating
    rounds, so a shared machine's changing load falls on both alike."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _loader_rates(folder, prepared_dir, image_size, rounds, seconds, batch)
    finally:
        torch.set_num_threads(threads)  # the caller's process (a test, say) keeps its threads


def _loader_rates(folder: Path, prepared_dir: Path, image_size: int, rounds: int, seconds: float,
                  batch: int) -> dict[str, float]:
    from litdata import StreamingDataLoader
    from torch.utils.data import DataLoader

    from mae_core import data, shards

    paths = data.find_images(str(folder))
    for path in [*map(Path, paths), *prepared_dir.iterdir()]:  # both from the page cache:
        path.read_bytes()                                       # decode, not disk
    # today's path for a folder above the in-memory cache's limit: PIL on every access
    folder_set = data.ImageFolderDataset(paths, image_size, cache_limit_bytes=0)
    streams = {
        "a": _forever(DataLoader(folder_set, batch_size=batch, shuffle=True, drop_last=True)),
        "b": _forever(StreamingDataLoader(
            shards.streaming_dataset(str(prepared_dir), image_size, shuffle=True),
            batch_size=batch, num_workers=0, drop_last=True)),
    }
    totals = {"a": [0, 0.0], "b": [0, 0.0]}
    for stream in streams.values():
        next(stream)  # the first batch opens files and chunks: not a steady rate
    for _ in range(rounds):
        for name, stream in streams.items():
            seen, took = _rate(stream, seconds)
            totals[name][0] += seen
            totals[name][1] += took
    a, b = (totals[k][0] / totals[k][1] for k in ("a", "b"))
    return {"folder_pil_images_per_s_per_core": round(a, 1),
            "prepared_images_per_s_per_core": round(b, 1), "ratio": round(b / a, 2)}


def train_run(data_dir: Path, devices: int, root: Path, steps: int = 6,
              threads: int | None = None) -> dict[str, Any]:
    """One short CPU DDP run: every training process's peak RSS, launch → first step, and of that
    the part inside ``trainer.fit`` (the first step's own compute: ``elapsed_s`` of its line).
    ``threads`` sets ``OMP_NUM_THREADS`` (default: torch's, all cores per single process)."""
    run_dir = root / f"run-{data_dir.name}-{devices}{f'-t{threads}' if threads else ''}"
    metrics = RunPaths(run_dir).metrics
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "mae_core.train", "--data", str(data_dir), "--run-dir", str(run_dir),
           "--devices", str(devices), "--accelerator", "cpu", "--max-steps", str(steps),
           "--image-size", "64", "--batch-size", "16", "--num-previews", "0",
           "--checkpoint-every-n-steps", "1000"]
    started = time.monotonic()
    with open(root / f"{run_dir.name}.log", "w") as log:
        env = child_env(**({"OMP_NUM_THREADS": str(threads)} if threads else {}))
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    peaks: dict[int, int] = {}
    first_step = None
    try:
        while proc.poll() is None:
            for pid in _group(proc.pid):
                peaks[pid] = max(peaks.get(pid, 0), peak_rss_bytes(pid) or 0)
            if first_step is None and metrics.exists() and '"step"' in metrics.read_text():
                first_step = time.monotonic() - started
            time.sleep(0.2)
    finally:
        stop_group(proc)
    ranks = sorted(peaks.values(), reverse=True)[:devices]  # the ranks; helpers are far smaller
    rows = [json.loads(line) for line in metrics.read_text().splitlines()
            if '"elapsed_s"' in line] if metrics.exists() else []
    return {"devices": devices, "threads": threads or "default", "returncode": proc.returncode,
            "first_step_s": round(first_step, 1) if first_step else None,
            "first_step_in_fit_s": round(rows[0]["elapsed_s"], 1) if rows else None,
            "peak_rss_mib_per_process": [round(r / 2**20) for r in ranks],
            "total_s": round(time.monotonic() - started, 1)}


# What each training process imports (mae_core.train itself imports them only once it runs).
TRAINER_IMPORTS = ("import pytorch_lightning, mae_core.model, mae_core.callbacks, "
                   "mae_core.datasource")


def import_seconds(repeats: int = 2) -> float:
    """The fastest of ``repeats`` fresh imports of the trainer's modules: the part of launch →
    first step that is importing torch, Lightning, timm and lightly, whatever the data."""
    times = []
    for _ in range(repeats):
        started = time.monotonic()
        subprocess.run([sys.executable, "-c", TRAINER_IMPORTS], env=child_env(), check=True)
        times.append(time.monotonic() - started)
    return round(min(times), 1)


def _group(pgid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pgid:
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.data", description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=20_000, help="generated JPEGs (default 20,000)")
    parser.add_argument("--small", type=int, default=2_000, help="the smaller set of the RSS runs")
    parser.add_argument("--image-size", type=int, default=224, help="loader measurement size")
    parser.add_argument("--loaders-only", action="store_true",
                        help="only the loader measurement (on an existing --workdir)")
    parser.add_argument("--training-only", action="store_true",
                        help="only the training runs (on an existing --workdir), merged into --out")
    parser.add_argument("--workdir", default=None, help="keep the generated data here")
    parser.add_argument("--out", default=str(Path(__file__).with_name("results-data.json")))
    args = parser.parse_args(argv)
    from mae_core import prepared

    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench-data-"))
    root.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"images": args.images, "load_average_before": load_average(),
                           "cores": os.cpu_count()}
    if args.training_only:  # the earlier sitting's data and loader figures stay, with its load
        earlier = json.loads(Path(args.out).read_text())
        earlier["loader_sitting_load_average"] = [earlier.pop("load_average_before", None),
                                                  earlier.pop("load_average_after", None)]
        out = {**earlier, **out}
    folder = root / "folder"
    if not folder.exists():
        out["generate_s"] = round(generate(folder, args.images), 1)
    if "generate_s" in out:
        print(f"generated {args.images:,} JPEGs in {out['generate_s']} s", flush=True)
    sets = {}
    for count in sorted({args.small, args.images}):
        target = root / f"prepared-{count}"
        if not target.exists():
            from mae_core.data import find_images

            started = time.monotonic()
            prepared.prepare(str(folder), target, workers=2, verbose=False,
                             paths=find_images(str(folder))[:count])
            out[f"prepare_{count}_s"] = round(time.monotonic() - started, 1)
        sets[count] = target
        out[f"prepared_{count}_bytes"] = prepared.read_manifest(target)["bytes"]
        if f"prepare_{count}_s" in out:
            print(f"prepared {count:,}: {out[f'prepare_{count}_s']} s", flush=True)
    for size in sorted({64, args.image_size}) if not args.training_only else ():
        out[f"loader_{size}px"] = loaders(folder, sets[args.images], size)
        print(f"loader {size}px: {out[f'loader_{size}px']}", flush=True)
    if args.loaders_only:
        print(json.dumps(out, indent=2))
        return 0
    out["import_trainer_s"] = import_seconds()
    print(f"import the trainer's modules: {out['import_trainer_s']} s", flush=True)
    out["training"] = [{"images": count, **train_run(path, devices, root)}
                       for count, path in sets.items() for devices in (1, 2)]
    # One process with one thread: on a shared (oversubscribed) CPU, two spinning OpenMP threads
    # can make a step several times slower than one.
    out["training"].append({"images": args.images, **train_run(sets[args.images], 1, root, threads=1)})
    for row in out["training"]:
        print(f"train: {row}", flush=True)
    out["load_average_after"] = load_average()
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    from mae_core.process import exit_quickly

    exit_quickly(main())
