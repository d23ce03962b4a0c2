"""Weights files: written in place atomically, loaded without unpickling, damage reported clearly."""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image

from mae_core.config import ModelConfig
from mae_core.fileio import is_temp_file, remove_stale_temp_files
from mae_core.model import MaskedAutoencoder, pixel_stats
from mae_core.weights import (
    WeightsError,
    export_encoder,
    load_model,
    read_metadata,
    save_weights,
    timm_snippet,
)

CFG = ModelConfig(preset="vit-tiny", image_size=32, patch_size=8)


def test_weights_round_trip_and_a_second_save_replaces_the_first_in_place(tmp_path, monkeypatch):
    elsewhere = tmp_path / "tmpdir"
    elsewhere.mkdir()
    monkeypatch.setenv("TMPDIR", str(elsewhere))
    monkeypatch.setattr("tempfile.tempdir", None)
    torch.manual_seed(0)
    model = MaskedAutoencoder(CFG)
    path = tmp_path / "run" / "model.safetensors"
    save_weights(model, path, step=2)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    save_weights(model, path, step=4)
    loaded = load_model(path)
    assert read_metadata(path)["step"] == "4"
    for (name, saved), (_, live) in zip(loaded.state_dict().items(), model.state_dict().items()):
        assert torch.equal(saved, live), name
    assert list(elsewhere.iterdir()) == []
    assert [p.name for p in path.parent.iterdir() if is_temp_file(p)] == []


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_a_damaged_weights_file_is_refused_with_a_clear_error(tmp_path, damage):
    path = tmp_path / "model.safetensors"
    save_weights(MaskedAutoencoder(CFG), path)
    data = path.read_bytes()
    path.write_bytes({"empty": b"", "truncated": data[: len(data) // 2],
                      "garbage": b"\x00" * 64}[damage])
    with pytest.raises(WeightsError, match="model.safetensors"):
        load_model(path)


def test_a_bit_flipped_in_a_tensor_is_refused_by_load_and_export(tmp_path):
    """safetensors has no checksum: a bit changed on disk in a tensor's bytes (the header whole)
    loaded without a word, and Reconstruct and Export used the damaged weights."""
    torch.manual_seed(0)
    path = tmp_path / "model.safetensors"
    save_weights(MaskedAutoencoder(CFG), path, step=3)
    load_model(path)  # whole: loads
    data = bytearray(path.read_bytes())
    data[len(data) - 1000] ^= 0x10  # inside the last tensor, past the header
    path.write_bytes(bytes(data))
    assert read_metadata(path)["step"] == "3"  # the header still reads
    with pytest.raises(WeightsError, match="model.safetensors is damaged: its tensors fail their "
                                           "checksum"):
        load_model(path)
    with pytest.raises(WeightsError, match="checksum"):
        export_encoder(path, tmp_path / "encoder.safetensors")
    assert not (tmp_path / "encoder.safetensors").exists()


def test_weights_saved_before_the_checksum_still_load(tmp_path):
    from dataclasses import asdict

    from safetensors.torch import save_file

    model = MaskedAutoencoder(CFG)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"format": "mae-studio", "config": json.dumps(asdict(CFG))})
    loaded = load_model(path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(),
                                                  model.state_dict().values()))


# A save that dies partway through writing the file: the file-size limit (1 MiB, far below a
# vit-tiny's 25 MB) kills the process with SIGXFSZ at the first write past it, as a kill -9 would.
DYING_SAVE = textwrap.dedent("""
    import resource, signal, sys
    from mae_core.config import ModelConfig
    from mae_core.model import MaskedAutoencoder
    from mae_core.weights import save_weights

    model = MaskedAutoencoder(ModelConfig(preset="vit-tiny", image_size=32, patch_size=8))
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it: the write would just fail
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    save_weights(model, sys.argv[1], step=4)
""")


def test_weights_of_another_shape_are_refused_in_one_line(tmp_path):
    """A file whose tensors do not fit its own recorded model (written by hand, or patched):
    torch's error listed every tensor over dozens of lines into the page's notice."""
    from safetensors.torch import load_file, save_file

    path = tmp_path / "model.safetensors"
    save_weights(MaskedAutoencoder(CFG), path)
    metadata = read_metadata(path)
    state = load_file(str(path))
    state = {key: (torch.zeros(3, 3) if "blocks" in key else value) for key, value in state.items()}
    save_file(state, str(path), metadata=metadata)
    with pytest.raises(WeightsError) as err:
        load_model(path)
    message = str(err.value)
    assert message.startswith("model.safetensors does not match its model: ")
    assert "tensor(s) of another shape, e.g. backbone.vit.blocks.0." in message
    assert "\n" not in message and len(message) < 300


CLAIMS_A_HUGE_MODEL = """
import json, resource, sys
from dataclasses import asdict
import torch
from safetensors.torch import save_file
from mae_core.config import ModelConfig
from mae_core.weights import WeightsError, load_model
claim = ModelConfig(preset="vit-huge", image_size=448, patch_size=14, decoder_dim=2048,
                    decoder_depth=16, decoder_heads=16)
save_file({"x": torch.zeros(1)}, sys.argv[1],
          metadata={"format": "mae-studio", "config": json.dumps(asdict(claim))})
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    load_model(sys.argv[1])
except WeightsError as err:
    print(json.dumps({"error": str(err), "grew_kib": resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss - before}))
"""


def test_a_tiny_file_claiming_a_huge_model_costs_what_it_is(tmp_path):
    """The file's header is compared with the model it claims before that model is built: a
    1 KB file whose config claimed a ViT-Huge with a large decoder made the app build it for
    real (7.5 GB, 18 s, every other user's Reconstruct waiting), then refused it."""
    path = tmp_path / "model.safetensors"
    done = subprocess.run([sys.executable, "-c", CLAIMS_A_HUGE_MODEL, str(path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert path.stat().st_size < 2048
    assert result["error"].startswith("model.safetensors does not match its model: ")
    assert "tensor(s) missing" in result["error"]
    assert result["grew_kib"] < 256 * 1024, result  # the claimed model holds ~3 GB


def test_a_save_killed_mid_write_leaves_only_a_temp_file_that_the_next_start_removes(tmp_path):
    """No leftover a run directory's cleanup cannot see (safetensors' own ``save_file`` writes
    through a ``.tmpXXXXXX`` of its own beside the target: the model's size, per killed save)."""
    run = tmp_path / "run"
    path = run / "model.safetensors"
    save_weights(MaskedAutoencoder(CFG), path, step=2)
    died = subprocess.run([sys.executable, "-c", DYING_SAVE, str(path)], capture_output=True,
                          cwd=Path(__file__).resolve().parent.parent)
    assert died.returncode == -signal.SIGXFSZ, died.stderr[-2000:]
    leftovers = [p for p in run.iterdir() if p != path]
    assert leftovers and all(is_temp_file(p) for p in leftovers), [p.name for p in leftovers]
    assert sorted(remove_stale_temp_files(run)) == sorted(leftovers)
    assert list(run.iterdir()) == [path] and read_metadata(path)["step"] == "2"


@pytest.mark.parametrize("cfg", [
    CFG,  # RGB: ImageNet's statistics, where timm's vit_tiny defaults to 0.5 ± 0.5 at 224 px
    ModelConfig(preset="vit-tiny", image_size=32, patch_size=8, in_chans=1, normalize="dataset",
                pixel_mean="0.195415", pixel_std="0.28"),  # a data set's own, one channel
], ids=["rgb-imagenet", "gray-dataset"])
def test_the_export_snippet_preprocesses_as_pretraining_did(tmp_path, cfg):
    """The snippet's model resolves timm's data config (hence ``create_transform``) to the run's
    image size and normalisation, and still loads the encoder with only the head missing."""
    save_weights(MaskedAutoencoder(cfg), tmp_path / "model.safetensors")
    out = tmp_path / "encoder.safetensors"
    export_encoder(tmp_path / "model.safetensors", out)
    namespace: dict = {}
    exec(compile(timm_snippet(cfg, out), "snippet", "exec"), namespace)  # its asserts included
    data = timm.data.resolve_data_config(model=namespace["model"])
    mean, std = pixel_stats(cfg)
    assert data["input_size"] == (cfg.channels, 32, 32)
    assert data["mean"] == pytest.approx(mean) and data["std"] == pytest.approx(std)
    assert data["crop_pct"] == 1.0  # the whole centre square, as the evaluation takes it
    meta = read_metadata(out)  # what the export records is what the snippet applies
    assert data["mean"] == pytest.approx(json.loads(meta["pixel_mean"]))
    assert data["std"] == pytest.approx(json.loads(meta["pixel_std"]))
    image = Image.new("L" if cfg.channels == 1 else "RGB", (48, 40), 128)
    assert namespace["transform"](image).shape == (cfg.channels, 32, 32)


def _timm_train_py_args(snippet: str) -> argparse.Namespace:
    """The snippet's ``python train.py ...`` comment parsed with the flags of timm's own train.py
    that it uses (huggingface/pytorch-image-models, train.py: the same names, types and nargs)."""
    lines = [line.removeprefix("#").strip() for line in snippet.splitlines()
             if line.startswith("#   ") or line.startswith("#     ")]
    words = shlex.split(" ".join(line.removesuffix("\\") for line in lines))
    assert words[:2] == ["python", "train.py"], words
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="resnet50", type=str)
    parser.add_argument("--pretrained", action="store_true", default=False)
    parser.add_argument("--pretrained-path", default=None, type=str)
    parser.add_argument("--initial-checkpoint", default="", type=str)
    parser.add_argument("--num-classes", type=int, default=None)
    parser.add_argument("--in-chans", type=int, default=None)
    parser.add_argument("--input-size", default=None, nargs=3, type=int)
    parser.add_argument("--crop-pct", default=None, type=float)
    parser.add_argument("--mean", type=float, nargs="+", default=None)
    parser.add_argument("--std", type=float, nargs="+", default=None)
    parser.add_argument("--model-kwargs", nargs="*", default={}, action=timm.utils.ParseKwargs)
    return parser.parse_args(words[2:])


@pytest.mark.parametrize("cfg", [
    ModelConfig(preset="vit-tiny", image_size=32, patch_size=8),
    ModelConfig(preset="vit-tiny", image_size=32, patch_size=8, in_chans=1, normalize="dataset",
                pixel_mean="0.195415", pixel_std="0.28"),
], ids=["rgb-imagenet", "gray-dataset"])
def test_the_export_snippet_gives_timms_train_py_flags_that_load_the_same_encoder(tmp_path, cfg):
    """timm's own fine-tuning script: ``--initial-checkpoint`` (``load_checkpoint``, strict) fails
    on the head the export leaves out, so the snippet gives ``--pretrained --pretrained-path``
    (timm adapts the head) with pretraining's sizes and normalisation as flags. Built the way
    train.py builds its model and data config, it holds the app's encoder, exactly."""
    torch.manual_seed(0)
    model = MaskedAutoencoder(cfg)
    with torch.no_grad():  # not an init timm would make itself
        for param in model.parameters():
            param.add_(0.01 * torch.randn_like(param))
    save_weights(model, tmp_path / "model.safetensors")
    out = tmp_path / "export dir" / "encoder.safetensors"  # a path the shell must quote
    export_encoder(tmp_path / "model.safetensors", out)
    args = _timm_train_py_args(timm_snippet(cfg, out))
    # train.py: create_model(..., pretrained=args.pretrained, in_chans=..., num_classes=...,
    # checkpoint_path=args.initial_checkpoint, pretrained_cfg_overlay=dict(file=args.pretrained_path,
    # num_classes=-1), **args.model_kwargs), then resolve_data_config(vars(args), model=model).
    assert args.pretrained and Path(args.pretrained_path) == out and not args.initial_checkpoint
    vit = timm.create_model(args.model, pretrained=args.pretrained, in_chans=args.in_chans,
                            num_classes=args.num_classes, checkpoint_path=args.initial_checkpoint,
                            pretrained_cfg_overlay=dict(file=args.pretrained_path, num_classes=-1),
                            **args.model_kwargs).eval()
    data = timm.data.resolve_data_config(vars(args), model=vit)
    mean, std = pixel_stats(cfg)
    assert data["input_size"] == (cfg.channels, 32, 32) and data["crop_pct"] == 1.0
    assert data["mean"] == pytest.approx(mean) and data["std"] == pytest.approx(std)
    images = torch.randint(0, 256, (2, cfg.channels, 32, 32), dtype=torch.uint8)
    x = model.normalize(images)
    with torch.no_grad():
        assert torch.equal(vit.forward_features(x), model.backbone.encode(x))
    # What the comment warns of: timm's strict loaders refuse the head-less file.
    with pytest.raises(RuntimeError, match="head.weight"):
        timm.create_model(args.model, in_chans=args.in_chans, num_classes=args.num_classes,
                          checkpoint_path=str(out), **args.model_kwargs)
