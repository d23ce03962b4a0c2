"""MAE Studio's model computes exactly what lightly's own MAE example computes.

``LightlyExampleMAE`` below is the ``MAE`` class of lightly's example ``examples/pytorch/mae.py``
(the same class body as ``examples/pytorch_lightning/mae.py``), lightly-ai/lightly at commit
571a9ec6 ("fix: examples + benchmarks: weight init in mae+pixio", #2026), the form that matches the
installed lightly 1.6.0 (``MaskedVisionTransformerDecoderTIMM`` with ``decoder_embed`` and
``prediction_head`` outside it; ``MAEDecoderTIMM`` is deprecated there, to be removed in 1.7.0).
lightly is MIT licensed (its LICENSE.txt: the MIT text, "Copyright (c) 2018 The Python Packaging
Authority" as written there).

Copied as written, with two deliberate changes only: the decoder's width, depth and heads are
constructor arguments whose defaults are the example's (512, 1, 16), so it can also be built with
the vit-tiny preset's decoder (128, 4, 4); and the ViT passed in is a small one (vit-tiny, 32 px,
patch 8) rather than the example's ``vit_base_patch32_224()``.

The two models have the same modules under the same names, so MAE Studio's state dict loads into
the example's with no key mapping. The only tensors without a counterpart are the example's ViT
classifier head (``backbone.vit.head.weight``/``.bias``): MAE Studio's default ``ddp-clean`` policy
removes it (``reset_classifier(0)``); under the ``reference`` policy the match is exact, key for key.
"""

from __future__ import annotations

import copy
import functools

import pytest
import timm
import torch
from lightly.models import utils
from lightly.models.modules import (
    MaskedVisionTransformerDecoderTIMM,
    MaskedVisionTransformerTIMM,
)
from lightly.models.modules.masked_vision_transformer_timm import init_weights
from torch import nn

from mae_core.config import ModelConfig
from mae_core.model import MaskedAutoencoder, draw_token_mask, seeded_generator

# Float tolerance; measured, the two agree bitwise (difference 0.0) in predictions, targets, loss,
# gradients and weights after a step: the same ops run in the same order on the same values.
ATOL = 1e-6
LR = 1.5e-4  # the example's AdamW learning rate
# The example's own decoder, and the vit-tiny preset's (MAE Studio's default for this encoder).
DECODERS = {"example-512x1": (512, 1, 16), "preset-128x4": (128, 4, 4)}
# What the example trains that never receives a gradient: the ViT classifier head (MAE never
# classifies) and the encoder mask token (masked patches are dropped, not replaced). Plain DDP
# (find_unused_parameters=False) fails on exactly these; MAE Studio's ddp-clean policy removes
# the head and freezes the mask token, which is why it runs under plain DDP.
EXAMPLE_UNUSED = {"backbone.vit.head.weight", "backbone.vit.head.bias", "backbone.mask_token"}
HEAD = {"backbone.vit.head.weight", "backbone.vit.head.bias"}


# --- lightly's example, as written (see the module docstring) ----------------------------------

class LightlyExampleMAE(nn.Module):
    def __init__(self, vit, decoder_dim=512, decoder_depth=1, decoder_num_heads=16):
        super().__init__()

        self.mask_ratio = 0.75
        self.patch_size = vit.patch_embed.patch_size[0]

        self.backbone = MaskedVisionTransformerTIMM(vit=vit)
        self.sequence_length = self.backbone.sequence_length
        self.decoder_embed = nn.Linear(vit.embed_dim, decoder_dim)
        self.decoder = MaskedVisionTransformerDecoderTIMM(
            num_patches=vit.patch_embed.num_patches,
            embed_dim=decoder_dim,
            depth=decoder_depth,
            num_heads=decoder_num_heads,
            num_prefix_tokens=vit.num_prefix_tokens,
            mlp_ratio=4.0,
            proj_drop_rate=0.0,
            attn_drop_rate=0.0,
        )
        self.prediction_head = nn.Linear(decoder_dim, self.patch_size**2 * 3)
        # decoder_embed and prediction_head sit outside the decoder, so init them here.
        self.decoder_embed.apply(init_weights)
        self.prediction_head.apply(init_weights)

    def forward_encoder(self, images, idx_keep=None):
        return self.backbone.encode(images=images, idx_keep=idx_keep)

    def forward_decoder(self, x_encoded, idx_keep, idx_mask):
        # embed encoded tokens into the decoder dimension
        batch_size = x_encoded.shape[0]
        x_decode = self.decoder_embed(x_encoded)

        # scatter the encoded tokens into a full-length sequence; the decoder fills the
        # masked positions with the mask token
        x_masked = x_decode.new_zeros(
            batch_size, self.sequence_length, x_decode.shape[-1]
        )
        x_masked = utils.set_at_index(x_masked, idx_keep, x_decode.type_as(x_masked))

        # decoder forward pass
        x_decoded = self.decoder(x_masked, idx_mask=idx_mask)

        # predict pixel values for masked tokens
        x_pred = utils.get_at_index(x_decoded, idx_mask)
        x_pred = self.prediction_head(x_pred)
        return x_pred

    def forward(self, images):
        batch_size = images.shape[0]
        idx_keep, idx_mask = utils.random_token_mask(
            size=(batch_size, self.sequence_length),
            mask_ratio=self.mask_ratio,
            device=images.device,
        )
        x_encoded = self.forward_encoder(images=images, idx_keep=idx_keep)
        x_pred = self.forward_decoder(
            x_encoded=x_encoded, idx_keep=idx_keep, idx_mask=idx_mask
        )

        # get image patches for masked tokens
        patches = utils.patchify(images, self.patch_size)
        # must adjust idx_mask for missing class token
        target = utils.get_at_index(patches, idx_mask - 1)
        return x_pred, target


criterion = nn.MSELoss()  # the example's loss: criterion(predictions, targets)


# --- building the pair ---------------------------------------------------------------------------

def _config(decoder: str, policy: str = "ddp-clean") -> ModelConfig:
    dim, depth, heads = DECODERS[decoder]
    # norm_pix_loss off: the example has none (it is also MAE Studio's default).
    return ModelConfig(preset="vit-tiny", image_size=32, patch_size=8, norm_pix_loss=False,
                       decoder_dim=dim, decoder_depth=depth, decoder_heads=heads, policy=policy)


def _pair(decoder: str, policy: str = "ddp-clean") -> tuple[MaskedAutoencoder, LightlyExampleMAE]:
    """MAE Studio's model and lightly's example holding the same weights (Studio's, copied):
    fresh copies of a pair built once per test session (timm's init is most of a build's time)."""
    return copy.deepcopy(_built_pair(decoder, policy))


@functools.cache
def _built_pair(decoder: str, policy: str) -> tuple[MaskedAutoencoder, LightlyExampleMAE]:
    cfg = _config(decoder, policy)
    torch.manual_seed(0)
    ours = MaskedAutoencoder(cfg)
    dim, depth, heads = DECODERS[decoder]
    torch.manual_seed(1)  # a different init: only the copy below makes the two agree
    vit = timm.create_model(cfg.encoder_name, pretrained=False, img_size=cfg.image_size,
                            patch_size=cfg.patch_size)
    theirs = LightlyExampleMAE(vit, decoder_dim=dim, decoder_depth=depth, decoder_num_heads=heads)
    # Same module names on both sides: no key mapping. Every tensor of ours has its counterpart
    # in the example's; the example's extra tensors are exactly the head ddp-clean removed.
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert set(ours_sd) <= set(theirs_sd)
    assert set(theirs_sd) - set(ours_sd) == (HEAD if policy == "ddp-clean" else set())
    for name, tensor in ours_sd.items():
        assert tensor.shape == theirs_sd[name].shape, name
    result = theirs.load_state_dict(ours_sd, strict=policy != "ddp-clean")
    assert set(result.missing_keys) == (HEAD if policy == "ddp-clean" else set())
    assert not result.unexpected_keys
    return ours, theirs


def _images(batch: int = 4, seed: int = 0) -> torch.Tensor:
    # Float images stand for a normalised batch: what MAE Studio's loss receives after
    # on_after_batch_transfer, and what the example receives from lightly's MAETransform.
    return torch.randn(batch, 3, 32, 32, generator=seeded_generator(seed))


def _example_step(theirs: LightlyExampleMAE, images: torch.Tensor, mask_seed: int):
    """The example's forward and loss as its training loop runs them, its mask drawn by its own
    ``random_token_mask`` call under ``mask_seed``; returns (predictions, targets, loss, idx_keep,
    idx_mask), the last two re-drawn under the same seed for MAE Studio."""
    torch.manual_seed(mask_seed)
    predictions, targets = theirs(images)
    loss = criterion(predictions, targets)
    torch.manual_seed(mask_seed)  # forward() draws its mask first: the same draw again
    idx_keep, idx_mask = utils.random_token_mask(
        size=(images.shape[0], theirs.sequence_length), mask_ratio=theirs.mask_ratio)
    return predictions, targets, loss, idx_keep, idx_mask


def _ours_step(ours: MaskedAutoencoder, images, idx_keep, idx_mask):
    predictions = ours.decode(images, idx_keep, idx_mask)
    targets = utils.get_at_index(ours.targets(images), idx_mask - ours.num_prefix_tokens)
    return predictions, targets, ours.loss(images, idx_keep, idx_mask)


def _close(actual, expected, what: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=ATOL, msg=lambda m: f"{what}: {m}")


def _all_close(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], what: str) -> None:
    """Every tensor of ``ours`` within ATOL of its namesake in ``theirs`` (one pass, cheap)."""
    worst, name = max(((ours[n] - theirs[n]).abs().max().item(), n) for n in ours)
    assert worst <= ATOL, f"{what}: {name} differs by {worst:.3g} (atol {ATOL})"


# --- the tests -----------------------------------------------------------------------------------

@pytest.mark.parametrize("decoder", list(DECODERS))
def test_same_weights_and_mask_give_the_examples_predictions_targets_and_loss(decoder):
    ours, theirs = _pair(decoder)
    images = _images()
    pred_t, target_t, loss_t, idx_keep, idx_mask = _example_step(theirs, images, mask_seed=5)
    # The mask really is the one the example drew: its own encoder/decoder steps reproduce it.
    torch.testing.assert_close(theirs.forward_decoder(
        theirs.forward_encoder(images, idx_keep), idx_keep, idx_mask), pred_t, rtol=0, atol=0)
    # MAE Studio's own masks follow lightly's convention (class token kept at 0, same counts).
    keep_s, mask_s = draw_token_mask(4, ours.cfg.num_patches, ours.cfg.mask_ratio,
                                     seeded_generator(5))
    assert keep_s.shape == idx_keep.shape and mask_s.shape == idx_mask.shape
    assert (idx_keep[:, 0] == 0).all() and (keep_s[:, 0] == 0).all()

    pred_o, target_o, loss_o = _ours_step(ours, images, idx_keep, idx_mask)
    assert pred_o.shape == (4, 12, 8 * 8 * 3)  # 12 of the 16 patches masked
    _close(pred_o, pred_t, "predictions")
    _close(target_o, target_t, "targets")
    _close(loss_o, loss_t, "loss")
    assert loss_t.item() > 0.1  # a real, untrained reconstruction error, not a degenerate zero

    # And on a mask MAE Studio's trainer draws (draw_token_mask), the example agrees as well.
    pred_t2 = theirs.forward_decoder(theirs.forward_encoder(images, keep_s), keep_s, mask_s)
    _close(ours.decode(images, keep_s, mask_s), pred_t2, "predictions on MAE Studio's mask")


@pytest.mark.parametrize("nudge", ["backbone.vit.blocks.0.attn.qkv.weight",
                                   "decoder.blocks.3.mlp.fc2.bias"])
def test_a_one_weight_difference_is_caught(nudge):
    """The comparison can fail: one element of one weight, encoder or decoder, nudged by 1e-3 in
    the example shows in its predictions (the encoder's by ~1e-5, ten times ATOL). The encoder's
    nudge leaves the float32 loss unchanged: why the tests compare predictions, not only the loss."""
    ours, theirs = _pair("preset-128x4")
    with torch.no_grad():
        theirs.get_parameter(nudge).view(-1)[0] += 1e-3
    images = _images()
    pred_t, _, loss_t, idx_keep, idx_mask = _example_step(theirs, images, mask_seed=5)
    pred_o, _, loss_o = _ours_step(ours, images, idx_keep, idx_mask)
    with pytest.raises(AssertionError, match="predictions"):
        _close(pred_o, pred_t, "predictions")
    if nudge.startswith("decoder."):
        assert loss_o.item() != loss_t.item()


def test_gradients_cover_the_same_tensors_and_an_adamw_step_keeps_the_models_equal():
    ours, theirs = _pair("preset-128x4")
    images = _images()
    _, _, loss_t, idx_keep, idx_mask = _example_step(theirs, images, mask_seed=5)
    loss_o = ours.loss(images, idx_keep, idx_mask)
    loss_t.backward()
    loss_o.backward()

    ours_params, theirs_params = dict(ours.named_parameters()), dict(theirs.named_parameters())
    ours_graded = {n for n, p in ours_params.items() if p.grad is not None}
    theirs_graded = {n for n, p in theirs_params.items() if p.grad is not None}
    # The same tensors learn on both sides...
    assert ours_graded == theirs_graded
    # ...and MAE Studio trains nothing that gets no gradient (ddp-clean: plain-DDP safe), while
    # the example leaves its head and encoder mask token trainable and without a gradient.
    assert ours_graded == {n for n, p in ours_params.items() if p.requires_grad}
    theirs_unused = {n for n, p in theirs_params.items() if p.requires_grad} - theirs_graded
    assert theirs_unused == EXAMPLE_UNUSED
    assert not ours_params["backbone.mask_token"].requires_grad
    # The sin-cos position embeddings are frozen on both sides (by lightly).
    for name in ("backbone.vit.pos_embed", "decoder.pos_embed"):
        assert not ours_params[name].requires_grad and not theirs_params[name].requires_grad
    _all_close({n: ours_params[n].grad for n in ours_graded},
               {n: theirs_params[n].grad for n in ours_graded}, "gradients")

    # One step of the example's optimizer (AdamW, lr 1.5e-4, torch defaults) on each.
    before = {n: p.detach().clone() for n, p in theirs_params.items()}
    for model in (ours, theirs):
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
        optimizer.step()
        optimizer.zero_grad()
    _all_close(ours.state_dict(), theirs.state_dict(), "weights after one AdamW step")
    for name, param in ours_params.items():
        moved = not torch.equal(param.detach(), before[name])
        assert moved == (name in ours_graded), name  # trained tensors moved, frozen ones did not
    for name in EXAMPLE_UNUSED:  # no gradient, so AdamW skips them (weight decay too)
        assert torch.equal(theirs_params[name].detach(), before[name]), name

    # The stepped models still agree, on a new batch and mask.
    images = _images(seed=1)
    pred_t, _, loss_t, idx_keep, idx_mask = _example_step(theirs, images, mask_seed=6)
    pred_o, _, loss_o = _ours_step(ours, images, idx_keep, idx_mask)
    _close(pred_o, pred_t, "predictions after the step")
    _close(loss_o, loss_t, "loss after the step")


def test_reference_policy_is_the_example_tensor_for_tensor():
    """MAE Studio's ``reference`` policy keeps the constructors' defaults: its state dict loads
    strictly into the example (head included), and it leaves the same tensors without a gradient."""
    ours, theirs = _pair("example-512x1", policy="reference")
    images = _images()
    pred_t, _, loss_t, idx_keep, idx_mask = _example_step(theirs, images, mask_seed=7)
    pred_o, _, loss_o = _ours_step(ours, images, idx_keep, idx_mask)
    _close(pred_o, pred_t, "predictions")
    _close(loss_o, loss_t, "loss")
    loss_t.backward()
    loss_o.backward()
    ours_params, theirs_params = dict(ours.named_parameters()), dict(theirs.named_parameters())
    unused = {n for n, p in ours_params.items() if p.requires_grad and p.grad is None}
    assert unused == EXAMPLE_UNUSED
    graded = set(ours_params) - unused - {n for n, p in ours_params.items() if not p.requires_grad}
    assert graded == {n for n, p in theirs_params.items() if p.grad is not None}
    _all_close({n: ours_params[n].grad for n in graded},
               {n: theirs_params[n].grad for n in graded}, "gradients")
