"""Opening a person's images (mae_core/images.py, mae_core/pixels.py): hostile files end as an
ImageError naming the file, wherever they are read; TIFFs stand as their Orientation tag says."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from mae_core.data import DataError, ImageFolderDataset, check_data
from mae_core.images import ImageError, open_rgb
from mae_core.pixels import read_for

MAKE, WHITE_POINT = 0x010F, 0x013E  # EXIF tags: Make is text, WhitePoint two rationals


def _exif() -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: exif_transpose rotates, and re-serialises the block
    exif[MAKE] = "maker"
    return exif


def _jpeg_with_damaged_exif() -> bytes:
    """A photo whose EXIF Make entry was renumbered WhitePoint (one byte) and still holds text:
    Pillow raises TypeError writing that "rational" back out while rotating the image."""
    block = _exif().tobytes()
    entry = struct.pack(">HH", MAKE, 2)  # big-endian: tag, type ASCII
    assert block.count(entry) == 1
    damaged = block.replace(entry, struct.pack(">HH", WHITE_POINT, 2))
    buffer = io.BytesIO()
    Image.new("RGB", (24, 16), (10, 200, 10)).save(buffer, "JPEG", exif=damaged)
    return buffer.getvalue()


def _webp_with_damaged_exif() -> bytes:
    """A WebP whose EXIF block's TIFF header is broken: Pillow raises SyntaxError on reading it."""
    buffer = io.BytesIO()
    Image.new("RGB", (24, 16)).save(buffer, "WEBP", exif=_exif().tobytes())
    data = buffer.getvalue()
    head = b"MM\0*" if b"MM\0*" in data else b"II*\0"
    return data.replace(head, b"XX" + head[2:], 1)


def _dds_header() -> bytes:
    """128 bytes of a DDS header with no pixel format: Pillow raises NotImplementedError."""
    return b"DDS " + struct.pack("<I", 124) + bytes(120)


def hostile_files(folder: Path) -> list[Path]:
    """Three small files that made Pillow raise past the ImageError the callers catch."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"exif.jpg": _jpeg_with_damaged_exif(), "exif.webp": _webp_with_damaged_exif(),
             "0.png": _dds_header()}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return [folder / name for name in files]


def _photo(path: Path, seed: int) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def test_hostile_files_are_image_errors_naming_the_file(tmp_path):
    for path in hostile_files(tmp_path):
        for read in (lambda: open_rgb(path), lambda: read_for(path, 3), lambda: read_for(path, 1),
                     lambda: open_rgb(path.read_bytes(), name=path.name)):
            with pytest.raises(ImageError, match=f"^{path.name}: "):
                read()


def test_a_damaged_exif_block_is_said_to_be_one(tmp_path):
    path = hostile_files(tmp_path)[0]
    with pytest.raises(ImageError, match="EXIF metadata .* is damaged .*: save the image again"):
        read_for(path, 3)


def test_the_data_check_and_the_dataset_skip_hostile_files(tmp_path):
    """Before, the check passed on the readable photo and the run died on the first hostile file
    ("TypeError: bad operand type for abs(): 'str'", naming no file)."""
    hostile = hostile_files(tmp_path)
    good = [_photo(tmp_path / f"photo{i}.png", seed=i) for i in range(2)]
    summary = check_data(str(tmp_path))
    assert summary.files == 5
    cached = ImageFolderDataset(sorted(hostile + good), 16)
    assert cached.skipped == 3 and cached.num_images == 2
    streamed = ImageFolderDataset(sorted(hostile + good), 16, cache_limit_bytes=0)  # per access
    assert all(streamed[i].shape == (3, 16, 16) for i in range(len(streamed)))
    only_hostile = tmp_path / "only"
    hostile_files(only_hostile)
    with pytest.raises(DataError, match="none of the 3 image files .* can be read"):
        check_data(str(only_hostile))


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


def test_a_16_bit_tiff_keeps_its_values_when_turned(tmp_path):
    scan = np.arange(20 * 30, dtype=np.uint16).reshape(20, 30) * 100
    tifffile.imwrite(tmp_path / "scan.tif", scan, extratags=[(274, "H", 1, 6, True)])
    turned = read_for(tmp_path / "scan.tif", 1)
    assert turned.dtype.itemsize == 2
    assert np.array_equal(turned.numpy()[0], np.rot90(scan, -1))  # 6: a quarter turn clockwise
