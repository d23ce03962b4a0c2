"""Disk space: a run is refused where its checkpoints cannot fit, and a save that runs out of
space says so, in those words, with the step its last checkpoint still holds.

A run keeps ``last.ckpt`` (the fp32 weights and AdamW's two moments of each trainable tensor),
``model.safetensors`` (the weights) and up to ``weight_snapshots`` copies of the weights. Every
one of them is rewritten atomically (:mod:`mae_core.fileio`): the new file is written in full
beside the old one before it replaces it, so a save needs room for both copies at once. The
checkpoint is the biggest file, so the peak is two checkpoints and every copy of the weights.
"""

from __future__ import annotations

import errno
import functools
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from mae_core.config import ModelConfig, RunConfig
from mae_core.fileio import DiskFullError, existing_parent, free_bytes, free_inodes, out_of_inodes
from mae_core.rundir import RunPaths

FLOAT32_BYTES = 4
ADAM_MOMENTS = 2  # exp_avg and exp_avg_sq, fp32, one of each per trainable element
# Logs, metrics, TensorBoard events and previews: a few MB for a long run; the rest is slack.
SPARE_BYTES = 64 * 2**20
# Files (inodes) a run makes besides its previews and weight snapshots: its folder, status, process
# record, config, curve, log, checkpoint, weights, TensorBoard's events, an evaluation, an export,
# and the temp file of each save in flight; the rest is slack.
RUN_INODES = 32


def size_text(bytes_: int | None) -> str:
    """``bytes_`` for a person: ``"812.3 MB"``, ``"1.27 GB"``; ``"540 KB"`` under a megabyte
    (a folder of small photos read "0.0 MB")."""
    if bytes_ is None:
        return "size unknown"
    if bytes_ < 999_500:  # rounded to whole KB: 999,600 bytes would read "1,000 KB"
        return f"{bytes_ / 1e3:,.0f} KB" if bytes_ >= 1e3 else f"{bytes_:,} bytes"
    return f"{bytes_ / 1e9:,.2f} GB" if bytes_ >= 1e9 else f"{bytes_ / 1e6:,.1f} MB"


@dataclass(frozen=True)
class RunFiles:
    """The sizes of a run's saved files, from its model's tensors (counted on the meta device)."""

    checkpoint: int  # last.ckpt: every tensor, plus two moments per trainable element
    weights: int  # model.safetensors and each weight snapshot
    snapshots: int  # how many weight snapshots the run keeps

    @property
    def peak(self) -> int:
        """The most the run's folder holds at once: during a save, the new checkpoint beside the
        old one, and every copy of the weights plus one being written."""
        return 2 * self.checkpoint + (self.snapshots + 2) * self.weights + SPARE_BYTES


def run_files(cfg: RunConfig) -> RunFiles:
    total, trainable = tensor_elements(cfg.model)
    return RunFiles(checkpoint=FLOAT32_BYTES * (total + ADAM_MOMENTS * trainable),
                    weights=FLOAT32_BYTES * total, snapshots=cfg.train.weight_snapshots)


def run_inodes(cfg: RunConfig) -> int:
    """How many files (inodes) a run of ``cfg`` makes: every preview is kept, and each weight
    snapshot is a file of its own (a link to the weights of its step, which a later save replaces).
    A run by epochs has no step count to reckon its previews from: they count nothing."""
    train = cfg.train
    previews = (train.max_steps // train.preview_every_n_steps + 1
                if train.num_previews and train.max_steps > 0 else 0)
    return RUN_INODES + train.weight_snapshots + previews


@functools.lru_cache(maxsize=64)  # a queued run waiting for space asks again every 2 s
def tensor_elements(cfg: ModelConfig) -> tuple[int, int]:
    """(every element of the saved state, the trainable elements) of ``cfg``'s model, built on the
    meta device: no memory, no initialisation, any size."""
    import torch

    from mae_core.model import MaskedAutoencoder

    with torch.device("meta"):
        model = MaskedAutoencoder(cfg)
    total = sum(t.numel() for t in model.state_dict().values())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def folder_bytes(folder: str | Path) -> int:
    """What the files under ``folder`` take on disk: each file once, however many hard links name
    it (a weight snapshot is a link to ``model.safetensors`` of its step)."""
    return files_bytes(Path(folder).rglob("*"))


def files_bytes(paths: Iterable[Path]) -> int:
    """What ``paths`` take on disk (allocated blocks), each file once; folders and missing files
    count nothing."""
    seen, total = set(), 0
    for path in paths:
        try:
            info = path.stat(follow_symlinks=False)
        except OSError:
            continue  # removed meanwhile (a save's temp file renamed away)
        if stat.S_ISREG(info.st_mode) and (info.st_dev, info.st_ino) not in seen:
            seen.add((info.st_dev, info.st_ino))
            total += info.st_blocks * 512
    return total


def _saved_bytes(run_root: Path) -> int:
    """What a resumed run's folder already holds of its peak: the files its saves replace (an
    exported encoder or an evaluation stays beside them, and counts nothing here)."""
    paths = RunPaths(run_root)
    kept = list(paths.snapshots.glob("*.safetensors")) if paths.snapshots.is_dir() else []
    return files_bytes([paths.last_ckpt, paths.weights, *kept])


def still_to_write(cfg: RunConfig, run_root: Path) -> int:
    """What a live run of ``cfg`` in ``run_root`` may still add to its disk before its peak."""
    return max(0, run_files(cfg).peak - _saved_bytes(run_root))


def same_disk(first: str | Path, second: str | Path) -> bool:
    try:
        return existing_parent(first).stat().st_dev == existing_parent(second).stat().st_dev
    except OSError:
        return True  # cannot tell: assume they share it, the safer answer for a space check


def check_room(cfg: RunConfig, folder: str | Path, resuming: bool = False,
               held: dict[str, int] | None = None) -> None:
    """Raise :class:`DiskFullError` unless the disk holding ``folder`` (the runs folder, or the
    run's own) has room for the run's files at their peak; a resumed run's files in ``folder``
    count toward it. ``held``: what each live run beside it (by id) may still write there, which
    is not this run's to take (two runs on disjoint GPUs each saw the whole free space)."""
    folder = Path(folder)
    free = free_bytes(folder)
    if free is None:
        return  # a file system that cannot say: the save itself will tell
    held = {run_id: size for run_id, size in (held or {}).items() if size > 0}
    files = run_files(cfg)
    needed = files.peak - (_saved_bytes(folder) if resuming else 0)
    missing = needed + sum(held.values()) - free
    if missing > 0:
        raise DiskFullError(
            errno.ENOSPC,
            f"not enough disk space: {disk_label(folder)} has {size_text(free)} free"
            f"{_held_text(held)}, and this run needs about {size_text(needed)} (each save writes a "
            f"{size_text(files.checkpoint)} checkpoint beside the last one, and the run keeps "
            f"{_copies(files.snapshots + 1)} of its {size_text(files.weights)} weights). Free "
            f"{size_text(missing)}: delete old "
            "runs in the Runs tab, lower weight_snapshots, or use a smaller model")
    # Every file takes an inode as well: a disk out of them fails the run's first new file with
    # "No space left on device" however many bytes are free.
    inodes, wanted = free_inodes(folder), run_inodes(cfg)
    if inodes is not None and inodes < wanted:
        raise DiskFullError(
            errno.ENOSPC,
            f"not enough free inodes (files) on {disk_label(folder)}: {inodes:,} more files fit "
            f"there, and this run makes about {wanted:,} (its saves, logs and previews), whatever "
            f"the {size_text(free)} free. Delete files there (old runs in the Runs tab), raise "
            "preview_every_n_steps (fewer previews), or use a runs folder on another disk")


def _held_text(held: dict[str, int]) -> str:
    if not held:
        return ""
    runs = ", ".join(sorted(held))
    return (f" ({size_text(sum(held.values()))} of it to be written yet by the live "
            f"run{'s' if len(held) > 1 else ''} {runs})")


def _copies(count: int) -> str:
    return "one copy" if count == 1 else f"{count} copies"


def disk_label(path: str | Path) -> str:
    return f"the disk holding {existing_parent(path)}"


def full_disk_message(path: str | Path | None, then: str = "resume") -> str:
    """The disk holding ``path`` (None: not known) filled up, in bytes or in inodes: what a person
    reads, with what is free there now."""
    free = free_bytes(path) if path is not None else None
    if path is not None and out_of_inodes(path):
        though = f", though {size_text(free)} is free" if free is not None else ""
        return (f"no free inodes (files) left on {disk_label(path)}: no new file fits there{though}. "
                f"Delete some files there (old runs in the Runs tab), then {then}")
    where = f" ({disk_label(path)}, {size_text(free)} free now)" if free is not None else ""
    return (f"the disk is full{where}. Free some space (delete old runs in the Runs tab), then "
            f"{then}")


def full_disk_failure(run_root: str | Path, checkpoint: Path, step: int | None) -> str:
    """Why a run failed on a full disk, and that its last checkpoint (at ``step``) is whole."""
    kept = (f"; nothing saved is lost: {checkpoint.name} (step {step}) is intact"
            if step is not None else "")
    return full_disk_message(run_root) + kept
