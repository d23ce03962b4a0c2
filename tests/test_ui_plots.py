"""ui.plots: the training curve sent to the browser is bounded, keeps each run's colour, and is a
Vega-Lite chart with a real log axis, readable tick formats, tooltips and a legend by run id."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from mae_core.metrics import MetricsReader
from ui import plots
from ui.plots import MAX_POINTS, PALETTE, curve_chart, curve_points, run_colours

RUN_A = "20261126-141502-vit-tiny-ddp-clean"
RUN_B = "20261127-093011-vit-small-reference"
STEPS_PER_EPOCH = 1000


def write_run(path: Path, steps: int) -> Path:
    """metrics.jsonl as the trainer writes it: a line per step, an epoch summary per epoch."""
    lines = []
    for step in range(1, steps + 1):
        lines.append(json.dumps({"step": step, "epoch": (step - 1) // STEPS_PER_EPOCH,
                                 "loss": 2.0 / (1 + step / 500) + 0.01 * (step % 7),
                                 "lr": 1.5e-4 * min(1.0, step / 100), "images_per_s": 250.0 + step % 5,
                                 "elapsed_s": step * 0.1}))
        if step % STEPS_PER_EPOCH == 0:
            lines.append(json.dumps({"step": step, "epoch": step // STEPS_PER_EPOCH - 1,
                                     "epoch_loss": 1.0 / (step // STEPS_PER_EPOCH)}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def long_run(tmp_path_factory) -> MetricsReader:
    return MetricsReader(write_run(tmp_path_factory.mktemp("long") / "metrics.jsonl", 100_000))


@pytest.fixture
def short_runs(tmp_path) -> dict[str, MetricsReader]:
    return {RUN_A: MetricsReader(write_run(tmp_path / "a.jsonl", 2500)),
            RUN_B: MetricsReader(write_run(tmp_path / "b.jsonl", 1200))}


def specs(chart) -> list[dict]:
    """Every encoding block of the chart's Vega-Lite JSON (one per layer)."""
    found = []

    def walk(node):
        if isinstance(node, dict):
            if "encoding" in node:
                found.append(node["encoding"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(chart.to_dict())
    assert found, "the chart has no encodings"
    return found


def test_a_100k_step_run_is_thinned_per_curve(long_run):
    points = curve_points({RUN_A: long_run}, "loss", smoothing=0.9)
    sizes = points.groupby("kind").size().to_dict()
    assert set(sizes) == {"raw", "smoothed", "epoch mean"}
    assert sizes["raw"] <= MAX_POINTS and sizes["smoothed"] <= MAX_POINTS
    assert sizes["raw"] >= MAX_POINTS // 2  # thinned, not thrown away
    raw = points[points["kind"] == "raw"]
    assert raw["step"].max() == 100_000 and raw["step"].is_monotonic_increasing
    assert len(curve_points({RUN_A: long_run}, "lr", smoothing=0.0)) <= MAX_POINTS
    # The JSON that reaches the browser stays small too.
    assert len(json.dumps(curve_chart(points, "loss", True).to_dict())) < 1_000_000


def test_the_loss_plot_carries_the_per_epoch_mean(long_run):
    points = curve_points({RUN_A: long_run}, "loss", smoothing=0.0)
    epochs = points[points["kind"] == "epoch mean"]
    assert len(epochs) == 100
    assert epochs["step"].tolist()[:3] == [1000, 2000, 3000]
    assert epochs["value"].tolist()[:3] == pytest.approx([1.0, 0.5, 1 / 3])
    assert "epoch mean" not in set(curve_points({RUN_A: long_run}, "lr")["kind"])


def test_smoothing_zero_sends_no_smoothed_curve(short_runs):
    assert "smoothed" not in set(curve_points(short_runs, "loss", smoothing=0.0)["kind"])
    smoothed = curve_points(short_runs, "loss", smoothing=0.6)
    assert set(smoothed[smoothed["kind"] == "smoothed"]["run"]) == {RUN_A, RUN_B}
    raw = smoothed[(smoothed["kind"] == "raw") & (smoothed["run"] == RUN_A)]["value"].to_numpy()
    ema = smoothed[(smoothed["kind"] == "smoothed") & (smoothed["run"] == RUN_A)]["value"].to_numpy()
    assert np.std(np.diff(ema)) < np.std(np.diff(raw))
    chart = curve_chart(curve_points(short_runs, "loss", smoothing=0.0), "loss", False)
    assert "'smoothed'" not in json.dumps(chart.to_dict())


def test_an_unknown_metric_is_refused(short_runs):
    with pytest.raises(ValueError, match="loss"):
        curve_points(short_runs, "accuracy")


def test_nothing_to_draw_gives_no_chart(tmp_path):
    empty = {RUN_A: MetricsReader(tmp_path / "missing.jsonl")}
    points = curve_points(empty, "loss", 0.8)
    assert points.empty and list(points.columns) == ["step", "value", "run", "kind"]
    assert curve_chart(points, "loss", True) is None


def test_a_run_keeps_its_colour_whatever_else_is_plotted():
    ids = [f"202611{d}-{h:02d}{m:02d}41-vit-tiny-ddp-clean" for d in (26, 27) for h in (9, 14, 21)
           for m in (5, 18, 42)]
    slots = {}
    for run_id in ids:  # runs whose ids hash to different palette slots
        slots.setdefault(run_colours([run_id])[run_id], run_id)
    distinct = list(slots.values())
    assert len(distinct) >= 5
    alone = {run_id: run_colours([run_id])[run_id] for run_id in distinct}
    rng = np.random.default_rng(0)
    for _ in range(30):
        chosen = list(rng.choice(distinct, size=rng.integers(1, len(distinct) + 1), replace=False))
        colours = run_colours(chosen)
        assert colours == {r: alone[r] for r in chosen}
        assert len(set(colours.values())) == len(chosen)  # overlaid runs are told apart
    assert set(alone.values()) <= set(PALETTE)


def test_runs_that_hash_alike_still_get_different_colours():
    ids = [f"run-{i}" for i in range(40)]
    colours = run_colours(ids[:len(PALETTE)])
    assert len(set(colours.values())) == len(PALETTE)
    # The older run (first in id order) keeps its own colour when a colliding newer run joins.
    first = ids[0]
    colliding = next(r for r in ids[1:] if run_colours([r])[r] == run_colours([first])[first])
    both = run_colours([colliding, first])
    assert both[first] == run_colours([first])[first] and both[colliding] != both[first]


def lab(colour: str) -> np.ndarray:
    from skimage.color import rgb2lab

    return rgb2lab(np.array([[[int(colour[i:i + 2], 16) / 255 for i in (1, 3, 5)]]]))[0, 0]


def difference(a: str, b: str) -> float:
    """How different two colours look (CIEDE2000: about 2 is just noticeable, 20 is clear)."""
    from skimage.color import deltaE_ciede2000

    return float(deltaE_ciede2000(lab(a), lab(b)))


def test_runs_shown_together_get_clearly_different_colours():
    """Two overlaid runs were #e15759 and #d37295: a red and a pink hardly told apart."""
    pairs = [(a, b) for i, a in enumerate(PALETTE) for b in PALETTE[i + 1:]]
    assert min(difference(a, b) for a, b in pairs) > 20
    # Mid-tones: neither lost on the white page nor on the dark one.
    assert all(40 < lab(colour)[0] < 80 for colour in PALETTE)
    ids = [f"2026{m:02d}{d:02d}-1{d % 10}0000-vit-tiny-ddp-clean" for m in (1, 6)
           for d in range(1, 29)]
    rng = np.random.default_rng(1)
    for _ in range(200):
        shown = list(rng.choice(ids, size=rng.integers(2, len(PALETTE) + 1), replace=False))
        colours = list(run_colours(shown).values())
        assert len(set(colours)) == len(shown)
        assert min(difference(a, b) for i, a in enumerate(colours) for b in colours[i + 1:]) > 20


def test_the_chart_colour_scale_follows_the_run(short_runs, tmp_path):
    third = "20261128-000000-vit-base-ddp-clean"
    readers = {**short_runs, third: MetricsReader(write_run(tmp_path / "c.jsonl", 300))}

    def colour_of(run_id, chosen):
        points = curve_points({r: readers[r] for r in chosen}, "loss", 0.0)
        scale = specs(curve_chart(points, "loss", True))[0]["color"]["scale"]
        return dict(zip(scale["domain"], scale["range"], strict=True))[run_id]

    alone = colour_of(RUN_B, [RUN_B])
    assert alone == colour_of(RUN_B, [RUN_A, RUN_B]) == colour_of(RUN_B, [third, RUN_B])


def test_chart_json_log_axis_formats_tooltips_and_legend(short_runs):
    chart = curve_chart(curve_points(short_runs, "loss", 0.8), "loss", True)
    for enc in specs(chart):
        assert enc["y"]["scale"]["type"] == "log"
        assert enc["x"]["axis"]["format"] == "d"
        assert enc["x"]["field"] == "step"
        tooltip_fields = {t["field"] for t in enc["tooltip"]}
        assert {"run", "step", "value"} <= tooltip_fields
        assert enc["color"]["title"] == "run"
        assert set(enc["color"]["scale"]["domain"]) == {RUN_A, RUN_B}  # full run ids
        assert enc["color"]["legend"]["labelLimit"] == 0  # never cut short
        assert "images_per_s" not in json.dumps(enc["y"]["axis"])
    linear = curve_chart(curve_points(short_runs, "loss", 0.8), "loss", False)
    assert all(enc["y"]["scale"]["type"] == "linear" for enc in specs(linear))


def test_log_axis_labels_values_above_one_and_narrow_spans(tmp_path):
    """Vega labelled a log axis at powers of ten only: a loss from 0.7 to 3 read "1" alone."""
    assert plots.log_ticks(0.7, 3.2) == [0.7, 1.0, 1.5, 2.0, 3.0]  # spread, not 0.7-0.8-0.9-1
    assert plots.log_ticks(0.05, 1.5) == [0.05, 0.1, 0.2, 0.5, 1.0]
    assert plots.log_ticks(120, 4000) == [200.0, 500.0, 1000.0, 2000.0]
    assert plots.log_ticks(0.9, 1.4) == [0.9, 1.0, 1.1, 1.2, 1.3, 1.4]  # within a decade
    assert plots.log_ticks(0.98, 1.02) == [0.98, 0.99, 1.0, 1.01, 1.02]
    assert plots.log_ticks(2.0, 2.0) == [2.0]  # a single point
    tiny = plots.log_ticks(1.5e-13, 1.6e-13)
    assert len(tiny) == len(set(tiny)) >= 3 and all(1.5e-13 <= t <= 1.6e-13 for t in tiny)
    wide = plots.log_ticks(1e-8, 1e8)  # 16 decades: powers of ten, not 49 labels
    assert len(wide) <= plots.MAX_LOG_TICKS and wide[0] == 1e-8 and 1.0 in wide
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": v}) + "\n"
                            for s, v in ((1, 3.0), (2, 1.5), (3, 0.9), (4, 0.75))))
    chart = curve_chart(curve_points({RUN_A: MetricsReader(path)}, "loss", 0.0), "loss", True)
    for enc in specs(chart):
        low, high = enc["y"]["scale"]["domain"]
        values = enc["y"]["axis"]["values"]
        assert 2.0 in values and all(low <= v <= high for v in values)


def test_a_log_axis_has_labels_over_its_whole_span():
    """A loss from 0.65 to 1.6 read 0.7, 0.8, 0.9, 1 and nothing over the axis's upper half."""
    for low, high in ((0.65, 1.6), (0.13, 1.7), (0.3, 1.6), (0.05, 0.3), (0.6, 1.9)):
        ticks = plots.log_ticks(low, high)
        span = math.log10(high / low)
        assert len(ticks) >= 3 and (high < 1.2 or max(ticks) > 1), (low, high, ticks)
        assert math.log10(ticks[0] / low) <= plots.MAX_END_GAP * span, (low, high, ticks)
        assert math.log10(high / ticks[-1]) <= plots.MAX_END_GAP * span, (low, high, ticks)
    assert plots.log_ticks(0.65, 1.6) == [0.7, 1.0, 1.5]


def test_a_log_axis_labels_no_tick_in_its_margin(tmp_path):
    """A label on a tick at the axis's end reached past the plot and Vega grew the chart by that:
    a live loss moving a tick into and out of the 5 % margin made the chart 391, then 394 px
    high. Every tick lies within the data, off the margin."""
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": v}) + "\n"
                            for s, v in ((1, 1.97), (2, 1.2), (3, 0.51), (4, 0.6))))
    chart = curve_chart(curve_points({RUN_A: MetricsReader(path)}, "loss", 0.0), "loss", True)
    for enc in specs(chart):
        values = enc["y"]["axis"]["values"]
        assert values and all(0.51 <= v <= 1.97 for v in values), values


def test_a_short_run_has_one_tick_per_step(tmp_path):
    """Vega ticked 1.5 between two steps and the whole-number format labelled it "2": a 2-step
    run's axis read "1, 2, 2". A few steps get a tick each; more are left to Vega."""
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2)))
    for smoothing, log_scale in ((0.0, True), (0.6, False)):
        chart = curve_chart(curve_points({RUN_A: MetricsReader(path)}, "loss", smoothing),
                            "loss", log_scale)
        assert [enc["x"]["axis"]["values"] for enc in specs(chart)] == [[1, 2]] * len(specs(chart))
    assert plots.step_ticks(3, 9) == [3, 4, 5, 6, 7, 8, 9]
    assert plots.step_ticks(1, 40) is None
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 41)))
    chart = curve_chart(curve_points({RUN_A: MetricsReader(path)}, "loss", 0.0), "loss", False)
    assert all("values" not in enc["x"]["axis"] for enc in specs(chart))


def test_log_axis_leaves_out_values_it_cannot_draw(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": v}) + "\n"
                            for s, v in ((1, 0.0), (2, -1.0), (3, 0.5), (4, 0.25))))
    chart = curve_chart(curve_points({RUN_A: MetricsReader(path)}, "loss", 0.0), "loss", True)
    data = chart.to_dict()["datasets"]
    values = [row["value"] for rows in data.values() for row in rows]
    assert values and min(values) > 0


def test_learning_rate_ticks_are_scientific(short_runs):
    chart = curve_chart(curve_points(short_runs, "lr", 0.0), "lr", False)
    for enc in specs(chart):
        assert enc["y"]["axis"]["format"] == ".1e"
        assert enc["y"]["axis"]["title"] == plots.METRICS["lr"] == "learning rate"
    speed = curve_chart(curve_points(short_runs, "images_per_s", 0.0), "images_per_s", False)
    assert specs(speed)[0]["y"]["axis"]["title"] == "images / s"


def test_describe_curves_speaks_in_words(short_runs):
    text = plots.describe_curves(short_runs, "images_per_s")
    assert RUN_A in text and "images / s" in text and "images_per_s" not in text
    loss_text = plots.describe_curves(short_runs, "loss")
    assert "2500 points" in loss_text and "epoch mean" in loss_text
    assert plots.describe_curves({}, "loss") == "No run selected."


def test_the_text_under_the_chart_keeps_its_lines_as_a_run_streams(tmp_path):
    """The epoch mean was a clause added to the run's line at the end of the first epoch: the
    line wrapped and the log under the chart jumped 23 px. Its line stands from the first point."""
    path = write_run(tmp_path / "m.jsonl", STEPS_PER_EPOCH - 1)
    before = plots.describe_curves({RUN_A: MetricsReader(path)}, "loss")
    assert "last epoch mean —" in before
    path = write_run(tmp_path / "n.jsonl", STEPS_PER_EPOCH)
    after = plots.describe_curves({RUN_A: MetricsReader(path)}, "loss")
    assert "last epoch mean 1 (◆)" in after
    # the run, its points, its last loss, its epoch mean
    assert before.count("\n") == after.count("\n") == 3 == after.count("  \n")


# --- held-out evaluation: validation loss with the loss, the kNN chart beside it (issue 14) ----

def write_evaluated_run(path: Path, steps: int = 60, every: int = 20, knn: bool = True) -> Path:
    """metrics.jsonl with the monitor's lines (mae_core.monitor) every ``every`` steps."""
    write_run(path, steps)
    with open(path, "a") as handle:
        for step in range(0, steps + 1, every):
            row = {"step": step, "epoch": 0, "val_loss": 1.5 - step / 100}
            if knn:
                row |= {key: 0.5 + step / 200 + 0.01 * i
                        for i, key in enumerate(plots.KNN_SERIES)}
                # As an older run wrote it: knn_top1 was the class token at k=200 then.
                row |= {"knn_top1": row["knn_cls_k200_top1"], "knn_top5": 1.0}
            handle.write(json.dumps(row) + "\n")
    return path


def test_validation_loss_is_drawn_with_the_loss_dashed(tmp_path):
    readers = {RUN_A: MetricsReader(write_evaluated_run(tmp_path / "a.jsonl"))}
    points = curve_points(readers, "loss", 0.8)
    validation = points[points["kind"] == "validation"]
    assert validation["step"].tolist() == [0, 20, 40, 60]
    assert validation["value"].tolist() == pytest.approx([1.5, 1.3, 1.1, 0.9])
    assert "validation" not in set(curve_points(readers, "lr")["kind"])
    spec = curve_chart(points, "loss", True).to_dict()
    layers = [layer for layer in spec["layer"]
              if "validation" in json.dumps(layer.get("transform", []))]
    assert len(layers) == 1 and layers[0]["mark"]["strokeDash"] == [6, 3]
    assert layers[0]["mark"]["point"]  # each evaluation is marked
    text = plots.describe_curves(readers, "loss")
    # The headline series itself (82 %), named: not the knn_top1 alias an older run wrote (81 %).
    assert "validation loss 0.9 at step 60" in text
    assert "kNN top-1 82.0% at step 60 (mean patch token, k=20)" in text


def test_knn_chart_has_each_feature_and_k_per_run_in_percent(tmp_path):
    readers = {RUN_A: MetricsReader(write_evaluated_run(tmp_path / "a.jsonl")),
               RUN_B: MetricsReader(write_evaluated_run(tmp_path / "b.jsonl", every=30))}
    points = plots.knn_points(readers)
    assert set(points["kind"]) == set(plots.KNN_SERIES.values())
    assert len(points[points["run"] == RUN_A]) == 4 * 4 and len(points[points["run"] == RUN_B]) == 3 * 4
    chart = plots.knn_chart(points)
    enc = specs(chart)[0]
    assert enc["y"]["scale"]["domain"] == [0, 1] and enc["y"]["axis"]["format"] == ".0%"
    assert enc["strokeDash"]["field"] == "kind" and set(enc["color"]["scale"]["domain"]) == {RUN_A, RUN_B}
    rows = chart.to_dict()["datasets"]["points"]
    assert {row["run"] for row in rows} == {RUN_A, RUN_B}


def test_no_knn_chart_without_labels(tmp_path, short_runs):
    unlabelled = {RUN_A: MetricsReader(write_evaluated_run(tmp_path / "a.jsonl", knn=False))}
    assert plots.knn_chart(plots.knn_points(unlabelled)) is None
    assert plots.knn_chart(plots.knn_points(short_runs)) is None
    assert "kNN" not in plots.describe_curves(unlabelled, "loss")


# --- in Gradio's browser runtime -------------------------------------------------------------

def layer_kinds(chart) -> list[str]:
    """The kind each layer filters to ("" for the unfiltered hover layer)."""
    return [next((t["filter"].split("'")[1] for t in layer.get("transform") or []), "")
            for layer in chart.to_dict()["layer"]]


def test_charts_fit_their_box_and_give_vega_nothing_to_warn_of(short_runs, tmp_path):
    """At 375 px the chart, 500 px wide, lost its y axis and half its legend; every update
    logged three Vega warnings (schema newer than Gradio's Vega-Lite 5, "zero" on a log axis,
    an empty layer's infinite extent)."""
    evaluated = {RUN_A: MetricsReader(write_evaluated_run(tmp_path / "evaluated.jsonl"))}
    charts = [curve_chart(curve_points(short_runs, "loss", 0.8), "loss", True),
              curve_chart(curve_points(short_runs, "loss", 0.0), "loss", False),
              plots.knn_chart(plots.knn_points(evaluated))]
    for chart in charts:
        spec = chart.to_dict()
        assert spec["width"] == "container"  # as wide as the column (CSS: #loss-plot)
        assert spec["$schema"].startswith("https://vega.github.io/schema/vega-lite/v5")
    assert all("zero" not in enc["y"]["scale"] for enc in specs(charts[0]))
    assert all(enc["y"]["scale"]["zero"] is False for enc in specs(charts[1]))
    # A layer per kind of point there is: no epoch has ended or evaluation run yet here.
    early = {RUN_A: MetricsReader(write_run(tmp_path / "early.jsonl", 40))}
    assert layer_kinds(curve_chart(curve_points(early, "loss", 0.0), "loss", True)) == ["raw", ""]
    assert layer_kinds(curve_chart(curve_points(early, "loss", 0.8), "loss", True)) == [
        "raw", "smoothed", ""]
    assert layer_kinds(curve_chart(curve_points(short_runs, "loss", 0.8), "loss", True)) == [
        "raw", "smoothed", "epoch mean", ""]
    assert layer_kinds(curve_chart(curve_points(evaluated, "loss", 0.8), "loss", True)) == [
        "raw", "smoothed", "validation", ""]


def test_charts_are_themed_for_dark_and_light_pages(short_runs, tmp_path):
    """Gradio draws a raw Vega-Lite spec unthemed: in dark mode the chart was a white box with
    black text. A transparent background and mid-grey text, grid and frame read on both."""
    evaluated = {RUN_A: MetricsReader(write_evaluated_run(tmp_path / "evaluated.jsonl"))}
    for chart in (curve_chart(curve_points(short_runs, "loss", 0.8), "loss", True),
                  plots.knn_chart(plots.knn_points(evaluated))):
        config = chart.to_dict()["config"]
        assert config["background"] == "transparent"
        for part in ("axis", "legend"):
            assert config[part]["labelColor"] == config[part]["titleColor"] == plots.CHART_GREY
        assert config["axis"]["gridColor"].startswith("rgba(128,128,128")
        assert config["view"]["stroke"].startswith("rgba(128,128,128")
        assert config["view"]["continuousWidth"] == 300  # Altair's own config is kept
