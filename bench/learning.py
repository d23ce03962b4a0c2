"""Does a default-sized run learn? ``python -m bench.learning [--device cuda] [--only NAME ...]``.

Trains the sample photos with the trainer's own pieces (:class:`MAELightning`'s optimiser and
schedule, :class:`ImageFolderDataset`'s augmentation, seeded masks) in one process, one variant of
the defaults after another, and reports the loss on fixed centre crops with fixed masks (the
"validation" figure: every photo, masks seeded as the Reconstruct tab's) at a few steps, the last
epoch-mean training loss and the wall time. One process with batch 64 stands for the default CPU
run's 2 processes × 32: the same images and learning rate per optimizer step.

``python -m bench.learning --figure RUN/model.safetensors OUT.png`` draws a run's reconstructions of
two sample photos (the README's figures) and prints its loss on the fixed crops and masks.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from timm.optim import param_groups_weight_decay
from torch.utils.data import DataLoader

from mae_core.config import ModelConfig, TrainConfig
from mae_core.data import ImageFolderDataset, preview_images, sample_photo_paths
from mae_core.model import MaskedAutoencoder, draw_token_mask, seeded_generator
from mae_core.reconstruct import grid_image, reconstruct
from mae_core.weights import save_weights

BATCH = 64  # the default CPU run: 2 processes × batch 32


def variants() -> dict[str, tuple[dict, dict]]:
    """name → (ModelConfig overrides, TrainConfig overrides + ``lr``: the effective lr).

    Each is the current defaults (``norm_pix_loss`` off) but for what its name says. The old
    defaults had ``norm_pix_loss`` on; "old-default" and the "-nonorm" variant were written when
    it was the default, so after the switch "old-default" was not the old recipe and "-nonorm"
    repeated "lr1e-3-wu20" (now "-normpix": the paper's loss at the new rate)."""
    old = 1.5e-4 * BATCH / 256
    w = dict(warmup_fraction=0.2, max_steps=300)
    v: dict[str, tuple[dict, dict]] = {
        "old-default": ({"norm_pix_loss": True}, dict(lr=old, warmup_fraction=0.05, max_steps=300)),
        "lr1e-3-wu20": ({}, dict(lr=1e-3, **w)),
        "lr3e-4-wu20": ({}, dict(lr=3e-4, **w)),
        "lr2e-3-wu20": ({}, dict(lr=2e-3, **w)),
        "lr1e-3-wu5": ({}, dict(lr=1e-3, warmup_fraction=0.05, max_steps=300)),
        "lr1e-3-wu20-p16": ({"patch_size": 16}, dict(lr=1e-3, **w)),
        "lr1e-3-wu20-normpix": ({"norm_pix_loss": True}, dict(lr=1e-3, **w)),
        "lr1e-3-wu20-dec2": ({"decoder_depth": 2}, dict(lr=1e-3, **w)),
        "lr1e-3-wu20-wd0": ({}, dict(lr=1e-3, weight_decay=0.0, **w)),
        "lr1e-3-wu20-1000": ({}, dict(lr=1e-3, warmup_fraction=0.2, max_steps=1000)),
    }
    return v


def schedule(optimizer: torch.optim.Optimizer, total: int, warmup_fraction: float):
    """The same warm-up + cosine as :meth:`MAELightning.configure_optimizers`."""
    warmup = min(total - 1, int(total * warmup_fraction))
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total - warmup))
    if warmup == 0:
        return cosine
    linear = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1e-3, total_iters=warmup)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [linear, cosine], milestones=[warmup])


def fixed_loss(model: MaskedAutoencoder, crops: torch.Tensor) -> float:
    return sum(r.loss for r in reconstruct(model, crops, seed=0)) / len(crops)


def run(name: str, model_kw: dict, train_kw: dict, device: str, out: Path,
        eval_every: int) -> dict:
    torch.manual_seed(0)
    cfg = ModelConfig(**model_kw)
    t = dict(train_kw)
    lr, steps = t.pop("lr"), t.pop("max_steps")
    tcfg = TrainConfig(**t)
    model = MaskedAutoencoder(cfg).to(device)
    groups = param_groups_weight_decay(model, tcfg.weight_decay,
                                       no_weight_decay_list=("*cls_token", "*pos_embed", "*mask_token"))
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))
    scheduler = schedule(optimizer, steps, tcfg.warmup_fraction)
    dataset = ImageFolderDataset(sample_photo_paths(), cfg.image_size, length=4 * BATCH)
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=True, drop_last=True,
                        num_workers=4 if device != "cpu" else 0, persistent_workers=device != "cpu")
    crops = preview_images("", cfg.image_size, 17)
    generator = seeded_generator(0, device)
    curve, epoch_losses, running = {0: fixed_loss(model, crops)}, [], []
    step, start = 0, time.perf_counter()
    while step < steps:
        for images in loader:
            x = model.normalize(images.to(device))
            keep, mask = draw_token_mask(x.shape[0], cfg.num_patches, cfg.mask_ratio, generator)
            loss = model.loss(x, keep, mask)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            running.append(loss.item())
            step += 1
            if step % eval_every == 0 or step == steps:
                curve[step] = fixed_loss(model, crops)
            if step == steps:
                break
        epoch_losses.append(sum(running) / len(running))
        running = []
    wall = time.perf_counter() - start
    model.eval()
    grid_image(reconstruct(model, crops[:4], seed=0), 128, model_output=cfg.norm_pix_loss).save(
        out / f"{name}.png")
    save_weights(model.cpu(), out / f"{name}.safetensors", step=steps)
    row = dict(name=name, model=model_kw, train=train_kw, fixed=curve,
               last_epoch_loss=epoch_losses[-1], first_epoch_loss=epoch_losses[0], wall_s=wall)
    print(json.dumps(row), flush=True)
    return row


def figure(weights: str, path: str, count: int = 2, size: int = 64) -> float:
    """The README's figure: ``count`` sample photos through a run's weights (mask seed 0), the
    paper's four panels and, with norm_pix_loss, the model's own output and target. Returns the
    loss on fixed crops and masks of all 17 photos."""
    from mae_core.weights import load_model

    model = load_model(weights)
    crops = preview_images("", model.cfg.image_size, 17)
    grid_image(reconstruct(model, crops[:count], seed=0), size,
               model_output=model.cfg.norm_pix_loss).save(path, optimize=True)
    return fixed_loss(model, crops)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.learning", description=(
        "Does a default-sized run learn? Trains the sample photos in one process (batch 64, as "
        "the default CPU run's 2 x 32), one variant of the defaults after another, and prints "
        "each one's loss on fixed crops and masks as it goes."))
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--only", nargs="*", metavar="NAME",
                        help=f"these variants alone: {', '.join(variants())}")
    parser.add_argument("--out", default="test-artifacts/learning",
                        help="where each variant's weights, picture and results.json go "
                             "(default %(default)s)")
    parser.add_argument("--eval-every", type=int, default=100,
                        help="steps between fixed-crop losses (default %(default)s)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (default 0: torch's own choice)")
    parser.add_argument("--steps", type=int, help="override every variant's max_steps (a smoke test)")
    parser.add_argument("--figure", nargs=2, metavar=("WEIGHTS", "PNG"),
                        help="draw a run's reconstructions of the sample photos instead")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.only or ()) - set(variants()))
    if unknown:  # it ran nothing and exited 0
        parser.error(f"--only: no variant named {', '.join(unknown)}")
    if args.figure:
        print(f"fixed-crop loss {figure(*args.figure):.4f}")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, (model_kw, train_kw) in variants().items():
        if args.only and name not in args.only:
            continue
        if args.steps:
            train_kw = dict(train_kw, max_steps=args.steps)
        rows.append(run(name, model_kw, train_kw, args.device, out, args.eval_every))
        (out / "results.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    from mae_core.process import exit_quickly

    exit_quickly(main())
