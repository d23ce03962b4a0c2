"""A prepared image at three resolutions, and MAE's random resized crop cut from the cheapest one.

Each prepared image is stored as JPEG at its bounded short side (``image``), at half its pixels
(``mid``: short side ÷ √2) and small (``small``: :data:`SMALL_SIDE`); a copy no smaller than the
image is stored empty. A crop needs the output's pixels and no more: the crop box is drawn from
the image's size alone, then cut from the smallest copy that still holds ``size`` pixels across
it. libjpeg's decode time follows the bytes (Huffman decoding reads every one, whatever the
scale), so at 224 px about two thirds of the crops of a 448 px image decode the half-pixel copy
in ~55% of the time, and at 64 px most decode the small one.
"""

from __future__ import annotations

import functools
import io
import math
import random
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import v2

from mae_core.checks import DataError
from mae_core.images import central_part

# A low-resolution run (64 px, the CPU's size) crops from this copy whenever it holds the output's
# pixels, and decodes ~1/10 of the bytes of a 448 px image.
SMALL_SIDE = 160
JPEG_QUALITY = 90
COPIES = ("small", "mid")  # the reduced copies, smallest first; "image" is the full one


def mid_side(short_side: int) -> int:
    """The half-pixel copy's short side."""
    return round(short_side / math.sqrt(2))


def bounded_size(size: tuple[int, int], short_side: int) -> tuple[int, int]:
    """``size`` scaled down (never up) so its short side is at most ``short_side``."""
    scale = short_side / min(size)
    if scale >= 1:
        return size
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def bounded(image: Image.Image, short_side: int) -> Image.Image:
    size = bounded_size(image.size, short_side)
    return image if size == image.size else _lanczos(image, size)


def _lanczos(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    # Lanczos, not bicubic: a crop cut from a bicubic-reduced copy was up to 15% less sharp than
    # the same crop from the full image (tests/test_crops.py measures it)
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def encode_copies(image: Image.Image, short_side: int) -> dict[str, bytes]:
    """``{"image", "mid", "small"}``: JPEG bytes of ``image`` (RGB) at each resolution; a reduced
    copy that would not be smaller than the full one is empty (a small image is stored once)."""
    full = bounded(central_part(image), short_side)  # JPEG stops at 65,500 px a side
    copies, reduced = {"image": jpeg(full)}, full
    for name, side in (("mid", mid_side(short_side)), ("small", SMALL_SIDE)):
        size = bounded_size(full.size, side)  # each filtered from the one before: fewer pixels
        reduced = reduced if size == reduced.size else _lanczos(reduced, size)
        copies[name] = b"" if size == full.size else jpeg(reduced)
    return copies


def jpeg_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a JPEG's frame header; PIL parses anything unusual. (PIL's open
    parses every table in Python: 5% of a 224 px crop's whole cost.)"""
    i = 2
    while i + 9 <= len(data) and data[i] == 0xFF:
        marker, length = data[i + 1], int.from_bytes(data[i + 2:i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a start of frame
            return int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big")
        if marker in (0xD8, 0xFF, 0x01) or 0xD0 <= marker <= 0xD7 or length < 2:
            break  # no length field where a frame header could follow: let PIL read it
        i += 2 + length
    return Image.open(io.BytesIO(data)).size


def decode_full(data: bytes) -> Tensor:
    """uint8 (3, H, W) RGB pixels of JPEG ``data`` (libjpeg-turbo, through torchvision)."""
    return _jpeg_decoder()(torch.frombuffer(bytearray(data), dtype=torch.uint8))


@functools.cache
def _jpeg_decoder() -> Callable[[Tensor], Tensor]:
    """torchvision's registered decode op where there is one and it decodes a known JPEG to the
    public function's pixels: ``torchvision.io.decode_jpeg`` wraps it in argument checks and a
    per-call deprecation warning (image I/O moves to TorchCodec) that cost 35 µs, 3% of a 224 px
    crop. The op's signature is private, so another torchvision may change it: a failed probe
    falls back to the public function, rather than every image reading as damaged."""
    from torchvision.io import ImageReadMode, decode_jpeg  # registers torch.ops.image

    public = functools.partial(decode_jpeg, mode=ImageReadMode.RGB)
    op = getattr(torch.ops.image, "decode_jpeg", None)
    if op is None:
        return public
    fast = functools.partial(op, mode=ImageReadMode.RGB.value, apply_exif_orientation=False)
    probe = torch.frombuffer(bytearray(_probe_jpeg()), dtype=torch.uint8)
    try:
        agrees = torch.equal(fast(probe), public(probe))
    except (RuntimeError, TypeError, ValueError):
        agrees = False
    return fast if agrees else public


def _probe_jpeg() -> bytes:
    gradient = np.linspace(0, 255, 16 * 24 * 3).astype(np.uint8).reshape(16, 24, 3)
    buffer = io.BytesIO()
    Image.fromarray(gradient).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


# Damaged samples a reader replaces before it calls the set unusable (and at most one in 100 of
# those read): a bad sector costs a few images; a chunk whose header is gone would cost thousands,
# all trained as one copied image.
MAX_REPLACED = 16


# What to do about a set whose samples do not decode (the reader marks it damaged: see
# mae_core.prepared.mark_damaged): nothing, for the cache's copy of a folder.
AGAIN = ("the cache's copy of a folder is prepared again at the next start or resume (the set is "
         "marked damaged); a set prepared by hand: prepare it again with python -m mae_core.data "
         "optimize")


class UndecodableSet(DataError):
    """A prepared set the reader cannot train on: its first sample does not decode (no good one
    to stand in for it), or too many of them are damaged."""


class DecodeAugment:
    """The per-sample transform of a prepared set: lightly ``MAETransform``'s random resized crop
    (bicubic, antialiased) and horizontal flip, with the crop drawn before any pixel is decoded.

    The crop box is drawn on the full image's size; it is then cut from the smallest stored copy
    whose part of the box still spans ``size`` pixels (never upsampled more than from the full
    image). Where even that copy holds 2, 4 or 8 times the pixels needed, PIL decodes it at libjpeg's
    1/2, 1/4 or 1/8 scale (``draft``); otherwise torchvision decodes it (libjpeg-turbo) and resizes
    on uint8.
    """

    def __init__(self, image_size: int, defer: bool = False) -> None:
        from mae_core.data import mae_augmentation

        crop = mae_augmentation(image_size).transforms[0]  # the crop read from MAETransform itself
        self.size, self.scale, self.defer = image_size, tuple(crop.scale), defer
        self.log_ratio = (math.log(crop.ratio[0]), math.log(crop.ratio[1]))
        self.damaged = 0  # samples that could not be read or decoded, replaced
        self.read = 0  # samples asked for, damaged ones included
        self.last_good: dict[str, Any] | None = None

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        """``{"image", "id"}``. An image that no longer decodes (the shard's bytes damaged on disk
        after preparation) is replaced by the last good one and named on stderr, rather than
        ending a long run; with no good image yet it is an error. (``defer``: the sample of
        :meth:`deferred`, whose header is read here and whose pixels are decoded on the device.)"""
        try:
            done = self.deferred(item) if self.defer else {"image": self.crop(item)}
        except (OSError, RuntimeError, ValueError, SyntaxError) as err:
            # The epoch's slot keeps its own id.
            return {**self.replace(f"sample {item.get('id')}", "its image does not decode", err),
                    "id": item["id"]}
        self.read += 1
        self.last_good = done
        return {**done, "id": item["id"]}

    def replace(self, what: str, why: str, err: BaseException) -> dict[str, Any]:
        """The last good sample, to stand in for ``what``, which is damaged (named on stderr);
        :class:`UndecodableSet` where there is none yet, or past :data:`MAX_REPLACED` (and one in
        100 of the samples read)."""
        detail = str(err)[:200] or type(err).__name__
        if self.last_good is None:
            raise UndecodableSet(f"{what} of the prepared set cannot be used: {why} ({detail}); "
                                 f"{AGAIN}") from err
        self.read += 1
        self.damaged += 1
        if self.damaged > max(MAX_REPLACED, self.read // 100):
            raise UndecodableSet(f"the prepared set is too damaged to train on: {self.damaged} of "
                                 f"the {self.read} samples read so far could not be used, the last "
                                 f"{what} ({why}: {detail}); {AGAIN}") from err
        print(f"replacing {what}: {why} ({detail}); {self.damaged} so far", file=sys.stderr,
              flush=True)
        return dict(self.last_good)

    def draw_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(top, left, h, w): torchvision ``RandomResizedCrop.get_params``'s draw (area, then log
        aspect ratio, ten tries, then the centre crop of the clamped ratio), with Python's RNG: its
        seven tensor operations cost a sixteenth of a 224 px crop."""
        area = width * height
        for _ in range(10):
            target = area * random.uniform(*self.scale)
            ratio = math.exp(random.uniform(*self.log_ratio))
            w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
            if 0 < w <= width and 0 < h <= height:
                return random.randint(0, height - h), random.randint(0, width - w), h, w
        low, high = math.exp(self.log_ratio[0]), math.exp(self.log_ratio[1])
        if width / height < low:
            w, h = width, round(width / low)
        elif width / height > high:
            w, h = round(height * high), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def crop(self, item: dict[str, Any]) -> Tensor:
        """uint8 (3, size, size): a random resized crop of the item's picture, flipped half the
        time."""
        width, height = jpeg_size(item["image"])
        top, left, h, w = self.draw_box(width, height)
        flip = random.random() < 0.5
        name, (cw, ch) = self.pick_copy(item, (width, height), (w, h))
        fx, fy = cw / width, ch / height
        box = (left * fx, top * fy, (left + w) * fx, (top + h) * fy)
        reduce = next((r for r in (8, 4, 2) if min(box[2] - box[0], box[3] - box[1]) >= r * self.size), 1)
        data = item[name]
        out = self._reduced(data, box, reduce) if reduce > 1 else self._decoded(data, box, cw, ch)
        return out.flip(-1) if flip else out

    def deferred(self, item: dict[str, Any]) -> dict[str, Any]:
        """The same draw as :meth:`crop`, left undone: the chosen copy's JPEG bytes, the box on
        its pixel grid (top, left, bottom, right) and the flip, for :func:`finish_on_device`."""
        width, height = jpeg_size(item["image"])
        top, left, h, w = self.draw_box(width, height)
        flip = random.random() < 0.5
        name, (cw, ch) = self.pick_copy(item, (width, height), (w, h))
        fx, fy = cw / width, ch / height
        box = _grid_box((left * fx, top * fy, (left + w) * fx, (top + h) * fy), cw, ch)
        return {"jpeg": torch.frombuffer(bytearray(item[name]), dtype=torch.uint8),
                "box": torch.tensor(box, dtype=torch.int32), "flip": flip}

    def pick_copy(self, item: dict[str, Any], full: tuple[int, int],
                  crop: tuple[int, int]) -> tuple[str, tuple[int, int]]:
        """(name, size) of the smallest stored copy across which a ``crop`` (width, height) of
        the ``full``-size image still spans ``size`` pixels."""
        for name in COPIES:
            if item.get(name):  # a set prepared before a copy existed lacks it; empty: no smaller
                size = jpeg_size(item[name])
                if min(crop[0] * size[0] / full[0], crop[1] * size[1] / full[1]) >= self.size:
                    return name, size
        return "image", full

    def _decoded(self, data: bytes, box: tuple[float, ...], width: int, height: int) -> Tensor:
        top, left, bottom, right = _grid_box(box, width, height)
        return resize_uint8(decode_full(data)[:, top:bottom, left:right], (self.size, self.size))

    def _reduced(self, data: bytes, box: tuple[float, ...], reduce: int) -> Tensor:
        image = Image.open(io.BytesIO(data))
        full = image.size
        image.draft("RGB", (-(-full[0] // reduce), -(-full[1] // reduce)))
        sx, sy = image.width / full[0], image.height / full[1]
        box = (max(0.0, box[0] * sx), max(0.0, box[1] * sy), min(float(image.width), box[2] * sx),
               min(float(image.height), box[3] * sy))  # a float's last bit past the edge is refused
        out = image.convert("RGB").resize((self.size, self.size), Image.Resampling.BICUBIC, box=box)
        return torch.from_numpy(np.array(out, dtype=np.uint8)).permute(2, 0, 1)


def resize_uint8(pixels: Tensor, size: tuple[int, int]) -> Tensor:
    """uint8 (C, H, W) pixels resized to ``size`` (bicubic, antialiased): the same pixels as
    torchvision's ``resize``, in half the time where torch has its own uint8 kernel (3 or 4
    channels in channels-last memory, which is how libjpeg lays a decoded image out anyway):
    torchvision resizes uint8 in float for anything but bilinear. 0.17 against 0.35 ms for a
    300 px crop to 224; a 224 px crop of a prepared image takes 8% less time."""
    if pixels.dtype == torch.uint8 and pixels.shape[0] in (3, 4) and pixels.device.type == "cpu":
        batch = pixels.unsqueeze(0).contiguous(memory_format=torch.channels_last)
        return torch.nn.functional.interpolate(batch, size=size, mode="bicubic", antialias=True)[0]
    from torchvision.transforms.v2 import functional as F

    return F.resize(pixels, list(size), antialias=True, interpolation=F.InterpolationMode.BICUBIC)


class ResizedCrop(v2.RandomResizedCrop):
    """torchvision's random resized crop, its bicubic resize of 8-bit RGB(A) run by
    :func:`resize_uint8` (the same pixels in half the time); anything else, 16-bit or N-channel
    images, exactly as torchvision does it. (The folder path's crop, read in memory.)"""

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        fast = (type(inpt) is torch.Tensor and inpt.ndim == 3 and inpt.dtype == torch.uint8
                and self.antialias and self.interpolation == v2.InterpolationMode.BICUBIC)
        if not fast:
            return super().transform(inpt, params)
        top, left, height, width = (params[k] for k in ("top", "left", "height", "width"))
        return resize_uint8(inpt[:, top:top + height, left:left + width], tuple(self.size))


def _grid_box(box: tuple[float, ...], width: int, height: int) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of the float ``box`` (left, top, right, bottom) on a ``width`` ×
    ``height`` copy's pixel grid: within half a copy pixel of the drawn box, at least one pixel."""
    left, top = min(round(box[0]), width - 1), min(round(box[1]), height - 1)
    right, bottom = max(min(round(box[2]), width), left + 1), max(min(round(box[3]), height), top + 1)
    return top, left, bottom, right


# --- decoding on the training device (TrainConfig.decode_on_device) ------------------------------

def collate_deferred(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """A batch of :meth:`DecodeAugment.deferred` samples: the JPEGs stay a list (their lengths
    differ), the boxes, flips and ids become tensors."""
    return {"jpeg": [s["jpeg"] for s in samples],
            "box": torch.stack([s["box"] for s in samples]),
            "flip": torch.tensor([bool(s["flip"]) for s in samples]),
            "id": torch.tensor([int(s["id"]) for s in samples])}


def finish_on_device(batch: dict[str, Any], size: int, device: torch.device) -> Tensor:
    """uint8 (N, 3, size, size) on ``device``: the batch's JPEGs decoded there (nvJPEG on a GPU,
    in one batched call), each cut to its box, resized (bicubic, antialiased, as on the CPU
    path) and flipped. An image that does not decode is replaced by another of the batch and
    named on stderr, as :class:`DecodeAugment` does; a batch with none that decodes is an error.

    On a GPU the work runs on a stream of its own (:func:`_on_decode_stream`)."""
    device = torch.device(device)
    if device.type != "cuda":
        return _finish(batch, size, device)
    if device.index is None:  # one stream per GPU: "cuda" and "cuda:0" are the same one
        device = torch.device("cuda", torch.cuda.current_device())
    return _on_decode_stream(device, lambda: _finish(batch, size, device))


def _on_decode_stream(device: torch.device, work: Callable[[], Tensor]) -> Tensor:
    """``work()`` run on this device's decode stream, its result safe to use on the current one.

    torchvision's nvJPEG decoder allocates its output on the caller's stream but writes it from
    a private stream that does not wait for the caller's (pytorch/vision#9606): the caching
    allocator hands it blocks freed a moment before, which kernels still queued on that stream
    have yet to read, and the decoder overwrites them. Called from the training stream, that
    corrupted the step's tensors, the likely cause of a device-side assert in an H200 run
    (batch 512, compiled). On a stream where nothing is left queued when the decoder is called,
    every free block is free in fact. (That stream keeps its own cached blocks, about a batch's
    decoded images, which the training stream does not reuse.)"""
    stream = _decode_stream(device)
    stream.synchronize()  # the last batch's crops: long done when the next batch comes
    with torch.cuda.stream(stream):
        out = work()
    current = torch.cuda.current_stream(device)
    current.wait_stream(stream)
    out.record_stream(current)  # its block is not handed out again before the step has read it
    return out


@functools.cache
def _decode_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device=device)


def _finish(batch: dict[str, Any], size: int, device: torch.device) -> Tensor:
    pixels = _decode_batch(batch["jpeg"], device, batch["id"])
    crops = []
    for image, (top, left, bottom, right) in zip(pixels, batch["box"].tolist()):
        crop = image[:, top:bottom, left:right].unsqueeze(0).float()
        crops.append(torch.nn.functional.interpolate(crop, size=(size, size), mode="bicubic",
                                                     antialias=True, align_corners=False))
    out = torch.cat(crops)
    flips = batch["flip"].to(out.device, non_blocking=True).view(-1, 1, 1, 1)
    out = torch.where(flips, out.flip(-1), out)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def _decode_batch(jpegs: list[Tensor], device: torch.device, ids: Tensor) -> list[Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:  # one bad image fails the batched call: find it
        pass
    decoded: list[Tensor | None] = []
    for jpeg, sample in zip(jpegs, ids.tolist()):
        try:
            decoded.append(decode_jpeg(jpeg, mode=ImageReadMode.RGB, device=device))
        except RuntimeError as err:
            print(f"replacing sample {sample}: its image does not decode ({err})",
                  file=sys.stderr, flush=True)
            decoded.append(None)
    good = [image for image in decoded if image is not None]
    if not good:
        raise ValueError(f"no image of the batch (samples {ids.tolist()}) decodes: "
                         "prepare the data set again")
    return [image if image is not None else good[0] for image in decoded]
