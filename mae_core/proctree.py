"""Ending a trainer and every rank it launched: SIGTERM, a grace period, SIGKILL, whoever leads
the ranks (the trainer's own process group, a shell script's group, torchrun's agent).

A process is named by pid + start time (:mod:`mae_core.process`): a pid read from a run's folder
may be a stranger's by now, and a stranger is never signalled.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

from mae_core.process import pid_alive, proc_stat, process_start_time, valid_pid


def kill_group(pid: int, sig: signal.Signals = signal.SIGKILL) -> None:
    """Send ``sig`` to the trainer ``pid`` and every rank it launched: its process group, which the
    app's trainers lead. A trainer started by hand inside another group (from a shell script,
    under ``timeout`` or ``nohup``) gets it with its descendants one by one: the group's leader is
    someone else, and a group kill of ``pid`` reached no one. (Rank 0 of a torchrun job is ended
    through torchrun: :func:`terminate_group`.)

    A pid read from a run's folder can be anything: 0 would name this app's own group, 1 init's;
    neither is ever a trainer's."""
    if valid_pid(pid) is None or pid == os.getpgrp():
        return
    if _leads_group(pid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        return
    for target in [pid, *descendants(pid)]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(target, sig)


def _leads_group(pid: int) -> bool:
    """Whether ``pid`` leads its process group; a gone process counts (the ranks of its group may
    live on, and Linux gives no new process a pid that still names a group)."""
    try:
        return os.getpgid(pid) == pid
    except ProcessLookupError:
        return True
    except PermissionError:  # not ours to signal: a group kill fails the same way
        return True


def descendants(pid: int) -> list[int]:
    """Pids of the live processes ``pid`` launched, and theirs, read from ``/proc`` at once."""
    children: dict[str, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = proc_stat(int(entry.name))
            if stat and stat[0] not in ("Z", "X"):
                children.setdefault(stat[1], []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(str(todo.pop()), [])
        found += kids
        todo += kids
    return found


def group_members(pgid: int) -> list[int]:
    """Pids of the live (non-zombie) processes in process group ``pgid``."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = proc_stat(int(entry.name))
            if stat and stat[0] not in ("Z", "X") and stat[2] == str(pgid):
                members.append(int(entry.name))
    return members


def wait_gone(pid: int, start_time: str | None, timeout_s: float, every_s: float = 0.05) -> bool:
    """Wait up to ``timeout_s`` for the process to end; whether it has."""
    deadline = time.monotonic() + timeout_s
    while pid_alive(pid, start_time):
        if time.monotonic() > deadline:
            return False
        time.sleep(every_s)
    return True


def terminate_group(pid: int, start_time: str | None, grace_s: float = 5.0) -> bool:
    """SIGTERM the trainer and its ranks (:func:`kill_group`), then SIGKILL them once ``grace_s``
    has passed or the trainer is gone, and wait (up to ``grace_s`` again) until it is gone;
    whether it is. A trainer that is rank 0 of a torchrun job is ended through torchrun's agent,
    whose workers the other ranks are (siblings, not its children; left to the agent, a
    ``--max-restarts`` job started them again while the run read "stopped").

    The leader is checked by start time first: a recycled pid is not ours to signal. (Linux does not
    reuse a pid that still names a process group, so a group whose leader has exited is still ours.)
    """
    if process_start_time(pid) not in (None, start_time):
        return True  # that trainer is gone; the pid is another process's now
    head, head_start = torchrun_agent(pid) or (pid, start_time)
    leads = _leads_group(head)
    # Outside a group of its own, the ranks are found while the head lives: once it is gone, they
    # are no longer its children (and a rank that outlived SIGTERM still gets SIGKILL).
    ranks = [] if leads else [(r, process_start_time(r)) for r in descendants(head)]
    kill_group(head, signal.SIGTERM)
    wait_gone(pid, start_time, grace_s)
    if leads or pid_alive(head, head_start):  # a gone head's pid may be a stranger's by now
        kill_group(head, signal.SIGKILL)
    for rank, started in ranks:
        if pid_alive(rank, started):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(rank, signal.SIGKILL)
    # SIGKILL is delivered asynchronously: a caller that then records the run "stopped" must not
    # do so while its trainer still runs (seen once in CI: stopped, and the pid still alive).
    return wait_gone(pid, start_time, grace_s)


def torchrun_agent(pid: int) -> tuple[int, str | None] | None:
    """(pid, start time) of the torchrun agent whose worker ``pid`` is, or None: a worker has
    ``TORCHELASTIC_RUN_ID`` in its environment, and its parent runs torchrun."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        parent = int((proc_stat(pid) or ["", "0"])[1])
        args = Path(f"/proc/{parent}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except (OSError, ValueError):
        return None
    runs_torchrun = any(Path(arg).name == "torchrun" or "torch.distributed.run" in arg
                        or arg.endswith("torch/distributed/run.py") for arg in args[:3])
    worker = any(var.startswith(b"TORCHELASTIC_RUN_ID=") for var in environ.split(b"\0"))
    if not worker or not runs_torchrun or parent <= 1:
        return None
    return parent, process_start_time(parent)
