"""Which timm models can be an MAE encoder here, and their shape, without building their weights.

MAE drops the masked patch tokens and keeps one class token in front (lightly's
``MaskedVisionTransformerTIMM``; :func:`mae_core.model.draw_token_mask` always keeps position 0), so
an encoder must be a timm ``VisionTransformer`` with exactly one prefix token, a class token, and
no attention pooling (whose weights MAE would never train, breaking plain DDP). Everything is read
from the model built on the ``meta`` device: no memory, no download, about 0.1 s even for ViT-H.

Example:
    >>> encoder_shape("vit_base_patch16_224", 224, 16).depth
    12
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from mae_core.checks import ConfigError

VIT_MODULE = "timm.models.vision_transformer"


@dataclass(frozen=True)
class EncoderShape:
    embed_dim: int
    depth: int
    heads: int
    mlp_hidden: int  # the MLP's inner width (4 × embed_dim for the MAE paper's ViTs)


def _family(name: str) -> str:
    from timm.models import model_entrypoint

    return model_entrypoint(name).__module__


@functools.lru_cache(maxsize=64)
def _inspect(name: str, image_size: int, patch_size: int) -> EncoderShape:
    """The shape of timm model ``name``; ConfigError where it cannot be an MAE encoder."""
    import timm
    import torch
    from timm.models.vision_transformer import VisionTransformer

    if not timm.is_model(name):
        close = timm.list_models(f"*{name[:12]}*")[:5] or ["vit_base_patch16_224"]
        raise ConfigError("timm_model", f"timm has no model named {name[:80]!r}; for example "
                          f"{', '.join(close)} (all: timm.list_models('vit_*'))")
    family = _family(name)
    if family != VIT_MODULE:
        raise ConfigError("timm_model", f"{name} is not a plain timm VisionTransformer (it comes "
                          f"from {family}): MAE masks patch tokens, so the encoder must be a "
                          f"model of {VIT_MODULE} (try timm.list_models('vit_*'))")
    try:
        with torch.device("meta"):
            vit = timm.create_model(name, pretrained=False, img_size=image_size,
                                    patch_size=patch_size)
    except (TypeError, ValueError, AssertionError, RuntimeError) as err:
        raise ConfigError("timm_model", f"{name} cannot be built at {image_size} px with patch "
                          f"{patch_size}: {str(err)[:200]}") from None
    if not isinstance(vit, VisionTransformer):
        raise ConfigError("timm_model", f"{name} is not a timm VisionTransformer")
    _require_mae_layout(name, vit)
    block = vit.blocks[0]
    return EncoderShape(embed_dim=int(vit.embed_dim), depth=len(vit.blocks),
                        heads=int(block.attn.num_heads), mlp_hidden=int(block.mlp.fc1.out_features))


def _require_mae_layout(name: str, vit: object) -> None:
    if not getattr(vit, "has_class_token", False) or getattr(vit, "num_prefix_tokens", 0) != 1:
        raise ConfigError("timm_model", f"{name} has {getattr(vit, 'num_prefix_tokens', 0)} "
                          "prefix tokens and no single class token; MAE here needs exactly one "
                          "class token (register and distillation tokens are not supported)")
    if getattr(vit, "global_pool", "") == "map" or getattr(vit, "attn_pool", None) is not None:
        raise ConfigError("timm_model", f"{name} pools with attention, whose weights MAE never "
                          "trains; choose a ViT with token or average pooling")
    if getattr(vit, "no_embed_class", False):  # flexivit_*: lightly's fixed sin-cos init fails
        raise ConfigError("timm_model", f"{name} leaves its class token out of the position "
                          "embedding (no_embed_class), which the fixed sin-cos position embedding "
                          "here includes; choose a ViT such as vit_small_patch16_224")
    block = vit.blocks[0]
    if not (hasattr(getattr(block, "attn", None), "num_heads")
            and hasattr(getattr(block, "mlp", None), "fc1")):
        raise ConfigError("timm_model", f"{name}'s blocks ({type(block).__name__}) are not "
                          "attention then MLP blocks (attn, mlp.fc1), whose shapes the model's "
                          "FLOP count and decoder are read from; choose a ViT such as "
                          "vit_small_patch16_224")


def check_timm_vit(name: str, image_size: int, patch_size: int) -> None:
    """Refuse (ConfigError) a timm model that cannot be this project's MAE encoder."""
    _inspect(name, image_size, patch_size)


def encoder_shape(name: str, image_size: int, patch_size: int) -> EncoderShape:
    """Width, depth, heads and MLP width of the timm ViT ``name`` (built on the meta device)."""
    return _inspect(name, image_size, patch_size)
