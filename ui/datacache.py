"""The Runs tab's data cache panel: the prepared sets the automatic cache holds, the runs that use
them, and the removal of superseded ones (:mod:`mae_core.caches`, the same rules as
``python -m mae_core.data caches --remove-superseded``).

Every added or touched file of a prepared folder makes a new full copy in the cache; the old one is
kept while a run could still resume on it. The app knows where its runs live, so it can say which
copies no run needs any more and free their space.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import gradio as gr

from ui import render
from ui.common import AppContext, guarded


def _runs_dir(ctx: AppContext) -> Path:
    return Path(ctx.manager.runs_dir)


def _gb(size: int) -> str:
    return f"{size / 1e9:.2f} GB"


def cache_listing(ctx: AppContext) -> tuple[str, bool]:
    """The cache's table, one row per prepared set: its source, images, size, age, whether a newer
    set of the same folder replaced it, and the runs that name it; a damaged set says why (and is
    kept: its images and source cannot be trusted). With it, whether any set could be removed."""
    from mae_core import caches, prepared

    sets = caches.cached_sets([_runs_dir(ctx)])
    where = render.esc(prepared.cache_root())
    if not sets:
        return f"<p class='cache-empty'>The data cache ({where}) holds no prepared set.</p>", False
    here, rows = os.path.realpath(_runs_dir(ctx)), []
    for cached in sets:
        runs = ", ".join(Path(run).name if os.path.dirname(os.path.realpath(run)) == here else run
                         for run in cached.runs) or "none"
        state = (f"damaged: {cached.damage}" if cached.damage
                 else "superseded" if cached.superseded else "newest")
        source = cached.source or ("unknown" if cached.damage else "the sample photos")
        count = "?" if cached.damage else f"{cached.count:,}"
        # a long folder path or run list wraps anywhere; the short cells keep their words whole
        rows.append(f"<tr><td style='overflow-wrap:anywhere'>{render.esc(source)}</td>"
                    f"<td>{count}</td><td>{_gb(cached.bytes)}</td>"
                    f"<td>{render.esc(cached.created)}</td>"
                    f"<td style='overflow-wrap:anywhere'>{render.esc(state)}</td>"
                    f"<td style='overflow-wrap:anywhere'>{render.esc(runs)}</td></tr>")
    removable = [c for c in sets if c.superseded and not c.runs]
    freeable = sum(c.bytes for c in removable)
    damaged = sum(1 for c in sets if c.damage)
    summary = (f"{len(sets)} prepared set(s) in {where}, {_gb(sum(c.bytes for c in sets))}; "
               f"{len(removable)} superseded and used by no run ({_gb(freeable)}).")
    if damaged:
        summary += (f" {damaged} damaged: kept, not read; the next run on its folder prepares it "
                    "again (or remove it by hand once no run needs it).")
    return (f"<p>{summary}</p><table class='cache-table' style='width:100%'><thead><tr><th>folder</th><th>images</th>"
            "<th>size</th><th>prepared</th><th>state</th><th>runs using it</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>", bool(removable))


def remove_superseded(ctx: AppContext) -> str:
    """Remove the superseded sets no run names (one being prepared is kept); what was done."""
    from mae_core import caches

    removed = caches.remove_superseded([_runs_dir(ctx)])
    if not removed:
        return ("Nothing removed: each set is the newest of its folder, a run in "
                f"{_runs_dir(ctx)} would resume on it, or it is being prepared.")
    return (f"Removed {len(removed)} superseded set(s) no run uses: "
            f"{_gb(sum(c.bytes for c in removed))} freed.")


def build(ctx: AppContext) -> dict[str, Any]:
    """The panel (inside the Runs tab), closed until asked for."""
    c: dict[str, Any] = {}
    with gr.Accordion("Data cache (prepared folders)", open=False, elem_id="cache-panel"):
        with gr.Row():
            c["show"] = gr.Button("Show the data cache", scale=1, min_width=150,
                                  elem_id="cache-show-btn")
            # Enabled once the listing shows a set it would remove: before that, a click could
            # only answer "nothing removed", or remove what the user has not seen listed.
            c["clean"] = gr.Button("Remove superseded sets", variant="stop", scale=1,
                                   min_width=150, elem_id="cache-clean-btn", interactive=False)
        c["message"] = gr.HTML(elem_id="cache-message")
        c["listing"] = gr.HTML(elem_id="cache-listing")

    # Whether the listing holds a removable set: a State, so the endpoints' answers stay the
    # listing and the message, and the button follows in a private step.
    c["removable"] = gr.State(False)

    error = lambda text: {c["message"]: render.notice("error", text)}

    @guarded("the data cache", error)
    def on_show() -> dict:
        listing, removable = cache_listing(ctx)
        return {c["listing"]: listing, c["message"]: "", c["removable"]: removable}

    @guarded("the data cache", error)
    def on_clean() -> dict:
        message = remove_superseded(ctx)
        listing, removable = cache_listing(ctx)
        return {c["message"]: render.notice("ok", message), c["listing"]: listing,
                c["removable"]: removable}

    outputs = [c["listing"], c["message"], c["removable"]]
    enable = dict(fn=lambda removable: gr.update(interactive=bool(removable)),
                  inputs=c["removable"], outputs=c["clean"], api_visibility="private",
                  show_progress="hidden")
    c["show"].click(on_show, None, outputs, api_name="show_data_cache",
                    show_progress="hidden").then(**enable)
    c["clean"].click(on_clean, None, outputs, api_name="remove_superseded_sets",
                     concurrency_id="run_actions", show_progress="hidden").then(**enable)
    return c
