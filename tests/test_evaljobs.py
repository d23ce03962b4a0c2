"""mae_core.evaljobs: evaluations as background jobs, one at a time (evaluate_run stood in)."""

from __future__ import annotations

import threading

import pytest

from mae_core.evaljobs import EvaluationBusy, EvaluationJob, Evaluations
from mae_core.rundir import RunError


@pytest.fixture
def slow_evaluation(monkeypatch):
    """evaluate_run stood in by one that reports progress and waits until ``release`` is set;
    it fails for a data folder named "broken"."""
    release = threading.Event()
    calls = []

    def evaluate_run(run_dir, data=None, linear_probe=False, progress=None):
        calls.append((run_dir, data, linear_probe))
        progress(0.4, "embedding the bank")
        if not release.wait(30):
            raise TimeoutError("the test never released the evaluation")
        if data == "broken":
            raise ValueError("no class subfolders")
        return {"seconds": 1.5, "delta": {"knn_top1": 12.3}}

    monkeypatch.setattr("mae_core.evaluate.evaluate_run", evaluate_run)
    release.calls = calls
    yield release
    release.set()


def test_a_job_reports_progress_then_its_result(tmp_path, slow_evaluation):
    evaluations = Evaluations()
    job = evaluations.start("run-a", tmp_path, None, True)
    assert evaluations.current is job
    while job.fraction == 0.0:
        threading.Event().wait(0.01)
    assert (job.fraction, job.text, job.done.is_set()) == (0.4, "embedding the bank", False)
    slow_evaluation.set()
    assert job.done.wait(10)
    assert job.result == {"seconds": 1.5, "delta": {"knn_top1": 12.3}} and job.error is None
    assert slow_evaluation.calls == [(tmp_path, None, True)]


def test_a_failed_job_keeps_its_error(tmp_path, slow_evaluation):
    slow_evaluation.set()
    job = Evaluations().start("run-a", tmp_path, "broken", False)
    assert job.done.wait(10)
    assert isinstance(job.error, ValueError) and job.result is None


def test_one_evaluation_at_a_time(tmp_path, slow_evaluation):
    evaluations = Evaluations()
    first = evaluations.start("run-a", tmp_path, None, False)
    with pytest.raises(EvaluationBusy, match=r"`run-a` is being evaluated .*wait until it ends"):
        evaluations.start("run-b", tmp_path, None, False)
    assert first.refused == "run-b" and evaluations.current is first
    with pytest.raises(EvaluationBusy):  # the same run again: refused, nobody else waits
        evaluations.start("run-a", tmp_path, None, False)
    assert first.refused == "run-b"
    slow_evaluation.set()
    assert first.done.wait(10)
    second = evaluations.start("run-b", tmp_path, None, False)  # once it ended: the next one
    assert second is not first and evaluations.current is second
    assert second.done.wait(10) and second.result is not None


def test_a_busy_refusal_is_a_run_error_and_jobs_are_distinct():
    assert issubclass(EvaluationBusy, RunError)  # the app shows it as words, never logs it
    assert EvaluationJob("a") != EvaluationJob("a")  # a job is itself, so it can key a cache
    assert len({EvaluationJob("a"), EvaluationJob("a")}) == 2
