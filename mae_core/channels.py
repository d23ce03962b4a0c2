"""A data set's channels and normalisation: what kind of images a folder holds, and its statistics.

:func:`scan_format` tells a folder's :class:`~mae_core.pixels.PixelFormat` from the files' headers
and refuses a folder that mixes kinds (8-bit grayscale among colour photos excepted: they are
read as RGB, as always). :func:`resolve_channels` fills a run config's ``in_chans``,
``normalize`` and, for ``normalize: dataset``, the per-channel ``pixel_mean`` / ``pixel_std``
computed once from a sample of the training images, so ``config.yaml`` (and the weights file's
metadata) hold what the model normalises with: resume, reconstruction, evaluation and export
all read it back from there.

Example:
    >>> cfg = resolve_channels(RunConfig().with_overrides(data="scans/"), check_data("scans/"))
    >>> cfg.model.in_chans, cfg.model.normalize, cfg.model.pixel_mean
    (1, 'dataset', '0.1834')
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import torch

from mae_core.config import ConfigError, RunConfig, format_stats
from mae_core.checks import path_shown
from mae_core.data import DataError, DataSummary, find_images
from mae_core.images import ImageError, resize_short_side
from mae_core.pixels import RGB8, PixelFormat, max_value, probe, read_for

log = logging.getLogger(__name__)

# Headers read to tell a folder's kind: every file of an in-memory folder (at most 1,000), an even
# spread of a larger one.
MAX_PROBED = 2000
# Images decoded for the data set statistics: the mean and spread of a channel settle long before.
STATS_IMAGES = 256


@dataclasses.dataclass(frozen=True)
class HeaderScan:
    """What the headers of a folder's files say: its one pixel format, and how many of the files
    read cannot be images (``unreadable``, a count of every file when ``every_file``)."""

    format: PixelFormat
    unreadable: int
    every_file: bool
    alpha_tiffs: int = 0  # of the files read, TIFFs with a sample tagged as alpha
    read: int = 0  # how many files' headers were read


def scan_format(paths: list[str], folder: str = "") -> PixelFormat:
    """The one pixel format of ``paths`` (headers only), or a :class:`DataError` naming an
    example file of each kind when they differ. Unreadable files are left to the decoder."""
    return scan_headers(paths, folder).format


def scan_headers(paths: list[str], folder: str = "") -> HeaderScan:
    """:func:`scan_format`, with the count of unreadable files among those read: every file of a
    folder of at most ``MAX_PROBED``, an even spread of a larger one."""
    step = max(1, math.ceil(len(paths) / MAX_PROBED))
    examples: dict[PixelFormat, Path] = {}
    unreadable = alpha_tiffs = 0
    read = paths[::step]
    for path in read:
        try:
            fmt = probe(path)
        except ImageError:
            unreadable += 1
            continue
        examples.setdefault(fmt, path)
        alpha_tiffs += fmt.alpha_tiff
    return HeaderScan(_one_format(examples, folder), unreadable, every_file=step == 1,
                      alpha_tiffs=alpha_tiffs, read=len(read))


def _one_format(examples: dict[PixelFormat, Path], folder: str) -> PixelFormat:
    kinds = set(examples)
    if not kinds:
        return RGB8
    if kinds <= {RGB8, PixelFormat(1, 8)}:
        return RGB8 if RGB8 in kinds else PixelFormat(1, 8)
    if len(kinds) == 1:
        return kinds.pop()
    listed = "; ".join(f"{fmt.describe()} (e.g. {path_shown(str(path))})"
                       for fmt, path in sorted(examples.items(), key=lambda kv: str(kv[1])))
    raise DataError(f"data folder {path_shown(folder)} mixes kinds of images: {listed}. A run trains "
                    "on one kind (same channels and bit depth): put each kind in its own folder. "
                    "(8-bit grayscale images among colour photos are read as RGB.)")


def dataset_stats(paths: list[str], channels: int, image_size: int, seed: int = 0,
                  max_images: int = STATS_IMAGES) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation, as fractions of full scale (what
    :meth:`MaskedAutoencoder.normalize` subtracts and divides by), over up to ``max_images``
    images drawn with ``seed``, each resized to a short side of ``image_size`` first."""
    order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(seed)).tolist()
    total = torch.zeros(channels, dtype=torch.float64)
    squares = torch.zeros(channels, dtype=torch.float64)
    count, used = 0, 0
    for index in order:
        if used == max_images:
            break
        try:
            image = read_for(paths[index], channels)
        except ImageError as err:
            log.warning("statistics skip %s", err)
            continue
        values = resize_short_side(image, image_size).double() / max_value(image)
        flat = values.reshape(channels, -1)
        total += flat.sum(dim=1)
        squares += (flat**2).sum(dim=1)
        count += flat.shape[1]
        used += 1
    if not count:
        raise DataError("no image of the data set could be read for its statistics")
    mean = total / count
    std = (squares / count - mean**2).clamp(min=0).sqrt()
    # A constant channel has no spread: dividing by 1 keeps it at zero instead of infinity.
    std = torch.where(std > 1e-8, std, torch.ones_like(std))
    return tuple(mean.tolist()), tuple(std.tolist())


def resolve_data(cfg: RunConfig) -> tuple[RunConfig, DataSummary]:
    """A new run's data, checked once for everyone who starts one (the app's Start and Queue, the
    command line): :func:`~mae_core.data.check_data`, then :func:`resolve_channels`, then an
    impossible held-out split or an unlabelled ``eval_data`` refused before the run exists, as
    the trainer itself would (reusing the folder's walk). ``cfg`` must be resolved."""
    from mae_core.data import check_data
    from mae_core.monitor import plan_evaluation  # brings the model's modules: when needed
    from mae_core.datasource import held_in_memory

    try:
        summary = check_data(cfg.train.data)
        cfg = resolve_channels(cfg, summary)
    except DataError as err:  # the setting to change is the data field (the page shows it)
        err.field = err.field or "data"
        raise
    in_memory = held_in_memory(cfg.train.data, summary.files)
    if summary.folder and not in_memory:  # prepared into the cache by the run's first process
        from mae_core.prepared import require_cache_folder

        require_cache_folder()
    plan_evaluation(cfg.train, split_data=in_memory, paths=summary.paths,
                    channels=cfg.model.channels)
    return cfg, summary


def resolve_channels(cfg: RunConfig, data: DataSummary) -> RunConfig:
    """``cfg`` with ``in_chans``, ``normalize`` and the statistics filled from its data.

    ``in_chans`` must match the data's channels (auto takes them); ``normalize: auto`` is
    ImageNet's statistics for 8-bit RGB data and the data set's own otherwise. A config that
    already holds statistics keeps them (a resumed run normalises as it trained).
    """
    model, fmt = cfg.model, PixelFormat(data.channels, data.bits)
    if model.in_chans is not None and model.in_chans != fmt.channels:
        raise ConfigError("in_chans", f"is {model.in_chans} but {path_shown(data.name)} holds "
                          f"{fmt.describe()} images: set it to {fmt.channels} (or auto)")
    normalize = model.normalize
    if normalize == "auto":  # statistics given by hand are the data set's
        normalize = "imagenet" if fmt.is_rgb8 and not model.pixel_mean else "dataset"
    if normalize == "imagenet" and fmt.channels != 3:
        raise ConfigError("normalize", f"imagenet statistics are for RGB images; the data holds "
                          f"{fmt.describe()} images: use dataset (or auto)")
    mean, std = model.pixel_mean, model.pixel_std
    if normalize == "dataset" and not mean:
        if not data.folder:
            raise ConfigError("normalize", "dataset statistics are computed from an image folder; "
                              "for a prepared or remote set give pixel_mean and pixel_std, or use "
                              "imagenet")
        means, stds = dataset_stats(find_images(cfg.train.data), fmt.channels, model.image_size,
                                    cfg.train.seed)
        mean, std = format_stats(means), format_stats(stds)
    resolved = dataclasses.replace(model, in_chans=fmt.channels, normalize=normalize,
                                   pixel_mean=mean, pixel_std=std)
    return RunConfig(model=resolved, train=cfg.train)


def for_new_data(cfg: RunConfig) -> RunConfig:
    """``cfg`` (a run's resolved config) to start another run from: its data set statistics and
    channel count left to be computed again from the data the new run names.

    The same folder gives the same numbers (the sample is seeded); another folder gets its own
    instead of silently inheriting these. Statistics given by hand for a prepared or remote set
    (which cannot be computed) are kept.
    """
    from mae_core import prepared

    data = cfg.train.data
    if cfg.model.normalize != "dataset" or prepared.is_remote(data) or prepared.is_prepared(data):
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, in_chans=None))
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, in_chans=None,
                                                              pixel_mean="", pixel_std=""))
