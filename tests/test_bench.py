"""The benchmark command, run for real on a tiny model: both recipes train through real 2-process
CPU DDP, the reconstruction path and the app launch are measured, and the report says what ran.

No timing is asserted (speed is measured by the benchmark, not tested); what is asserted is that
each figure exists, is a real measurement, and that the two recipes really are the two recipes.
"""

from __future__ import annotations

import json
import math

TINY = ["--preset", "vit-tiny", "--image-size", "32", "--patch-size", "8", "--batch-size", "4",
        "--devices", "2", "--accelerator", "cpu", "--steps", "3", "--warmup-steps", "1",
        "--repeats", "1", "--recon-presets", "vit-tiny", "--recon-size", "32",
        "--recon-patch", "8", "--recon-runs", "3", "--recon-warmup", "1"]


def test_benchmark_measures_both_recipes_recon_and_app(run_module, tmp_path):
    out = tmp_path / "results.md"
    result = run_module("mae_core.bench", *TINY, "--out", out, timeout_s=600)
    assert result.returncode == 0, result.stderr[-4000:]

    data = json.loads(out.with_suffix(".json").read_text())
    tiny = data["training"]["vit-tiny"]
    clean, naive = tiny["ddp-clean"], tiny["naive"]
    for recipe in (clean, naive):
        assert recipe["launches"] == 1 and not recipe["errors"]
        assert recipe["world_size"] == 2 and recipe["backend"] == "gloo"
        assert recipe["strategy"] == "DDPStrategy" and recipe["batch_size"] == 4
        assert math.isfinite(recipe["images_per_s"]) and recipe["images_per_s"] > 0
        assert recipe["peak_rss_bytes"] > 0
    # The project's trainer runs plain DDP; the naive recipe needs the unused-parameter walk.
    assert clean["find_unused_parameters"] is False and clean["static_graph"] is True
    assert naive["find_unused_parameters"] is True
    assert tiny["speedup"] == clean["images_per_s"] / naive["images_per_s"]

    [recon] = data["reconstruction"]
    assert recon["preset"] == "vit-tiny" and recon["runs"] == 3
    assert 0 < recon["p50_ms"] <= recon["p95_ms"]

    assert "error" not in data["app"], data["app"]
    app = data["app"]
    assert app["serving_s"] > 0 and 0 < app["serving_rss_bytes"] <= app["peak_rss_bytes"]

    report = out.read_text()
    assert "python -m mae_core.bench --preset vit-tiny" in report  # the command that made it
    for heading in ("## Machine", "## Training throughput", "## Reconstruction latency", "## App"):
        assert heading in report
    assert "speed-up (ddp-clean / naive)" in report and f"{tiny['speedup']:.2f}×" in report
    assert "find_unused=False, static_graph=True" in report
    assert "find_unused=True" in report
    assert "torch" in report and "lightly" in report  # versions


def test_benchmark_refuses_bad_options_before_running(run_module, tmp_path):
    result = run_module("mae_core.bench", "--image-size", "30", "--patch-size", "8",
                        "--out", tmp_path / "r.md")
    assert result.returncode == 2
    assert "image_size" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "r.md").exists()

    result = run_module("mae_core.bench", "--steps", "0", "--out", tmp_path / "r.md")
    assert result.returncode == 2 and "positive" in result.stderr
