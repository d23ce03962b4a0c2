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

import dataclasses
import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# ConfigError, the presets and parse_bool are part of this module's interface (re-exported).
from mae_core.checks import (NORMALIZATIONS, ConfigError, _check_bool,  # noqa: F401
                             _check_choice, _check_int, _check_number, _is_int, _is_number,
                             _require, check_channels, format_stats, is_remote, parse_bool,
                             is_url, parse_stats, shown, unreadable_url)
from mae_core.devices import (default_cpu_processes, default_workers,  # noqa: F401
                              share_devices, usable_cores, visible_gpus)
from mae_core.presets import PRESETS, DecoderSpec, Preset  # noqa: F401
from mae_core.precision import auto_precision, check_precision_for

POLICIES = ("ddp-clean", "reference")
ACCELERATORS = ("auto", "cpu", "gpu")
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
# numpy and torch seed generators take 32-bit seeds; a reconstruction adds the image index.
MAX_SEED = 2**31 - 1
# Bounds for step counts and intervals: far beyond any real run, small enough for every library.
MAX_STEPS = 10**9
# Gradient accumulation beyond this is a configuration mistake (4,096 images from batch 4).
MAX_ACCUMULATE = 1024
# Held-out evaluation (issue 14): at most this many images per evaluation; unless asked, folders of
# AUTO_VAL_MIN_IMAGES or more hold out AUTO_VAL_FRACTION, smaller ones (the sample photos) nothing.
MAX_IMAGES_HELD_OUT = 100_000
AUTO_VAL_MIN_IMAGES = 100
AUTO_VAL_FRACTION = 0.1
# The MAE paper's base learning rate: lr = 1.5e-4 × batch / 256, 2.4e-3 at its batch of 4,096.
PAPER_BASE_LR = 1.5e-4
# The lowest learning rate base_lr "auto" gives. The paper's rule alone gives 3.75e-5 at the default
# CPU batch of 64 (2 processes × 32), at which a few hundred AdamW steps barely move a ViT: the
# default run's loss stayed flat. Measured on the sample photos: README "Defaults that learn".
MIN_AUTO_LR = 1e-3


MAX_IMAGE_SIZE = 448
# A decoder past this is a typo, not MAE (whose decoder is light: the paper's 8 × 512 has 25 M
# parameters, its widest ablation 12 × 1024 150 M); 64 blocks of 4,096 would be 12.9 B.
MAX_DECODER_PARAMS = 10**9


@dataclass(frozen=True)
class ModelConfig:
    """What is trained: the encoder preset, the input geometry, masking, decoder and policy.

    ``decoder_*`` of ``None`` take the preset's decoder. ``policy`` is ``ddp-clean`` (head removed,
    encoder mask token frozen: plain DDP works) or ``reference`` (the naive recipe).
    ``timm_model`` names any timm VisionTransformer (``vit_base_patch16_clip_224``, ...) as the
    encoder instead of the preset's; the preset still picks the decoder.
    """

    preset: str = "vit-tiny"
    image_size: int = 64
    patch_size: int = 8
    mask_ratio: float = 0.75
    decoder_dim: int | None = None
    decoder_depth: int | None = None
    decoder_heads: int | None = None
    norm_pix_loss: bool = False
    policy: str = "ddp-clean"
    timm_model: str = ""
    # Any channels (mae_core/channels.py): in_chans None = the data's; normalize auto = ImageNet's
    # statistics for 8-bit RGB data, else the data set's, stored per channel (fractions of full
    # scale, "0.12,0.3") when the run starts.
    in_chans: int | None = None
    normalize: str = "auto"
    pixel_mean: str = ""
    pixel_std: str = ""

    def __post_init__(self) -> None:
        _check_choice(self, "preset", PRESETS, "model preset")
        _require(isinstance(self.timm_model, str), "timm_model",
                 f"must be a timm model name or empty, got {shown(self.timm_model)}")
        _check_int(self, "patch_size", 2, 32)
        _check_int(self, "image_size", 32, MAX_IMAGE_SIZE)
        _require(self.image_size % self.patch_size == 0, "image_size",
                 f"{self.image_size} is not divisible by the patch size ({self.patch_size}): "
                 "an image must hold a whole number of patches")
        _require((self.image_size // self.patch_size) ** 2 >= 4, "patch_size",
                 f"patch_size={self.patch_size} leaves fewer than 4 patches in a "
                 f"{self.image_size}px image")
        _require(_is_number(self.mask_ratio) and 0 < self.mask_ratio < 1, "mask_ratio",
                 f"must be strictly between 0 and 1, got {shown(self.mask_ratio)}")
        _check_int(self, "decoder_dim", 1, 4096, optional=True)
        _check_int(self, "decoder_depth", 1, 64, optional=True)
        _check_int(self, "decoder_heads", 1, 64, optional=True)
        _check_bool(self, "norm_pix_loss")
        _check_choice(self, "policy", POLICIES, "parameter policy")
        check_channels(self)
        spec = self.decoder()
        _require(spec.dim % spec.heads == 0, "decoder_heads",
                 f"the decoder's width ({spec.dim}) is not divisible by {spec.heads} heads")
        _require(12 * spec.dim**2 * spec.depth <= MAX_DECODER_PARAMS, "decoder_dim",
                 f"a decoder of {spec.depth} blocks of width {spec.dim} has "
                 f"{12 * spec.dim**2 * spec.depth / 1e9:.1f} B parameters (at most "
                 f"{MAX_DECODER_PARAMS / 1e9:.0f} B): MAE's decoder is light, 8 × 512 in the paper")
        if self.timm_model:
            from mae_core.encoders import check_timm_vit  # imports timm: only when asked

            check_timm_vit(self.timm_model, self.image_size, self.patch_size)

    @property
    def encoder_name(self) -> str:
        """The timm model name of the encoder: ``timm_model`` or the preset's."""
        return self.timm_model or PRESETS[self.preset].timm_name

    @property
    def label(self) -> str:
        """How runs and tables name the encoder: the preset, or the timm model that replaces it."""
        return self.timm_model or self.preset

    @property
    def channels(self) -> int:
        """Values per pixel the model takes: ``in_chans``, 3 until resolved from the data."""
        return self.in_chans or 3

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
    ``find_unused_parameters`` of ``None`` mean "choose for this machine and policy" (``base_lr`` of
    ``None``: see :meth:`learning_rate`); the run directory's ``config.yaml`` stores them resolved.
    ``accumulate_grad_batches`` sums the gradients of that many batches per optimizer step:
    ``max_steps``, the warm-up and the cosine schedule count optimizer steps, and the learning rate
    follows the effective batch.
    """

    data: str = ""
    batch_size: int = 32
    accumulate_grad_batches: int = 1
    base_lr: float | None = None
    weight_decay: float = 0.05
    warmup_fraction: float = 0.2
    max_steps: int = 300
    max_epochs: int | None = None
    accelerator: str = "auto"
    devices: int | None = None
    gpus: str = ""  # this run's GPUs ("0,1", given to it as CUDA_VISIBLE_DEVICES); "" = all
    num_nodes: int = 1
    precision: str | None = None
    find_unused_parameters: bool | None = None
    static_graph: bool = True
    compile: bool = False
    # Prepared sets: workers only draw the crops, the device decodes (nvJPEG on a GPU) and cuts
    # them: for GPUs that the CPU cores cannot feed. (In-memory folders are decoded once.)
    decode_on_device: bool = False
    num_workers: int | None = None
    seed: int = 0
    log_every_n_steps: int = 1
    checkpoint_every_n_steps: int = 100
    preview_every_n_steps: int = 50
    num_previews: int = 4
    # --- held-out evaluation (issue 14; mae_core/monitor.py, mae_core/snapshots.py): the share or
    # count held out (None: automatic), every N steps (0: never), a labelled folder for kNN ("":
    # the data folder's class subfolders), the images per evaluation, the weight snapshots kept.
    val_fraction: float | None = None
    val_count: int | None = None
    eval_every_n_steps: int = 50
    eval_data: str = ""
    eval_max_images: int = 512
    weight_snapshots: int = 5

    def __post_init__(self) -> None:
        _require(isinstance(self.data, str) and "\0" not in self.data and len(self.data) <= 4096,
                 "data", f"must be a folder path (or empty for the sample photos), got "
                 f"{shown(self.data)}")
        if why := unreadable_url(self.data):
            raise ConfigError("data", why)
        _check_int(self, "batch_size", 1, 4096)
        _check_int(self, "accumulate_grad_batches", 1, MAX_ACCUMULATE)
        if self.base_lr is not None:  # None: "auto", see learning_rate()
            _check_number(self, "base_lr", 0, 1, low_open=True, high_open=True)
        _check_number(self, "weight_decay", 0, 1, high_open=True)
        _check_number(self, "warmup_fraction", 0, 1, high_open=True)
        _require(_is_int(self.max_steps) and (1 <= self.max_steps <= MAX_STEPS or self.max_steps == -1),
                 "max_steps", f"must be an integer in [1, {MAX_STEPS}] (or -1 to train by epochs), "
                 f"got {shown(self.max_steps)}")
        _check_int(self, "max_epochs", 1, MAX_STEPS, optional=True)
        _require(self.max_steps > 0 or self.max_epochs is not None, "max_steps",
                 "set max_steps or max_epochs, or the run never ends")
        _check_choice(self, "accelerator", ACCELERATORS, "accelerator")
        _check_int(self, "devices", 1, 256, optional=True)
        _check_gpu_list(self)
        _check_int(self, "num_nodes", 1, 1024)
        _check_choice(self, "precision", PRECISIONS, "precision", optional=True)
        _check_bool(self, "find_unused_parameters", optional=True)
        _check_bool(self, "static_graph")
        _check_bool(self, "compile")
        _check_bool(self, "decode_on_device")
        _check_int(self, "num_workers", 0, 256, optional=True)
        _check_int(self, "seed", 0, MAX_SEED)
        for name in ("log_every_n_steps", "checkpoint_every_n_steps", "preview_every_n_steps"):
            _check_int(self, name, 1, MAX_STEPS)
        _check_int(self, "num_previews", 0, 16)
        self._check_evaluation()

    def _check_evaluation(self) -> None:
        """The held-out evaluation's fields (issue 14): one way to size the split, bounded values."""
        _require(self.val_fraction is None or (_is_number(self.val_fraction)
                                               and 0 < self.val_fraction < 1), "val_fraction",
                 f"must be a number strictly between 0 and 1 (or empty for automatic), got "
                 f"{shown(self.val_fraction)}")
        _check_int(self, "val_count", 1, MAX_IMAGES_HELD_OUT, optional=True)
        _require(self.val_fraction is None or self.val_count is None, "val_count",
                 "set val_fraction or val_count, not both")
        _check_int(self, "eval_every_n_steps", 0, MAX_STEPS)
        _require(isinstance(self.eval_data, str) and "\0" not in self.eval_data
                 and len(self.eval_data) <= 4096, "eval_data",
                 f"must be a folder path (or empty), got {shown(self.eval_data)}")
        _require(not is_url(self.eval_data), "eval_data",
                 f"must be a labelled folder on this machine (folder/<class>/*.jpg), not a URL: "
                 f"got {shown(self.eval_data)}")
        _check_int(self, "eval_max_images", 1, MAX_IMAGES_HELD_OUT)
        _check_int(self, "weight_snapshots", 0, 1000)

    @property
    def world_size(self) -> int:
        return (self.devices or 1) * self.num_nodes

    @property
    def gpu_set(self) -> frozenset[int] | None:
        """The GPUs this run holds, or None for "every device" (CPU runs, runs naming no GPUs).

        Two runs may be live together only when both name GPUs and the sets are disjoint."""
        if not self.gpus or self.accelerator == "cpu":
            return None
        return frozenset(int(i) for i in self.gpus.split(","))

    @property
    def effective_batch_size(self) -> int:
        """Images per optimizer step: batch per process × processes × accumulated batches."""
        return self.batch_size * self.world_size * self.accumulate_grad_batches

    def learning_rate(self) -> float:
        """The MAE scaling rule: lr = base_lr × effective batch / 256.

        ``base_lr`` of ``None`` ("auto") is the paper's :data:`PAPER_BASE_LR`, but the rate never
        falls below :data:`MIN_AUTO_LR`: small batches (a CPU run, a single GPU) still learn in a
        few hundred steps, while the paper's large batches keep the paper's rate.
        """
        scale = self.effective_batch_size / 256
        if self.base_lr is None:
            return max(PAPER_BASE_LR * scale, MIN_AUTO_LR)
        return self.base_lr * scale


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        _require(isinstance(self.model, ModelConfig), "model",
                 f"must be a ModelConfig, got {shown(self.model)}")
        _require(isinstance(self.train, TrainConfig), "train",
                 f"must be a TrainConfig, got {shown(self.train)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        data = data or {}
        if not isinstance(data, dict):
            raise ConfigError("config", "must be a mapping with model: and train: sections")
        unknown = set(map(str, data)) - {"model", "train"}
        if unknown:  # a flat file (as /start_run takes) is told where its fields go
            name = sorted(unknown)[0]
            part = next((part for part, kind in (("model", ModelConfig), ("train", TrainConfig))
                         if name in {f.name for f in dataclasses.fields(kind)}), None)
            raise ConfigError(name[:60], f"belongs under {part}:, not at the top level (a config "
                              "file has model: and train: sections, as a run's config.yaml)"
                              if part else unknown_name("config section", name, ("model", "train")))
        return cls(model=_build(ModelConfig, data.get("model") or {}, "model"),
                   train=_build(TrainConfig, data.get("train") or {}, "train"))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        from mae_core.fileio import atomic_write_text

        atomic_write_text(path, self.to_yaml())

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        from mae_core.fileio import NotRegularFileError, read_regular_bytes

        try:
            data = yaml.load(read_regular_bytes(path).decode("utf-8"), Loader=_StrictLoader)
        except FileNotFoundError:
            raise ConfigError("config", f"no config file at {path}") from None
        except NotRegularFileError:  # a FIFO would block the reader (the app) forever
            raise ConfigError("config", f"{path} is not a regular file (a link, a pipe, a device "
                                        "or a folder in its place); put back the config file"
                              ) from None
        except yaml.YAMLError as err:
            # The parser's own text quotes the file's lines in its own words: where and what.
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            why = getattr(err, "problem", None) or "it cannot be parsed"
            raise ConfigError("config", f"{path} is not valid YAML{where}: {why}") from None
        except UnicodeDecodeError:
            raise ConfigError("config", f"{Path(path).name} is not a text YAML file") from None
        except (ValueError, RecursionError) as err:  # a 5,000-digit number, 5,000 nested lists
            raise ConfigError("config", f"{Path(path).name} is not a config this app can read "
                                        f"({str(err)[:120]})") from None
        if not isinstance(data, dict):  # an empty (truncated) file too: never silently defaults
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
            name = sorted(unknown)[0]
            raise ConfigError(name[:60], unknown_name("config field", name, model_names | train_names))
        return RunConfig(model=dataclasses.replace(self.model, **model_kw),
                         train=dataclasses.replace(self.train, **train_kw))

    def resolved(self) -> RunConfig:
        """Fill every "auto" value for this machine, so the saved config says what really ran."""
        t = self.train
        gpus = visible_gpus(t) if t.accelerator in ("auto", "gpu") else 0
        if (t.accelerator == "gpu" or t.gpus) and gpus == 0:
            raise ConfigError("gpus" if t.gpus else "accelerator",
                              "GPUs were asked for but no CUDA GPU is visible")
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
        check_precision_for(precision, accelerator)
        find_unused = t.find_unused_parameters
        if find_unused is None:
            find_unused = self.model.policy == "reference"
        workers = t.num_workers if t.num_workers is not None else default_workers(accelerator, devices)
        # The trainer may run from another directory than the caller: a relative folder is
        # resolved once, here, so both read the same one. "" stays the embedded photos.
        # A prepared set's URL (s3://...) is read by LitData as it is.
        remote = is_remote(t.data)
        data = _absolute(t.data) if t.data and not remote else t.data
        eval_data = _absolute(t.eval_data) if t.eval_data else ""
        train = dataclasses.replace(t, data=data, eval_data=eval_data, accelerator=accelerator, devices=devices,
                                    precision=precision, find_unused_parameters=find_unused,
                                    num_workers=workers)
        if train.base_lr is None:  # "auto" saved as the base_lr that gives its rate: resume keeps it
            train = dataclasses.replace(
                train, base_lr=train.learning_rate() * 256 / train.effective_batch_size)
        return RunConfig(model=self.model, train=train)


# The fields resolved() fills for this machine and batch when "auto" (TrainConfig's default).
AUTO_FIELDS = ("accelerator", "devices", "precision", "find_unused_parameters", "num_workers",
               "base_lr")


def with_auto_restored(cfg: RunConfig) -> RunConfig:
    """``cfg`` (a run's resolved config) with each field of :data:`AUTO_FIELDS` that holds what
    "auto" gives here back at "auto", for a new run to derive again from its own settings: a
    copied base lr of 0.016 (auto's at batch 16) trained a batch of 256 at 16 times auto's rate,
    and a copied ``accelerator: cpu`` kept a run off this machine's GPUs. A value auto would not
    give here (set by hand, or another machine's) stays."""
    auto = TrainConfig()
    kept = {}
    for name in AUTO_FIELDS:
        default = getattr(auto, name)
        try:
            derived = getattr(cfg.with_overrides(**{name: default}).resolved().train, name)
        except ConfigError:
            continue
        if derived == getattr(cfg.train, name):
            kept[name] = default
    return cfg.with_overrides(**kept)


def _check_gpu_list(t: TrainConfig) -> None:
    """``gpus``: distinct GPU indices separated by commas, on a GPU run, as many as ``devices``."""
    if t.gpus == "":
        return
    # ASCII digits without leading zeros: the text goes to CUDA_VISIBLE_DEVICES as it is, and
    # "0,00" or a full-width "０" must not pass as GPUs a set of ints cannot tell apart.
    index = r"(0|[1-9][0-9]{0,2})"
    ok = isinstance(t.gpus, str) and re.fullmatch(rf"{index}(,{index})*", t.gpus) is not None
    _require(ok, "gpus", f"must be GPU indices separated by commas, like 0,1 (or empty for all), "
             f"got {shown(t.gpus)}")
    indices = t.gpus.split(",")
    _require(len(set(indices)) == len(indices), "gpus", f"names a GPU twice: {t.gpus}")
    _require(t.accelerator != "cpu", "gpus", "GPUs are named but accelerator is cpu")
    _require(t.devices is None or t.devices == len(indices), "devices",
             f"{t.devices} devices but gpus names {len(indices)} ({t.gpus}): leave devices "
             "blank or make them agree")


def _build(cls: type, values: Any, section: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(section, f"must be a mapping of field: value, got {shown(values)}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(map(str, values)) - names
    if unknown:
        name = sorted(unknown)[0]
        other = {"model": "train", "train": "model"}.get(section)
        if other and name in {f.name for f in dataclasses.fields(_SECTIONS[other])}:
            raise ConfigError(name, f"belongs under {other}:, not {section}:")
        raise ConfigError(name[:60], unknown_name(f"field under {section}:", name, names))
    return cls(**values)


_SECTIONS = {"model": ModelConfig, "train": TrainConfig}


def _absolute(folder: str) -> str:
    expanded = os.path.expanduser(folder)
    if expanded.startswith("~"):  # an unknown user: kept, so the data check says so in words
        return folder
    return os.path.abspath(expanded)


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key repeated in one mapping: YAML keeps the last one, so a
    second ``model:`` section replaced the first whole, and its fields went back to defaults
    without a word."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *base": the base's keys, which
                continue  # this mapping's own replace (SafeLoader's flatten_mapping merges them)
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str):
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} appears twice in one mapping (the second would replace "
                                f"the first)", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def unknown_name(what: str, name: str, valid: Any) -> str:
    """"unknown <what>", with the close matches among ``valid`` (else all of them)."""
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=3)
    if close:
        return f"unknown {what} (did you mean {' or '.join(close)}?)"
    return f"unknown {what} (valid: {', '.join(valid)})"
