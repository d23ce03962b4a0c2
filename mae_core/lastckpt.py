"""A run's ``last.ckpt`` read for its step: verified (every member's CRC), loaded the way a resume
loads it (``weights_only``, memory-mapped), and refused with the reason where it cannot be
resumed. Apart from :mod:`mae_core.rundir`, which names the file."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

from mae_core.checks import shown
from mae_core.fileio import open_regular
from mae_core.rundir import RunError, RunPaths

# What Lightning's resume reads from a checkpoint (a run's trainer saves every one of them).
LIGHTNING_CHECKPOINT_KEYS = frozenset({"state_dict", "global_step", "epoch", "loops",
                                       "optimizer_states", "lr_schedulers",
                                       "pytorch-lightning_version"})


def saved_step(paths: RunPaths) -> int | None:
    """The step of the run's ``last.ckpt``; None if it has none or it cannot be read."""
    try:
        return checkpoint_step(paths.last_ckpt)
    except RunError:
        return None


def checkpoint_step(path: Path, verify: bool = True) -> int:
    """The optimizer step ``last.ckpt`` was saved at; RunError if it is missing, damaged, or not a
    Lightning checkpoint (a resume from it would train on corrupt weights, or fail once launched).

    Every member's CRC is checked first (``torch.load`` memory-maps the tensors and never reads
    them; ``verify=False`` leaves that to a caller that just did it, since it reads the whole file),
    then it is loaded the way resume will (``weights_only``), memory-mapped.
    """
    if not path.is_file():
        raise RunError(f"{path.parent.name} has no checkpoint to resume from")
    try:
        if verify:
            _verify_archive(path)
        checkpoint = _load_checkpoint(path)
    except Exception as err:  # noqa: BLE001 - any failure to read it means it cannot be resumed
        detail = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise RunError(f"the checkpoint {path} is corrupt ({detail}); it cannot be resumed") from None
    keys = set(checkpoint) if isinstance(checkpoint, dict) else set()
    missing = sorted(LIGHTNING_CHECKPOINT_KEYS - keys)
    if missing:
        raise RunError(f"{path} is not a checkpoint of this run: it lacks {', '.join(missing)} "
                       "(a Lightning checkpoint has them); it cannot be resumed. Start a new run, "
                       "or put back the last.ckpt this run wrote")
    step = checkpoint["global_step"]
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise RunError(f"the checkpoint {path} holds no valid step ({shown(step)}); it cannot be resumed")
    problem = resume_state_problem(checkpoint, step)
    if problem:
        raise RunError(f"the checkpoint {path} is damaged: {problem}; it cannot be resumed. Start "
                       "a new run, or put back the last.ckpt this run wrote")
    return step


def resume_state_problem(checkpoint: dict, step: int) -> str | None:
    """What is wrong, in words, with the optimizer and schedule state a resume takes from
    ``checkpoint`` (None where it is whole). Lightning loads them pair by pair with what the run
    builds (one AdamW, one LambdaLR): an emptied list resumed silently with AdamW's moments or the
    warm-up started over, and a malformed entry failed in the launched trainer with a KeyError."""
    optimizers, schedulers = checkpoint["optimizer_states"], checkpoint["lr_schedulers"]
    if not isinstance(optimizers, list) or len(optimizers) != 1:
        return f"it holds {_count(optimizers)} optimizer states where the run has one optimizer"
    optimizer = optimizers[0]
    groups = optimizer.get("param_groups") if isinstance(optimizer, dict) else None
    moments = optimizer.get("state") if isinstance(optimizer, dict) else None
    if (not isinstance(groups, list) or not groups or not isinstance(moments, dict)
            or not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups)):
        return "its optimizer state lacks AdamW's state or parameter groups"
    if step > 0 and not moments:
        return f"its optimizer state is empty at step {step} (AdamW's moments would start over)"
    if not isinstance(schedulers, list) or len(schedulers) != 1 or not isinstance(schedulers[0], dict):
        return (f"it holds {_count(schedulers)} learning-rate schedule states where the run has "
                "one (its warm-up would start over)")
    return None


def _count(value: Any) -> str:
    return str(len(value)) if isinstance(value, list) else "no list of"


def _verify_archive(path: Path) -> None:
    """Raise ValueError naming the first member of the checkpoint's zip archive whose bytes do not
    match their CRC (bytes overwritten inside it); a damaged archive raises on opening."""
    with open_regular(path) as handle, zipfile.ZipFile(handle) as archive:
        damaged = archive.testzip()
    if damaged is not None:
        raise ValueError(f"{damaged} fails its CRC check: its bytes were overwritten or damaged")


def _load_checkpoint(path: Path) -> Any:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
