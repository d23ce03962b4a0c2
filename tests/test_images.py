"""Opening a person's images (mae_core/images.py, mae_core/pixels.py): hostile files end as an
ImageError naming the file, wherever they are read."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
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


@pytest.mark.parametrize("width, height", [(9_000, 8_000), (14_000, 14_000)])
def test_an_image_over_the_pixel_limit_is_refused_saying_the_limit(tmp_path, width, height):
    """Past Pillow's own bomb limit (14000 × 14000) the refusal said "too many pixels" and not
    how many are allowed; under it (9000 × 8000) it did. Both say the limit, which the upload's
    label in the Reconstruct tab gives in megapixels."""
    from mae_core.images import MAX_PIXELS
    from ui.reconstruct import MEGAPIXELS

    assert MAX_PIXELS == MEGAPIXELS * 1_000_000
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())  # a 1 × 1 PNG whose header claims width × height
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr:ihdr + 17])))
    path = tmp_path / "huge.png"
    path.write_bytes(bytes(data))
    with pytest.raises(ImageError, match=f"^huge.png: .*limit.*{MAX_PIXELS:,}"):
        open_rgb(path)


def test_an_eps_file_is_refused_before_ghostscript_could_run_on_it(tmp_path, monkeypatch):
    """Pillow decodes EPS by running Ghostscript on the file: any upload named .jpg ran it where
    it is installed, and where it is not, the file was "corrupt or truncated (Unable to locate
    Ghostscript on paths)"."""
    from PIL import EpsImagePlugin

    def ghostscript(*args, **kwargs):
        raise AssertionError("Ghostscript was run on an upload")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", ghostscript)
    eps = tmp_path / "holiday.jpg"  # named as a photo
    Image.new("RGB", (40, 40), (200, 10, 10)).save(eps, format="EPS")
    for read in (open_rgb, lambda path: read_for(path, 3)):
        with pytest.raises(ImageError, match="holiday.jpg: EPS \\(PostScript\\) files are not "
                                             "read: .* save it as PNG or JPEG"):
            read(eps)


def test_a_folder_given_as_an_image_is_said_to_be_one(tmp_path):
    """It was "the image is corrupt or truncated ([Errno 21] Is a directory: '<the server's
    path>')"."""
    folder = tmp_path / "photos.jpg"
    folder.mkdir()
    for read in (open_rgb, lambda path: read_for(path, 3)):
        with pytest.raises(ImageError, match="^photos.jpg: a folder, not an image file$"):
            read(folder)
