"""N-channel images for a screen: grayscale, RGB, or a chosen RGB composite, contrast-stretched.

A 1-channel image is shown in grayscale, a 3-channel one as RGB, any other as the composite of the
channels a person picks for red, green and blue (the first three by default), or one channel in
grayscale. 16-bit and non-RGB images are stretched between their 1st and 99th percentiles (16-bit
scans often fill a few hundred of 65,536 levels and would show black); the limits come from the
input image and apply unchanged to its masked view and reconstruction, so the panels compare.

Example:
    >>> view = parse_view("4,3,2", in_chans=4)      # near-infrared false colour
    >>> mapping = fit(result.original, view, bits=16)
    >>> mapping(result.reconstruction).shape
    torch.Size([3, 64, 64])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from mae_core.checks import ConfigError, shown

STRETCH_PERCENTILES = (1.0, 99.0)
STRETCH_CHOICES = ("auto", "percentile", "none")


@dataclass(frozen=True)
class View:
    """What to show: ``channels`` (0-based; one for grayscale, three for R, G, B; empty = auto)
    and ``stretch`` (auto: a percentile stretch unless the image is 8-bit RGB)."""

    channels: tuple[int, ...] = ()
    stretch: str = "auto"


def default_channels(in_chans: int) -> tuple[int, ...]:
    """Grayscale for one channel (or two), RGB for three, the first three channels otherwise."""
    return (0,) if in_chans < 3 else (0, 1, 2)


def parse_view(text: str | None, in_chans: int, stretch: str = "auto") -> View:
    """``"4,3,2"`` (1-based channel numbers, as people count bands) or ``"2"`` or blank (auto) for a
    model of ``in_chans`` channels; a :class:`ConfigError` naming the field says what is wrong."""
    if stretch not in STRETCH_CHOICES:
        raise ConfigError("contrast", f"choose one of {', '.join(STRETCH_CHOICES)}, got {shown(stretch)}")
    text = (text or "").strip()
    if not text:
        return View((), stretch)
    try:
        numbers = [int(part) for part in text.replace(" ", "").split(",")]
    except ValueError:
        numbers = []
    if len(numbers) not in (1, 3) or not all(1 <= n <= in_chans for n in numbers):
        raise ConfigError("display channels", f"give one channel (grayscale) or three for R,G,B, "
                          f"numbered 1 to {in_chans} and separated by commas (e.g. "
                          f"{'3,2,1' if in_chans >= 3 else '1'}), got {shown(text)}")
    return View(tuple(n - 1 for n in numbers), stretch)


def fit(reference: Tensor, view: View = View(), bits: int = 8) -> Callable[[Tensor], Tensor]:
    """The mapping from images like ``reference`` (float (C, H, W) in [0, 1]) to RGB (3, H, W) in
    [0, 1] that ``view`` asks for, with contrast limits taken from ``reference``."""
    in_chans = reference.shape[0]
    channels = view.channels or default_channels(in_chans)
    if max(channels) >= in_chans:
        raise ConfigError("display channels", f"the image has {in_chans} channel(s), channel "
                          f"{max(channels) + 1} was asked for")
    stretch = view.stretch == "percentile" or (
        view.stretch == "auto" and not (in_chans == 3 and bits == 8))
    index = torch.tensor(channels)
    if stretch:
        values = reference[index].reshape(len(channels), -1).float()
        low = torch.quantile(values, STRETCH_PERCENTILES[0] / 100, dim=1)
        high = torch.quantile(values, STRETCH_PERCENTILES[1] / 100, dim=1)
        high = torch.where(high > low, high, low + 1e-6)  # a flat image stays flat, not NaN
    else:
        low, high = torch.zeros(len(channels)), torch.ones(len(channels))
    low, span = low.view(-1, 1, 1), (high - low).view(-1, 1, 1)

    def mapping(image: Tensor) -> Tensor:
        shown = ((image[index] - low) / span).clamp(0, 1)
        return shown.expand(3, -1, -1) if len(channels) == 1 else shown

    return mapping


def select(image: Tensor, view: View = View()) -> Tensor:
    """The chosen channels of ``image`` as RGB (3, H, W), values unchanged: for pictures whose
    values already mean something on screen (the model's normalised output on mid-grey)."""
    channels = view.channels or default_channels(image.shape[0])
    shown = image[torch.tensor(channels)]
    return shown.expand(3, -1, -1) if len(channels) == 1 else shown
