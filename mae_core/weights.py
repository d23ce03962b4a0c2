"""Model weights as safetensors: saved atomically with their config, loaded without unpickling.

``model.safetensors`` holds the whole :class:`MaskedAutoencoder` state and its :class:`ModelConfig`
in the file's metadata, so a weights file alone rebuilds the model. :func:`export_encoder` writes
just the encoder with timm's key names, ready for ``timm.create_model(...).load_state_dict``.
"""

from __future__ import annotations

import json
import shlex
import zlib
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as serialize

from mae_core.config import ConfigError, ModelConfig
from mae_core.fileio import atomic_write, open_regular
from mae_core.model import MaskedAutoencoder, pixel_stats

ENCODER_PREFIX = "backbone.vit."
LIGHTNING_PREFIX = "mae."  # MAELightning holds the model as ``self.mae``
CHECKSUM_KEY = "tensors_crc32"  # in the file's metadata


class WeightsError(ValueError):
    """A weights file is missing, corrupt or not an MAE Studio model."""


def _cpu_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def _write_safetensors(path: str | Path, state: dict[str, torch.Tensor],
                       metadata: dict[str, str], make_dirs: bool = True) -> None:
    """Serialised in memory, then written through :func:`atomic_write`: safetensors' own
    ``save_file`` writes through a ``.tmpXXXXXX`` file of its own beside the target, which a kill
    would leave behind (the size of the model, once per killed save) where nothing removes it."""
    data = serialize(state, metadata={**metadata, CHECKSUM_KEY: tensors_checksum(state)})
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), make_dirs)


def tensors_checksum(state: dict[str, torch.Tensor]) -> str:
    """CRC-32 of every tensor's bytes, in name order. safetensors keeps no checksum of its own:
    a bit flipped on disk in a tensor loaded without a word, and Reconstruct and Export used it
    (a checkpoint's zip records are CRC-checked). 0.2 s for vit-base's 440 MB."""
    crc = 0
    for key in sorted(state):
        flat = state[key].detach().to("cpu").contiguous().reshape(-1)
        crc = zlib.crc32(flat.view(torch.uint8).numpy(), crc)
    return f"{crc:08x}"


def verify_checksum(state: dict[str, torch.Tensor], metadata: dict[str, str],
                    path: str | Path) -> None:
    """A :class:`WeightsError` if ``state``, read from ``path``, is not what was saved (files
    written before the checksum have none: read as they are)."""
    saved = metadata.get(CHECKSUM_KEY)
    if saved is not None and saved != tensors_checksum(state):
        raise WeightsError(f"{Path(path).name} is damaged: its tensors fail their checksum (they "
                           "changed on disk since they were saved); a run writes the file again "
                           "at its next save: Resume it, or pick other weights")


def save_weights(model: MaskedAutoencoder, path: str | Path, step: int | None = None) -> None:
    metadata = {"format": "mae-studio", "config": json.dumps(asdict(model.cfg))}
    if step is not None:
        metadata["step"] = str(step)
    _write_safetensors(path, _cpu_state(model.state_dict()), metadata)


def _read_header(path: str | Path) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """The file's metadata and its tensors' shapes, from its header alone (no tensor read)."""
    try:
        open_regular(path).close()  # a FIFO in its place would block safetensors' open forever
        with safe_open(str(path), framework="pt") as handle:
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
            return handle.metadata() or {}, shapes
    except FileNotFoundError:
        raise WeightsError(f"no weights file at {path}") from None
    except (SafetensorError, OSError, ValueError) as err:
        raise WeightsError(f"{Path(path).name} is not a readable safetensors file ({err})") from None


def read_metadata(path: str | Path) -> dict[str, str]:
    return _read_header(path)[0]


def model_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the model ``cfg`` builds, by name, with its shape: built on the meta
    device, so it costs no memory whatever the size."""
    with torch.device("meta"):
        return {key: tuple(value.shape) for key, value in MaskedAutoencoder(cfg).state_dict().items()}


def load_model_config(path: str | Path) -> ModelConfig:
    """The config of the model saved at ``path`` (its metadata: no tensor read)."""
    return _config_in(read_metadata(path), path)


def _config_in(metadata: dict[str, str], path: str | Path) -> ModelConfig:
    """The model config a weights file's ``metadata`` records (WeightsError if none is valid)."""
    if metadata.get("format") != "mae-studio" or "config" not in metadata:
        raise WeightsError(f"{Path(path).name} was not written by MAE Studio (no model config)")
    try:
        return ModelConfig(**json.loads(metadata["config"]))
    except (ValueError, TypeError, ConfigError) as err:
        raise WeightsError(f"{Path(path).name} has an invalid model config ({err})") from None


def load_model(path: str | Path, device: str = "cpu") -> MaskedAutoencoder:
    """Rebuild the model saved at ``path`` (eval mode). Raises :class:`WeightsError` if unusable."""
    metadata, shapes = _read_header(path)
    cfg = _config_in(metadata, path)
    # The header's shapes against the model's, before the model is built: a file of 1 KB whose
    # config claimed a ViT-Huge with a large decoder was built for real first (7.5 GB, 18 s, the
    # app's other users waiting), then refused. Equal shapes: the file holds those tensors.
    differs = shape_mismatch(shapes, model_shapes(cfg))
    if differs:  # in a line, not torch's list of every tensor
        raise WeightsError(f"{Path(path).name} does not match its model: {differs}")
    model = MaskedAutoencoder(cfg)
    from safetensors.torch import load_file

    try:
        state = load_file(str(path), device=device)
    except FileNotFoundError:  # removed since its metadata was read (a run being deleted)
        raise WeightsError(f"no weights file at {path}") from None
    except (SafetensorError, OSError, ValueError) as err:
        raise WeightsError(f"{Path(path).name} is not a readable safetensors file ({err})") from None
    verify_checksum(state, metadata, path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:  # shapes fit, yet torch refused: its first line says why
        raise WeightsError(f"{Path(path).name} does not match its model "
                           f"({str(err).strip().splitlines()[0][:300]})") from None
    return model.to(device).eval()


def checkpoint_mismatch(path: str | Path, cfg: ModelConfig) -> str | None:
    """How the model in the Lightning checkpoint at ``path`` differs from the one ``cfg`` builds,
    in words (None where every tensor fits).

    A checkpoint of another model (copied from another run, or a config edited by hand) would
    otherwise pass every check and fail only in the launched trainer. Shapes alone are compared:
    the checkpoint is memory-mapped and the model is built on the meta device, so this costs
    no memory whatever the size.
    """
    import torch

    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        return "it holds no state_dict"
    saved = {key.removeprefix(LIGHTNING_PREFIX): tuple(value.shape) for key, value in state.items()
             if isinstance(value, torch.Tensor)}
    return shape_mismatch(saved, model_shapes(cfg), "this run's model")


def shape_mismatch(saved: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]],
                   model: str = "the model") -> str | None:
    """How the tensor shapes ``saved`` differ from those ``model`` expects, in one line."""
    missing = sorted(expected.keys() - saved.keys())
    unexpected = sorted(saved.keys() - expected.keys())
    resized = [key for key in expected if key in saved and saved[key] != expected[key]]
    problems = []
    if resized:
        key = resized[0]
        problems.append(f"{len(resized)} tensor(s) of another shape, e.g. {key} is "
                        f"{list(saved[key])} in it and {list(expected[key])} in {model}")
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing, e.g. {missing[0]}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensor(s) this model has not, e.g. {unexpected[0]}")
    return "; ".join(problems) or None


def export_encoder(weights_path: str | Path, out_path: str | Path,
                   make_dirs: bool = True) -> list[str]:
    """Write the encoder as timm ``VisionTransformer`` weights; returns the tensor names written.

    The keys are timm's own (``blocks.0.attn.qkv.weight``…); the classifier head is not included,
    so load with ``timm.create_model(name, num_classes=N)`` and only ``head.*`` is missing.
    """
    model = load_model(weights_path)
    encoder = {k[len(ENCODER_PREFIX):]: v for k, v in model.state_dict().items()
               if k.startswith(ENCODER_PREFIX) and not k.startswith(ENCODER_PREFIX + "head.")}
    metadata = {"format": "timm-vit", "timm_name": model.cfg.encoder_name,
                "img_size": str(model.cfg.image_size), "patch_size": str(model.cfg.patch_size),
                "in_chans": str(model.cfg.channels),
                # Fine-tuning must normalise inputs as pretraining did (the data set's own statistics).
                "pixel_mean": json.dumps(list(pixel_stats(model.cfg)[0])),
                "pixel_std": json.dumps(list(pixel_stats(model.cfg)[1]))}
    _write_safetensors(out_path, _cpu_state(encoder), metadata, make_dirs)
    return sorted(encoder)


def timm_snippet(cfg: ModelConfig, path: str | Path) -> str:
    """Python that loads an exported encoder into timm for fine-tuning.

    ``pretrained_cfg_overlay`` gives the model pretraining's input size and normalisation (the
    export's metadata): without it ``timm.data.resolve_data_config(model=model)`` returns the
    preset's 224 px and default mean/std, and ``create_transform`` would feed fine-tuning images
    pretraining never saw. ``crop_pct=1.0``: evaluation takes the whole centre square, as this
    project's own evaluation does (timm's default 0.9 would resize and cut a margin off).
    ``pretrained=False``: the overlay changes the config, nothing downloads.

    It ends with the same load through timm's own ``train.py``: ``--pretrained --pretrained-path``
    (timm adapts the head: this file has none) with the sizes and normalisation as flags. timm's
    ``--initial-checkpoint`` and ``timm.models.load_checkpoint`` load strictly by default, so the
    missing head fails them: the comment says so (``strict=False`` loads it too).
    """
    mean, std = (tuple(float(v) for v in values) for values in pixel_stats(cfg))
    size = (cfg.channels, cfg.image_size, cfg.image_size)
    numbers = " ".join  # train.py takes lists as separate words
    train_py = (
        f"#   python train.py --model {cfg.encoder_name} --num-classes 10 --pretrained "
        f"--pretrained-path {shlex.quote(str(path))} \\\n"
        f"#     --in-chans {cfg.channels} --model-kwargs img_size={cfg.image_size} "
        f"patch_size={cfg.patch_size} --input-size {numbers(map(str, size))} "
        f"--crop-pct 1.0 \\\n"
        f"#     --mean {numbers(map(repr, mean))} --std {numbers(map(repr, std))}\n")
    return (
        "import timm\n"
        "from safetensors.torch import load_file\n\n"
        f"model = timm.create_model({cfg.encoder_name!r}, pretrained=False,\n"
        f"                          img_size={cfg.image_size}, patch_size={cfg.patch_size}, "
        f"in_chans={cfg.channels}, num_classes=10,\n"
        "                          # pretraining's input size and normalisation\n"
        f"                          pretrained_cfg_overlay=dict(input_size={size!r},\n"
        f"                                                      mean={mean!r},\n"
        f"                                                      std={std!r}, crop_pct=1.0))\n"
        f"missing, unexpected = model.load_state_dict(load_file({str(path)!r}), strict=False)\n"
        "assert set(missing) == {'head.weight', 'head.bias'} and not unexpected\n"
        "# fine-tuning's preprocessing, sized and normalised as pretraining was\n"
        "transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))\n"
        "# The same with timm's train.py (--pretrained-path: the head is new; --initial-checkpoint\n"
        "# and timm.models.load_checkpoint load strictly and fail on the missing head):\n"
        + train_py
    )
