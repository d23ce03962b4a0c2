"""The benchmark command (``python -m bench``), run for real on a tiny model and a short run: both
training recipes go through real 2-process CPU DDP, the Reconstruct tab's path and the app launch
are measured, a growing ``metrics.jsonl`` is polled, and the report says what ran.

No timing is asserted (speed is measured by the benchmark, not tested); what is asserted is that
each figure exists and is a real measurement, that the two recipes really are the two recipes,
that a poll sends a bounded payload, and that running one job keeps the others' results.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.gpu import check_rows, check_table  # noqa: E402
from bench.training import step_quantiles  # noqa: E402
from bench.poll import (POLLED_METRICS, SITUATIONS, append_steps, chart_points,  # noqa: E402
                        write_run)
from mae_core.config import PRECISIONS, ModelConfig  # noqa: E402
from mae_core.flops import training_flops_per_image  # noqa: E402
from mae_core.hardware import mfu  # noqa: E402
from mae_core.metrics import MetricsStore  # noqa: E402

TINY = ["--preset", "vit-tiny", "--image-size", "32", "--patch-size", "8", "--batch-size", "4",
        "--devices", "2", "--accelerator", "cpu", "--steps", "3", "--warmup-steps", "1",
        "--repeats", "1", "--recon-presets", "vit-tiny", "--recon-size", "32",
        "--recon-patch", "8", "--recon-runs", "3", "--recon-warmup", "1",
        "--poll-lines", "5000", "--poll-max-points", "300", "--poll-repeats", "3"]


def _positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


def _assert_training(tiny: dict) -> None:
    clean, naive = tiny["ddp-clean"], tiny["naive"]
    flops = training_flops_per_image(ModelConfig(preset="vit-tiny", image_size=32, patch_size=8))
    for recipe in (clean, naive):
        assert recipe["launches"] == 1 and not recipe["errors"]
        assert recipe["world_size"] == 2 and recipe["backend"] == "gloo"
        assert recipe["strategy"] == "DDPStrategy" and recipe["batch_size"] == 4
        assert _positive(recipe["images_per_s"]) and recipe["peak_rss_bytes"] > 0
        # What ran and how close to the hardware: every row carries it.
        assert recipe["preset"] == "vit-tiny"
        assert (recipe["image_size"], recipe["patch_size"]) == (32, 8)
        assert recipe["precision"] in PRECISIONS
        assert recipe["flops_per_image"] == flops
        assert _positive(recipe["peak_flops"]) and _positive(recipe["mfu"])
        achieved = recipe["images_per_s"] * flops
        assert recipe["mfu"] == pytest.approx(achieved / (2 * recipe["peak_flops"]))
    # The project's trainer runs plain DDP; the naive recipe needs the unused-parameter walk.
    assert clean["find_unused_parameters"] is False and clean["static_graph"] is True
    assert naive["find_unused_parameters"] is True
    assert tiny["speedup"] == clean["images_per_s"] / naive["images_per_s"]


def _assert_poll(poll: dict, lines: int, max_points: int) -> None:
    """Both pollers measured every situation, and every poll sent a bounded payload."""
    assert poll["lines"] == lines
    assert poll["rows"] == lines + lines // 1000  # a step line each, an epoch line per 1000
    assert poll["file_bytes"] > 0 and poll["load_average_start"] and poll["load_average_end"]
    assert set(poll["pollers"]) == {"metrics", "ui"}
    for name, row in poll["pollers"].items():
        assert "error" not in row, (name, row)
        assert _positive(row["first_read_ms"])
        for situation in SITUATIONS:
            timing = row[situation]
            assert timing["count"] == poll["polls"]
            assert all(_positive(timing[k]) for k in ("p50_ms", "p95_ms", "mean_ms"))
            assert timing["p50_ms"] <= timing["p95_ms"]
        assert row["worst_p95_ms"] == max(row[s]["p95_ms"] for s in SITUATIONS)
        for shape in (row["first_read"], row["last"]):  # a chart was sent: bounded
            assert shape["sent"] and 0 < shape["payload_bytes"]
            assert all(0 < n <= row["max_points"] for n in shape["payload_points"].values())
    metrics = poll["pollers"]["metrics"]
    assert metrics["max_points"] == max_points
    assert set(metrics["last"]["payload_points"]) == set(POLLED_METRICS)
    # With nothing new the Train tab leaves its chart alone: nothing is sent.
    assert poll["pollers"]["ui"]["idle_payload"]["sent"] is False


def test_benchmark_measures_every_job(run_module, tmp_path, monkeypatch):
    monkeypatch.setenv("MAE_STUDIO_CACHE_DIR", str(tmp_path / "cache"))  # this run's own probes
    out = tmp_path / "results.md"
    result = run_module("bench", *TINY, "--out", out, timeout_s=600)
    assert result.returncode == 0, result.stderr[-4000:]

    data = json.loads(out.with_suffix(".json").read_text())
    assert data["jobs_run"] == ["train", "recon", "app", "poll"]
    tiny = data["training"]["vit-tiny"]
    _assert_training(tiny)
    # The benchmark probed the peak before the launches, in the very entry the trainers read.
    [entry] = json.loads((tmp_path / "cache" / "peak.json").read_text())["entries"].values()
    assert entry["probes"] == 1
    assert tiny["ddp-clean"]["peak_flops"] == tiny["naive"]["peak_flops"] == entry["flops"]

    [recon] = data["reconstruction"]
    assert recon["preset"] == "vit-tiny" and recon["runs"] == 3
    assert 0 < recon["p50_ms"] <= recon["p95_ms"] and _positive(recon["load_ms"])
    assert "`open_rgb` → `reconstruct_uploads`" in out.read_text()  # the Reconstruct tab's path

    assert "error" not in data["app"], data["app"]
    app = data["app"]
    assert app["serving_s"] > 0 and 0 < app["serving_rss_bytes"] <= app["peak_rss_bytes"]

    _assert_poll(data["poll"], lines=5000, max_points=300)

    report = out.read_text()
    assert "python -m bench --preset vit-tiny" in report  # the command that made it
    for heading in ("## Machine", "## Training throughput", "## Reconstruction latency", "## App",
                    "## Polling a long run"):
        assert heading in report
    assert "speed-up (ddp-clean / naive)" in report and f"{tiny['speedup']:.2f}×" in report
    assert "find_unused=False, static_graph=True" in report
    assert "| GFLOP/image | images/s | MFU | peak GFLOP/s per device |" in report
    assert f"| {100 * tiny['ddp-clean']['mfu']:.1f}% |" in report
    assert "find_unused=True" in report
    assert "torch" in report and "lightly" in report  # versions
    assert "Kept from an earlier sitting" not in report

    _one_job_keeps_the_others(out, data)


def _one_job_keeps_the_others(out: Path, before: dict) -> None:
    """``--job poll`` rewrites the poll section only: the training figures stay, marked as kept.
    (In this process: the command line itself ran above, and another start imports torch.)"""
    from bench.__main__ import main as bench_main

    assert bench_main(["--job", "poll", "--poll-lines", "3000", "--poll-max-points", "100",
                       "--poll-repeats", "2", "--out", str(out)]) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["jobs_run"] == ["poll"]
    _assert_poll(data["poll"], lines=3000, max_points=100)
    for key in ("training", "reconstruction", "app"):
        assert data[key] == before[key]
    assert data["sittings"]["train"]["command"] == before["command"]
    assert data["sittings"]["poll"]["command"].startswith("python -m bench --job poll")

    report = out.read_text()
    assert report.count("Kept from an earlier sitting") == 3  # training, reconstruction, app
    assert f"{before['training']['vit-tiny']['speedup']:.2f}×" in report
    assert report.count("## Polling a long run") == 1 and "thin(…, 100)" in report


def test_a_poll_sends_at_most_max_points_per_series_however_long_the_run(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_run(path, 12_000)
    store = MetricsStore()
    first = chart_points(store, path, max_points=500)
    append_steps(path, 12_001, 3_000)
    later = chart_points(store, path, max_points=500)

    for points in (first, later):
        assert set(points) == set(POLLED_METRICS)
        for series in points.values():
            assert 0 < len(series["steps"]) == len(series["values"]) <= 500
            assert series["steps"] == sorted(series["steps"])
            assert all(math.isfinite(v) for v in series["values"])
    assert first["loss"]["steps"][-1] == 12_000 and later["loss"]["steps"][-1] == 15_000
    assert len(later["epoch_loss"]["steps"]) == 15  # one per 1000 steps: too few to thin
    assert json.loads(json.dumps(later)) == later  # what goes to the browser is plain JSON


def test_benchmark_refuses_bad_options_before_running(run_module, tmp_path):
    result = run_module("bench", "--image-size", "30", "--patch-size", "8",
                        "--out", tmp_path / "r.md")
    assert result.returncode == 2
    assert "image_size" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "r.md").exists()

    result = run_module("bench", "--steps", "0", "--out", tmp_path / "r.md")
    assert result.returncode == 2 and "positive" in result.stderr
    result = run_module("bench", "--job", "plot", "--out", tmp_path / "r.md")
    assert result.returncode == 2 and "poll" in result.stderr  # the valid jobs are listed


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="the GPU check needs a CUDA GPU; none is visible")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present: the GPU check would run")
def test_the_gpu_check_refuses_clearly_without_cuda(run_module, tmp_path):
    result = run_module("bench", "--gpu", "--out", tmp_path / "gpu.md")
    assert result.returncode == 2
    assert "needs a CUDA GPU" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "gpu.md").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present: the benchmark would run")
def test_the_training_benchmark_on_a_missing_gpu_refuses_clearly(run_module, tmp_path):
    result = run_module("bench", "--job", "train", "--accelerator", "gpu", "--repeats", "1",
                        "--out", tmp_path / "r.md")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: accelerator: GPUs were asked for but no CUDA GPU is visible" in result.stderr
    assert not (tmp_path / "r.md").exists()


def test_the_gpu_table_states_the_gap_to_30_percent_mfu():
    """The H100 target of FIELD-NOTES: ViT-B/16 at 30% of 989 TFLOP/s is ~5,000 images/s/GPU."""
    flops = training_flops_per_image(ModelConfig(preset="vit-base", image_size=224, patch_size=16))
    measured = {"preset": "vit-base", "image_size": 224, "patch_size": 16,
                "precision": "bf16-mixed", "flops_per_image": flops, "world_size": 2,
                "batch_size": 256, "images_per_s": 5000.0, "peak_flops": 989e12}
    measured["mfu"] = mfu(5000.0, flops, 989e12, 2)
    [row] = check_rows({"vit-base bf16-mixed": {"ddp-clean": measured}})
    assert row["images_per_s_per_gpu"] == 2500.0
    assert row["target_images_per_s_per_gpu"] == pytest.approx(5066, abs=1)
    assert row["speedup_to_target"] == pytest.approx(5066 / 2500, rel=1e-3)
    table = "\n".join(check_table([row], []))
    assert "2.03× short of 30% MFU" in table and "| 14.8% |" in table and "| 989 |" in table


def test_the_step_times_tell_a_slow_pace_from_one_held_up_now_and_then():
    """A run whose median step is the model's but whose every fifth step waits reads so."""
    steady = {"step_s": [0.074] * 18 + [0.075, 0.073]}
    stalled = {"step_s": ([0.074] * 4 + [0.7]) * 2}
    assert step_quantiles([]) is None and step_quantiles([{"step_s": []}]) is None
    assert step_quantiles([steady]) == {"p10": 0.074, "p50": 0.074, "p90": 0.074, "max": 0.075}
    both = step_quantiles([steady, stalled, stalled])  # every launch's steps pooled
    assert both["p50"] == pytest.approx(0.074) and both["max"] == 0.7 and both["p90"] == 0.7
    measured = {"preset": "vit-base", "image_size": 224, "patch_size": 16, "world_size": 1,
                "images_per_s": 1800.0, "step_s_quantiles": both}
    [row] = check_rows({"vit-base bf16-mixed": {"ddp-clean": measured}})
    table = "\n".join(check_table([row], []))
    assert ("Step times of vit-base bf16-mixed (host clock, s): p10 0.074, median 0.074, "
            "p90 0.700, longest 0.700.") in table


@pytest.mark.gpu
@needs_cuda
def test_the_gpu_check_reports_mfu_on_every_visible_gpu(run_module, tmp_path, monkeypatch):
    """A short version of ``python -m bench --gpu`` (vit-base 224 px bf16 on every GPU)."""
    monkeypatch.setenv("MAE_STUDIO_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "results-gpu.md"
    result = run_module("bench", "--gpu", "--steps", "5", "--warmup-steps", "3", "--batch-size",
                        "64", "--out", out, timeout_s=900)
    assert result.returncode == 0, result.stderr[-4000:]
    data = json.loads(out.with_suffix(".json").read_text())
    [row] = data["rows"]
    assert row["world_size"] == torch.cuda.device_count() and row["precision"] == "bf16-mixed"
    assert (row["preset"], row["image_size"], row["patch_size"]) == ("vit-base", 224, 16)
    assert row["flops_per_image"] == training_flops_per_image(
        ModelConfig(preset="vit-base", image_size=224, patch_size=16))
    assert _positive(row["images_per_s"]) and _positive(row["peak_flops"])
    assert 0 < row["mfu"] <= 1 and _positive(row["target_images_per_s_per_gpu"])
    assert all(_positive(peak["measured"]) for peak in data["peaks"])
    report = out.read_text()
    assert "MFU" in report and "30% MFU" in report
    # The clocks it ran at: nvidia-smi sampled beside the run (it ships with the driver).
    [clocks] = data["clocks"].values()
    assert clocks["missing"] is None, clocks
    assert {row["gpu"] for row in clocks["gpus"]} == set(range(torch.cuda.device_count()))
    assert "GPU clocks during" in report
