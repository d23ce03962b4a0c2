"""SLURM: whether it started this job, a requeued start, and asking it to requeue the job.

A preemptible or time-limited job (``sbatch --requeue --signal=USR1@90``) gets SIGUSR1 before it
ends: :class:`mae_core.callbacks.StopOnRequest` stops every rank after the same step and saves it,
the trainer asks SLURM to requeue the job, and the job's next start (the same command, with
``SLURM_RESTART_COUNT`` > 0) continues the run from that checkpoint (:mod:`mae_core.trainargs`).
"""

from __future__ import annotations

import os
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


def requeue_slurm_job() -> str:
    """Ask SLURM to requeue this job (``scontrol requeue``); what happened, in one line."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = (f"{array_job}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}" if array_job
           else os.environ.get("SLURM_JOB_ID", ""))
    if not job:
        return "no SLURM job id to requeue: start the run again with --auto-resume"
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True,
                                timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"could not requeue SLURM job {job} ({err}): resume the run with --auto-resume"
    if result.returncode != 0:
        why = (result.stderr or result.stdout).strip().splitlines()[-1:] or [f"exit {result.returncode}"]
        return f"scontrol could not requeue SLURM job {job} ({why[0]}): resume the run by hand"
    return f"requeued SLURM job {job}: its next start continues the run"
