"""SLURM (mae_core/slurm.py): a requeued start is told by SLURM_RESTART_COUNT, and asking SLURM
to requeue the job says in one line what happened, a missing or failing ``scontrol`` included
(tests/test_train.py runs the requeue signal end to end)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mae_core.slurm import requeue_slurm_job, requeued_start


@pytest.mark.parametrize("count, requeued", [(None, False), ("0", False), ("1", True),
                                             ("12", True), ("-1", False), ("x", False)])
def test_a_requeued_start_is_one_with_a_restart_count_above_zero(monkeypatch, count, requeued):
    if count is None:
        monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    else:
        monkeypatch.setenv("SLURM_RESTART_COUNT", count)
    assert requeued_start() is requeued


def _scontrol(folder: Path, exit_code: int = 0) -> Path:
    """A stand-in for SLURM's scontrol that records what it was asked (and fails if told to)."""
    folder.mkdir(exist_ok=True)
    script = folder / "scontrol"
    script.write_text(f"#!/bin/sh\necho \"$@\" >> {folder / 'calls'}\n"
                      + ("echo 'Invalid job id specified' >&2\n" if exit_code else "")
                      + f"exit {exit_code}\n")
    script.chmod(0o755)
    return folder


def test_requeue_names_the_job_and_says_what_happened(monkeypatch, tmp_path):
    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name, raising=False)
    assert requeue_slurm_job().startswith("no SLURM job id to requeue")
    bin_dir = _scontrol(tmp_path / "bin")
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert requeue_slurm_job() == "requeued SLURM job 4242: its next start continues the run"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")  # an array task: the array's job id and index
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert requeue_slurm_job() == "requeued SLURM job 77_3: its next start continues the run"
    assert (bin_dir / "calls").read_text() == "requeue 4242\nrequeue 77_3\n"
    failing = _scontrol(tmp_path / "failing", exit_code=1)
    monkeypatch.setenv("PATH", str(failing))
    assert requeue_slurm_job() == ("scontrol could not requeue SLURM job 77_3 (Invalid job id "
                                   "specified): resume the run by hand")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no scontrol at all
    assert requeue_slurm_job().startswith("could not requeue SLURM job 77_3 (")
    assert requeue_slurm_job().endswith("): resume the run with --auto-resume")


def test_the_requeue_signal_during_start_up_is_noted_not_deadly(monkeypatch):
    """SIGUSR1's default action kills the process: one that came during the imports or a data
    preparation lost the job, unsaved and unrequeued (the training loop takes the signal only
    from its first step)."""
    import os
    import signal

    from mae_core import slurm

    before = signal.getsignal(signal.SIGUSR1)
    monkeypatch.setattr(slurm, "_REQUEUE_SIGNAL", slurm.threading.Event())
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    try:
        slurm.catch_requeue_signal_early()
        assert not slurm.requeue_signal_seen()
        os.kill(os.getpid(), signal.SIGUSR1)  # would end this test process without the handler
        assert slurm.requeue_signal_seen()
    finally:
        signal.signal(signal.SIGUSR1, before)
