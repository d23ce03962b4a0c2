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
import functools
import math
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
# Bounds for step counts and intervals: far beyond any real run, small enough for every library.
MAX_STEPS = 10**9
# Gradient accumulation beyond this is a configuration mistake (4,096 images from batch 4).
MAX_ACCUMULATE = 1024
# /proc/cpuinfo flags of the x86 instructions that compute bf16 natively (AVX-512 BF16 dot
# products; AMX tiles). Without them bf16 is emulated and slower than fp32.
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


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
    """A real, finite number: not a bool, a string, NaN or ±Inf."""
    if _is_int(value):
        return True
    return isinstance(value, float) and math.isfinite(value)


def _shown(value: Any) -> str:
    # A hostile value (a 5,000-character string) must not flood the message that names it.
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


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


def _check_int(obj: Any, name: str, low: int, high: int, optional: bool = False) -> None:
    """``obj.name`` must be an integer in [low, high] (or None where ``optional``)."""
    value = getattr(obj, name)
    if optional and value is None:
        return
    _require(_is_int(value) and low <= value <= high, name,
             f"must be an integer in [{low}, {high}], got {_shown(value)}")


def _check_number(obj: Any, name: str, low: float, high: float, *, low_open: bool = False,
                  high_open: bool = False) -> None:
    """``obj.name`` must be a finite number within the bounds (open where the flags say)."""
    value = getattr(obj, name)
    ok = _is_number(value) and (value > low if low_open else value >= low) and (
        value < high if high_open else value <= high)
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    _require(ok, name, f"must be a finite number in {interval}, got {_shown(value)}")


def _check_choice(obj: Any, name: str, choices: Any, what: str, optional: bool = False) -> None:
    """``obj.name`` must be one of ``choices`` (strings); the message lists them."""
    value = getattr(obj, name)
    if optional and value is None:
        return
    _require(isinstance(value, str) and value in choices, name,
             f"unknown {what} {_shown(value)}; choose one of {', '.join(choices)}")


def _check_bool(obj: Any, name: str, optional: bool = False) -> None:
    """``obj.name`` must be a real bool: YAML's ``yes`` is one, the string ``"abc"`` or 1 is not."""
    value = getattr(obj, name)
    if optional and value is None:
        return
    _require(isinstance(value, bool), name, f"must be true or false, got {_shown(value)}")


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
        _check_choice(self, "preset", PRESETS, "model preset")
        _check_int(self, "patch_size", 2, 32)
        _check_int(self, "image_size", 32, 224)
        _require(self.image_size % self.patch_size == 0, "image_size",
                 f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}")
        _require((self.image_size // self.patch_size) ** 2 >= 4, "patch_size",
                 f"patch_size={self.patch_size} leaves fewer than 4 patches in a "
                 f"{self.image_size}px image")
        _require(_is_number(self.mask_ratio) and 0 < self.mask_ratio < 1, "mask_ratio",
                 f"must be strictly between 0 and 1, got {_shown(self.mask_ratio)}")
        _check_int(self, "decoder_dim", 1, 4096, optional=True)
        _check_int(self, "decoder_depth", 1, 64, optional=True)
        _check_int(self, "decoder_heads", 1, 64, optional=True)
        _check_bool(self, "norm_pix_loss")
        _check_choice(self, "policy", POLICIES, "parameter policy")
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
    directory's ``config.yaml`` stores them resolved. ``accumulate_grad_batches`` sums the
    gradients of that many batches per optimizer step: ``max_steps``, the warm-up and the cosine
    schedule count optimizer steps, and the learning rate follows the effective batch.
    """

    data: str = ""
    batch_size: int = 32
    accumulate_grad_batches: int = 1
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
        _require(isinstance(self.data, str) and "\0" not in self.data and len(self.data) <= 4096,
                 "data", f"must be a folder path (or empty for the sample photos), got "
                 f"{_shown(self.data)}")
        _check_int(self, "batch_size", 1, 4096)
        _check_int(self, "accumulate_grad_batches", 1, MAX_ACCUMULATE)
        _check_number(self, "base_lr", 0, 1, low_open=True, high_open=True)
        _check_number(self, "weight_decay", 0, 1, high_open=True)
        _check_number(self, "warmup_fraction", 0, 1, high_open=True)
        _require(_is_int(self.max_steps) and (1 <= self.max_steps <= MAX_STEPS or self.max_steps == -1),
                 "max_steps", f"must be an integer in [1, {MAX_STEPS}] (or -1 to train by epochs), "
                 f"got {_shown(self.max_steps)}")
        _check_int(self, "max_epochs", 1, MAX_STEPS, optional=True)
        _require(self.max_steps > 0 or self.max_epochs is not None, "max_steps",
                 "set max_steps or max_epochs, or the run never ends")
        _check_choice(self, "accelerator", ACCELERATORS, "accelerator")
        _check_int(self, "devices", 1, 256, optional=True)
        _check_int(self, "num_nodes", 1, 1024)
        _check_choice(self, "precision", PRECISIONS, "precision", optional=True)
        _check_bool(self, "find_unused_parameters", optional=True)
        _check_bool(self, "static_graph")
        _check_bool(self, "compile")
        _check_int(self, "num_workers", 0, 256, optional=True)
        _check_int(self, "seed", 0, MAX_SEED)
        for name in ("log_every_n_steps", "checkpoint_every_n_steps", "preview_every_n_steps"):
            _check_int(self, name, 1, MAX_STEPS)
        _check_int(self, "num_previews", 0, 16)

    @property
    def world_size(self) -> int:
        return (self.devices or 1) * self.num_nodes

    @property
    def effective_batch_size(self) -> int:
        """Images per optimizer step: batch per process × processes × accumulated batches."""
        return self.batch_size * self.world_size * self.accumulate_grad_batches

    def learning_rate(self) -> float:
        """The MAE scaling rule: lr = base_lr × effective batch / 256."""
        return self.base_lr * self.effective_batch_size / 256


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        _require(isinstance(self.model, ModelConfig), "model",
                 f"must be a ModelConfig, got {_shown(self.model)}")
        _require(isinstance(self.train, TrainConfig), "train",
                 f"must be a TrainConfig, got {_shown(self.train)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        data = data or {}
        if not isinstance(data, dict):
            raise ConfigError("config", "must be a mapping with model: and train: sections")
        unknown = set(map(str, data)) - {"model", "train"}
        if unknown:
            raise ConfigError(sorted(unknown)[0], "unknown config section")
        return cls(model=_build(ModelConfig, data.get("model") or {}, "model"),
                   train=_build(TrainConfig, data.get("train") or {}, "train"))

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
        except UnicodeDecodeError:
            raise ConfigError("config", f"{Path(path).name} is not a text YAML file") from None
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
        cores = usable_cores()
        if accelerator == "cpu" and devices > cores:
            # Each CPU rank is a full training process (~1 GB); more than the cores only thrash.
            raise ConfigError("devices", f"{devices} CPU processes asked for, this machine has "
                              f"{cores} usable cores: use at most {cores}")
        precision = t.precision or auto_precision(accelerator)
        _check_precision_for(precision, accelerator)
        find_unused = t.find_unused_parameters
        if find_unused is None:
            find_unused = self.model.policy == "reference"
        workers = t.num_workers if t.num_workers is not None else default_workers(accelerator, devices)
        # The trainer may run from another directory than the caller: a relative folder is
        # resolved once, here, so both read the same one. "" stays the embedded photos.
        # A prepared set's URL (s3://...) is read by LitData as it is.
        remote = t.data.startswith(("s3://", "gs://", "azure://", "hf://"))
        data = os.path.abspath(os.path.expanduser(t.data)) if t.data and not remote else t.data
        train = dataclasses.replace(t, data=data, accelerator=accelerator, devices=devices,
                                    precision=precision, find_unused_parameters=find_unused,
                                    num_workers=workers)
        return RunConfig(model=self.model, train=train)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, as set by taskset, cgroups or SLURM)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_cpu_processes() -> int:
    """One DDP process per two cores, and at least two where there are two cores (so DDP is real)."""
    cores = usable_cores()
    return 1 if cores < 2 else max(2, cores // 2)


def default_workers(accelerator: str, devices: int) -> int:
    """Loader workers per process: the cores left over after one per training process.

    Decoded images are cached, so on a CPU-only machine the training processes themselves are
    the best use of the cores and loading stays in-process.
    """
    cores = usable_cores()
    if accelerator == "cpu":
        return 0
    return max(0, min(8, cores // max(devices, 1) - 1))


def _bf16_ok() -> bool:
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


@functools.lru_cache(maxsize=1)
def cpu_bf16_feature() -> str | None:
    """The instruction set with which this CPU computes bf16 natively (``amx_bf16`` or
    ``avx512_bf16``), or None where bf16 would be emulated.

    Read from the ``flags`` of ``/proc/cpuinfo`` (Linux); elsewhere from the CPU probes torch
    ships (``torch.cpu._is_amx_tile_supported``, ``_is_avx512_bf16_supported``, private, so
    looked up defensively). ``torch.backends.cpu.get_cpu_capability()`` cannot tell: it says
    ``AVX512`` with or without bf16.
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as file:
            flags = {word for line in file if line.startswith("flags")
                     for word in line.partition(":")[2].split()}
        return next((name for name in CPU_BF16_FLAGS if name in flags), None)
    except OSError:  # not Linux: ask torch
        import torch

        probes = {"amx_bf16": "_is_amx_tile_supported", "avx512_bf16": "_is_avx512_bf16_supported"}
        for name, probe in probes.items():
            check = getattr(torch.cpu, probe, None)
            if check is not None and check():
                return name
        return None


def auto_precision(accelerator: str) -> str:
    """What ``precision=None`` means here: bf16-mixed where the hardware computes bf16 natively
    (a GPU that supports it, a CPU with AMX or AVX-512 BF16), 32-true elsewhere."""
    native = _bf16_ok() if accelerator == "gpu" else cpu_bf16_feature() is not None
    return "bf16-mixed" if native else "32-true"


def _check_precision_for(precision: str, accelerator: str) -> None:
    """Refuse a precision the CPU cannot run well: fp16 autocast, or bf16 without native bf16."""
    if accelerator != "cpu":
        return
    bf16 = cpu_bf16_feature()
    if precision == "16-mixed":
        other = "32-true or bf16-mixed" if bf16 else "32-true"
        raise ConfigError("precision", f"16-mixed (fp16 autocast) is for GPUs; use {other} on "
                          "this CPU")
    if precision == "bf16-mixed" and bf16 is None:
        raise ConfigError("precision", "bf16-mixed needs a CPU that computes bf16 natively "
                          f"(AMX or AVX-512 BF16: /proc/cpuinfo flags {' or '.join(CPU_BF16_FLAGS)}); "
                          "this one would emulate it, slower than 32-true: use 32-true (or auto)")


def _build(cls: type, values: Any, section: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(section, f"must be a mapping of field: value, got {_shown(values)}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(map(str, values)) - names
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
    cores = usable_cores()
    bf16 = cpu_bf16_feature()
    precision = f"bf16-mixed: {bf16}" if bf16 else "32-bit"
    return (f"no GPU: {default_cpu_processes()} CPU processes over gloo on {cores} cores "
            f"({precision})")
