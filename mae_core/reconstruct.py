"""Reconstruction as in the MAE paper's figures: original | masked | reconstruction | + visible.

Masks come from a seed (image ``i`` uses ``seed + i``), so the same images and seed give the same
masks on any checkpoint. With ``norm_pix_loss`` the model predicts per-patch normalised pixels; they
are de-normalised with each target patch's own mean and variance before display. That borrows each
masked patch's brightness, colour and contrast from the original image, which the model never
predicted, so a weak model still looks plausible. The model's own output is therefore rendered too
(:data:`MODEL_PANEL_TITLES`): the normalised prediction on a neutral grey with one fixed contrast,
beside the target in the same normalisation.

Example:
    >>> model = load_model("checkpoints/<run>/model.safetensors")
    >>> [result] = reconstruct(model, center_square(open_rgb("photo.jpg"), 64)[None])
    >>> panels(result)  # four PIL images

Images of any channel count reconstruct (uint8 or uint16, as the model was trained); the panels
show them through :mod:`mae_core.composite` (grayscale, RGB or a chosen composite, with a contrast
stretch for 16-bit and non-RGB images).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from lightly.models import utils
from PIL import Image
from torch import Tensor

from mae_core.composite import View, fit, select
from mae_core.model import MaskedAutoencoder, draw_token_mask, seeded_generator

PANEL_TITLES = ("input", "masked", "reconstruction", "reconstruction + visible")
# With norm_pix_loss: what the model itself predicted, and what it was asked to predict.
MODEL_PANEL_TITLES = ("model output (normalised)", "target (normalised)")
_MASK_GRAY = 0.5
# Per-patch normalised pixels (zero mean, unit variance) are drawn as grey + this × value: one
# contrast for every patch, image and checkpoint, so a flat prediction looks flat (±2.5σ reaches
# black and white).
NEUTRAL_CONTRAST = 0.2


@dataclass
class Reconstruction:
    """One image's result; images are float (C, H, W) in [0, 1] of full scale (C: the model's
    channels; ``bits`` the input's, 8 or 16)."""

    original: Tensor
    masked: Tensor
    reconstruction: Tensor
    pasted: Tensor
    patch_error: Tensor  # (grid, grid) squared error per patch, in the loss's target space
    patch_masked: Tensor  # (grid, grid) bool
    loss: float  # mean squared error over the masked patches: the training loss of this image
    # With norm_pix_loss: the prediction and the target as they are, per-patch normalised, drawn
    # by :func:`neutral` (None without norm_pix_loss, where the reconstruction is the output).
    model_output: Tensor | None = None
    target_normalised: Tensor | None = None
    bits: int = 8


def draw_masks(count: int, num_patches: int, mask_ratio: float, seed: int) -> tuple[Tensor, Tensor]:
    """One mask per image, image ``i`` from ``seed + i``: independent of how images are batched."""
    pairs = [draw_token_mask(1, num_patches, mask_ratio, seeded_generator(seed + i))
             for i in range(count)]
    return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])


def neutral(patch_values: Tensor, patch_size: int, channels: int = 3) -> Tensor:
    """Per-patch normalised values (B, N, patch²·C) as images (B, C, H, W) in [0, 1]: mid-grey
    plus :data:`NEUTRAL_CONTRAST` × value, with no mean or contrast taken from any image."""
    values = utils.unpatchify(patch_values, patch_size, channels)
    return (0.5 + NEUTRAL_CONTRAST * values).clamp(0, 1)


@torch.no_grad()
def reconstruct(model: MaskedAutoencoder, images: Tensor, mask_ratio: float | None = None,
                seed: int = 0) -> list[Reconstruction]:
    """Reconstruct uint8 or uint16 images (B, C, S, S) of the model's ``image_size`` and channels."""
    cfg = model.cfg
    if images.ndim != 4 or images.shape[1] != cfg.channels:
        raise ValueError(f"images must have the model's {cfg.channels} channel(s), got shape "
                         f"{tuple(images.shape)}")
    if images.shape[-1] != cfg.image_size or images.shape[-2] != cfg.image_size:
        raise ValueError(f"images must be {cfg.image_size}×{cfg.image_size}, got "
                         f"{tuple(images.shape[-2:])}")
    ratio = cfg.mask_ratio if mask_ratio is None else mask_ratio
    if not 0 < ratio < 1:
        raise ValueError(f"mask_ratio must be strictly between 0 and 1, got {ratio}")
    was_training = model.training
    model.eval()
    device = model.pixel_mean.device
    x = model.normalize(images.to(device))
    idx_keep, idx_mask = draw_masks(images.shape[0], cfg.num_patches, ratio, seed)
    idx_keep, idx_mask = idx_keep.to(device), idx_mask.to(device)
    prediction = model.decode(x, idx_keep, None).float()
    patches = utils.patchify(x, cfg.patch_size)
    target = model.targets(x)
    error = ((prediction - target) ** 2).mean(dim=-1)
    masked = torch.zeros_like(error, dtype=torch.bool)
    masked.scatter_(1, idx_mask - model.num_prefix_tokens, True)
    own = neutral(prediction, cfg.patch_size, cfg.channels) if cfg.norm_pix_loss else None
    wanted = neutral(target, cfg.patch_size, cfg.channels) if cfg.norm_pix_loss else None
    if cfg.norm_pix_loss:
        mean = patches.mean(dim=-1, keepdim=True)
        std = (patches.var(dim=-1, keepdim=True) + 1e-6).sqrt()
        prediction = prediction * std + mean
    recon = model.denormalize(utils.unpatchify(prediction, cfg.patch_size, cfg.channels))
    original = model.denormalize(x)
    mask_pixels = utils.unpatchify(masked.float()[..., None].expand_as(patches).contiguous(),
                                   cfg.patch_size, cfg.channels)
    masked_view = original * (1 - mask_pixels) + _MASK_GRAY * mask_pixels
    pasted = original * (1 - mask_pixels) + recon * mask_pixels
    model.train(was_training)
    grid = cfg.image_size // cfg.patch_size
    results = []
    for i in range(images.shape[0]):
        loss = error[i][masked[i]].mean().item()
        results.append(Reconstruction(
            original[i].cpu(), masked_view[i].cpu(), recon[i].cpu(), pasted[i].cpu(),
            error[i].view(grid, grid).cpu(), masked[i].view(grid, grid).cpu(), loss,
            own[i].cpu() if own is not None else None,
            wanted[i].cpu() if wanted is not None else None,
            bits=16 if images.dtype == torch.uint16 else 8))
    return results


def to_pil(image: Tensor, size: int | None = None) -> Image.Image:
    array = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    pil = Image.fromarray(np.ascontiguousarray(array))
    return pil.resize((size, size), Image.NEAREST) if size and size != pil.width else pil


def _mask_pixels(result: Reconstruction) -> Tensor:
    """The masked patches as a (1, H, W) float image: 1 where masked."""
    scale = result.original.shape[-1] // result.patch_masked.shape[-1]
    mask = result.patch_masked.float().repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    return mask[None]


def panels(result: Reconstruction, size: int | None = None, view: View = View()) -> list[Image.Image]:
    """The four panels of the paper's figures, in :data:`PANEL_TITLES` order, shown as ``view``
    says (RGB 8-bit images unchanged); the masked patches are mid-grey on screen."""
    shown = fit(result.original, view, result.bits)
    mask = _mask_pixels(result)
    masked = shown(result.original) * (1 - mask) + _MASK_GRAY * mask
    return [to_pil(t, size) for t in
            (shown(result.original), masked, shown(result.reconstruction), shown(result.pasted))]


def model_panels(result: Reconstruction, size: int | None = None,
                 view: View = View()) -> list[Image.Image]:
    """The model's own output and its target, in :data:`MODEL_PANEL_TITLES` order; empty without
    norm_pix_loss (the reconstruction panel is then the output itself)."""
    if result.model_output is None or result.target_normalised is None:
        return []
    return [to_pil(select(result.model_output, view), size),
            to_pil(select(result.target_normalised, view), size)]


# The heat map's fixed scale, in the loss's target space (per-patch normalised pixels with
# norm_pix_loss, else ImageNet-normalised pixels): both have unit variance per patch, so predicting
# the patch mean scores ~1. One scale for every image and checkpoint makes heat maps comparable.
HEATMAP_MAX = 2.0
# viridis at five stops: dark blue (low error) to yellow (high); readable by colour-blind people.
_COLORMAP = torch.tensor([[0.267, 0.005, 0.329], [0.231, 0.322, 0.545], [0.129, 0.569, 0.549],
                          [0.365, 0.784, 0.388], [0.993, 0.906, 0.144]])


def colormap(values: Tensor) -> Tensor:
    """Values in [0, 1] (any shape) to RGB in [0, 1] with a trailing channel axis."""
    position = values.clamp(0, 1) * (len(_COLORMAP) - 1)
    low = position.floor().long().clamp(max=len(_COLORMAP) - 2)
    frac = (position - low)[..., None]
    return _COLORMAP[low] * (1 - frac) + _COLORMAP[low + 1] * frac


def error_heatmap(result: Reconstruction, size: int | None = None,
                  scale_max: float = HEATMAP_MAX, view: View = View()) -> Image.Image:
    """Per-patch error on a fixed scale (0 → ``scale_max``, see :func:`colorbar`) over the image;
    visible patches, which the loss ignores, are dimmed."""
    heat = colormap(result.patch_error / scale_max).permute(2, 0, 1)  # (3, g, g)
    heat = torch.where(result.patch_masked[None], heat, heat * 0.35)
    scale = result.original.shape[-1] // result.patch_error.shape[-1]
    heat = heat.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    return to_pil(0.3 * fit(result.original, view, result.bits)(result.original) + 0.7 * heat, size)


def colorbar(width: int = 256, height: int = 14) -> Image.Image:
    """The heat map's colour scale as a horizontal strip, low error on the left."""
    ramp = colormap(torch.linspace(0, 1, width))  # (width, 3)
    strip = ramp[None].expand(height, width, 3)
    return Image.fromarray((strip * 255).round().byte().numpy())


def read_uploads(paths: Iterable[str | Path], channels: int, size: int, limit: int | None = None
                 ) -> tuple[list[tuple[str, Tensor]], list[tuple[str, str]]]:
    """Image files read for a model of ``channels`` channels and ``size`` pixels, as
    :func:`reconstruct_uploads` takes them: (readable images, refused files with the reason).

    Each image is its centre square at ``size`` (a uint8 or uint16 (C, size, size) tensor from
    :func:`mae_core.pixels.read_for`), what the model is shown, named by its file name. A file that
    cannot be used (not an image, corrupt, a decompression bomb, a channel count the model does
    not take, unreadable) is refused with a reason for a person to read, so one bad file spoils
    nothing; so is every file past the first ``limit`` images.

    Example:
        >>> images, refused = read_uploads(["photo.jpg", "notes.txt"], channels=3, size=64)
        >>> refused
        [('notes.txt', 'not an image file (or a format Pillow cannot read)')]
        >>> reconstruct_uploads(model, images, mask_ratio=0.75, seed=0)
    """
    from mae_core.images import ImageError, center_square
    from mae_core.pixels import read_for

    images: list[tuple[str, Tensor]] = []
    refused: list[tuple[str, str]] = []
    for path in map(Path, paths):
        if limit is not None and len(images) >= limit:
            refused.append((path.name, f"over the {limit} images of one request"))
            continue
        try:
            # Cut down before the next file decodes: 16 full-size 8000×8000 uploads held at once
            # took 4 GB.
            image = center_square(read_for(path, channels, name=path.name), size)
            images.append((path.name, image))
        except ImageError as err:  # its message already starts with the file's name
            refused.append((path.name, str(err).removeprefix(f"{path.name}: ")))
        except OSError as err:
            refused.append((path.name, f"could not be read ({err.strerror or err})"))
    return images, refused


@dataclass
class UploadView:
    """What the Reconstruct tab shows for one image."""

    name: str
    panels: list[Image.Image]  # PANEL_TITLES order
    heatmap: Image.Image
    loss: float
    masked_patches: int
    model_panels: list[Image.Image] = field(default_factory=list)  # MODEL_PANEL_TITLES order


def reconstruct_uploads(model: MaskedAutoencoder, images: list[tuple[str, Image.Image | Tensor]],
                        mask_ratio: float, seed: int, display: int | None = None,
                        view: View = View()) -> list[UploadView]:
    """Decoded images of any size (RGB PIL images, or (C, H, W) uint8/uint16 tensors from
    :func:`mae_core.pixels.read_for`) → centre crops at the model's size → the paper's four panels,
    the heat map and the loss, per image, shown as ``view`` says. The app's Reconstruct tab and the
    benchmark both run this."""
    from mae_core.images import center_square
    from mae_core.pixels import same_dtype

    size = model.cfg.image_size
    batch = torch.stack(same_dtype([center_square(image, size) for _, image in images]))
    results = reconstruct(model, batch, mask_ratio=mask_ratio, seed=seed)
    display = display or max(160, size)  # small models' panels are scaled up (nearest) to be seen
    return [UploadView(name, panels(result, display, view), error_heatmap(result, display, view=view),
                       result.loss, int(result.patch_masked.sum()),
                       model_panels(result, display, view))
            for (name, _), result in zip(images, results)]


def grid_image(results: list[Reconstruction], size: int | None = None,
               model_output: bool = False, view: View = View()) -> Image.Image:
    """All results as rows of four panels: what a run's ``previews/step_*.png`` shows.
    ``model_output`` appends :func:`model_panels` to each row (with norm_pix_loss)."""
    rows = [panels(r, size, view) + (model_panels(r, size, view) if model_output else [])
            for r in results]
    side, columns = rows[0][0].width, len(rows[0])
    canvas = Image.new("RGB", (columns * side + 2 * (columns - 1),
                               len(rows) * side + 2 * (len(rows) - 1)), "white")
    for r, row in enumerate(rows):
        for c, panel in enumerate(row):
            canvas.paste(panel, (c * (side + 2), r * (side + 2)))
    return canvas
