"""Does the encoder learn? A held-out validation loss and a kNN monitor, every N training steps.

:func:`plan_evaluation` decides, from the config alone, which images are held out of training
(a seeded split of the data folder, identical on every rank) and which labelled images the kNN
monitor uses (the data folder's class subfolders, or the separate ``eval_data`` folder).
:class:`HeldOutMonitor` is the trainer callback that evaluates them:

- ``val_loss``: the MAE loss of the held-out images, centre-cropped and masked with a fixed seed,
  so two evaluations differ only by the weights. Every rank scores its share; the sums are
  all-reduced.
- ``knn_top1`` / ``knn_top5`` and their variants ``knn_{cls,mean}_k{20,200}_top{1,5}``: the
  encoder (no masking) embeds a bounded bank (training part) and query set (held-out part); the
  class token and the mean patch token are each scored with lightly's ``knn_predict`` (cosine
  similarity, temperature 0.07, k = 20 and 200 capped by the bank size, as lightly's ViT
  benchmarks). Features are all-gathered, so every rank scores the same full sets. The headline
  ``knn_top1``/``knn_top5`` is Evaluate's: the mean patch token at k = 20
  (:data:`mae_core.metrics.HEADLINE_KNN_K`).

An ``eval_data`` folder none of whose bank (or query) headers read is refused before the run. When
images still fail to decode in the run, the figure they would make is left out, said once in
train.log, and the run goes on.

A callback rather than Lightning's validation loop: the loop counts batches, not optimizer steps
(``val_check_interval`` with gradient accumulation and 4-step epochs of a repeated small folder
drifts from the steps the curve, checkpoints and previews use), runs sanity checks and
epoch-end hooks, and has no place for a bank + query pass. Here evaluation is keyed to
``global_step`` like every other step-keyed callback, and the line reaches ``metrics.jsonl``
before that step's checkpoint.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from mae_core import features
from mae_core.callbacks import EveryNSteps
from mae_core.loggers import board_scalars, tensorboard
from mae_core.checks import shown
from mae_core.config import AUTO_VAL_FRACTION, AUTO_VAL_MIN_IMAGES, TrainConfig
from mae_core.data import DataError, find_images
from mae_core.splits import HeldOutSplit, class_labels, fixed_crops, split_folder
from mae_core.features import knn_accuracy
from mae_core.fileio import append_line
from mae_core.metrics import HEADLINE_KNN_K
from mae_core.images import ImageError
from mae_core.model import MaskedAutoencoder, draw_token_mask, seeded_generator
from mae_core.pixels import probe, readable_as

# The validation masks' seed: fixed, so every evaluation of a run masks the same patches.
VAL_MASK_SEED = 1234
KNN_K = features.KNN_KS
FEATURES = ("cls", "mean")
# A separate eval_data folder without val_fraction holds out this share as the kNN query set.
EVAL_FOLDER_FRACTION = 0.2


@dataclass(frozen=True)
class EvalPlan:
    """What one run evaluates; the same on every rank (a function of the config and the files).

    ``train`` is the data folder's training part, or None when nothing is held out (train on all).
    """

    train: tuple[str, ...] | None = None
    val: tuple[str, ...] = ()
    bank: tuple[str, ...] = ()
    bank_labels: tuple[int, ...] = ()
    query: tuple[str, ...] = ()
    query_labels: tuple[int, ...] = ()
    classes: tuple[str, ...] = ()

    @property
    def knn(self) -> bool:
        return bool(self.bank and self.query and len(self.classes) >= 2)

    @property
    def active(self) -> bool:
        return bool(self.val) or self.knn

    def describe(self) -> str:
        parts = [f"validation loss on {len(self.val)} held-out images" if self.val
                 else "no validation loss (nothing held out)"]
        if self.knn:
            parts.append(f"kNN on {len(self.query)} queries against a bank of {len(self.bank)} "
                         f"({len(self.classes)} classes)")
        else:
            parts.append("no kNN monitor (no class subfolders)")
        return "; ".join(parts)


def plan_evaluation(t: TrainConfig, split_data: bool = True,
                    paths: tuple[str, ...] = (), channels: int | None = None) -> EvalPlan:
    """The held-out split of ``t.data`` and the kNN sets; a :class:`DataError` when impossible.

    ``split_data=False`` (a prepared or streamed data set, trained whole) holds nothing out of
    ``t.data``: no validation loss, and a kNN monitor only from ``eval_data``. ``paths``:
    ``t.data``'s image files when the caller has them (``check_data``'s), not to walk it again.
    ``channels``: the model's, when known; ``eval_data`` images it cannot read are then refused
    too (:func:`_check_readable`).
    """
    if t.eval_every_n_steps == 0:
        return EvalPlan()
    split = (split_folder(t.data, t.seed, count=t.val_count, fraction=t.val_fraction,
                          auto_min_images=AUTO_VAL_MIN_IMAGES, auto_fraction=AUTO_VAL_FRACTION,
                          paths=paths)
             if split_data else HeldOutSplit(train=(), held_out=()))
    limit = t.eval_max_images
    plan = {"train": split.train if split.held_out else None, "val": split.held_out[:limit]}
    if t.eval_data:
        try:
            found = tuple(find_images(t.eval_data))
            # Classes first: a folder of 3 unlabelled images was told to hold out fewer of them.
            if class_labels(t.eval_data, list(found)) is None:
                raise DataError(f"{shown(t.eval_data)} needs class subfolders (folder/<class>/"
                                "*.jpg, at least two classes, no images directly in the folder)")
            labelled = split_folder(t.eval_data, t.seed, paths=found,
                                    fraction=t.val_fraction or EVAL_FOLDER_FRACTION)
        except DataError as err:  # "data folder ... does not exist" would name the wrong field
            if err.field in ("val_count", "val_fraction"):  # its split: bank and queries
                raise DataError(f"eval_data: {shown(t.eval_data)} holds {len(found)} images, too "
                                "few for a kNN bank and its held-out queries: add images",
                                "eval_data") from None
            raise DataError(f"eval_data: {err}", "eval_data") from None
    elif split.labelled and split.held_out:
        labelled = split
    else:
        return EvalPlan(**plan)
    bank, bank_labels = _subset(labelled.train, labelled.train_labels, limit, t.seed)
    if t.eval_data:
        _check_readable(t.eval_data, {"in its kNN bank": bank,
                                      "held out as kNN queries": labelled.held_out[:limit]},
                        channels)
    return EvalPlan(**plan, bank=bank, bank_labels=bank_labels,
                    query=labelled.held_out[:limit], query_labels=labelled.held_out_labels[:limit],
                    classes=labelled.classes)


def no_evaluation_note(t: TrainConfig, kind: str, files: int | None) -> str | None:
    """Why a run on a folder of its own evaluates nothing, when that is the small-folder default:
    such a run (60 labelled images) trained with no validation loss and no kNN monitor, saying
    nothing, though README's labelled-folder example holds 10 % out."""
    if (not t.data or t.eval_data or kind != "memory" or t.eval_every_n_steps == 0
            or t.val_count is not None or t.val_fraction is not None
            or files is None or files >= AUTO_VAL_MIN_IMAGES):
        return None
    return (f"held-out evaluation: none ({files:,} images, fewer than the {AUTO_VAL_MIN_IMAGES:,} "
            f"from which {AUTO_VAL_FRACTION:.0%} is held out by default): --val-count N or "
            "--val-fraction F (the form's held-out images or share) holds images out for a "
            "validation loss and, with class subfolders, the kNN monitor")


def _check_readable(folder: str, parts: dict[str, tuple[str, ...]], channels: int | None) -> None:
    """Refuses an ``eval_data`` folder when one of its ``parts`` has no image whose header reads
    (as ``channels`` channels, when known): its kNN monitor would have nothing to score. Headers
    only, and only until one reads: cheap. A file whose pixels are damaged behind a good header
    is skipped by the monitor itself."""
    kind = f" as {channels}-channel images" if channels else ""
    causes = "corrupt, not images, or of another channel count" if channels else \
        "corrupt or not images"
    for part, paths in parts.items():
        if paths and not any(_header_reads(path, channels) for path in paths):
            raise DataError(f"eval_data {shown(folder)}: none of the {len(paths)} images {part} "
                            f"can be read{kind} ({causes}), so the kNN monitor would have "
                            "nothing to score: put readable images in its class subfolders",
                            "eval_data")


def _header_reads(path: Path, channels: int | None) -> bool:
    try:
        fmt = probe(path)
    except ImageError:
        return False
    return channels is None or readable_as(fmt, channels)


def _subset(paths: tuple[str, ...], labels: tuple[int, ...], limit: int, seed: int
            ) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """At most ``limit`` of ``paths`` (with their labels), drawn at random with ``seed``: a
    prefix of the sorted list would hold only the first classes."""
    if len(paths) <= limit:
        return paths, labels
    order = sorted(torch.randperm(len(paths), generator=torch.Generator().manual_seed(seed + 1))
                   [:limit].tolist())
    return tuple(paths[i] for i in order), tuple(labels[i] for i in order)


def knn_scores(query: Tensor, query_labels: Tensor, bank: Tensor, bank_labels: Tensor,
               num_classes: int, prefix: str) -> dict[str, float]:
    """Top-1 and top-5 accuracy (fractions) of lightly's ``knn_predict`` for k in :data:`KNN_K`,
    as :func:`mae_core.features.knn_accuracy` scores them offline.

    Args:
        query: (Q, D) features; bank: (N, D) features (normalised there).
        query_labels: (Q,) and bank_labels: (N,) class indices.
    """
    scores = {}
    for k in KNN_K:
        result = knn_accuracy(query.float(), bank.float(), bank_labels, query_labels, num_classes,
                              k=k)
        scores[f"{prefix}_k{k}_top1"] = result["top1"] / 100
        scores[f"{prefix}_k{k}_top5"] = result["top5"] / 100
    return scores


def embed(mae: MaskedAutoencoder, images: Tensor, batch_size: int) -> tuple[Tensor, Tensor]:
    """(class token, mean patch token) features on the training device (gathered across ranks)."""
    return features.embed(mae, images, batch_size, on_cpu=False)


class _Share:
    """One rank's part of an image list: its decoded crops and their places in the full list."""

    def __init__(self, paths: tuple[str, ...], image_size: int, rank: int, world: int,
                 channels: int = 3) -> None:
        positions = list(range(rank, len(paths), world))
        self.images, kept = fixed_crops([paths[i] for i in positions], image_size, channels)
        self.positions = [positions[i] for i in kept]
        self.per_rank = math.ceil(len(paths) / world)  # the same on every rank: gather's size


class HeldOutMonitor(EveryNSteps):
    """Evaluates an :class:`EvalPlan` at step 0, every ``every_n_steps`` and at the end; rank 0
    appends ``{"step", "epoch", "val_loss", "knn_*"}`` to ``metrics.jsonl`` and TensorBoard.

    ``recorder`` (the run's ProgressRecorder) is told the evaluation's duration, so it does not
    count against the next step's throughput.
    """

    def __init__(self, plan: EvalPlan, metrics_path: Path, every_n_steps: int, batch_size: int,
                 recorder: Any | None = None) -> None:
        self.plan = plan
        self.metrics_path = metrics_path
        self.every_n_steps = every_n_steps
        self.batch_size = batch_size
        self.recorder = recorder
        self.last_row: dict[str, Any] | None = None
        self._evaluated_step: int | None = None
        self.val = self.bank = self.query = None  # this rank's shares, decoded in setup
        self._told: set[str] = set()  # the skips already said in train.log

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        size, rank, world = pl_module.cfg.image_size, trainer.global_rank, trainer.world_size
        channels = pl_module.cfg.channels
        self.val = _Share(self.plan.val, size, rank, world, channels)
        self.bank = _Share(self.plan.bank, size, rank, world, channels)
        self.query = _Share(self.plan.query, size, rank, world, channels)
        cfg = pl_module.cfg  # one mask per held-out image, drawn once for the whole list
        idx_keep, idx_mask = draw_token_mask(len(self.plan.val), cfg.num_patches, cfg.mask_ratio,
                                             seeded_generator(VAL_MASK_SEED))
        self.val_keep, self.val_mask = idx_keep[self.val.positions], idx_mask[self.val.positions]
        if trainer.is_global_zero:
            print(f"held-out evaluation every {self.every_n_steps} steps: {self.plan.describe()}",
                  flush=True)

    def act(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.run(trainer, pl_module)  # step 0: the freshly initialised encoder, the baseline

    def done_at(self, step: int) -> bool:
        return self._evaluated_step == step

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Evaluate on every rank (collectives inside), then write the line on rank 0."""
        started = time.perf_counter()
        mae: MaskedAutoencoder = pl_module.mae
        was_training = mae.training
        mae.eval()
        try:
            with torch.no_grad(), trainer.strategy.precision_plugin.forward_context():
                row: dict[str, Any] = {"step": trainer.global_step, "epoch": trainer.current_epoch}
                if self.plan.val:
                    val_loss = self._val_loss(trainer, mae)
                    if val_loss is not None:
                        row["val_loss"] = val_loss
                if self.plan.knn:
                    row.update(self._knn(trainer, mae))
        finally:
            mae.train(was_training)
        self._evaluated_step = trainer.global_step
        row["eval_s"] = time.perf_counter() - started
        self.last_row = row
        if trainer.is_global_zero:
            if self.recorder is not None:  # its pending step lines first: the file stays in step order
                self.recorder.flush(trainer)
            append_line(self.metrics_path, json.dumps(row))
            board = tensorboard(trainer)
            if board is not None:
                board_scalars(board, row)
        if self.recorder is not None:
            self.recorder.exclude_time(time.perf_counter() - started)

    def _skipped(self, trainer: pl.Trainer, what: str, why: str) -> None:
        """Says once in train.log (rank 0's output) that ``what`` is left out of the evaluations:
        images that cannot be read end a metric, not the run."""
        if trainer.is_global_zero and what not in self._told:
            print(f"held-out evaluation: no {what} ({why}); the run goes on without it",
                  flush=True)
        self._told.add(what)

    def _val_loss(self, trainer: pl.Trainer, mae: MaskedAutoencoder) -> float | None:
        """The mean masked-patch loss over every rank's held-out images (sums all-reduced), or
        None when none of them could be read."""
        device = mae.pixel_mean.device
        total = torch.zeros(2, dtype=torch.float64, device=device)  # (loss sum, images)
        for start in range(0, len(self.val.images), self.batch_size):
            stop = start + self.batch_size
            images = mae.normalize(self.val.images[start:stop].to(device))
            # Every image masks the same number of patches: a batch's mean × its size sums them.
            loss = mae.loss(images, self.val_keep[start:stop].to(device),
                            self.val_mask[start:stop].to(device))
            total += torch.stack([loss.double() * len(images),
                                  torch.tensor(float(len(images)), dtype=torch.float64,
                                               device=device)])
        total = trainer.strategy.reduce(total, reduce_op="sum")
        if total[1].item() == 0:
            self._skipped(trainer, "validation loss", f"none of the {len(self.plan.val)} held-out "
                          "images could be read")
            return None
        return (total[0] / total[1]).item()

    def _knn(self, trainer: pl.Trainer, mae: MaskedAutoencoder) -> dict[str, float]:
        """kNN accuracies over the full (gathered) bank and query sets."""
        bank = self._gathered(trainer, mae, self.bank, self.plan.bank_labels)
        query = self._gathered(trainer, mae, self.query, self.plan.query_labels)
        # Gathered: every rank sees the same counts, so all skip together.
        unread = [f"none of the {len(paths)} {part} images could be read"
                  for part, paths, got in (("bank", self.plan.bank, bank),
                                           ("query", self.plan.query, query)) if len(got[2]) == 0]
        if unread:
            self._skipped(trainer, "kNN accuracy", " and ".join(unread) + " (corrupt, or of "
                          "another channel count than the model's)")
            return {}
        scores: dict[str, float] = {}
        for i, name in enumerate(FEATURES):
            scores.update(knn_scores(query[i], query[2], bank[i], bank[2], len(self.plan.classes),
                                     f"knn_{name}"))
        scores["knn_top1"] = scores[f"knn_mean_k{HEADLINE_KNN_K}_top1"]
        scores["knn_top5"] = scores[f"knn_mean_k{HEADLINE_KNN_K}_top5"]
        return scores

    def _gathered(self, trainer: pl.Trainer, mae: MaskedAutoencoder, share: _Share,
                  labels: tuple[int, ...]) -> tuple[Tensor, Tensor, Tensor]:
        """(cls, mean, labels) of the whole list: each rank embeds its share, padded to the same
        length (label -1) for all_gather, and the padding is dropped after."""
        cls, mean = embed(mae, share.images, self.batch_size)
        device = cls.device
        own = torch.full((share.per_rank,), -1, dtype=torch.long, device=device)
        own[:len(share.positions)] = torch.tensor([labels[p] for p in share.positions],
                                                  dtype=torch.long, device=device)
        padded = [torch.cat([x, x.new_zeros(share.per_rank - len(x), x.shape[1])])
                  for x in (cls, mean)]
        gathered = [self._all_gather(trainer, x) for x in (*padded, own)]
        cls_all, mean_all, labels_all = (g.reshape(-1, *g.shape[2:]) for g in gathered)
        valid = labels_all >= 0
        return cls_all[valid], mean_all[valid], labels_all[valid]

    @staticmethod
    def _all_gather(trainer: pl.Trainer, tensor: Tensor) -> Tensor:
        """(world, ...) on every strategy (one process: the tensor alone).

        torch.distributed's own all_gather, not the strategy's: Lightning's goes through
        ``torch.distributed.nn.functional.all_gather`` (for gradients, which features under
        no_grad have none of), deprecated in torch, and every rank printed the warning into
        the terminal and train.log at the first kNN evaluation."""
        if trainer.world_size == 1 or not torch.distributed.is_initialized():
            return tensor.unsqueeze(0)
        parts = [torch.empty_like(tensor) for _ in range(trainer.world_size)]
        torch.distributed.all_gather(parts, tensor.contiguous())
        return torch.stack(parts)
