"""MFU in the trainer: real tiny runs of ``python -m mae_core.train`` record, for every step,
images/s and the model FLOPs utilisation (``mfu``) in ``metrics.jsonl`` and ``status.json``, with
the FLOPs per image of :mod:`mae_core.flops` and a peak measured once per machine.

Each run gets its own peak cache (``MAE_STUDIO_CACHE_DIR``), so the probe really runs here.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from mae_core.config import RunConfig
from mae_core.flops import training_flops_per_image
from mae_core.hardware import matmul_type
from mae_core.process import clean_env
from mae_core.rundir import RunPaths
from tests.helpers import REPO_ROOT

TINY = ["--model", "vit-tiny", "--image-size", "32", "--patch-size", "8", "--batch-size", "4",
        "--devices", "1", "--accelerator", "cpu", "--max-steps", "4", "--num-previews", "0"]


def _train(run_dir: Path, cache: Path) -> RunPaths:
    command = [sys.executable, "-m", "mae_core.train", *TINY, "--run-dir", str(run_dir)]
    result = subprocess.run(command, cwd=REPO_ROOT, env=clean_env(MAE_STUDIO_CACHE_DIR=str(cache)),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return RunPaths(run_dir)


def test_every_step_line_and_the_status_carry_mfu(tmp_path):
    cache = tmp_path / "cache"
    paths = _train(tmp_path / "run", cache)
    cfg = RunConfig.load(paths.config)
    status = paths.read_status()
    steps = [row for row in paths.read_metrics() if "images_per_s" in row]

    assert status["state"] == "finished"
    assert status["flops_per_image"] == training_flops_per_image(cfg.model)
    # One probe, at the start, for the run's precision (not one per step): its figure recorded.
    [entry] = json.loads((cache / "peak.json").read_text())["entries"].values()
    assert status["peak_flops"] == entry["flops"] > 0
    assert entry["dtype"] == matmul_type(cfg.train.precision, "cpu") and entry["threads"] >= 1

    assert [row["step"] for row in steps] == [1, 2, 3, 4]
    for row in steps:
        assert math.isfinite(row["mfu"]) and 0 < row["mfu"] <= 1.5, row
        # MFU is the step's achieved FLOP/s over the peak of the one device.
        achieved = row["images_per_s"] * status["flops_per_image"]
        assert row["mfu"] == pytest.approx(achieved / status["peak_flops"])
    assert math.isfinite(status["mfu"]) and 0 < status["mfu"] <= 1.5
    # The panel shows the last steps' median, not one step's swing (a 4-step run: all four).
    assert status["mfu"] == pytest.approx(statistics.median(row["mfu"] for row in steps))
    assert status["images_per_s"] == pytest.approx(
        statistics.median(row["images_per_s"] for row in steps))

