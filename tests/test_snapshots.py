"""mae_core.snapshots: the newest K weight snapshots of a run, written by the trainer's callback
(called here on rank 0 as the trainer calls it), hard-linked to ``model.safetensors`` when that
holds the same step, and unchanged by the run's later saves."""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch
from safetensors.torch import load_file

from mae_core.config import ModelConfig
from mae_core.model import MaskedAutoencoder
from mae_core.rundir import RunPaths
from mae_core.snapshots import WeightSnapshots, list_snapshots, nearest_snapshot
from mae_core.weights import read_metadata, save_weights

MODEL = ModelConfig(image_size=32, patch_size=8)


def model(seed: int) -> MaskedAutoencoder:
    torch.manual_seed(seed)
    return MaskedAutoencoder(MODEL)


def same_weights(a, b) -> bool:
    first, second = load_file(a), load_file(b)
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_snapshot_links_this_steps_weights_and_survives_the_next_save(tmp_path):
    paths = RunPaths(tmp_path)
    keeper = WeightSnapshots(tmp_path, keep=2, every_n_steps=100)
    step0 = model(0)
    keeper.save(SimpleNamespace(global_step=0), SimpleNamespace(mae=step0))  # no weights yet
    assert read_metadata(paths.snapshot(0))["step"] == "0"
    trained = model(1)
    save_weights(trained, paths.weights, step=100)  # SaveCheckpoints, just before
    keeper.save(SimpleNamespace(global_step=100), SimpleNamespace(mae=trained))
    linked = paths.snapshot(100)
    assert os.stat(linked).st_ino == os.stat(paths.weights).st_ino  # no second write
    save_weights(model(2), paths.weights, step=200)  # the next checkpoint renames a new file in
    assert os.stat(linked).st_ino != os.stat(paths.weights).st_ino
    assert read_metadata(linked)["step"] == "100"
    assert not same_weights(linked, paths.weights)
    # Weights of another step are not linked: the snapshot is written from the model.
    keeper.save(SimpleNamespace(global_step=150), SimpleNamespace(mae=model(3)))
    assert read_metadata(paths.snapshot(150))["step"] == "150"
    assert [step for step, _ in list_snapshots(tmp_path)] == [100, 150]  # the newest 2 kept


def test_listing_ignores_other_files_and_nearest_picks_the_closest(tmp_path):
    folder = tmp_path / "snapshots"
    folder.mkdir()
    for name in ("step_0000050.safetensors", "step_0000100.safetensors", "notes.txt",
                 ".step_0000150.safetensors.123.abcdefgh.tmp"):
        (folder / name).write_bytes(b"")
    snapshots = list_snapshots(tmp_path)
    assert [step for step, _ in snapshots] == [50, 100]
    assert nearest_snapshot(snapshots, 60)[0] == 50 and nearest_snapshot(snapshots, 75)[0] == 100
    assert nearest_snapshot([], 10) is None and list_snapshots(tmp_path / "none") == []
