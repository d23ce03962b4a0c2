"""``python -m bench.learning``: each variant is what its name says, and a smoke run writes its row."""

from __future__ import annotations

import json

import pytest

from bench import learning
from mae_core.config import ModelConfig


def test_each_variant_is_the_defaults_but_for_what_its_name_says():
    """Written when norm_pix_loss was the default: after the switch "old-default" was not the old
    recipe and "-nonorm" repeated "lr1e-3-wu20"."""
    v = learning.variants()
    assert ModelConfig().norm_pix_loss is False
    assert v["old-default"][0] == {"norm_pix_loss": True}  # the old defaults had it on
    assert v["lr1e-3-wu20-normpix"][0] == {"norm_pix_loss": True}
    assert v["lr1e-3-wu20"][0] == {}
    configs = [json.dumps(kw, sort_keys=True) for kw in v.values()]
    assert len(set(configs)) == len(configs)  # no two variants train the same run


def test_an_unknown_variant_is_refused_not_skipped(capsys):
    with pytest.raises(SystemExit) as done:
        learning.main(["--only", "lr1e-3-wu2O"])
    assert done.value.code == 2 and "no variant named lr1e-3-wu2O" in capsys.readouterr().err


def test_a_smoke_run_writes_its_row(tmp_path, capsys):
    assert learning.main(["--only", "lr1e-3-wu20", "--steps", "2", "--eval-every", "1",
                          "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [row["name"] for row in rows] == ["lr1e-3-wu20"]
    assert sorted(map(int, rows[0]["fixed"])) == [0, 1, 2]
    assert (tmp_path / "lr1e-3-wu20.png").is_file()
