"""mae_core.reconstruct: the reconstruction panels borrow each masked patch's mean and contrast from
the input under norm_pix_loss, and the model's own output is shown beside them as it is; uploads are
read at the model's size, each unusable file refused by name with its reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from lightly.models import utils
from PIL import Image

from mae_core.config import ModelConfig
from mae_core.model import MaskedAutoencoder
from mae_core.reconstruct import (MODEL_PANEL_TITLES, NEUTRAL_CONTRAST, grid_image, model_panels,
                                  neutral, panels, read_uploads, reconstruct, reconstruct_uploads,
                                  to_pil)

MODEL = ModelConfig(image_size=32, patch_size=8, norm_pix_loss=True)


def photos(count: int = 2, seed: int = 0) -> torch.Tensor:
    """uint8 images whose patches differ in brightness and colour (a gradient plus noise)."""
    generator = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 200, 32)
    base = torch.stack([ramp[None, :].expand(32, 32), ramp[:, None].expand(32, 32),
                        200 - ramp[None, :].expand(32, 32)])
    noise = torch.randint(0, 55, (count, 3, 32, 32), generator=generator)
    return (base[None] + noise).to(torch.uint8)


def silent(cfg: ModelConfig) -> MaskedAutoencoder:
    """A model that predicts zero for every patch: no brightness, no colour, no structure."""
    torch.manual_seed(0)
    model = MaskedAutoencoder(cfg)
    torch.nn.init.zeros_(model.prediction_head.weight)
    torch.nn.init.zeros_(model.prediction_head.bias)
    return model


def patch_means(images: torch.Tensor, patch: int = 8) -> torch.Tensor:
    """(3, H, W) → each patch's mean per channel, (N, 3)."""
    return utils.patchify(images[None], patch)[0].view(-1, patch * patch, 3).mean(dim=1)


def test_a_model_that_predicts_nothing_still_gets_the_inputs_colours_in_the_reconstruction():
    """The reason for the model-output panel: the reconstruction of a zero prediction is each
    masked patch filled with that original patch's own mean, so it follows the photo's gradient."""
    [result] = reconstruct(silent(MODEL), photos(1), seed=0)
    masked = result.patch_masked.flatten()
    recon = patch_means(result.reconstruction)[masked]
    original = patch_means(result.original)[masked]
    # The original's brightness and colour, patch by patch (ImageNet per-channel std makes the
    # flat fill differ a little per channel, not per patch): they vary as the input does...
    assert recon.mean(dim=1).std() > 0.04
    assert torch.corrcoef(torch.stack([recon.mean(dim=1), original.mean(dim=1)]))[0, 1] > 0.99
    # ...while the model's own output is flat neutral grey: it predicted nothing.
    assert torch.allclose(result.model_output, torch.full_like(result.model_output, 0.5))


def test_model_output_is_the_prediction_on_a_neutral_grey_and_the_target_the_same_way():
    model = MaskedAutoencoder(MODEL)
    images = photos(2, seed=3)
    results = reconstruct(model, images, seed=4)
    x = model.normalize(images)
    target = neutral(model.targets(x), MODEL.patch_size)
    model.eval()
    with torch.no_grad():
        # the same masks as reconstruct draws (image i from seed + i), all patches decoded
        from mae_core.reconstruct import draw_masks

        keep, _ = draw_masks(2, MODEL.num_patches, MODEL.mask_ratio, 4)
        prediction = neutral(model.decode(x, keep, None), MODEL.patch_size)
    for i, result in enumerate(results):
        assert torch.allclose(result.target_normalised, target[i], atol=1e-5)
        assert torch.allclose(result.model_output, prediction[i], atol=1e-5)
        # No image statistics in either: every target patch averages mid-grey (where nothing clips).
        means = patch_means(result.target_normalised).mean(dim=1)
        assert torch.allclose(means, torch.full_like(means, 0.5), atol=0.05)


def test_neutral_draws_one_fixed_contrast():
    values = torch.tensor([-1.0, 0.0, 1.0, 10.0]).repeat_interleave(48).view(1, 4, 48)
    drawn = utils.patchify(neutral(values, 4), 4)[0, :, 0]
    assert drawn.tolist() == pytest.approx([0.5 - NEUTRAL_CONTRAST, 0.5, 0.5 + NEUTRAL_CONTRAST, 1.0])


def test_without_norm_pix_loss_the_reconstruction_is_the_output_and_no_extra_panels():
    cfg = ModelConfig(image_size=32, patch_size=8, norm_pix_loss=False)
    [result] = reconstruct(silent(cfg), photos(1), seed=0)
    assert result.model_output is None and result.target_normalised is None
    assert model_panels(result) == []
    # a zero prediction in ImageNet-normalised space is the ImageNet mean colour, everywhere
    mean = torch.tensor([0.485, 0.456, 0.406])
    assert torch.allclose(patch_means(result.reconstruction), mean.expand(16, 3), atol=1e-4)


def test_uploads_carry_the_model_panels_and_the_grid_can_show_them():
    model = MaskedAutoencoder(MODEL)
    upload = Image.fromarray(photos(1)[0].permute(1, 2, 0).numpy())
    [view] = reconstruct_uploads(model, [("a.png", upload)], 0.75, 0, display=64)
    assert len(view.model_panels) == len(MODEL_PANEL_TITLES) == 2
    assert all(p.size == (64, 64) for p in view.model_panels)
    results = reconstruct(model, photos(2), seed=0)
    assert grid_image(results, 32).size == (4 * 32 + 6, 2 * 32 + 2)  # the previews: unchanged
    wide = grid_image(results, 32, model_output=True)
    assert wide.size == (6 * 32 + 10, 2 * 32 + 2)
    assert wide.crop((4 * 34, 0, 4 * 34 + 32, 32)).tobytes() == to_pil(results[0].model_output).tobytes()
    assert len(panels(results[0])) == 4


# --- reading uploads ----------------------------------------------------------------------------

def photo_file(path: Path, size=(48, 40)) -> Path:
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3),
                                                      dtype=np.uint8)).save(path)
    return path


def test_uploads_are_cut_to_the_model_size_as_they_are_decoded(tmp_path):
    """16 full-size uploads were all held at full resolution until the last decoded (4 GB for
    8000×8000 PNGs): each is now its centre square at the model's size as soon as it is read."""
    import tifffile

    wide = photo_file(tmp_path / "wide.png", size=(900, 300))
    scan = tmp_path / "scan.tif"
    tifffile.imwrite(scan, np.full((500, 700), 40_000, dtype=np.uint16))
    images, refused = read_uploads([wide, scan], 3, 32)
    assert refused == [] and [name for name, _ in images] == ["wide.png", "scan.tif"]
    assert all(tuple(image.shape) == (3, 32, 32) for _, image in images)
    gray, _ = read_uploads([str(scan)], 1, 24)
    assert tuple(gray[0][1].shape) == (1, 24, 24) and gray[0][1].dtype == torch.uint16


def test_unusable_uploads_and_those_past_the_limit_are_refused_by_name_with_the_reason(tmp_path):
    notes, missing = tmp_path / "notes.png", tmp_path / "gone.jpg"
    notes.write_text("these are my notes, not a picture")
    pictures = [photo_file(tmp_path / f"p{i}.png") for i in range(3)]
    images, refused = read_uploads([notes, missing, *pictures], 3, 32, limit=2)
    assert [name for name, _ in images] == ["p0.png", "p1.png"]
    reasons = dict(refused)
    assert list(reasons) == ["notes.png", "gone.jpg", "p2.png"]
    assert reasons["notes.png"].startswith("not an image") and "no such file" in reasons["gone.jpg"]
    assert reasons["p2.png"] == "over the 2 images of one request"


@pytest.mark.parametrize("channels", [3, 1])
def test_a_fifo_among_the_uploads_is_refused_not_waited_on(tmp_path, channels):
    """Reading a FIFO blocks until something writes to it: one among the uploads hung the request
    for good (the TIFF check opened every file before any was checked)."""
    import os
    import threading

    fifos = [tmp_path / "pipe.png", tmp_path / "pipe.tif"]
    for fifo in fifos:
        os.mkfifo(fifo)
    picture = Image.new("L" if channels == 1 else "RGB", (40, 40), 128)
    picture.save(tmp_path / "ok.png")
    answer = []
    reader = threading.Thread(target=lambda: answer.append(
        read_uploads([*fifos, tmp_path / "ok.png"], channels, 32)), daemon=True)
    reader.start()
    reader.join(20)
    if reader.is_alive():  # unblock the reader, so the test process can end
        for fifo in fifos:
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:  # nobody reads this one
                pass
    assert answer, "read_uploads waited on a FIFO"
    images, refused = answer[0]
    assert [name for name, _ in images] == ["ok.png"]
    assert dict(refused) == dict.fromkeys(["pipe.png", "pipe.tif"],
                                          "not an image file but a FIFO, a device or a socket")
