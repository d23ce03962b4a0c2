"""The held-out split of a data folder and its class labels (issue 14: the validation loss and
the kNN monitor): which images are held out, their labels from class subfolders, their fixed
centre crops, and the data module over the rest. Apart from :mod:`mae_core.data`, the data
sets themselves."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from mae_core.data import DataError, MAEDataModule, find_images
from mae_core.images import ImageError, center_square
from mae_core.pixels import read_for, same_dtype

log = logging.getLogger(__name__)

# A requested held-out share is at least this many images: fewer make a validation loss noise.
MIN_HELD_OUT = 4


@dataclass(frozen=True)
class HeldOutSplit:
    """A folder's images split into a training and a held-out part.

    Deterministic in (file list, seed): every rank computes the same split from the same sorted
    file list, so no rank trains on an image another one validates on. ``labels`` (when the
    folder has class subfolders) index ``classes``, in ``train`` then ``held_out`` order.
    """

    train: tuple[str, ...]
    held_out: tuple[str, ...]
    classes: tuple[str, ...] = ()
    train_labels: tuple[int, ...] = ()
    held_out_labels: tuple[int, ...] = ()

    @property
    def labelled(self) -> bool:
        return len(self.classes) >= 2


def held_out_count(total: int, fraction: float | None, count: int | None,
                   auto_min_images: int, auto_fraction: float) -> int:
    """How many of ``total`` images to hold out: ``count``, else ``fraction`` of them (at least
    :data:`MIN_HELD_OUT`), else ``auto_fraction`` of a folder of ``auto_min_images`` or more and
    none of a smaller one. Refused with a :class:`DataError` when no training image would remain."""
    if count is not None:
        wanted, asked_by = count, "val_count"
    elif fraction is not None:
        wanted, asked_by = max(MIN_HELD_OUT, round(total * fraction)), "val_fraction"
    elif total >= auto_min_images:
        wanted, asked_by = max(MIN_HELD_OUT, round(total * auto_fraction)), "val_fraction"
    else:
        return 0
    if wanted >= total:  # named like every other refusal: by the field to change
        if count is None and wanted == MIN_HELD_OUT:  # no share is below it: not the fix
            why = f" (a share holds out at least {MIN_HELD_OUT})"
            fix = f"clear {asked_by} and set val_count below {total:,}, or add images"
        else:
            why, fix = "", f"lower {asked_by}, or add images"
        raise DataError(f"{asked_by}: holding out {wanted:,} of {total:,} images{why} leaves "
                        f"none to train on: {fix}", asked_by)
    return wanted


def class_of(root: Path, path: str | Path) -> str | None:
    """The class of an image under ``root``: its first subfolder's name (``root/<class>/.../x.jpg``),
    or None for an image directly in ``root``. The one rule of every labelled folder."""
    inside = str(root).rstrip(os.sep) + os.sep
    text = str(path)
    # A walk's paths start with the root as written: cut as text, not parsed (1.28 M of them).
    relative = text[len(inside):] if text.startswith(inside) else str(Path(text).relative_to(root))
    head, sep, _ = relative.partition(os.sep)
    return head if sep else None


def class_labels(folder: str, paths: list[str]) -> tuple[tuple[str, ...], list[int]] | None:
    """Labels from class subfolders (:func:`class_of`): (classes, label per path), or None when an
    image lies directly in ``folder`` or there are fewer than two classes."""
    if not folder:
        return None
    root = Path(folder).expanduser()
    names = [class_of(root, path) for path in paths]
    if None in names:
        return None
    classes = tuple(sorted(set(names)))
    if len(classes) < 2:
        return None
    index = {name: i for i, name in enumerate(classes)}
    return classes, [index[name] for name in names]


def split_folder(folder: str, seed: int = 0, *, count: int | None = None,
                 fraction: float | None = None, auto_min_images: int = 10**12,
                 auto_fraction: float = 0.0, paths: tuple[str, ...] = ()) -> HeldOutSplit:
    """:func:`find_images` of ``folder`` (or ``paths``, when the caller has walked it already)
    split by a permutation drawn from ``seed``; the held-out size is :func:`held_out_count`'s
    (by default: ``count``, else ``fraction``, else none)."""
    paths = list(paths) or find_images(folder)
    count = held_out_count(len(paths), fraction, count, auto_min_images, auto_fraction)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(paths), generator=generator).tolist()
    # The held-out part keeps the permutation's order (a bounded prefix is a random subset); the
    # training part keeps the folder's sorted order.
    out_idx = order[:count]
    out = set(out_idx)
    train_idx = [i for i in range(len(paths)) if i not in out]
    labels = class_labels(folder, paths)
    classes, per_path = labels if labels else ((), [])
    def pick(idx: list[int]) -> tuple[int, ...]:
        return tuple(per_path[i] for i in idx) if per_path else ()

    return HeldOutSplit(train=tuple(paths[i] for i in train_idx),
                        held_out=tuple(paths[i] for i in out_idx), classes=classes,
                        train_labels=pick(train_idx), held_out_labels=pick(out_idx))


def fixed_crops(paths: list[str] | tuple[str, ...], image_size: int, channels: int = 3
                ) -> tuple[Tensor, list[int]]:
    """Centre crops ((n, C, size, size), uint8 or uint16) of the readable ``paths``, and which
    were read: evaluation images, the same at every evaluation (no random augmentation)."""
    images, kept = [], []
    for i, path in enumerate(paths):
        try:
            images.append(center_square(read_for(path, channels), image_size))
        except ImageError as err:
            log.warning("skipping %s", err)
            continue
        kept.append(i)
    if not images:
        return torch.empty(0, channels, image_size, image_size, dtype=torch.uint8), kept
    return torch.stack(same_dtype(images)), kept


class TrainSplitDataModule(MAEDataModule):
    """:class:`MAEDataModule` over the training part of a :class:`HeldOutSplit` only: the
    held-out images are never trained on."""

    def __init__(self, train_paths: tuple[str, ...], image_size: int, batch_size: int,
                 num_workers: int, pin_memory: bool | None = None, channels: int = 3) -> None:
        super().__init__("", image_size, batch_size, num_workers, pin_memory, channels=channels)
        self.train_paths = list(train_paths)

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is None:
            self.dataset = self.dataset_factory(self.train_paths, self.image_size,
                                                length=self._epoch_length(), **self._channels())

