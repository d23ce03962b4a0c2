"""Reading a prepared set's shards: LitData's ``StreamingDataset``, where an item whose bytes were
damaged on disk after preparation (a flipped bit, a bad sector) is replaced rather than ending a
long run, as :class:`mae_core.crops.DecodeAugment` already replaces a picture that no longer
decodes.

LitData reads an item's place and field sizes from binary headers in its chunk: damage there
raises ``struct.error: unpack requires a buffer of 8 bytes`` (or a ValueError, an IndexError, ...)
from inside its reader, which names neither the set nor what to do. With a good item already read,
the damaged one is replaced by it (the epoch keeps its length on every rank, so DDP never waits on
a rank that lost a sample) and named on stderr; with none, or past ``crops.MAX_REPLACED``, the run
fails saying the set is damaged.
"""

from __future__ import annotations

import functools
import struct
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from litdata import StreamingDataLoader, StreamingDataset
from torch import Tensor

from mae_core.checks import DataError
from mae_core.crops import (AGAIN, DecodeAugment, UndecodableSet, collate_deferred,
                             finish_on_device)
from mae_core.data import BATCHES_PER_WORKER_PER_EPOCH
from mae_core.fileio import read_json
from mae_core.images import center_square, open_rgb
from mae_core.process import first_process

# What garbage in a chunk's offset table or an item's size header raises inside LitData's reader
# (its own header check raises RuntimeError). Not OSError: a remote set's network error, or a
# stale NFS handle, is no damage, and re-preparing would not cure it.
DAMAGE_ERRORS = (struct.error, ValueError, IndexError, OverflowError, UnicodeDecodeError,
                 RuntimeError)


class TolerantStreamingDataset(StreamingDataset):
    """A ``StreamingDataset`` whose :class:`DecodeAugment` transform also stands in for items
    whose bytes cannot be read back (see the module's docstring)."""

    def __getitem__(self, index: Any) -> Any:
        try:
            return super().__getitem__(index)
        except UndecodableSet as err:
            self._mark_damaged(err)
            raise
        except DAMAGE_ERRORS as err:
            return self._replace(index, err)

    def _mark_damaged(self, err: BaseException) -> None:
        """Mark a local set whose bytes are damaged (see :func:`mae_core.prepared.mark_damaged`);
        never for an I/O error of this machine (an errno: EIO, EMFILE), which another start may
        not meet, nor for a remote set (its path is LitData's local copy)."""
        from mae_core.prepared import mark_damaged  # (prepared imports the readers' modules)

        cause = err.__cause__ if isinstance(err, UndecodableSet) else err
        if self.input_dir.url or (isinstance(cause, OSError) and cause.errno is not None):
            return
        mark_damaged(self.input_dir.path, str(err))

    def _replace(self, index: Any, err: BaseException) -> Any:
        what = (f"item {index.index} of chunk {index.chunk_index}"
                if hasattr(index, "chunk_index") else f"item {index}")
        transforms = getattr(self, "transform", [])  # LitData keeps a list
        transform = next((t for t in transforms if isinstance(t, DecodeAugment)), None)
        if transform is None:  # raw items (previews): nothing stands in
            refusal = DataError(f"the prepared data set {self.input_dir.path or self.input_dir.url}"
                                f" is damaged: {what} cannot be read ({type(err).__name__}: {err});"
                                f" {AGAIN}")
            self._mark_damaged(refusal)
            raise refusal from err
        why = f"its bytes in the prepared set are damaged ({type(err).__name__})"
        try:
            return {**transform.replace(what, why, err), "id": -1}
        except UndecodableSet as undecodable:  # the first item read, or too many
            self._mark_damaged(undecodable)
            raise


def streaming_dataset(path: str, image_size: int | None, shuffle: bool, seed: int = 0,
                      defer: bool = False, passes: int = 1) -> StreamingDataset:
    """The prepared set as LitData items, cropped and flipped (``image_size``) or not; ``defer``
    leaves the decode and the crop to the training device (:func:`crops.finish_on_device`);
    ``passes``: an epoch reads every image that many times (LitData's whole-copy upsampling)."""
    from mae_core.prepared import unsafe_format  # (prepared imports the readers' modules)

    transform = DecodeAugment(image_size, defer=defer) if image_size else None
    # One item deserialised per read: LitData's automatic window (by mean item size) can straddle
    # its shuffle blocks, and then it copies a window of ~100 images' bytes for every image read.
    dataset = TolerantStreamingDataset(path, shuffle=shuffle, drop_last=True, seed=seed,
                                       transform=transform, batch_decode=0,
                                       subsample=float(passes))
    # Its index.json is local now (a remote set's copy included), and no item has been read:
    # every set, local, remote or named by hand, is checked here, where it is opened.
    unsafe = unsafe_format(read_json(Path(dataset.input_dir.path) / "index.json"))
    if unsafe:
        raise DataError(f"the prepared data set {path} is refused: {unsafe}; prepare it again "
                        "with python -m mae_core.data optimize")
    return dataset


def epoch_passes(images: int, batch_size: int, world: int, workers: int) -> int:
    """Passes over a prepared set per epoch: one for a large set; a small one is read again until
    each rank's epoch holds :data:`~mae_core.data.BATCHES_PER_WORKER_PER_EPOCH` batches per loader
    worker. Each worker builds whole batches and all of them idle from the epoch's last batch to
    the next epoch's first: on an H200 a 7-batch epoch fed ~3,000 images/s where the cores
    decode 9,600. A set too small for one batch stays at one pass (refused with the reason)."""
    batches = images // (world * batch_size)
    if workers == 0 or batches == 0:
        return 1
    return -(-BATCHES_PER_WORKER_PER_EPOCH * workers // batches)


def preview_images(path: str, image_size: int, count: int) -> Tensor:
    """The prepared set's first ``count`` images, centre-cropped (the run's fixed previews)."""
    dataset = streaming_dataset(path, None, shuffle=False)
    images = [center_square(open_rgb(bytes(dataset[i]["image"])), image_size)
              for i in range(min(count, len(dataset)))]
    return torch.stack(images) if images else torch.empty(0, 3, image_size, image_size,
                                                          dtype=torch.uint8)


class ResumableLoader(StreamingDataLoader):
    """LitData's loader, whose saved position is dropped when it is of another set.

    A resumed run keeps the set it started on; but when that set is gone from the cache and its
    folder has changed since, the folder is prepared again into a new set, and LitData refused the
    checkpoint's position in the old one on every resume ("The provided `input_dir` path state
    doesn't match"): the run could never train again. The interrupted epoch starts over on the
    new set instead; the model, optimizer and step come back from the checkpoint as ever."""

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        saved = obj.get("dataset") if isinstance(obj, dict) else None
        if isinstance(saved, dict) and not self._same_set(saved):
            if first_process():
                print(f"note: the checkpoint's place in the epoch is in another data set "
                      f"({saved.get('input_dir_url') or saved.get('input_dir_path')}) than "
                      f"{self.dataset.input_dir.url or self.dataset.input_dir.path}: its folder "
                      "was prepared again since; this epoch starts over on the new set",
                      flush=True)
            return
        super().load_state_dict(obj)

    def _same_set(self, saved: dict[str, Any]) -> bool:
        here = self.dataset.input_dir
        if here.url:  # a remote set: its local copy's folder may differ from machine to machine
            return saved.get("input_dir_url") == here.url
        return saved.get("input_dir_path") == here.path


class StreamingMAEDataModule(pl.LightningDataModule):
    """A prepared (local or remote) data set through LitData's ``StreamingDataLoader``.

    Each rank reads its own share of the chunks (LitData splits them by the distributed world,
    nodes included); Lightning saves the loader's ``state_dict`` in the checkpoint and restores it
    on resume, so the interrupted epoch continues where it stopped. A small set with loader
    workers is read more than once per epoch (:func:`epoch_passes`). Batches are
    ``{"image": uint8, "id": int}``; :meth:`on_before_batch_transfer` keeps the ids (``last_ids``,
    the samples of the step about to run) and hands the model the images.
    """

    def __init__(self, path: str, image_size: int, batch_size: int, num_workers: int,
                 seed: int = 0, pin_memory: bool | None = None,
                 decode_on_device: bool = False) -> None:
        super().__init__()
        self.decode_on_device = decode_on_device
        self.path = path
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.pin_memory = pin_memory
        self.dataset: Any = None
        self.passes = 1  # over the set per epoch: :func:`epoch_passes`
        self.last_ids: Tensor | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is None:
            read = functools.partial(streaming_dataset, self.path, self.image_size, shuffle=True,
                                     seed=self.seed, defer=self.decode_on_device)
            dataset = read()
            images = sum(end - start for start, end in dataset.region_of_interest)
            world = self.trainer.world_size if self.trainer else 1
            self.passes = epoch_passes(images, self.batch_size, world, self.num_workers)
            self.dataset = read(passes=self.passes) if self.passes > 1 else dataset

    def train_dataloader(self) -> Any:
        pin = self.pin_memory
        if pin is None:
            pin = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        loader = ResumableLoader(self.dataset, batch_size=self.batch_size, drop_last=True,
                                     num_workers=self.num_workers, pin_memory=pin,
                                     persistent_workers=self.num_workers > 0,
                                     collate_fn=collate_deferred if self.decode_on_device else None)
        if len(loader) == 0:
            world = self.trainer.world_size if self.trainer else 1
            raise DataError(f"the prepared data set {self.path} holds too few images for one batch "
                            f"of {self.batch_size} on each of {world} processes")
        return loader

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        self.last_ids = batch["id"]
        if self.decode_on_device:  # before Lightning's copy: the JPEGs are read from host memory
            return finish_on_device(batch, self.image_size, self.trainer.strategy.root_device)
        return batch["image"]
