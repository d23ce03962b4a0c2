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
    assert requeue_slurm_job()[1].startswith("no SLURM job id to requeue")
    bin_dir = _scontrol(tmp_path / "bin")
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert requeue_slurm_job() == (True, "requeued SLURM job 4242: its next start continues the run")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")  # an array task: the array's job id and index
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert requeue_slurm_job() == (True, "requeued SLURM job 77_3: its next start continues the run")
    assert (bin_dir / "calls").read_text() == "requeue 4242\nrequeue 77_3\n"
    failing = _scontrol(tmp_path / "failing", exit_code=1)
    monkeypatch.setenv("PATH", str(failing))
    assert requeue_slurm_job() == (False, "scontrol could not requeue SLURM job 77_3 (Invalid job "
                                          "id specified): resume the run by hand")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no scontrol at all
    requeued, said = requeue_slurm_job()
    assert not requeued and said.startswith("could not requeue SLURM job 77_3 (")
    assert said.endswith("): resume the run with --auto-resume")


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


@pytest.mark.parametrize("said, exit_code, waiting", [
    ("PENDING", 0, "PENDING"), ("REQUEUED", 0, "REQUEUED"), ("RUNNING", 0, "RUNNING"),
    ("COMPLETED", 0, None), ("CANCELLED", 0, None), ("", 0, None),
    ("slurm_load_jobs:_Invalid_job_id_specified", 1, None)])
def test_a_requeued_job_waits_while_squeue_holds_it(monkeypatch, tmp_path, said, exit_code, waiting):
    from helpers import squeue_saying
    from mae_core.slurm import waiting_job_state

    bin_dir = squeue_saying(tmp_path / "bin", said, exit_code)
    monkeypatch.setenv("PATH", str(bin_dir))
    assert waiting_job_state("4242") == waiting
    assert waiting_job_state("77_3") == waiting
    assert (bin_dir / "calls").read_text().splitlines() == [
        "--noheader --jobs 4242 --format %T", "--noheader --jobs 77_3 --format %T"]


def test_no_squeue_or_no_job_id_is_no_waiting_job(monkeypatch, tmp_path):
    from helpers import squeue_saying
    from mae_core.slurm import waiting_job_state

    bin_dir = squeue_saying(tmp_path / "bin", "PENDING")
    monkeypatch.setenv("PATH", str(bin_dir))
    for hostile in ("--help", "4242 --all", "", "4_2_4"):  # a hand-edited status.json
        assert waiting_job_state(hostile) is None
    assert not (bin_dir / "calls").exists()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # the app outside the cluster
    assert waiting_job_state("4242") is None
