"""ui.parameters: both policies' audits side by side, grouped by model part with the DDP-relevant
parts first, cached per model; the model comes from a run or from the preset fields."""

from __future__ import annotations

import dataclasses
import re

import gradio as gr
import pytest

from mae_core.config import ConfigError, ModelConfig, RunConfig, TrainConfig
from mae_core.rundir import create_run
from mae_core.runs import RunError, RunManager
from ui import parameters, render
from ui.common import AppContext, cached_audit

TINY = ModelConfig(image_size=32, patch_size=8)


@pytest.fixture(scope="module")
def view() -> parameters.AuditView:
    return parameters.audit_view(TINY, "Preset vit-tiny, 32px, patch 8")


def groups_in(html: str) -> list[tuple[str, bool]]:
    """(group title, open) in the order the page shows them."""
    return [(m.group(1), bool(m.group(2)))
            for m in re.finditer(r'<details class="mae-group" data-group="([^"]+)"( open)?>', html)]


def test_both_policies_ddp_clean_safe_reference_not(view):
    clean, reference = view.data["ddp-clean"], view.data["reference"]
    assert clean["policy"] == "ddp-clean" and clean["ddp_safe"] is True and clean["no_grad"] == []
    assert reference["policy"] == "reference" and reference["ddp_safe"] is False
    assert set(reference["no_grad"]) == {"backbone.vit.head.weight", "backbone.vit.head.bias",
                                         "backbone.mask_token"}
    assert 'data-policy="ddp-clean"' in view.clean and "plain DDP safe" in view.clean
    assert 'data-policy="reference"' in view.reference and "plain DDP fails" in view.reference
    assert "backbone.mask_token" in view.diff and "Where the policies differ" in view.diff


def test_groups_put_the_ddp_relevant_parts_first_and_open(view):
    for html in (view.clean, view.reference):
        groups = groups_in(html)
        titles = [title for title, _ in groups]
        assert "encoder block 0" in titles and "decoder block 0" in titles
        opened = [is_open for _, is_open in groups]
        assert opened == sorted(opened, reverse=True), "an open (DDP-relevant) group after a closed one"
        assert opened[0] and not opened[-1]
        first = {title for title, is_open in groups if is_open}
        assert {"classification head", "encoder tokens and position"} <= first
        assert "encoder block 0" not in first
        # Within each kind the model's own order: block 0 before block 1.
        assert titles.index("encoder block 0") < titles.index("encoder block 1")
    # Every tensor appears exactly once, under a group with totals.
    rows = re.findall(r'<tr data-name="([^"]+)"', view.clean)
    assert len(rows) == len(set(rows)) == len(view.data["ddp-clean"]["rows"])
    assert re.search(r"encoder block 0</b> · \d+ tensors · trainable [\d,]+", view.clean)


def test_the_no_gradient_rows_are_marked_in_reference(view):
    marked = re.findall(r'<tr data-name="([^"]+)" data-status="trainable" class="st-trainable no-grad"',
                        view.reference)
    assert set(marked) == {"backbone.vit.head.weight", "backbone.vit.head.bias", "backbone.mask_token"}
    assert "no-grad" not in view.clean.replace('"no-grad"', "")  # class never set for ddp-clean


def test_the_audit_is_cached_per_model(view):
    before = cached_audit.cache_info()
    again = parameters.audit_view(TINY, "again")
    after = cached_audit.cache_info()
    assert after.hits == before.hits + 2 and after.misses == before.misses
    assert cached_audit(TINY) is cached_audit(dataclasses.replace(TINY))
    assert again.data == view.data and again.title == "again"
    reference = cached_audit(dataclasses.replace(TINY, policy="reference"))  # cached by audit_view
    assert reference is not cached_audit(TINY) and reference.policy == "reference"
    assert cached_audit.cache_info().misses == after.misses


def test_model_from_the_fields_or_a_run(tmp_path):
    ctx = AppContext(RunManager(tmp_path / "runs"))
    base, title = parameters.model_config(ctx, None, "vit-small", "48", 16.0)
    assert base == ModelConfig(preset="vit-small", image_size=48, patch_size=16)
    assert "vit-small" in title and "48px" in title
    cfg = RunConfig(model=ModelConfig(image_size=40, patch_size=8, policy="reference"),
                    train=TrainConfig(accelerator="cpu", devices=1, num_workers=0))
    paths = create_run(cfg.resolved(), runs_dir=ctx.manager.runs_dir)
    base, title = parameters.model_config(ctx, paths.run_id, "vit-base", 224, 16)
    assert base == cfg.model and paths.run_id in title  # the run's model, not the fields
    with pytest.raises(RunError):
        parameters.model_config(ctx, "no-such-run", "vit-tiny", 32, 8)


@pytest.mark.parametrize("preset,image,patch,field", [
    ("vit-gigantic", 32, 8, "preset"), (None, 32, 8, "preset"), ("", 32, 8, "preset"),
    ("vit-tiny", "abc", 8, "image_size"), ("vit-tiny", 32.5, 8, "image_size"),
    ("vit-tiny", 32, None, "patch_size"), ("vit-tiny", 36, 8, "image_size"),
    ("vit-tiny", 512, 16, "image_size")])
def test_bad_fields_are_refused_naming_the_field(tmp_path, preset, image, patch, field):
    ctx = AppContext(RunManager(tmp_path / "runs"))
    with pytest.raises(ConfigError) as caught:
        parameters.model_config(ctx, None, preset, image, patch)
    assert caught.value.field == field
    if field == "preset":
        assert "vit-tiny" in str(caught.value)  # the error lists the valid options


def wired(demo, elem_id: str, event: str) -> list:
    """The functions that an event of the component ``elem_id`` runs, each with its .then chain."""
    fns = list(demo.fns.values())
    block = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == elem_id)
    chain = [f for f in fns if (block._id, event) in f.targets]
    for done in chain:  # grows while it is walked
        chain += [f for f in fns if f.trigger_after == done._id]
    return chain


def test_a_chosen_run_shows_its_model_in_the_fields_and_an_edit_leaves_the_run(tmp_path):
    """The title read "Run …: 32px, patch 8" above fields still at the preset's defaults, and a
    size typed there was silently ignored: Audit kept auditing the run."""
    from ui.blocks import build_app

    ctx = AppContext(RunManager(tmp_path / "runs"))
    cfg = RunConfig(model=ModelConfig(preset="vit-small", image_size=40, patch_size=8),
                    train=TrainConfig(accelerator="cpu", devices=1, num_workers=0))
    paths = create_run(cfg.resolved(), runs_dir=ctx.manager.runs_dir)
    assert parameters.run_model_fields(ctx, paths.run_id) == {
        "preset": "vit-small", "image_size": 40, "patch_size": 8, "timm_model": ""}
    assert parameters.run_model_fields(ctx, "") == {}  # no run: the fields are the model

    demo = build_app(ctx.manager)
    picked = wired(demo, "param-run", "input")
    shown = {block.elem_id: value for block, value in picked[0].fn(paths.run_id).items()}
    assert shown == {"param-preset": "vit-small", "param-image": 40, "param-patch": 8,
                     "param-timm": "", "params-message": ""}
    # No run: only the message is cleared, the fields stay what is audited (an empty dict of
    # updates read as one value for five outputs, and the event failed).
    none = {block.elem_id: value for block, value in picked[0].fn("").items()}
    assert none == {"params-message": ""}
    assert picked[-1].fn is wired(demo, "audit-btn", "click")[0].fn  # then audits it
    # Opening the tab picks the Train tab's run: its model is shown the same way.
    assert picked[0].fn in [f.fn for f in wired(demo, "tab-parameters", "select")]
    # An edit of any field leaves the run, as choosing a preset did: "(none: audit the preset…)".
    for elem_id in ("param-preset", "param-image", "param-patch", "param-timm"):
        leave = wired(demo, elem_id, "input")[0]
        assert [block.elem_id for block in leave.outputs] == ["param-run"], elem_id
        assert leave.fn() == parameters.NO_RUN[1], elem_id


def test_the_policy_tables_stack_on_a_narrow_screen(ctx):
    """Side by side at 800 px each table got ~340 px and the tensor names broke every few
    characters: each asks for 560 px, so the row wraps them one above the other there."""
    with gr.Blocks():
        c = parameters.build(ctx)
    assert c["clean"].min_width == c["reference"].min_width == parameters.POLICY_TABLE_MIN_WIDTH
    assert parameters.POLICY_TABLE_MIN_WIDTH >= 560
    # Gradio 6.31 draws gr.HTML with "min-width: min(0px, 100%)" whatever min_width says.
    rule = f"min-width: min({parameters.POLICY_TABLE_MIN_WIDTH}px, 100%) !important"
    assert re.search(r"#params-clean, #params-reference \{ " + re.escape(rule), render.CSS)
