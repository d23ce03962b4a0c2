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

import struct
from typing import Any

from litdata import StreamingDataset

from mae_core.checks import DataError
from mae_core.crops import DecodeAugment, UndecodableSet

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
        except UndecodableSet:
            raise
        except DAMAGE_ERRORS as err:
            return self._replace(index, err)

    def _replace(self, index: Any, err: BaseException) -> Any:
        what = (f"item {index.index} of chunk {index.chunk_index}"
                if hasattr(index, "chunk_index") else f"item {index}")
        transforms = getattr(self, "transform", [])  # LitData keeps a list
        transform = next((t for t in transforms if isinstance(t, DecodeAugment)), None)
        if transform is None:  # raw items (previews): nothing stands in
            raise DataError(f"the prepared data set {self.input_dir.path or self.input_dir.url} "
                            f"is damaged: {what} cannot be read ({type(err).__name__}: {err}); "
                            "prepare it again with python -m mae_core.data optimize") from err
        why = f"its bytes in the prepared set are damaged ({type(err).__name__})"
        return {**transform.replace(what, why, err), "id": -1}


def streaming_dataset(path: str, image_size: int | None, shuffle: bool, seed: int = 0,
                      defer: bool = False, passes: int = 1) -> StreamingDataset:
    """The prepared set as LitData items, cropped and flipped (``image_size``) or not; ``defer``
    leaves the decode and the crop to the training device (:func:`crops.finish_on_device`);
    ``passes``: an epoch reads every image that many times (LitData's whole-copy upsampling)."""
    transform = DecodeAugment(image_size, defer=defer) if image_size else None
    # One item deserialised per read: LitData's automatic window (by mean item size) can straddle
    # its shuffle blocks, and then it copies a window of ~100 images' bytes for every image read.
    return TolerantStreamingDataset(path, shuffle=shuffle, drop_last=True, seed=seed,
                                    transform=transform, batch_decode=0, subsample=float(passes))
