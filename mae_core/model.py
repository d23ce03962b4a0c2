"""The Masked Autoencoder: a timm ViT encoder in lightly's MAE modules, and its parameter policies.

:class:`MaskedAutoencoder` is the plain ``nn.Module`` (training, the parameter audit and
reconstruction all use it); :class:`MAELightning` adds the MAE paper's optimiser and schedule.

Example:
    >>> model = MaskedAutoencoder(ModelConfig(image_size=32, patch_size=8))
    >>> images = torch.rand(2, 3, 32, 32)
    >>> idx_keep, idx_mask = draw_token_mask(2, model.cfg.num_patches, 0.75)
    >>> model.loss(images, idx_keep, idx_mask).shape
    torch.Size([])
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
from dataclasses import asdict
from typing import Any

import pytorch_lightning as pl
import timm
import torch
import torch.nn.functional as F
from lightly.models import utils
from lightly.models.modules import (
    MaskedVisionTransformerDecoderTIMM,
    MaskedVisionTransformerTIMM,
)
from lightly.models.modules.masked_vision_transformer_timm import init_weights
from lightly.transforms.utils import IMAGENET_NORMALIZE
from timm.optim import param_groups_weight_decay
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from mae_core.config import POLICIES, ModelConfig, TrainConfig, parse_stats


def create_vit(cfg: ModelConfig) -> nn.Module:
    """The timm ViT of ``cfg`` (its preset's, or ``timm_model``) exactly as its constructor makes it
    (head included), no download."""
    return timm.create_model(cfg.encoder_name, pretrained=False, img_size=cfg.image_size,
                             patch_size=cfg.patch_size, in_chans=cfg.channels)


def pixel_stats(cfg: ModelConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The per-channel (mean, std) the model normalises with, as fractions of full scale: the
    config's own statistics (``normalize: dataset``, stored with the run), else ImageNet's for 3
    channels, else 0.5 ± 0.25 (a model built before its data set's statistics are known)."""
    mean, std = parse_stats(cfg.pixel_mean, "pixel_mean"), parse_stats(cfg.pixel_std, "pixel_std")
    if mean:
        return mean, std
    if cfg.channels == 3 and cfg.normalize != "dataset":
        return tuple(IMAGENET_NORMALIZE["mean"]), tuple(IMAGENET_NORMALIZE["std"])
    return (0.5,) * cfg.channels, (0.25,) * cfg.channels


def adamw(params: Any, lr: float, device: torch.device) -> torch.optim.AdamW:
    """The MAE paper's AdamW (betas 0.9, 0.95), fused into one kernel where PyTorch has one.

    Fused on the CPU too: measured on the 2-core machine, one AdamW step of vit-small took 50 ms
    fused against 225 ms with the default multi-tensor loop (vit-tiny 14 against 50 ms), up to a
    sixth of a whole training step.
    """
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95),
                             fused=torch.device(device).type in ("cuda", "cpu"))


def training_attention(device: torch.device) -> contextlib.AbstractContextManager:
    """The attention kernel a training step on ``device`` should use under the autocast in force.

    On the CPU in bf16, PyTorch's flash-attention backward is the slowest op of an MAE step (43% of
    a vit-tiny step at 64 px, 11 ms per call against 2 ms in fp32); the plain math kernel (bf16
    matmuls and a softmax) is much faster at MAE's short sequences: 220 against 320 ms per step.
    Everywhere else the default choice stands.
    """
    if (torch.device(device).type == "cpu" and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16):
        return sdpa_kernel([SDPBackend.MATH])
    return contextlib.nullcontext()


def apply_policy(model: MaskedAutoencoder, policy: str) -> None:
    """Make the tensors that MAE pretraining never uses non-trainable (``ddp-clean``), or not.

    ``ddp-clean``: the classifier head is removed (``reset_classifier(0)`` keeps the pooling, so the
    backbone still returns one embedding per image) and the encoder mask token is frozen: MAE drops
    masked patches instead of replacing them, so it never reaches the loss. So is ``fc_norm``, where
    the ViT has one (average-pooling ViTs: ``beit3_*``, ``eva_large_*``): it norms only the pooled
    classification output. The sin-cos position embedding is already fixed by lightly. With these,
    plain DDP (``find_unused_parameters=False``) works. ``reference`` keeps the constructors'
    defaults: the naive recipe that needs ``ddp_find_unused_parameters_true``.
    """
    vit = model.backbone.vit
    vit.pos_embed.requires_grad_(False)
    if policy == "ddp-clean":
        vit.reset_classifier(0)
        model.backbone.mask_token.requires_grad_(False)
        # Frozen, not removed: the exported encoder keeps timm's keys, so it still loads with
        # only the head missing. (Those ViTs' final ``norm`` is an Identity: lightly's encode(),
        # which ends there, never reaches ``fc_norm``.)
        fc_norm = getattr(vit, "fc_norm", None)
        if isinstance(fc_norm, nn.Module):
            fc_norm.requires_grad_(False)
    elif policy != "reference":
        raise ValueError(f"policy: unknown parameter policy {policy!r} (choose one of "
                         f"{', '.join(POLICIES)})")


def draw_token_mask(batch_size: int, num_patches: int, mask_ratio: float,
                    generator: torch.Generator | None = None,
                    device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """``lightly.models.utils.random_token_mask`` drawn from an explicit generator.

    Same convention as lightly: indices count the class token as position 0, which is always
    kept. At least one patch is kept and at least one is masked. The same generator seed gives
    the same mask, so checkpoints can be compared on identical masks.
    """
    num_keep = min(max(1, int(num_patches * (1 - mask_ratio))), num_patches - 1)
    if generator is not None:
        device = generator.device
    noise = torch.rand(batch_size, num_patches, generator=generator, device=device)
    order = noise.argsort(dim=1) + 1
    class_token = torch.zeros(batch_size, 1, dtype=order.dtype, device=order.device)
    idx_keep = torch.cat([class_token, order[:, :num_keep]], dim=1)
    return idx_keep, order[:, num_keep:]


def seeded_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def warmup_cosine(step: int, warmup: int, total: int, start_factor: float = 1e-3) -> float:
    """The lr factor at ``step``: linear warm-up from ``start_factor`` over ``warmup`` steps, then
    a cosine decay to 0 at ``total`` (the MAE paper's schedule, per optimizer step)."""
    if step < warmup:
        return start_factor + (1 - start_factor) * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1 + math.cos(math.pi * progress))


def batch_images(batch: Any) -> Tensor:
    """The images of a training batch: the batch itself where it is a tensor (this project's
    loader), else its first item, and of that the first view where it is a list of views.

    lightly's recipe (``LightlyDataset`` with ``MAETransform``) yields ``(views, targets,
    filenames)`` with ``views`` a list of one tensor per view; MAE trains on the first, as lightly's
    own examples do (``views = batch[0]; images = views[0]``). A torchvision ``(images, labels)``
    batch gives its images.
    """
    if isinstance(batch, (list, tuple)) and batch:
        batch = batch[0]
        if isinstance(batch, (list, tuple)) and batch:
            batch = batch[0]
    if not isinstance(batch, Tensor):
        raise TypeError(f"a training batch must be images (B, C, H, W) or lightly's (views, "
                        f"targets, filenames), got {type(batch).__name__}")
    return batch


class MaskedAutoencoder(nn.Module):
    """MAE (He et al., 2021): encode the visible 25% of patches, decode all, predict the masked pixels.

    Built from lightly's ``MaskedVisionTransformerTIMM`` (encoder) and
    ``MaskedVisionTransformerDecoderTIMM`` (decoder), with our own decoder embedding and pixel
    prediction layers around the decoder. ``policy=None`` leaves the model as the constructors made
    it (the parameter audit compares against that).
    """

    def __init__(self, cfg: ModelConfig, policy: str | None = "default") -> None:
        super().__init__()
        self.cfg = cfg
        vit = create_vit(cfg)
        self.backbone = MaskedVisionTransformerTIMM(vit=vit)
        decoder = cfg.decoder()
        self.decoder_embed = nn.Linear(vit.embed_dim, decoder.dim)
        self.decoder = MaskedVisionTransformerDecoderTIMM(
            num_patches=vit.patch_embed.num_patches, embed_dim=decoder.dim, depth=decoder.depth,
            num_heads=decoder.heads, num_prefix_tokens=vit.num_prefix_tokens)
        self.prediction_head = nn.Linear(decoder.dim, cfg.patch_size**2 * cfg.channels)
        self.decoder_embed.apply(init_weights)
        self.prediction_head.apply(init_weights)
        # Not in the state dict: the config (config.yaml, the weights file's metadata) holds them.
        mean, std = pixel_stats(cfg)
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        if policy is not None:
            apply_policy(self, cfg.policy if policy == "default" else policy)

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.backbone.vit.num_prefix_tokens)

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 or uint16 (B, C, H, W) images → float, as fractions of full scale (255 or 65535:
        16-bit values keep their precision) normalised with :func:`pixel_stats`."""
        full_scale = 65535.0 if images.dtype == torch.uint16 else 255.0
        return (images.float() / full_scale - self.pixel_mean) / self.pixel_std

    def denormalize(self, images: Tensor) -> Tensor:
        return (images * self.pixel_std + self.pixel_mean).clamp(0, 1)

    def decode(self, images: Tensor, idx_keep: Tensor, idx_mask: Tensor | None) -> Tensor:
        """Pixel predictions (B, n, patch²·C) for the tokens in ``idx_mask``, or all patches if None."""
        encoded = self.backbone.encode(images, idx_keep=idx_keep)
        tokens = utils.repeat_token(self.decoder.mask_token,
                                    (images.shape[0], self.decoder.sequence_length))
        tokens = utils.set_at_index(tokens, idx_keep, self.decoder_embed(encoded).type_as(tokens))
        decoded = self.decoder(tokens)
        if idx_mask is None:
            decoded = decoded[:, self.num_prefix_tokens:]
        else:
            decoded = utils.get_at_index(decoded, idx_mask)
        return self.prediction_head(decoded)

    def targets(self, images: Tensor) -> Tensor:
        """Every patch's pixels (B, N, patch²·C), per-patch normalised when ``norm_pix_loss``."""
        patches = utils.patchify(images, self.cfg.patch_size)
        return utils.normalize_mean_var(patches, dim=-1) if self.cfg.norm_pix_loss else patches

    def loss(self, images: Tensor, idx_keep: Tensor, idx_mask: Tensor) -> Tensor:
        """Mean squared error on the masked patches only, as in the MAE paper."""
        prediction = self.decode(images, idx_keep, idx_mask)
        target = utils.get_at_index(self.targets(images), idx_mask - self.num_prefix_tokens)
        return F.mse_loss(prediction.float(), target.float())


class MAELightning(pl.LightningModule):
    """Trains :class:`MaskedAutoencoder` the MAE paper's way.

    AdamW with betas (0.9, 0.95) and weight decay on weights only (not norms, biases, tokens), the
    learning rate scaled by the effective batch, linear warm-up then per-step cosine decay.
    Batches arrive as uint8 images and are normalised on the device (float batches are taken
    as already normalised), or as lightly's ``(views, targets, filenames)``, whose first view is
    trained on (:func:`batch_images`).
    """

    def __init__(self, model: dict[str, Any], lr: float,
                 weight_decay: float = TrainConfig.weight_decay,
                 warmup_fraction: float = TrainConfig.warmup_fraction,
                 seed: int = TrainConfig.seed, compile: bool = TrainConfig.compile) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.cfg = ModelConfig(**model)
        self.mae = MaskedAutoencoder(self.cfg)
        self._forward_loss = torch.compile(self.mae.loss) if compile else self.mae.loss
        self._mask_generator: torch.Generator | None = None
        self._epoch_loss = EpochLoss()

    @classmethod
    def from_config(cls, run_cfg: Any) -> MAELightning:
        t = run_cfg.train
        return cls(model=asdict(run_cfg.model), lr=t.learning_rate(), weight_decay=t.weight_decay,
                   warmup_fraction=t.warmup_fraction, seed=t.seed, compile=t.compile)

    def on_train_start(self) -> None:
        # Each rank draws its own masks; resuming re-seeds from the step so masks don't repeat.
        # (on_train_start, not on_fit_start: Lightning restores the step counter in between.)
        # The generator lives on the training device, so masks are drawn there: no host copy.
        seed = self.hparams.seed * 1_000_003 + self.global_rank * 10_007 + self.global_step
        self._mask_generator = seeded_generator(seed, self.device)
        # The loader's crops and flips too: seed_everything leaves every rank with the same Python
        # and torch random states, so without loader workers (the CPU default) rank 1 cropped and
        # flipped its images exactly as rank 0 did, step after step. (Lightning seeds worker
        # processes per rank itself.) Offset: not the masks' stream on a CPU run.
        random.seed(seed + 500_000_003)
        torch.manual_seed(seed + 500_000_003)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Tensor:
        # uint8 batches (this project's loader) are normalised here, on the device; float batches
        # come already normalised (lightly's MAETransform in the common recipe) and pass unchanged.
        images = batch_images(batch)
        return images if images.is_floating_point() else self.mae.normalize(images)

    def training_step(self, images: Tensor, batch_idx: int) -> Tensor:
        idx_keep, idx_mask = draw_token_mask(images.shape[0], self.cfg.num_patches,
                                             self.cfg.mask_ratio, self._mask_generator)
        with training_attention(images.device):
            loss = self._forward_loss(images, idx_keep, idx_mask)
        # The per-step curve is rank 0's loss (no extra communication every step); the epoch
        # summary in metrics.jsonl is the mean over every step of every rank.
        self._epoch_loss.add(loss.detach(), self.current_epoch)
        return loss

    def on_train_epoch_end(self) -> None:
        total, count = self._epoch_loss.global_sums(self.trainer.strategy, self.device,
                                                    self.current_epoch)
        # A stop mid-epoch leaves the epoch's line to its resume, which carries the sums on from
        # the stop's checkpoint: one line per epoch, over all its steps. (Lightning's own epoch
        # aggregate is not in its checkpoints: a stop and resume wrote two partial lines.)
        stopped_mid_epoch = (self.trainer.should_stop
                             and not self.trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)
        if count and not stopped_mid_epoch:
            # The same value on every rank: sync_dist only keeps Lightning from warning.
            self.log("epoch_loss", total / count, on_step=False, on_epoch=True, sync_dist=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Every rank saves (Lightning's save is collective), so the reduction here is safe.
        total, count = self._epoch_loss.global_sums(self.trainer.strategy, self.device,
                                                    self.current_epoch)
        checkpoint[EPOCH_LOSS_KEY] = {"epoch": self.current_epoch, "total": total, "count": count}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        world_size = self._trainer.world_size if self._trainer is not None else 1
        self._epoch_loss = EpochLoss.restored(checkpoint.get(EPOCH_LOSS_KEY), world_size)

    def configure_optimizers(self) -> Any:
        groups = param_groups_weight_decay(
            self.mae, self.hparams.weight_decay,
            no_weight_decay_list=("*cls_token", "*pos_embed", "*mask_token"))
        optimizer = adamw(groups, self.hparams.lr, self.device)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = min(total - 1, int(total * self.hparams.warmup_fraction))
        # One LambdaLR whatever the warm-up: its state is only the step, so a run resumed with a
        # new max_steps (a new warm-up and cosine length) continues from its step. (A SequentialLR
        # of LinearLR + cosine cannot load the state of a run that had no warm-up, and the reverse.)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, functools.partial(warmup_cosine, warmup=warmup, total=total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


EPOCH_LOSS_KEY = "mae_studio_epoch_loss"


class EpochLoss:
    """The running sum and count of one rank's step losses in one epoch.

    The sum stays on the device (no host sync per step). A checkpoint keeps the sums over every
    rank; a resumed rank starts from its share of them, so a resume on another number of
    processes keeps the same epoch mean.
    """

    def __init__(self, epoch: int = -1, total: float = 0.0, count: float = 0.0) -> None:
        self.epoch = epoch
        self.total: Tensor | float = total
        self.count = count

    def add(self, loss: Tensor, epoch: int) -> None:
        if epoch != self.epoch:  # the first step of an epoch
            self.epoch, self.total, self.count = epoch, 0.0, 0.0
        self.total = self.total + loss.float()
        self.count += 1

    def global_sums(self, strategy: Any, device: torch.device, epoch: int) -> tuple[float, float]:
        """The sum and count over every rank for ``epoch`` (collective: every rank calls it)."""
        mine = (self.total, self.count) if epoch == self.epoch else (0.0, 0.0)
        # On the training device whatever the sum holds (NCCL reduces device tensors only).
        local = torch.stack([torch.as_tensor(value, dtype=torch.float64, device=device)
                             for value in mine])
        total, count = strategy.reduce(local, reduce_op="sum").tolist()
        return total, count

    @classmethod
    def restored(cls, state: dict[str, float] | None, world_size: int) -> EpochLoss:
        if not state:  # a checkpoint from before the epoch sums were kept
            return cls()
        return cls(int(state["epoch"]), state["total"] / world_size, state["count"] / world_size)
