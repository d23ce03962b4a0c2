"""Typed configuration of a run: the single source of truth, saved as ``config.yaml``.

A run's config has two parts: :class:`ModelConfig` (what is trained) and :class:`TrainConfig`
(how). Every value is checked when the dataclass is built, and an impossible value raises
:class:`ConfigError` naming the field, so bad input is refused before any process starts.

Example:
    >>> cfg = RunConfig(model=ModelConfig(preset="vit-tiny", image_size=64, patch_size=8))
    >>> cfg.model.decoder().dim
    128
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

POLICIES = ("ddp-clean", "reference")
ACCELERATORS = ("auto", "cpu", "gpu")
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
# numpy and torch seed generators take 32-bit seeds; a reconstruction adds the image index.
MAX_SEED = 2**31 - 1


class ConfigError(ValueError):
    """An impossible configuration value. ``field`` names the offending argument."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


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
    decoder: DecoderSpec
    patch_size: int = 16


# The MAE paper's decoder (512 wide, 8 blocks, 16 heads) is kept for vit-base; the smaller encoders
# get lighter decoders, which the paper found to work as well and which small data sets need.
PRESETS: dict[str, Preset] = {
    "vit-tiny": Preset("vit_tiny_patch16_224", 192, DecoderSpec(128, 4, 4)),
    "vit-small": Preset("vit_small_patch16_224", 384, DecoderSpec(256, 4, 8)),
    "vit-base": Preset("vit_base_patch16_224", 768, DecoderSpec(512, 8, 16)),
}


def _is_int(value: Any) -> bool:
    # bool is an int subclass in Python; `batch_size: true` in a YAML file is a mistake, not 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_bool(text: str) -> bool:
    """A command-line switch's value: true/false, on/off, yes/no or 1/0."""
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false (on or off), got {text!r}")


def _require(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise ConfigError(field_name, message)


@dataclass(frozen=True)
class ModelConfig:
    """What is trained: the encoder preset, the input geometry, masking, decoder and policy.

    ``decoder_*`` of ``None`` take the preset's decoder. ``policy`` is ``ddp-clean`` (head removed,
    encoder mask token frozen: plain DDP works) or ``reference`` (the naive recipe).
    """

    preset: str = "vit-tiny"
    image_size: int = 64
    patch_size: int = 8
    mask_ratio: float = 0.75
    decoder_dim: int | None = None
    decoder_depth: int | None = None
    decoder_heads: int | None = None
    norm_pix_loss: bool = True
    policy: str = "ddp-clean"

    def __post_init__(self) -> None:
        _require(self.preset in PRESETS, "preset",
                 f"unknown model preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        _require(_is_int(self.patch_size) and 2 <= self.patch_size <= 32, "patch_size",
                 f"must be an integer in [2, 32], got {self.patch_size!r}")
        _require(_is_int(self.image_size) and 32 <= self.image_size <= 224, "image_size",
                 f"must be an integer in [32, 224], got {self.image_size!r}")
        _require(self.image_size % self.patch_size == 0, "image_size",
                 f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}")
        _require((self.image_size // self.patch_size) ** 2 >= 4, "patch_size",
                 f"patch_size={self.patch_size} leaves fewer than 4 patches in a "
                 f"{self.image_size}px image")
        _require(_is_number(self.mask_ratio) and 0 < self.mask_ratio < 1,
                 "mask_ratio", f"must be strictly between 0 and 1, got {self.mask_ratio!r}")
        _require(self.policy in POLICIES, "policy",
                 f"unknown parameter policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        for name in ("decoder_dim", "decoder_depth", "decoder_heads"):
            value = getattr(self, name)
            _require(value is None or (_is_int(value) and value > 0), name,
                     f"must be a positive integer, got {value!r}")
        spec = self.decoder()
        _require(spec.dim % spec.heads == 0, "decoder_heads",
                 f"decoder_dim={spec.dim} is not divisible by decoder_heads={spec.heads}")

    @property
    def preset_spec(self) -> Preset:
        return PRESETS[self.preset]

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def decoder(self) -> DecoderSpec:
        default = PRESETS[self.preset].decoder if self.preset in PRESETS else DecoderSpec(1, 1, 1)
        return DecoderSpec(
            dim=self.decoder_dim or default.dim,
            depth=self.decoder_depth or default.depth,
            heads=self.decoder_heads or default.heads,
        )


@dataclass(frozen=True)
class TrainConfig:
    """How a run trains: data, optimisation, hardware and what it writes while it goes.

    ``data`` of ``""`` is the embedded photo set. ``devices``/``precision``/``num_workers``/
    ``find_unused_parameters`` of ``None`` mean "choose for this machine and policy"; the run
    directory's ``config.yaml`` stores them resolved.
    """

    data: str = ""
    batch_size: int = 32
    base_lr: float = 1.5e-4
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    max_steps: int = 300
    max_epochs: int | None = None
    accelerator: str = "auto"
    devices: int | None = None
    num_nodes: int = 1
    precision: str | None = None
    find_unused_parameters: bool | None = None
    static_graph: bool = True
    compile: bool = False
    num_workers: int | None = None
    seed: int = 0
    log_every_n_steps: int = 1
    checkpoint_every_n_steps: int = 100
    preview_every_n_steps: int = 50
    num_previews: int = 4

    def __post_init__(self) -> None:
        _require(_is_int(self.batch_size) and 1 <= self.batch_size <= 4096, "batch_size",
                 f"must be an integer in [1, 4096], got {self.batch_size!r}")
        _require(_is_number(self.base_lr) and 0 < self.base_lr < 1, "base_lr",
                 f"must be in (0, 1), got {self.base_lr!r}")
        _require(_is_number(self.weight_decay) and 0 <= self.weight_decay < 1,
                 "weight_decay", f"must be in [0, 1), got {self.weight_decay!r}")
        _require(_is_number(self.warmup_fraction) and 0 <= self.warmup_fraction < 1,
                 "warmup_fraction",
                 f"must be in [0, 1), got {self.warmup_fraction!r}")
        _require(_is_int(self.max_steps) and (self.max_steps > 0 or self.max_steps == -1),
                 "max_steps", f"must be a positive integer (or -1 to train by epochs), "
                 f"got {self.max_steps!r}")
        _require(self.max_epochs is None or (_is_int(self.max_epochs) and self.max_epochs > 0),
                 "max_epochs", f"must be a positive integer, got {self.max_epochs!r}")
        _require(self.max_steps > 0 or self.max_epochs is not None, "max_steps",
                 "set max_steps or max_epochs, or the run never ends")
        _require(self.accelerator in ACCELERATORS, "accelerator",
                 f"must be one of {', '.join(ACCELERATORS)}, got {self.accelerator!r}")
        _require(self.devices is None or (_is_int(self.devices) and 1 <= self.devices <= 256),
                 "devices", f"must be a positive integer (or auto), got {self.devices!r}")
        _require(_is_int(self.num_nodes) and self.num_nodes >= 1, "num_nodes",
                 f"must be a positive integer, got {self.num_nodes!r}")
        _require(self.precision is None or self.precision in PRECISIONS, "precision",
                 f"must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        _require(self.num_workers is None or (_is_int(self.num_workers) and self.num_workers >= 0),
                 "num_workers", f"must be a non-negative integer, got {self.num_workers!r}")
        for name in ("log_every_n_steps", "checkpoint_every_n_steps", "preview_every_n_steps"):
            value = getattr(self, name)
            _require(_is_int(value) and value >= 1, name,
                     f"must be a positive integer, got {value!r}")
        _require(_is_int(self.num_previews) and 0 <= self.num_previews <= 16, "num_previews",
                 f"must be an integer in [0, 16], got {self.num_previews!r}")

    @property
    def world_size(self) -> int:
        return (self.devices or 1) * self.num_nodes

    def learning_rate(self) -> float:
        """The MAE scaling rule: lr = base_lr × effective batch / 256."""
        return self.base_lr * self.batch_size * self.world_size / 256


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        data = data or {}
        unknown = set(data) - {"model", "train"}
        if unknown:
            raise ConfigError(sorted(unknown)[0], "unknown config section")
        return cls(model=_build(ModelConfig, data.get("model") or {}),
                   train=_build(TrainConfig, data.get("train") or {}))

    def save(self, path: str | Path) -> None:
        from mae_core.fileio import atomic_write_text

        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        try:
            data = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError("config", f"no config file at {path}") from None
        except yaml.YAMLError as err:
            raise ConfigError("config", f"{path} is not valid YAML: {err}") from None
        if data is not None and not isinstance(data, dict):
            raise ConfigError("config", f"{path} must hold a mapping with model: and train:")
        return cls.from_dict(data)

    def with_overrides(self, **overrides: Any) -> RunConfig:
        """A copy with flat ``field=value`` overrides applied to whichever part owns the field."""
        model_names = {f.name for f in dataclasses.fields(ModelConfig)}
        train_names = {f.name for f in dataclasses.fields(TrainConfig)}
        model_kw = {k: v for k, v in overrides.items() if k in model_names}
        train_kw = {k: v for k, v in overrides.items() if k in train_names}
        unknown = set(overrides) - model_names - train_names
        if unknown:
            raise ConfigError(sorted(unknown)[0], "unknown config field")
        return RunConfig(model=dataclasses.replace(self.model, **model_kw),
                         train=dataclasses.replace(self.train, **train_kw))

    def resolved(self) -> RunConfig:
        """Fill every "auto" value for this machine, so the saved config says what really ran."""
        t = self.train
        import torch

        gpus = torch.cuda.device_count() if t.accelerator in ("auto", "gpu") else 0
        if t.accelerator == "gpu" and gpus == 0:
            raise ConfigError("accelerator", "gpu was asked for but no CUDA GPU is visible")
        accelerator = "gpu" if gpus else "cpu"
        if t.devices is not None:
            devices = t.devices
        else:
            devices = gpus if gpus else default_cpu_processes()
        if accelerator == "gpu" and devices > gpus:
            raise ConfigError("devices", f"{devices} GPUs asked for, {gpus} visible")
        precision = t.precision or ("bf16-mixed" if accelerator == "gpu" and _bf16_ok() else "32-true")
        if precision != "32-true" and accelerator == "cpu":
            raise ConfigError("precision", f"{precision} is for GPUs; use 32-true on the CPU")
        find_unused = t.find_unused_parameters
        if find_unused is None:
            find_unused = self.model.policy == "reference"
        workers = t.num_workers if t.num_workers is not None else default_workers(accelerator, devices)
        train = dataclasses.replace(t, accelerator=accelerator, devices=devices, precision=precision,
                                    find_unused_parameters=find_unused, num_workers=workers)
        return RunConfig(model=self.model, train=train)


def default_cpu_processes() -> int:
    """One DDP process per two cores, and at least two where there are two cores (so DDP is real)."""
    cores = os.cpu_count() or 1
    return 1 if cores < 2 else max(2, cores // 2)


def default_workers(accelerator: str, devices: int) -> int:
    """Loader workers per process: the cores left over after one per training process.

    Decoded images are cached, so on a CPU-only machine the training processes themselves are
    the best use of the cores and loading stays in-process.
    """
    cores = os.cpu_count() or 1
    if accelerator == "cpu":
        return 0
    return max(0, min(8, cores // max(devices, 1) - 1))


def _bf16_ok() -> bool:
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def _build(cls: type, values: dict[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ConfigError(sorted(unknown)[0], f"unknown field of {cls.__name__}")
    return cls(**values)


def hardware_summary() -> str:
    """What the default config will train on, in words (shown by the UI)."""
    import torch

    gpus = torch.cuda.device_count()
    if gpus:
        name = torch.cuda.get_device_name(0)
        return f"{gpus} × {name} (DDP over NCCL, bf16-mixed)"
    cores = os.cpu_count() or 1
    return (f"no GPU: {default_cpu_processes()} CPU processes over gloo on {cores} cores "
            "(32-bit)")
