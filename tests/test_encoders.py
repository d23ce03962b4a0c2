"""Any timm ViT as the encoder (``timm_model``), the ViT-L/H presets, and clear refusals of the rest."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from mae_core.audit import main as audit_main
from mae_core.config import ConfigError, ModelConfig
from mae_core.encoders import encoder_shape
from mae_core.model import MaskedAutoencoder, draw_token_mask
from mae_core.process import clean_env
from mae_core.rundir import RunPaths
from mae_core.weights import load_model
from tests.helpers import REPO_ROOT

ANY_VIT = "vit_small_patch14_dinov2"  # a ViT-S with layer scale: not one of the presets


@pytest.mark.parametrize(("name", "says"), [
    ("resnet50", "not a plain timm VisionTransformer"),
    ("deit_tiny_distilled_patch16_224", "not a plain timm VisionTransformer"),
    ("vit_base_patch16_siglip_224", "class token"),  # attention pooling, no class token
    ("vit_base_patch16_reg4_gap_256", "class token"),  # register tokens
    ("no_such_model_anywhere", "timm has no model named"),
    ("vit_small_patch16_18x2_224", "not attention then MLP blocks"),  # parallel: no .attn
    ("flexivit_small", "no_embed_class"),  # its position embedding has no class token row
])
def test_a_model_mae_cannot_use_is_refused_by_name(name, says):
    with pytest.raises(ConfigError) as err:
        ModelConfig(timm_model=name, image_size=32, patch_size=8)
    assert err.value.field == "timm_model" and says in str(err.value)


def test_the_audit_command_refuses_a_resnet_without_a_traceback():
    result = subprocess.run([sys.executable, "-m", "mae_core.audit", "--timm-model", "resnet50",
                             "--image-size", "32", "--patch-size", "8"], cwd=REPO_ROOT,
                            env=clean_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "timm_model: resnet50 is not a plain timm VisionTransformer" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_audit_command_takes_any_timm_vit(capsys):
    # In-process, the same main() the command runs (its entry point is proven just above).
    assert audit_main(["--timm-model", ANY_VIT, "--image-size", "32", "--patch-size", "8",
                       "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["preset"] == ANY_VIT and data["ddp_safe"] is True
    status = {row["name"]: row["status"] for row in data["rows"]}
    assert status["backbone.mask_token"] == "frozen"  # the fix applies to any ViT
    # timm builds this one without a classifier (num_classes=0): nothing else is removed.
    assert {n for n, s in status.items() if s == "removed"} <= {"backbone.vit.head.weight",
                                                                 "backbone.vit.head.bias"}


@pytest.mark.parametrize(("preset", "dim", "depth"), [("vit-large", 1024, 24), ("vit-huge", 1280, 32)])
def test_the_mae_papers_encoders_are_presets(preset, dim, depth):
    cfg = ModelConfig(preset=preset, image_size=224, patch_size=16)
    shape = encoder_shape(cfg.encoder_name, 224, 16)
    assert (shape.embed_dim, shape.depth, shape.mlp_hidden) == (dim, depth, 4 * dim)


def test_vit_large_trains_a_step_at_32_px():
    """Real weights this time (its audit runs on the meta device in tests/test_audit.py)."""
    cfg = ModelConfig(preset="vit-large", image_size=32, patch_size=8)
    torch.manual_seed(0)
    model = MaskedAutoencoder(cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    before = model.backbone.vit.blocks[23].mlp.fc2.weight.detach().clone()
    idx_keep, idx_mask = draw_token_mask(2, cfg.num_patches, cfg.mask_ratio)
    loss = model.loss(torch.randn(2, 3, 32, 32), idx_keep, idx_mask)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert not torch.equal(before, model.backbone.vit.blocks[23].mlp.fc2.weight)


def test_image_sizes_go_up_to_448():
    assert ModelConfig(image_size=448, patch_size=16).num_patches == 28 * 28
    with pytest.raises(ConfigError, match="image_size"):
        ModelConfig(image_size=464, patch_size=16)


def test_the_trainer_trains_any_timm_vit_and_its_weights_rebuild_it(run_module, tmp_path):
    result = run_module("mae_core.train", "--timm-model", ANY_VIT, "--image-size", "32",
                        "--patch-size", "8", "--batch-size", "4", "--max-steps", "2",
                        "--accelerator", "cpu", "--devices", "1", "--num-previews", "0",
                        "--runs-dir", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    [root] = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert ANY_VIT in root.name
    paths = RunPaths(root)
    assert paths.read_status()["state"] == "finished"
    assert yaml.safe_load(paths.config.read_text())["model"]["timm_model"] == ANY_VIT
    model = load_model(paths.weights)
    assert model.cfg.timm_model == ANY_VIT
    assert model.backbone.vit.embed_dim == 384  # the DINOv2 ViT-S, not the vit-tiny preset
