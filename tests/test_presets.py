"""The model presets (mae_core/presets.py): a named timm ViT encoder and the MAE decoder that suits
it (tests/test_flops.py checks the encoders against timm's own models)."""

from __future__ import annotations

from dataclasses import FrozenInstanceError

import pytest

from mae_core.presets import PRESETS, DecoderSpec


def test_each_decoder_splits_into_its_heads_and_is_lighter_than_its_encoder():
    assert list(PRESETS) == ["vit-tiny", "vit-small", "vit-base", "vit-large", "vit-huge"]
    for name, preset in PRESETS.items():
        decoder = preset.decoder
        assert decoder.dim % decoder.heads == 0, name  # attention splits the width evenly
        assert decoder.dim < preset.embed_dim and decoder.depth < preset.depth, name
        assert preset.timm_name.startswith(name.replace("-", "_") + "_patch"), name
    # The MAE paper's decoder is kept for vit-base and the larger encoders.
    for name in ("vit-base", "vit-large", "vit-huge"):
        assert PRESETS[name].decoder == DecoderSpec(512, 8, 16)
    with pytest.raises(FrozenInstanceError):
        PRESETS["vit-tiny"].decoder.dim = 64  # type: ignore[misc]
