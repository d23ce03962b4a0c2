"""The Reconstruct tab: upload images, pick a run's weights, see masked input and reconstruction.

With norm_pix_loss the reconstruction's colours come from the input (see :mod:`mae_core.reconstruct`):
the tab says so above the results and shows the model's own normalised output beside its target.

Every readable image of a batch is reconstructed; the ones refused (corrupt, not an image, a
decompression bomb, a channel count the checkpoint does not take) are listed with the reason, so one
bad file spoils nothing. Grayscale, 16-bit and multi-band images are shown through
:mod:`mae_core.composite`: the "channels shown" field picks a composite (blank: grayscale, RGB or
the first three channels) and "contrast" the stretch.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr

from mae_core.checks import _is_number
from mae_core.composite import STRETCH_CHOICES
from mae_core.rundir import LIVE_STATES, RunState, preview_step
from ui import render
from ui.launch import MAX_UPLOAD
from ui.common import (AppContext, FieldNumber, FieldSlider, UserError, as_bool, as_float,
                       as_ratio, as_run_id, as_seed, guarded)

MAX_IMAGES = 16  # per request: each is a forward pass and up to seven pictures
# mae_core.images.MAX_PIXELS in millions, for the upload's label (that module imports torch, which
# the page is served without; a test ties the two).
MEGAPIXELS = 64
NUM_SAMPLE_IMAGES = 3
HIDDEN = "hidden"
FOLLOWS = "follows the live run unless you pick one"  # the checkpoint picker's line under it
PICKED = "picked by hand: clear it to follow the live run"


# After Reconstruct, its message (and the results under it) scrolled into view where it is not:
# below the fold under the button, or above it on a page scrolled down to the button.
SHOW_MESSAGE_JS = ("() => requestAnimationFrame(() => document.getElementById('recon-message')"
                   "?.scrollIntoView({block: 'nearest'}))")


@dataclass
class ReconstructResult:
    html: str
    rows: list[list[Any]]  # image, loss on masked patches, masked patches
    refused: list[tuple[str, str]] = field(default_factory=list)
    message: str = ""


def _sources(files: Any, use_samples: bool) -> list[Path]:
    from mae_core.data import sample_photo_paths

    items = [files] if isinstance(files, str) else list(files or [])
    paths = [Path(getattr(item, "name", item)) for item in items]
    if use_samples:
        paths += sample_photo_paths()[:NUM_SAMPLE_IMAGES]
    return paths


def _channels_note(cfg: Any) -> str:
    """How a checkpoint reads images, for the message: only said when not ImageNet-normalised RGB."""
    if cfg.channels == 3 and cfg.normalize != "dataset":
        return ""
    return f" ({cfg.channels}-channel images, {cfg.normalize or 'auto'} normalisation)"


def _own_weights(ctx: AppContext, run_id: str, weights: Path) -> Path:
    """``weights``, once they are of the run's own model: a weights file of another model copied
    into the run (another preset's, size or patch) was reconstructed with, as the run's, where
    Export and Resume refuse it. A run whose config.yaml cannot be read is judged by the file."""
    from mae_core.config import ConfigError
    from mae_core.resumecheck import require_weights_of

    try:
        model = ctx.manager.config(run_id).model
    except (ConfigError, OSError):
        return weights
    require_weights_of(model, weights, run_id)
    return weights


def reconstruct_files(ctx: AppContext, files: Any, use_samples: bool, run_id: str | None,
                      mask_ratio: Any, seed: Any, channels_shown: str = "",
                      contrast: str = "auto") -> ReconstructResult:
    """Reconstruct every readable image with ``run_id``'s latest weights; ``channels_shown``
    (1-based, "4,3,2" or "2"; blank = auto) and ``contrast`` choose how the panels show them."""
    from mae_core.composite import parse_view
    from mae_core.reconstruct import (HEATMAP_MAX, MODEL_PANEL_TITLES, PANEL_TITLES, colorbar,
                                      read_uploads, reconstruct_uploads)
    from mae_core.weights import read_metadata

    ratio, seed = as_ratio(mask_ratio), as_seed(seed, "mask seed")
    paths = _sources(files, as_bool(use_samples, "use the sample photos"))
    if not paths:
        raise UserError("Upload one or more images, or tick “use the sample photos”.")
    run_id = as_run_id(run_id)
    if not run_id:
        raise UserError("Choose a checkpoint: no run has saved weights yet (train one first).")
    weights = _own_weights(ctx, run_id, ctx.manager.weights(run_id))
    model = ctx.models.get(weights)
    view = parse_view(channels_shown, model.cfg.channels, contrast or "auto")
    images, refused = read_uploads(paths, model.cfg.channels, model.cfg.image_size,
                                   limit=MAX_IMAGES)
    views = []
    if images:
        views = reconstruct_uploads(model, images, ratio, seed, view=view)
    step = read_metadata(weights).get("step", "?")
    html = render.reconstruction_html(views, PANEL_TITLES, render.data_uri(colorbar()), HEATMAP_MAX,
                                      MODEL_PANEL_TITLES)
    rows = [[v.name, round(v.loss, 5), v.masked_patches] for v in views]
    kind = "ok" if not refused else ("warn" if views else "error")
    text = (f"Run `{run_id}`{_channels_note(model.cfg)}, weights from step {step}, mask ratio "
            f"{ratio}, seed {seed}: "
            f"{len(views)} image(s) reconstructed, {len(refused)} refused.")
    return ReconstructResult(html + render.refused_html(refused), rows, refused,
                             render.notice(kind, text))


def checkpoint_choices(ctx: AppContext, statuses: list[dict[str, Any]] | None = None
                       ) -> tuple[list[tuple[str, str]], str | None]:
    """Runs with weights (label, id) and the default: the live run's weights, else the newest.
    ``statuses``: every run's, newest first, if listed already."""
    statuses = ctx.manager.list() if statuses is None else statuses
    runs = [s for s in statuses if _has_weights(ctx, s)]
    choices = [(f"{s['run_id']}{' · live' if s.get('state') in LIVE_STATES else ''}", s["run_id"])
               for s in runs]
    live = next((s["run_id"] for s in runs if s.get("state") in LIVE_STATES), None)
    return choices, live or (runs[0]["run_id"] if runs else None)


def _has_weights(ctx: AppContext, status: dict[str, Any]) -> bool:
    return ctx.manager.paths(status["run_id"]).weights.exists()


def picker_info(ctx: AppContext, statuses: list[dict[str, Any]], value: str | None,
                follow: bool = True) -> str:
    """The line under the checkpoint picker. Before the live run's first checkpoint it has no
    weights, and the picker shows another run's: said, so they are not taken for the live run's.
    A run picked by hand is said to be (the line said it followed the live run)."""
    if not follow and value:
        return PICKED
    live = next((s for s in statuses if s.get("state") in LIVE_STATES), None)
    if live is None or _has_weights(ctx, live):
        return FOLLOWS
    shown = f"showing run {value}'s" if value else "no other run has weights to show"
    if live.get("state") == RunState.STOPPING:
        return f"run {live['run_id']} is stopping: its weights come as it stops; {shown}"
    doing = "starting" if live.get("state") == RunState.STARTING else "training"
    return (f"run {live['run_id']} is {doing}: its first weights come at "
            f"{_first_weights(ctx, live)}; {shown}")


def _first_weights(ctx: AppContext, status: dict[str, Any]) -> str:
    """When a run without weights saves its first: its next checkpoint, or its last step."""
    try:
        every = ctx.manager.config(status["run_id"]).train.checkpoint_every_n_steps
    except Exception:  # noqa: BLE001 - an unreadable config: the note goes on without the step
        return "its first checkpoint"
    step = (int(status.get("step") or 0) // every + 1) * every
    total = status.get("total_steps")
    return f"step {min(step, total) if isinstance(total, int) and total > 0 else step}"


def preview_items(ctx: AppContext, run_id: str | None, limit: int = 24) -> list[tuple[str, str]]:
    """The run's training previews (fixed images and mask), newest first, captioned by step."""
    if not run_id:
        return []
    try:
        paths = ctx.manager.previews(run_id)[-limit:]
    except Exception:  # noqa: BLE001 - e.g. the run was deleted meanwhile: no previews
        return []
    return [(str(p), f"step {preview_step(p)}") for p in paths][::-1]


def history_slider(ctx: AppContext, run_id: str | None) -> dict[str, Any]:
    """The weights-history slider for ``run_id``: spans its snapshots' steps, moves by the
    checkpoint interval, starts at the newest; hidden when the run kept none. (:func:`refresh`
    leaves the value out for the run already shown: the step the person chose stays.)"""
    from mae_core.snapshots import list_snapshots

    snapshots = list_snapshots(ctx.manager.paths(run_id).root) if run_id else []
    if not snapshots:
        return gr.update(visible=False, value=0)
    steps = [step for step, _ in snapshots]
    gaps = [b - a for a, b in itertools.pairwise(steps) if b > a]
    return gr.update(visible=True, minimum=steps[0], maximum=max(steps[-1], steps[0] + 1),
                     step=min(gaps) if gaps else 1, value=steps[-1],
                     label=f"weights history: step ({len(steps)} snapshots, {steps[0]}–{steps[-1]})")


def reconstruct_history(ctx: AppContext, run_id: str | None, step: Any, mask_ratio: Any,
                        seed: Any, channels_shown: str = "", contrast: str = "auto"
                        ) -> tuple[str, str]:
    """(html, message): the run's fixed history image reconstructed, at a fixed mask, with the
    snapshot nearest ``step`` (issue 14, item 5), shown as :func:`reconstruct_files` shows."""
    from mae_core.composite import parse_view
    from mae_core.reconstruct import HEATMAP_MAX, PANEL_TITLES, colorbar, reconstruct_uploads
    from mae_core.snapshots import history_image, list_snapshots, nearest_snapshot

    ratio, seed = as_ratio(mask_ratio), as_seed(seed, "mask seed")
    # Any number: a step typed past either end of the slider takes the snapshot nearest it.
    step = as_float(step, "weights history step", optional=True) or 0.0
    if not run_id:
        raise UserError("Choose a run: its weight snapshots are what the slider moves through.")
    chosen = nearest_snapshot(list_snapshots(ctx.manager.paths(run_id).root), step)
    if chosen is None:
        raise UserError(f"Run `{run_id}` kept no weight snapshots (weight_snapshots = 0, or it has "
                        "not reached its first one yet).")
    model = ctx.models.get(_own_weights(ctx, run_id, chosen[1]))
    view = parse_view(channels_shown, model.cfg.channels, contrast or "auto")
    from mae_core.datasource import read_run_data

    name, image = history_image(ctx.manager.config(run_id).train, model.cfg.image_size,
                                model.cfg.channels, read_run_data(ctx.manager.paths(run_id).root))
    views = reconstruct_uploads(model, [(name, image)], ratio, seed, view=view)
    html = render.reconstruction_html(views, PANEL_TITLES, render.data_uri(colorbar()), HEATMAP_MAX)
    text = (f"Run `{run_id}`, snapshot of step {chosen[0]}: {name}, mask ratio {ratio}, seed "
            f"{seed}; loss on the masked patches {views[0].loss:.4f}.")
    return html, render.notice("ok", text)


def refresh(ctx: AppContext, current: str | None, follow: bool, sig: dict | None,
            history_at: Any = None) -> dict[str, Any]:
    """The slow refresh: checkpoint choices (following the live run unless one was picked by
    hand) with the picker's line (:func:`picker_info`), previews and the history slider, each
    only when it changed. ``history_at``: the slider's step now, kept while the same run's
    snapshots still span it."""
    sig = dict(sig or {})
    statuses = ctx.manager.list()
    choices, default = checkpoint_choices(ctx, statuses)
    values = [c[1] for c in choices]
    value = default if follow or current not in values else current
    info = picker_info(ctx, statuses, value, follow)
    out: dict[str, Any] = {}
    if (choices, value, info) != sig.get("ckpt"):
        out["ckpt_pick"] = gr.update(choices=choices, value=value, info=info)
    items = preview_items(ctx, value)
    if items != sig.get("previews"):
        out["previews"] = items
    history = history_slider(ctx, value)
    # Compared without its value (the step the person moved it to), on a copy: Gradio takes the
    # value out of the update it sends, so the update itself never compared equal, and every
    # refresh moved the slider back to the newest snapshot.
    shape = (value, {k: v for k, v in history.items() if k != "value"})
    if shape != sig.get("history"):
        if _keeps_step(sig.get("history"), value, history, history_at):
            history.pop("value")  # the same run's snapshots still span the step chosen
        out["history_step"] = history
    sig.update(ckpt=(choices, value, info), previews=items, history=shape)
    out["sig"] = sig
    return out


def _keeps_step(before: Any, value: str | None, history: dict[str, Any], at: Any) -> bool:
    shown_before = isinstance(before, tuple) and before[0] == value and before[1].get("visible")
    return bool(shown_before and history.get("visible") and _is_number(at)
                and history["minimum"] <= at <= history["maximum"])


def stale_results(run_id: str | None, results_run: str | None, history_run: str | None,
                  noticed: str | None = None) -> dict[str, Any]:
    """Results made with another run's weights than the picker now shows (``results_run``,
    ``history_run``), taken away saying so: under the new pick they read as its own. The
    saying follows later picks too (``noticed``: the run it named)."""
    out: dict[str, Any] = {}
    if (results_run and results_run != run_id) or (noticed and noticed != run_id):
        now = (f"The checkpoint is now run `{run_id}`: press Reconstruct to reconstruct with its "
               "weights." if run_id else "No run has weights now.")
        out |= {"results": "", "losses": [], "results_run": None, "noticed_run": run_id,
                "message": render.notice("info", now)}
    if history_run and history_run != run_id:
        out |= {"history": "", "history_message": "", "history_run_id": None}
    return out


def follows_after_pick(run_id: str | None, follow: Any, sig: dict | None) -> bool:
    """Whether the picker follows the live run after a pick: cleared, it does; opening the list
    and leaving it (the run it showed "picked") changes nothing; another run picked, it stops."""
    shown = (sig or {}).get("ckpt", (None, None, None))[1]
    return not run_id or (follow is True and run_id == shown)


def build(ctx: AppContext) -> dict[str, Any]:
    """Lay out the Reconstruct tab (inside an open ``gr.Tab``) and wire its events."""
    c: dict[str, Any] = {}
    with gr.Row():
        # Room for the checkpoint picker's "<run id> · live" beside its arrow (at 280 px it ran
        # under the arrow, and was cut at 1024 px).
        with gr.Column(scale=1, min_width=400):
            c["uploads"] = gr.File(label=f"images (each up to {MAX_UPLOAD[:-2]} MB and "
                                         f"{MEGAPIXELS} megapixels; {MAX_IMAGES} at a time)",
                                   file_count="multiple", type="filepath", elem_id="uploads")
            c["use_samples"] = gr.Checkbox(False, label="use the sample photos", elem_id="use-samples")
            c["ckpt_pick"] = gr.Dropdown([], value=None, label="checkpoint (a run's latest weights)",
                                         elem_id="ckpt-pick", allow_custom_value=True,
                                         info=FOLLOWS)
            c["ratio"] = FieldSlider(0.05, 0.95, value=0.75, step=0.05, label="mask ratio",
                                     elem_id="recon-ratio")
            c["seed"] = FieldNumber(0, label="mask seed (same seed = same mask on every checkpoint)",
                                    elem_id="recon-seed")
            with gr.Row():
                c["channels_shown"] = gr.Textbox(
                    "", label="channels shown (R,G,B)", elem_id="recon-channels",
                    info="blank: grayscale, RGB, or channels 1,2,3; e.g. 4,3,2, or 2 for one "
                         "channel in gray")
                c["contrast"] = gr.Dropdown(list(STRETCH_CHOICES), value="auto", label="contrast",
                                            elem_id="recon-contrast",
                                            info="auto: 1st–99th percentile stretch unless 8-bit RGB")
            c["run"] = gr.Button("Reconstruct", variant="primary", elem_id="recon-btn")
        with gr.Column(scale=3, min_width=320):
            # Above the results (stacked, under the button), and scrolled to when out of sight
            # (SHOW_MESSAGE_JS): under the button, a refusal fell below the fold of a 900 px
            # window, and Reconstruct seemed to do nothing.
            c["message"] = gr.HTML(elem_id="recon-message")
            c["results"] = gr.HTML(elem_id="recon-results-box")
            # Shown while it holds a row (:func:`table_shown`): empty, its three headers sat
            # under the button before any reconstruction.
            with gr.Column(visible=False) as c["losses_box"]:
                c["losses"] = gr.Dataframe(
                    headers=["image", "loss (masked patches)", "masked patches"],
                    interactive=False, elem_id="recon-losses", wrap=True,
                    # a long file name took the width, and "masked patches" broke as
                    # "maske / d / patch / es"
                    column_widths=["40%", "30%", "30%"])
    gr.Markdown("### Training previews (fixed images and mask, newest first)")
    # Four columns where they fit, fewer on a narrow screen (ui.render.CSS: #preview-gallery).
    c["previews"] = gr.Gallery(columns=4, height="auto", object_fit="contain", label="previews",
                               elem_id="preview-gallery")
    gr.Markdown("### Weights history (one image, a fixed mask, the run's last weight snapshots)")
    with gr.Row():
        # A FieldSlider: Gradio refused a typed step past the slider's ends before the handler,
        # which takes the nearest snapshot.
        c["history_step"] = FieldSlider(0, 1, value=0, step=1, label="weights history: step",
                                        visible=False, elem_id="history-step", scale=3)
        # Reconstructs the image with the weights of the slider's step ("Reconstruct at this
        # step" took two lines at 800 px); on a phone it wraps below the slider.
        c["history_run"] = gr.Button("Show this step", elem_id="history-btn", scale=1,
                                     min_width=160)
    c["history_message"] = gr.HTML(elem_id="history-message")
    c["history"] = gr.HTML(elem_id="history-results")
    c["follow"] = gr.State(True)
    c["sig"] = gr.State(None)
    c["results_run"] = gr.State(None)  # whose weights made the results shown
    c["history_run_id"] = gr.State(None)  # ... and the weights history shown
    c["noticed_run"] = gr.State(None)  # the run the message says the checkpoint now is
    _wire(ctx, c)
    return c


def table_shown(rows: Any) -> dict[str, Any]:
    """The losses table's box, shown while the table holds a row with anything in it (gradio
    hands an empty one over as no rows, or as one row of blanks)."""
    values = rows.values.tolist() if hasattr(rows, "values") else (rows or [])
    return gr.update(visible=any(str(cell).strip() for row in values for cell in row))


def _wire(ctx: AppContext, c: dict[str, Any]) -> None:
    @guarded("reconstruct", lambda text: {c["message"]: render.notice("error", text),
                                          c["results"]: "", c["losses"]: [],
                                          c["results_run"]: None, c["noticed_run"]: None})
    def on_reconstruct(files: Any, use_samples: bool, run_id: str | None, ratio: Any,
                       seed: Any, channels_shown: str = "", contrast: str = "auto") -> dict:
        result = reconstruct_files(ctx, files, use_samples, run_id, ratio, seed, channels_shown,
                                   contrast)
        return {c["results"]: result.html, c["losses"]: result.rows, c["message"]: result.message,
                c["results_run"]: run_id, c["noticed_run"]: None}

    # Nothing to change says so with one output skipped: Gradio reads an empty dict as one value
    # for every output, and logged "didn't return enough output values" at each pick.
    unchanged = lambda output: {output: gr.skip()}  # noqa: E731

    @guarded("refreshing checkpoints", lambda text: unchanged(c["sig"]))
    def on_refresh(current: str | None, follow: bool, sig: dict | None, at: Any) -> dict:
        return {c[name]: value for name, value in refresh(ctx, current, follow, sig, at).items()}

    @guarded("refreshing checkpoints", lambda text: unchanged(c["message"]))
    def on_pick_changed(run_id: str | None, results_run: str | None, history_run: str | None,
                        noticed: str | None) -> dict:
        return {c[name]: value for name, value in
                stale_results(run_id, results_run, history_run, noticed).items()
                } or unchanged(c["message"])

    show_table = dict(fn=table_shown, inputs=c["losses"], outputs=c["losses_box"],
                      api_visibility="private", show_progress=HIDDEN)
    reconstructed = c["run"].click(
        on_reconstruct, [c["uploads"], c["use_samples"], c["ckpt_pick"], c["ratio"], c["seed"],
                         c["channels_shown"], c["contrast"]],
        [c["results"], c["losses"], c["message"], c["results_run"], c["noticed_run"]],
        api_name="reconstruct", show_progress="minimal")
    reconstructed.then(None, js=SHOW_MESSAGE_JS, api_visibility="private", show_progress=HIDDEN)
    reconstructed.then(**show_table)
    @guarded("weights history", lambda text: {c["history_message"]: render.notice("error", text),
                                              c["history"]: "", c["history_run_id"]: None})
    def on_history(run_id: str | None, step: Any, ratio: Any, seed: Any, channels_shown: str = "",
                   contrast: str = "auto") -> dict:
        html, message = reconstruct_history(ctx, run_id, step, ratio, seed, channels_shown,
                                            contrast)
        return {c["history"]: html, c["history_message"]: message, c["history_run_id"]: run_id}

    history_inputs = [c["ckpt_pick"], c["history_step"], c["ratio"], c["seed"], c["channels_shown"],
                      c["contrast"]]
    history_outputs = [c["history"], c["history_message"], c["history_run_id"]]
    c["history_run"].click(on_history, history_inputs, history_outputs, api_name="history",
                           show_progress="minimal")
    c["history_step"].release(on_history, history_inputs, history_outputs,
                              api_name="history_step", show_progress="minimal")
    c["refresh_event"] = dict(fn=on_refresh, inputs=[c["ckpt_pick"], c["follow"], c["sig"],
                                                     c["history_step"]],
                              outputs=[c["ckpt_pick"], c["previews"], c["history_step"], c["sig"]],
                              show_progress=HIDDEN)
    # However the pick changed (followed, picked, opened from the Runs tab): its own event, so
    # /refresh_checkpoints keeps the outputs an API client reads.
    c["ckpt_pick"].change(on_pick_changed, [c[n] for n in ("ckpt_pick", "results_run",
                                                            "history_run_id", "noticed_run")],
                          [c[n] for n in ("results", "losses", "message", "results_run", "history",
                                          "history_message", "history_run_id", "noticed_run")],
                          api_visibility="private", show_progress=HIDDEN).then(**show_table)
    # A checkpoint chosen by hand stays chosen; clearing it goes back to following the live run.
    c["ckpt_pick"].input(follows_after_pick, [c["ckpt_pick"], c["follow"], c["sig"]], c["follow"],
                         api_name="pick_checkpoint", show_progress=HIDDEN).then(
        **c["refresh_event"], api_name="previews")
