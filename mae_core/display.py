"""A run's numbers for people: EMA smoothing, progress, ETA and durations.

Nothing here draws anything or knows about the web UI; it turns ``status.json`` dicts and metric
values into plain numbers and text that any front end can show.

Example:
    >>> format_duration(eta_seconds({"step": 50, "total_steps": 200, "elapsed_s": 30}))
    '1 min 30 s'
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

from mae_core.checks import _is_number
from mae_core.rundir import RunState

# The metrics each step logs (``metrics.jsonl``), with a label for people.
METRICS: dict[str, str] = {
    "loss": "loss on masked patches",
    "lr": "learning rate",
    "images_per_s": "images / s",
}


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


# --- progress --------------------------------------------------------------------------------

def progress_fraction(status: Mapping[str, Any]) -> float | None:
    """Completed share of the run in [0, 1], or None when the total is unknown."""
    step, total = status.get("step") or 0, status.get("total_steps")
    if not isinstance(total, (int, float)) or total <= 0:
        return None
    return max(0.0, min(1.0, step / total))


def eta_seconds(status: Mapping[str, Any]) -> float | None:
    """Seconds left at the run's recent pace (``step_s``, over its last steps), else at its
    average pace so far; None when it cannot be told yet. (The average alone lagged: after a
    resume on a slower machine it counted the faster session's steps too.)"""
    step, total, elapsed = status.get("step") or 0, status.get("total_steps"), status.get("elapsed_s")
    if not isinstance(total, (int, float)) or total <= 0 or step <= 0:
        return None
    pace = status.get("step_s")
    if _is_number(pace) and pace > 0:
        return max(0.0, (total - step) * pace)
    if not _is_number(elapsed) or elapsed <= 0:
        return None
    return max(0.0, (total - step) * elapsed / step)


# A running run with no step for this long, and for this many of its mean steps, may be hung.
STALL_MIN_S = 300.0
STALL_STEPS = 20


def stalled_seconds(status: Mapping[str, Any], now: float | None = None) -> float | None:
    """Seconds since a running run's last step, when that is far longer than its steps take (a
    hang: a DDP rank waiting for one that died, a trainer stopped with SIGSTOP, a dead mount);
    else None. Its process lives (and its heartbeat beats), so nothing else tells."""
    step, step_at = status.get("step"), status.get("step_at")
    if (status.get("state") != RunState.RUNNING or not _is_number(step_at)
            or not isinstance(step, int) or step <= 0):
        return None
    since = (time.time() if now is None else now) - step_at
    return since if since > max(STALL_MIN_S, STALL_STEPS * (mean_step_seconds(status) or 0)) else None


def mean_step_seconds(status: Mapping[str, Any]) -> float | None:
    """The run's mean time per step so far (over its resumes), or None before its first step."""
    step, elapsed = status.get("step"), status.get("elapsed_s")
    if not isinstance(step, int) or step <= 0 or not _is_number(elapsed) or elapsed <= 0:
        return None
    return elapsed / step


def format_steps(status: Mapping[str, Any]) -> str:
    """``12 / 300`` (steps done of the total), or ``12`` when the total is unknown."""
    step, total = status.get("step") or 0, status.get("total_steps")
    return f"{step} / {total}" if total else str(step)


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


def format_loss(value: Any) -> str:
    """A loss for a person: a NaN or infinite one says the run diverged, never "–" (no loss yet)."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"{value} (diverged: lower the learning rate)"
    return format_number(value)
