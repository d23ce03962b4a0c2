"""``python -m bench.loader`` (can this data feed this device?) and the training table's data wait."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.training import step_figures
from mae_core import prepared
from tests.test_prepared import _photos


def test_the_data_wait_is_the_mean_so_a_bursty_loader_shows():
    """Loader workers each deliver a whole batch: a loader slower than the step reads as runs of
    ready batches and a long wait between them. Its median was 0 on a loader-bound GPU run."""
    rank0 = {"batch_size": 256, "world_size": 1, "steps": 4, "window_s": 2.0,
             "wait_s": [0.0, 0.0, 0.0, 0.8]}
    figures = step_figures(rank0)
    assert figures["wait_s_per_step"] == 0.2
    assert figures["images_per_s"] == 512.0 and figures["s_per_step"] == 0.5


def test_the_loader_tool_measures_a_folder_and_a_prepared_set_both_ways(run_module, tmp_path):
    src = _photos(tmp_path / "photos", 12)
    data = tmp_path / "prepared"
    prepared.prepare(str(src), data, workers=1, verbose=False)
    from bench import loader

    rows = {}
    for name, flags in {"memory": ["--data", src], "prepared": ["--data", data],
                        "device": ["--data", data, "--decode-on-device"],
                        "blank": ["--transfer-only"]}.items():
        out = tmp_path / f"{name}.json"
        argv = [*map(str, flags), "--image-size", "32", "--batch-size", "4", "--batches", "3",
                "--warmup", "1", "--workers", "0", "--device", "cpu", "--json", str(out)]
        if name == "prepared":  # the command itself once; the other ways in this process (each
            result = run_module("bench.loader", *argv)  # command imports torch, ~5 s here)
            assert result.returncode == 0, result.stderr[-3000:]
        else:
            assert loader.main(argv) == 0
        rows[name] = json.loads(Path(out).read_text())
    assert rows["memory"]["kind"] == "memory" and rows["prepared"]["kind"] == "prepared"
    assert rows["blank"]["kind"] == "transfer only"
    assert [rows[n]["decode_on_device"] for n in rows] == [False, False, True, False]
    assert all(row["images_per_s"] > 0 and row["batches"] == 3 and row["mean_wait_s"] >= 0
               for row in rows.values())
    # what one worker computes alone, and the share of it the loader delivers (no workers here:
    # the loader is that one core); blank images have no work to compare
    assert rows["blank"]["per_core_images_per_s"] is None
    for name in ("memory", "prepared", "device"):
        row = rows[name]
        assert row["per_core_images_per_s"] > 0
        assert row["pipeline_efficiency"] == pytest.approx(
            row["images_per_s"] / row["per_core_images_per_s"], rel=0.02, abs=0.01)


def test_a_step_length_paces_the_loader_and_says_how_fully_it_was_fed(tmp_path):
    """``--step-ms``: a consumer that takes no time hides a loader's stalls at epoch ends; with a
    device-like step after each batch the rate cannot pass batch / step, and ``fed_fraction`` says
    what share of that the loader delivered."""
    from bench.loader import measure

    src = _photos(tmp_path / "photos", 8)
    row = measure(str(src), 32, 4, 0, batches=3, warmup=1, device="cpu", step_ms=50.0)
    ceiling = 4 / 0.050
    assert row["step_ms"] == 50.0
    assert 0 < row["images_per_s"] <= ceiling
    assert row["fed_fraction"] == pytest.approx(row["images_per_s"] / ceiling, abs=0.002)
    assert row["fed_fraction"] > 0.5  # in-memory crops of 8 small photos: far quicker than 50 ms
    unpaced = measure(str(src), 32, 4, 0, batches=3, warmup=1, device="cpu")
    assert unpaced["fed_fraction"] is None and unpaced["images_per_s"] > ceiling


def test_the_loader_tool_refuses_a_missing_folder_with_the_reason(run_module, tmp_path):
    result = run_module("bench.loader", "--data", tmp_path / "nowhere", "--device", "cpu")
    assert result.returncode == 2
    assert "nowhere" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("flags, option", [(["--workers", "-3"], "--workers"),
                                           (["--warmup", "-1"], "--warmup"),
                                           (["--batch-size", "0"], "--batch-size"),
                                           (["--step-ms", "-5"], "--step-ms"),
                                           (["--step-ms", "nan"], "--step-ms")])
def test_the_loader_tool_refuses_impossible_counts_before_it_loads_anything(run_module, flags, option):
    result = run_module("bench.loader", *flags, "--device", "cpu")
    assert result.returncode == 2
    assert option in result.stderr and "Traceback" not in result.stderr
