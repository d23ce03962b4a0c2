"""Summaries of repeated timings: percentiles and a ``{p50, p95, mean}`` record in milliseconds."""

from __future__ import annotations

import statistics

import numpy as np


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def ms_summary(seconds: list[float]) -> dict[str, float | int]:
    """p50, p95 and mean of ``seconds`` in milliseconds, with how many there were."""
    return {"p50_ms": 1000 * percentile(seconds, 50), "p95_ms": 1000 * percentile(seconds, 95),
            "mean_ms": 1000 * statistics.fmean(seconds), "count": len(seconds)}
