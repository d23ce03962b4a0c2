"""``python -m bench.contention``: the figures it reports, and the environments it compares (the
command itself trains six runs: measured by hand, README)."""

from __future__ import annotations

import json

from bench.contention import SETTINGS, images_per_s, setting_env


def test_the_rate_is_the_median_after_the_first_quarter(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    rates = [1, 2, 90, 40, 50, 60, 70, 80]
    rows = [{"step": i, "images_per_s": rate} for i, rate in enumerate(rates, 1)]
    rows.insert(3, {"step": 3, "epoch_loss": 0.5})  # a line without a rate is no step
    metrics.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    assert images_per_s(metrics) == 65.0  # the median of 90, 40, 50, 60, 70, 80


def test_each_setting_is_only_itself_whatever_the_shell_set(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setenv("GOMP_SPINCOUNT", "7")
    default = setting_env("libgomp default")
    assert not {"OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(default)
    assert setting_env("OMP_WAIT_POLICY=PASSIVE")["OMP_WAIT_POLICY"] == "PASSIVE"
    one = setting_env("OMP_NUM_THREADS=1")
    assert one["OMP_NUM_THREADS"] == "1" and "GOMP_SPINCOUNT" not in one
    assert len(SETTINGS) == 3
