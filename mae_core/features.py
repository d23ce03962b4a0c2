"""Frozen-encoder features and the scores computed on them: kNN (lightly's) and a linear probe.

Reusable by anything that asks "how good is this encoder": the evaluation command
(:mod:`mae_core.evaluate`) and a live monitor alike. A labelled folder is ``root/<class>/*``, the
class subfolders being the labels (torchvision's ``ImageFolder`` convention).

Example:
    >>> data = load_labelled("checkpoints/.demo-labelled", image_size=64)
    >>> train, val = split(data, val_fraction=0.2, seed=0)
    >>> bank_cls, bank_mean = embed(model, train.images)
    >>> query_cls, query_mean = embed(model, val.images)
    >>> knn_accuracy(query_mean, bank_mean, train.labels, val.labels, data.num_classes, k=20)
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from lightly.utils.benchmarking import knn_predict
from torch import Tensor

from mae_core.checks import path_shown
from mae_core.data import DataError, expanded, find_images
from mae_core.splits import class_of
from mae_core.images import ImageError, center_square
from mae_core.pixels import read_for, same_dtype
from mae_core.model import MaskedAutoencoder

# lightly's ViT benchmarks: kNN with k=20 and k=200 neighbours, temperature 0.07.
KNN_KS = (20, 200)
KNN_TEMPERATURE = 0.07
# A labelled folder is read whole into memory: beyond this many images per class (or in all), a
# fixed subset (the first by sorted name) is kept, so a large folder costs bounded time and memory.
MAX_PER_CLASS = 1000
MAX_IMAGES = 10_000


@dataclass
class Labelled:
    """Images uint8 (N, 3, S, S), labels (N,) indexing ``classes``; ``skipped`` unreadable files."""

    images: Tensor
    labels: Tensor
    classes: list[str]
    skipped: int = 0

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, index: Tensor) -> Labelled:
        return Labelled(self.images[index], self.labels[index], self.classes)


def class_folders(folder: str | Path) -> dict[str, list[str]]:
    """``{class: image paths}`` of a labelled folder; raises :class:`DataError` if it is not one.
    The folder is walked as a data folder is (:func:`find_images`), its classes told by
    :func:`class_of`; an image directly in the folder belongs to no class and is left out."""
    if not str(folder).strip():  # find_images("") means the sample photos: no classes there
        raise DataError("no labelled folder given: a labelled folder holds one subfolder per "
                        "class (root/<class>/*.png)")
    root = expanded(str(folder), "labelled folder")
    classes: dict[str, list[str]] = {}
    try:
        paths = find_images(str(folder))
    except DataError as err:
        if "holds no images" not in str(err):
            raise
        paths = []
    located = _RealClass(root)
    for path in paths:
        name = located(path)
        if name is not None:
            classes.setdefault(name, []).append(path)
    classes = dict(sorted(classes.items()))
    if not classes:
        raise DataError(f"{path_shown(str(folder))} has no class subfolders with images: a labelled "
                        "folder holds one subfolder per class (root/<class>/*.png)")
    if len(classes) < 2:
        raise DataError(f"{path_shown(str(folder))} has one class ({next(iter(classes))}); "
                        "classification needs at least 2 class subfolders with images")
    most = MAX_IMAGES // 2
    if len(classes) > most:
        # Each class needs 2 images (one to train, one to score) within the MAX_IMAGES read: with
        # more, 1 per class was kept and the split failed with "each class needs 2 images".
        raise DataError(f"{path_shown(str(folder))} has {len(classes):,} classes: the evaluation "
                        f"reads at most {MAX_IMAGES:,} images, at least 2 per class, so at most "
                        f"{most:,} classes; give a folder with fewer")
    keep = min(MAX_PER_CLASS, MAX_IMAGES // len(classes))
    return {name: paths[:keep] for name, paths in classes.items()}


class _RealClass:
    """The class of a walked path as where its folder really is in the labelled folder. The walk
    follows a symlinked folder once, the first time it meets it in name order: a link in class
    ``a`` to its sibling ``b`` (a/b2 -> ../b) gave all of b's images to a, and b was gone ("has
    one class (a)"). Folders are resolved once each, not every file."""

    def __init__(self, root: Path) -> None:
        self.root, self.real_root = root, os.path.realpath(root) + os.sep
        self.folders: dict[str, str | None] = {}

    def __call__(self, path: str) -> str | None:
        folder = os.path.dirname(path)
        if folder not in self.folders:
            real = os.path.realpath(folder) + os.sep
            # Inside the labelled folder: its own class folder; a link out of it: as named.
            self.folders[folder] = (real[len(self.real_root):].split(os.sep)[0] or None
                                    if real.startswith(self.real_root) else class_of(self.root, path))
        return self.folders[folder]


def load_labelled(folder: str | Path, image_size: int, channels: int = 3) -> Labelled:
    """Every image of a labelled folder as its centre square at ``image_size``, ``channels`` per
    pixel (unreadable files, and images of another channel count, are skipped and counted)."""
    images, labels, skipped = [], [], 0
    classes = class_folders(folder)
    for label, paths in enumerate(classes.values()):
        for path in paths:
            try:
                images.append(center_square(read_for(path, channels), image_size))
            except ImageError:
                skipped += 1
                continue
            labels.append(label)
    counts = torch.bincount(torch.tensor(labels, dtype=torch.long), minlength=len(classes))
    if int((counts > 0).sum()) < 2:
        raise DataError(f"{path_shown(str(folder))}: fewer than 2 classes have a readable image")
    return Labelled(torch.stack(same_dtype(images)), torch.tensor(labels), list(classes), skipped)


def split(data: Labelled, val_fraction: float, seed: int) -> tuple[Labelled, Labelled]:
    """A stratified train/val split, the same for the same data and seed: each class with at least
    2 images gives ``round(fraction × n)`` of them (at least 1) to val."""
    train_index, val_index = split_index(data, val_fraction, seed)
    return data.subset(train_index), data.subset(val_index)


def split_index(data: Labelled, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """:func:`split` as (train, val) indices into ``data``."""
    if not 0 < val_fraction < 1:
        raise DataError("the validation fraction must be strictly between 0 and 1, got "
                        f"{val_fraction}")
    generator = torch.Generator().manual_seed(seed)
    train, val = [], []
    for label in range(data.num_classes):
        members = (data.labels == label).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_val = min(len(members) - 1, max(1, round(val_fraction * len(members))))
        val.append(members[:n_val])
        train.append(members[n_val:])
    val_index, train_index = torch.cat(val).sort().values, torch.cat(train).sort().values
    if len(val_index) == 0:
        raise DataError("the labelled folder is too small to split: each class needs 2 images")
    return train_index, val_index


def fold_splits(data: Labelled, folds: int, seed: int) -> list[tuple[Tensor, Tensor]]:
    """Stratified ``folds``-fold cross-validation as (bank, query) indices, the same for the same
    data and seed: each class's images, shuffled, are dealt to the folds in turn, and each fold is
    queried once against all the others. Every image is a query once (a class of one image stays
    in every bank: it has no neighbour of its own to be found by), so a paired test counts every
    image, not the fifth that one split holds out."""
    if not isinstance(folds, int) or isinstance(folds, bool) or folds < 2:
        raise DataError(f"cross-validation needs at least 2 folds, got {folds!r}")
    generator = torch.Generator().manual_seed(seed)
    fold = torch.full((len(data.labels),), -1, dtype=torch.long)
    dealt = 0  # where the next class starts dealing: the folds stay within one image of each other
    for label in range(data.num_classes):
        members = (data.labels == label).nonzero().flatten()
        if len(members) < 2:
            continue
        members = members[torch.randperm(len(members), generator=generator)]
        fold[members] = (torch.arange(len(members)) + dealt) % folds
        dealt += len(members)
    if (fold < 0).all():
        raise DataError("the labelled folder is too small to split: each class needs 2 images")
    everything = torch.arange(len(fold))
    return [(everything[fold != f], everything[fold == f]) for f in range(folds)
            if (fold == f).any()]


@torch.no_grad()
def embed(model: MaskedAutoencoder, images: Tensor, batch_size: int = 128, on_cpu: bool = True
          ) -> tuple[Tensor, Tensor]:
    """(class token, mean of the patch tokens), each (N, D) float, of uint8 images (N, 3, S, S)
    through the frozen encoder: every patch visible, no masking, eval mode. On the CPU, or on the
    model's device with ``on_cpu=False`` (the live monitor gathers them across ranks there)."""
    was_training = model.training
    model.eval()
    device = model.pixel_mean.device
    out = torch.device("cpu") if on_cpu else device
    cls, mean = [], []
    for start in range(0, len(images), batch_size):
        x = model.normalize(images[start:start + batch_size].to(device))
        tokens = model.backbone.encode(x, idx_keep=None).float()
        cls.append(tokens[:, 0].to(out))
        mean.append(tokens[:, model.num_prefix_tokens:].mean(dim=1).to(out))
    model.train(was_training)
    if not cls:
        empty = torch.empty(0, model.backbone.vit.embed_dim, device=out)
        return empty, empty
    return torch.cat(cls), torch.cat(mean)


KNN_CHUNK_VALUES = 16 * 2**20  # floats per chunk of kNN queries (64 MB)


def topk_accuracy(ranked: Tensor, labels: Tensor, k: int) -> float:
    """Percentage of rows whose label is among the first ``k`` of ``ranked`` (N, C) predictions."""
    return 100.0 * (ranked[:, :k] == labels[:, None]).any(dim=1).float().mean().item()


def knn_accuracy(query: Tensor, bank: Tensor, bank_labels: Tensor, query_labels: Tensor,
                 num_classes: int, k: int = 20, temperature: float = KNN_TEMPERATURE
                 ) -> dict[str, float]:
    """kNN top-1 / top-5 (%) with lightly's ``knn_predict`` on L2-normalised features.

    ``k`` is capped by the bank's size; top-5 by the number of classes (with 5 classes or fewer it
    is 100 by construction).
    """
    top5 = min(5, num_classes)
    hits = {1: 0.0, top5: 0.0}
    for start, ranked in _knn_ranked(query, bank, bank_labels, num_classes, k, temperature):
        for top in hits:
            hits[top] += topk_accuracy(ranked, query_labels[start:start + len(ranked)], top) * len(ranked)
    return {"top1": hits[1] / len(query), "top5": hits[top5] / len(query), "k": min(k, len(bank))}


def knn_hits(query: Tensor, bank: Tensor, bank_labels: Tensor, query_labels: Tensor,
             num_classes: int, k: int = 20, temperature: float = KNN_TEMPERATURE) -> Tensor:
    """Which queries kNN ranks right first (bool, one per query): :func:`knn_accuracy`'s top-1,
    image by image, so two encoders can be compared on the same images (a paired test)."""
    right = [ranked[:, 0] == query_labels[start:start + len(ranked)] for start, ranked in
             _knn_ranked(query, bank, bank_labels, num_classes, k, temperature)]
    return torch.cat(right)


def _knn_ranked(query: Tensor, bank: Tensor, bank_labels: Tensor, num_classes: int, k: int,
                temperature: float) -> Iterator[tuple[int, Tensor]]:
    """(first query's index, classes ranked per query) for chunks of ``query``."""
    if len(query) == 0 or len(bank) == 0:  # k would be 0, and the mean of no queries 0 / 0
        raise DataError(f"kNN accuracy needs images on both sides: {len(query)} queries, a bank "
                        f"of {len(bank)}")
    k = min(k, len(bank))
    bank_t = F.normalize(bank, dim=1).t().contiguous()
    query = F.normalize(query, dim=1)
    # knn_predict builds a (queries × k × classes) one-hot: all 10,000 queries of 5,000 classes
    # at once would be 40 GB in the app. Chunks keep it near 64 MB whatever the classes.
    chunk = max(1, KNN_CHUNK_VALUES // (k * num_classes + len(bank)))
    for start in range(0, len(query), chunk):
        yield start, knn_predict(query[start:start + chunk], bank_t, bank_labels, num_classes,
                                 knn_k=k, knn_t=temperature)


# The linear probe: lightly's LinearClassifier recipe (one Linear layer, cross-entropy, SGD with
# momentum 0.9, no weight decay, lr 0.1 × batch / 256, cosine decay) trained on features computed
# once, as the encoder is frozen; before it, MAE's parameter-free BatchNorm (the features
# standardised with the training split's statistics). 90 epochs as lightly's default: on cached
# features of a few hundred images they take well under a second.
PROBE_EPOCHS = 90
PROBE_BATCH = 256
PROBE_BASE_LR = 0.1


def linear_probe(train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor, num_classes: int,
                 seed: int = 0, epochs: int = PROBE_EPOCHS) -> dict[str, float]:
    """Top-1 / top-5 (%) on val of a linear classifier trained on frozen train features."""
    mean, std = train_x.mean(dim=0), train_x.std(dim=0, unbiased=False) + 1e-6
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
    generator = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(train_x.shape[1], num_classes)
    with torch.no_grad():  # the Linear's own init, drawn from our generator (no global RNG)
        bound = 1 / math.sqrt(train_x.shape[1])
        head.weight.uniform_(-bound, bound, generator=generator)
        head.bias.uniform_(-bound, bound, generator=generator)
    batch = min(PROBE_BATCH, len(train_x))
    lr = PROBE_BASE_LR * batch / 256
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(train_x) / batch)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    for _ in range(epochs):
        order = torch.randperm(len(train_x), generator=generator)
        for start in range(0, len(order), batch):
            index = order[start:start + batch]
            loss = F.cross_entropy(head(train_x[index]), train_y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    with torch.no_grad():
        ranked = head(val_x).argsort(dim=1, descending=True)
    return {"top1": topk_accuracy(ranked, val_y, 1),
            "top5": topk_accuracy(ranked, val_y, min(5, num_classes)), "epochs": epochs}
