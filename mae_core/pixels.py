"""Images with their own channels and bit depth: 1, 3 or N channels, 8 or 16 bits per value.

:func:`probe` reads a file's header only (channels, bits); :func:`read_for` decodes it for a model
of a given channel count, as a uint8 or uint16 tensor (C, H, W), without squashing 16-bit values
to 8 bits. 8-bit colour (and 8-bit grayscale for a colour model) takes exactly the path of
:func:`mae_core.images.open_rgb`, so RGB photos read as fast and as before.

TIFF files are read with ``tifffile``, which keeps every sample of a multi-band file (PIL reads an
RGB + near-infrared TIFF as plain RGB, dropping the fourth band). Only the pages of the first image
are decoded (every channel, the first of any other axis), within :data:`MAX_SAMPLES` values, and a
damaged TIFF, whatever tifffile raises on it, is an :class:`~mae_core.images.ImageError`. Its
Orientation tag (274) turns it as ``ImageOps.exif_transpose`` turns the other formats.

In PNG, WebP and the other photo formats an alpha channel is transparency: composited on white as
before, never a channel.

Example:
    >>> probe("scan.tif")
    PixelFormat(channels=1, bits=16)
    >>> read_for("scan.tif", channels=1).dtype
    torch.uint16
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from mae_core.checks import MAX_CHANNELS
from mae_core.images import (
    MAX_PIXELS,
    ImageError,
    blamed_on,
    open_checked,
    open_rgb,
    refuse_special_file,
    to_rgb8,
    to_tensor,
    upright,
)

Source = str | Path | bytes | BinaryIO

# PIL modes of 8-bit images with one value per pixel; "LA" is composited on white first.
_GRAY8 = frozenset({"1", "L", "LA"})
# 16-bit grayscale; Pillow opens some 16-bit PNGs as "I" (32-bit), checked for range on reading.
_GRAY16 = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic TIFF, BigTIFF
# The channel axis in tifffile's axes codes: samples per pixel, or an ImageJ/OME channel axis.
_CHANNEL_AXES = "SC"
_ASSOCIATED_ALPHA, _UNASSOCIATED_ALPHA = 1, 2  # TIFF ExtraSamples values
_ORIENTATION = 274  # the TIFF (and EXIF) Orientation tag
# The most values (channels × height × width) one TIFF image may decode to: 4 bands at the pixel
# limit (256 M values, 512 MB at 16 bits). A few compressed megabytes can claim far more.
MAX_SAMPLES = 4 * MAX_PIXELS
# What tifffile raises for a compression, predictor or layout it cannot decode on its own (LZW
# and JPEG need imagecodecs, CCITT it lacks...): PIL is tried before the file is refused.
_NO_CODEC = (KeyError, ValueError, RuntimeError, NotImplementedError, ImportError)


@dataclass(frozen=True)
class PixelFormat:
    """What one value of an image is: ``channels`` per pixel, ``bits`` (8 or 16) per value.
    ``alpha_tiff``: a TIFF whose extra sample is tagged as alpha, read as transparency (not a
    kind of its own: the same channels and bits train together)."""

    channels: int
    bits: int
    alpha_tiff: bool = field(default=False, compare=False, repr=False)

    @property
    def is_rgb8(self) -> bool:
        return self.channels == 3 and self.bits == 8

    def describe(self) -> str:
        return f"{self.channels}-channel {self.bits}-bit"


RGB8 = PixelFormat(3, 8)


def max_value(images: Tensor) -> int:
    """The full-scale value of ``images``' dtype: 255 for uint8, 65535 for uint16."""
    return 65535 if images.dtype == torch.uint16 else 255


def _label(source: Source, name: str | None) -> str:
    return name or (Path(source).name if isinstance(source, (str, Path)) else "upload")


def _is_tiff(source: Source) -> bool:
    if isinstance(source, (str, Path)):
        if Path(source).suffix.lower() in (".tif", ".tiff"):
            return True
        try:
            with open(source, "rb") as file:
                return file.read(4) in _TIFF_MAGIC
        except OSError:
            return False  # open_checked says why, with the file's name
    if isinstance(source, bytes):
        return source[:4] in _TIFF_MAGIC
    position = source.tell()
    head = source.read(4)
    source.seek(position)
    return head in _TIFF_MAGIC


def _rewound(source: Source) -> Source:
    """``source`` ready to be read again from its start (bytes are wrapped, files re-opened)."""
    if isinstance(source, bytes):
        return io.BytesIO(source)
    if not isinstance(source, (str, Path)):
        source.seek(0)
    return source


# --- TIFF: tifffile keeps every band --------------------------------------------------------

def _tiff_layout(series, label: str) -> tuple[int, int]:
    """(samples, bits) of a tifffile series, refused unless 8- or 16-bit unsigned."""
    dtype = np.dtype(series.dtype)
    if dtype not in (np.uint8, np.uint16, np.bool_):
        raise ImageError(f"{label}: {dtype} values are not supported: save the image as 8- or "
                         "16-bit unsigned integers")
    axes = series.axes
    channel_axes = [a for a in axes if a in _CHANNEL_AXES]
    if len(channel_axes) > 1:
        raise ImageError(f"{label}: both samples and channels axes ({axes}): save one band axis")
    channels = series.shape[axes.index(channel_axes[0])] if channel_axes else 1
    if "Y" not in axes or "X" not in axes:
        raise ImageError(f"{label}: not a 2-D image (TIFF axes {axes})")
    height, width = series.shape[axes.index("Y")], series.shape[axes.index("X")]
    if height * width > MAX_PIXELS:
        raise ImageError(f"{label}: {width}×{height} pixels is too large (limit {MAX_PIXELS:,} "
                         "pixels)")
    if channels > MAX_CHANNELS:
        raise ImageError(f"{label}: {channels} channels (TIFF axes {axes}) is more than any model "
                         f"takes (limit {MAX_CHANNELS} channels)")
    if channels * height * width > MAX_SAMPLES:
        raise ImageError(f"{label}: {width}×{height} pixels × {channels} channels is too large "
                         f"(limit {MAX_SAMPLES:,} values)")
    return channels, 16 if dtype == np.uint16 else 8


def _first_image(series, label: str) -> tuple[np.ndarray, str]:
    """(array, axes) of the series' first image: index 0 of every axis but Y, X and the channel
    axis, decoding only the pages that hold it (a many-page file decodes one page, or one page
    per channel when the channels are pages, as in an ImageJ hyperstack)."""
    axes, shape = series.axes, tuple(int(n) for n in series.shape)
    page = series.keyframe
    page_axes, page_shape = page.axes, tuple(int(n) for n in page.shape)
    lead = len(axes) - len(page_axes)
    lead_axes, lead_shape = axes[:max(lead, 0)], shape[:max(lead, 0)]
    if (lead >= 0 and axes[lead:] == page_axes and shape[lead:] == page_shape
            and math.prod(lead_shape) == len(series)):
        # Pages are the leading axes in C order: page = Σ index × stride.
        strides = [math.prod(lead_shape[i + 1:]) for i in range(lead)]
        keys = [0]
        for axis, size, stride in zip(lead_axes, lead_shape, strides):
            if axis in _CHANNEL_AXES:
                keys = [key + i * stride for key in keys for i in range(size)]
        _decodable(len(keys) * math.prod(page_shape), label)
        kept = [(a, n) for a, n in zip(lead_axes, lead_shape) if a in _CHANNEL_AXES]
        array = series.asarray(key=keys)
        # A keyed read squeezes the page axes it stacks: back to (channel pages) + page shape.
        array = array.reshape(tuple(n for _, n in kept) + page_shape)
        return array, "".join(a for a, _ in kept) + page_axes
    # Another layout (a truncated ImageJ file, pages unlike the first...): the whole series, when
    # it is small enough to decode.
    _decodable(max(math.prod(shape), len(series) * math.prod(page_shape)), label,
               f" (its TIFF layout, axes {axes} of shape {shape}, is only read whole)")
    array = series.asarray()
    if array.shape != shape:  # tifffile could not fit the pages it found into the series' shape
        raise ImageError(f"{label}: the TIFF is corrupt or truncated (its pages make "
                         f"{array.shape}, not its {axes} {shape})")
    return array, axes


def _decodable(values: int, label: str, why: str = "") -> None:
    """Refuses, before decoding, to decode more than :data:`MAX_SAMPLES` values."""
    if values > MAX_SAMPLES:
        raise ImageError(f"{label}: reading it would decode {values:,} values{why}, more than the "
                         f"limit of {MAX_SAMPLES:,}: save its first image on its own")


def _corrupt(label: str, err: BaseException) -> ImageError:
    why = str(err) or type(err).__name__
    return ImageError(f"{label}: the TIFF is corrupt or truncated ({why})")


class _TagValueNotice(logging.Filter):
    """tifffile logs a tag value outside its enum ("9 is not a valid ORIENTATION") as an error,
    twice per file, then uses the raw value (an Orientation outside 1-8 is read as 1): in a data
    folder that was two lines per image per epoch in train.log, about nothing wrong."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "is not a valid" not in record.getMessage()


logging.getLogger("tifffile").addFilter(_TagValueNotice())


def _open_tiff(source: Source, label: str, decode: bool) -> tuple[PixelFormat, np.ndarray | None]:
    import tifffile

    # tifffile parses untrusted bytes: a damaged file raises nearly anything (ZeroDivisionError,
    # struct.error, zlib.error, TypeError...). Each is that file's fault, told as an ImageError;
    # MemoryError and KeyboardInterrupt are not the file's fault and propagate.
    try:
        with tifffile.TiffFile(_rewound(source)) as tif:
            series = tif.series[0]
            samples, bits = _tiff_layout(series, label)
            # An alpha sample (TIFF ExtraSamples 1 or 2) is transparency, as in a PNG: not a band.
            extra = getattr(series.keyframe, "extrasamples", None) or ()
            alpha = next((int(kind) for kind in extra
                          if int(kind) in (_ASSOCIATED_ALPHA, _UNASSOCIATED_ALPHA)), None)
            fmt = PixelFormat(samples - (alpha is not None), bits, alpha_tiff=alpha is not None)
            if not decode:
                return fmt, None
            orientation = series.keyframe.tags.valueof(_ORIENTATION, 1)
            try:
                array, axes = _first_image(series, label)
            except (ImageError, MemoryError):
                raise
            except _NO_CODEC as err:  # a codec tifffile lacks (LZW...): PIL may have it
                return fmt, _tiff_with_pil(source, fmt, label, err)
    except (ImageError, MemoryError):
        raise
    except FileNotFoundError:
        raise ImageError(f"{label}: no such file") from None
    except Exception as err:  # noqa: BLE001 - a third-party parser on untrusted bytes (above)
        raise _corrupt(label, err) from None
    # Extra axes (pages, time, depth): the first of each, like PIL's first frame.
    for axis in [a for a in axes if a not in "YX" + _CHANNEL_AXES]:
        array = np.take(array, 0, axis=axes.index(axis))
        axes = axes.replace(axis, "", 1)  # one at a time: a series may repeat "Q"
    if not any(a in _CHANNEL_AXES for a in axes):
        array, axes = array[None], "C" + axes
    channel = next(a for a in axes if a in _CHANNEL_AXES)
    array = np.transpose(array, [axes.index(channel), axes.index("Y"), axes.index("X")])
    if array.dtype == np.bool_:  # a 1-bit mask: full scale, as PIL reads mode "1"
        array = array.astype(np.uint8) * 255
    if alpha is not None:
        array = _on_white(array, alpha, 65535 if bits == 16 else 255)
    array = _upright(array, orientation)
    return fmt, array.astype(np.uint16 if bits == 16 else np.uint8)


def _upright(array: np.ndarray, orientation: object) -> np.ndarray:
    """A (C, H, W) array turned as its TIFF Orientation tag says (1-8, as EXIF), which
    tifffile leaves to the reader: what ``ImageOps.exif_transpose`` does for every other format,
    so a camera's TIFF stands as its JPEG does. Other values are ignored, as PIL ignores them."""
    turns = {2: lambda a: a[:, :, ::-1], 3: lambda a: a[:, ::-1, ::-1], 4: lambda a: a[:, ::-1],
             5: lambda a: a.swapaxes(1, 2), 6: lambda a: np.rot90(a, -1, axes=(1, 2)),
             7: lambda a: a[:, ::-1, ::-1].swapaxes(1, 2), 8: lambda a: np.rot90(a, 1, axes=(1, 2))}
    turn = turns.get(orientation) if isinstance(orientation, int) else None
    return np.ascontiguousarray(turn(array)) if turn else array


def _on_white(array: np.ndarray, alpha: int, full: int) -> np.ndarray:
    """(C + 1, H, W) with alpha last → (C, H, W) composited on white (as PIL does for a PNG)."""
    color, opacity = array[:-1].astype(np.float64), array[-1:].astype(np.float64) / full
    if alpha == _ASSOCIATED_ALPHA:  # colour already multiplied by its opacity
        out = color + full * (1 - opacity)
    else:
        out = color * opacity + full * (1 - opacity)
    return np.rint(out).clip(0, full)


def _tiff_with_pil(source: Source, fmt: PixelFormat, label: str, why: Exception) -> np.ndarray:
    """A TIFF whose compression tifffile cannot decode without ``imagecodecs``: PIL decodes it,
    but only when PIL keeps every band (it reads RGB + extra samples as plain RGB)."""
    try:
        image = open_checked(_rewound(source), MAX_PIXELS, label)
        if image.mode in ("RGBA", "LA"):  # PIL read the alpha sample: composited, as the rest are
            image = to_rgb8(image) if image.mode == "RGBA" else to_rgb8(image).convert("L")
        array = np.asarray(image)
    except (ImageError, MemoryError):
        raise
    except Exception as err:  # noqa: BLE001 - PIL's TIFF parser on untrusted bytes
        raise _corrupt(label, err) from None
    array = array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)
    if array.shape[0] != fmt.channels:
        if isinstance(why, ImportError) or "imagecodecs" in str(why):
            raise ImageError(f"{label}: its compression needs the imagecodecs package ({why}); "
                             "install it, or save the TIFF uncompressed or with zlib")
        raise _corrupt(label, why)
    return array.astype(np.uint16 if fmt.bits == 16 else np.uint8)


# --- the other formats: PIL --------------------------------------------------------------------

def _pil_format(image: Image.Image, label: str) -> PixelFormat:
    if image.mode in _GRAY8:
        return PixelFormat(1, 8)
    if image.mode in _GRAY16:
        return PixelFormat(1, 16)
    if image.mode == "F":
        raise ImageError(f"{label}: 32-bit float pixels are not supported for training: save "
                         "the image as 8- or 16-bit")
    return RGB8  # RGB, palette, RGBA (alpha is transparency), CMYK, YCbCr...


def probe(source: Source, name: str | None = None) -> PixelFormat:
    """The file's channels and bit depth, from its header (no pixels decoded)."""
    label = _label(source, name)
    refuse_special_file(source, label)
    if _is_tiff(source):
        return _open_tiff(source, label, decode=False)[0]
    try:
        with Image.open(_rewound(source)) as image:
            return _pil_format(image, label)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{label}: no such file") from None
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - PIL on untrusted bytes (struct.error, KeyError...)
        raise ImageError(f"{label}: not an image file, or corrupt ({err})") from None


def _gray(image: Image.Image, label: str) -> np.ndarray:
    image = upright(image, label)
    with blamed_on(label):
        if image.mode not in _GRAY16:
            return np.asarray(to_rgb8(image).convert("L"), dtype=np.uint8)[None]
        array = np.asarray(image)
    if image.mode == "I" and (array.min() < 0 or array.max() > 65535):
        raise ImageError(f"{label}: 32-bit integer values outside 0–65535 are not supported")
    return array.astype(np.uint16)[None]


def read_for(source: Source, channels: int, name: str | None = None) -> Tensor:
    """Decode ``source`` for a model of ``channels`` channels: uint8 or uint16 (C, H, W).

    A colour model (3 channels) reads any photo as RGB, as it always did (grayscale and palette
    converted, alpha composited on white, 16-bit grayscale scaled to 8 bits: :func:`open_rgb`),
    and a 16-bit 3-channel TIFF as it is. Any other model needs exactly its channel count. A
    mismatch is an :class:`ImageError` saying both counts.
    """
    label = _label(source, name)
    refuse_special_file(source, label)
    tiff = _is_tiff(source)
    if channels == 3 and not tiff:
        return to_tensor(open_rgb(_rewound(source), name=label))  # today's RGB path, unchanged
    fmt = _open_tiff(source, label, decode=False)[0] if tiff else probe(source, label)
    if channels == 3 and fmt.channels == 1:  # a grayscale TIFF, as RGB
        # Not by PIL: Pillow 12 garbles an uncompressed grayscale TIFF that has an Orientation.
        return torch.from_numpy(_rgb8_of_gray(_open_tiff(source, label, decode=True)[1]))
    if not readable_as(fmt, channels):
        raise ImageError(f"{label}: a {fmt.channels}-channel image, but the model takes "
                         f"{channels}-channel images")
    if tiff:
        array = _open_tiff(source, label, decode=True)[1]
    else:
        array = _gray(open_checked(_rewound(source), MAX_PIXELS, label), label)
    return torch.from_numpy(np.ascontiguousarray(array))


def readable_as(fmt: PixelFormat, channels: int) -> bool:
    """Whether :func:`read_for` reads an image of ``fmt`` for a model of ``channels`` channels:
    its own count, or grayscale for a colour model."""
    return fmt.channels == channels or (channels == 3 and fmt.channels == 1)


def _rgb8_of_gray(array: np.ndarray) -> np.ndarray:
    """(1, H, W) uint8 or uint16 → (3, H, W) uint8, as :func:`~mae_core.images.to_rgb8` converts
    PIL's grayscale modes (16 bits scaled by 1/257)."""
    if array.dtype == np.uint16:
        array = (array / 257.0).astype(np.uint8)
    return np.ascontiguousarray(np.repeat(array, 3, axis=0))


def same_dtype(images: list[Tensor]) -> list[Tensor]:
    """``images`` in one dtype, to be stacked: uint16 if any is (8-bit values scaled by 257, so
    full scale stays full scale), else as they are."""
    if all(image.dtype == images[0].dtype for image in images):
        return images
    return [image.to(torch.int32).mul(257).to(torch.uint16) if image.dtype == torch.uint8
            else image for image in images]
