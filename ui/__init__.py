"""MAE Studio's web UI: one module per tab, composed here with the events that cross tabs.

Each tab module has a ``build(ctx) -> dict`` that lays out its components and wires its own
events, and plain functions that do the work (tested without a server). All state lives in the run
directories, so every tab, every browser and an app restart show the same runs.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from mae_core.checks import shown
from ui import parameters, reconstruct, render, runs, train
from ui.common import AppContext, UserError, guarded

SLOW_POLL_S = 5.0  # checkpoint choices, previews and the runs table
# After the tab's content is shown: Vega re-measures a chart's box on a window resize.
REDRAW_CHARTS_JS = ("() => { setTimeout(() => window.dispatchEvent(new Event('resize')),"
                    " 100); }")
HEADER = ("# MAE Studio\nPretrain a Masked Autoencoder (timm ViT + lightly, Lightning DDP), watch it "
          "learn, and look inside it.")


def build_app(manager: Any) -> gr.Blocks:
    """The MAE Studio Blocks driving ``manager`` (a RunManager or LazyRunManager); launch with
    ``demo.queue().launch(css=render.CSS, ...)``."""
    ctx = AppContext(manager)
    # Uploads and files handed out are purged from Gradio's cache once a day old.
    with gr.Blocks(title="MAE Studio", delete_cache=(3600, 86400)) as demo:
        gr.Markdown(HEADER, elem_id="header")
        with gr.Tabs(elem_id="tabs") as tabs:
            with gr.Tab("Train", id="train", elem_id="tab-train") as train_tab:
                t = train.build(ctx)
            with gr.Tab("Reconstruct", id="reconstruct", elem_id="tab-reconstruct") as recon_tab:
                r = reconstruct.build(ctx)
            with gr.Tab("Parameters", id="parameters", elem_id="tab-parameters") as params_tab:
                p = parameters.build(ctx)
            with gr.Tab("Runs", id="runs", elem_id="tab-runs") as runs_tab:
                u = runs.build(ctx)
        slow_timer = gr.Timer(SLOW_POLL_S)
        _wire_across(ctx, demo, tabs, t, r, p, u, slow_timer, train_tab, recon_tab, params_tab,
                     runs_tab)
    demo.model_cache = ctx.models  # for tests and diagnostics: how often weights were loaded
    return demo


def _wire_across(ctx: AppContext, demo: gr.Blocks, tabs: gr.Tabs, t: dict, r: dict, p: dict,
                 u: dict, slow_timer: gr.Timer, train_tab: gr.Tab, recon_tab: gr.Tab,
                 params_tab: gr.Tab, runs_tab: gr.Tab) -> None:
    hidden = "hidden"
    demo.load(guarded("hardware", lambda text: text)(train.hardware_text), None, t["hardware"],
              api_name="hardware", show_progress=hidden)
    demo.load(**t["refresh_spec"], api_name="load_train")
    # The Train tab's poll goes on while another tab shows, and a chart it drew then is as wide
    # as its hidden box: none. Back on the tab (or opened there), a resize event has Vega measure
    # the box again (ui.plots: the charts are as wide as their box).
    train_tab.select(None, js=REDRAW_CHARTS_JS)
    gr.on([demo.load, slow_timer.tick, recon_tab.select], **r["refresh_event"],
          api_name="refresh_checkpoints", trigger_mode="always_last")
    gr.on([demo.load, slow_timer.tick, runs_tab.select], **u["refresh_event"],
          api_name="refresh_runs", trigger_mode="always_last")

    # Opening the Parameters tab audits the run the Train tab shows.
    @guarded("the parameter audit", lambda text: {p["message"]: render.notice("error", text)})
    def run_for_audit(run_id: str | None) -> dict:
        listed = [s["run_id"] for s in ctx.manager.list()]
        choices = [parameters.NO_RUN] + [(i, i) for i in listed]
        return {p["run"]: gr.update(choices=choices, value=run_id if run_id in listed else "")}

    params_tab.select(run_for_audit, t["run_pick"], p["run"], api_name="params_for_run",
                      show_progress=hidden).then(**p["fields_event"]).then(**p["audit_event"])

    @guarded("open", lambda text: {u["message"]: render.notice("error", text)})
    def open_run(run_id: str | None) -> dict:
        if not run_id:
            raise UserError("Choose a run to open.")
        if run_id not in {s["run_id"] for s in ctx.manager.list()}:
            raise UserError(f"no run named {shown(run_id)}")
        return {t["run_pick"]: gr.update(value=run_id), r["ckpt_pick"]: gr.update(value=run_id),
                r["follow"]: False, tabs: gr.Tabs(selected="train"),
                u["message"]: render.notice("ok", f"Opened `{run_id}` in the Train and "
                                                  "Reconstruct tabs.")}

    u["open"].click(open_run, u["pick"], [t["run_pick"], r["ckpt_pick"], r["follow"], tabs,
                                          u["message"]], api_name="open_run").then(
        **t["refresh_spec"], api_name="open_refresh").then(None, js=REDRAW_CHARTS_JS)
