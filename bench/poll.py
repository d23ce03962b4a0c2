"""Polling a long run: what a live-view poll of a 1,000,000-line ``metrics.jsonl`` costs and sends.

A run's live view polls every second or two. This job writes a run's ``metrics.jsonl`` in the
trainer's line format (a ``loss``/``lr``/``images_per_s``/``elapsed_s`` line per step and an
``epoch_loss`` line every 1,000 steps) to a scratch run directory, then times one poll in four
situations: the first read (the whole file parsed), polls with nothing new, and polls right after
the trainer appended 1 or 100 lines. It reports the points sent per series and the bytes, which
must stay bounded however long the run. Two pollers are timed, each with its own reader cache:

- ``metrics``: the data alone, ``mae_core.metrics`` only (:class:`MetricsPoll`);
- ``ui``: the Train tab's own chart functions, :func:`ui.train.curve_key` then, when it changed,
  :func:`ui.train.curve_view` and the chart's JSON as ``gr.Plot`` sends it (:class:`UiChartPoll`).
  If the UI cannot be imported or fails, its row says why; the benchmark goes on.
"""

from __future__ import annotations

import json
import math
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from bench.procs import load_average
from bench.stats import ms_summary

POLLED_METRICS = ("loss", "epoch_loss", "lr")  # the data poller's series: the charts' metrics
STEPS_PER_EPOCH = 1000
TARGET_MS = 50.0  # issue 9: a poll after the first read must cost less than this
APPENDS = (1, 100)  # lines the trainer wrote between two polls
SITUATIONS = ("idle", *(f"append_{n}" for n in APPENDS))
RUN_ID = "bench-long-run"
# The Train tab's defaults: the loss curve, log axis, EMA smoothing 0.8.
UI_VIEW = {"metric": "loss", "log_scale": True, "smoothing": 0.8}


@dataclass(frozen=True)
class PollSettings:
    """How big a run to poll, how far the data poller thins it, how many polls per situation."""

    lines: int = 1_000_000
    max_points: int = 2000
    polls: int = 30


# --- the run's file ---------------------------------------------------------------------------

def _f32(value: float) -> float:
    """``value`` as the trainer writes it: a float32 tensor's ``.item()``, all 17 digits."""
    import numpy as np

    return float(np.float32(value))


def metric_lines(first_step: int, count: int, seed: int = 0) -> Iterator[str]:
    """``count`` steps of ``metrics.jsonl`` from ``first_step`` on, with the epoch lines."""
    rng = random.Random(seed + first_step)
    for step in range(first_step, first_step + count):
        loss = 0.35 + 0.65 * math.exp(-step / 200_000) + rng.gauss(0, 0.02)
        lr = 1.5e-4 * 0.5 * (1 + math.cos(math.pi * min(step / 1_500_000, 1)))
        yield json.dumps({"step": step, "loss": _f32(loss), "lr": _f32(lr),
                          "images_per_s": _f32(170 + rng.gauss(0, 5)), "elapsed_s": step * 0.3751})
        if step % STEPS_PER_EPOCH == 0:
            yield json.dumps({"step": step, "epoch_loss": _f32(loss)})


def append_steps(path: Path, first_step: int, count: int) -> None:
    """Append as the trainer does: whole lines, flushed when the file is closed."""
    with open(path, "a") as handle:
        handle.write("".join(line + "\n" for line in metric_lines(first_step, count)))


def write_run(path: Path, steps: int, chunk: int = 50_000) -> None:
    for first in range(1, steps + 1, chunk):
        append_steps(path, first, min(chunk, steps + 1 - first))


# --- the pollers ------------------------------------------------------------------------------

class Poller(Protocol):
    description: str
    max_points: int

    def __call__(self) -> str | None:
        """One poll: the JSON sent to the browser, or None when the poll sends no chart."""

    def points(self, sent: str) -> dict[str, int]:
        """Points per series in what a poll sent."""


def chart_points(store: Any, path: Path, max_points: int) -> dict[str, dict[str, list[float]]]:
    """The points of every plotted series of one run, each thinned to ``max_points``."""
    from mae_core.metrics import thin

    reader = store.reader(path)
    points = {}
    for metric in POLLED_METRICS:
        steps, values = thin(*reader.series(metric), max_points)
        points[metric] = {"steps": steps.tolist(), "values": values.tolist()}
    return points


class MetricsPoll:
    """The data alone: ``MetricsStore.reader(path).series(metric)``, ``thin``, ``json.dumps``."""

    def __init__(self, path: Path, max_points: int) -> None:
        from mae_core.metrics import MetricsStore

        self.path, self.max_points, self.store = path, max_points, MetricsStore()
        self.description = (f"`MetricsStore.reader(path).series(metric)` → "
                            f"`thin(…, {max_points})` → `json.dumps`, for "
                            f"{', '.join(POLLED_METRICS)}")

    def __call__(self) -> str:
        return json.dumps(chart_points(self.store, self.path, self.max_points))

    def points(self, sent: str) -> dict[str, int]:
        return {metric: len(series["steps"]) for metric, series in json.loads(sent).items()}


class UiChartPoll:
    """The Train tab's chart, as its poll handler refreshes it: ``curve_key``, and when the key
    changed, ``curve_view`` and the chart's JSON (``gr.Plot`` sends an Altair chart's
    ``to_json()``)."""

    def __init__(self, runs_dir: Path) -> None:
        from mae_core.rundir import RunPaths
        from ui import plots, train
        from ui.common import AppContext

        class Runs:  # the run manager's one method these handlers use
            def paths(self, run_id: str) -> RunPaths:
                return RunPaths(runs_dir / run_id)

        self.train, self.ctx, self.key = train, AppContext(manager=Runs()), None
        self.max_points = int(plots.MAX_POINTS)
        view = ", ".join(f"{k}={v}" for k, v in UI_VIEW.items())
        self.description = (f"`ui.train.curve_key`, then on a change "
                            f"`ui.train.curve_view` ({view}; `ui.plots.MAX_POINTS` = "
                            f"{self.max_points}) and the chart's `to_json()`")

    def __call__(self) -> str | None:
        view = UI_VIEW
        key = self.train.curve_key(self.ctx, [RUN_ID], view["metric"], view["log_scale"],
                                   view["smoothing"])
        if key == self.key:
            return None  # the handler leaves the chart as it is
        self.key = key
        chart, _text = self.train.curve_view(self.ctx, [RUN_ID], view["metric"],
                                             view["log_scale"], view["smoothing"])
        return None if chart is None else chart.to_json()

    def points(self, sent: str) -> dict[str, int]:
        counts: dict[str, int] = {}
        for rows in json.loads(sent).get("datasets", {}).values():
            for row in rows:
                counts[row.get("kind", "?")] = counts.get(row.get("kind", "?"), 0) + 1
        return counts


# --- timing -----------------------------------------------------------------------------------

def _timed_polls(poll: Callable[[], str | None], polls: int,
                 before: Callable[[int], None] | None = None) -> tuple[dict[str, Any], str | None]:
    """Time ``polls`` polls (``before(i)`` runs untimed ahead of each); the summary and what the
    last poll sent."""
    seconds, sent = [], None
    for i in range(polls):
        if before:
            before(i)
        started = time.perf_counter()
        sent = poll()
        seconds.append(time.perf_counter() - started)
    return ms_summary(seconds), sent


def _shape(poller: Poller, sent: str | None) -> dict[str, Any]:
    if sent is None:
        return {"payload_points": {}, "payload_bytes": 0, "sent": False}
    return {"payload_points": poller.points(sent), "payload_bytes": len(sent.encode()),
            "sent": True}


def time_poller(poller: Poller, path: Path, settings: PollSettings, next_step: int
                ) -> tuple[dict[str, Any], int]:
    """The first read and each situation's polls of one poller; the result, the next free step."""
    started = time.perf_counter()
    sent = poller()
    result: dict[str, Any] = {"description": poller.description, "max_points": poller.max_points,
                              "first_read_ms": 1000 * (time.perf_counter() - started),
                              "first_read": _shape(poller, sent)}
    result["idle"], sent = _timed_polls(poller, settings.polls)
    result["idle_payload"] = _shape(poller, sent)
    for count in APPENDS:
        def append(i: int, count: int = count, base: int = next_step) -> None:
            append_steps(path, base + i * count, count)

        result[f"append_{count}"], sent = _timed_polls(poller, settings.polls, append)
        next_step += settings.polls * count
    result["last"] = _shape(poller, sent)
    result["worst_p95_ms"] = max(result[s]["p95_ms"] for s in SITUATIONS)
    result["under_target"] = result["worst_p95_ms"] < TARGET_MS
    return result, next_step


def _pollers(path: Path, settings: PollSettings) -> Iterator[tuple[str, Poller | str]]:
    """Each poller by name, or why it could not be built (the UI may be absent or broken)."""
    yield "metrics", MetricsPoll(path, settings.max_points)
    try:
        yield "ui", UiChartPoll(path.parent.parent)
    except Exception as err:  # noqa: BLE001 - reported in the table, never stops the benchmark
        yield "ui", f"{type(err).__name__}: {err}"


def benchmark_poll(settings: PollSettings, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Write the run, then time each poller on it; see the module docstring."""
    from mae_core.rundir import RunPaths

    result: dict[str, Any] = {"lines": settings.lines, "polls": settings.polls,
                              "target_ms": TARGET_MS, "load_average_start": load_average(),
                              "pollers": {}}
    with tempfile.TemporaryDirectory(prefix="mae-bench-poll-") as scratch:
        path = RunPaths(Path(scratch) / RUN_ID).metrics
        path.parent.mkdir(parents=True)
        started = time.perf_counter()
        write_run(path, settings.lines)
        result.update(write_s=time.perf_counter() - started, file_bytes=path.stat().st_size,
                      rows=settings.lines + settings.lines // STEPS_PER_EPOCH)
        say(f"  wrote {settings.lines:,} steps ({result['file_bytes'] / 2**20:.0f} MiB) "
            f"in {result['write_s']:.1f} s")
        next_step = settings.lines + 1
        for name, poller in _pollers(path, settings):
            if isinstance(poller, str):
                result["pollers"][name] = {"error": poller}
                say(f"  {name}: FAILED to start: {poller}")
                continue
            try:
                row, next_step = time_poller(poller, path, settings, next_step)
            except Exception as err:  # noqa: BLE001 - reported in the table
                row = {"error": f"{type(err).__name__}: {err}", "description": poller.description}
            result["pollers"][name] = row
            say(f"  {name}: " + (f"FAILED: {row['error']}" if "error" in row else
                                 f"first read {row['first_read_ms']:.0f} ms; after it p95 ≤ "
                                 f"{row['worst_p95_ms']:.1f} ms; "
                                 f"{row['last']['payload_bytes']:,} B"))
    result["load_average_end"] = load_average()
    return result
