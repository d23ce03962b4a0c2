"""Comparing runs (in the Runs tab): their configs side by side with the differences first and
marked, their results (losses, throughput, MFU), and any run's metrics as CSV."""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any

import gradio as gr

from mae_core import display
from mae_core.checks import shown
from mae_core.fileio import wrong_kind
from mae_core.metrics import write_csv
from ui import render
from ui.common import AppContext, UserError, as_run_id, guarded

MAX_RUNS = 8  # columns that still read side by side


def run_results(ctx: AppContext, run_id: str) -> dict[str, str]:
    """A run's outcome in words: state, steps, losses, speed, time, saved evaluation."""
    from mae_core import evaluate  # torch: not at import time (the page is served first)

    status = ctx.manager.status(run_id)
    reader = ctx.metrics.reader(ctx.manager.paths(run_id).metrics)
    _, epoch_losses = reader.series("epoch_loss")
    _, speeds = reader.series("images_per_s")
    last_epoch = reader.last("epoch_loss")
    mfu = status.get("mfu")
    return {
        "state": str(status.get("state", "?")),
        "steps": display.format_steps(status),
        "loss (last logged)": display.format_loss(status.get("loss")),
        "epoch loss (last)": display.format_number(last_epoch[1] if last_epoch else None),
        "epoch loss (best)": display.format_number(min(epoch_losses) if len(epoch_losses) else None),
        "images/s (median, last 50 steps)": display.format_number(
            statistics.median(speeds[-50:]) if len(speeds) else None, 3),
        "MFU": f"{100 * mfu:.1f}%" if isinstance(mfu, (int, float)) else "–",
        "training time": display.format_duration(status.get("elapsed_s")),
        "kNN top-1 % (pretrained / random init)": evaluate.summary(
            evaluate.read_result(ctx.manager.paths(run_id).root)),
    }


def run_settings(ctx: AppContext, run_id: str) -> dict[str, str]:
    """Every field of the run's saved config, as ``model.x`` / ``train.y``."""
    cfg = ctx.manager.config(run_id)
    return {f"{part}.{name}": str(value) for part in ("model", "train")
            for name, value in dataclasses.asdict(getattr(cfg, part)).items()}


def compare_html(ctx: AppContext, run_ids: list[str] | None) -> str:
    """The comparison table: results, then the settings that differ (marked), then the rest."""
    if run_ids is not None and not isinstance(run_ids, list):
        raise UserError(f"choose runs as a list of run ids, not {shown(run_ids)}")
    run_ids = [r for r in dict.fromkeys(as_run_id(r) for r in run_ids or []) if r]
    if not run_ids:
        raise UserError("No runs chosen: pick two or more in “runs to compare”, then press "
                        "Compare.")
    if len(run_ids) < 2:  # an unknown one says so first, named short (a 5,000-character id)
        ctx.manager.paths(run_ids[0])
        raise UserError(f"Only `{run_ids[0]}` is chosen: pick two or more in “runs to compare”.")
    if len(run_ids) > MAX_RUNS:
        raise UserError(f"Compare at most {MAX_RUNS} runs at a time.")
    results = {r: run_results(ctx, r) for r in run_ids}
    settings = {r: run_settings(ctx, r) for r in run_ids}
    names = list(dict.fromkeys(k for r in run_ids for k in settings[r]))
    differing = [n for n in names if len({settings[r].get(n, "–") for r in run_ids}) > 1]
    same = [n for n in names if n not in differing]
    head = "".join(f'<th class="name">{render.esc(r)}</th>' for r in run_ids)

    def rows(keys: list[str], source: dict[str, dict[str, str]], marked: bool) -> str:
        return "".join(
            f'<tr class="{"differs" if marked else ""}" data-key="{render.esc(k)}">'
            f'<td class="name">{render.esc(k)}</td>'
            + "".join(f"<td>{render.esc(source[r].get(k, '–'))}</td>" for r in run_ids) + "</tr>"
            for k in keys)

    table = ('<div class="mae-table-wrap"><table class="mae-table" id="compare-table"><thead>'
             f'<tr><th></th>{head}</tr></thead><tbody>'
             f'<tr><td colspan="{len(run_ids) + 1}"><b>results</b></td></tr>'
             f"{rows(list(results[run_ids[0]]), results, False)}"
             f'<tr><td colspan="{len(run_ids) + 1}"><b>settings that differ '
             f"({len(differing)})</b></td></tr>{rows(differing, settings, True)}</tbody></table></div>")
    rest = (f'<details class="mae-group"><summary>settings that are the same ({len(same)})</summary>'
            f'<div class="mae-table-wrap"><table class="mae-table"><tbody>{rows(same, settings, False)}'
            "</tbody></table></div></details>")
    return f'<div id="compare-result">{table}{rest}</div>'


def metrics_csv(ctx: AppContext, run_id: str | None) -> str:
    """The run's metrics as ``metrics.csv`` in its directory (served from the runs directory)."""
    if not run_id:
        raise UserError("Choose a run whose metrics to download.")
    paths = ctx.manager.paths(run_id)
    if kind := wrong_kind(paths.metrics_csv):
        raise UserError(f"`{paths.metrics_csv.name}` of {run_id} is {kind} where the file goes: "
                        "move or delete it, then download again")
    try:
        return str(write_csv(ctx.metrics.reader(paths.metrics), paths.metrics_csv, make_dirs=False))
    except FileNotFoundError:
        raise UserError(f"run {run_id} was deleted meanwhile") from None


def build(ctx: AppContext, pick: gr.Dropdown) -> dict[str, Any]:
    """The comparison section (inside the Runs tab), wired to the tab's run chooser ``pick``."""
    c: dict[str, Any] = {}
    with gr.Accordion("Compare runs and download metrics", open=False, elem_id="compare"):
        with gr.Row():
            c["runs"] = gr.Dropdown([], value=[], multiselect=True, label="runs to compare",
                                    allow_custom_value=True, elem_id="compare-runs", scale=3,
                                    min_width=240)
            c["compare"] = gr.Button("Compare", elem_id="compare-btn", scale=1, min_width=100)
            # The run chosen above, in the tab's "run" picker (its label took four lines at 800 px),
            # not those of the box beside it: the file and the message say whose it is.
            c["csv"] = gr.Button("Metrics CSV", elem_id="csv-btn", scale=1, min_width=140)
        c["message"] = gr.HTML(elem_id="compare-message")
        c["table"] = gr.HTML(elem_id="compare-box")
        # Shown once made (an empty file box sat under Compare before any download).
        with gr.Column(visible=False) as c["csv_box"]:
            c["csv_file"] = gr.File(label="metrics.csv", interactive=False, elem_id="csv-file")
    error = lambda text: {c["message"]: render.notice("error", text)}  # noqa: E731

    @guarded("compare", error)
    def on_compare(run_ids: list[str] | None) -> dict:
        return {c["table"]: compare_html(ctx, run_ids), c["message"]: ""}

    @guarded("the metrics download", error)
    def on_csv(run_id: str | None) -> dict:
        path = metrics_csv(ctx, run_id)
        return {c["csv_file"]: path,
                c["message"]: render.notice("ok", f"The metrics of `{run_id}`, the run picked "
                                                  "above, as CSV: download it below.")}

    c["compare"].click(on_compare, c["runs"], [c["table"], c["message"]], api_name="compare")
    # The file's path alone to an API client; the page names whose it is and shows it.
    c["csv"].click(on_csv, pick, [c["csv_file"], c["message"]], api_name="metrics_csv").then(
        lambda run_id, path: (gr.update(label=f"metrics.csv of {run_id}"),
                              gr.update(visible=bool(path))),
        [pick, c["csv_file"]], [c["csv_file"], c["csv_box"]], api_visibility="private",
        show_progress="hidden")
    return c
