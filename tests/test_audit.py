"""The parameter audit and its command line, and the refusal of impossible arguments."""

from __future__ import annotations

import copy
import functools
import json

import pytest
import timm
import torch
from lightly.models.modules import MaskedVisionTransformerDecoderTIMM

from mae_core.config import PRESETS, ConfigError, ModelConfig
from mae_core.model import MaskedAutoencoder, apply_policy
from mae_core import audit as params
from mae_core.audit import audit

PRESET_NAMES = ("vit-tiny", "vit-small", "vit-base")
# ViT-L and ViT-H are audited on the meta device (shapes and gradients, no memory): see below.
META_PRESETS = ("vit-large", "vit-huge")
IMAGE_SIZE, PATCH_SIZE = 32, 16  # 4 patches: the audit of vit-base stays fast
HEAD = {"backbone.vit.head.weight", "backbone.vit.head.bias"}
FROZEN_CLEAN = {"backbone.mask_token", "backbone.vit.pos_embed", "decoder.pos_embed"}
FROZEN_REFERENCE = {"backbone.vit.pos_embed", "decoder.pos_embed"}


def _cfg(preset: str, policy: str) -> ModelConfig:
    return ModelConfig(preset=preset, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, policy=policy)


@functools.lru_cache(maxsize=None)
def _audit(preset: str, policy: str):
    torch.manual_seed(0)
    return audit(_cfg(preset, policy))


@functools.lru_cache(maxsize=None)
def _unpoliced_model(preset: str) -> MaskedAutoencoder:
    """The model exactly as the constructors make it (no policy applied); do not modify."""
    return MaskedAutoencoder(_cfg(preset, "reference"), policy=None)


def _constructed(preset: str) -> list[tuple[str, tuple[int, ...], int]]:
    """(name, shape, numel) of every tensor of the model as the constructors make it."""
    return [(name, tuple(p.shape), p.numel())
            for name, p in _unpoliced_model(preset).named_parameters()]


def _trainable_after_policy(preset: str, policy: str) -> int:
    """What the optimiser of a model with ``policy`` applied really gets."""
    model = copy.deepcopy(_unpoliced_model(preset))
    apply_policy(model, policy)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _rows(preset: str, policy: str) -> dict:
    return {row.name: row for row in _audit(preset, policy).rows}


def test_the_presets_under_test_are_all_the_presets():
    assert set(PRESET_NAMES) | set(META_PRESETS) == set(PRESETS)


@pytest.mark.parametrize("preset", META_PRESETS)
def test_the_large_presets_audit_like_the_small_ones(preset):
    """The policy's effect and the gradient-coverage check on ViT-L/H, built on the meta device."""
    with torch.device("meta"):
        clean, reference = _cfg(preset, "ddp-clean"), _cfg(preset, "reference")
        clean_audit, reference_audit = audit(clean), audit(reference)
    status = {row.name: row.status for row in clean_audit.rows}
    assert clean_audit.ddp_safe and status["backbone.mask_token"] == "frozen"
    assert all(status[name] == "removed" for name in HEAD if name in status)
    # timm's ViT-H (the MAE paper's) is built without a classifier: only its mask token breaks DDP.
    assert set(reference_audit.no_grad) == {"backbone.mask_token"} | (HEAD & set(status))


# --- statuses ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_ddp_clean_statuses(preset):
    rows = _rows(preset, "ddp-clean")
    for name in HEAD:
        assert rows[name].status == "removed"
        assert "classifier head" in rows[name].reason
    assert rows["backbone.mask_token"].status == "frozen"
    assert "masked patches are dropped" in rows["backbone.mask_token"].reason
    for name in ("backbone.vit.pos_embed", "decoder.pos_embed"):
        assert rows[name].status == "frozen"
        assert "sin-cos" in rows[name].reason
    others = {name: row.status for name, row in rows.items() if name not in HEAD | FROZEN_CLEAN}
    assert others and set(others.values()) == {"trainable"}, others
    # the decoder's mask token is used by the loss, so it must stay trainable
    assert rows["decoder.mask_token"].status == "trainable"
    assert rows["backbone.vit.cls_token"].status == "trainable"


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_reference_statuses(preset):
    rows = _rows(preset, "reference")
    for name in HEAD | {"backbone.mask_token"}:
        assert rows[name].status == "trainable", name
    assert {name for name, row in rows.items() if row.status == "frozen"} == FROZEN_REFERENCE
    assert not [name for name, row in rows.items() if row.status == "removed"]


@pytest.mark.parametrize("policy", ["ddp-clean", "reference"])
@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_rows_list_every_constructed_tensor_once(preset, policy):
    rows = _audit(preset, policy).rows
    assert [(r.name, r.shape, r.numel) for r in rows] == _constructed(preset)
    assert {r.status for r in rows} <= {"trainable", "frozen", "removed"}


@functools.lru_cache(maxsize=None)
def _independent_parameter_count(preset: str) -> int:
    """timm's ViT + lightly's encoder mask token and decoder + the two linear layers around it."""
    cfg = _cfg(preset, "reference")
    spec = cfg.preset_spec
    vit = timm.create_model(spec.timm_name, pretrained=False, img_size=cfg.image_size,
                            patch_size=cfg.patch_size)
    dec = cfg.decoder()
    decoder = MaskedVisionTransformerDecoderTIMM(num_patches=cfg.num_patches, embed_dim=dec.dim,
                                                 depth=dec.depth, num_heads=dec.heads)
    count = sum(p.numel() for p in vit.parameters()) + sum(p.numel() for p in decoder.parameters())
    pixels = cfg.patch_size**2 * 3
    return (count + spec.embed_dim                      # backbone.mask_token
            + spec.embed_dim * dec.dim + dec.dim        # decoder_embed
            + dec.dim * pixels + pixels)                # prediction_head


@pytest.mark.parametrize("policy", ["ddp-clean", "reference"])
@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_totals_add_up_to_the_constructors_total(preset, policy):
    cfg = _cfg(preset, policy)
    result = _audit(preset, policy)
    constructed = sum(numel for _, _, numel in _constructed(preset))
    assert result.constructor_total == constructed == _independent_parameter_count(preset)
    assert set(result.totals) == {"trainable", "frozen", "removed"}
    assert sum(result.totals.values()) == constructed

    d, dd = PRESETS[preset].embed_dim, cfg.decoder().dim
    tokens = cfg.num_patches + 1
    pos_embeds = tokens * d + tokens * dd
    if policy == "ddp-clean":
        assert result.totals["removed"] == d * 1000 + 1000  # the ImageNet classifier head
        assert result.totals["frozen"] == pos_embeds + d    # + the encoder mask token
    else:
        assert result.totals["removed"] == 0
        assert result.totals["frozen"] == pos_embeds
    assert result.totals["trainable"] == constructed - result.totals["removed"] - result.totals["frozen"]
    # the trainable total is what the optimiser of a policy-applied model really gets
    assert result.totals["trainable"] == _trainable_after_policy(preset, policy)


# --- gradient coverage ------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_gradient_coverage(preset):
    clean, reference = _audit(preset, "ddp-clean"), _audit(preset, "reference")
    assert clean.no_grad == [] and clean.ddp_safe
    assert set(reference.no_grad) == {"backbone.mask_token", *HEAD}
    assert len(reference.no_grad) == 3 and not reference.ddp_safe
    assert "plain DDP fails" in reference.verdict() and "backbone.mask_token" in reference.verdict()
    assert clean.verdict().startswith("plain DDP safe")


@pytest.mark.parametrize("preset", PRESET_NAMES)
@pytest.mark.parametrize("policy", ["ddp-clean", "reference"])
def test_the_audits_meta_device_check_finds_what_a_real_step_finds(preset, policy):
    """The audit traces its gradient check on the meta device (no memory, any size); a real
    model's real forward and backward leave exactly the same tensors without a gradient."""
    model = copy.deepcopy(_unpoliced_model(preset))
    apply_policy(model, policy)
    real = params.gradient_coverage(model)
    assert next(model.parameters()).device.type == "cpu"  # a real model, real values
    assert real == _audit(preset, policy).no_grad
    assert (real == []) == (policy == "ddp-clean")


@pytest.mark.parametrize("overrides", [
    dict(norm_pix_loss=True, in_chans=4, normalize="dataset"),
    dict(timm_model="vit_small_patch14_dinov2", decoder_dim=64, decoder_depth=2, decoder_heads=4),
])
def test_the_meta_check_agrees_on_other_encoders_and_losses(overrides):
    for policy in ("ddp-clean", "reference"):
        cfg = ModelConfig(image_size=32, patch_size=8, policy=policy, **overrides)
        model = MaskedAutoencoder(cfg, policy=policy)
        assert params.gradient_coverage(model) == audit(cfg).no_grad


# The smallest timm ViT MAE accepts that pools by average: its final ``norm`` is an Identity and its
# LayerNorm is ``fc_norm``, on the classification path (eva_large_*, beit3_large/giant_* alike).
FC_NORM_VIT = "beit3_base_patch16_224"
FC_NORM = {"backbone.vit.fc_norm.weight", "backbone.vit.fc_norm.bias"}


def test_an_average_pooled_vits_fc_norm_is_frozen_so_plain_ddp_works():
    """Its fc_norm never gets a gradient in MAE (lightly's encode() ends at ``norm``): trainable,
    plain DDP failed on it with Lightning's unused-parameters error."""
    clean = audit(ModelConfig(timm_model=FC_NORM_VIT, image_size=32, patch_size=16))
    assert clean.no_grad == [] and clean.ddp_safe
    assert clean.verdict().startswith("plain DDP safe")
    rows = {row.name: row for row in clean.rows}
    for name in FC_NORM:
        assert rows[name].status == "frozen"
        assert "pooled classification output" in rows[name].reason
        assert "trained by the reconstruction loss" not in rows[name].reason
    assert all(rows[name].status == "removed" for name in HEAD)
    groups = {group.title: group for group in params.group_rows(clean)}
    assert FC_NORM <= {row.name for row in groups["classification head"].rows}
    assert groups["classification head"].ddp_relevant

    reference = audit(ModelConfig(timm_model=FC_NORM_VIT, image_size=32, patch_size=16,
                                  policy="reference"))
    assert set(reference.no_grad) == {"backbone.mask_token", *HEAD, *FC_NORM}
    rows = {row.name: row for row in reference.rows}
    assert all(rows[name].reason.startswith("trainable but gets no gradient") for name in FC_NORM)


def test_a_size_too_big_to_build_audits_from_shapes_alone():
    """vit-huge at 448 px / patch 2 (50,176 patches): the app's Parameters fields reach it, and a
    real build and backward would need tens of GB in the app's own process."""
    result = audit(ModelConfig(preset="vit-huge", image_size=448, patch_size=2))
    rows = {row.name: row for row in result.rows}
    assert rows["backbone.vit.pos_embed"].shape == (1, 50_177, 1280)
    assert result.constructor_total > 700_000_000 and result.ddp_safe


# --- refused arguments ------------------------------------------------------------------------------

def _config_error(**kwargs) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        ModelConfig(**kwargs)
    return info.value


def test_unknown_preset_is_refused_naming_it():
    err = _config_error(preset="vit-gigantic")
    assert err.field == "preset"
    assert "vit-gigantic" in str(err) and str(err).startswith("preset:")
    assert isinstance(err, ValueError)


@pytest.mark.parametrize("image_size, patch_size", [(50, 16), (64, 12), (100, 8)])
def test_image_size_not_divisible_by_patch_size_is_refused(image_size, patch_size):
    err = _config_error(image_size=image_size, patch_size=patch_size)
    assert err.field == "image_size"
    assert str(image_size) in str(err) and str(patch_size) in str(err)


@pytest.mark.parametrize("mask_ratio", [0, 1, 1.5, -0.1, 0.0, 1.0])
def test_mask_ratio_outside_0_1_is_refused(mask_ratio):
    err = _config_error(mask_ratio=mask_ratio)
    assert err.field == "mask_ratio"
    assert "mask_ratio" in str(err) and str(mask_ratio) in str(err)


def test_valid_edges_are_accepted():
    # The checks are not so strict that they refuse what the model supports.
    ModelConfig(image_size=32, patch_size=16, mask_ratio=0.01)
    ModelConfig(image_size=224, patch_size=16, mask_ratio=0.99)
    ModelConfig(preset="vit-base", image_size=48, patch_size=8)


def _single_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error:"), stderr
    return lines[0]


@pytest.mark.parametrize("args, field, mentioned", [
    (["--model", "vit-gigantic"], "preset", "vit-gigantic"),
    (["--image-size", "50"], "image_size", "50"),
])
def test_params_cli_refuses_bad_arguments_without_traceback(run_module, args, field, mentioned):
    result = run_module("mae_core.audit", *args)
    assert result.returncode == 2, result.stderr
    line = _single_error_line(result.stderr)
    assert field in line and mentioned in line
    assert result.stdout == ""


def test_train_cli_refuses_bad_mask_ratio_before_creating_a_run(run_module, tmp_path):
    runs_dir = tmp_path / "runs"
    result = run_module("mae_core.train", "--runs-dir", runs_dir, "--mask-ratio", "1.5",
                        "--max-steps", "1", "--devices", "1", "--accelerator", "cpu")
    assert result.returncode == 2, result.stderr
    line = _single_error_line(result.stderr)
    assert "mask_ratio" in line and "1.5" in line
    assert not runs_dir.exists()
    assert list(tmp_path.iterdir()) == []


# --- the audit's command line -----------------------------------------------------------------------

def test_params_cli_ddp_clean_table(run_module):
    result = run_module("mae_core.audit", "--model", "vit-tiny", "--policy", "ddp-clean")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    # The size is said: the position embeddings' counts depend on it (64 px / 8 by default).
    assert "Parameter audit: vit-tiny, policy ddp-clean, 64 px / patch 8 (vit_tiny_patch16_224, " \
           "3 channels)" in out
    head_lines = [line for line in out.splitlines() if line.startswith("backbone.vit.head.")]
    assert len(head_lines) == 2 and all("removed" in line for line in head_lines)
    mask_line = next(line for line in out.splitlines() if line.startswith("backbone.mask_token "))
    assert "frozen" in mask_line
    assert "removed 193,000" in out  # 192 × 1000 + 1000
    assert "verdict: plain DDP safe" in out
    assert "plain DDP fails" not in out


def test_params_cli_reference_table(capsys):
    # In-process: the command's entry point is proven by the ddp-clean table above; same main().
    assert params.main(["--model", "vit-tiny", "--policy", "reference"]) == 0
    out = capsys.readouterr().out
    verdict = next(line for line in out.splitlines() if line.startswith("verdict:"))
    assert "plain DDP fails" in verdict
    for name in ("backbone.mask_token", "backbone.vit.head.weight", "backbone.vit.head.bias"):
        assert name in verdict
    assert "removed 0" in out
    assert "plain DDP safe" not in out


def test_params_cli_json(capsys):
    # In-process (the command line's entry point is proven by the tests above); same main().
    assert params.main(["--model", "vit-small", "--policy", "reference",
                        "--image-size", "64", "--patch-size", "16", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {"rows", "totals", "no_grad", "ddp_safe"} <= set(data)
    assert data["preset"] == "vit-small" and data["policy"] == "reference"
    assert data["ddp_safe"] is False
    assert set(data["no_grad"]) == {"backbone.mask_token", *HEAD}
    rows = {row["name"]: row for row in data["rows"]}
    assert rows["backbone.vit.head.weight"]["status"] == "trainable"
    assert rows["backbone.vit.head.weight"]["shape"] == [1000, 384]
    assert sum(data["totals"].values()) == data["constructor_total"] == sum(
        row["numel"] for row in data["rows"])
