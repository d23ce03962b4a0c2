"""``python -m bench.step_profile``: where one MAE training step's time goes on this device.

The model, optimizer and attention kernel of the trainer (:mod:`mae_core.model`) stepped on random
uint8 images already on the device, without Lightning, data or callbacks: the ceiling the trainer can reach. It prints the step time, images/s and MFU of the whole step and
of its parts (encoder, decoder, backward, optimizer), then the torch profiler's kernels by device
time. Compare its images/s with ``python -m bench`` to see what Lightning, the loader and the
callbacks cost.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import time
from collections.abc import Callable

import torch

from bench.args import non_negative, positive
from mae_core.config import PRECISIONS, PRESETS, ModelConfig
from mae_core.flops import training_flops_per_image
from mae_core.hardware import device_peak, mfu
from mae_core.model import MaskedAutoencoder, adamw, draw_token_mask, training_attention


def _autocast(device: str, precision: str) -> contextlib.AbstractContextManager:
    if precision.startswith("bf16"):
        return torch.autocast(device, dtype=torch.bfloat16)
    if precision.startswith("16"):
        return torch.autocast(device, dtype=torch.float16)
    return contextlib.nullcontext()


def _timed(fn: Callable[[], object], device: str, steps: int, warmup: int) -> float:
    """Seconds per call of ``fn``, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def build(args: argparse.Namespace, device: str) -> tuple[MaskedAutoencoder, torch.optim.Optimizer]:
    cfg = ModelConfig(preset=args.preset, image_size=args.image_size, patch_size=args.patch_size)
    model = MaskedAutoencoder(cfg).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(params, 1e-4, torch.device(device))
    return model, optimizer


def parts(model: MaskedAutoencoder, optimizer: torch.optim.Optimizer, args: argparse.Namespace,
          device: str) -> dict[str, Callable[[], object]]:
    """The step and its parts, each a closure over one fixed batch."""
    cfg = model.cfg
    images = torch.randint(0, 256, (args.batch_size, 3, cfg.image_size, cfg.image_size),
                           dtype=torch.uint8, device=device)
    generator = torch.Generator(device=device)
    generator.manual_seed(0)
    loss_fn = torch.compile(model.loss) if args.compile else model.loss

    def masks() -> tuple[torch.Tensor, torch.Tensor]:
        return draw_token_mask(args.batch_size, cfg.num_patches, cfg.mask_ratio, generator)

    def encoder() -> object:
        with torch.no_grad(), _autocast(device, args.precision):
            return model.backbone.encode(model.normalize(images), idx_keep=masks()[0])

    def forward() -> object:
        with torch.no_grad(), _autocast(device, args.precision):
            return loss_fn(model.normalize(images), *masks())

    def forward_backward() -> object:
        with _autocast(device, args.precision), training_attention(images.device):
            loss = loss_fn(model.normalize(images), *masks())
        loss.backward()
        return loss

    def step() -> object:
        loss = forward_backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return {"encoder forward": encoder, "forward": forward, "forward+backward": forward_backward,
            "whole step": step}


def compare(model: MaskedAutoencoder, args: argparse.Namespace, device: str, rounds: int = 6
            ) -> dict[str, float]:
    """Best seconds per step of the trainer's step against its older choices, interleaved.

    The three variants take turns, ``rounds`` times ``args.steps`` steps each, so a busy machine
    slows them alike; the best round of each is kept.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    older = torch.optim.AdamW(params, lr=1e-6, betas=(0.9, 0.95), foreach=True)
    fused = adamw(params, 1e-6, torch.device(device))
    images = torch.randint(0, 256, (args.batch_size, 3, model.cfg.image_size, model.cfg.image_size),
                           dtype=torch.uint8, device=device)
    generator = torch.Generator(device=device).manual_seed(0)

    def step(optimizer: torch.optim.Optimizer, attention: bool) -> None:
        idx = draw_token_mask(args.batch_size, model.cfg.num_patches, model.cfg.mask_ratio, generator)
        # The kernel's choice reads the autocast state: it comes second.
        with _autocast(device, args.precision), (
                training_attention(images.device) if attention else contextlib.nullcontext()):
            loss = model.loss(model.normalize(images), *idx)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    variants = {"multi-tensor AdamW, default attention": (older, False),
                "fused AdamW, default attention": (fused, False),
                "fused AdamW, trainer's attention (this trainer)": (fused, True)}
    best = dict.fromkeys(variants, math.inf)
    for _ in range(rounds):
        for name, (optimizer, attention) in variants.items():
            seconds = _timed(functools.partial(step, optimizer, attention), device, args.steps, 1)
            best[name] = min(best[name], seconds)
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.step_profile", description=__doc__)
    p.add_argument("--preset", default="vit-base", choices=list(PRESETS))
    p.add_argument("--image-size", type=positive, default=224)
    p.add_argument("--patch-size", type=positive, default=16)
    p.add_argument("--batch-size", type=positive, default=256)
    p.add_argument("--precision", default="bf16-mixed", choices=list(PRECISIONS))
    p.add_argument("--steps", type=positive, default=20)
    p.add_argument("--warmup", type=non_negative, default=5)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--rows", type=non_negative, default=30, help="profiler rows to print (0: none)")
    p.add_argument("--compare", action="store_true",
                   help="instead: the step against the trainer's older optimizer and attention "
                        "choices, interleaved, best of 6 rounds of --steps steps")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.benchmark = True  # as the trainer (mae_core.train) sets it
    model, optimizer = build(args, device)
    flops = training_flops_per_image(model.cfg)
    peak = device_peak(device, args.precision)
    print(f"{args.preset} {args.image_size} px / patch {args.patch_size}, batch {args.batch_size}, "
          f"{args.precision}{', compiled' if args.compile else ''} on {device}; "
          f"{flops / 1e9:.2f} GFLOP/image trained, peak {peak.flops / 1e9:,.0f} GFLOP/s")
    if args.compare:
        for name, seconds in compare(model, args, device).items():
            print(f"  {name:48s} {seconds * 1e3:8.1f} ms/step  {args.batch_size / seconds:8.1f} "
                  f"images/s, MFU {mfu(args.batch_size / seconds, flops, peak.flops):.1%}")
        return 0
    closures = parts(model, optimizer, args, device)
    for name, fn in closures.items():
        seconds = _timed(fn, device, args.steps, args.warmup)
        rate = args.batch_size / seconds
        share = f", MFU {mfu(rate, flops, peak.flops):.1%}" if name == "whole step" else ""
        print(f"  {name:17s} {seconds * 1e3:8.2f} ms  {rate:9.1f} images/s{share}")
    if args.rows:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(5):
                closures["whole step"]()
            if device == "cuda":
                torch.cuda.synchronize()
        sort = "device_time_total" if device == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=args.rows, max_name_column_width=70))
    return 0


if __name__ == "__main__":
    from mae_core.process import exit_quickly

    exit_quickly(main())
