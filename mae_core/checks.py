"""Field checks shared by the config dataclasses: each raises :class:`ConfigError` naming the field.

The message says what was expected and shows the value (cut short: a hostile 5,000-character value
must not flood the message that names it).
"""

from __future__ import annotations

import argparse
import math
from typing import Any


class ConfigError(ValueError):
    """An impossible configuration value. ``field`` names the offending argument."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name



def _is_int(value: Any) -> bool:
    # bool is an int subclass in Python; `batch_size: true` in a YAML file is a mistake, not 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A real, finite number: not a bool, a string, NaN or ±Inf."""
    if _is_int(value):
        return True
    return isinstance(value, float) and math.isfinite(value)


def _shown(value: Any) -> str:
    # A hostile value (a 5,000-character string) must not flood the message that names it.
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_bool(text: str) -> bool:
    """A command-line switch's value: true/false, on/off, yes/no or 1/0."""
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false (on or off), got {text!r}")


def _require(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise ConfigError(field_name, message)


def _check_int(obj: Any, name: str, low: int, high: int, optional: bool = False) -> None:
    """``obj.name`` must be an integer in [low, high] (or None where ``optional``)."""
    value = getattr(obj, name)
    if optional and value is None:
        return
    _require(_is_int(value) and low <= value <= high, name,
             f"must be an integer in [{low}, {high}], got {_shown(value)}")


def _check_number(obj: Any, name: str, low: float, high: float, *, low_open: bool = False,
                  high_open: bool = False) -> None:
    """``obj.name`` must be a finite number within the bounds (open where the flags say)."""
    value = getattr(obj, name)
    ok = _is_number(value) and (value > low if low_open else value >= low) and (
        value < high if high_open else value <= high)
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    _require(ok, name, f"must be a finite number in {interval}, got {_shown(value)}")


def _check_choice(obj: Any, name: str, choices: Any, what: str, optional: bool = False) -> None:
    """``obj.name`` must be one of ``choices`` (strings); the message lists them."""
    value = getattr(obj, name)
    if optional and value is None:
        return
    _require(isinstance(value, str) and value in choices, name,
             f"unknown {what} {_shown(value)}; choose one of {', '.join(choices)}")


def _check_bool(obj: Any, name: str, optional: bool = False) -> None:
    """``obj.name`` must be a real bool: YAML's ``yes`` is one, the string ``"abc"`` or 1 is not."""
    value = getattr(obj, name)
    if optional and value is None:
        return
    _require(isinstance(value, bool), name, f"must be true or false, got {_shown(value)}")
