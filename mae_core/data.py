"""Training data: a folder of images (or the embedded sample photos), decoded once, augmented as MAE.

Images are decoded once and cached in memory as small tensors (short side 2 × image size, at most
512; uint8, or uint16 for 16-bit grayscale and multi-band images), so an epoch costs crops and
flips, not JPEG decodes; a folder too large for :data:`CACHE_LIMIT_BYTES` is decoded on every
access instead (a large one is prepared and streamed, :mod:`mae_core.prepared`). Augmentation is lightly's ``MAETransform``
(random resized crop with scale (0.2, 1), bicubic, horizontal flip) applied to those tensors; the
normalisation runs batched on the training device (:meth:`MaskedAutoencoder.normalize`).
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytorch_lightning as pl
import torch
from lightly.transforms import MAETransform
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from mae_core.checks import DataError  # noqa: F401 - its home is light: the CLIs refuse early
from mae_core.checks import SYSTEM_FOLDERS, is_system_path, path_shown, unreadable_url
from mae_core.crops import ResizedCrop
from mae_core.images import (
    ImageError,
    center_square,
    resize_short_side,
    wide_range_safe,
)
from mae_core.pixels import read_for, same_dtype

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})

# The real photographs among the images scikit-image ships in its wheel: a data set that needs
# no download. (Its charts, logos, text and test patterns are left out.)
SAMPLE_PHOTOS = (
    "astronaut.png", "brick.png", "camera.png", "chelsea.png", "clock_motion.png", "coffee.png",
    "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png",
    "motorcycle_left.png", "motorcycle_right.png", "retina.jpg", "rocket.jpg", "cell.png",
)
SAMPLE_DATA_NAME = "sample photos (scikit-image)"

# More image files than this is a wrong folder, not a data set: ImageNet-21k's 14.2 M images fit
# (the cap was 1 M, and refused ImageNet-1k's 1.28 M, the MAE paper's own data, even to prepare).
MAX_IMAGE_FILES = 20_000_000
MAX_WALKED_ENTRIES = 40_000_000

# Above this many cached bytes per process, images are decoded from disk on every access.
CACHE_LIMIT_BYTES = 2 * 1024**3
# Each loader worker builds whole batches, and at an epoch's end they all sit idle until the next
# epoch starts: the pipeline drains once per epoch. A small set is repeated to at least this many
# batches per worker per epoch, so the drain costs ~3%, not most of the time (on an H200, 4-batch
# epochs with 8 workers capped the trainer at the ~2,600 images/s the loader refilled).
BATCHES_PER_WORKER_PER_EPOCH = 32


def sample_photo_paths() -> list[Path]:
    import skimage

    folder = Path(skimage.__file__).parent / "data"
    return [folder / name for name in SAMPLE_PHOTOS if (folder / name).is_file()]


def find_images(folder: str) -> list[str]:
    """Image files under ``folder`` (recursively, sorted as their :class:`~pathlib.Path` s sort);
    ``""`` means the embedded sample photos.

    Paths are strings: a ``Path`` costs three times the memory (~270-310 bytes against ~90:
    ~3.8 GB for ImageNet-21k's 14 M files against ~1.2), and the walk that built, checked and
    sorted them took 3.3-5.5 s for 200,000 files where this one takes 0.2-0.4 s (README, "The
    walk"). Refuses the root and the kernel's virtual folders (``/proc``, ``/sys``, ``/dev``),
    follows a symlinked folder once at most (a symlink loop ends the walk there) and stops with a
    :class:`DataError` past :data:`MAX_IMAGE_FILES` files, so a bad path cannot hang the caller.
    """
    if not folder:
        paths = [str(path) for path in sample_photo_paths()]
        if not paths:
            raise DataError("the embedded sample photos are missing: reinstall scikit-image")
        return paths
    root = _checked_root(folder)
    walk = _Walk(folder, os.path.realpath(root))
    walk.run(str(root))
    if not walk.found:
        raise DataError(f"data folder {path_shown(folder)} holds no images "
                        f"({', '.join(sorted(IMAGE_EXTENSIONS))}, searched recursively)")
    return walk.found


class _Walk:
    """One walk of a data folder, depth first in name order: the files come out in the order
    sorted ``Path`` s have (by their parts), with no sort of the whole list at the end."""

    def __init__(self, named: str, inside: str) -> None:
        self.named, self.inside = named, inside
        self.found: list[str] = []
        self.seen: set[str] = set()
        self.entries = 0
        self.cut = 0

    def run(self, top: str) -> None:
        # Paths as str(Path(top) / name) writes them, the cache key's text: "a.png", not "./a.png".
        self.cut = 2 if top == os.curdir else 0
        # A stack of listings, not recursion: a folder nested 2,000 deep is a data folder too.
        pending = [iter(self._listing(top))]
        while pending:
            entry = next(pending[-1], None)
            if entry is None:
                pending.pop()
            elif _is_dir(entry):
                pending.append(iter(self._listing(entry.path)))
            elif _image_name(entry.name) and _is_image_file(entry):
                self.found.append(entry.path[self.cut:])
                if len(self.found) > MAX_IMAGE_FILES:
                    self._refuse()

    def _listing(self, path: str) -> list[os.DirEntry]:
        real = os.path.realpath(path)
        if real in self.seen or is_system_path(real) or _holds(real, self.inside):
            return []  # a loop, a symlink into /proc or up to / : not descended
        self.seen.add(real)
        try:
            with os.scandir(path) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
        except OSError as err:
            _skip(err)
            return []
        self.entries += len(entries)
        if self.entries > MAX_WALKED_ENTRIES:
            self._refuse()
        return entries

    def _refuse(self) -> None:
        raise DataError(f"data folder {path_shown(self.named)} holds more than {MAX_IMAGE_FILES:,} "
                        f"image files (or {MAX_WALKED_ENTRIES:,} entries): choose a smaller folder")


def _image_name(name: str) -> bool:
    dot = name.rfind(".")  # as Path.suffix: ".png" alone is a hidden file with no suffix
    return 0 < dot < len(name) - 1 and name[dot:].lower() in IMAGE_EXTENSIONS


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # (a symlink to a folder is one: followed, once)
    except OSError:
        return False


def _is_image_file(entry: os.DirEntry) -> bool:
    """A regular file, or a link to one outside the kernel's folders (a "photo.png" linked to
    /proc/kcore is not one). No system call for a plain file: the listing says what it is."""
    try:
        return entry.is_file() and not (entry.is_symlink()
                                         and is_system_path(os.path.realpath(entry.path)))
    except OSError:
        return False


def expanded(folder: str, what: str = "data folder") -> Path:
    """``folder`` with a leading ``~`` or ``~user`` expanded, or a :class:`DataError` saying that
    home folder is unknown (pathlib raises a bare RuntimeError)."""
    try:
        return Path(folder).expanduser()
    except RuntimeError:
        head = folder.split("/", 1)[0]
        whose = f"no user named {path_shown(head[1:])}" if len(head) > 1 else "HOME is not set"
        raise DataError(f"{what} {path_shown(folder)}: {head} names no home folder on this machine "
                        f"({whose}): write the folder's full path") from None


def _checked_root(folder: str) -> Path:
    """``folder`` as a path, refused with a :class:`DataError` if it cannot be a data folder."""
    if why := unreadable_url(folder):  # a folder "http:/host/x" under the working folder, else
        raise DataError(f"data folder {why}")
    root = expanded(folder)
    try:
        exists, is_dir = root.exists(), root.is_dir()
        real = os.path.realpath(root)
    except (OSError, ValueError) as err:  # a NUL byte, a name too long...
        raise DataError(f"data folder {path_shown(folder)} cannot be read ({_why(err)}): check the "
                        "path") from None
    if not exists:
        raise DataError(f"data folder {path_shown(folder)} does not exist")
    if not is_dir:
        raise DataError(f"data path {path_shown(folder)} is not a folder")
    if real == os.path.sep or is_system_path(real):
        raise DataError(f"data folder {path_shown(folder)} is the root or a system folder "
                        f"({', '.join(SYSTEM_FOLDERS)}): choose a folder of images")
    return root


def _why(err: OSError | ValueError) -> str:
    if isinstance(err, OSError) and err.errno == errno.ENAMETOOLONG:
        return "a name in it is longer than the file system allows, 255 bytes"
    return (err.strerror if isinstance(err, OSError) else None) or str(err)


def _holds(real: str, inside: str) -> bool:
    """Whether the folder ``real`` holds the data folder (real path ``inside``): reached by a
    symlink in it to ``/`` or to a parent, the walk went through the whole file system, other
    users' files included."""
    return real != inside and (inside + os.sep).startswith(real.rstrip(os.sep) + os.sep)


def _skip(err: OSError) -> None:
    log.warning("skipping unreadable folder: %s", err)


@dataclass(frozen=True)
class DataSummary:
    """A data set as a run sees it: image files, and the channels and bits of every image
    (``folder``: an image folder, not a prepared set). For a folder, also its image files and,
    when every header was read (at most ``channels.MAX_PROBED`` files), how many are not images:
    what the data field shows, without walking the folder again."""

    name: str
    files: int
    channels: int = 3
    bits: int = 8
    folder: bool = True
    unreadable: int | None = None
    paths: tuple[str, ...] = field(default=(), repr=False, compare=False)
    alpha_tiffs: int = 0  # of the headers read (see channels.HeaderScan)
    headers_read: int = field(default=0, repr=False, compare=False)  # of ``files``

    def describe(self) -> str:
        kind = "RGB" if self.channels == 3 else "grayscale" if self.channels == 1 else "multi-band"
        return f"{self.channels}-channel ({kind}) {self.bits}-bit"

    def alpha_note(self) -> str:
        """What became of TIFF samples tagged as alpha, or "": ``tifffile.imwrite`` tags an
        H×W×4 8-bit array so by default, and an RGB + NIR set then trained as RGB unsaid."""
        if not self.alpha_tiffs:
            return ""
        counted = f"{self.alpha_tiffs:,} TIFF(s)"
        if 0 < self.headers_read < self.files:  # a large folder: an even spread of it was read
            counted = (f"{self.alpha_tiffs:,} of the {self.headers_read:,} files read (an even "
                       f"spread of its {self.files:,}) are TIFFs that")
        return (f"{counted} tag a sample as alpha: read as transparency "
                "(composited on white), not as a band; to train it as a band, write the file with "
                "photometric='minisblack'")


def check_data(folder: str) -> DataSummary:
    """Refuse a folder that cannot be trained on, cheaply: it must hold at least one readable image,
    and images of one kind (channels, bit depth: :func:`mae_core.channels.scan_format`).

    A prepared data set is checked by its manifest; a remote URL is left to LitData at start.
    """
    from mae_core import datasource, prepared
    from mae_core.channels import scan_headers

    if prepared.is_remote(folder) or prepared.is_prepared(folder):
        found = datasource.describe(folder)
        return DataSummary(name=folder, files=found.count or 0, folder=False)
    paths = find_images(folder)
    scan = scan_headers(paths, folder)
    fmt = scan.format
    if not fmt.is_rgb8 and not datasource.held_in_memory(folder, len(paths)):
        raise DataError(f"data folder {path_shown(folder)} holds {len(paths):,} {fmt.describe()} "
                        f"images; above {prepared.AUTO_PREPARE_ABOVE:,} images a folder is "
                        "streamed as a prepared set of 8-bit RGB JPEGs, which would lose its "
                        f"channels or precision: train on at most {prepared.AUTO_PREPARE_ABOVE:,} "
                        "of them")
    for path in paths:
        try:
            read_for(path, fmt.channels)
        except ImageError:
            continue
        return DataSummary(name=folder or SAMPLE_DATA_NAME, files=len(paths),
                           channels=fmt.channels, bits=fmt.bits,
                           unreadable=scan.unreadable if scan.every_file else None,
                           paths=tuple(paths), alpha_tiffs=scan.alpha_tiffs,
                           headers_read=scan.read)
    raise DataError(f"none of the {len(paths)} image files in {path_shown(folder)} can be read: all are corrupt "
                    "or not images")


def mae_augmentation(image_size: int) -> v2.Compose:
    """lightly's ``MAETransform`` crop and flip, on uint8 tensors instead of PIL images.

    The crop's parameters are read from ``MAETransform`` itself, so the two cannot drift apart.
    """
    reference = MAETransform(input_size=image_size).transform.transforms
    crop = next(t for t in reference if type(t).__name__ == "RandomResizedCrop")
    return v2.Compose([
        ResizedCrop(crop.size, scale=crop.scale, ratio=crop.ratio,
                    interpolation=crop.interpolation, antialias=True),
        v2.RandomHorizontalFlip(),
    ])


class ImageFolderDataset(Dataset):
    """MAE-augmented crops of ``paths`` (uint8, or uint16 for 16-bit images: never squashed to
    8 bits), ``channels`` per pixel; unreadable files (and images of another channel count) are
    skipped and counted.

    ``length`` repeats a small data set so an epoch has at least a few full batches on every rank.
    """

    def __init__(self, paths: list[str], image_size: int, length: int | None = None,
                 cache_limit_bytes: int = CACHE_LIMIT_BYTES, channels: int = 3) -> None:
        self.image_size = image_size
        self.channels = channels
        self.stored_side = min(2 * image_size, 512)
        self.augment = mae_augmentation(image_size)
        # Grayscale and multi-band images are often 16-bit (2 bytes a value): counted as such.
        bytes_per_value = 1 if channels == 3 else 2
        estimate = len(paths) * self.stored_side**2 * 4 * channels * bytes_per_value
        self.cache: list[Tensor] | None = None
        self.paths = list(paths)
        self.skipped = 0
        if estimate <= cache_limit_bytes:  # beyond it, decoded on every access
            self.cache = []
            for path in paths:
                image = self._decode(path)
                if image is None:
                    self.skipped += 1
                else:
                    self.cache.append(image)
            if not self.cache:
                raise DataError(f"none of the {len(paths)} image files can be read")
        self.num_images = len(self.cache) if self.cache is not None else len(self.paths)
        self.length = max(self.num_images, length or 0)

    def _decode(self, path: str) -> Tensor | None:
        try:
            return resize_short_side(read_for(path, self.channels), self.stored_side)
        except ImageError as err:
            log.warning("skipping %s", err)
            return None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Tensor:
        index %= self.num_images
        if self.cache is not None:
            return wide_range_safe(self.augment, self.cache[index])
        for offset in range(self.num_images):
            image = self._decode(self.paths[(index + offset) % self.num_images])
            if image is not None:
                return wide_range_safe(self.augment, image)
        raise DataError("no image in the data set can be read")


def preview_images(folder: str, image_size: int, count: int, channels: int = 3) -> Tensor:
    """The first ``count`` readable images, centre-cropped: the fixed set a run's previews show."""
    images = []
    for path in find_images(folder):
        if len(images) == count:
            break
        try:
            images.append(center_square(read_for(path, channels), image_size))
        except ImageError:
            continue
    return torch.stack(same_dtype(images)) if images else torch.empty(
        0, channels, image_size, image_size, dtype=torch.uint8)


class MAEDataModule(pl.LightningDataModule):
    """The training data: ``dataset_factory(paths, image_size, length)`` over the folder's images.

    The default factory is :class:`ImageFolderDataset`; the benchmark passes its naive
    per-sample PIL dataset to compare against it on the same files, epoch length and loader.
    ``pin_memory=None`` pins batches when the trainer runs on a CUDA device: Lightning then
    copies them with ``non_blocking=True``, so the copy overlaps the previous step.
    """

    def __init__(self, folder: str, image_size: int, batch_size: int, num_workers: int,
                 pin_memory: bool | None = None,
                 dataset_factory: Callable[..., Dataset] | None = None, channels: int = 3) -> None:
        super().__init__()
        self.folder = folder
        self.channels = channels
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.dataset_factory = dataset_factory or ImageFolderDataset
        self.dataset: Dataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is None:
            self.dataset = self.dataset_factory(find_images(self.folder), self.image_size,
                                                length=self._epoch_length(), **self._channels())

    def _epoch_length(self) -> int:
        """The samples a small data set is repeated to per epoch, over all ranks: whole
        accumulation cycles (no step of the epoch sums fewer batches than configured), at least
        4 optimizer steps, and enough batches that the loader workers' drain at the epoch's end
        is cheap (:data:`BATCHES_PER_WORKER_PER_EPOCH`)."""
        world = self.trainer.world_size if self.trainer else 1
        accumulate = self.trainer.accumulate_grad_batches if self.trainer else 1
        steps = max(4, -(-BATCHES_PER_WORKER_PER_EPOCH * self.num_workers // accumulate))
        return steps * accumulate * self.batch_size * world

    def _channels(self) -> dict[str, int]:
        # Only said when not RGB: the benchmark's naive factory reads RGB photos and takes no
        # channel count.
        return {"channels": self.channels} if self.channels != 3 else {}

    def train_dataloader(self) -> DataLoader:
        assert self.dataset is not None
        pin = self.pin_memory
        if pin is None:
            pin = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=True, drop_last=True,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          pin_memory=pin)


if __name__ == "__main__":  # python -m mae_core.data optimize|caches: mae_core.data_cli
    from mae_core.data_cli import main
    from mae_core.process import exit_quickly

    exit_quickly(main())
