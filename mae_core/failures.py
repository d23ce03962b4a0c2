"""Saying why a run ended badly, in the run's ``status.json``: a failure (with its traceback's
end), a full disk, a taken port, a SIGTERM, each in words a person acts on.

Written by rank 0 from Lightning's ``on_exception`` (:class:`RecordFailure`), before the teardown
after which Lightning may kill it, and again by :func:`mae_core.train.main` where that failed.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import traceback
from typing import Any

import pytorch_lightning as pl

from mae_core.diskspace import full_disk_failure
from mae_core.fileio import is_disk_full
from mae_core.lastckpt import checkpoint_step, saved_step
from mae_core.rundir import RunError, RunPaths, RunState


class RecordFailure(pl.Callback):
    """Rank 0 writes why fit failed into status.json from Lightning's ``on_exception``: before
    the trainer's teardown closes the process group. After it, rank 1 dies of the closed
    connection and Lightning's child watcher SIGKILLs rank 0, sometimes before it had written
    anything (a full disk then read "the trainer process is gone"). What cannot be written here
    (a full disk) is tried again by :func:`mae_core.train.main`.

    A SIGTERM is said in words at the same moment: one that came before ``stopper``
    (:class:`mae_core.callbacks.StopOnRequest`) took over the signal (Lightning's
    ``SIGTERMException``), or one that a failure followed (a rank that died of it first).
    """

    def __init__(self, paths: RunPaths, stopper: Any = None) -> None:
        self.paths = paths
        self.stopper = stopper

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        from pytorch_lightning.utilities.exceptions import SIGTERMException

        if getattr(self.stopper, "signalled", False) or isinstance(exception, SIGTERMException):
            if trainer.is_global_zero:
                record_termination(self.paths)
            return
        # Lightning calls the strategy's on_exception only after the callbacks', and that is where
        # DDP explains its bare "Expected to have finished reduction" (parameters not used in the
        # loss). Asked first here, so the record carries it; asking twice changes nothing more.
        trainer.strategy.on_exception(exception)
        if trainer.is_global_zero:
            with contextlib.suppress(OSError):  # never in place of the exception being handled
                record_failure(self.paths, exception, lost_rank(trainer, exception))


def record_failure(paths: RunPaths, err: BaseException, cause: str | None = None) -> None:
    """The run failed with ``err`` (being handled): status.json says so, with the traceback's end;
    ``cause``, where known, is what failed first (another rank: :func:`lost_rank`)."""
    paths.write_status(state=RunState.FAILED, error=cause or failure_text(paths, err),
                       log_tail=traceback.format_exc()[-4000:])


# How gloo and NCCL tell rank 0 that a rank it exchanges gradients with is gone.
PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe",
             "NCCL communicator was aborted")


def lost_rank(trainer: pl.Trainer, err: BaseException, wait_s: float = 1.0) -> str | None:
    """Which rank this process lost, when ``err`` is the connection to another rank breaking: a
    rank killed mid-training left rank 0 only gloo's "Connection reset by peer ... GLHF!" to
    record. The ranks Lightning's launcher started here are its children: the first one that
    ended badly (within ``wait_s``, as it may end just after the break) is named."""
    text = str(err)
    if not any(marker in text for marker in PEER_LOST):
        return None
    from mae_core.runwatch import ended_how

    started = getattr(getattr(trainer.strategy, "launcher", None), "procs", None) or []
    deadline = time.monotonic() + wait_s
    while True:
        for local_rank, child in enumerate(started, start=1):
            code = child.poll()
            if code not in (None, 0):
                rank = trainer.global_rank + local_rank  # this process is its node's first
                return (f"rank {rank} (of {trainer.world_size}) {ended_how(code)}; rank 0 "
                        f"then lost its connection to it ({text.strip().splitlines()[0][:160]})")
        if time.monotonic() >= deadline:
            return (f"another rank of the run ended: rank 0 lost its connection to it "
                    f"({text.strip().splitlines()[0][:160]}); the log says which and why")
        time.sleep(0.05)


def failure_text(paths: RunPaths, err: BaseException) -> str:
    """Why the run failed, for a person: a full disk is said in those words (torch.save's own
    error on one is "enforce fail at inline_container.cc ... unexpected pos"), with what it kept."""
    if is_disk_full(err):
        return full_disk_failure(paths.root, paths.last_ckpt, saved_step(paths))
    return (port_taken(err)
            or "".join(traceback.format_exception_only(type(err), err)).strip()
            or type(err).__name__)


def port_taken(err: BaseException) -> str | None:
    """Rank 0 could not listen on ``MASTER_PORT`` (left in the shell, or taken by another job),
    in one line instead of torch's 45-line DistNetworkError."""
    text = str(err)
    if "EADDRINUSE" not in text and "address already in use" not in text.lower():
        return None
    port = os.environ.get("MASTER_PORT", "?")
    return (f"MASTER_PORT={port} is in use by another process: unset MASTER_PORT (a free port "
            "is then chosen) or give a free one")


TERMINATED = "terminated by SIGTERM (the machine or container was shut down, or someone ran kill)"


def termination_text(paths: RunPaths) -> str:
    """Why a run ended on SIGTERM, and where Resume takes it up (Lightning's own record of it is
    the bare name ``pytorch_lightning.utilities.exceptions.SIGTERMException``)."""
    try:
        # Unverified: only its step is read (memory-mapped); a shutdown's grace period (docker
        # stop: 10 s) is no time to read a large checkpoint through, and a resume verifies it.
        step = checkpoint_step(paths.last_ckpt, verify=False)
    except RunError:
        return f"{TERMINATED}; it had saved no checkpoint: start it again"
    return f"{TERMINATED}; Resume continues from step {step}"


def record_termination(paths: RunPaths) -> None:
    text = termination_text(paths)
    with contextlib.suppress(OSError):  # never in place of the exit under way
        paths.write_status(state=RunState.FAILED, error=text, log_tail=paths.log_tail())
    # Said where the trainer's output goes too (a terminal, the app's train.log): a run started
    # by hand ended with nothing said of why. After the status, which the app reads: a stalled
    # or closed stderr must not keep it from being written.
    with contextlib.suppress(OSError, ValueError):
        print(f"run {paths.root.name} {text}", file=sys.stderr, flush=True)
