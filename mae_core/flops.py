"""Model FLOPs per image of a :class:`~mae_core.config.ModelConfig`, counted analytically.

The count follows what :class:`mae_core.model.MaskedAutoencoder` computes for one image:

- the patch embedding (a ``p×p`` stride-``p`` convolution) on **all** N patches;
- the encoder blocks on the kept patches plus the class token;
- the decoder embedding (a linear layer) on those same encoded tokens;
- the decoder blocks on all N patches plus the class token (mask tokens fill the masked places);
- the prediction head on the masked patches only (the loss needs no others).

Matrix products count 2 FLOPs per multiply-accumulate: the attention's QKV and output
projections, its score (``q·kᵀ``) and value (``attn·v``) products, and the MLP. Norms, softmax,
GELU and the loss are left out (a few percent at most, and not matmul-bound), as
``torch.utils.flop_counter.FlopCounterMode`` does. Training counts 3 × the forward pass (the
backward pass costs two forwards), the convention of MFU figures (PaLM, Chinchilla).

Example:
    >>> from mae_core.config import ModelConfig
    >>> f = model_flops(ModelConfig(preset="vit-base", image_size=224, patch_size=16))
    >>> round(f.training / 1e9, 1)
    58.6
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from mae_core.config import ModelConfig

# lightly's MAE decoder's MLP is 4× as wide as its tokens (its default mlp_ratio).
DECODER_MLP_RATIO = 4
PREFIX_TOKENS = 1  # the class token: every encoder here has exactly one (mae_core.encoders)


@dataclass(frozen=True)
class ModelFlops:
    """FLOPs of one image's forward pass, part by part (2 per multiply-accumulate)."""

    patch_embed: float
    encoder: float
    decoder_embed: float
    decoder: float
    head: float

    @property
    def forward(self) -> float:
        return self.patch_embed + self.encoder + self.decoder_embed + self.decoder + self.head

    @property
    def training(self) -> float:
        """Forward + backward: 3 × the forward pass."""
        return 3 * self.forward

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "forward": self.forward, "training": self.training}


def kept_patches(num_patches: int, mask_ratio: float) -> int:
    """Patches the encoder sees: the rule of :func:`mae_core.model.draw_token_mask` (at least one
    kept and one masked), restated here so counting FLOPs needs no torch."""
    return min(max(1, int(num_patches * (1 - mask_ratio))), num_patches - 1)


def block_macs(tokens: int, dim: int, mlp_hidden: int | None = None) -> int:
    """Multiply-accumulates of one pre-norm transformer block on ``tokens`` tokens of width ``dim``.

    QKV (3·dim²) and output projection (dim²) plus the MLP (2·dim·hidden, hidden =
    DECODER_MLP_RATIO·dim unless given) per token, and the score and value products (tokens²·dim each, whatever the
    number of heads).
    """
    hidden = DECODER_MLP_RATIO * dim if mlp_hidden is None else mlp_hidden
    linear = tokens * (4 * dim * dim + 2 * dim * hidden)
    attention = 2 * tokens * tokens * dim
    return linear + attention


def model_flops(cfg: ModelConfig) -> ModelFlops:
    """The forward FLOPs of one image through the MAE that ``cfg`` describes, part by part."""
    dim, depth, hidden = encoder_dims(cfg)
    decoder = cfg.decoder()
    patches = cfg.num_patches
    keep = kept_patches(patches, cfg.mask_ratio)
    encoder_tokens = keep + PREFIX_TOKENS
    decoder_tokens = patches + PREFIX_TOKENS
    pixels = cfg.patch_size**2 * cfg.channels  # one patch's values: the embedding's input, the head's output
    return ModelFlops(
        patch_embed=2.0 * patches * pixels * dim,
        encoder=2.0 * depth * block_macs(encoder_tokens, dim, hidden),
        decoder_embed=2.0 * encoder_tokens * dim * decoder.dim,
        decoder=2.0 * decoder.depth * block_macs(decoder_tokens, decoder.dim),
        head=2.0 * (patches - keep) * decoder.dim * pixels,
    )


def encoder_dims(cfg: ModelConfig) -> tuple[int, int, int]:
    """The encoder's width, depth and MLP width: a preset's from its record, any other timm ViT's
    from the model itself (built on the meta device)."""
    if not cfg.timm_model:
        spec = cfg.preset_spec
        return spec.embed_dim, spec.depth, spec.mlp_ratio * spec.embed_dim
    from mae_core.encoders import encoder_shape

    shape = encoder_shape(cfg.encoder_name, cfg.image_size, cfg.patch_size)
    return shape.embed_dim, shape.depth, shape.mlp_hidden


def training_flops_per_image(cfg: ModelConfig) -> float:
    """FLOPs one image costs in a training step (forward + backward), the numerator of MFU."""
    return model_flops(cfg).training
