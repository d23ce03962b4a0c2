"""Argument types the benchmark's command lines share: a bad count is refused by argparse, with
the option's name, before anything runs."""

from __future__ import annotations

import argparse


def positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


def non_negative(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {value}")
    return number


def non_negative_float(value: str) -> float:
    number = float(value)
    if not number >= 0 or number == float("inf"):  # NaN fails the first test
        raise argparse.ArgumentTypeError(f"must be a non-negative number, got {value}")
    return number
