"""mae_core.display: EMA smoothing, progress, ETA and durations in words."""

from __future__ import annotations

import math

import pytest

from mae_core.display import (ema, eta_seconds, format_duration, format_loss, format_number,
                              progress_fraction)


def test_ema_weight_zero_returns_the_values():
    assert ema([3.0, 1.0, 2.0], 0.0) == [3.0, 1.0, 2.0]


def test_ema_is_bias_corrected():
    # Without the correction the first point would be 0.1 × 10 = 1: pulled towards zero.
    assert ema([10.0, 10.0, 10.0], 0.9) == pytest.approx([10.0, 10.0, 10.0])
    smoothed = ema([10.0, 0.0], 0.5)
    assert smoothed[0] == pytest.approx(10.0)
    assert smoothed[1] == pytest.approx((0.5 * 0.5 * 10.0) / (1 - 0.25))


def test_ema_smooths_a_noisy_series():
    noisy = [1.0 if i % 2 else 3.0 for i in range(200)]
    smoothed = ema(noisy, 0.95)
    assert max(smoothed[100:]) - min(smoothed[100:]) < 0.2
    assert sum(smoothed[100:]) / 100 == pytest.approx(2.0, abs=0.1)


@pytest.mark.parametrize("weight", [1.0, -0.1, 1.5])
def test_ema_refuses_a_weight_outside_zero_to_one(weight):
    with pytest.raises(ValueError, match="smoothing"):
        ema([1.0], weight)


def test_eta_at_the_average_pace_so_far():
    assert eta_seconds({"step": 50, "total_steps": 200, "elapsed_s": 30}) == pytest.approx(90.0)
    assert eta_seconds({"step": 200, "total_steps": 200, "elapsed_s": 30}) == 0.0
    assert eta_seconds({"step": 250, "total_steps": 200, "elapsed_s": 30}) == 0.0  # never negative
    for unknown in ({"step": 0, "total_steps": 200, "elapsed_s": 5},
                    {"step": 10, "total_steps": None, "elapsed_s": 5},
                    {"step": 10, "total_steps": -1, "elapsed_s": 5},
                    {"step": 10, "total_steps": 200}, {}):
        assert eta_seconds(unknown) is None, unknown


def test_eta_at_the_recent_pace_when_the_trainer_reports_it():
    """After a resume on a slower machine the whole run's average counted the faster session's
    steps too: at step 97 of 140 it said 1 min 02 s while the run needed 2 min."""
    status = {"step": 97, "total_steps": 140, "elapsed_s": 60.0, "step_s": 2.8}
    assert eta_seconds(status) == pytest.approx(43 * 2.8)
    for unknown in (None, 0, "fast", math.nan):  # older trainers, hand-edited files
        assert eta_seconds({**status, "step_s": unknown}) == pytest.approx(43 * 60 / 97)


def test_progress_fraction_is_clamped_and_unknown_without_a_total():
    assert progress_fraction({"step": 50, "total_steps": 200}) == 0.25
    assert progress_fraction({"step": 300, "total_steps": 200}) == 1.0
    assert progress_fraction({"step": None, "total_steps": 200}) == 0.0
    assert progress_fraction({"step": 5, "total_steps": -1}) is None
    assert progress_fraction({"step": 5}) is None


def test_format_duration():
    assert format_duration(12) == "12 s"
    assert format_duration(12.6) == "13 s"
    assert format_duration(90) == "1 min 30 s"
    assert format_duration(185) == "3 min 05 s"
    assert format_duration(3725) == "1 h 02 min"
    assert format_duration(0) == "0 s"
    assert format_duration(None) == "–"
    assert format_duration(math.nan) == "–"
    assert format_duration(math.inf) == "–"


def test_format_number():
    assert format_number(0.123456) == "0.1235"
    assert format_number(1234.5, 3) == "1.23e+03"
    assert format_number(None) == "–"
    assert format_number(math.nan) == "–"
    assert format_number("0.5") == "–"


def test_a_diverged_loss_is_said_not_shown_as_no_loss_yet():
    assert format_loss(math.nan).startswith("nan (diverged")
    assert format_loss(math.inf).startswith("inf (diverged")
    assert format_loss(0.25) == "0.25" and format_loss(None) == "–"


def test_a_running_run_without_a_step_for_far_longer_than_its_steps_take_is_stalled():
    """A DDP rank waiting for one that died, a trainer under SIGSTOP: the process lives and its
    heartbeat (or, here, its pid) keeps the run "running" for ever, with nothing to say so."""
    from mae_core.display import STALL_MIN_S, STALL_STEPS, mean_step_seconds, stalled_seconds

    now = 1_000_000.0
    fast = {"state": "running", "step": 100, "elapsed_s": 50.0}  # 0.5 s a step
    assert mean_step_seconds(fast) == 0.5
    assert stalled_seconds({**fast, "step_at": now - STALL_MIN_S + 1}, now) is None
    assert stalled_seconds({**fast, "step_at": now - STALL_MIN_S - 1}, now) == STALL_MIN_S + 1
    slow = {"state": "running", "step": 10, "elapsed_s": 600.0}  # a minute a step: 20 of them
    assert stalled_seconds({**slow, "step_at": now - 10 * 60}, now) is None
    assert stalled_seconds({**slow, "step_at": now - STALL_STEPS * 60 - 1}, now) is not None
    old = {**fast, "step_at": now - 3600}
    for quiet in ({**old, "state": "stopped"}, {**old, "state": "stopping"},  # not running
                  {**old, "step": 0}, {**fast, "step_at": None},  # before its first step
                  {**old, "step_at": "yesterday"}, {**old, "step_at": math.nan}):  # hand-edited
        assert stalled_seconds(quiet, now) is None, quiet
    assert mean_step_seconds({"step": 0, "elapsed_s": 5}) is None
    assert mean_step_seconds({"step": 3, "elapsed_s": None}) is None
