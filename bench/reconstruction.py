"""Reconstruction latency: one uploaded photo through the Reconstruct tab's own functions.

A request is what the app does with an upload: :func:`mae_core.images.open_rgb` decodes the bytes,
then :func:`mae_core.reconstruct.reconstruct_uploads` crops, masks, encodes, decodes and draws the
four panels and the heat map. The model is a freshly initialised one (the time does not depend on
the weights), saved with :func:`mae_core.weights.save_weights` and loaded with
:func:`mae_core.weights.load_model`, as the app loads a checkpoint; that load is timed once, apart,
because the app keeps loaded models in a cache.
"""

from __future__ import annotations

import io
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.stats import ms_summary


def sample_upload(path: str | None = None) -> tuple[bytes, str]:
    """The bytes of the photo to "upload": ``path`` as is, or the first sample photo as a JPEG."""
    if path:
        return Path(path).read_bytes(), Path(path).name
    from mae_core.data import find_images
    from mae_core.images import open_rgb

    source = Path(find_images("")[0])
    image = open_rgb(source)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue(), f"{source.stem}.jpg"


def _load_fresh_model(preset: str, image_size: int, patch_size: int) -> tuple[Any, float]:
    """A new model of ``preset`` saved to a scratch file and loaded back as the app loads one; the
    model and the seconds :func:`~mae_core.weights.load_model` took."""
    import torch

    from mae_core.config import ModelConfig
    from mae_core.model import MaskedAutoencoder
    from mae_core.weights import load_model, save_weights

    torch.manual_seed(0)
    cfg = ModelConfig(preset=preset, image_size=image_size, patch_size=patch_size)
    with tempfile.TemporaryDirectory(prefix="mae-bench-recon-") as scratch:
        path = Path(scratch) / "model.safetensors"
        save_weights(MaskedAutoencoder(cfg), path)
        started = time.perf_counter()
        model = load_model(path)
        return model, time.perf_counter() - started


def benchmark_reconstruction(preset: str, image_size: int, patch_size: int, upload: bytes,
                             upload_name: str, runs: int, warmup: int) -> dict[str, Any]:
    """p50/p95/mean of ``runs`` requests (after ``warmup``) for one upload, with every core."""
    import torch

    from mae_core.images import open_rgb
    from mae_core.reconstruct import reconstruct_uploads

    threads_before = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        model, load_s = _load_fresh_model(preset, image_size, patch_size)
        mask_ratio = model.cfg.mask_ratio

        def request() -> None:
            image = open_rgb(upload, name=upload_name)
            [view] = reconstruct_uploads(model, [(upload_name, image)], mask_ratio, seed=0)
            assert len(view.panels) == 4 and view.heatmap is not None  # the whole answer was drawn

        for _ in range(warmup):
            request()
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            request()
            times.append(time.perf_counter() - started)
        summary = ms_summary(times)
        return {"preset": preset, "image_size": image_size, "patch_size": patch_size,
                "p50_ms": summary["p50_ms"], "p95_ms": summary["p95_ms"],
                "mean_ms": summary["mean_ms"], "runs": runs, "warmup": warmup,
                "threads": torch.get_num_threads(), "load_ms": 1000 * load_s,
                "mask_ratio": mask_ratio}
    finally:
        torch.set_num_threads(threads_before)
