"""The model itself: the ddp-clean policy keeps the backbone usable, masks are reproducible, the loss is right."""

from __future__ import annotations

import dataclasses
import functools
import math

import pytest
import pytorch_lightning as pl
import torch
from lightly.data import LightlyDataset
from lightly.models import utils as lightly_utils
from lightly.transforms import MAETransform
from torch import nn

from mae_core.config import ModelConfig
from mae_core.data import MAEDataModule, sample_photo_paths
from mae_core.model import (
    MAELightning,
    MaskedAutoencoder,
    create_vit,
    draw_token_mask,
    seeded_generator,
    training_attention,
)
from tests.helpers import SYNC_OPS, TensorCalls

SMALL = ModelConfig(preset="vit-tiny", image_size=32, patch_size=8,  # 16 patches, embed 192
                    norm_pix_loss=True)


def _images(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=seeded_generator(seed))


# --- the reset_classifier(0, "") trap --------------------------------------------------------------

def test_ddp_clean_removes_head_but_keeps_pooled_backbone_output():
    torch.manual_seed(0)
    model = MaskedAutoencoder(SMALL).eval()  # policy ddp-clean
    vit = model.backbone.vit
    assert vit.global_pool == "token"
    assert vit.num_classes == 0 and isinstance(vit.head, nn.Identity)
    assert not any(name.startswith("backbone.vit.head.") for name, _ in model.named_parameters())
    with torch.no_grad():
        out = vit(_images(3, 32))
    assert out.shape == (3, 192)  # one embedding per image, not one per token
    # It is the class token after the final norm (what a fine-tuning head would read).
    with torch.no_grad():
        tokens = vit.forward_features(_images(3, 32))
    torch.testing.assert_close(out, tokens[:, 0])


def test_reference_policy_keeps_the_constructors_classifier_head():
    torch.manual_seed(0)
    model = MaskedAutoencoder(ModelConfig(image_size=32, patch_size=8, policy="reference")).eval()
    with torch.no_grad():
        assert model.backbone.vit(_images(2, 32)).shape == (2, 1000)


def test_reset_classifier_with_empty_pool_would_break_the_backbone_output():
    """Why apply_policy must call ``reset_classifier(0)``, not ``reset_classifier(0, "")``."""
    vit = create_vit(SMALL).eval()
    vit.reset_classifier(0, "")
    assert vit.global_pool == ""
    with torch.no_grad():
        out = vit(_images(2, 32))
    # (B, L, D): every token (class token + 16 patches) instead of one pooled embedding per image.
    assert out.shape == (2, SMALL.num_patches + 1, 192)


# --- frozen tensors are what the policy says they are -----------------------------------------------

def test_frozen_tensors_are_fixed_sincos_and_zero_mask_token():
    model = MaskedAutoencoder(SMALL)
    grid = SMALL.image_size // SMALL.patch_size
    for pos_embed in (model.backbone.vit.pos_embed, model.decoder.pos_embed):
        assert not pos_embed.requires_grad
        expected = torch.from_numpy(lightly_utils.get_2d_sine_cosine_positional_embedding(
            embed_dim=pos_embed.shape[-1], grid_size=grid, cls_token=True)).float()
        torch.testing.assert_close(pos_embed.detach()[0], expected, rtol=0, atol=0)
    mask_token = model.backbone.mask_token
    assert not mask_token.requires_grad
    assert torch.count_nonzero(mask_token) == 0
    # The decoder mask token is used (it stands in for masked patches): trainable and random.
    assert model.decoder.mask_token.requires_grad
    assert torch.count_nonzero(model.decoder.mask_token) > 0


# --- masks ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_patches, mask_ratio, num_keep", [
    (16, 0.75, 4), (64, 0.75, 16), (196, 0.75, 49), (49, 0.5, 24), (16, 0.9, 1),
    (4, 0.99, 1),     # at least one patch is kept
    (4, 1e-17, 3),    # at least one patch is masked
])
def test_mask_counts_and_class_token(num_patches, mask_ratio, num_keep):
    idx_keep, idx_mask = draw_token_mask(5, num_patches, mask_ratio, seeded_generator(3))
    assert idx_keep.shape == (5, 1 + num_keep)
    assert idx_mask.shape == (5, num_patches - num_keep)
    assert (idx_keep[:, 0] == 0).all()  # the class token is always kept...
    assert (idx_keep[:, 1:] > 0).all() and (idx_mask > 0).all()  # ...and never drawn as a patch
    for keep, mask in zip(idx_keep.tolist(), idx_mask.tolist()):
        # kept and masked patches partition 1..N: no duplicates, nothing missing
        assert sorted(keep[1:] + mask) == list(range(1, num_patches + 1))


def test_masks_are_reproducible_from_the_seed_and_ignore_the_global_rng():
    torch.manual_seed(123)
    keep_a, mask_a = draw_token_mask(4, 64, 0.75, seeded_generator(7))
    torch.manual_seed(98765)
    torch.rand(1000)  # move the global state further
    keep_b, mask_b = draw_token_mask(4, 64, 0.75, seeded_generator(7))
    assert torch.equal(keep_a, keep_b) and torch.equal(mask_a, mask_b)

    keep_c, mask_c = draw_token_mask(4, 64, 0.75, seeded_generator(8))
    assert not torch.equal(keep_c, keep_a)
    assert not torch.equal(mask_c, mask_a)
    # Rows of one batch get different masks, too.
    assert not torch.equal(keep_a[0], keep_a[1])


def test_one_generator_draws_a_reproducible_sequence_of_masks():
    g1, g2 = seeded_generator(11), seeded_generator(11)
    first = [draw_token_mask(2, 16, 0.75, g1)[1] for _ in range(3)]
    torch.manual_seed(5)
    second = [draw_token_mask(2, 16, 0.75, g2)[1] for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(first[0], first[1])  # the generator advances between draws


# --- the loss ---------------------------------------------------------------------------------------

def _manual_patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, N, p*p*3), patches in row-major order, pixels (row, col, channel)."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def test_norm_pix_targets_of_masked_patches_have_zero_mean_unit_variance():
    model = MaskedAutoencoder(SMALL)
    images = _images(4, 32) * 3 + 5  # far from zero mean / unit variance before normalising
    _, idx_mask = draw_token_mask(4, SMALL.num_patches, SMALL.mask_ratio, seeded_generator(1))
    targets = lightly_utils.get_at_index(model.targets(images), idx_mask - 1)
    assert targets.shape == (4, idx_mask.shape[1], 8 * 8 * 3)
    torch.testing.assert_close(targets.mean(-1), torch.zeros(targets.shape[:2]), rtol=0, atol=1e-5)
    torch.testing.assert_close(targets.var(-1), torch.ones(targets.shape[:2]), rtol=0, atol=1e-4)
    # and they are the patches in the standard MAE order, normalised one patch at a time
    raw = _manual_patchify(images, 8)
    expected = (raw - raw.mean(-1, keepdim=True)) / raw.std(-1, keepdim=True)
    torch.testing.assert_close(model.targets(images), expected, rtol=1e-4, atol=1e-4)


def test_without_norm_pix_loss_targets_are_the_raw_patches():
    model = MaskedAutoencoder(ModelConfig(image_size=32, patch_size=8, norm_pix_loss=False))
    images = _images(2, 32) * 3 + 5
    torch.testing.assert_close(model.targets(images), _manual_patchify(images, 8))


def test_loss_is_the_error_on_masked_patches_only():
    torch.manual_seed(0)
    model = MaskedAutoencoder(SMALL).eval()
    images = _images(3, 32)
    idx_keep, idx_mask = draw_token_mask(3, SMALL.num_patches, SMALL.mask_ratio, seeded_generator(2))
    with torch.no_grad():
        loss = model.loss(images, idx_keep, idx_mask)
        every_patch = model.decode(images, idx_keep, None)  # (B, N, p*p*3), patch i at i-1
        targets = _manual_patchify(images, 8)
        targets = (targets - targets.mean(-1, keepdim=True)) / targets.std(-1, keepdim=True)
        rows = torch.arange(3)[:, None]
        on_masked = ((every_patch[rows, idx_mask - 1] - targets[rows, idx_mask - 1]) ** 2).mean()
        on_kept = ((every_patch[rows, idx_keep[:, 1:] - 1] - targets[rows, idx_keep[:, 1:] - 1]) ** 2).mean()
    assert loss.shape == () and math.isfinite(loss.item()) and loss.item() > 0
    torch.testing.assert_close(loss, on_masked, rtol=1e-4, atol=1e-5)
    assert not torch.isclose(loss, on_kept, rtol=1e-3)


@pytest.mark.parametrize("image_size, patch_size", [
    (32, 8), (32, 16), (48, 16), (64, 8), (96, 32), (160, 16), (224, 16), (224, 32),
])
def test_forward_backward_for_image_sizes(image_size, patch_size):
    cfg = ModelConfig(preset="vit-tiny", image_size=image_size, patch_size=patch_size)
    torch.manual_seed(0)
    model = MaskedAutoencoder(cfg).train()
    n = cfg.num_patches
    assert n == (image_size // patch_size) ** 2
    images = _images(2, image_size)
    idx_keep, idx_mask = draw_token_mask(2, n, cfg.mask_ratio, seeded_generator(0))
    loss = model.loss(images, idx_keep, idx_mask)
    assert loss.shape == () and math.isfinite(loss.item())
    loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, f"{name} got no gradient"
            assert torch.isfinite(param.grad).all(), f"{name} has a non-finite gradient"
        else:
            assert param.grad is None, f"frozen {name} got a gradient"
    with torch.no_grad():
        assert model.decode(images, idx_keep, None).shape == (2, n, patch_size**2 * 3)


# --- lightly's own MAE data pipeline ----------------------------------------------------------------

def test_trains_on_lightlys_own_mae_dataset_and_transform(tmp_path):
    """lightly's recipe: ``LightlyDataset`` + ``MAETransform`` batches are ``(views, targets,
    filenames)`` with ``views`` a list of normalised float tensors; the first view is trained on."""
    for photo in sample_photo_paths()[:4]:
        (tmp_path / photo.name).symlink_to(photo)
    dataset = LightlyDataset(str(tmp_path), transform=MAETransform(input_size=SMALL.image_size))
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, shuffle=True, drop_last=True)
    torch.manual_seed(0)
    module = MAELightning(model=dataclasses.asdict(SMALL), lr=1e-3)
    before = module.mae.backbone.vit.blocks[0].attn.qkv.weight.detach().clone()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(module, loader)
    assert trainer.global_step == 2
    loss = trainer.callback_metrics["epoch_loss"]  # 4 photos, batch 2: the 2 steps are one epoch
    assert torch.isfinite(loss) and loss > 0
    assert not torch.equal(before, module.mae.backbone.vit.blocks[0].attn.qkv.weight)


def test_every_batch_shape_becomes_the_images_the_step_trains_on():
    module = MAELightning(model=dataclasses.asdict(SMALL), lr=1e-3)
    uint8 = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    normalised = module.mae.normalize(uint8)
    floats = torch.randn(2, 3, 32, 32)
    labels = torch.zeros(2, dtype=torch.long)
    assert torch.equal(module.on_after_batch_transfer(uint8, 0), normalised)  # this project's
    assert module.on_after_batch_transfer(floats, 0) is floats  # already normalised: unchanged
    lightly_batch = ([floats, torch.randn(2, 3, 16, 16)], labels, ["a.png", "b.png"])
    assert module.on_after_batch_transfer(lightly_batch, 0) is floats  # the first view
    assert torch.equal(module.on_after_batch_transfer([uint8, labels], 0), normalised)  # torchvision


# --- a GPU-ready step: fused attention, no host synchronisation -------------------------------------

def test_the_sync_detector_sees_host_reads():
    with TensorCalls() as calls:
        total = torch.ones(3).sum()
        float(total), total.item(), bool(total > 0), torch.ones(3).nonzero()
    assert {"__float__", "item", "__bool__", "nonzero"} <= set(calls.names) & SYNC_OPS


class _Watched(MAELightning):
    """MAELightning with the step's own work (batch normalisation, training_step with its mask and
    logging, backward) run under :class:`TensorCalls`."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.calls = TensorCalls()

    def on_after_batch_transfer(self, batch: torch.Tensor, dataloader_idx: int) -> torch.Tensor:
        with self.calls:
            return super().on_after_batch_transfer(batch, dataloader_idx)

    def training_step(self, images: torch.Tensor, batch_idx: int) -> torch.Tensor:
        with self.calls:
            return super().training_step(images, batch_idx)

    def backward(self, loss: torch.Tensor, *args: object, **kwargs: object) -> None:
        with self.calls:
            super().backward(loss, *args, **kwargs)


def test_a_training_step_reads_nothing_back_from_the_device():
    """Mask drawing, normalisation, forward, loss, logging and backward only queue work: on a GPU
    none of them waits for the device. (AdamW's step counter is a host tensor by design, and
    Lightning's own loop is not ours: both stay outside the watch.)"""
    module = _Watched(model=dataclasses.asdict(SMALL), lr=1e-3)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(module, datamodule=MAEDataModule("", SMALL.image_size, 4, 0))
    assert trainer.global_step == 3
    assert trainer.optimizers[0].defaults["fused"], "one fused AdamW kernel, on the CPU too"
    names = module.calls.names
    assert names.count("backward") == 3 and "scaled_dot_product_attention" in names
    assert not set(names) & SYNC_OPS, [n for n in names if n in SYNC_OPS]


def test_every_attention_block_uses_torchs_fused_sdpa():
    model = MaskedAutoencoder(SMALL)
    attention = [m for m in model.modules() if hasattr(m, "fused_attn")]
    encoder_depth, decoder_depth = len(model.backbone.vit.blocks), SMALL.decoder().depth
    assert len(attention) == encoder_depth + decoder_depth
    assert all(m.fused_attn is True for m in attention)
    idx_keep, idx_mask = draw_token_mask(2, SMALL.num_patches, SMALL.mask_ratio, seeded_generator(0))
    with TensorCalls() as calls:
        model.loss(_images(2, 32), idx_keep, idx_mask)
    assert calls.names.count("scaled_dot_product_attention") == encoder_depth + decoder_depth


def _attention_ops(autocast: bool) -> set[str]:
    """The attention ops of one training forward and backward on the CPU, as the trainer runs it."""
    model = MaskedAutoencoder(SMALL)
    idx_keep, idx_mask = draw_token_mask(2, SMALL.num_patches, SMALL.mask_ratio, seeded_generator(0))
    with torch.profiler.profile() as prof:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), \
                training_attention(torch.device("cpu")):
            loss = model.loss(_images(2, 32), idx_keep, idx_mask)
        loss.backward()
    return {event.key for event in prof.key_averages() if "scaled_dot_product" in event.key}


def test_cpu_bf16_training_runs_the_math_attention_kernel_not_the_slow_flash_backward():
    assert any("flash_attention_for_cpu_backward" in op for op in _attention_ops(autocast=False))
    bf16 = _attention_ops(autocast=True)
    assert any("math" in op for op in bf16) and not any("flash" in op for op in bf16), bf16


def _lrs(scheduler: torch.optim.lr_scheduler.LRScheduler, steps: int) -> list[float]:
    optimizer = scheduler.optimizer
    values = []
    for _ in range(steps):
        values.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return values


def test_the_schedule_is_linear_warmup_then_cosine_and_survives_a_new_max_steps():
    """The same rates as torch's LinearLR + CosineAnnealingLR; and its state (only the step)
    loads into the schedule of a longer run, which continues from that step."""
    from mae_core.model import warmup_cosine

    def optimizer() -> torch.optim.Optimizer:
        return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)

    ours = torch.optim.lr_scheduler.LambdaLR(
        optimizer(), functools.partial(warmup_cosine, warmup=4, total=20))
    reference_opt = optimizer()
    reference = torch.optim.lr_scheduler.SequentialLR(reference_opt, [
        torch.optim.lr_scheduler.LinearLR(reference_opt, start_factor=1e-3, total_iters=4),
        torch.optim.lr_scheduler.CosineAnnealingLR(reference_opt, T_max=16)], milestones=[4])
    assert _lrs(ours, 20) == pytest.approx(_lrs(reference, 20), abs=1e-9)

    short = torch.optim.lr_scheduler.LambdaLR(optimizer(), functools.partial(
        warmup_cosine, warmup=0, total=3))  # a 3-step run has no warm-up
    _lrs(short, 3)
    longer = torch.optim.lr_scheduler.LambdaLR(optimizer(), functools.partial(
        warmup_cosine, warmup=1, total=9))
    longer.load_state_dict(short.state_dict())
    assert longer.last_epoch == 3
    longer.optimizer.step()
    longer.step()  # the next step's rate comes from the longer run's schedule
    assert longer.get_last_lr()[0] == pytest.approx(0.1 * warmup_cosine(4, 1, 9))
    assert longer.get_last_lr()[0] > 0


# --- the epoch's mean loss across a stop and its resume ---------------------------------------------

class _Rows(pl.loggers.Logger):
    """The rows Lightning logs, kept in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict] = []

    name, version = "rows", "0"

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append({k: float(v) for k, v in metrics.items()})


class _StopAndSaveAt(pl.Callback):
    """Records each step's loss by epoch; at ``step`` saves a checkpoint and stops, as a Stop does."""

    def __init__(self, step: int, path, losses: dict) -> None:
        self.step, self.path, self.losses = step, path, losses

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.setdefault(trainer.current_epoch, []).append(outputs["loss"].item())
        if trainer.global_step == self.step:
            trainer.should_stop = True
            trainer.save_checkpoint(self.path)


@pytest.mark.parametrize("stop_step", [2, 4], ids=["mid-epoch", "last-step-of-an-epoch"])
def test_a_stopped_and_resumed_run_logs_one_mean_loss_per_epoch_over_all_its_steps(tmp_path, stop_step):
    """Lightning's own epoch aggregate is not in its checkpoints: a stop mid-epoch logged the mean
    of the steps before it, and the resumed run another of the steps after it, both for the same
    epoch. The epoch's sums now travel in the checkpoint."""
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    loader = torch.utils.data.DataLoader(images, batch_size=2)  # 4 steps an epoch
    losses: dict[int, list[float]] = {}
    logged = _Rows()

    def fit(ckpt_path=None) -> None:
        module = MAELightning(model=dataclasses.asdict(SMALL), lr=1e-3)
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=2, logger=logged,
                             callbacks=[_StopAndSaveAt(stop_step, tmp_path / "stop.ckpt", losses)],
                             enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, log_every_n_steps=1)
        trainer.fit(module, loader, ckpt_path=ckpt_path)

    fit()
    fit(tmp_path / "stop.ckpt")
    assert {epoch: len(steps) for epoch, steps in losses.items()} == {0: 4, 1: 4}  # each step once
    epoch_rows = [row for row in logged.rows if "epoch_loss" in row]
    assert [row["epoch"] for row in epoch_rows] == [0, 1]
    for row in epoch_rows:
        steps = losses[int(row["epoch"])]
        assert row["epoch_loss"] == pytest.approx(sum(steps) / len(steps), rel=1e-5)
