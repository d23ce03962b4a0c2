"""The trainer's command line: its help."""

from __future__ import annotations

import dataclasses

from mae_core.config import ModelConfig, TrainConfig
from mae_core.trainargs import FIELD_HELP, build_parser


def test_help_says_what_every_flag_means_with_its_choices_and_default():
    """``--help`` listed each flag with its Python type only ("int | None (default None)")."""
    names = [f.name for cls in (ModelConfig, TrainConfig) for f in dataclasses.fields(cls)]
    assert sorted(FIELD_HELP) == sorted(names)  # a new config field needs its help line
    text = " ".join(build_parser().format_help().split())  # argparse wraps the lines
    for name in names:
        flag = "--" + name.replace("_", "-")
        assert flag in text
        assert " ".join(FIELD_HELP[name].replace("%%", "%").split()) in text, name
    assert "vit-tiny, vit-small, vit-base" in text and "32-true, bf16-mixed" in text
    assert "--max-steps N optimizer steps to train (-1: train by max epochs) (default 300)" in text
    assert "int | None" not in text
