"""Real two-process CPU DDP runs (gloo) of ``python -m mae_core.train``: what each policy needs.

Lightning's DDP re-executes the command for rank 1, so training cannot run inside pytest: every run
is a subprocess (``run_module`` in conftest.py), a few steps on 32-px images.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from mae_core.config import RunConfig
from mae_core.model import MAELightning
from mae_core.rundir import RunPaths
from mae_core.weights import load_model

TINY_DDP = ["--devices", "2", "--accelerator", "cpu", "--image-size", "32", "--patch-size", "8",
            "--batch-size", "8", "--max-steps", "6", "--num-previews", "0"]
UNUSED_PARAMETERS = "parameters that were not used in producing the loss"
FROZEN_CLEAN = {"backbone.mask_token", "backbone.vit.pos_embed", "decoder.pos_embed"}


def train(run_module, runs_dir: Path, *flags: str):
    """One run under ``runs_dir`` (which must be fresh); returns (process result, run paths)."""
    result = run_module("mae_core.train", "--runs-dir", runs_dir, *TINY_DDP, *flags)
    runs = [p for p in runs_dir.iterdir() if p.is_dir()] if runs_dir.exists() else []
    assert len(runs) == 1, f"expected one run directory, got {runs}\n{result.stderr[-3000:]}"
    return result, RunPaths(runs[0])


def _status(paths: RunPaths) -> dict:
    return json.loads(paths.status.read_text())


@pytest.fixture(scope="module")
def clean_run(run_module, tmp_path_factory):
    """ddp-clean on plain DDP: find_unused_parameters=False and no static graph."""
    return train(run_module, tmp_path_factory.mktemp("clean"), "--policy", "ddp-clean",
                 "--static-graph", "false")


def test_ddp_clean_trains_with_plain_ddp(clean_run):
    result, paths = clean_run
    assert result.returncode == 0, result.stderr[-4000:]
    cfg = RunConfig.load(paths.config)
    assert cfg.model.policy == "ddp-clean"
    assert cfg.train.find_unused_parameters is False and cfg.train.static_graph is False
    status = _status(paths)
    assert status["state"] == "finished", status
    assert status["world_size"] == 2
    assert status["step"] == 6
    assert isinstance(status["loss"], float) and math.isfinite(status["loss"])
    assert status["updated"] - 5 < status["step_at"] <= status["updated"]  # its last step's time
    # The panel's speed is the last steps' median, its ETA their pace: not one step's swing.
    rows = [row for row in paths.read_metrics() if "loss" in row]
    assert status["images_per_s"] == pytest.approx(statistics.median(
        row["images_per_s"] for row in rows))
    assert status["step_s"] == pytest.approx(
        (rows[-1]["elapsed_s"] - rows[0]["elapsed_s"]) / (len(rows) - 1))
    losses = [row["loss"] for row in paths.read_metrics() if "loss" in row]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert paths.weights.exists()


def test_reference_fails_with_plain_ddp(run_module, tmp_path):
    result, paths = train(run_module, tmp_path / "runs", "--policy", "reference",
                          "--find-unused-parameters", "false", "--static-graph", "false")
    assert result.returncode != 0
    cfg = RunConfig.load(paths.config)
    assert cfg.train.find_unused_parameters is False and cfg.train.static_graph is False
    status = _status(paths)
    assert status["state"] == "failed", status
    assert status["world_size"] == 2
    assert UNUSED_PARAMETERS in status["error"], status["error"]


def test_reference_trains_with_find_unused_parameters(run_module, tmp_path):
    result, paths = train(run_module, tmp_path / "runs", "--policy", "reference",
                          "--find-unused-parameters", "true")
    assert result.returncode == 0, result.stderr[-4000:]
    assert RunConfig.load(paths.config).train.find_unused_parameters is True
    status = _status(paths)
    assert status["state"] == "finished", status
    assert status["world_size"] == 2 and status["step"] == 6
    assert math.isfinite(status["loss"])


def test_training_leaves_frozen_tensors_bit_identical_and_moves_trainable_ones(clean_run):
    result, paths = clean_run
    assert result.returncode == 0, result.stderr[-4000:]
    cfg = RunConfig.load(paths.config)
    # The initial weights, made the way run_training makes them (seed, then the LightningModule).
    pl.seed_everything(cfg.train.seed, workers=True, verbose=False)
    initial_model = MAELightning.from_config(cfg).mae
    initial = {k: v.detach().clone() for k, v in initial_model.state_dict().items()}
    frozen = {n for n, p in initial_model.named_parameters() if not p.requires_grad}
    trainable = {n for n, p in initial_model.named_parameters() if p.requires_grad}
    assert frozen == FROZEN_CLEAN
    assert not any(".head." in name for name in initial)  # ddp-clean: no classifier head

    trained = load_model(paths.weights).state_dict()
    assert set(trained) == set(initial)
    for name in sorted(frozen):
        assert torch.equal(trained[name], initial[name]), f"frozen {name} changed"
    assert torch.count_nonzero(trained["backbone.mask_token"]) == 0
    unchanged = [name for name in sorted(trainable) if torch.equal(trained[name], initial[name])]
    assert not unchanged, f"trainable tensors that did not change: {unchanged}"
    # Six AdamW steps move each weight by at most ~lr per step (lr ≤ 1e-3, warmed up): a little.
    # This also proves the initial state above is the run's (a different seed would differ by
    # the init scale, ~1e-1).
    worst = max((trained[n] - initial[n]).abs().max().item() for n in trainable)
    assert 0 < worst < 6 * RunConfig.load(paths.config).train.learning_rate() + 1e-6, worst


@pytest.mark.parametrize("flags", [[], ["--accumulate-grad-batches", "2"]],
                         ids=["static-graph", "accumulation-no-sync"])
def test_the_ranks_end_with_bit_identical_weights(run_module, tmp_path, flags):
    """Each rank trains on its own images; only all-reduced gradients keep their weights equal.
    Gradients live in DDP's all-reduce buckets (``gradient_as_bucket_view``); with accumulation
    the first micro-batch skips the all-reduce (``no_sync``) and the static graph is off."""
    out = tmp_path / "digests"
    result = run_module("tests.rank_digest", out, "--runs-dir", tmp_path / "runs", *TINY_DDP,
                        "--max-steps", "3", *flags)
    assert result.returncode == 0, result.stderr[-4000:]
    digests = [(out / f"rank{rank}.txt").read_text() for rank in (0, 1)]
    assert digests[0] == digests[1]
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]  # not .runs.lock
    assert RunPaths(run_dir).read_status()["step"] == 3
