"""The Parameters tab: every tensor of the model, trainable, frozen or removed, and why, under both
policies side by side, with the gradient-coverage verdict that decides whether plain DDP works.

Audits are cached per (preset, sizes, policy); each is built and checked on the meta device, so
no size a person types costs memory. Only the result area shows progress; the inputs stay usable.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import gradio as gr

from mae_core.checks import shown
from mae_core.config import PRESETS, ModelConfig
from ui import render
from ui.common import (DEFAULTS, AppContext, FieldNumber, as_int, as_run_id, cached_audit,
                       guarded)

NO_RUN = ("(none: audit the preset and sizes below)", "")
POLICY_TABLE_MIN_WIDTH = 560  # px: a tensor name reads whole; two fit side by side from ~1200 px


@dataclasses.dataclass
class AuditView:
    title: str
    diff: str
    clean: str
    reference: str
    data: dict[str, Any]


def audit_view(base: ModelConfig, title: str) -> AuditView:
    """Both policies' audits of ``base``'s model, rendered."""
    from mae_core.audit import group_rows

    clean = cached_audit(dataclasses.replace(base, policy="ddp-clean"))
    reference = cached_audit(dataclasses.replace(base, policy="reference"))
    return AuditView(title, render.audit_diff_html(clean, reference),
                     render.audit_html(clean, group_rows(clean)),
                     render.audit_html(reference, group_rows(reference)),
                     {"ddp-clean": clean.to_dict(), "reference": reference.to_dict()})


def model_config(ctx: AppContext, run_id: str | None, preset: Any, image_size: Any,
                 patch_size: Any, timm_model: Any = "") -> tuple[ModelConfig, str]:
    """The model to audit, and a title: a run's model when one is chosen, else the fields
    (``timm_model``, any timm ViT name, replaces the preset's encoder)."""
    run_id = as_run_id(run_id)
    if run_id:
        base = ctx.manager.config(run_id).model
        # The model first, the run last: at 390 px "Run `<id>`:" broke the id over two lines,
        # and its colon began a third (#params-title breaks an id only at its hyphens).
        return base, (f"{base.label}, {base.image_size}px, patch {base.patch_size} · run "
                      f"`{run_id}`")
    if not isinstance(preset, str) or preset not in PRESETS:
        from mae_core.config import ConfigError

        raise ConfigError("preset", f"choose one of {', '.join(PRESETS)}; got {shown(preset)}")
    base = ModelConfig(preset=preset, image_size=as_int(image_size, "image_size"),
                       patch_size=as_int(patch_size, "patch_size"),
                       timm_model=str(timm_model or "").strip())
    what = f"timm model {base.timm_model}" if base.timm_model else f"Preset {base.preset}"
    return base, f"{what}, {base.image_size}px, patch {base.patch_size}"


def run_model_fields(ctx: AppContext, run_id: str | None) -> dict[str, Any]:
    """What the model fields show for a chosen run, by field name: its preset, sizes and timm
    model, the model its audit is of (they kept the preset's defaults: "Run …: 32px" above a
    64 px field). Nothing without a run: then the fields are what is audited."""
    run_id = as_run_id(run_id)
    if not run_id:
        return {}
    model = ctx.manager.config(run_id).model
    return {"preset": model.preset, "image_size": model.image_size,
            "patch_size": model.patch_size, "timm_model": model.timm_model}


def warm_default_audit() -> None:
    """Audit the default model in the background at start-up, so the tab opens at once."""
    threading.Thread(target=lambda: audit_view(DEFAULTS.model, ""), name="warm-audit",
                     daemon=True).start()


def build(ctx: AppContext) -> dict[str, Any]:
    """Lay out the Parameters tab (inside an open ``gr.Tab``) and wire its events."""
    c: dict[str, Any] = {}
    d = DEFAULTS.model
    with gr.Row():
        c["run"] = gr.Dropdown([NO_RUN], value="", label="run", scale=3, min_width=240,
                               elem_id="param-run", allow_custom_value=True)
        c["preset"] = gr.Dropdown(list(PRESETS), value=d.preset, label="preset", scale=1,
                                  min_width=150, elem_id="param-preset", allow_custom_value=True)
        c["image_size"] = FieldNumber(d.image_size, label="image size", scale=1, min_width=100,
                                      elem_id="param-image")
        c["patch_size"] = FieldNumber(d.patch_size, label="patch size", scale=1, min_width=100,
                                      elem_id="param-patch")
        c["timm_model"] = gr.Textbox(d.timm_model, label="timm model (optional)", scale=2,
                                     min_width=160, elem_id="param-timm",
                                     placeholder="any timm ViT, e.g. vit_small_patch14_dinov2")
        c["audit"] = gr.Button("Audit", scale=1, min_width=90, elem_id="audit-btn")
    c["title"] = gr.Markdown(elem_id="params-title")
    c["message"] = gr.HTML(elem_id="params-message")
    c["diff"] = gr.HTML(elem_id="params-diff")
    # Side by side where each gets POLICY_TABLE_MIN_WIDTH, stacked on a narrower screen: at 800 px
    # each got ~340 px and the tensor names broke every few characters. (Gradio's front end drops
    # gr.HTML's min_width: ui.render.CSS sets it on #params-clean and #params-reference.)
    with gr.Row():
        c["clean"] = gr.HTML(elem_id="params-clean", min_height=0,
                             min_width=POLICY_TABLE_MIN_WIDTH)
        c["reference"] = gr.HTML(elem_id="params-reference", min_height=0,
                                 min_width=POLICY_TABLE_MIN_WIDTH)
    c["json"] = gr.JSON(visible=False)
    _wire(ctx, c)
    return c


# Said as a size, a patch or a timm name is edited (audited when Audit is pressed): the tables
# went on showing the last audit, under its title, as if they were for the settings above.
EDITED_NOTICE = render.notice("info", "The tables below are for the settings audited last: press "
                                      "Audit for the settings above.")


def _wire(ctx: AppContext, c: dict[str, Any]) -> None:
    outputs = [c[n] for n in ("title", "diff", "clean", "reference", "json", "message")]

    @guarded("the parameter audit", lambda text: {c["message"]: render.notice("error", text)})
    def on_audit(run_id: str | None, preset: Any, image_size: Any, patch_size: Any,
                 timm_model: Any) -> dict:
        base, title = model_config(ctx, run_id, preset, image_size, patch_size, timm_model)
        view = audit_view(base, title)
        summary = (f"### {view.title}\nEvery tensor the constructors make and what each policy "
                   "does with it: green trainable, blue frozen, red removed; a red outline marks a "
                   "trainable tensor that gets no gradient (plain DDP fails on it). Parts that "
                   "matter to DDP come first and open.")
        return {c["title"]: summary, c["diff"]: view.diff, c["clean"]: view.clean,
                c["reference"]: view.reference, c["json"]: view.data, c["message"]: ""}

    @guarded("the parameter audit", lambda text: {c["message"]: render.notice("error", text)})
    def on_run_fields(run_id: str | None) -> dict:
        # The message is always among the updates: an empty dict is not read as "no updates"
        # but as one value for five outputs, and Gradio failed the event ("(none)" chosen).
        return {c["message"]: "", **{c[name]: value
                                     for name, value in run_model_fields(ctx, run_id).items()}}

    inputs = [c["run"], c["preset"], c["image_size"], c["patch_size"], c["timm_model"]]
    # The result area shows progress; the inputs are not outputs, so nothing covers them.
    progress = dict(show_progress="minimal", show_progress_on=[c["clean"], c["reference"]])
    c["audit_event"] = dict(fn=on_audit, inputs=inputs, outputs=outputs, **progress)
    c["fields_event"] = dict(fn=on_run_fields, inputs=[c["run"]],
                             outputs=[*inputs[1:], c["message"]], show_progress="hidden")
    c["audit"].click(**c["audit_event"], api_name="audit")
    c["run"].input(**c["fields_event"], api_name="run_fields").then(**c["audit_event"],
                                                                     api_name="audit_run")
    # Editing the model by hand leaves any selected run: the fields are audited now (a preset at
    # once; a size or name when Audit is pressed, not at every keystroke).
    c["preset"].input(lambda: "", None, c["run"], show_progress="hidden").then(
        **c["audit_event"], api_name="audit_preset")
    gr.on([c[name].input for name in ("image_size", "patch_size", "timm_model")], lambda: "",
          None, c["run"], show_progress="hidden", api_name="edit_model").then(
        lambda: EDITED_NOTICE, None, c["message"], api_visibility="private",
        show_progress="hidden")
