"""The field checks the config dataclasses share (mae_core/checks.py): a value shown in a message
is cut short whatever it is, a switch reads the usual spellings of true and false, and per-channel
statistics read from and are written in one spelling."""

from __future__ import annotations

import argparse

import pytest

from mae_core.checks import ConfigError, format_stats, parse_bool, parse_stats, shown


def test_a_value_in_a_message_is_cut_short_whatever_its_size():
    assert shown(3) == "3" and shown("abc") == "'abc'"
    long = shown("x" * 5000)
    assert len(long) <= 60 and long.startswith("'xxx") and "..." in long
    assert shown(2**300) == "an integer of 301 bits"  # repr() refuses past 4,300 digits
    bomb: list = []
    for _ in range(30):  # 10**30 items under a plain repr(), as a YAML alias bomb expands
        bomb = [bomb] * 10
    assert len(shown(bomb)) <= 60 and shown(bomb).startswith("[[[")


def test_a_switch_reads_true_and_false_in_their_usual_spellings():
    for text in ("1", "true", "Yes", "ON"):
        assert parse_bool(text) is True
    for text in ("0", "False", "no", "off"):
        assert parse_bool(text) is False
    with pytest.raises(argparse.ArgumentTypeError, match="expected true or false .*'maybe'"):
        parse_bool("maybe")


def test_channel_statistics_read_from_and_are_written_in_one_spelling():
    assert parse_stats(" 0.10, .2", "pixel_mean") == (0.1, 0.2)
    assert parse_stats("", "pixel_std") == ()  # none: computed from the data
    assert format_stats((0.1, 0.123456789, 2)) == "0.1,0.123457,2"
    assert format_stats(parse_stats(format_stats((0.485, 0.456)), "pixel_mean")) == "0.485,0.456"
    for bad in ("0.1;0.2", "0.1,,0.2", "nan", "inf,1", 0.5, None):
        with pytest.raises(ConfigError, match="must be numbers separated by commas") as err:
            parse_stats(bad, "pixel_mean")
        assert err.value.field == "pixel_mean"
