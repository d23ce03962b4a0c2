"""What a run's ``status.json`` may hold: its states (:class:`RunState`), its fields
(:class:`RunStatus`), and the check that a status read from disk is one (a hand-edited or damaged
file is read as a failed run, never as a crash of its reader). :class:`mae_core.rundir.RunPaths`
reads and writes the file through these.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from mae_core.checks import shown


class RunState(StrEnum):
    """A run's state in status.json. A str: it is written to JSON and compared as its text."""

    QUEUED = "queued"  # made, waiting in the queue for the devices
    STARTING = "starting"  # a trainer is being launched (or resumed)
    RUNNING = "running"
    STOPPING = "stopping"  # asked to stop: it does after its current step
    STOPPED = "stopped"  # by a Stop, a SIGINT or a SLURM requeue, with a checkpoint to resume
    FINISHED = "finished"  # reached its max steps (or epochs)
    FAILED = "failed"  # ended otherwise; ``error`` says why


STATES = tuple(RunState)
LIVE_STATES = frozenset({RunState.STARTING, RunState.RUNNING, RunState.STOPPING})
# What read_status says where status.json cannot say the run's state (:func:`state_unknown`).
UNREADABLE_STATUS = "status.json is missing or unreadable"
DAMAGED_STATUS = "status.json is damaged"


@dataclass
class RunStatus:
    """Every field ``status.json`` may hold; both the run manager and the trainer write through it.

    The run manager adds three fields when it reports a run, never stored: ``stop_requested`` (a
    ``STOP`` file is present), ``resumable`` (stopped or failed, with a checkpoint) and
    ``extendable`` (finished, with a checkpoint: a resume with a higher max steps goes on).
    """

    run_id: str = ""
    state: str = RunState.STARTING
    created: float | None = None  # time.time() when the run directory was made
    updated: float | None = None  # time.time() of the last write; a remote run's sign of life
    preset: str | None = None
    policy: str | None = None
    pid: int | None = None  # the trainer's rank-0 process (process.json has its start time)
    world_size: int | None = None
    step: int = 0  # optimizer steps completed
    total_steps: int | None = None
    epoch: int | None = None
    loss: float | None = None  # the last step's loss (raw, one rank)
    images_per_s: float | None = None  # the median of the last steps' (callbacks.RECENT_ROWS)
    mfu: float | None = None  # model FLOPs utilisation of the last step: achieved / peak FLOP/s
    flops_per_image: float | None = None  # training FLOPs (forward + backward) per image
    peak_flops: float | None = None  # peak FLOP/s of one device (a GPU, or one CPU process)
    elapsed_s: float | None = None  # training time, summed over resumes
    step_s: float | None = None  # wall seconds per step over the last steps: the ETA's pace
    # time.time() of the last progress save after steps (the heartbeat moves ``updated`` only):
    # a live run with no step for long may be hung (mae_core.display.stalled_seconds).
    step_at: float | None = None
    data_files: int | None = None  # image files the data scan found before the launch
    images: int | None = None  # images the trainer could read
    skipped_files: int | None = None  # image files it could not
    resumed_from_step: int | None = None  # the checkpoint's step the last resume started from
    error: str | None = None  # why it failed or was stopped by force
    # The SLURM job that requeued itself to continue this run at its next start (stopped by its
    # requeue signal); the app refuses to resume the run while that job waits.
    requeued_job: str | None = None
    # The app process that set it "starting" (a process record): gone before a trainer was
    # recorded, the launch never comes, and the run is dead at once whatever the clock says.
    launcher: dict[str, Any] | None = None
    log_tail: str | None = None  # the end of train.log when it failed

    @classmethod
    def fields(cls) -> frozenset[str]:
        return frozenset(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunStatus:
        """The record of a status dict; fields this version does not define are dropped."""
        known = cls.fields()
        return cls(**{k: v for k, v in data.items() if k in known})


STATUS_FIELDS = RunStatus.fields()


_STATUS_TYPES = {f.name: str(f.type) for f in dataclasses.fields(RunStatus)}
# The largest magnitude a number in status.json may have: far beyond any step, count or second a
# run reaches, yet small enough for every reader's float arithmetic (a 400-digit integer is not).
_MAX_MAGNITUDE = 1e15
# A device's peak FLOP/s and the FLOPs per image of a large model can pass 1e15 honestly.
_MAX_MAGNITUDES = {"peak_flops": 1e21, "flops_per_image": 1e21}


def well_typed(name: str, value: Any) -> bool:
    """Whether ``value`` has the type :class:`RunStatus` declares for ``name`` (bool is no number)
    and, if a number, a finite one in a sane range."""
    kind = _STATUS_TYPES[name]
    if value is None:
        return kind.endswith("| None")
    if isinstance(value, bool):
        return False
    if kind.startswith("str"):
        return isinstance(value, str)
    if kind.startswith("dict"):
        return isinstance(value, dict)
    if kind.startswith("int") or isinstance(value, int):
        return isinstance(value, int) and _in_range(name, value)
    if name == "loss" and isinstance(value, float):
        return True  # NaN or huge too: a diverged run's loss is news, not damage
    return isinstance(value, float) and _in_range(name, value)


def _in_range(name: str, value: float) -> bool:
    """Within the field's bound: False for NaN and infinities; exact for any integer (Python
    compares an int with a float without converting it, so a 400-digit one cannot overflow)."""
    limit = _MAX_MAGNITUDES.get(name, _MAX_MAGNITUDE)
    return -limit <= value <= limit


def check_status_fields(fields: dict[str, Any]) -> None:
    """Refuse a field :class:`RunStatus` does not define, or a state not in STATES (a bug)."""
    unknown = sorted(set(fields) - STATUS_FIELDS)
    if unknown:
        raise ValueError(f"status.json has no field {', '.join(unknown)} "
                         f"(RunStatus defines {', '.join(sorted(STATUS_FIELDS))})")
    if "state" in fields and fields["state"] not in STATES:
        raise ValueError(f"state must be one of {', '.join(STATES)}, not {shown(fields['state'])}")


def status_from_json(raw: Any, run_id: str) -> dict[str, Any]:
    """``raw`` (status.json as read, None if unreadable) as a plain dict of the :class:`RunStatus`
    fields it holds; a value of the wrong type is dropped, and a missing or unknown state reads as
    failed, saying why, so one run cannot break a listing."""
    if not isinstance(raw, dict):
        return {"run_id": run_id, "state": RunState.FAILED, "error": UNREADABLE_STATUS}
    kept = {k: v for k, v in raw.items() if k in STATUS_FIELDS and well_typed(k, v)}
    if kept.get("state") not in STATES:
        kept.update(state=RunState.FAILED, error=f"{DAMAGED_STATUS}: its state is "
                                          f"{shown(raw.get('state'))}")
    return kept


def state_unknown(status: dict[str, Any]) -> bool:
    """Whether ``status`` (from :meth:`RunPaths.read_status`) is a stand-in for a status.json
    that is missing or damaged, not a state the run recorded."""
    return status.get("state") == RunState.FAILED and str(status.get("error")).startswith(
        (UNREADABLE_STATUS, DAMAGED_STATUS))
