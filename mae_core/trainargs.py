"""The trainer's command line: flags generated from the config dataclasses.

``python -m mae_core.train`` (:mod:`mae_core.train`) parses with :func:`build_parser`; the run
directory the flags name is checked, before anything is written, by :mod:`mae_core.runsetup`.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from mae_core.checks import NORMALIZATIONS
from mae_core.config import (ACCELERATORS, POLICIES, PRECISIONS, PRESETS, ModelConfig,
                             TrainConfig, parse_bool)
from mae_core.rundir import DEFAULT_RUNS_DIR

# What each config field means on the command line (the app's form has its own, shorter hints).
# tests/test_trainargs.py checks that every field of ModelConfig and TrainConfig has one.
FIELD_HELP = {
    # ModelConfig
    "preset": f"the encoder (and its decoder): {', '.join(PRESETS)}",
    "image_size": "training image side in pixels",
    "patch_size": "ViT patch side in pixels; must divide the image size",
    "mask_ratio": "share of patches hidden from the encoder (the paper: 0.75)",
    "decoder_dim": "decoder width (auto: the preset's)",
    "decoder_depth": "decoder blocks (auto: the preset's)",
    "decoder_heads": "decoder attention heads (auto: the preset's)",
    "norm_pix_loss": "predict each patch's normalised pixels (the paper's better features)",
    "policy": f"{' or '.join(POLICIES)}: ddp-clean removes the classifier head and freezes the "
              "encoder mask token so plain DDP runs; reference is the naive recipe",
    "timm_model": "any timm VisionTransformer name, replacing the preset's encoder",
    "in_chans": "values per pixel (1 grayscale, 3 RGB, N multi-band TIFF; auto: the data's)",
    "normalize": f"input normalisation: {', '.join(NORMALIZATIONS)} (auto: ImageNet's for 8-bit "
                 "RGB data, else the data set's own)",
    "pixel_mean": "per-channel mean as fractions of full scale, e.g. 0.45 or 0.4,0.4,0.3",
    "pixel_std": "per-channel standard deviation as fractions of full scale",
    # TrainConfig
    "data": "an image folder, a prepared set (python -m mae_core.data optimize) or a URL; "
            "empty: the sample photos",
    "batch_size": "images per process per step",
    "accumulate_grad_batches": "batches whose gradients are summed per optimizer step",
    "base_lr": "learning rate per 256 images of effective batch (auto: the paper's 1.5e-4, at "
               "least 1e-3 in all)",
    "weight_decay": "AdamW weight decay",
    "warmup_fraction": "share of the steps spent warming up the learning rate",
    "max_steps": "optimizer steps to train (-1: train by max epochs)",
    "max_epochs": "epochs to train (none: max steps alone ends the run; required when max steps "
                  "is -1)",
    "accelerator": f"{', '.join(ACCELERATORS)} (auto: every GPU, else CPU processes over gloo)",
    "devices": "processes per node: GPUs, or CPU processes (auto: every GPU, else one CPU process "
               "per 2 cores, at least 2 where there are 2 cores)",
    "gpus": "this run's GPUs, e.g. 0,1 (empty: all)",
    "num_nodes": "nodes of a torchrun or SLURM job",
    "precision": f"{', '.join(PRECISIONS)} (auto: bf16-mixed on GPUs and on CPUs with AMX or "
                 "AVX-512 BF16)",
    "find_unused_parameters": "let DDP search for parameters without gradients each step "
                              "(auto: only for the reference policy)",
    "static_graph": "tell DDP the graph never changes (ddp-clean only)",
    "compile": "torch.compile the model (a minute of compiling, then faster steps)",
    "decode_on_device": "decode a prepared set's JPEGs on the GPU",
    "num_workers": "data loader workers per process (auto: from the CPU cores)",
    "seed": "random seed of weights, masks and data order",
    "log_every_n_steps": "steps between metric lines",
    "checkpoint_every_n_steps": "steps between checkpoints (last.ckpt)",
    "preview_every_n_steps": "steps between reconstruction previews",
    "num_previews": "images in each preview (0: none)",
    "val_fraction": "share of the data held out for validation (auto: 10%% of 100+ images)",
    "val_count": "images held out for validation (instead of val fraction)",
    "eval_every_n_steps": "steps between held-out evaluations (0: never)",
    "eval_data": "a labelled folder (folder/<class>/*.jpg) for the kNN monitor (empty: the data "
                 "folder's class subfolders)",
    "eval_max_images": "images per held-out evaluation",
    "weight_snapshots": "weight snapshots (the whole model, hard links where unchanged) kept for the Reconstruct tab's history",
}


# --- flags --------------------------------------------------------------------------------------

def _flag_parser(text: str, annotation: str):
    def parse(value: str) -> Any:
        if value.lower() in ("auto", "none", "null") and "None" in annotation:
            return None
        if "bool" in annotation:
            try:
                return parse_bool(value)
            except argparse.ArgumentTypeError:
                raise argparse.ArgumentTypeError(f"{text} must be true or false, got {value!r}") from None
        kind = "int" if "int" in annotation else "float" if "float" in annotation else None
        try:
            return int(value) if kind == "int" else float(value) if kind == "float" else value
        except ValueError:
            # Named like the config's own errors: "2.5" for a batch size is refused, not rounded.
            what = "an integer" if kind == "int" else "a number"
            raise argparse.ArgumentTypeError(f"{text} must be {what}, got {value!r}") from None
    parse.__name__ = annotation
    return parse


def _default_text(f: dataclasses.Field) -> str:
    value = f.default
    if value is None:
        return "none" if f.name == "max_epochs" else "auto"  # no epoch limit: max steps ends it
    return repr(value) if value == "" else str(value).lower() if isinstance(value, bool) else str(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mae_core.train",
        description="Pretrain a Masked Autoencoder with Lightning DDP. Flags override --config; "
                    "'auto' chooses for this machine.",
        epilog="Exit codes: 0 finished or stopped on request, 1 training failed or was "
               "terminated, 2 the config or data was refused.")
    run = parser.add_argument_group("run")
    run.add_argument("--config", help="RUN.yaml (model: and train: sections); flags override it")
    run.add_argument("--run-dir", help="the run directory (default: a new one under --runs-dir)")
    run.add_argument("--runs-dir", default=DEFAULT_RUNS_DIR,
                     help="where new runs are created (default %(default)s)")
    run.add_argument("--resume", action="store_true", help="continue --run-dir from last.ckpt")
    run.add_argument("--auto-resume", action="store_true",
                     help="continue --run-dir if it has a checkpoint, else start it; exit 0 if "
                          "it already finished (a job SLURM may requeue, a script run again)")
    for cls, title in ((ModelConfig, "model"), (TrainConfig, "train")):
        group = parser.add_argument_group(title)
        for f in dataclasses.fields(cls):
            flags = ["--" + f.name.replace("_", "-")]
            if f.name == "preset":
                flags.insert(0, "--model")
            group.add_argument(*flags, dest=f.name, default=argparse.SUPPRESS,
                               type=_flag_parser(flags[0], str(f.type)), metavar=_metavar(f),
                               help=f"{FIELD_HELP[f.name]} (default {_default_text(f)})")
    return parser


def _metavar(f: dataclasses.Field) -> str:
    kind = str(f.type)
    for word, meta in (("bool", "BOOL"), ("int", "N"), ("float", "X")):
        if word in kind:
            return meta
    return "TEXT"
