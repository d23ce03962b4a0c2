"""The page: the four tabs (one module each) composed into one ``gr.Blocks``, with the events that
cross tabs.

Each tab module has a ``build(ctx) -> dict`` that lays out its components and wires its own
events, and plain functions that do the work (tested without a server). All state lives in the run
directories, so every tab, every browser and an app restart show the same runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from mae_core.checks import shown
from ui import parameters, reconstruct, render, runs, train
from ui.common import AppContext, UserError, as_run_id, guarded

SLOW_POLL_S = 5.0  # checkpoint choices, previews and the runs table
# After the tab's content is shown: Vega re-measures a chart's box on a window resize.
REDRAW_CHARTS_JS = ("() => { setTimeout(() => window.dispatchEvent(new Event('resize')),"
                    " 100); }")
# The tabs in their order: label, id (and elem_id "tab-<id>"), the module that builds it.
TABS = (("Train", "train", train), ("Reconstruct", "reconstruct", reconstruct),
        ("Parameters", "parameters", parameters), ("Runs", "runs", runs))
HEADER = ("# MAE Studio\nPretrain a Masked Autoencoder (timm ViT + lightly, Lightning DDP), watch it "
          "learn, and look inside it.")


@dataclass(frozen=True)
class BuiltTab:
    tab: gr.Tab
    components: dict[str, Any]  # what the tab module's build() returned


def build_app(manager: Any) -> gr.Blocks:
    """The MAE Studio Blocks driving ``manager`` (a RunManager or LazyRunManager); launch with
    ``demo.queue().launch(**render.page_style(), ...)``."""
    ctx = AppContext(manager)
    # Uploads and files handed out are purged from Gradio's cache once a day old.
    with gr.Blocks(title="MAE Studio", delete_cache=(3600, 86400)) as demo:
        gr.Markdown(HEADER, elem_id="header")
        with gr.Tabs(elem_id="tabs") as tabs:
            built = {}
            for label, tab_id, module in TABS:
                with gr.Tab(label, id=tab_id, elem_id=f"tab-{tab_id}") as tab:
                    built[tab_id] = BuiltTab(tab, module.build(ctx))
        _wire_across(ctx, demo, tabs, built, gr.Timer(SLOW_POLL_S))
    demo.model_cache = ctx.models  # for tests and diagnostics: how often weights were loaded
    return demo


def _wire_across(ctx: AppContext, demo: gr.Blocks, tabs: gr.Tabs, built: dict[str, BuiltTab],
                 slow_timer: gr.Timer) -> None:
    hidden = "hidden"
    ids = ("train", "reconstruct", "parameters", "runs")
    train_ui, recon_ui, params_ui, runs_ui = (built[tab_id].components for tab_id in ids)
    train_tab, recon_tab, params_tab, runs_tab = (built[tab_id].tab for tab_id in ids)
    demo.load(guarded("hardware", lambda text: text)(train.hardware_text), None,
              train_ui["hardware"], api_name="hardware", show_progress=hidden)
    demo.load(**train_ui["refresh_spec"], api_name="load_train")
    # The form as this browser left it, and what its data field holds.
    demo.load(**train_ui["restore_form_spec"]).then(**train_ui["data_info_on_load"])
    # A preparation the app is running (started before a reload, or in another tab).
    demo.load(**train_ui["preparing_on_load"])
    # The Train tab's poll goes on while another tab shows, and a chart it drew then is as wide
    # as its hidden box: none. Back on the tab (or opened there), a resize event has Vega measure
    # the box again (ui.plots: the charts are as wide as their box).
    train_tab.select(None, js=REDRAW_CHARTS_JS)
    gr.on([demo.load, slow_timer.tick, recon_tab.select], **recon_ui["refresh_event"],
          api_name="refresh_checkpoints", trigger_mode="always_last")
    gr.on([demo.load, slow_timer.tick, runs_tab.select], **runs_ui["refresh_event"],
          api_name="refresh_runs", trigger_mode="always_last")

    # Opening the Parameters tab audits the run the Train tab shows.
    @guarded("the parameter audit",
             lambda text: {params_ui["message"]: render.notice("error", text)})
    def run_for_audit(run_id: str | None) -> dict:
        statuses = ctx.manager.list()
        listed = [s["run_id"] for s in statuses]
        if run_id is None:  # opened before the Train tab's first poll chose its run ("" is
            run_id = train.pick_selected(statuses, None, None)  # no run: the preset's audit)
        choices = [parameters.NO_RUN] + [(i, i) for i in listed]
        return {params_ui["run"]: gr.update(choices=choices,
                                            value=run_id if run_id in listed else "")}

    params_tab.select(run_for_audit, train_ui["run_pick"], params_ui["run"],
                      api_name="params_for_run", show_progress=hidden).then(
        **params_ui["fields_event"]).then(**params_ui["audit_event"])

    @guarded("open", lambda text: {runs_ui["message"]: render.notice("error", text)})
    def open_run(run_id: str | None) -> dict:
        run_id = as_run_id(run_id)
        if not run_id:
            raise UserError("Choose a run to open.")
        if run_id not in {s["run_id"] for s in ctx.manager.list()}:
            raise UserError(f"no run named {shown(run_id)}")
        return {train_ui["run_pick"]: gr.update(value=run_id),
                recon_ui["ckpt_pick"]: gr.update(value=run_id),
                recon_ui["follow"]: False, tabs: gr.Tabs(selected="train"),
                runs_ui["message"]: render.notice("ok", f"Opened `{run_id}` in the Train and "
                                                        "Reconstruct tabs.")}

    opened = [train_ui["run_pick"], recon_ui["ckpt_pick"], recon_ui["follow"], tabs,
              runs_ui["message"]]
    runs_ui["open"].click(open_run, runs_ui["pick"], opened, api_name="open_run").then(
        **train_ui["refresh_spec"], api_name="open_refresh").then(None, js=REDRAW_CHARTS_JS)
