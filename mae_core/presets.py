"""The model presets: a named timm ViT encoder and the MAE decoder that suits it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DecoderSpec:
    dim: int
    depth: int
    heads: int


@dataclass(frozen=True)
class Preset:
    """A named encoder (a timm ViT) and the decoder that suits it."""

    timm_name: str
    embed_dim: int
    depth: int  # the encoder's blocks (tests/test_flops.py checks them against timm's models)
    decoder: DecoderSpec
    mlp_ratio: int = 4  # the MLP's width over the tokens'


# The MAE paper's decoder (512 wide, 8 blocks, 16 heads) is kept for vit-base; the smaller encoders
# get lighter decoders, which the paper found to work as well and which small data sets need.
PRESETS: dict[str, Preset] = {
    "vit-tiny": Preset("vit_tiny_patch16_224", 192, 12, DecoderSpec(128, 4, 4)),
    "vit-small": Preset("vit_small_patch16_224", 384, 12, DecoderSpec(256, 4, 8)),
    "vit-base": Preset("vit_base_patch16_224", 768, 12, DecoderSpec(512, 8, 16)),
    # The MAE paper's larger encoders, with its decoder.
    "vit-large": Preset("vit_large_patch16_224", 1024, 24, DecoderSpec(512, 8, 16)),
    "vit-huge": Preset("vit_huge_patch14_224", 1280, 32, DecoderSpec(512, 8, 16)),
}
