"""Weights files: written in place atomically, loaded without unpickling, damage reported clearly."""

from __future__ import annotations

import pytest
import torch

from mae_core.config import ModelConfig
from mae_core.fileio import is_temp_file
from mae_core.model import MaskedAutoencoder
from mae_core.weights import WeightsError, load_model, read_metadata, save_weights

CFG = ModelConfig(preset="vit-tiny", image_size=32, patch_size=8)


def test_weights_round_trip_and_a_second_save_replaces_the_first_in_place(tmp_path, monkeypatch):
    elsewhere = tmp_path / "tmpdir"
    elsewhere.mkdir()
    monkeypatch.setenv("TMPDIR", str(elsewhere))
    monkeypatch.setattr("tempfile.tempdir", None)
    torch.manual_seed(0)
    model = MaskedAutoencoder(CFG)
    path = tmp_path / "run" / "model.safetensors"
    save_weights(model, path, step=2)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    save_weights(model, path, step=4)
    loaded = load_model(path)
    assert read_metadata(path)["step"] == "4"
    for (name, saved), (_, live) in zip(loaded.state_dict().items(), model.state_dict().items()):
        assert torch.equal(saved, live), name
    assert list(elsewhere.iterdir()) == []
    assert [p.name for p in path.parent.iterdir() if is_temp_file(p)] == []


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_a_damaged_weights_file_is_refused_with_a_clear_error(tmp_path, damage):
    path = tmp_path / "model.safetensors"
    save_weights(MaskedAutoencoder(CFG), path)
    data = path.read_bytes()
    path.write_bytes({"empty": b"", "truncated": data[: len(data) // 2],
                      "garbage": b"\x00" * 64}[damage])
    with pytest.raises(WeightsError, match="model.safetensors"):
        load_model(path)
