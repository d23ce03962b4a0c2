"""SLURM: whether it started this job, a requeued start, and asking it to requeue the job.

A preemptible or time-limited job (``sbatch --requeue --signal=USR1@90``) gets SIGUSR1 before it
ends: :class:`mae_core.callbacks.StopOnRequest` stops every rank after the same step and saves it,
the trainer asks SLURM to requeue the job, and the job's next start (the same command, with
``SLURM_RESTART_COUNT`` > 0) continues the run from that checkpoint (:mod:`mae_core.runsetup`).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pytorch_lightning as pl


# SLURM's requeue signal (SIGUSR1, ``sbatch --signal=USR1@120``) reached this process: the one
# record of it, from the start-up to the last step.
_REQUEUE_SIGNAL = threading.Event()


def note_requeue_signal(signum: int = signal.SIGUSR1, frame: Any = None) -> None:
    """The requeue signal's handler: noted, acted on after the current step."""
    _REQUEUE_SIGNAL.set()


def catch_requeue_signal_early() -> None:
    """Under SLURM, note the requeue signal from the process's start: its default action kills
    the process, and one that came during the imports or a data preparation (minutes for a large
    folder) lost the job unsaved and unrequeued. :class:`mae_core.callbacks.StopOnRequest` stops
    the run after its first step, and installs the handler again after Lightning's."""
    if "SLURM_JOB_ID" in os.environ and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGUSR1, note_requeue_signal)


def requeue_signal_seen() -> bool:
    """Whether the requeue signal has reached this process."""
    return _REQUEUE_SIGNAL.is_set()


def requeued_start() -> bool:
    """Whether this is a SLURM job started again after a requeue (a preemption, a node failure,
    ``scontrol requeue``): the same command that first started the run."""
    count = os.environ.get("SLURM_RESTART_COUNT", "")
    return count.isdigit() and int(count) > 0


def on_slurm(trainer: pl.Trainer) -> bool:
    """Whether SLURM started this job (Lightning's cluster environment for it)."""
    from lightning_fabric.plugins.environments import SLURMEnvironment

    return isinstance(trainer._accelerator_connector.cluster_environment, SLURMEnvironment)


def slurm_environment() -> Any:
    """Lightning's SLURM environment without its auto-requeue (:class:`StopOnRequest` takes the
    requeue signal), or None outside SLURM."""
    from lightning_fabric.plugins.environments import SLURMEnvironment

    return SLURMEnvironment(auto_requeue=False) if SLURMEnvironment.detect() else None


def slurm_job() -> str | None:
    """This process's SLURM job as scontrol names it (``<array job>_<task>`` for an array task),
    or None outside SLURM. A requeued job keeps it."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job:
        return f"{array_job}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    return os.environ.get("SLURM_JOB_ID") or None


def requeue_slurm_job() -> tuple[bool, str]:
    """Ask SLURM to requeue this job (``scontrol requeue``): whether it did, and what happened,
    in one line."""
    job = slurm_job()
    if not job:
        return False, "no SLURM job id to requeue: start the run again with --auto-resume"
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True,
                                timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        return False, f"could not requeue SLURM job {job} ({err}): resume the run with --auto-resume"
    if result.returncode != 0:
        why = (result.stderr or result.stdout).strip().splitlines()[-1:] or [f"exit {result.returncode}"]
        return False, (f"scontrol could not requeue SLURM job {job} ({why[0]}): resume the run "
                       "by hand")
    return True, f"requeued SLURM job {job}: its next start continues the run"


# squeue's states (%T) of a job that is over: it never starts again by itself.
_ENDED_JOB_STATES = frozenset({"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED",
                               "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "TIMEOUT"})
_JOB_ID = re.compile(r"\d+(_\d+)?")


def waiting_job_state(job: str) -> str | None:
    """SLURM's state of ``job`` (``squeue``) while it may still start or runs: PENDING,
    REQUEUED, RUNNING, ... None when it is over, SLURM no longer knows it, or no squeue here
    can say (the app on a machine outside the cluster)."""
    if not isinstance(job, str) or not _JOB_ID.fullmatch(job):
        return None
    try:
        result = subprocess.run(["squeue", "--noheader", "--jobs", job, "--format", "%T"],
                                capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return None
    states = result.stdout.split() if result.returncode == 0 else []
    return states[0] if states and states[0] not in _ENDED_JOB_STATES else None
