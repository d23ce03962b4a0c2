"""Field checks shared by the config dataclasses: each raises :class:`ConfigError` naming the field.

The message says what was expected and shows the value (cut short: a hostile 5,000-character value
must not flood the message that names it).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import reprlib
from typing import Any


class ConfigError(ValueError):
    """An impossible configuration value. ``field`` names the offending argument."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


class DataError(ValueError):
    """The data cannot be trained on; the message says why. ``field``, where known, is the
    setting to change (``data``, ``eval_data``, ``val_count``...): the page shows that field."""

    def __init__(self, message: str, field_name: str | None = None) -> None:
        super().__init__(message)
        self.field = field_name


class StopRequested(Exception):
    """A run's Stop (its ``STOP`` file) arrived before it trained a step: in its data check, its
    data preparation, or its wait for another process preparing the same set. The trainer ends
    stopped, with nothing half-written, instead of training a step (or being killed)."""


def _is_int(value: Any) -> bool:
    # bool is an int subclass in Python; `batch_size: true` in a YAML file is a mistake, not 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A real, finite number: not a bool, a string, NaN or ±Inf."""
    if _is_int(value):
        return True
    return isinstance(value, float) and math.isfinite(value)


# Bounded at every level: a 400-byte YAML of nested aliases expands to 10⁹ items under repr().
_REPR = reprlib.Repr()  # keyword arguments need Python 3.12
_REPR.maxlevel, _REPR.maxstring, _REPR.maxlong, _REPR.maxother = 2, 60, 40, 60
_REPR.maxtuple = _REPR.maxlist = _REPR.maxdict = _REPR.maxset = _REPR.maxfrozenset = 4


def shown(value: Any) -> str:
    """``value`` for a message that names it, cut short: a hostile 5,000-character string or a
    YAML alias bomb must not flood the message (or build it for minutes)."""
    if _is_int(value) and value.bit_length() > 64:  # repr() refuses ints past 4,300 digits
        return f"an integer of {value.bit_length()} bits"
    text = _REPR.repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def path_shown(path: str) -> str:
    """A path for a message that names it: a hostile 5,000-character path must not flood the
    message (nor reach the page twice over), nor a NUL byte reach it as it is."""
    text = path.replace("\0", "\\0")
    return text if len(text) <= 200 else text[:197] + "..."


# Data given as a URL: a prepared set LitData streams from object storage or the Hub.
REMOTE_SCHEMES = ("s3://", "gs://", "azure://", "hf://")


def is_remote(data: str) -> bool:
    return data.startswith(REMOTE_SCHEMES)


# Virtual file systems of the kernel: never photos nor runs, and walking them can hang or never end.
SYSTEM_FOLDERS = ("/proc", "/sys", "/dev")


def is_system_path(real: str) -> bool:
    """Whether the real path ``real`` is in one of :data:`SYSTEM_FOLDERS` (or is one)."""
    return any(real == top or real.startswith(top + os.sep) for top in SYSTEM_FOLDERS)


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(data: Any) -> bool:
    """Whether ``data`` is written as a URL (``scheme://...``), readable or not."""
    return isinstance(data, str) and _URL.match(data) is not None


def unreadable_url(data: Any) -> str | None:
    """Why ``data``, a URL, cannot be read (``http://``, ``file://``, an upper-case ``S3://``);
    None for anything else. Taken as a folder, ``http://host/x`` read "data folder
    /app/dir/http:/host/x does not exist", a folder the person never named."""
    if not is_url(data) or is_remote(data):
        return None
    schemes = ", ".join(REMOTE_SCHEMES)
    return (f"{shown(data)} is a URL this app cannot read: a remote data set is a prepared set "
            f"at {schemes} (lower case); anything else, download it and give its folder")


def parse_bool(text: str) -> bool:
    """A command-line switch's value: true/false, on/off, yes/no or 1/0."""
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false (on or off), got {shown(text)}")


def _require(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise ConfigError(field_name, message)


def _check_int(obj: Any, name: str, low: int, high: int, optional: bool = False) -> None:
    """``obj.name`` must be an integer in [low, high] (or None where ``optional``)."""
    value = getattr(obj, name)
    if optional and value is None:
        return
    _require(_is_int(value) and low <= value <= high, name,
             f"must be an integer in [{low}, {high}], got {shown(value)}")


def _check_number(obj: Any, name: str, low: float, high: float, *, low_open: bool = False,
                  high_open: bool = False) -> None:
    """``obj.name`` must be a finite number within the bounds (open where the flags say)."""
    value = getattr(obj, name)
    ok = _is_number(value) and (value > low if low_open else value >= low) and (
        value < high if high_open else value <= high)
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    _require(ok, name, f"must be a finite number in {interval}, got {shown(value)}")


def _check_choice(obj: Any, name: str, choices: Any, what: str, optional: bool = False) -> None:
    """``obj.name`` must be one of ``choices`` (strings); the message lists them."""
    value = getattr(obj, name)
    if optional and value is None:
        return
    _require(isinstance(value, str) and value in choices, name,
             f"unknown {what} {shown(value)}; choose one of {', '.join(choices)}")


def _check_bool(obj: Any, name: str, optional: bool = False) -> None:
    """``obj.name`` must be a real bool: YAML's ``yes`` is one, the string ``"abc"`` or 1 is not."""
    value = getattr(obj, name)
    if optional and value is None:
        return
    _require(isinstance(value, bool), name, f"must be true or false, got {shown(value)}")


# --- channels and normalisation (issue 13, item 6; mae_core/channels.py fills them from the data)

NORMALIZATIONS = ("auto", "imagenet", "dataset")
MAX_CHANNELS = 64


def format_stats(values: Any) -> str:
    """Per-channel statistics as the config stores them: ``0.485,0.456,0.406``."""
    return ",".join(f"{float(v):.6g}" for v in values)


def parse_stats(value: Any, name: str) -> tuple[float, ...]:
    """``pixel_mean`` / ``pixel_std`` as numbers: a string of numbers separated by commas, one per
    channel (the form, the command line, config.yaml); ``""`` is none (computed from the data)."""
    if value == "":
        return ()
    numbers: tuple[float, ...] = ()
    if isinstance(value, str):
        try:
            numbers = tuple(float(item) for item in value.split(","))
        except ValueError:
            pass
    _require(bool(numbers) and all(math.isfinite(x) for x in numbers), name,
             f"must be numbers separated by commas, one per channel (e.g. 0.45,0.42,0.39), "
             f"got {shown(value)}")
    return numbers


def check_channels(cfg: Any) -> None:
    """``in_chans``, ``normalize`` and the statistics of a model config agree; the statistics
    are stored in one spelling (``0.5,0.25``), so equal configs compare equal."""
    _check_int(cfg, "in_chans", 1, MAX_CHANNELS, optional=True)
    _check_choice(cfg, "normalize", NORMALIZATIONS, "normalisation")
    channels = cfg.in_chans or 3
    _require(cfg.normalize != "imagenet" or channels == 3, "normalize",
             f"imagenet statistics are for 3-channel RGB images, in_chans is {channels}: use "
             "dataset (or auto)")
    mean, std = parse_stats(cfg.pixel_mean, "pixel_mean"), parse_stats(cfg.pixel_std, "pixel_std")
    _require(bool(mean) == bool(std), "pixel_mean" if mean else "pixel_std",
             "give pixel_mean and pixel_std together (or neither: computed from the data)")
    if mean:
        _require(cfg.normalize != "imagenet", "normalize",
                 "pixel_mean and pixel_std are a data set's statistics: set normalize to dataset")
        for name, values in (("pixel_mean", mean), ("pixel_std", std)):
            _require(len(values) == channels, name,
                     f"has {len(values)} value(s) but the model takes {channels} channel(s)"
                     + (" (in_chans is auto: set it)" if cfg.in_chans is None else ""))
        _require(all(s > 0 for s in std), "pixel_std", f"every value must be above 0, got {std}")
        # A mean of 1e308 or a std of 1e-308 would normalise every pixel to ±inf. The mean is a
        # fraction of full scale; the data's own std is floored at 1e-8 (mae_core.channels).
        _require(all(0 <= m <= 1 for m in mean), "pixel_mean",
                 f"every value is a fraction of full scale, from 0 to 1; got {shown(mean)}")
        _require(all(s >= 1e-8 for s in std), "pixel_std",
                 f"every value must be at least 1e-8, got {shown(std)}")
    object.__setattr__(cfg, "pixel_mean", format_stats(mean))  # frozen: the one normalisation
    object.__setattr__(cfg, "pixel_std", format_stats(std))
