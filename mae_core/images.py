"""Opening any image a person has, safely: 8-bit RGB out, or a clear :class:`ImageError`.

Handles grayscale, palette, RGBA (composited on white), 16-bit and float images, EXIF rotation and
multi-frame files (first frame); refuses non-images, corrupt files and decompression bombs before
decoding their pixels.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, TypeVar

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

# ~ 8k × 8k: more than any camera, far less than a decompression bomb.
MAX_PIXELS = 64_000_000
# An image longer than this many times its short side is used by its central part. MAE's random
# crop (0.2 to 1 of the area, aspect 3/4 to 4/3) cannot fit in an image past 6.7:1 and falls back to
# a centre crop, which the central part holds whole: every crop is the same (tests/test_data.py). And
# a 100-byte 1×400,000 strip no longer grows to gigabytes when its short side is scaled up.
MAX_ASPECT = 8

# Formats Pillow decodes by running an external program on the file's bytes (EPS: Ghostscript, a
# PostScript interpreter): refused before their pixels load, whatever the file's name. It said
# "the image is corrupt or truncated (Unable to locate Ghostscript on paths)" where Ghostscript is
# missing, and ran it on any upload named .jpg where it is installed.
EXTERNAL_DECODERS = {"EPS": "EPS (PostScript)"}


ImageOrTensor = TypeVar("ImageOrTensor", Image.Image, Tensor)


class ImageError(ValueError):
    """The file cannot be used as an image; the message says why, for a person to read."""


def open_rgb(source: str | Path | bytes | BinaryIO, max_pixels: int = MAX_PIXELS,
             name: str | None = None) -> Image.Image:
    """Decode ``source`` into an upright 8-bit RGB image."""
    label = name or (Path(source).name if isinstance(source, (str, Path)) else "upload")
    image = open_checked(source, max_pixels, label)
    with blamed_on(label):
        return to_rgb8(upright(image, label))


def upright(image: Image.Image, label: str) -> Image.Image:
    """``image`` turned as its EXIF Orientation says, or an :class:`ImageError`: its EXIF block
    is parsed (and re-serialised) here, not on opening, so a damaged one fails here."""
    with blamed_on(label, "its EXIF metadata (orientation, camera data) is damaged",
                   ": save the image again without its EXIF data to use it"):
        return ImageOps.exif_transpose(image)


def refuse_special_file(source: object, label: str) -> None:
    """An :class:`ImageError` if the path ``source`` names a FIFO, a device or a socket: opening
    one to read blocks until something writes to it (a FIFO upload hung its request for good).
    A missing or unreadable path is left to the reader, which says why in its own words."""
    if not isinstance(source, (str, Path)):
        return
    try:
        mode = os.stat(source).st_mode
    except (OSError, ValueError):
        return
    if stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISSOCK(mode):
        raise ImageError(f"{label}: not an image file but a FIFO, a device or a socket")
    if stat.S_ISDIR(mode):  # was "the image is corrupt or truncated ([Errno 21] Is a directory:
        raise ImageError(f"{label}: a folder, not an image file")  # '/server/path')"


def open_checked(source: str | Path | bytes | BinaryIO, max_pixels: int, label: str) -> Image.Image:
    """``source`` decoded by PIL as it is stored (first frame), or a clear :class:`ImageError`:
    non-images, corrupt files and decompression bombs are refused before their pixels decode."""
    refuse_special_file(source, label)
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    with blamed_on(label), warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = Image.open(source)
        if image.format in EXTERNAL_DECODERS:
            raise ImageError(f"{label}: {EXTERNAL_DECODERS[image.format]} files are not read: "
                             "Pillow decodes them by running another program on the file; save "
                             "it as PNG or JPEG")
        width, height = image.size
        if width * height > max_pixels:
            raise ImageError(f"{label}: {width}×{height} pixels is too large "
                             f"(limit {max_pixels:,} pixels); it looks like a decompression bomb")
        image.seek(0)
        image.load()
    return image


@contextmanager
def blamed_on(label: str, damage: str = "the image is corrupt or truncated", remedy: str = ""
              ) -> Iterator[None]:
    """Runs PIL on the file ``label`` names: whatever it raises is an :class:`ImageError` naming
    the file and saying ``damage`` (and ``remedy``), so the file is skipped like any unreadable
    image.

    Pillow's plugins parse untrusted bytes and raise far more than OSError: NotImplementedError
    (a DDS header with unknown flags), SyntaxError (a WebP whose EXIF has a broken TIFF header),
    TypeError, struct.error or AttributeError (re-serialising a damaged EXIF block)... Each is the
    file's fault. MemoryError is not, and propagates (as KeyboardInterrupt does).
    """
    try:
        yield
    except (ImageError, MemoryError):
        raise
    except FileNotFoundError:
        raise ImageError(f"{label}: no such file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{label}: too many pixels (the limit is {MAX_PIXELS:,}, about 8k × 8k); "
                         "it looks like a decompression bomb") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"{label}: not an image file (or a format Pillow cannot read)") from None
    except Exception as err:  # noqa: BLE001 - a third-party parser on untrusted bytes (above)
        why = str(err) or type(err).__name__
        raise ImageError(f"{label}: {damage} ({why}){remedy}") from None


def to_rgb8(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # Pillow's convert() clips high-bit-depth values at 255; scale the real range instead.
        array = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16"):
            array = array / 257.0
        else:
            low, high = float(array.min()), float(array.max())
            array = (array - low) / (high - low or 1.0) * 255.0
        return Image.fromarray(array.clip(0, 255).astype(np.uint8)).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def to_tensor(image: Image.Image) -> Tensor:
    """uint8 (3, H, W) tensor of an RGB PIL image."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def central_box(height: int, width: int) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the part of an image that is used: all of it up to
    :data:`MAX_ASPECT`:1, else its centre at that aspect."""
    longest = MAX_ASPECT * min(height, width)
    kept_h, kept_w = min(height, longest), min(width, longest)
    return (height - kept_h) // 2, (width - kept_w) // 2, kept_h, kept_w


def central_part(image: ImageOrTensor) -> ImageOrTensor:
    """``image`` (a PIL image, or a tensor ``(..., H, W)``) cut to its :func:`central_box`."""
    if isinstance(image, Image.Image):
        top, left, height, width = central_box(image.height, image.width)
        if (height, width) == (image.height, image.width):
            return image
        return image.crop((left, top, left + width, top + height))
    top, left, height, width = central_box(*image.shape[-2:])
    return image[..., top:top + height, left:left + width]


def resize_short_side(image: Tensor, side: int) -> Tensor:
    """``image``'s :func:`central_part` resized (bicubic, antialiased) to a short side of ``side``,
    in its own dtype."""
    return wide_range_safe(
        lambda x: TF.resize(x, [side], interpolation=TF.InterpolationMode.BICUBIC, antialias=True),
        central_part(image))


def wide_range_safe(transform: Callable[[Tensor], Tensor], image: Tensor) -> Tensor:
    """``transform(image)``, for a uint16 image computed in float and clamped: torchvision clamps
    bicubic over- and undershoot only for uint8, and uint16 values wrap around (a black pixel
    beside a white edge became 62,531 of 65,535)."""
    if image.dtype != torch.uint16:
        return transform(image)
    out = transform(image.to(torch.float32))
    return out.round_().clamp_(0, 65535).to(torch.int32).to(torch.uint16)


def center_square(image: Image.Image | Tensor, size: int) -> Tensor:
    """The central square of ``image``, resized to ``size``×``size``: uint8 (3, size, size)."""
    tensor = to_tensor(image) if isinstance(image, Image.Image) else image
    return TF.center_crop(resize_short_side(tensor, size), [size, size])
