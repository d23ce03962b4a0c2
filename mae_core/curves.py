"""Shaping a run's numbers for display: smoothed curves, progress, ETA and the runs table.

Nothing here draws anything or knows about the web UI; it turns the rows of ``metrics.jsonl`` and
the dicts of ``status.json`` into plain tables and numbers that any front end can show.

Example:
    >>> rows = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]
    >>> curve_frame({"run-a": rows}, "loss", smoothing=0.5)["series"].unique().tolist()
    ['run-a · raw', 'run-a']
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd

# The metrics each step logs (``metrics.jsonl``), with a label for people.
METRICS: dict[str, str] = {
    "loss": "loss on masked patches",
    "lr": "learning rate",
    "images_per_s": "images / s",
}
RUN_TABLE_HEADERS = ("run", "state", "steps", "final loss", "duration", "policy", "preset")
MAX_POINTS = 2000  # per series: enough for a smooth curve, little enough to redraw every second


def ema(values: Sequence[float], weight: float) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard's smoothing).

    ``weight`` 0 returns the values unchanged; closer to 1 is smoother. The bias correction keeps
    the first points from being pulled towards zero.
    """
    if not 0 <= weight < 1:
        raise ValueError(f"smoothing must be in [0, 1), got {weight}")
    out, average = [], 0.0
    for n, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**n))
    return out


def series_values(rows: Iterable[Mapping[str, Any]], metric: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``metric``, in step order, skipping rows without a finite value.

    A resumed run's file may repeat a step; the last line for a step wins.
    """
    by_step: dict[int, float] = {}
    for row in rows:
        step, value = row.get("step"), row.get(metric)
        if isinstance(step, (int, float)) and isinstance(value, (int, float)) and math.isfinite(value):
            by_step[int(step)] = float(value)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def _thin(steps: list[int], values: list[float], max_points: int) -> tuple[list[int], list[float]]:
    """At most ``max_points`` evenly spaced points, always keeping the last one."""
    if len(steps) <= max_points:
        return steps, values
    stride = math.ceil(len(steps) / max_points)
    keep = list(range(len(steps) - 1, -1, -stride))[::-1]
    return [steps[i] for i in keep], [values[i] for i in keep]


def run_label(run_id: str) -> str:
    """A short name for a run in a legend: ``20251126-201828-vit-tiny-ddp-clean`` → ``20:18:28 vit-tiny
    ddp-clean``; ids of another form are returned as they are."""
    match = _RUN_ID.match(run_id)
    if not match:
        return run_id
    hms = ":".join(match["time"][i:i + 2] for i in (0, 2, 4))
    return f"{hms} {match['rest'].replace('-ddp-clean', ' ddp-clean').replace('-reference', ' reference')}"


def run_labels(run_ids: Iterable[str]) -> dict[str, str]:
    """Short, distinct legend names for ``run_ids`` (the full ids where the short ones collide)."""
    ids = list(dict.fromkeys(run_ids))
    short = {r: run_label(r) for r in ids}
    if len(set(short.values())) < len(short):
        return {r: r for r in ids}
    return short


def series_name(label: str, kind: str) -> str:
    """The ``series`` value of a run's curve: the label itself for the smoothed curve."""
    return label if kind == "smoothed" else f"{label} · raw"


def curve_frame(runs: Mapping[str, Iterable[Mapping[str, Any]]], metric: str = "loss",
                smoothing: float = 0.0, log_scale: bool = False,
                max_points: int = MAX_POINTS, labels: Mapping[str, str] | None = None) -> pd.DataFrame:
    """One long table (``step``, ``value``, ``series``, ``run``, ``kind``) of ``metric`` for ``runs``.

    Each run gives a ``raw`` curve and, when ``smoothing`` > 0, a ``smoothed`` one (EMA over the raw
    values); ``series`` names them for a legend (:func:`series_name` of ``labels[run]``, default the
    run's key). With ``log_scale`` the values are log10 (non-positive values are dropped), since a
    line plot without a log axis can still show log10 of the loss.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    frames = []
    for name, rows in runs.items():
        steps, values = series_values(rows, metric)
        curves = [("raw", values)]
        if smoothing > 0 and values:
            curves.append(("smoothed", ema(values, smoothing)))
        for kind, ys in curves:
            xs = steps
            if log_scale:
                pairs = [(x, math.log10(y)) for x, y in zip(xs, ys) if y > 0]
                xs, ys = [p[0] for p in pairs], [p[1] for p in pairs]
            xs, ys = _thin(list(xs), list(ys), max_points)
            label = (labels or {}).get(name, name)
            frames.append(pd.DataFrame({"step": xs, "value": ys, "series": series_name(label, kind),
                                        "run": name, "kind": kind}))
    if not frames:
        return empty_curve_frame()
    frame = pd.concat(frames, ignore_index=True)
    return frame.astype(_COLUMNS)


_COLUMNS = {"step": "int64", "value": "float64", "series": "string", "run": "string", "kind": "string"}
_RUN_ID = re.compile(r"^(?P<date>\d{8})-(?P<time>\d{6})-(?P<rest>.+)$")


def empty_curve_frame() -> pd.DataFrame:
    return pd.DataFrame({name: pd.Series(dtype=dtype) for name, dtype in _COLUMNS.items()})


def axis_title(metric: str, log_scale: bool) -> str:
    label = METRICS.get(metric, metric)
    return f"log10 {label}" if log_scale else label


# --- progress --------------------------------------------------------------------------------

def progress_fraction(status: Mapping[str, Any]) -> float | None:
    """Completed share of the run in [0, 1], or None when the total is unknown."""
    step, total = status.get("step") or 0, status.get("total_steps")
    if not isinstance(total, (int, float)) or total <= 0:
        return None
    return max(0.0, min(1.0, step / total))


def eta_seconds(status: Mapping[str, Any]) -> float | None:
    """Seconds left at the run's average pace so far, or None when it cannot be told yet."""
    step, total, elapsed = status.get("step") or 0, status.get("total_steps"), status.get("elapsed_s")
    if not isinstance(total, (int, float)) or total <= 0 or not elapsed or step <= 0:
        return None
    return max(0.0, (total - step) * elapsed / step)


def format_duration(seconds: float | None) -> str:
    """``1 h 02 min``, ``3 min 05 s``, ``12 s``, or ``–`` for unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "–"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min {secs:02d} s"
    return f"{secs} s"


def format_number(value: Any, digits: int = 4) -> str:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return "–"
    return f"{value:.{digits}g}"


def run_rows(statuses: Iterable[Mapping[str, Any]]) -> list[list[Any]]:
    """Rows of the runs table (:data:`RUN_TABLE_HEADERS`) from ``RunManager.list()``."""
    rows = []
    for s in statuses:
        total = s.get("total_steps")
        steps = f"{s.get('step') or 0} / {total}" if total else str(s.get("step") or 0)
        rows.append([s.get("run_id", ""), s.get("state", "?"), steps, format_number(s.get("loss")),
                     format_duration(s.get("elapsed_s")), s.get("policy") or "–",
                     s.get("preset") or "–"])
    return rows
