"""Any channels (issue 13, item 6), end to end on real files: a folder of 1-channel 16-bit TIFFs and
one of 4-channel 8-bit TIFFs (bands in separate planes, as satellite tiles are stored) are told
apart by check_data, trained by the real trainer (one CPU process, tiny ViT, 32 px) with the data
set's own statistics stored in config.yaml, reloaded from model.safetensors and reconstructed from
an upload of the same kind; mixed folders and mismatched uploads are refused with a message.

4-channel data is TIFF (tifffile keeps every band). A PNG's fourth channel is transparency, as
browsers and photo tools treat it: it is composited on white, as before, and the image is RGB.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from mae_core.channels import dataset_stats, resolve_channels
from mae_core.config import ConfigError, ModelConfig, RunConfig
from mae_core.data import DataError, ImageFolderDataset, check_data, find_images
from mae_core.model import MaskedAutoencoder
from mae_core.pixels import read_for
from mae_core.reconstruct import reconstruct
from mae_core.rundir import RunPaths
from mae_core.weights import load_model, save_weights
from tests.helpers import SIZE, make_four, make_gray16, rgb_png, scan16, tile4

TRAIN = ["--model", "vit-tiny", "--image-size", str(SIZE), "--patch-size", "8", "--batch-size", "4",
         "--accelerator", "cpu", "--devices", "1", "--max-steps", "6", "--num-previews", "2",
         "--preview-every-n-steps", "3", "--checkpoint-every-n-steps", "3",
         "--eval-every-n-steps", "3", "--val-count", "4"]


# --- the data set: one kind, its statistics -------------------------------------------------------

def test_check_data_reports_channels_and_bits(tmp_path):
    gray = check_data(str(make_gray16(tmp_path / "gray16")))
    assert (gray.files, gray.channels, gray.bits) == (12, 1, 16)
    four = check_data(str(make_four(tmp_path / "four")))
    assert (four.files, four.channels, four.bits) == (12, 4, 8)
    photos = check_data("")  # the sample photos mix RGB and 8-bit grayscale: read as RGB
    assert (photos.channels, photos.bits) == (3, 8)


def test_mixed_folder_is_refused_naming_an_example_of_each(tmp_path):
    folder = make_gray16(tmp_path / "mixed", 2)
    make_four(folder, 1)
    rgb_png(folder / "photo.png")
    with pytest.raises(DataError) as err:
        check_data(str(folder))
    text = str(err.value)
    assert "mixes kinds of images" in text
    for kind, example in (("1-channel 16-bit", "scan_00.tif"), ("4-channel 8-bit", "tile_00.tif"),
                          ("3-channel 8-bit", "photo.png")):
        assert f"{kind} (e.g. {folder / example})" in text


def test_non_rgb_folders_are_never_squashed_into_a_prepared_set(tmp_path, monkeypatch):
    from mae_core import datasource, prepared

    folder = make_gray16(tmp_path / "gray16", 6)
    with pytest.raises(DataError, match="1-channel 16-bit images; a prepared set stores 8-bit RGB"):
        prepared.prepare(str(folder), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # "large": it would be streamed (datasource.held_in_memory decides; the message names the limit)
    monkeypatch.setattr(datasource, "AUTO_PREPARE_ABOVE", 4)
    monkeypatch.setattr(prepared, "AUTO_PREPARE_ABOVE", 4)
    with pytest.raises(DataError, match="would lose its channels or precision"):
        check_data(str(folder))


def test_dataset_stats_are_the_per_channel_mean_and_std(tmp_path):
    folder = make_four(tmp_path / "four", 6)
    mean, std = dataset_stats(find_images(str(folder)), 4, SIZE)
    values = np.stack([tile4(i) for i in range(6)]).astype(np.float64) / 255
    assert np.allclose(mean, values.mean(axis=(0, 2, 3)), atol=1e-6)
    assert np.allclose(std, values.std(axis=(0, 2, 3)), atol=1e-6)


def test_resolve_fills_channels_and_refuses_contradictions(tmp_path):
    folder = str(make_gray16(tmp_path / "gray16"))
    base = RunConfig().with_overrides(data=folder, image_size=SIZE)
    model = resolve_channels(base, check_data(folder)).model
    assert (model.in_chans, model.normalize) == (1, "dataset")
    mean, std = float(model.pixel_mean), float(model.pixel_std)
    values = np.stack([scan16(i) for i in range(12)]) / 65535
    assert mean == pytest.approx(values.mean(), abs=1e-5) and std == pytest.approx(values.std(), rel=1e-3)
    with pytest.raises(ConfigError, match="in_chans: is 3 but .* holds 1-channel"):
        resolve_channels(base.with_overrides(in_chans=3), check_data(folder))
    with pytest.raises(ConfigError, match="normalize: imagenet statistics are for RGB"):
        resolve_channels(base.with_overrides(normalize="imagenet"), check_data(folder))
    given = base.with_overrides(in_chans=1, normalize="dataset", pixel_mean="0.2", pixel_std="0.05")
    assert resolve_channels(given, check_data(folder)).model.pixel_mean == "0.2"  # kept
    by_hand = RunConfig().with_overrides(pixel_mean="0.4,0.4,0.4", pixel_std="0.2,0.2,0.2")
    assert resolve_channels(by_hand, check_data("")).model.normalize == "dataset"
    rgb = resolve_channels(RunConfig(), check_data("")).model  # RGB photos: as before
    assert (rgb.in_chans, rgb.normalize, rgb.pixel_mean) == (3, "imagenet", "")


def test_dataset_yields_uint16_crops_for_16_bit_data(tmp_path):
    paths = find_images(str(make_gray16(tmp_path / "gray16", 4)))
    crop = ImageFolderDataset(paths, SIZE, channels=1)[0]
    assert crop.dtype == torch.uint16 and crop.shape == (1, SIZE, SIZE)
    assert len(torch.unique(crop.to(torch.int32))) > 256  # more levels than 8 bits hold


def test_16_bit_crops_never_wrap_around_at_edges(tmp_path):
    """torchvision clamps bicubic overshoot only for uint8: on uint16 a black pixel beside a white
    edge wrapped to ~62,000. Every crop of a black | white image must stay monotonic."""
    edge = np.zeros((SIZE * 2, SIZE * 2), np.uint16)
    edge[:, SIZE:] = 65535
    tifffile.imwrite(tmp_path / "edge.tif", edge)
    dataset = ImageFolderDataset([tmp_path / "edge.tif"], SIZE, length=20, channels=1)
    for i in range(20):
        steps = dataset[i][0].to(torch.int32).diff(dim=1)
        assert bool((steps >= 0).all()) or bool((steps <= 0).all())


# --- the model: in_chans, statistics, 16-bit precision ----------------------------------------------

def test_model_follows_in_chans_and_keeps_16_bit_precision(tmp_path):
    cfg = ModelConfig(image_size=SIZE, patch_size=8, in_chans=4, normalize="dataset",
                      pixel_mean="0.1,0.2,0.3,0.4", pixel_std="0.5,0.5,0.5,0.5")
    model = MaskedAutoencoder(cfg)
    assert model.backbone.vit.patch_embed.proj.weight.shape[1] == 4
    assert model.prediction_head.out_features == 8 * 8 * 4
    assert model.pixel_mean.flatten().tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4])
    one = MaskedAutoencoder(ModelConfig(image_size=SIZE, patch_size=8, in_chans=1,
                                        normalize="dataset", pixel_mean="0.2", pixel_std="0.01"))
    levels = torch.tensor([13000, 13001], dtype=torch.int32).to(torch.uint16).view(1, 1, 1, 2)
    x = one.normalize(levels)
    assert float(x[..., 1] - x[..., 0]) == pytest.approx(1 / 65535 / 0.01, rel=1e-3)  # 1 level
    save_weights(model, tmp_path / "model.safetensors")
    loaded = load_model(tmp_path / "model.safetensors")  # the statistics travel with the weights
    assert loaded.cfg == cfg and torch.equal(loaded.pixel_std, model.pixel_std)


def test_wrong_normalisation_config_is_refused():
    with pytest.raises(ConfigError, match="normalize: imagenet statistics are for 3-channel"):
        ModelConfig(in_chans=1, normalize="imagenet")
    with pytest.raises(ConfigError, match="pixel_mean: has 2 value"):
        ModelConfig(in_chans=1, normalize="dataset", pixel_mean="0.1,0.2", pixel_std="0.1,0.1")
    with pytest.raises(ConfigError, match="pixel_std: every value must be above 0"):
        ModelConfig(in_chans=1, normalize="dataset", pixel_mean="0.1", pixel_std="0")
    with pytest.raises(ConfigError, match="pixel_mean: give pixel_mean and pixel_std together"):
        ModelConfig(in_chans=1, pixel_mean="0.1")
    with pytest.raises(ConfigError, match="pixel_mean: must be numbers separated by commas"):
        ModelConfig(in_chans=2, normalize="dataset", pixel_mean="0.1;0.2", pixel_std="1,2")
    spelled = ModelConfig(in_chans=2, normalize="dataset", pixel_mean=" 0.10, .2", pixel_std="1,2")
    assert spelled.pixel_mean == "0.1,0.2"  # one spelling: equal configs compare equal


# --- a real run on each kind: train, store, reload, reconstruct ---------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory, run_module) -> dict[str, tuple[Path, RunPaths]]:
    """Both kinds trained at once (most of a short run is its imports, one core each), each in a
    runs folder of its own, with a list of the machine's runs folders of its own (a CPU run holds
    every core of the machine: mae_core.runsdirs), then put side by side in one."""
    from concurrent.futures import ThreadPoolExecutor

    root = tmp_path_factory.mktemp("channels")
    (root / "runs").mkdir()
    folders = {name: make(root / name) for name, make in (("gray16", make_gray16),
                                                          ("four", make_four))}

    def train(name: str) -> None:
        done = run_module("mae_core.train", "--data", folders[name], "--run-dir",
                          root / f"runs-{name}" / name, *TRAIN,
                          env={"MAE_STUDIO_RUNS_DIRS": str(root / f"runs-dirs-{name}.json")})
        assert done.returncode == 0, done.stderr[-3000:]
        (root / f"runs-{name}" / name).rename(root / "runs" / name)

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(train, folders))
    return {name: (folder, RunPaths(root / "runs" / name)) for name, folder in folders.items()}


@pytest.mark.parametrize("name, channels", [("gray16", 1), ("four", 4)])
def test_training_stores_channels_and_statistics(runs, name, channels):
    _, paths = runs[name]
    cfg = RunConfig.load(paths.config)
    assert (cfg.model.in_chans, cfg.model.normalize) == (channels, "dataset")
    assert len(cfg.model.pixel_mean.split(",")) == channels
    model = load_model(paths.weights)
    assert model.cfg == cfg.model  # the weights file carries the same statistics
    assert max(p.name for p in paths.previews.glob("step_*.png")) == "step_0000006.png"


def test_16_bit_reconstruction_has_no_tint_or_offset(runs, tmp_path):
    """Visible patches come back as the upload's own 16-bit values (no 8-bit rounding, no shift),
    and the masked patches' reconstruction sits at the upload's level: with the 0.5 ± 0.25 of a
    model that lost its statistics it would be ~0.5, with the data's own ~0.2."""
    _, paths = runs["gray16"]
    model = load_model(paths.weights)
    upload = tmp_path / "new_scan.tif"
    tifffile.imwrite(upload, scan16(40))
    image = read_for(upload, 1)
    [result] = reconstruct(model, image[None], seed=3)
    expected = torch.from_numpy(scan16(40).astype(np.float32) / 65535)
    visible = ~result.patch_masked.repeat_interleave(8, 0).repeat_interleave(8, 1)
    assert torch.allclose(result.pasted[0][visible], expected[visible], atol=1e-6)
    masked = ~visible
    offset = float(result.reconstruction[0][masked].mean() - expected[masked].mean())
    assert abs(offset) < 0.05, offset  # measured 0.003; lost statistics give 0.31


def test_reconstruct_tab_on_each_kind(runs, tmp_path):
    from mae_core.runs import RunManager
    from ui import reconstruct as tab
    from ui.common import AppContext

    ctx = AppContext(RunManager(next(iter(runs.values()))[1].root.parent))
    upload16 = tmp_path / "scan.tif"
    tifffile.imwrite(upload16, scan16(50))
    photo = rgb_png(tmp_path / "photo.png")
    result = tab.reconstruct_files(ctx, [str(upload16), str(photo)], False, "gray16", 0.75, 0)
    assert [row[0] for row in result.rows] == ["scan.tif"]
    assert result.refused == [("photo.png",
                               "a 3-channel image, but the model takes 1-channel images")]
    assert "1-channel images, dataset normalisation" in result.message
    upload4 = tmp_path / "tile.tif"
    tifffile.imwrite(upload4, tile4(50), photometric="minisblack", planarconfig="separate")
    result = tab.reconstruct_files(ctx, [str(upload4)], False, "four", 0.75, 0, "4,3,2")
    assert [row[0] for row in result.rows] == ["tile.tif"] and "data:image/png" in result.html
    with pytest.raises(ConfigError, match="display channels"):
        tab.reconstruct_files(ctx, [str(upload4)], False, "four", 0.75, 0, "7")
    html, message = tab.reconstruct_history(ctx, "four", 6, 0.75, 0, "4,3,2", "percentile")
    assert "(held out)" in message and "data:image/png" in html  # the weights history, 4 bands


def test_exported_four_channel_encoder_loads_into_timm(runs, tmp_path):
    import json

    import timm
    from safetensors import safe_open
    from safetensors.torch import load_file

    from mae_core.weights import export_encoder

    _, paths = runs["four"]
    export_encoder(paths.weights, tmp_path / "encoder.safetensors")
    with safe_open(str(tmp_path / "encoder.safetensors"), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["in_chans"] == "4" and len(json.loads(meta["pixel_mean"])) == 4
    vit = timm.create_model(meta["timm_name"], pretrained=False, img_size=SIZE, patch_size=8,
                            in_chans=4, num_classes=3)
    missing, unexpected = vit.load_state_dict(load_file(tmp_path / "encoder.safetensors"),
                                              strict=False)
    assert set(missing) == {"head.weight", "head.bias"} and not unexpected


def test_train_tab_says_what_kind_of_images_it_found(tmp_path):
    from ui.datafield import data_info

    text = data_info(str(make_gray16(tmp_path / "gray16", 3)))
    assert "3 image file(s) found; 1-channel (grayscale) 16-bit images: in_chans 1" in text
    assert "in_chans" not in data_info("")  # RGB photos: as before
    mixed = make_four(tmp_path / "gray16", 1)
    assert "mixes kinds of images" in data_info(str(mixed))


def test_a_copied_run_recomputes_its_statistics_from_the_data_it_names(runs, tmp_path):
    from mae_core.channels import for_new_data
    from mae_core.runs import RunManager
    from ui.configfile import form_from_run

    folder, paths = runs["gray16"]
    cfg = RunConfig.load(paths.config)
    values = form_from_run(RunManager(paths.root.parent), "gray16")
    assert (values["in_chans"], values["pixel_mean"], values["normalize"]) == (0, "", "dataset")
    again = resolve_channels(for_new_data(cfg), check_data(str(folder)))
    assert again.model == cfg.model  # the same folder: the same statistics
    other = tmp_path / "brighter"  # another folder: its own statistics, not the copied ones
    other.mkdir()
    for i in range(4):
        tifffile.imwrite(other / f"scan_{i:02d}.tif", scan16(i) * 2)
    moved = resolve_channels(for_new_data(cfg).with_overrides(data=str(other)),
                             check_data(str(other)))
    expected = np.stack([scan16(i) * 2 for i in range(4)]).mean() / 65535
    assert float(moved.model.pixel_mean) == pytest.approx(expected, abs=1e-5)
    assert abs(float(moved.model.pixel_mean) - float(cfg.model.pixel_mean)) > 0.1
