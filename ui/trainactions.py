"""The Train tab's run controls as plain functions: Start, Queue, Stop and Resume, each returning
the record of what was done (or refused), and the message that record makes under the controls,
told as the run is now. :mod:`ui.train` wires them to the buttons and the live view."""

from __future__ import annotations

import time
from typing import Any

from mae_core.checks import ConfigError, shown
from mae_core.config import MAX_STEPS
from mae_core.resumecheck import NoStepsLeft
from mae_core.rundir import LIVE_STATES, RunState
from ui import render
from ui.common import UserError, as_int, config_from_form, describe, refused_field

# The Stop button's labels: the label pressed says which was meant (see stop_run).
STOP = "Stop"
FORCE_STOP = "Force stop"  # once a stop is requested
RESUME_UNTIL = "“resume until step”"  # the box beside Resume, as messages name it


def start_run(manager: Any, values: dict[str, Any]) -> dict[str, Any]:
    """Validate the form and start a run; the last action's record (see :func:`action_message`)."""
    run_id = manager.start(config_from_form(values))
    return done_action("start", run_id, f"Started run `{run_id}`.")


def queue_run(manager: Any, values: dict[str, Any]) -> dict[str, Any]:
    """Validate the form and queue the run behind the live one (it starts when the devices free)."""
    run_id, position = manager.enqueue(config_from_form(values))
    return done_action("queue", run_id, f"Queued run `{run_id}` at position {position}.")


def stop_run(manager: Any, run_id: str | None, label: str | None = STOP) -> dict[str, Any]:
    """Stop as the button read when pressed: "Stop" only ever asks (pressed again, or in a tab
    that had not yet seen the first request, it used to force-kill the run and lose the steps
    since its last checkpoint); "Force stop" ends it at once."""
    if not run_id:
        raise UserError("Choose a run to stop.")
    if label == FORCE_STOP:
        manager.stop(run_id, force=True)
        return done_action("stop", run_id, f"Stopped `{run_id}` by force.")
    manager.stop(run_id, force=False)
    return done_action("stop", run_id, f"Stopping `{run_id}`.")


def resume_run(manager: Any, run_id: str | None, until_step: Any) -> dict[str, Any]:
    if not run_id:
        raise UserError("Choose a run to resume.")
    steps = as_int(until_step, "resume until step", optional=True) or None
    if steps is not None and not 1 <= steps <= MAX_STEPS:  # the run manager's would say "max_steps"
        raise ConfigError("resume until step", f"must be 0 (the run's own max steps) or a step "
                                               f"up to {MAX_STEPS:,}, got {shown(until_step)}")
    try:
        status = manager.resume(run_id, max_steps=steps)
    except NoStepsLeft as err:
        # Its "max steps" is the box beside Resume here, and a resume from the page keeps the
        # run's max epochs (the form's is a new run's), so raising those is not offered. Nothing
        # went wrong: what to do next, not an error in red.
        said = err.said(f"set {RESUME_UNTIL}", epochs_too=False)
        return failed_action("resume", f"{said[:1].upper()}{said[1:]}.", kind="info")
    step = status.get("resumed_from_step", status.get("step", 0))
    # A new end moves the learning rate's cosine decay with it: said, as the curve shows it.
    schedule = (f" Its learning-rate schedule now ends at step {steps}." if steps else "")
    where = f"from its checkpoint at step {step}" if step else "from step 0"
    return done_action("resume", run_id, f"Resumed `{run_id}` {where} "
                                         f"towards {status.get('total_steps')} steps.{schedule}")


def done_action(action: str, run_id: str, text: str) -> dict[str, Any]:
    """A done action's record: the run it was done to and what to say. "at": the same action
    again (a Stop of the run picked back) is another record, never one hidden before."""
    return {"action": action, "run_id": run_id, "kind": "ok", "text": text, "at": time.time()}


def failed_action(action: str, message: str, field: str | None = None,
                  reason: str = "", kind: str = "error") -> dict[str, Any]:
    """A refusal's record; ``field`` (with the ``reason`` said beside it) is the form's field it
    is about, which the page then shows (:data:`ui.trainscripts.SHOW_REFUSED_FIELD_JS`). ``kind``
    "info": nothing was wrong, there was just nothing to do (a finished run resumed to its end)."""
    # "at": the same refusal twice is another value, so the page shows it (and the field) again
    record = {"action": action, "run_id": None, "kind": kind, "text": message,
              "at": time.time()}
    if not field:
        return record
    return record | {"field": field, "reason": reason or message}


def form_action(action: str, act: Any, manager: Any, values: dict[str, Any]) -> dict[str, Any]:
    """``act(manager, values)`` (:func:`start_run`, :func:`queue_run`); a refusal about one field
    becomes a record naming it (the field may sit under "more settings", or below the live view
    on a narrow screen, away from the message). Any other error is raised."""
    try:
        return act(manager, values)
    except Exception as err:
        field = refused_field(err)
        if field is None:
            raise
        return failed_action(action, describe(err, action), field,
                             str(err).removeprefix(f"{field}: "))


def settings_action(action: str, act: Any, manager: Any, settings: Any) -> dict[str, Any]:
    """``/start_run`` and ``/queue_run``: a run from config fields by name (``{"preset":
    "vit-tiny", "max_steps": 200}``, as a saved ``config.yaml`` names them), every other field at
    its default. /start and /queue take the page's whole form by position (42 values, in the
    form's order), which no script should have to know. Any failure is a refusal's record."""
    if settings is None:
        settings = {}
    if not isinstance(settings, dict):
        return failed_action(action, f"{action}: the settings are config fields by name, e.g. "
                                     f'{{"max_steps": 200}}, not {shown(settings)}')
    try:
        settings = _fields_by_name(settings)
    except ConfigError as err:
        return failed_action(action, f"{action}: {err}")
    if settings.get("num_nodes", 1) in (1, None):
        settings.pop("num_nodes", None)
    else:
        return failed_action(action, f"num_nodes: the app starts runs on this machine only; a run "
                                     f"on {shown(settings['num_nodes'])} nodes starts from "
                                     "torchrun or SLURM (README, Beyond one machine)", "num_nodes")
    try:
        return form_action(action, act, manager, settings)
    except Exception as err:  # noqa: BLE001 - an API client gets the reason, as from the page
        return failed_action(action, describe(err, action))


def _fields_by_name(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` as the form's fields by name: a config.yaml's ``model:`` and ``train:``
    sections flattened (beside flat fields too), the trainer's ``--model`` (a name, not a
    section) read as the preset. A ConfigError names the section or field given wrong: a
    ``"train": 5`` and a ``{"model": {...}, "max_steps": 3}`` were both "model: unknown config
    field (did you mean timm_model?)"."""
    flat: dict[str, Any] = {}
    for name, value in settings.items():
        if name in ("model", "train") and isinstance(value, dict):
            fields = value
        elif name == "train":
            raise ConfigError("train", f"is a section of train fields by name, e.g. "
                                       f'{{"max_steps": 200}}, not {shown(value)}')
        elif name == "model":  # the trainer's --model: the preset's name, refused there if wrong
            fields = {"preset": value}
        else:
            fields = {name: value}
        for field, given in fields.items():
            if field in flat:
                raise ConfigError(str(field)[:60], "model (the trainer's --model) and preset both "
                                  "name the preset: give one" if field == "preset" else
                                  "is given twice (by name and in its section): give it once")
            flat[field] = given
    return flat


def action_message(action: dict[str, Any] | None, status: dict[str, Any] | None,
                   position: int | None = None) -> str:
    """The message under the run controls: the last action, told as the run is NOW (a stop request
    becomes "stopped at step N" once the trainer has stopped; ``position``: its place in the queue
    now, moved since perhaps)."""
    if not action:
        return ""
    if is_refusal(action):
        return render.notice(action["kind"], action["text"])
    run_id = action["run_id"]
    if not status:  # it went (deleted here or in another tab): told, not its old news
        return render.notice("info", f"Run `{run_id}` is no longer listed: deleted (or its "
                                     "config.yaml is gone, see the Runs tab).")
    state, step = status.get("state"), status.get("step", 0)
    if state == RunState.QUEUED:
        where = f" (number {position} in the queue)" if position else ""
        return render.notice("info", f"Run `{run_id}` is queued{where}: it starts when the "
                                     "devices are free.")
    if state in LIVE_STATES:
        if status.get("stop_requested"):
            return render.notice("warn", f"Stop requested for `{run_id}`: it saves a checkpoint "
                                         "after the current step (Force stop ends it at once).")
        done = (f"Run `{run_id}` started from the queue." if action.get("action") == "queue"
                else action["text"])  # its place in the queue, said then, is history
        return render.notice("ok", f"{done} It is {state}.")
    if state == RunState.FINISHED:
        more = (f" To train it further, set {RESUME_UNTIL} above {step} and press Resume."
                if status.get("extendable") else "")
        return render.notice("ok", f"Run `{run_id}` finished at step {step}.{more}")
    if state == RunState.STOPPED:
        if status.get("error"):  # stopped by force: the error says where Resume takes up
            return render.notice("warn", f"Run `{run_id}` {status['error']}.")
        more = ("" if not status.get("resumable") else " Resume starts it." if not step
                else " Resume continues from its last checkpoint.")
        return render.notice("info", f"Run `{run_id}` stopped at step {step}.{more}")
    more = (" Resume continues from its last checkpoint (steps since it are trained again)."
            if status.get("resumable") else "")
    return render.notice("error", f"Run `{run_id}` {state}: {status.get('error') or 'see the log'}"
                                  f"{more}")


def about_another_run(action: dict[str, Any] | None, shown: str | None) -> bool:
    """Whether the last action's message is about another run than the one now shown, so it goes
    as the shown run changes (it went on saying "stopped at step 61. Resume continues …" beside the
    next run, live, its Resume greyed out): one done to another run, or a Stop or Resume refused
    for the run shown before. A refused Start or Queue is about the form: it stays."""
    if not action:
        return False
    if is_refusal(action):
        return action.get("action") in ("stop", "resume")
    return action.get("run_id") != shown


def is_refusal(action: dict[str, Any]) -> bool:
    """Whether the record says an action was not done (:func:`failed_action`): a done one is
    "ok" and told as its run is now."""
    return action.get("kind") != "ok"


def is_action(action: Any) -> bool:
    """Whether ``action`` is a record the run controls wrote (see :func:`start_run`)."""
    return (isinstance(action, dict) and action.get("kind") in render.NOTICE_KINDS
            and isinstance(action.get("text"), str)
            and isinstance(action.get("run_id"), (str, type(None))))
