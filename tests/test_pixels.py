"""Images with their own channels and bit depth (mae_core/pixels.py): 16-bit values and every
band of a TIFF kept, a wrong channel count refused naming both counts, an untrusted TIFF decoded
one image at a time within bounds (any damage an ImageError), and a TIFF turned as its Orientation
tag says, like a PNG."""

from __future__ import annotations

import io
import tracemalloc

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from mae_core import pixels
from mae_core.images import ImageError
from mae_core.pixels import PixelFormat, probe, read_for
from tests.helpers import SIZE, make_four, make_gray16, rgb_png, scan16, tile4


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
    assert probe(tmp_path / "rgba.tif").alpha_tiff and not probe(tmp_path / "rgbn.tif").alpha_tiff
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


# --- TIFF orientation ---------------------------------------------------------------------------

def _tiff(array: np.ndarray, orientation: int, **options) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, extratags=[(274, "H", 1, orientation, True)], **options)
    return buffer.getvalue()


def _png(array: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG", exif=exif)
    return buffer.getvalue()


@pytest.mark.parametrize("orientation", range(2, 9))  # 1 is upright already
def test_a_tiff_stands_as_its_orientation_tag_says_like_a_png(orientation):
    """tifffile leaves tag 274 to the reader: a camera's rotated TIFF came out lying on its side
    while the same image as PNG (exif_transpose) stood upright."""
    rng = np.random.default_rng(orientation)
    rgb = rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)
    expected = read_for(_png(rgb, orientation), 3, "x.png")
    assert (expected.shape[1] == 30) == (orientation >= 5)  # the PNG path does turn it
    tiff = read_for(_tiff(rgb, orientation, photometric="rgb"), 3, "x.tif")
    assert np.array_equal(tiff.numpy(), expected.numpy())
    gray = rng.integers(0, 255, (20, 30), dtype=np.uint8)
    gray_png = read_for(_png(gray, orientation), 3, "g.png")
    gray_tiff = _tiff(gray, orientation, photometric="minisblack")
    assert np.array_equal(read_for(gray_tiff, 3, "g.tif").numpy(), gray_png.numpy())
    assert np.array_equal(read_for(gray_tiff, 1, "g.tif").numpy(), gray_png.numpy()[:1])


@pytest.mark.parametrize("orientation", [0, 9, 65535])
def test_a_tiff_with_an_orientation_outside_1_to_8_is_read_upright_in_silence(orientation, caplog):
    """tifffile logged such a tag as an error, twice per file: two lines per image per epoch in
    a run's train.log, about nothing wrong (it is read as 1, as a PNG with it is)."""
    rgb = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    with caplog.at_level("DEBUG"):
        tiff = read_for(_tiff(rgb, orientation, photometric="rgb"), 3, "x.tif")
    assert np.array_equal(tiff.numpy(), np.transpose(rgb, (2, 0, 1)))
    assert not [r for r in caplog.records if r.name.startswith("tifffile")], caplog.text


def test_a_16_bit_tiff_keeps_its_values_when_turned(tmp_path):
    scan = np.arange(20 * 30, dtype=np.uint16).reshape(20, 30) * 100
    tifffile.imwrite(tmp_path / "scan.tif", scan, extratags=[(274, "H", 1, 6, True)])
    turned = read_for(tmp_path / "scan.tif", 1)
    assert turned.dtype.itemsize == 2
    assert np.array_equal(turned.numpy()[0], np.rot90(scan, -1))  # 6: a quarter turn clockwise
