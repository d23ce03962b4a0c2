"""The training-curve chart: runs overlaid, raw + smoothed + per-epoch mean, a real log axis.

Data comes from :class:`mae_core.metrics.MetricsReader` (only new bytes are read per poll) and is
thinned to :data:`MAX_POINTS` per curve before it is sent, so a million-step run costs the browser
what a thousand-step one does. The chart is Vega-Lite (Altair), which Gradio draws natively and
which, unlike ``gr.LinePlot``, has log scales, number formats and tooltips.
"""

from __future__ import annotations

import copy
import functools
import math
import zlib
from collections.abc import Mapping, Sequence

import altair as alt
import numpy as np
import pandas as pd

from mae_core import display
from mae_core.metrics import HEADLINE_KNN_K, HEADLINE_KNN_TOP1, MetricsReader, thin
from ui.altair_spec import VegaLiteChart

MAX_POINTS = 1000  # per curve
# Mid-tones that read on light and dark backgrounds, each pair far apart (CIEDE2000 over 23):
# Tableau's own had a red and a pink, a pink and a purple, that two overlaid runs could not tell
# apart.
PALETTE = ("#1f77b4", "#ff7f0e", "#009e73", "#d62728", "#9467bd", "#17becf", "#bcbd22", "#ff9da7")
METRICS = display.METRICS
AXIS_FORMATS = {"loss": ".3~g", "lr": ".1e", "images_per_s": ",.0f"}
# Gradio's plot draws with Vega-Lite 5 (5.23 in Gradio 6.31).
VEGA_LITE_SCHEMA = "https://vega.github.io/schema/vega-lite/v5.json"
# Gradio draws a raw Vega-Lite spec unthemed: black text on a white box, even in dark mode. A
# transparent background (the page's shows through) and a mid-grey that reads on both.
CHART_GREY = "#8b8b94"
CHART_CONFIG = {
    "background": "transparent",
    "axis": {"labelColor": CHART_GREY, "titleColor": CHART_GREY, "domainColor": CHART_GREY,
             "tickColor": CHART_GREY, "gridColor": "rgba(128,128,128,0.25)"},
    "legend": {"labelColor": CHART_GREY, "titleColor": CHART_GREY},
    "view": {"stroke": "rgba(128,128,128,0.35)"},
}
# The kNN monitor's series (mae_core.monitor): top-1 accuracy per feature and k, as the legend says.
KNN_SERIES = {"knn_cls_k20_top1": "class token, k=20", "knn_cls_k200_top1": "class token, k=200",
              "knn_mean_k20_top1": "mean patch token, k=20",
              "knn_mean_k200_top1": "mean patch token, k=200"}


def run_colours(run_ids: Sequence[str]) -> dict[str, str]:
    """A colour per run that depends on the run's id, not on which other runs are plotted (two
    runs whose ids hash alike: the later one, in id order, takes the next free colour)."""
    taken: dict[str, str] = {}
    for run_id in sorted(run_ids):
        index = zlib.crc32(run_id.encode()) % len(PALETTE)
        for shift in range(len(PALETTE)):
            colour = PALETTE[(index + shift) % len(PALETTE)]
            if colour not in taken.values() or len(taken) >= len(PALETTE):
                break
        taken[run_id] = colour
    return taken


def curve_points(readers: Mapping[str, MetricsReader], metric: str, smoothing: float = 0.0,
                 max_points: int = MAX_POINTS) -> pd.DataFrame:
    """One long table (step, value, run, kind) of ``metric`` for each run: the raw values, their
    EMA when ``smoothing`` > 0, and for the loss the per-epoch mean over all ranks."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    frames = []
    for run_id, reader in readers.items():
        steps, values = reader.series(metric)
        thinned_steps, thinned = thin(steps, values, max_points)
        frames.append(_frame(thinned_steps, thinned, run_id, "raw"))
        if smoothing > 0 and len(thinned):
            # Thinning averaged ``bucket`` raw values per point: the same EMA on the points uses
            # the weight that many raw steps would have had.
            bucket = max(1.0, len(values) / len(thinned))
            frames.append(_frame(thinned_steps, np.asarray(display.ema(thinned, smoothing ** bucket)),
                                 run_id, "smoothed"))
        if metric == "loss":
            epoch_steps, epoch_values = reader.series("epoch_loss")
            frames.append(_frame(*thin(epoch_steps, epoch_values, max_points), run_id, "epoch mean"))
            # The held-out loss (fixed crops and masks): on the same axis as the training loss.
            val_steps, val_values = reader.series("val_loss")
            frames.append(_frame(*thin(val_steps, val_values, max_points), run_id, "validation"))
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame({"step": pd.Series(dtype="int64"), "value": pd.Series(dtype="float64"),
                             "run": pd.Series(dtype="string"), "kind": pd.Series(dtype="string")})
    return pd.concat(frames, ignore_index=True)


def _frame(steps: np.ndarray, values: np.ndarray, run_id: str, kind: str) -> pd.DataFrame:
    return pd.DataFrame({"step": np.asarray(steps, dtype=np.int64),
                         "value": np.asarray(values, dtype=np.float64), "run": run_id, "kind": kind})


def curve_chart(points: pd.DataFrame, metric: str, log_scale: bool) -> VegaLiteChart | None:
    """The chart of :func:`curve_points`' table; None when there is nothing to draw yet."""
    if log_scale:
        points = points[points["value"] > 0]
    if points.empty:
        return None
    runs = tuple(dict.fromkeys(points["run"]))
    kinds = frozenset(points["kind"])
    spec = copy.deepcopy(_layout(metric, bool(log_scale), runs, kinds))
    if log_scale:  # a log axis spans the data, not whole decades
        low, high = float(points["value"].min()), float(points["value"].max())
        pad = (high / low) ** 0.05
        # Ticks within the data, never in the 5 % margin (15 px of the 300): a label on a tick
        # at the axis's end reaches half its height past the plot, and Vega grows the chart by
        # that much. A live loss moved a tick into and out of the margin: the chart's height
        # flipped between 391 and 394 px on some polls, the log under it jumping with it.
        ticks = log_ticks(low, high)
        for layer in spec["layer"]:
            layer["encoding"]["y"]["scale"]["domain"] = [low / pad, high * pad]
            layer["encoding"]["y"]["axis"]["values"] = ticks
    _mark_steps(spec, points)
    spec["datasets"] = {"points": points.to_dict("records")}
    return VegaLiteChart(spec)


MAX_STEP_TICKS = 10


def step_ticks(first: int, last: int) -> list[int] | None:
    """Every step from ``first`` to ``last`` where they are few, else None (Vega's own ticks).
    Vega puts a tick between two steps (1.5 on a 2-step run), which the axis's whole-number
    format labels "2" again: the axis read "1, 2, 2"."""
    return list(range(first, last + 1)) if last - first < MAX_STEP_TICKS else None


def _mark_steps(spec: dict, points: pd.DataFrame) -> None:
    ticks = step_ticks(int(points["step"].min()), int(points["step"].max()))
    if ticks is not None:
        for part in spec.get("layer", [spec]):
            part["encoding"]["x"]["axis"]["values"] = ticks


MAX_LOG_TICKS = 12
# Labelled mantissas per decade, tried in this order: the first set whose ticks leave neither end
# of the axis unlabelled wins. 1-2-5 left a loss from 0.65 to 1.6 with "1" alone, and every digit
# read 0.7, 0.8, 0.9, 1 with nothing over the upper half; 1-1.5-2-3-5-7 lie about evenly on a log
# axis, and every digit with 1.2, 1.5 and 2.5 fills in a span of half a decade.
TICK_MANTISSAS = ((1, 2, 5), (1, 1.5, 2, 3, 5, 7), (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 7, 8, 9))
# The most of the axis (its log span) that may lie between an end and the nearest label.
MAX_END_GAP = 0.2


def log_ticks(low: float, high: float) -> list[float]:
    """Labelled values for a log axis from ``low`` to ``high``: round mantissas (1-2-5, then
    finer: :data:`TICK_MANTISSAS`) times the powers of ten, the first set with at
    least three labels and one within :data:`MAX_END_GAP` of either end; the powers of ten over
    many decades; evenly spaced round values on a span too narrow for any of those. Vega's own
    labelled only the powers of ten, so a loss between 1 and 3 had no label at all."""
    if not low < high:  # one value (a single point)
        return [low]
    first, last = math.floor(math.log10(low)), math.ceil(math.log10(high))

    def within(digits: Sequence[float]) -> list[float]:
        ticks = [float(f"{d}e{e}") for e in range(first, last + 1) for d in digits]
        return sorted(t for t in ticks if low <= t <= high)

    span = math.log10(high / low)

    def reaches_both_ends(ticks: list[float]) -> bool:
        return (len(ticks) >= 3 and math.log10(ticks[0] / low) <= MAX_END_GAP * span
                and math.log10(high / ticks[-1]) <= MAX_END_GAP * span)

    coarse = within(TICK_MANTISSAS[0])
    if len(coarse) > MAX_LOG_TICKS:  # many decades: the powers of ten, every n-th of them
        decades = within((1,))
        return decades[::-(-len(decades) // MAX_LOG_TICKS)]
    for digits in TICK_MANTISSAS:
        ticks = within(digits)
        if reaches_both_ends(ticks) and len(ticks) <= MAX_LOG_TICKS:
            return ticks
    rough = (high - low) / 4
    power = 10.0 ** math.floor(math.log10(rough))
    step = next(m * power for m in (5, 2, 1) if m * power <= rough)
    eps = 1e-9  # 1.4 / 0.1 is 13.999...: the end a tick sits on counts
    # Rounded to the step's own digits (a fixed number of decimals made ticks of 1e-13 all 0).
    values = (float(f"{k * step:.12g}")
              for k in range(math.ceil(low / step - eps), math.floor(high / step + eps) + 1))
    return list(dict.fromkeys(values))


@functools.lru_cache(maxsize=64)
def _layout(metric: str, log_scale: bool, runs: tuple[str, ...], kinds: frozenset[str]) -> dict:
    """The chart without its data, built (and validated) by Altair once per layout. A layer only
    for each kind of point present: an empty one makes Vega warn of an infinite extent on every
    update (no epoch ended yet, no evaluation yet)."""
    colours = run_colours(runs)
    colour = alt.Color("run:N", title="run", scale=alt.Scale(domain=list(runs),
                                                            range=[colours[r] for r in runs]),
                       legend=alt.Legend(orient="bottom", direction="vertical", labelLimit=0))
    y_axis = alt.Axis(format=AXIS_FORMATS[metric], title=METRICS[metric])
    # "zero" only on a linear axis: Vega-Lite warns that it drops it from a log one.
    scale = (alt.Scale(type="log", nice=False) if log_scale
             else alt.Scale(type="linear", zero=False, nice=True))
    y = alt.Y("value:Q", axis=y_axis, scale=scale)
    # padding: a marker on the first or last step (an epoch mean, an evaluation) drawn whole
    x = alt.X("step:Q", axis=alt.Axis(format="d", tickMinStep=1, title="step"),
              scale=alt.Scale(padding=6, nice=False))
    tooltip = [alt.Tooltip("run:N"), alt.Tooltip("kind:N"), alt.Tooltip("step:Q", format="d"),
               alt.Tooltip("value:Q", format=AXIS_FORMATS[metric], title=metric)]
    base = alt.Chart(alt.NamedData(name="points")).encode(x=x, y=y, color=colour, tooltip=tooltip)
    of = lambda kind: base.transform_filter(alt.datum.kind == kind)  # noqa: E731
    smoothed = "smoothed" in kinds
    layers = []
    if "raw" in kinds:
        layers.append(of("raw").mark_line(opacity=0.35 if smoothed else 1.0, strokeWidth=1))
    if smoothed:
        layers.append(of("smoothed").mark_line(strokeWidth=2))
    if "epoch mean" in kinds:
        layers.append(of("epoch mean").mark_point(shape="diamond", size=50, filled=True,
                                                  opacity=0.9))
    if "validation" in kinds:  # dashed, with its evaluations marked (they are N steps apart)
        layers.append(of("validation").mark_line(
            strokeDash=[6, 3], strokeWidth=2, point=alt.OverlayMarkDef(shape="square", size=30)))
    # Invisible points make every value hoverable, not just the line's pixels.
    layers.append(base.mark_point(opacity=0, size=60))
    return _fit(alt.layer(*layers).properties(height=300).interactive(bind_y=False))


def _fit(chart: alt.TopLevelMixin) -> dict:
    """The chart's spec, as wide as its box (ui.render.CSS lets the box span the column, so a
    phone's narrow column gets a narrow chart, axis and legend inside it), for the Vega-Lite 5
    that Gradio bundles (Altair writes its own newer schema, which vega-embed warns of on every
    draw), themed for light and dark pages alike (:data:`CHART_CONFIG`)."""
    spec = chart.properties(width="container").to_dict()
    spec["$schema"] = VEGA_LITE_SCHEMA
    config = spec.setdefault("config", {})
    for key, value in CHART_CONFIG.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    return spec


def describe_curves(readers: Mapping[str, MetricsReader], metric: str) -> str:
    """The text under the chart: a few lines per run, each fact on a line of its own (how many
    points, the last value, the last epoch mean, the held-out scores).

    Its lines do not come and go as a run streams: the last value's and the epoch mean's stand
    from the start ("—" until the first step, the first epoch's end). It was a clause added to the run's one line, which
    then wrapped: the log under the chart jumped 23 px at the end of the first epoch."""
    blocks = []
    for run_id, reader in readers.items():
        last = reader.last(metric)
        # Short lines, each the same from the first step to the millionth: on a phone the run's
        # id beside the count, or the count beside the last value, wrapped at 10 points.
        lines = [f"`{run_id}`",
                 f"{len(reader.series(metric)[0])} points, the last at step "
                 f"{last[0] if last else '—'}",
                 f"last {METRICS[metric]} {display.format_number(last[1]) if last else '—'}"]
        if metric == "loss":
            epoch = reader.last("epoch_loss")
            lines.append(f"last epoch mean {display.format_number(epoch[1])} (◆)" if epoch
                         else "last epoch mean — (◆, when the first epoch ends)")
        val = reader.last("val_loss") if metric == "loss" else None
        if val:
            lines.append(f"validation loss {display.format_number(val[1])} at step {val[0]} "
                         "(dashed, ■)")
        # The series itself, not knn_top1: that alias was the class token at k=200 in older runs.
        knn = reader.last(HEADLINE_KNN_TOP1)
        if knn:
            lines.append(f"kNN top-1 {knn[1]:.1%} at step {knn[0]} (mean patch token, "
                         f"k={HEADLINE_KNN_K})")
        blocks.append("  \n".join(lines))
    return "\n\n".join(blocks) if blocks else "No run selected."


def knn_points(readers: Mapping[str, MetricsReader], max_points: int = MAX_POINTS) -> pd.DataFrame:
    """One long table (step, value, run, kind) of the kNN monitor's top-1 accuracies
    (:data:`KNN_SERIES`: class token and mean patch token, k = 20 and 200) for each run."""
    frames = []
    for run_id, reader in readers.items():
        for key, label in KNN_SERIES.items():
            frames.append(_frame(*thin(*reader.series(key), max_points), run_id, label))
    frames = [f for f in frames if len(f)]
    if not frames:
        return _frame(np.empty(0), np.empty(0), "", "").iloc[0:0]
    return pd.concat(frames, ignore_index=True)


def knn_chart(points: pd.DataFrame) -> VegaLiteChart | None:
    """kNN top-1 accuracy (0-100 %) over steps: colour by run, dash by feature and k; None when
    no plotted run has a kNN monitor (no labels)."""
    if points.empty:
        return None
    spec = copy.deepcopy(_knn_layout(tuple(dict.fromkeys(points["run"]))))
    _mark_steps(spec, points)
    spec["datasets"] = {"points": points.to_dict("records")}
    return VegaLiteChart(spec)


@functools.lru_cache(maxsize=64)
def _knn_layout(runs: tuple[str, ...]) -> dict:
    colours = run_colours(runs)
    colour = alt.Color("run:N", title="run", scale=alt.Scale(domain=list(runs),
                                                            range=[colours[r] for r in runs]),
                       legend=alt.Legend(orient="bottom", direction="vertical", labelLimit=0))
    labels = list(KNN_SERIES.values())
    dash = alt.StrokeDash("kind:N", title="features", sort=labels,
                          scale=alt.Scale(domain=labels, range=[[1, 0], [6, 3], [2, 2], [8, 2, 2, 2]]),
                          legend=alt.Legend(orient="bottom", direction="vertical"))
    y = alt.Y("value:Q", axis=alt.Axis(format=".0%", title="kNN top-1 (held-out)"),
              scale=alt.Scale(domain=[0, 1]))
    # padding: a marker on the first or last step (an epoch mean, an evaluation) drawn whole
    x = alt.X("step:Q", axis=alt.Axis(format="d", tickMinStep=1, title="step"),
              scale=alt.Scale(padding=6, nice=False))
    tooltip = [alt.Tooltip("run:N"), alt.Tooltip("kind:N", title="features"),
               alt.Tooltip("step:Q", format="d"), alt.Tooltip("value:Q", format=".1%", title="top-1")]
    chart = alt.Chart(alt.NamedData(name="points")).mark_line(point=True, strokeWidth=2).encode(
        x=x, y=y, color=colour, strokeDash=dash, detail="kind:N", tooltip=tooltip)
    return _fit(chart.properties(height=220).interactive(bind_y=False))
