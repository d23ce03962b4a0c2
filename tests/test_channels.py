"""Any channels (issue 13, item 6), end to end on real files: a folder of 1-channel 16-bit TIFFs and
one of 4-channel 8-bit TIFFs (bands in separate planes, as satellite tiles are stored) are told
apart by check_data, trained by the real trainer (one CPU process, tiny ViT, 32 px) with the data
set's own statistics stored in config.yaml, reloaded from model.safetensors and reconstructed from
an upload of the same kind; mixed folders and mismatched uploads are refused with a message.

4-channel data is TIFF (tifffile keeps every band). A PNG's fourth channel is transparency, as
browsers and photo tools treat it: it is composited on white, as before, and the image is RGB.
"""

from __future__ import annotations

import io
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from mae_core import pixels
from mae_core.channels import dataset_stats, resolve_channels
from mae_core.composite import View, fit, parse_view
from mae_core.config import ConfigError, ModelConfig, RunConfig
from mae_core.data import DataError, ImageFolderDataset, check_data, find_images
from mae_core.images import ImageError
from mae_core.model import MaskedAutoencoder
from mae_core.pixels import PixelFormat, probe, read_for
from mae_core.reconstruct import reconstruct
from mae_core.rundir import RunPaths
from mae_core.weights import load_model, save_weights

SIZE = 32
TRAIN = ["--model", "vit-tiny", "--image-size", str(SIZE), "--patch-size", "8", "--batch-size", "4",
         "--accelerator", "cpu", "--devices", "1", "--max-steps", "6", "--num-previews", "2",
         "--preview-every-n-steps", "3", "--checkpoint-every-n-steps", "3",
         "--eval-every-n-steps", "3", "--val-count", "4"]


def scan16(index: int) -> np.ndarray:
    """A smooth 16-bit scan that fills ~12 bits around 20 % of full scale, like a CT or microscope
    image: 8-bit reading would leave it a few grey levels."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    values = 13000 + 5000 * np.sin((xx + 3 * index) / 5.0) + 3000 * np.cos((yy + index) / 4.0)
    return values.astype(np.uint16)


def tile4(index: int) -> np.ndarray:
    """4 bands (C, H, W) of 8-bit values, each band its own pattern and level."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    return np.stack([40 + 50 * c + 30 * np.sin((xx * (c + 1) + index) / 6.0) + 10 * np.cos(yy / 3.0)
                     for c in range(4)]).astype(np.uint8)


def make_gray16(folder: Path, count: int = 12) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        tifffile.imwrite(folder / f"scan_{i:02d}.tif", scan16(i))
    return folder


def make_four(folder: Path, count: int = 12) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        tifffile.imwrite(folder / f"tile_{i:02d}.tif", tile4(i), photometric="minisblack",
                         planarconfig="separate")
    return folder


def rgb_png(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(path)
    return path


# --- reading: channels and bits kept -------------------------------------------------------------

def test_tiff_keeps_16_bits_and_every_band(tmp_path):
    gray = make_gray16(tmp_path / "gray16", 1) / "scan_00.tif"
    assert probe(gray) == PixelFormat(1, 16)
    image = read_for(gray, 1)
    assert image.dtype == torch.uint16 and image.shape == (1, SIZE, SIZE)
    assert np.array_equal(image[0].numpy(), scan16(0))  # every one of the 65,536 levels kept
    four = make_four(tmp_path / "four", 1) / "tile_00.tif"
    assert probe(four) == PixelFormat(4, 8)
    assert np.array_equal(read_for(four, 4).numpy(), tile4(0))
    # Interleaved samples (RGB + near-infrared, as cameras write them): PIL would read only RGB.
    tifffile.imwrite(tmp_path / "rgbn.tif", tile4(0).transpose(1, 2, 0), photometric="rgb",
                     extrasamples=["unspecified"])
    assert np.array_equal(read_for(tmp_path / "rgbn.tif", 4).numpy(), tile4(0))
    # A BigTIFF upload (bytes, no file name to go by) is a TIFF too: PIL cannot read it at all.
    bigtiff = io.BytesIO()
    tifffile.imwrite(bigtiff, tile4(0).transpose(1, 2, 0), bigtiff=True, photometric="rgb",
                     extrasamples=["unspecified"])
    assert np.array_equal(read_for(bigtiff.getvalue(), 4, "big").numpy(), tile4(0))
    # ...but an alpha sample is transparency, as in a PNG: RGB composited on white.
    rgba = np.zeros((SIZE, SIZE, 4), np.uint8)
    rgba[:16, :, :] = (10, 20, 30, 255)  # top half opaque, bottom half fully transparent
    tifffile.imwrite(tmp_path / "rgba.tif", rgba, photometric="rgb", extrasamples=["unassalpha"])
    assert probe(tmp_path / "rgba.tif") == PixelFormat(3, 8)
    composited = read_for(tmp_path / "rgba.tif", 3)
    assert composited[:, 0, 0].tolist() == [10, 20, 30] and int(composited[:, -1].min()) == 255


def test_pil_formats_and_lzw_fallback(tmp_path):
    Image.fromarray(scan16(1)).save(tmp_path / "scan.png")  # 16-bit grayscale PNG ("I;16")
    assert probe(tmp_path / "scan.png") == PixelFormat(1, 16)
    assert np.array_equal(read_for(tmp_path / "scan.png", 1)[0].numpy(), scan16(1))
    rgba = np.zeros((SIZE, SIZE, 4), np.uint8)  # a PNG's alpha is transparency: RGB on white
    Image.fromarray(rgba).save(tmp_path / "clear.png")
    assert probe(tmp_path / "clear.png") == PixelFormat(3, 8)
    assert int(read_for(tmp_path / "clear.png", 3).min()) == 255
    # LZW needs imagecodecs in tifffile; PIL decodes it when it keeps every band.
    Image.fromarray(scan16(2)).save(tmp_path / "lzw.tif", compression="tiff_lzw")
    assert np.array_equal(read_for(tmp_path / "lzw.tif", 1)[0].numpy(), scan16(2))


def test_wrong_channel_count_is_a_clear_image_error(tmp_path):
    four = make_four(tmp_path / "four", 1) / "tile_00.tif"
    with pytest.raises(ImageError, match="tile_00.tif: a 4-channel image, but the model takes "
                                         "1-channel images"):
        read_for(four, 1)
    with pytest.raises(ImageError, match="a 3-channel image, but the model takes 4-channel"):
        read_for(rgb_png(tmp_path / "photo.png"), 4)
    # A colour model reads 8-bit grayscale as RGB, as it always did.
    Image.fromarray(np.full((8, 8), 77, np.uint8)).save(tmp_path / "gray.png")
    assert read_for(tmp_path / "gray.png", 3).shape == (3, 8, 8)


# --- reading untrusted TIFFs: one image decoded, bounded, and any damage an ImageError ------------

def tiff_bytes(array: np.ndarray, **options) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, **options)
    return buffer.getvalue()


def garble_pages(data: bytes, first: int) -> bytes:
    """``data`` with the compressed pixels of every page from ``first`` on overwritten."""
    out = bytearray(data)
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        for page in tif.pages[first:]:
            for offset, count in zip(page.dataoffsets, page.databytecounts):
                out[offset:offset + count] = b"\xff" * count
    return bytes(out)


def test_a_many_page_tiff_decodes_its_first_page_only():
    page, yy, xx = np.mgrid[0:40, 0:256, 0:256]
    pages = ((xx + 3 * yy + 7 * page)[..., None] + 50 * np.arange(3)) % 256  # 40 RGB pages
    pages = pages.astype(np.uint8)
    data = tiff_bytes(pages, photometric="rgb", compression="zlib")
    assert probe(data) == PixelFormat(3, 8)
    tracemalloc.start()
    try:
        image = read_for(data, 3)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.array_equal(image.numpy(), pages[0].transpose(2, 0, 1))
    assert peak < 10 * pages[0].nbytes, f"decoding took {peak / pages[0].nbytes:.0f} pages' memory"
    # Pages 1.. are never decoded: garbage in their compressed data changes nothing.
    assert np.array_equal(read_for(garble_pages(data, 1), 3).numpy(), pages[0].transpose(2, 0, 1))


def test_an_imagej_hyperstack_keeps_every_channel_of_its_first_time_point():
    stack = np.random.default_rng(0).integers(0, 65535, (4, 3, SIZE, SIZE), dtype=np.uint16)
    data = tiff_bytes(stack, imagej=True, metadata={"axes": "TCYX"}, compression="zlib")
    assert probe(data) == PixelFormat(3, 16)
    assert np.array_equal(read_for(data, 3).numpy(), stack[0])
    # The channel pages of T=0 are read, and only those.
    assert np.array_equal(read_for(garble_pages(data, 3), 3).numpy(), stack[0])
    with pytest.raises(ImageError, match="corrupt or truncated"):
        read_for(garble_pages(data, 2), 3)  # channel 2 of T=0 is damaged
    # A truncated ImageJ file (one IFD, all pixels after it) is read whole, and only when small.
    data = tiff_bytes(stack, imagej=True, metadata={"axes": "TCYX"}, truncate=True)
    assert np.array_equal(read_for(data, 3).numpy(), stack[0])


def with_size(data: bytes, width: int, height: int) -> bytes:
    """``data`` (one uncompressed page) whose header claims ``width``×``height`` pixels."""
    out = bytearray(data)
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        tags = tif.pages[0].tags
        for name, value in (("ImageWidth", width), ("ImageLength", height)):
            tag = tags[name]
            assert tag.dtype in (3, 4)  # SHORT or LONG, stored in the tag itself
            size = 2 if tag.dtype == 3 else 4
            out[tag.valueoffset:tag.valueoffset + size] = value.to_bytes(size, "little")
    return bytes(out)


def test_too_many_channels_or_values_are_refused_before_decoding(monkeypatch):
    bands = np.zeros((65, 8, 8), np.uint8)
    many = tiff_bytes(bands, photometric="minisblack", planarconfig="separate")
    for call in (lambda: probe(many, "bands.tif"), lambda: read_for(many, 65, "bands.tif")):
        with pytest.raises(ImageError, match=r"bands.tif: 65 channels .* \(limit 64 channels\)"):
            call()
    # 5 bands of 8000×8000 (each band within the pixel limit) claimed by a 640-byte file: the
    # header is refused (a decode would fail on the missing data instead).
    claim = with_size(tiff_bytes(bands[:5], photometric="minisblack", planarconfig="separate",
                                 rowsperstrip=65535), 8000, 8000)
    for call in (lambda: probe(claim, "big.tif"), lambda: read_for(claim, 5, "big.tif")):
        with pytest.raises(ImageError, match=r"big.tif: 8000×8000 pixels × 5 channels is too "
                                             r"large \(limit 256,000,000 values\)"):
            call()
    # A layout read whole (a truncated ImageJ file) is refused when the whole is too large.
    stack = np.zeros((4, 3, 20, 30), np.uint8)
    data = tiff_bytes(stack, imagej=True, metadata={"axes": "TCYX"}, truncate=True)
    monkeypatch.setattr(pixels, "MAX_SAMPLES", stack.size - 1)
    with pytest.raises(ImageError, match=r"upload: reading it would decode 7,200 values \(its TIFF "
                                         r"layout, axes TCYX of shape \(4, 3, 20, 30\), is only "
                                         r"read whole\), more than the limit of 7,199"):
        read_for(data, 3)


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL's, on the damaged files it reads
def test_damaged_tiffs_raise_only_image_errors():
    """Bytes flipped and files cut short, as uploads and copies damage them: tifffile raises
    ZeroDivisionError, zlib.error, struct.error, TypeError... each must become an ImageError."""
    rng = np.random.default_rng(0)
    seeds = [  # (file, channels it holds)
        (tiff_bytes(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8), photometric="rgb"), 3),
        (tiff_bytes(rng.integers(0, 65535, (16, 16), dtype=np.uint16)), 1),
        (tiff_bytes(rng.integers(0, 255, (3, 16, 16, 3), dtype=np.uint8), photometric="rgb"), 3),
        (tiff_bytes(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8), photometric="rgb",
                    compression="zlib"), 3),
    ]
    escaped = []
    for data, channels in seeds:
        for i in range(100):
            damaged = bytearray(data)
            if i % 10 == 9:  # cut short
                damaged = damaged[:int(rng.integers(8, len(data)))]
            else:  # 1 to 3 bytes changed, half of them in the header and first IFD
                for _ in range(int(rng.integers(1, 4))):
                    end = 400 if i % 2 else len(data)
                    damaged[int(rng.integers(0, end))] = int(rng.integers(0, 256))
            for model in (None, channels, 3):  # probe, then read for its own and an RGB model
                try:
                    probe(bytes(damaged)) if model is None else read_for(bytes(damaged), model)
                except ImageError:
                    pass
                except Exception as err:  # noqa: BLE001 - what this test looks for
                    escaped.append(f"{type(err).__name__}: {err}")
    assert not escaped, f"{len(escaped)} non-ImageError exceptions, e.g. {escaped[:5]}"


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
    from mae_core import prepared

    folder = make_gray16(tmp_path / "gray16", 6)
    with pytest.raises(DataError, match="1-channel 16-bit images; a prepared set stores 8-bit RGB"):
        prepared.prepare(str(folder), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(prepared, "AUTO_PREPARE_ABOVE", 4)  # "large": it would be streamed
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


# --- display ------------------------------------------------------------------------------------

def test_display_gray_composite_and_stretch():
    image = torch.rand(4, 8, 8) * 0.1 + 0.2  # a dim image: 0.2–0.3 of full scale
    gray = fit(image[:1], View(), bits=16)(image[:1])
    assert gray.shape == (3, 8, 8) and torch.equal(gray[0], gray[2])
    assert gray.min() == 0 and gray.max() == 1  # stretched 1st–99th percentile to black–white
    composite = fit(image, parse_view("4,3,2", 4, "none"))(image)
    assert torch.equal(composite, image[[3, 2, 1]])
    rgb = torch.rand(3, 8, 8)
    assert torch.equal(fit(rgb, View(), bits=8)(rgb), rgb)  # 8-bit RGB: unchanged
    with pytest.raises(ConfigError, match="display channels: give one channel .* numbered 1 to 4"):
        parse_view("5", 4)
    with pytest.raises(ConfigError, match="display channels"):
        parse_view("1,2", 4)


# --- a real run on each kind: train, store, reload, reconstruct ---------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory, run_module) -> dict[str, tuple[Path, RunPaths]]:
    root = tmp_path_factory.mktemp("channels")
    out = {}
    for name, make in (("gray16", make_gray16), ("four", make_four)):
        folder = make(root / name)
        done = run_module("mae_core.train", "--data", folder, "--runs-dir", root / "runs",
                          "--run-dir", root / "runs" / name, *TRAIN)
        assert done.returncode == 0, done.stderr[-3000:]
        out[name] = (folder, RunPaths(root / "runs" / name))
    return out


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
