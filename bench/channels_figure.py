"""The README's "Any channels" figures: a 16-bit grayscale set and a 4-band set, trained and shown.

``python -m bench.channels_figure [--steps 300] [--out docs]`` builds two offline data sets from the
photographs in scikit-image's wheel — 12-bit scans in 16-bit TIFFs (the grayscale photos, values
0–4,095 plus fine detail below the 8-bit step) and 4-band TIFFs (R, G, B and a synthetic
"near-infrared" band) — trains each with the real trainer (one process, vit-tiny, 64 px, patch 8),
and writes a reconstruction grid of held-out crops per set (``recon-gray16.png``: grayscale with
the 1st–99th percentile stretch; ``recon-4band.png``: the 4,1,2 false-colour composite).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import tifffile
import torch

from mae_core.composite import parse_view
from mae_core.data import sample_photo_paths
from mae_core.images import open_rgb
from mae_core.pixels import read_for
from mae_core.reconstruct import grid_image, reconstruct
from mae_core.rundir import RunPaths
from mae_core.weights import load_model

CROP = 96
GRAY_PHOTOS = ("camera.png", "coins.png", "moon.png", "cell.png", "brick.png", "grass.png",
               "gravel.png", "clock_motion.png")
COLOUR_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                 "motorcycle_right.png", "hubble_deep_field.jpg", "retina.jpg")


def _crops(array: np.ndarray, count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``count`` random CROP×CROP crops of an (H, W, ...) array."""
    height, width = array.shape[:2]
    tops = rng.integers(0, height - CROP, count)
    lefts = rng.integers(0, width - CROP, count)
    return [array[t:t + CROP, x:x + CROP] for t, x in zip(tops, lefts)]


def build_sets(root: Path, per_photo: int = 40, seed: int = 0) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    photos = {p.name: p for p in sample_photo_paths()}
    gray, four = root / "gray16", root / "four"
    gray.mkdir(parents=True), four.mkdir(parents=True)
    for name in GRAY_PHOTOS:
        values = np.asarray(open_rgb(photos[name]).convert("L"), dtype=np.float64)
        # 12 bits in a 16-bit container, with detail finer than one 8-bit step.
        scan = values * 16 + rng.normal(0, 3, values.shape)
        for i, crop in enumerate(_crops(scan.clip(0, 4095).astype(np.uint16), per_photo, rng)):
            tifffile.imwrite(gray / f"{Path(name).stem}_{i:03d}.tif", crop)
    for name in COLOUR_PHOTOS:
        rgb = np.asarray(open_rgb(photos[name]), dtype=np.float64)
        # A "near-infrared" band: bright where green dominates red (vegetation-like), its own look.
        nir = (128 + 0.9 * (rgb[..., 1] - rgb[..., 0]) + 0.3 * rgb.mean(axis=2) - 40).clip(0, 255)
        bands = np.concatenate([rgb, nir[..., None]], axis=2).astype(np.uint8)
        for i, crop in enumerate(_crops(bands, per_photo, rng)):
            tifffile.imwrite(four / f"{Path(name).stem}_{i:03d}.tif", crop.transpose(2, 0, 1),
                             photometric="minisblack", planarconfig="separate")
    return gray, four


def train(folder: Path, runs: Path, name: str, steps: int, batch_size: int) -> Path:
    run_dir = runs / name
    command = [sys.executable, "-m", "mae_core.train", "--data", str(folder), "--run-dir",
               str(run_dir), "--model", "vit-tiny", "--image-size", "64", "--patch-size", "8",
               "--batch-size", str(batch_size), "--accelerator", "cpu", "--devices", "1", "--max-steps",
               str(steps), "--val-count", "16", "--eval-every-n-steps", str(steps),
               "--num-previews", "0", "--weight-snapshots", "0"]
    subprocess.run(command, check=True)
    return run_dir


def figure(run_dir: Path, out: Path, display_channels: str) -> None:
    import yaml

    from mae_core.config import RunConfig
    from mae_core.monitor import plan_evaluation

    paths = RunPaths(run_dir)
    cfg = RunConfig.load(paths.config)
    held_out = plan_evaluation(cfg.train).val[:4]  # never trained on
    model = load_model(paths.weights)
    images = torch.stack([read_for(p, model.cfg.channels)[:, 16:80, 16:80] for p in held_out])
    results = reconstruct(model, images, seed=0)
    view = parse_view(display_channels, model.cfg.channels)
    grid_image(results, 160, view=view).save(out)
    print(f"{out}: {yaml.safe_dump(cfg.to_dict()['model'], sort_keys=False)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.channels_figure", description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default="docs")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        gray, four = build_sets(Path(tmp) / "data")
        for folder, name, shown in ((gray, "gray16", ""), (four, "4band", "4,1,2")):
            run_dir = train(folder, Path(tmp) / "runs", name, args.steps, args.batch_size)
            figure(run_dir, Path(args.out) / f"recon-{name}.png", shown)
    return 0


if __name__ == "__main__":
    from mae_core.process import exit_quickly

    exit_quickly(main())
