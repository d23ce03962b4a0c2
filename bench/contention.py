"""A CPU run beside other work: images/s of one trainer process alone and beside busy processes,
under libgomp's default (its threads spin a while at every barrier), ``OMP_WAIT_POLICY=PASSIVE``
(they sleep at once) and ``OMP_NUM_THREADS=1`` (no team to wait for).

    python -m bench.contention [--preset vit-tiny] [--image-size 32] [--patch-size 8]
                               [--batch-size 4] [--steps 60] [--busy 1] [--json OUT]

Each row is a real ``python -m mae_core.train`` (one process; Lightning gives it every core as
threads unless OMP_NUM_THREADS says otherwise) trained for ``--steps`` steps; images/s is the
median of its steps after the first quarter. A busy process is a Python loop: one core's worth of
anything else (the app, a browser, another job, the test suite).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.args import positive
from mae_core.process import PROJECT_ROOT, clean_env

SETTINGS = {"libgomp default": {}, "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
            "OMP_NUM_THREADS=1": {"OMP_NUM_THREADS": "1"}}
OPENMP_VARS = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")
BUSY_LOOP = "while True: pass"


def images_per_s(metrics: Path) -> float:
    rates = [row["images_per_s"] for row in map(json.loads, metrics.read_text().splitlines())
             if "images_per_s" in row]
    return statistics.median(rates[len(rates) // 4:])


def setting_env(setting: str) -> dict[str, str]:
    """A trainer's environment under ``setting``, whatever OpenMP variables this shell has."""
    return {k: v for k, v in clean_env().items() if k not in OPENMP_VARS} | SETTINGS[setting]


def train_once(args: argparse.Namespace, setting: str, busy: int, runs: Path) -> float:
    env = setting_env(setting)
    burners = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(busy)]
    try:
        run_dir = runs / f"{len(list(runs.iterdir()))}"
        subprocess.run([sys.executable, "-m", "mae_core.train", "--run-dir", str(run_dir),
                        "--preset", args.preset, "--image-size", str(args.image_size),
                        "--patch-size", str(args.patch_size), "--batch-size", str(args.batch_size),
                        "--max-steps", str(args.steps), "--devices", "1", "--accelerator", "cpu",
                        "--num-previews", "0", "--eval-every-n-steps", "0"],
                       cwd=PROJECT_ROOT, env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return images_per_s(run_dir / "metrics.jsonl")
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.contention",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="vit-tiny")
    parser.add_argument("--image-size", type=positive, default=32)
    parser.add_argument("--patch-size", type=positive, default=8)
    parser.add_argument("--batch-size", type=positive, default=4)
    parser.add_argument("--steps", type=positive, default=60)
    parser.add_argument("--busy", type=positive, default=1, help="busy processes beside the run")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="mae-contention-") as tmp:
        for setting in SETTINGS:
            for busy in (0, args.busy):
                rate = train_once(args, setting, busy, Path(tmp))
                rows.append({"setting": setting, "busy": busy, "images_per_s": round(rate, 1)})
                print(f"{setting:<24} busy processes {busy}: {rate:8.1f} images/s", flush=True)
    result = {"cores": len(os.sched_getaffinity(0)), "preset": args.preset,
              "image_size": args.image_size, "patch_size": args.patch_size,
              "batch_size": args.batch_size, "steps": args.steps, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
