"""The Train tab: the run form (generated from the config), Start / Stop / Resume, and the live view
(status, loss curve, log tail) that a timer refreshes.

The plain functions at the top do the work and take and return plain values, so tests call them
without a server; :func:`build` lays out the tab and wires its events to them and to the run
controls' actions (:mod:`ui.trainactions`).
"""

from __future__ import annotations

import atexit
from typing import Any

import gradio as gr

from mae_core.checks import _is_number, shown
from mae_core.config import RunConfig
from mae_core.preparing import Preparations
from mae_core.rundir import LIVE_STATES, RunState
from ui import configfile, datafield, plots, render
from ui.common import (DEFAULTS, FIELD_NAMES, FORM_FIELDS, MAIN_FIELDS, AppContext, UserError,
                       FieldNumber, FieldSlider, as_bool, describe, field_widget, form_by_name,
                       form_values, guarded)
from ui.trainactions import (FORCE_STOP, STOP, about_another_run, action_message, failed_action,
                             form_action, is_action, queue_run, resume_run, settings_action,
                             start_run, stop_run)
from ui.trainscripts import CLEAR_REFUSAL_JS, RESUMED_JS, SHOW_REFUSED_FIELD_JS

POLL_S = 1.5
LOG_LINES = 60
HIDDEN = "hidden"
SMOOTHING = 0.8  # the EMA slider's first value
MAX_SMOOTHING = 0.99


# --- the live view ----------------------------------------------------------------------------

def pick_selected(runs: list[dict[str, Any]], current: str | None, seen_live: str | None) -> str | None:
    """The run the tab shows: a newly live run (started here or elsewhere), else the current
    choice, else the live run or the last one heard from (a page opened after a resumed run ended
    showed a newer run it had never been about)."""
    ids = [s["run_id"] for s in runs]
    live = next((s["run_id"] for s in runs if s.get("state") in LIVE_STATES), None)
    if live is not None and live != seen_live:
        return live
    if current in ids:
        return current
    if live is not None or not runs:
        return live
    return max(runs, key=lambda s: _number_or(s.get("updated"), _number_or(s.get("created"), 0))
               )["run_id"]


def _number_or(value: Any, default: float) -> float:
    return value if _is_number(value) else default


def button_states(status: dict[str, Any] | None, any_live: bool) -> dict[str, dict[str, Any]]:
    state = (status or {}).get("state")
    stopping = bool(status and status.get("stop_requested")) and state in LIVE_STATES
    return {"start": {"interactive": not any_live},
            "queue": {"interactive": any_live},
            "stop": {"interactive": state in LIVE_STATES,
                     "value": FORCE_STOP if stopping else STOP},
            "resume": {"interactive": bool(status and (status.get("resumable")
                                                       or status.get("extendable")))
                       and not any_live}}


def log_view(manager: Any, run_id: str | None, state: str | None) -> str:
    if not run_id:
        return render.log_html("", None)
    return render.log_html(manager.paths(run_id).log_tail(LOG_LINES), state)


def smoothing_of(value: Any, last: float = SMOOTHING) -> float:
    """The EMA weight for whatever the smoothing box holds: a number out of range is clamped to
    the slider's range (where its knob already stands), no number at all (a box being retyped)
    keeps ``last``. Never refused: the live view's every poll carries this value."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return last
    if number != number:  # NaN
        return last
    return min(max(number, 0.0), MAX_SMOOTHING)


def curve_view(ctx: AppContext, run_ids: list[str], metric: str, log_scale: bool,
               smoothing: Any) -> tuple[Any, str]:
    """(chart, text) for the runs plotted; the learning rate is a schedule: never smoothed."""
    metric = metric if metric in plots.METRICS else "loss"
    readers = {r: ctx.metrics.reader(ctx.manager.paths(r).metrics) for r in run_ids}
    smoothing = 0.0 if metric == "lr" else smoothing_of(smoothing, 0.0)
    points = plots.curve_points(readers, metric, smoothing)
    return plots.curve_chart(points, metric, bool(log_scale)), plots.describe_curves(readers, metric)


def knn_view(ctx: AppContext, run_ids: list[str]) -> dict[str, Any]:
    """The kNN monitor's chart beside the loss (an update): hidden while no plotted run has one."""
    readers = {r: ctx.metrics.reader(ctx.manager.paths(r).metrics) for r in run_ids}
    chart = plots.knn_chart(plots.knn_points(readers))
    return gr.update(value=chart, visible=chart is not None)


def curve_key(ctx: AppContext, run_ids: list[str], metric: str, log_scale: bool,
              smoothing: Any) -> tuple:
    """Changes exactly when the chart would: new rows in any plotted run, or other settings."""
    rows = []
    for r in run_ids:
        reader = ctx.metrics.reader(ctx.manager.paths(r).metrics)
        reader.refresh()
        rows.append(reader.rows)
    return (tuple(run_ids), metric, bool(log_scale), smoothing_of(smoothing, 0.0), tuple(rows))


def log_key(manager: Any, run_id: str | None) -> tuple:
    if not run_id:
        return ()
    try:
        stat = manager.paths(run_id).log.stat()
    except OSError:
        return (run_id,)
    return (run_id, stat.st_size, stat.st_mtime_ns)


def poll(ctx: AppContext, run_id: str | None, overlay: list[str] | None, metric: str,
         log_scale: bool, smoothing: Any, seen_live: str | None, sig: dict | None,
         action: dict | None) -> dict[str, Any]:
    """One refresh of the live view, as updates by component name; unchanged parts are left out,
    so an idle page costs a few file stats per tick.

    Every input may come from an API client, not the page: what is not of the page's kind is
    taken as empty (a list of run ids, an action record, the page's signature dict)."""
    run_id, seen_live = _text_or_none(run_id), _text_or_none(seen_live)
    overlay = [r for r in overlay if isinstance(r, str)] if isinstance(overlay, list) else []
    metric = metric if isinstance(metric, str) else "loss"
    log_scale = log_scale is True
    action = action if is_action(action) else None
    sig = dict(sig) if isinstance(sig, dict) else {}
    smoothing = smoothing_of(smoothing, sig.get("smoothing", SMOOTHING))
    sig["smoothing"] = smoothing  # the last number the box held: kept while it holds none
    runs = ctx.manager.list()
    by_id = {s["run_id"]: s for s in runs}
    live = next((s["run_id"] for s in runs if s.get("state") in LIVE_STATES), None)
    # A run of another runs folder holds the devices as one of this folder would: Start greyed,
    # Queue offered (its refusal said "Queue this run" beside a greyed Queue), and said why.
    elsewhere = None if live else ctx.manager.live_elsewhere()
    selected = pick_selected(runs, run_id, seen_live)
    status = by_id.get(selected)
    out: dict[str, Any] = {"seen_live": live}
    choices = [(f"{s['run_id']} · {s.get('state', '?')}", s["run_id"]) for s in runs]
    if choices != sig.get("choices") or selected != run_id:
        out["run_pick"] = gr.update(choices=choices, value=selected)
    if list(by_id) != sig.get("ids"):
        out["overlay"] = gr.update(choices=list(by_id),
                                   value=[r for r in overlay or [] if r in by_id])
    if "shown" in sig and sig["shown"] != selected:
        # A step to resume to is one run's: the shown run changed (picked, opened from the Runs
        # tab, a new live run), so the box goes back to 0, the run's own max steps.
        out["resume_until"] = 0
        if about_another_run(action, selected):
            sig["hidden_action"] = action
    sig["shown"] = selected
    config = _config_or_none(ctx.manager, selected)
    action_run = (action or {}).get("run_id")
    waiting = by_id.get(action_run, {}).get("state") == RunState.QUEUED
    queue = ctx.manager.queued(runs) if waiting else []
    views = {"status": render.status_html(status, config) + render.held_elsewhere_html(elsewhere),
             "message": "" if action and action == sig.get("hidden_action") else action_message(
                 action, by_id.get(action_run),
                 queue.index(action_run) + 1 if action_run in queue else None),
             **{name: gr.update(**state) for name, state in
                button_states(status, live is not None or elsewhere is not None).items()}}
    for name, value in views.items():
        if value != sig.get(name):
            out[name] = value
    sig.update(views, choices=choices, ids=list(by_id))
    plotted = [r for r in overlay or [] if r in by_id] or ([selected] if selected else [])
    key = curve_key(ctx, plotted, metric, log_scale, smoothing)
    if key != sig.get("curve"):
        out["chart"], out["chart_info"] = curve_view(ctx, plotted, metric, log_scale, smoothing)
        out["knn_chart"] = knn_view(ctx, plotted)
    key_log = log_key(ctx.manager, selected)
    if key_log != sig.get("log") or (status or {}).get("state") != sig.get("log_state"):
        out["log"] = log_view(ctx.manager, selected, (status or {}).get("state"))
    sig.update(curve=key, log=key_log, log_state=(status or {}).get("state"))
    out["sig"] = sig
    return out


def _text_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _config_or_none(manager: Any, run_id: str | None) -> RunConfig | None:
    if not run_id:
        return None
    try:
        return manager.config(run_id)
    except Exception:  # noqa: BLE001 - a damaged config only loses the summary lines
        return None


# --- layout and events ------------------------------------------------------------------------

def build(ctx: AppContext) -> dict[str, Any]:
    """Lay out the Train tab (inside an open ``gr.Tab``) and wire its events; returns its
    components by name (``field.<config field>`` for the form)."""
    c: dict[str, Any] = {}
    with gr.Row(elem_id="run-controls", equal_height=True):
        c["start"] = gr.Button("Start", variant="primary", elem_id="start-btn", scale=1, min_width=90)
        c["queue"] = gr.Button("Queue", interactive=False, elem_id="queue-btn", scale=1,
                               min_width=90)
        c["stop"] = gr.Button(STOP, variant="stop", interactive=False, elem_id="stop-btn",
                              scale=1, min_width=90)
        c["resume"] = gr.Button("Resume", interactive=False, elem_id="resume-btn", scale=1,
                                min_width=90)
        c["resume_until"] = FieldNumber(0, label="resume until step (0 = its own max steps)",
                                      elem_id="resume-steps", scale=2, min_width=160)
    c["message"] = gr.HTML(elem_id="train-message")
    with gr.Row(elem_id="train-columns"):
        # Side by side from 1024 px up; narrower, Gradio's page is at most 768 px wide and they
        # stack, the live view first (render.CSS).
        with gr.Column(scale=2, min_width=360, elem_id="train-form"):
            _build_form(c)
        with gr.Column(scale=3, min_width=440, elem_id="train-live"):
            _build_live_view(c)
    for name in ("seen_live", "sig"):
        c[name] = gr.State(None)
    # The last action's record; a hidden JSON (not a State) so API clients get it back too.
    c["action"] = gr.JSON(None, visible=False, elem_id="last-action")
    c["timer"] = gr.Timer(POLL_S)
    _wire(ctx, c)
    return c


def _build_form(c: dict[str, Any]) -> None:
    values = form_values(DEFAULTS)
    c["hardware"] = gr.Markdown("**Hardware:** checking…", elem_id="hardware")
    data, *paired = MAIN_FIELDS
    c["field.data"] = field_widget(data, values["data"])
    datafield.build(c)  # what the field holds; Prepare now / Cancel and the progress
    for i in range(0, len(paired), 2):
        with gr.Row():
            for field in paired[i:i + 2]:
                c[f"field.{field.name}"] = field_widget(field, values[field.name])
    with gr.Accordion("more settings", open=False, elem_id="more-settings"):
        for field in [f for f in FORM_FIELDS if not f.hint.main]:
            c[f"field.{field.name}"] = field_widget(field, values[field.name])
    configfile.build(c)  # copy a run's config, download or upload a YAML


def _build_live_view(c: dict[str, Any]) -> None:
    c["run_pick"] = gr.Dropdown([], value=None, label="run", elem_id="run-pick",
                                allow_custom_value=True, info="the live run, else the newest")
    c["status"] = gr.HTML(render.status_html(None), elem_id="status-panel")
    with gr.Row():
        c["overlay"] = gr.Dropdown([], value=[], multiselect=True, label="runs to plot (compare)",
                                   elem_id="overlay", allow_custom_value=True, scale=3, min_width=200)
        c["metric"] = gr.Radio([(label, key) for key, label in plots.METRICS.items()], value="loss",
                               label="metric", elem_id="metric", scale=2, min_width=200)
    with gr.Row():
        c["log_scale"] = gr.Checkbox(True, label="log scale", elem_id="log-scale")
        # A FieldSlider: a number typed out of range reaches poll (which clamps it) instead of
        # Gradio refusing it before the handler, on every tick, freezing the live view.
        c["smoothing"] = FieldSlider(0.0, MAX_SMOOTHING, value=SMOOTHING, step=0.01,
                                     label="EMA smoothing", elem_id="smoothing")
    c["chart"] = gr.Plot(label="training curve", elem_id="loss-plot", show_label=False)
    # The kNN monitor (mae_core.monitor), shown once a plotted run has logged one.
    c["knn_chart"] = gr.Plot(label="kNN top-1 on held-out images", elem_id="knn-plot",
                             show_label=False, visible=False)
    c["chart_info"] = gr.Markdown(elem_id="plot-info")
    with gr.Accordion("log (train.log, live)", open=True, elem_id="log-accordion"):
        c["log"] = gr.HTML(render.log_html("", None), elem_id="log-view")


def _wire(ctx: AppContext, c: dict[str, Any]) -> None:
    fields = [c[f"field.{name}"] for name in FIELD_NAMES]
    # resume_until after the outputs an API client of /poll already reads by position
    poll_names = ("run_pick", "overlay", "status", "message", "start", "queue", "stop", "resume",
                  "chart", "knn_chart", "chart_info", "log", "resume_until", "seen_live", "sig")
    poll_inputs = [c[n] for n in ("run_pick", "overlay", "metric", "log_scale", "smoothing",
                                  "seen_live", "sig", "action")]
    message_fallback = {"start": lambda text: {c["action"]: failed_action("start", text)},
                        "queue": lambda text: {c["action"]: failed_action("queue", text)},
                        "stop": lambda text: {c["action"]: failed_action("stop", text)},
                        "resume": lambda text: {c["action"]: failed_action("resume", text)}}

    @guarded("the live view", lambda text: {c["message"]: render.notice("error", text)})
    def on_poll(*args: Any) -> dict:
        return {c[name]: value for name, value in poll(ctx, *args).items()}

    @guarded("start", message_fallback["start"])
    def on_start(*values: Any) -> dict:
        return {c["action"]: form_action("start", start_run, ctx.manager, form_by_name(values))}

    @guarded("queue", message_fallback["queue"])
    def on_queue(*values: Any) -> dict:
        return {c["action"]: form_action("queue", queue_run, ctx.manager, form_by_name(values))}

    @guarded("stop", message_fallback["stop"])
    def on_stop(run_id: str | None, label: str | None) -> dict:
        return {c["action"]: stop_run(ctx.manager, run_id, label)}

    @guarded("resume", message_fallback["resume"])
    def on_resume(run_id: str | None, until: Any) -> dict:
        return {c["action"]: resume_run(ctx.manager, run_id, until)}

    refresh = dict(fn=on_poll, inputs=poll_inputs, outputs=[c[n] for n in poll_names],
                   show_progress=HIDDEN)
    c["refresh_spec"] = refresh
    gr.on([c["timer"].tick], **refresh, api_name="poll", trigger_mode="always_last")
    gr.on([c["run_pick"].input, c["overlay"].input, c["metric"].change, c["log_scale"].change,
           c["smoothing"].release], **refresh, api_name="select", trigger_mode="always_last")
    clicked = {}
    for name, fn, inputs in (("start", on_start, fields), ("queue", on_queue, fields),
                             ("stop", on_stop, [c["run_pick"], c["stop"]]),
                             ("resume", on_resume, [c["run_pick"], c["resume_until"]])):
        # /stop itself is an API function (run id, force=False): the button also sends its label
        # (the button's own endpoint is left out of the API's docs: a client calls /stop)
        clicked[name] = c[name].click(fn, inputs, [c["action"]],
                                      api_name="stop_button" if name == "stop" else name,
                                      api_visibility="undocumented" if name == "stop" else "public",
                                      concurrency_id="run_actions", show_progress=HIDDEN)
        clicked[name].then(**refresh, api_name=f"{name}_refresh")
    # The step a run resumed to was for that resume: kept, the next Resume (of any run) reused it.
    clicked["resume"].then(None, [c["action"], c["resume_until"]], c["resume_until"],
                           js=RESUMED_JS, api_visibility="private", show_progress=HIDDEN)
    _wire_form(ctx, c, fields)
    _api_endpoints(ctx)


def _api_endpoints(ctx: AppContext) -> None:
    """Endpoints without a widget, for scripts and tests: a run's status and its curve's points."""

    def run_status(run_id: str) -> dict:
        """status.json of a run (state, step, total_steps, loss, images_per_s, error, ...)."""
        try:
            return ctx.manager.status(run_id)
        except Exception as err:  # noqa: BLE001 - an API client gets the reason
            raise gr.Error(describe(err, "status"), print_exception=False) from None

    def run_metric(run_id: str, metric: str = "loss") -> dict:
        """A run's metric as {"steps": [...], "values": [...]}, every logged step (not thinned)."""
        try:
            if not isinstance(metric, str):
                raise UserError(f"a metric is named by text (loss, lr, ...), not {shown(metric)}")
            reader = ctx.metrics.reader(ctx.manager.paths(run_id).metrics)
            logged = reader.keys()
            # A live run may log it later (a kNN score at its first evaluation); an ended one not.
            if metric not in logged and ctx.manager.status(run_id).get("state") not in LIVE_STATES:
                raise UserError(f"run {run_id} logged no metric named {shown(metric)}; it logged: "
                                f"{', '.join(sorted(k for k in logged if k != 'step')) or 'nothing'}")
            steps, values = reader.series(metric)
        except Exception as err:  # noqa: BLE001
            raise gr.Error(describe(err, "metrics"), print_exception=False) from None
        return {"steps": steps.tolist(), "values": values.tolist()}

    def stop(run_id: str, force: bool = False) -> dict:
        """Stop a run after its current step (it saves a checkpoint first); asked again, it only
        asks. ``force=True`` ends it at once, as the page's Force stop does."""
        try:
            return stop_run(ctx.manager, run_id, FORCE_STOP if as_bool(force, "force") else STOP)
        except Exception as err:  # noqa: BLE001 - an API client gets the reason, as from the page
            return failed_action("stop", describe(err, "stop"))

    def start_with(settings: dict | None = None) -> dict:
        """Start a run from config fields by name ({"preset": "vit-tiny", "max_steps": 200});
        every other field keeps its default. The action's record, as /start returns it."""
        return settings_action("start", start_run, ctx.manager, settings)

    def queue_with(settings: dict | None = None) -> dict:
        """Queue a run behind the live one, from config fields by name (as /start_run)."""
        return settings_action("queue", queue_run, ctx.manager, settings)

    # Run actions one at a time, with the buttons' (two starts at once: one run, one refusal).
    gr.api(start_with, api_name="start_run", concurrency_id="run_actions")
    gr.api(queue_with, api_name="queue_run", concurrency_id="run_actions")
    gr.api(run_status, api_name="status")
    gr.api(stop, api_name="stop")
    gr.api(run_metric, api_name="metric")


def _wire_form(ctx: AppContext, c: dict[str, Any], fields: list[Any]) -> None:
    jobs = Preparations()
    atexit.register(jobs.release)  # a preparation outlives the app; its progress files do not
    datafield.wire(c, jobs)
    configfile.wire(ctx, c, fields)
    # Typed, or filled by the config panel: a copied, loaded or reset form is a new form too.
    # "change" as well as "input": a text box's input event missed a deletion and a paste.
    edits = ([field.input for field in fields] + [field.change for field in fields]
             + [c["copy_config"].click, c["upload_config"].upload, c["reset_form"].click])
    # In the browser, at the edit itself: a server reply could come back after the refusal of a
    # Start clicked just after the edit, and take that refusal away.
    gr.on(edits, None, c["action"], c["action"], js=CLEAR_REFUSAL_JS, api_visibility="private",
          show_progress=HIDDEN, trigger_mode="always_last")
    c["action"].change(None, c["action"], None, js=SHOW_REFUSED_FIELD_JS, api_visibility="private",
                       show_progress=HIDDEN)


def hardware_text() -> str:
    from mae_core.hardware import hardware_summary

    return f"**Hardware:** {hardware_summary()}"
