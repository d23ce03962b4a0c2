"""The analytic FLOP count (:mod:`mae_core.flops`) against PyTorch's own counter on the real model.

``torch.utils.flop_counter.FlopCounterMode`` counts every matmul, convolution and attention kernel
that a real forward + backward of :class:`MaskedAutoencoder` dispatches. Its registry has no entry
for the CPU's fused attention kernel (``_scaled_dot_product_flash_attention_for_cpu``), which timm's
blocks call on this machine, so the same formulas it uses for the GPU kernels are registered for it
here; the model itself runs unchanged.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from mae_core.config import PRESETS, ModelConfig
from mae_core.flops import DECODER_MLP_RATIO, kept_patches, model_flops
from mae_core.model import MaskedAutoencoder, draw_token_mask

aten = torch.ops.aten
BATCH = 2


def _register_cpu_attention() -> None:
    """Count the CPU's fused attention as the counter counts the GPU's (once per process)."""
    forward = aten._scaled_dot_product_flash_attention_for_cpu
    backward = aten._scaled_dot_product_flash_attention_for_cpu_backward
    if forward not in flop_counter.flop_registry:
        @flop_counter.register_flop_formula(forward)
        def _forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
            return flop_counter.sdpa_flop_count(query, key, value)
    if backward not in flop_counter.flop_registry:
        @flop_counter.register_flop_formula(backward)
        def _backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
            return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


_register_cpu_attention()
CASES = [(preset, 64, 8) for preset in PRESETS] + [("vit-tiny", 224, 16), ("vit-huge", 56, 14)]
# ViT-L and ViT-H are counted on the meta device: the same operators and shapes, no memory or time.
ON_META = {"vit-large", "vit-huge"}


def _counted(model: MaskedAutoencoder, backward: bool) -> tuple[float, dict[str, int]]:
    """FLOPs per image that FlopCounterMode saw in one loss (and backward) of a random batch."""
    cfg = model.cfg
    device = next(model.parameters()).device
    images = torch.randn(BATCH, 3, cfg.image_size, cfg.image_size, device=device)
    generator = None if device.type == "meta" else torch.Generator().manual_seed(0)
    idx_keep, idx_mask = draw_token_mask(BATCH, cfg.num_patches, cfg.mask_ratio,
                                         generator=generator, device=device)
    with FlopCounterMode(display=False) as counter:
        if backward:
            model.loss(images, idx_keep, idx_mask).backward()
        else:
            with torch.no_grad():
                model.loss(images, idx_keep, idx_mask)
    per_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    return counter.get_total_flops() / BATCH, per_op


@pytest.mark.parametrize(("preset", "image_size", "patch_size"), CASES)
def test_training_flops_match_the_counter_on_a_real_forward_and_backward(preset, image_size,
                                                                        patch_size):
    cfg = ModelConfig(preset=preset, image_size=image_size, patch_size=patch_size)
    torch.manual_seed(0)
    with torch.device("meta" if preset in ON_META else "cpu"):
        model = MaskedAutoencoder(cfg)
    flops = model_flops(cfg)

    counted, per_op = _counted(model, backward=True)
    assert counted == pytest.approx(flops.training, rel=0.10), per_op
    # The attention products were counted (on the meta device SDPA runs its math path: bmm).
    attention = ("attention", "bmm") if preset in ON_META else ("attention",)
    assert any(name in op for op in per_op for name in attention), per_op

    forward, per_op = _counted(model, backward=False)
    assert forward == pytest.approx(flops.forward, rel=0.10), per_op
    # The patch embedding runs on every patch, masked or not: exactly the convolution counted.
    assert per_op["aten.convolution"] / BATCH == flops.patch_embed


@pytest.mark.parametrize("preset", list(PRESETS))
def test_the_constants_are_those_of_the_real_models(preset):
    with torch.device("meta" if preset in ON_META else "cpu"):
        model = MaskedAutoencoder(ModelConfig(preset=preset, image_size=32, patch_size=8))
    vit = model.backbone.vit
    spec = PRESETS[preset]
    assert len(vit.blocks) == spec.depth and vit.embed_dim == spec.embed_dim
    assert vit.num_prefix_tokens == 1
    encoder_mlp, decoder_mlp = vit.blocks[0].mlp.fc1, model.decoder.blocks[0].mlp.fc1
    assert encoder_mlp.out_features == spec.mlp_ratio * encoder_mlp.in_features
    assert decoder_mlp.out_features == DECODER_MLP_RATIO * decoder_mlp.in_features


@pytest.mark.parametrize(("patches", "ratio"), [(16, 0.75), (64, 0.75), (196, 0.75), (4, 0.9),
                                                (4, 0.01), (49, 0.5)])
def test_kept_patches_is_the_masks_own_rule(patches, ratio):
    idx_keep, idx_mask = draw_token_mask(3, patches, ratio)
    assert idx_keep.shape[1] - 1 == kept_patches(patches, ratio)  # minus the class token
    assert idx_mask.shape[1] == patches - kept_patches(patches, ratio)


def test_vit_base_224_costs_the_published_figure():
    """ViT-B/16 MAE at 224 px, mask 0.75, decoder 8×512: ~58.6 GFLOP per image per training step
    (encoder ~4.4 and decoder ~5.35 GMAC forward, as FIELD-NOTES records)."""
    flops = model_flops(ModelConfig(preset="vit-base", image_size=224, patch_size=16))
    assert flops.training / 1e9 == pytest.approx(58.6, abs=0.1)
    assert (flops.patch_embed + flops.encoder) / 2e9 == pytest.approx(4.4, abs=0.1)
    assert flops.decoder / 2e9 == pytest.approx(5.35, abs=0.1)
    assert flops.as_dict()["training"] == flops.training == 3 * flops.forward


def test_more_masking_costs_fewer_flops_and_a_bigger_decoder_more():
    base = ModelConfig(preset="vit-small", image_size=64, patch_size=8)
    more_masked = ModelConfig(preset="vit-small", image_size=64, patch_size=8, mask_ratio=0.9)
    wider = ModelConfig(preset="vit-small", image_size=64, patch_size=8, decoder_dim=512,
                        decoder_heads=8)
    assert model_flops(more_masked).encoder < model_flops(base).encoder
    assert model_flops(more_masked).patch_embed == model_flops(base).patch_embed
    assert model_flops(wider).decoder > model_flops(base).decoder


def test_any_timm_vit_is_counted_from_its_own_shape():
    """A ``timm_model`` outside the tables (here a DINOv2 ViT-S with layer scale) is measured on
    the meta device, and the count still matches the counter's."""
    cfg = ModelConfig(preset="vit-tiny", timm_model="vit_small_patch14_dinov2", image_size=32,
                      patch_size=8)
    with torch.device("meta"):
        model = MaskedAutoencoder(cfg)
    counted, per_op = _counted(model, backward=True)
    assert counted == pytest.approx(model_flops(cfg).training, rel=0.10), per_op
    assert model_flops(cfg).encoder > model_flops(
        ModelConfig(preset="vit-tiny", image_size=32, patch_size=8)).encoder  # 384 wide, not 192
