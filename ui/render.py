"""HTML for the tabs: status panel, messages, log view, parameter tables, reconstructions.

Every colour is a Gradio theme variable or a translucent tint over it, never a light background
with the default text colour: the app follows the OS dark mode, where such boxes read white on
white. Every value that came from a user or a file is escaped.
"""

from __future__ import annotations

import base64
import html
import io
import re
from collections.abc import Iterable, Mapping
from typing import Any

from mae_core import display
from mae_core.rundir import LIVE_STATES, RunState


def page_style() -> dict[str, Any]:
    """The ``launch()`` arguments that style the page (what ``python app.py`` launches with)."""
    return {"css": CSS, "theme": theme(), "js": PAGE_JS}


def theme() -> Any:
    """Gradio's default theme with its subdued text (field hints, slider ends) readable on a light
    page: the default's neutral-400 is the same grey in both modes, 2.6:1 on white."""
    import gradio as gr

    return gr.themes.Default().set(body_text_color_subdued="*neutral_500",
                                   body_text_color_subdued_dark="*neutral_400")


CSS = """
.gradio-container { max-width: 1500px !important; }
/* Gradio draws no focus for a radio, a checkbox or a slider reached by the keyboard ("metric",
   "log scale", every switch of the form, and the EMA, mask ratio and weights-history sliders,
   whose arrow keys then moved a knob nothing marked, showed nothing as Tab reached them). The
   slider's own rule (outline: none) weighs as much as a bare selector, and comes later. */
input[type="radio"]:focus-visible, input[type="checkbox"]:focus-visible,
.gradio-container input[type="range"]:focus-visible {
  outline: 2px solid var(--color-accent); outline-offset: 2px; }
/* An accordion's header got the browser's 1 px ring hugging its 20 px high button: it ran
   through the label's descenders. Drawn clear of the text, as the switches above. */
button.label-wrap:focus-visible { outline: 2px solid var(--color-accent); outline-offset: 3px;
  border-radius: 4px; }
/* A tab reached by the keyboard showed only the ends of the browser's ring (the tab bar clips what
   lies outside a tab), and in dark mode that ring is near-black on the dark page: Tab moved along
   the tabs with nothing marking where. Drawn inside the tab, as the tab menu's entries. */
#tabs [role="tab"]:focus-visible, #tabs .overflow-menu button:focus-visible {
  outline: 2px solid var(--color-accent); outline-offset: -2px; }
.mae-box { border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 10px 12px;
  background: var(--background-fill-secondary); color: var(--body-text-color); font-size: 14px;
  line-height: 1.5; }
/* Gradio's --body-text-color-subdued is #bbbbc2 in both modes: 1.8:1 on a light page. The text
   colour faded over whatever lies beneath: ~5.5:1 on the light page, ~8:1 on the dark one. */
.mae-muted { color: color-mix(in srgb, var(--body-text-color) 70%, transparent); font-size: 12px; }
.mae-grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(96px, 1fr)); gap: 8px; }
.mae-pill { border-radius: 999px; padding: 1px 10px; font-weight: 600; color: #fff; }
.mae-bar { background: var(--border-color-primary); border-radius: 6px; height: 12px; margin: 8px 0;
  overflow: hidden; }
.mae-bar > div { height: 100%; }
.mae-notice { border-radius: 6px; padding: 6px 10px; border: 1px solid; color: var(--body-text-color);
  overflow-wrap: anywhere; }
.mae-notice.ok { border-color: #16a34a; background: rgba(22, 163, 74, .12); }
.mae-notice.info { border-color: var(--border-color-primary); background: var(--background-fill-secondary); }
.mae-notice.warn { border-color: #d97706; background: rgba(217, 119, 6, .14); }
.mae-notice.error { border-color: #dc2626; background: rgba(220, 38, 38, .14); }
.mae-log { max-height: 260px; overflow: auto; margin: 0; padding: 8px; border-radius: 6px;
  font-size: 12px; white-space: pre-wrap; overflow-wrap: anywhere;
  background: var(--background-fill-secondary); color: var(--body-text-color);
  border: 1px solid var(--border-color-primary); }
.mae-table-wrap { overflow-x: auto; }
.mae-table { border-collapse: collapse; font-size: 12px; width: 100%; color: var(--body-text-color); }
.mae-table th { text-align: left; padding: 3px 6px; background: var(--background-fill-secondary);
  color: var(--body-text-color); white-space: nowrap; }
.mae-table td { padding: 2px 6px; vertical-align: top; border-top: 1px solid var(--border-color-primary); }
/* A tensor name breaks after its dots (tensor_name_html), never inside a part: at 1440 px the
   policy tables broke "mask_token" as "m / ask_token". */
.mae-table td.name { font-family: var(--font-mono); overflow-wrap: normal; word-break: normal; }
.mae-table td.reason { min-width: 12em; overflow-wrap: anywhere; }
.mae-table td.num { text-align: right; white-space: nowrap; }
.mae-table caption { caption-side: top; text-align: left; font-weight: 600; padding: 2px 0 4px; }
/* The evaluation's four columns fit a phone once their headers wrap: kept on one line, "delta
   (points)" and the end of the caption's run id lay past a 375 px page's edge. */
#evaluation-result .mae-table th { white-space: normal; }
#evaluation-result .mae-table caption { overflow-wrap: anywhere; }
/* Gradio borders ".prose" tables, rows and cells in the text colour, in a rule scoped to its
   container that outranks ".mae-table td": the grid in the border colour instead. */
.gradio-container .prose .mae-table, .gradio-container .prose .mae-table tr,
.gradio-container .prose .mae-table th, .gradio-container .prose .mae-table td {
  border-color: var(--border-color-primary); }
/* On a phone the reason (what the Parameters tab is for) sat a sideways scroll away in every audit
   table: there each row is a card of its own (the cells say what they are without their header),
   the name taking what the other cells leave, the reason on a line of its own under them. Only
   the audit's: the other tables' columns (two runs compared, pretrained against random, the two
   policies) mean nothing without their headers, and keep them, scrolling sideways if need be. */
@media (max-width: 640px) {
  .mae-table.mae-audit, .mae-table.mae-audit tbody { display: block; }
  .mae-table.mae-audit thead { display: none; }
  .mae-table.mae-audit tr { display: grid;
    grid-template-columns: minmax(0, 1fr) repeat(3, max-content); }
  .mae-table.mae-audit td.reason { grid-column: 1 / -1; min-width: 0; border-top: none;
    padding-bottom: 4px; }
}
.st-trainable { background: rgba(22, 163, 74, .14); }
.st-frozen { background: rgba(37, 99, 235, .16); }
.st-removed { background: rgba(220, 38, 38, .16); }
tr.differs td { background: rgba(217, 119, 6, .16); }
tr.no-grad { outline: 2px solid #dc2626; outline-offset: -2px; }
.mae-group { margin: 4px 0; border: 1px solid var(--border-color-primary); border-radius: 6px; }
.mae-group > summary { cursor: pointer; padding: 4px 8px; color: var(--body-text-color); }
.mae-recon { display: grid; grid-template-columns: repeat(auto-fill, minmax(120px, 1fr)); gap: 6px;
  margin-bottom: 12px; }
.mae-recon figure { margin: 0; }
.mae-recon img { width: 100%; image-rendering: pixelated; border-radius: 4px; }
.mae-recon figcaption { font-size: 12px; overflow-wrap: anywhere;
  color: color-mix(in srgb, var(--body-text-color) 70%, transparent); }
.mae-colorbar img { width: 100%; max-width: 320px; height: 14px; display: block; }
.mae-colorbar .ticks { display: flex; justify-content: space-between; max-width: 320px; font-size: 11px;
  color: color-mix(in srgb, var(--body-text-color) 70%, transparent); }
#run-controls { align-items: center; }
/* A dropdown's arrow lies over the end of its text box: a long choice (a run id and its state,
   on a phone) ran under it. The text stops short of the arrow, cut with an ellipsis. */
.gradio-container .secondary-wrap > input { padding-right: 24px !important; text-overflow: ellipsis; }
/* Stacked, the Train tab showed the whole form between the run controls and the run they act
   on: the live view comes first, under Start / Stop, and the form after it. 1024 px is where
   Gradio's page narrows and the columns' minimum widths no longer fit side by side. */
@media (max-width: 1023.98px) {
  /* stretch: Gradio's row aligns its columns to the start, so stacked each one was only as wide
     as its content (a 440 px live view on a 768 px page). */
  #train-columns { flex-direction: column; align-items: stretch; }
  #train-live { order: -1; }
  /* No run yet: nothing to watch, and the form to fill in is what the status panel points to. */
  #train-columns:has(#run-status[data-state="none"]) #train-live { order: 0; }
}
/* The field a refused Start names (ui.trainscripts.SHOW_REFUSED_FIELD_JS): outlined, the reason under
   its row (Gradio sizes a block to its row and clips the row: a reason inside it was cut off). */
#train-form [data-refusal] :is(input:not(.secondary-wrap input), textarea),
#train-form [data-refusal] .wrap:has(.secondary-wrap) { border-color: #dc2626 !important;
  box-shadow: 0 0 0 1px #dc2626 !important; }
.mae-refusal { color: var(--body-text-color); border-left: 3px solid #dc2626; padding-left: 6px;
  margin: 2px 0 4px; font-size: 12px; overflow-wrap: anywhere; }
/* Room for a run's chart before its first point (the drawn chart is 391 px high: 300 px of plot,
   the step axis, one run's legend): the empty box was 238 px, and the log under it jumped
   153 px at a run's first step. */
#loss-plot { overflow-x: auto; min-height: 391px; }
/* The charts are as wide as their box (Vega-Lite's "container" width, ui.plots); Gradio's plot
   centres that box at its content's width, where it would measure nothing: span the column. */
#loss-plot .altair > div:first-child, #knn-plot .altair > div:first-child { width: 100%; }
/* Gradio pads the canvas 6 px a side, past the width Vega measured. */
#loss-plot .altair canvas, #knn-plot .altair canvas { padding: 0; }
/* Gradio's gallery keeps its column count at any width (each at least 100 px): a phone cut the
   fourth column off. Its count where the columns are wide enough, fewer where not. */
#preview-gallery .grid-container { grid-template-columns: repeat(auto-fill,
  minmax(max(140px, calc(100% / var(--grid-cols) - var(--spacing-lg))), 1fr)); }
/* ... and caps its height at 55 % of the window, cutting the last row off on a small screen
   (800 x 600): it grows with its previews instead, the page scrolls. */
#preview-gallery .grid-wrap.fixed-height { max-height: none; }
/* The two policy tables side by side only where each gets 560 px (ui.parameters), stacked on a
   narrower screen; Gradio 6.31's gr.HTML drops its min_width (an inline "min(0px, 100%)"). */
#params-clean, #params-reference { min-width: min(560px, 100%) !important; }
#params-title code { word-break: normal; overflow-wrap: break-word; }
/* Cut at the box's edge, and no wider than the box: a block of white-space: pre is as wide as its
   line to the layout around it, so Lightning's 88-dash rule widened the whole Train column to
   790 px on a phone (and 838 px at 800 px), cutting the status panel, chart and form off at the
   page's right edge. Width 0, stretched to the box: the line no longer sizes anything. */
#log-tail .log-rule { display: block; white-space: pre; overflow: hidden; width: 0;
  min-width: 100%; }
/* Any message in the Parameters tab (an edit not audited yet, a refused audit) means the tables
   are not for the settings above: dimmed, so an invalid patch size did not leave them as if. */
body:has(#params-message .mae-notice) :is(#params-title, #params-diff, #params-clean,
  #params-reference) { opacity: 0.45; }
#train-message, #runs-message, #runs-empty, #recon-message, #params-message { min-height: 0; }
/* A greyed-out "stop" button (Delete run with no run picked, Stop with no live run) kept its red:
   it read as usable. Greyed as gradio greys a disabled secondary one. */
.gradio-container button.stop:disabled { background: var(--button-secondary-background-fill-hover);
  color: var(--button-secondary-text-color-hover); border-color: var(--button-secondary-border-color); }
"""

# Run once as the page opens. Gradio's "More tabs" menu (on a narrow page, the tabs it has no room
# for: Parameters and Runs on a phone) closed only on a click elsewhere: the keyboard left it open
# over the Queue and Stop buttons as Tab went on past it, and Escape did nothing. It closes once
# the focus leaves it, and Escape closes it, back on its button.
PAGE_JS = """() => {
  const opened = () => document.querySelector('#tabs .overflow-dropdown:not(.hide)');
  const toggle = () => opened()?.closest('.overflow-menu')?.querySelector(':scope > button');
  document.addEventListener('focusin', (event) => {
    if (opened() && !event.target.closest?.('#tabs .overflow-menu')) toggle()?.click();
  });
  document.addEventListener('keydown', (event) => {
    const button = event.key === 'Escape' && toggle();
    if (button) { button.click(); button.focus(); }
  });
}"""

# Saturated mid-tones that read on light and dark backgrounds alike, with white text on top.
STATE_COLOURS = {RunState.QUEUED: "#7c3aed", RunState.STARTING: "#b45309",
                 RunState.RUNNING: "#15803d", RunState.STOPPING: "#b45309",
                 RunState.STOPPED: "#64748b", RunState.FINISHED: "#2563eb",
                 RunState.FAILED: "#dc2626"}


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


NOTICE_KINDS = ("ok", "info", "warn", "error")


def notice(kind: str, text: str) -> str:
    """A one-line message box; ``kind`` is ok, info, warn or error. ``text`` may hold `code`."""
    parts = esc(text).split("`")
    body = "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))
    return f'<div class="mae-notice {esc(kind)}" data-kind="{esc(kind)}">{body}</div>'


def ddp_mode(cfg: Any) -> str:
    """How the run's processes synchronise gradients, in words."""
    t = cfg.train
    if (t.devices or 1) * t.num_nodes <= 1:
        return "single process (no DDP)"
    if t.find_unused_parameters:
        return "DDP with find_unused_parameters=True (walks the autograd graph every step)"
    return "plain DDP (find_unused_parameters=False)"


def status_html(status: Mapping[str, Any] | None, cfg: Any = None) -> str:
    """The Train tab's panel: state, progress, speed, time, what the run is."""
    if not status:
        return ('<div id="run-status" class="mae-box" data-state="none">No run yet: fill in the '
                "form and press <b>Start</b>.</div>")
    state = str(status.get("state", "?"))
    colour = STATE_COLOURS.get(state, "#64748b")
    step = status.get("step") or 0
    fraction = display.progress_fraction(status)
    # The bar and every cell stand from the run's start ("–" until known, the bar hidden while
    # the total is unknown): they came with the first steps, and the chart and log under the
    # panel jumped 47 px as the run began to stream.
    bar = (f'<div class="mae-bar"{"" if fraction is not None else " style=visibility:hidden"}>'
           f'<div class="progress-fill" style="width:{(fraction or 0) * 100:.1f}%;'
           f'background:{colour}"></div></div>')
    live = state in LIVE_STATES
    cells = [("step", display.format_steps(status)),
             ("epoch", status.get("epoch", "–")),
             ("images/s", display.format_number(status.get("images_per_s"), 3)),
             ("elapsed", display.format_duration(status.get("elapsed_s"))),
             ("ETA", display.format_duration(display.eta_seconds(status)) if live else "–"),
             ("last loss", display.format_loss(status.get("loss")))]
    mfu = status.get("mfu")  # the trainer reports it once it knows its peak
    cells.insert(3, ("MFU", f"{100 * mfu:.1f}%" if isinstance(mfu, (int, float)) and mfu == mfu
                     else "–"))
    grid = "".join(f'<div><div class="mae-muted">{esc(k)}</div>'
                   f'<div data-field="{esc(k)}" style="font-weight:600">{esc(v)}</div></div>'
                   for k, v in cells)
    return (f'<div id="run-status" class="mae-box" data-state="{esc(state)}" data-step="{int(step)}">'
            '<div style="display:flex;justify-content:space-between;align-items:center;gap:8px">'
            f'<span style="font-family:var(--font-mono);overflow-wrap:anywhere">'
            f'{esc(status.get("run_id", ""))}</span>'
            f'<span class="mae-pill" style="background:{colour}">{esc(state)}</span></div>{bar}'
            f'<div class="mae-grid">{grid}</div>{_about(cfg, status)}{_notes(status, state)}</div>')


def held_elsewhere_html(run_dir: str | None) -> str:
    """Why Start is greyed with no live run listed here: a run of another runs folder (another
    app's, or started by hand) holds this machine's devices."""
    if not run_dir:
        return ""
    text = (f"Run `{run_dir}`, of another runs folder, is live on this machine's devices: Start "
            "is greyed until it ends, and Queue starts this run after it.")
    return f'<div id="held-elsewhere" style="margin-top:8px">{notice("info", text)}</div>'


def _about(cfg: Any, status: Mapping[str, Any]) -> str:
    if cfg is None:
        return ""
    m, t = cfg.model, cfg.train
    images = status.get("images")
    found = f" ({images} images)" if images else ""
    return (f'<div class="mae-muted" style="margin-top:6px">{esc(m.label)} · {esc(m.policy)} · '
            f"{m.image_size}px / patch {m.patch_size} · mask {m.mask_ratio} · batch {t.batch_size} × "
            f"{esc(t.devices or 'auto')} {esc(t.accelerator)} process(es) · "
            f"{esc(t.precision or 'auto precision')} · data: {esc(t.data or 'sample photos')}{found}"
            f'</div><div class="mae-muted" data-field="ddp">{esc(ddp_mode(cfg))}</div>')


def _notes(status: Mapping[str, Any], state: str) -> str:
    out = ""
    stalled = display.stalled_seconds(status)
    if stalled is not None:
        mean = display.mean_step_seconds(status)
        pace = f" (a step took {mean:.2g} s on average)" if mean is not None and mean < 60 else ""
        out += notice("warn", f"No step for {display.format_duration(stalled)}{pace}: the trainer "
                              "may be hung, e.g. one DDP process waiting for another that died. Its "
                              "log may say why; Stop, then Force stop, ends it.")
    if status.get("stop_requested") and state in LIVE_STATES:
        out += notice("warn", "Stop requested: the run saves a checkpoint after the current step.")
    if status.get("error"):
        failed = state == RunState.FAILED
        out += notice("error" if failed else "info",
                      f"{'Error' if failed else 'Note'}: {status['error']}")
    return out


def log_html(text: str, state: str | None) -> str:
    """The live tail of a run's ``train.log``, newest line last."""
    if not text:
        text = "(no output yet)" if state in LIVE_STATES else "(no log)"
    # A divider line (Lightning's model summary draws them ~90 characters long) is cut at the
    # box's edge, not wrapped: on a phone it broke into a second line of dashes.
    body = _RULE_LINE.sub(r'<span class="log-rule">\1</span>', esc(text))
    # column-reverse keeps the box scrolled to its end: the newest lines show without scrolling.
    return (f'<div class="mae-log" style="display:flex;flex-direction:column-reverse">'
            f'<pre id="log-tail" data-state="{esc(state or "")}" style="margin:0;white-space:pre-wrap">'
            f"{body}</pre></div>")


# A whole line of one drawing character; its newline goes with it (the span is a block).
_RULE_LINE = re.compile(r"^([-=_─━]{8,})[ \t]*(?:\n|$)", re.MULTILINE)


# --- parameter audit --------------------------------------------------------------------------

def audit_html(result: Any, groups: Iterable[Any]) -> str:
    """One policy's audit: verdict, totals, and the rows by part of the model (collapsible), the
    parts that matter to DDP open and first."""
    ok = result.ddp_safe
    verdict = notice("ok" if ok else "error", f"{'✔' if ok else '✘'} {result.verdict()}")
    totals = " · ".join(f'<span class="st-{s}" style="padding:1px 6px;border-radius:4px">{s} '
                        f"{result.totals.get(s, 0):,}</span>" for s in ("trainable", "frozen", "removed"))
    body = "".join(_group_html(group, result.no_grad) for group in groups)
    return (f'<div class="audit" data-policy="{esc(result.policy)}">'
            f'<h3 style="margin:0 0 6px">policy: {esc(result.policy)}</h3>{verdict}'
            f'<div style="margin:6px 0;font-size:13px">{totals} '
            f"(constructed {result.constructor_total:,})</div>{body}</div>")


def _group_html(group: Any, no_grad: list[str]) -> str:
    rows = "".join(_row_html(row, row.name in no_grad) for row in group.rows)
    counts = ", ".join(f"{status} {n:,}" for status, n in group.totals.items() if n)
    head = "".join(f"<th>{h}</th>" for h in ("name", "shape", "count", "status")
                   ) + '<th class="reason">reason</th>'
    mark = " ⚑ DDP-relevant" if group.ddp_relevant else ""
    return (f'<details class="mae-group" data-group="{esc(group.title)}"'
            f'{" open" if group.ddp_relevant else ""}><summary><b>{esc(group.title)}</b>{mark} · '
            f'{len(group.rows)} tensors · {esc(counts)}</summary><div class="mae-table-wrap">'
            f'<table class="mae-table mae-audit"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'
            "</div></details>")


def tensor_name_html(name: str) -> str:
    """A tensor's name that a narrow column breaks after a dot only: ``backbone.<wbr>mask_token``."""
    return ".<wbr>".join(esc(part) for part in name.split("."))


def _row_html(row: Any, no_grad: bool) -> str:
    flag = " ⚠ no gradient" if no_grad else ""
    return (f'<tr data-name="{esc(row.name)}" data-status="{esc(row.status)}" '
            f'class="st-{esc(row.status)}{" no-grad" if no_grad else ""}">'
            f'<td class="name">{tensor_name_html(row.name)}</td><td class="num">{"×".join(map(str, row.shape))}</td>'
            f'<td class="num">{row.numel:,}</td><td><b>{esc(row.status)}</b>{flag}</td>'
            f'<td class="reason">{esc(row.reason)}</td></tr>')


def audit_diff_html(clean: Any, reference: Any) -> str:
    """The tensors whose status differs between the two policies: the DDP problem at a glance."""
    ref = {r.name: r for r in reference.rows}
    rows = []
    for row in clean.rows:
        other = ref.get(row.name)
        if other is None or other.status == row.status:
            continue
        cells = "".join(f'<td class="st-{esc(r.status)}">{esc(r.status)}'
                        f'{" ⚠ no gradient" if r.name in result.no_grad else ""}</td>'
                        for r, result in ((row, clean), (other, reference)))
        rows.append(f'<tr data-name="{esc(row.name)}"><td class="name">{tensor_name_html(row.name)}</td>{cells}'
                    f'<td class="reason">{esc(row.reason)}</td></tr>')
    if not rows:
        return '<div class="mae-box">Both policies treat every tensor the same way.</div>'
    head = "".join(f"<th>{h}</th>" for h in ("tensor", "ddp-clean", "reference")
                   ) + '<th class="reason">why</th>'
    return ('<div class="mae-box"><b>Where the policies differ</b><div class="mae-table-wrap">'
            f'<table class="mae-table mae-diff" style="margin-top:4px"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div></div>')


# --- reconstruction ---------------------------------------------------------------------------

def data_uri(image: Any) -> str:
    """A PIL image as an inline PNG (the panels are small; no file to serve or clean up)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# Why the reconstruction panels look better than the model is (shown above every result).
HONEST_NOTE = (
    "With norm_pix_loss the model predicts each masked patch normalised to zero mean and unit "
    "variance. “reconstruction” and “reconstruction + visible” give each masked patch the mean "
    "and contrast of the original patch: that brightness and colour come from the input, not "
    "from the model. “model output” is what the model itself predicted, drawn on a neutral grey "
    "with one fixed contrast, beside its “target” drawn the same way; compare those two.")
RAW_NOTE = ("norm_pix_loss is off: the model predicts pixels directly, so “reconstruction” is "
            "its own output, colours included.")


def reconstruction_html(views: list[Any], titles: Iterable[str], colorbar_png: str,
                        scale_max: float, model_titles: Iterable[str] = ()) -> str:
    """Each image's row: the paper's four panels, the model's own output and target where it
    predicts normalised patches (``view.model_panels``), the per-patch error; then the colour
    bar. A note above says where the reconstruction's colours come from."""
    titles, model_titles = list(titles), list(model_titles)
    blocks = []
    for view in views:
        figures = [(image, title, "") for image, title in zip(view.panels, titles)]
        figures += [(image, title, ' class="model-output"')
                    for image, title in zip(view.model_panels, model_titles)]
        figures.append((view.heatmap, "per-patch error", ""))
        cells = "".join(f'<figure{mark}><img src="{data_uri(img)}" alt="{esc(view.name)}: '
                        f'{esc(cap)}"><figcaption>{esc(cap)}</figcaption></figure>'
                        for img, cap, mark in figures)
        blocks.append(f'<div class="recon-item" data-name="{esc(view.name)}">'
                      f'<div style="font-weight:600;overflow-wrap:anywhere">{esc(view.name)} · loss '
                      f'{view.loss:.4f} on {view.masked_patches} masked patches</div>'
                      f'<div class="mae-recon">{cells}</div></div>')
    ticks = "".join(f"<span>{t:g}</span>" for t in (0, scale_max / 4, scale_max / 2,
                                                   3 * scale_max / 4))
    bar = (f'<div class="mae-colorbar" id="heat-colorbar"><div class="mae-muted">per-patch error '
           "(squared, in the loss's target space; visible patches dimmed), one scale for every image "
           f'and checkpoint</div><img src="{colorbar_png}" alt="colour scale">'
           f'<div class="ticks">{ticks}<span>≥{scale_max:g}</span></div></div>')
    note = ""
    if views:
        normalised = any(view.model_panels for view in views)
        note = (f'<div class="mae-muted" id="recon-note" data-norm-pix="{str(normalised).lower()}" '
                f'style="margin-bottom:6px">{esc(HONEST_NOTE if normalised else RAW_NOTE)}</div>')
    return f'<div id="recon-results">{note}{"".join(blocks)}{bar if views else ""}</div>'


def refused_html(refused: list[tuple[str, str]]) -> str:
    if not refused:
        return ""
    items = "".join(f"<li><b>{esc(name)}</b>: {esc(reason)}</li>" for name, reason in refused)
    return (f'<div class="mae-notice warn" data-kind="warn" id="recon-refused">'
            f"{len(refused)} file(s) refused:<ul style=\"margin:4px 0\">{items}</ul></div>")
