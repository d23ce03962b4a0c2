"""ui.train's handlers and its run controls (ui.trainactions), called as plain functions on real
run directories (no server).

Run directories are made by ``create_run`` and filled with real files (status, metrics lines, log).
A run that must count as live gets a real stand-in process (``sleep``) recorded as its trainer; one
test launches a real tiny training run.
"""

from __future__ import annotations

import json
import math
import subprocess
import time

import pytest

from mae_core.config import ConfigError, ModelConfig, RunConfig, TrainConfig
from mae_core.fileio import atomic_write_json
from mae_core.process import process_record
from mae_core.rundir import LIVE_STATES, RunPaths, create_run
from mae_core.runs import RunError
from ui import render, train, trainactions
from ui.common import AppContext, UserError, describe, form_values

TINY = RunConfig(model=ModelConfig(image_size=32, patch_size=8),
                 train=TrainConfig(accelerator="cpu", devices=1, batch_size=4, max_steps=4,
                                   num_workers=0))
IDLE_KEYS = {"seen_live", "sig"}


@pytest.fixture
def stand_ins():
    """Real processes that stand in for live trainers; ended (by their own pid) after the test."""
    started: list[subprocess.Popen] = []

    def start() -> subprocess.Popen:
        process = subprocess.Popen(["sleep", "300"], start_new_session=True)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()
        process.wait()


def make_run(ctx: AppContext, state: str = "stopped", step: int = 0, **status) -> RunPaths:
    paths = create_run(TINY.resolved(), runs_dir=ctx.manager.runs_dir)
    paths.write_status(state=state, step=step, **status)
    time.sleep(0.01)  # distinct creation times: the newest run is listed first
    return paths


def make_live(paths: RunPaths, process: subprocess.Popen, **status) -> None:
    atomic_write_json(paths.process, process_record(process.pid))
    paths.write_status(state="running", **status)


def write_metrics(paths: RunPaths, steps, start_loss: float = 2.0) -> None:
    with open(paths.metrics, "a") as handle:
        for step in steps:
            handle.write(json.dumps({"step": step, "epoch": 0, "loss": start_loss / step,
                                     "lr": 1e-4 * step, "images_per_s": 50.0}) + "\n")


def chart_steps(chart) -> list[int]:
    rows = [row for data in chart.to_dict()["datasets"].values() for row in data]
    return sorted({row["step"] for row in rows if row["kind"] == "raw"})


def poll_args(run_id=None, seen_live=None, sig=None, action=None, metric="loss"):
    return dict(run_id=run_id, overlay=[], metric=metric, log_scale=True, smoothing=0.8,
                seen_live=seen_live, sig=sig, action=action)


# --- action messages --------------------------------------------------------------------------

def stop_action(run_id: str) -> dict:
    return {"action": "stop", "run_id": run_id, "kind": "ok", "text": f"Stopping `{run_id}`."}


def test_action_message_follows_the_run_through_a_stop():
    action = stop_action("run-1")
    requested = train.action_message(action, {"state": "running", "step": 5, "stop_requested": True})
    assert "Stop requested" in requested and 'data-kind="warn"' in requested
    stopped = train.action_message(action, {"state": "stopped", "step": 7, "stop_requested": False,
                                            "resumable": True})
    assert "Stop requested" not in stopped
    assert "stopped at step 7" in stopped and "Resume" in stopped
    assert "Resume" not in train.action_message(action, {"state": "stopped", "step": 7})


def test_resume_refusals_speak_of_the_page_not_the_command_line():
    """The run manager's refusals name its flags; from the page, "max steps" is the box beside
    Resume, and the run's max epochs cannot be raised (the form's is a new run's). Any other
    refusal is passed on as it is."""
    from mae_core.resumecheck import past_the_epoch_limit, require_steps_left

    by_epochs = RunConfig(train=TrainConfig(max_steps=-1, max_epochs=2))
    refusals = {
        "ended": lambda: past_the_epoch_limit({"state": "finished", "step": 8}, by_epochs,
                                              by_epochs, "r1"),
        "behind": lambda: require_steps_left(TINY, 4, "r1"),
        "other": lambda: (_ for _ in ()).throw(RunError("run r1 is running: wait")),
    }

    class Refusing:
        def resume(self, run_id, max_steps=None):
            refusals[run_id]()

    until = trainactions.RESUME_UNTIL
    said = {name: trainactions.resume_run(Refusing(), name, None) for name in ("ended", "behind")}
    assert {name: (record["kind"], record["text"]) for name, record in said.items()} == {
        "ended": ("info", f"Run r1 finished its 2 epochs at step 8: set {until} above 8 (the "
                          "epoch limit then goes) to train it further."),
        "behind": ("info", f"The checkpoint of r1 is at step 4: set {until} above 4 to train it "
                           "further.")}
    with pytest.raises(RunError, match="^run r1 is running: wait$"):
        trainactions.resume_run(Refusing(), "other", None)
    # The command line's own words stay its own.
    with pytest.raises(RunError, match="or max epochs above 2 to train it further"):
        refusals["ended"]()


def test_a_resume_step_out_of_range_is_refused_as_the_box_beside_resume():
    """-5, -1 or 10**10 reached the run manager, whose refusal named the command line's
    "max_steps" (and -1 there means "train by epochs"); 0 or blank is the run's own max steps."""
    class Resuming:
        asked = []

        def resume(self, run_id, max_steps=None):
            self.asked.append(max_steps)
            return {"resumed_from_step": 4, "total_steps": max_steps or 8}

    manager = Resuming()
    for bad in (-5, -1, 10**10, "1e10"):
        with pytest.raises(ConfigError) as refused:
            trainactions.resume_run(manager, "r1", bad)
        said = describe(refused.value, "resume")
        assert said.startswith("Invalid setting, resume until step: must be 0 (the run's own max "
                               "steps) or a step up to 1,000,000,000, got "), said
        assert "max_steps" not in said
    assert manager.asked == []
    for fine, asked in ((0, None), ("", None), (12, 12)):
        assert trainactions.resume_run(manager, "r1", fine)["kind"] == "ok"
        assert manager.asked.pop() == asked


def test_action_message_for_finished_failed_and_refused():
    start = {"action": "start", "run_id": "run-2", "kind": "ok", "text": "Started run `run-2`."}
    running = train.action_message(start, {"state": "running", "step": 1})
    assert "Started run" in running and "running" in running and 'data-kind="ok"' in running
    finished = train.action_message(start, {"state": "finished", "step": 300})
    assert "finished at step 300" in finished
    failed = train.action_message(start, {"state": "failed", "step": 3,
                                          "error": "CUDA out of memory on rank 1"})
    assert "CUDA out of memory on rank 1" in failed and 'data-kind="error"' in failed
    assert "Resume" not in failed  # no checkpoint: nothing to resume
    killed = train.action_message(start, {"state": "failed", "step": 21, "resumable": True,
                                          "error": "the trainer was killed by SIGKILL"})
    assert "Resume continues from its last checkpoint" in killed  # said as a stop says it
    # Stopped before its first step (while its data was prepared): there is no checkpoint to
    # continue from, Resume starts it.
    untrained = train.action_message(start, {"state": "stopped", "step": 0, "resumable": True})
    assert "stopped at step 0. Resume starts it." in untrained and "checkpoint" not in untrained
    refused = train.action_message(train.failed_action("start", "Invalid setting, seed: too big"),
                                   {"state": "running"})
    assert "Invalid setting, seed: too big" in refused and 'data-kind="error"' in refused
    assert train.action_message(None, {"state": "running"}) == ""


def test_an_old_refusal_is_replaced_by_the_next_action():
    """An error from a refused Start must not stay once a later Start succeeded."""
    first = train.failed_action("start", "run x is still live")
    later = {"action": "start", "run_id": "run-3", "kind": "ok", "text": "Started run `run-3`."}
    text = train.action_message(later, {"state": "starting", "step": 0})
    assert "still live" not in text and "Started run" in text and 'data-kind="error"' not in text
    assert "still live" in train.action_message(first, None)


# --- the run shown, and the buttons -------------------------------------------------------------

def test_pick_selected_follows_a_newly_live_run_but_keeps_a_choice():
    runs = [{"run_id": "new", "state": "running"}, {"run_id": "old", "state": "stopped"}]
    assert train.pick_selected(runs, "old", seen_live=None) == "new"  # it just became live
    assert train.pick_selected(runs, "old", seen_live="new") == "old"  # the user went back to it
    assert train.pick_selected(runs, None, seen_live="new") == "new"
    assert train.pick_selected(runs, "deleted", seen_live="new") == "new"
    quiet = [{"run_id": "b", "state": "finished"}, {"run_id": "a", "state": "stopped"}]
    assert train.pick_selected(quiet, "a", seen_live="b") == "a"
    assert train.pick_selected(quiet, None, seen_live=None) == "b"  # the newest
    assert train.pick_selected(quiet, "gone", seen_live=None) == "b"
    assert train.pick_selected([], "gone", seen_live=None) is None
    # An older run resumed since, and ended: a page opened now shows it, not a newer idle one.
    heard = [{"run_id": "b", "state": "stopped", "created": 20, "updated": 25},
             {"run_id": "a", "state": "finished", "created": 10, "updated": 90},
             {"run_id": "c", "state": "failed", "updated": None, "created": "x"}]  # hand-edited
    assert train.pick_selected(heard, None, seen_live=None) == "a"


def test_button_states():
    idle = train.button_states(None, any_live=False)
    assert idle["start"]["interactive"] and not idle["stop"]["interactive"]
    assert not idle["resume"]["interactive"]
    live = train.button_states({"state": "running", "stop_requested": False}, any_live=True)
    assert not live["start"]["interactive"]
    assert live["stop"] == {"interactive": True, "value": "Stop"}
    assert not live["resume"]["interactive"]
    stopping = train.button_states({"state": "running", "stop_requested": True}, any_live=True)
    assert stopping["stop"] == {"interactive": True, "value": "Force stop"}
    resumable = train.button_states({"state": "stopped", "resumable": True}, any_live=False)
    assert resumable["resume"]["interactive"] and resumable["start"]["interactive"]
    assert not resumable["stop"]["interactive"] and resumable["stop"]["value"] == "Stop"
    # Another run is live: no Resume (one run at a time), no Stop for this one.
    other_live = train.button_states({"state": "stopped", "resumable": True}, any_live=True)
    assert not other_live["resume"]["interactive"] and not other_live["stop"]["interactive"]
    assert not other_live["start"]["interactive"]
    not_resumable = train.button_states({"state": "finished", "resumable": False}, any_live=False)
    assert not not_resumable["resume"]["interactive"]  # finished without a checkpoint
    extendable = train.button_states({"state": "finished", "extendable": True}, any_live=False)
    assert extendable["resume"]["interactive"]


# --- the live view --------------------------------------------------------------------------------

def test_poll_sends_only_what_changed(ctx):
    paths = make_run(ctx, state="stopped", step=3, loss=0.66)
    write_metrics(paths, range(1, 4))
    paths.log.write_text("trainer started\nstep 3 done\n")
    first = train.poll(ctx, **poll_args())
    assert first["run_pick"]["value"] == paths.run_id
    assert paths.run_id in first["status"] and 'data-state="stopped"' in first["status"]
    assert "step 3 done" in first["log"]
    assert chart_steps(first["chart"]) == [1, 2, 3]
    assert "3 points" in first["chart_info"]

    idle = train.poll(ctx, **poll_args(paths.run_id, first["seen_live"], first["sig"]))
    assert set(idle) == IDLE_KEYS, f"an idle poll resent {set(idle) - IDLE_KEYS}"

    write_metrics(paths, [4])
    grown = train.poll(ctx, **poll_args(paths.run_id, idle["seen_live"], idle["sig"]))
    assert chart_steps(grown["chart"]) == [1, 2, 3, 4]
    assert "log" not in grown and "status" not in grown

    with open(paths.log, "a") as handle:
        handle.write("a new log line\n")
    logged = train.poll(ctx, **poll_args(paths.run_id, grown["seen_live"], grown["sig"]))
    assert "a new log line" in logged["log"] and "chart" not in logged


def test_the_resume_step_goes_back_to_0_when_the_shown_run_changes(ctx):
    """A step typed to resume one run to stayed in the box when another run came to be shown
    (picked, opened from the Runs tab, or a new live run): the next Resume ended that run there."""
    first = make_run(ctx, state="stopped", step=3)
    second = make_run(ctx, state="stopped", step=5)
    shown = train.poll(ctx, **poll_args())
    assert "resume_until" not in shown  # the page's first view: the box holds its 0
    same = train.poll(ctx, **poll_args(second.run_id, shown["seen_live"], shown["sig"]))
    assert "resume_until" not in same  # what was typed for the shown run stays
    other = train.poll(ctx, **poll_args(first.run_id, same["seen_live"], same["sig"]))
    assert other["resume_until"] == 0
    again = train.poll(ctx, **poll_args(first.run_id, other["seen_live"], other["sig"]))
    assert "resume_until" not in again


def test_poll_survives_metrics_rewritten_shorter(ctx):
    paths = make_run(ctx, state="stopped", step=6)
    write_metrics(paths, range(1, 7))
    out = train.poll(ctx, **poll_args())
    assert chart_steps(out["chart"]) == [1, 2, 3, 4, 5, 6]
    paths.truncate_metrics(3)  # what a resume from step 3 does (a new file)
    out = train.poll(ctx, **poll_args(paths.run_id, out["seen_live"], out["sig"]))
    assert chart_steps(out["chart"]) == [1, 2, 3]
    paths.metrics.write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")  # shorter, in place
    out = train.poll(ctx, **poll_args(paths.run_id, out["seen_live"], out["sig"]))
    assert chart_steps(out["chart"]) == [1]
    write_metrics(paths, [2, 3], start_loss=1.0)  # the resumed run goes on
    out = train.poll(ctx, **poll_args(paths.run_id, out["seen_live"], out["sig"]))
    assert chart_steps(out["chart"]) == [1, 2, 3]


def test_poll_follows_a_run_that_becomes_live_and_shows_its_stop(ctx, stand_ins):
    old = make_run(ctx, state="stopped", step=2)
    out = train.poll(ctx, **poll_args())
    assert out["seen_live"] is None and out["start"]["interactive"]
    new = make_run(ctx, state="starting")
    make_live(new, stand_ins(), step=1, total_steps=4)
    out = train.poll(ctx, **poll_args(old.run_id, out["seen_live"], out["sig"]))
    assert out["seen_live"] == new.run_id and out["run_pick"]["value"] == new.run_id
    assert out["start"]["interactive"] is False and out["stop"]["interactive"] is True
    assert "(no output yet)" in out["log"]
    # The user picks the old run again: it stays picked while the same run is live.
    out = train.poll(ctx, **poll_args(old.run_id, out["seen_live"], out["sig"]))
    assert "run_pick" not in out or out["run_pick"]["value"] == old.run_id
    assert 'data-state="stopped"' in out["status"]

    # A stop through the real manager: "Stop requested", then "stopped at step N".
    action = train.stop_run(ctx.manager, new.run_id)
    out = train.poll(ctx, **poll_args(new.run_id, out["seen_live"], out["sig"], action))
    assert "Stop requested" in out["message"] and out["stop"]["value"] == "Force stop"
    new.stop_request.unlink()
    new.write_status(state="stopped", step=3)
    out = train.poll(ctx, **poll_args(new.run_id, out["seen_live"], out["sig"], action))
    assert "stopped at step 3" in out["message"] and "Stop requested" not in out["message"]
    assert out["stop"]["interactive"] is False and out["stop"]["value"] == "Stop"
    assert out["start"]["interactive"] is True


def test_stop_pressed_as_stop_only_asks_and_force_stop_says_where_resume_takes_up(ctx, stand_ins):
    """Stop pressed in a second tab that still read "Stop" after the first request (or pressed
    twice through the API) force-killed the run and lost the steps since its last checkpoint."""
    paths = make_run(ctx, state="starting")
    trainer = stand_ins()
    make_live(paths, trainer, step=7, total_steps=40)
    for _ in range(2):  # two tabs, both still showing "Stop"
        action = train.stop_run(ctx.manager, paths.run_id, "Stop")
    assert trainer.poll() is None and ctx.manager.status(paths.run_id)["state"] == "running"
    assert "Stop requested" in train.action_message(action, ctx.manager.status(paths.run_id))
    action = train.stop_run(ctx.manager, paths.run_id, train.FORCE_STOP)
    assert trainer.wait(timeout=10) is not None
    message = train.action_message(action, ctx.manager.status(paths.run_id))
    assert "stopped by force: it had saved no checkpoint" in message, message


def test_the_message_is_about_the_run_shown_or_says_its_run_is_gone(ctx, stand_ins):
    """A Stop of run A stayed ("stopped at step 61. Resume continues …") beside run B, started
    from the queue and shown, its Resume greyed out; a refused Resume of A stayed red beside B; a
    queued run's message kept the place it was queued at, and outlived the run's deletion."""
    a = make_run(ctx, state="stopped", step=2)
    b = make_run(ctx, state="stopped", step=5)
    out = train.poll(ctx, **poll_args(a.run_id))
    stop_of_a = trainactions.done_action("stop", a.run_id, f"Stopping `{a.run_id}`.")
    out = train.poll(ctx, **poll_args(a.run_id, sig=out["sig"], action=stop_of_a))
    assert "stopped at step 2" in out["message"]
    out = train.poll(ctx, **poll_args(b.run_id, sig=out["sig"], action=stop_of_a))  # B picked
    assert out["message"] == ""
    out = train.poll(ctx, **poll_args(a.run_id, sig=out["sig"], action=stop_of_a))  # and back
    assert out["sig"]["message"] == ""  # gone for good: it was about the run shown before
    stop_again = trainactions.done_action("stop", a.run_id,
                                          f"Stopping `{a.run_id}`.")  # the same words
    out = train.poll(ctx, **poll_args(a.run_id, sig=out["sig"], action=stop_again))
    assert "stopped at step 2" in out["message"]  # a new action, not the one hidden
    refused = train.failed_action("resume", "run x has no checkpoint")
    out = train.poll(ctx, **poll_args(a.run_id, sig=out["sig"], action=refused))
    assert "no checkpoint" in out["message"]
    out = train.poll(ctx, **poll_args(b.run_id, sig=out["sig"], action=refused))
    assert out["message"] == ""
    bad_form = train.failed_action("start", "Invalid setting, seed: too big")
    out = train.poll(ctx, **poll_args(b.run_id, sig=out["sig"], action=bad_form))
    out = train.poll(ctx, **poll_args(a.run_id, sig=out["sig"], action=bad_form))
    assert "seed: too big" in out["sig"]["message"]  # about the form, whichever run is shown

    # Two runs queued behind a live one; the second moved up: its place is said as it is now.
    live = make_run(ctx, state="starting")
    make_live(live, stand_ins(), step=1, total_steps=4)
    out = train.poll(ctx, **poll_args(live.run_id, sig=out["sig"], action=bad_form))
    values = form_values(TINY)
    first, second = (train.queue_run(ctx.manager, values) for _ in range(2))
    assert "at position 2" in second["text"]
    ctx.manager.move_queued(second["run_id"], -1)
    out = train.poll(ctx, **poll_args(live.run_id, sig=out["sig"], action=second))
    assert "is queued (number 1 in the queue)" in out["message"], out["message"]
    ctx.manager.delete(second["run_id"])
    out = train.poll(ctx, **poll_args(live.run_id, sig=out["sig"], action=second))
    assert f"Run <code>{second['run_id']}</code> is no longer listed: deleted" in out["message"]
    assert 'data-kind="info"' in out["message"]


def test_curve_view_never_smooths_the_learning_rate(ctx):
    paths = make_run(ctx, step=5)
    write_metrics(paths, range(1, 6))
    chart, info = train.curve_view(ctx, [paths.run_id], "lr", False, 0.9)
    kinds = {row["kind"] for data in chart.to_dict()["datasets"].values() for row in data}
    assert kinds == {"raw"} and "learning rate" in info
    chart, _ = train.curve_view(ctx, [paths.run_id], "no-such-metric", False, 0.9)
    kinds = {row["kind"] for data in chart.to_dict()["datasets"].values() for row in data}
    assert "smoothed" in kinds  # an unknown metric falls back to the loss


def smoothed_values(chart) -> list[float]:
    rows = [row for data in chart.to_dict()["datasets"].values() for row in data]
    return [row["value"] for row in rows if row["kind"] == "smoothed"]


def test_a_smoothing_typed_out_of_range_is_clamped_never_refused(ctx):
    """Whatever the smoothing box holds reaches every poll of the live view: 5 draws as the
    slider's knob shows it (0.99), -1 as no smoothing, and a box emptied to retype keeps the
    last number (it reset the chart to unsmoothed, or failed the poll on "abc")."""
    paths = make_run(ctx, step=8)
    write_metrics(paths, range(1, 9))

    def poll(smoothing, sig=None):
        return train.poll(ctx, **{**poll_args(paths.run_id, sig=sig), "smoothing": smoothing})

    assert smoothed_values(poll(5)["chart"]) == smoothed_values(poll(0.99)["chart"])
    assert smoothed_values(poll(-1)["chart"]) == []
    typed = poll(0.5)
    for retyping in (None, "", "abc", math.nan):
        again = poll(retyping, typed["sig"])
        assert "chart" not in again, retyping  # still the chart at 0.5: nothing to resend


# --- actions on real runs ---------------------------------------------------------------------

def test_stop_and_resume_refusals_are_readable(ctx):
    paths = make_run(ctx, state="stopped", step=2)
    with pytest.raises(UserError, match="Choose a run"):
        train.stop_run(ctx.manager, None)
    with pytest.raises(UserError, match="Choose a run"):
        train.resume_run(ctx.manager, "", 10)
    with pytest.raises(RunError, match="not running"):
        train.stop_run(ctx.manager, paths.run_id)
    with pytest.raises(RunError, match="no checkpoint"):
        train.resume_run(ctx.manager, paths.run_id, 0)
    with pytest.raises(ConfigError, match="resume until step"):
        train.resume_run(ctx.manager, paths.run_id, "abc")


def test_start_is_refused_while_a_run_is_live(ctx, stand_ins):
    live = make_run(ctx, state="starting")
    make_live(live, stand_ins())
    values = form_values(TINY)
    with pytest.raises(RunError, match="still live"):
        train.start_run(ctx.manager, values)
    with pytest.raises(ConfigError, match="batch_size"):
        train.start_run(ctx.manager, {**values, "batch_size": 2.5})
    with pytest.raises(RunError, match="still live"):  # about no field: worded by the guard
        train.form_action("start", train.start_run, ctx.manager, values)
    assert [s["run_id"] for s in ctx.manager.list()] == [live.run_id]


def test_a_script_starts_or_queues_a_run_from_config_fields_by_name(ctx, stand_ins):
    """/start_run and /queue_run: a dict of config fields (a run's config.yaml as read, sections
    and all, or flat), the rest at their defaults; /start and /queue took the page's 42 form
    values by position. Every failure comes back as a refusal's record, never raised."""
    import yaml

    live = make_run(ctx, state="starting")
    make_live(live, stand_ins())
    act = trainactions.settings_action
    flat = {"model": "vit-small", "image_size": 32, "patch_size": 8, "max_steps": 7,
            "accelerator": "cpu", "devices": 1}
    queued = act("queue", train.queue_run, ctx.manager, flat)
    assert queued["kind"] == "ok" and "position 1" in queued["text"], queued
    cfg = ctx.manager.config(queued["run_id"])
    assert (cfg.model.preset, cfg.train.max_steps, cfg.train.batch_size) == ("vit-small", 7, 32)
    # A saved config, sections and all (num_nodes 1 in it), queues the same run again.
    again = act("queue", train.queue_run, ctx.manager, yaml.safe_load(cfg.to_yaml()))
    assert again["kind"] == "ok", again
    assert ctx.manager.config(again["run_id"]) == cfg
    # A section beside flat fields: both read (it was "model: unknown config field (did you mean
    # timm_model?)").
    mixed = act("queue", train.queue_run, ctx.manager, {"model": {"preset": "vit-small"},
                                                        **{k: v for k, v in flat.items()
                                                           if k != "model"}})
    assert mixed["kind"] == "ok", mixed
    assert ctx.manager.config(mixed["run_id"]) == cfg
    for settings, words, field in (
            ([1, 2], "the settings are config fields by name", None),
            ({"max_step": 3}, "max_step: unknown config field (did you mean max_steps", None),
            ({"batch_size": 2.5}, "whole number", "batch_size"),
            ({"num_nodes": 2}, "starts from torchrun or SLURM", "num_nodes"),
            ({"model": {"preset": "vit-tiny"}, "train": 5},
             "train: is a section of train fields by name", None),
            ({"model": {"image_size": 32}, "image_size": 64}, "image_size: is given twice", None),
            ({"model": "vit-small", "preset": "vit-tiny"}, "and preset both name the preset",
             None),
            ({"model": 5}, "model preset (preset): choose one of", "preset"),
            ({}, "still live", None)):  # about no field: a record all the same
        refused = act("start", train.start_run, ctx.manager, settings)
        assert refused["kind"] == "error" and words in refused["text"], (settings, refused)
        assert refused.get("field") == field, refused
    assert len(ctx.manager.list()) == 4  # the live run and the three queued


@pytest.mark.parametrize("change, field, reason", [
    (lambda tmp: {"weight_decay": -1.0}, "weight_decay", "must be a finite number in [0, 1)"),
    (lambda tmp: {"in_chans": 1}, "in_chans", "is 1 but sample photos"),
    (lambda tmp: {"data": f"{tmp}/nowhere"}, "data", "data folder {tmp}/nowhere does not exist"),
    (lambda tmp: {"data": str(tmp)}, "data", "data folder {tmp} holds no images"),
    (lambda tmp: {"val_count": 17}, "val_count", "holding out 17 of 17 images leaves none"),
    (lambda tmp: {"eval_data": str(tmp)}, "eval_data", "data folder {tmp} holds no images"),
])
def test_a_refusal_about_one_field_names_that_field_for_the_page(ctx, tmp_path, change, field,
                                                                 reason):
    """The page shows the field a refused Start or Queue is about (it may be under "more
    settings", or below the live view): a setting, the data folder, a split, the kNN folder."""
    values = {**form_values(TINY), **change(tmp_path)}
    for action, act in (("start", train.start_run), ("queue", train.queue_run)):
        refused = train.form_action(action, act, ctx.manager, values)
        assert refused["kind"] == "error" and refused["action"] == action
        assert refused["field"] == field and refused["reason"].startswith(reason.format(tmp=tmp_path))
        assert refused["reason"] in refused["text"]
    assert ctx.manager.list() == []


def wait_ended(manager, run_id: str) -> dict:
    deadline = time.monotonic() + 240
    status = manager.status(run_id)
    try:
        while status["state"] in LIVE_STATES and time.monotonic() < deadline:
            time.sleep(0.5)
            status = manager.status(run_id)
    finally:
        if manager.status(run_id)["state"] in LIVE_STATES:  # never leave a trainer behind
            manager.stop(run_id, force=True)
    return status


def test_start_launches_a_real_run_that_finishes(ctx):
    action = train.start_run(ctx.manager, form_values(TINY))
    run_id = action["run_id"]
    assert action["kind"] == "ok" and run_id in action["text"]
    status = wait_ended(ctx.manager, run_id)
    assert status["state"] == "finished", status
    assert "finished at step 4" in train.action_message(action, status)
    out = train.poll(ctx, **poll_args(run_id=run_id, action=action))
    assert chart_steps(out["chart"]) == [1, 2, 3, 4]
    assert "finished at step 4" in out["message"] and out["log"]
    assert out["start"]["interactive"] is True
    # A finished run trains further from the page (Resume was greyed out, with nothing said,
    # though the run manager takes a higher max steps): Resume is offered, the box named.
    assert out["resume"]["interactive"] is True
    assert f"set {trainactions.RESUME_UNTIL} above 4 and press Resume" in out["message"]
    until = trainactions.RESUME_UNTIL
    for too_few in (0, 3):  # 0: the run's own max steps; the command line's "max steps", renamed
        refused = train.resume_run(ctx.manager, run_id, too_few)
        # what to do next, in the page's terms, shown as information (it was a red error)
        assert refused["kind"] == "info" and refused["run_id"] is None, refused
        assert refused["text"] == (f"Run {run_id} has finished: set {until} above 4 to train it "
                                   "further.")
        message = train.action_message(refused, ctx.manager.status(run_id))
        assert message == render.notice("info", refused["text"])
        assert train.about_another_run(refused, run_id)  # as a refusal: it goes with its run
    resumed = train.resume_run(ctx.manager, run_id, 6)
    assert "from its checkpoint at step 4 towards 6 steps" in resumed["text"]
    status = wait_ended(ctx.manager, run_id)
    assert (status["state"], status["step"]) == ("finished", 6), status


def test_queue_is_offered_while_a_run_is_live_and_says_where_the_run_waits(ctx):
    assert train.button_states(None, any_live=False)["queue"]["interactive"] is False
    assert train.button_states(None, any_live=True)["queue"]["interactive"] is True
    values = {**form_values(TINY), "data": ""}
    action = train.queue_run(ctx.manager, values)
    assert action["kind"] == "ok" and "position 1" in action["text"]
    status = ctx.manager.status(action["run_id"])
    assert status["state"] == "queued"
    assert "starts when the devices are free" in train.action_message(action, status)
    second = train.queue_run(ctx.manager, values)
    assert "position 2" in second["text"]
    with pytest.raises(ConfigError, match="batch_size"):
        train.queue_run(ctx.manager, {**values, "batch_size": 2.5})
    assert ctx.manager.queued() == [action["run_id"], second["run_id"]]


def test_poll_shows_the_knn_chart_once_the_run_has_one(ctx):
    paths = make_run(ctx, state="stopped", step=3)
    write_metrics(paths, range(1, 4))
    first = train.poll(ctx, **poll_args())
    assert first["knn_chart"]["visible"] is False  # no labels: no empty chart beside the loss
    with open(paths.metrics, "a") as handle:
        handle.write(json.dumps({"step": 3, "epoch": 0, "val_loss": 1.2, "knn_top1": 0.75,
                                 "knn_cls_k20_top1": 0.7, "knn_cls_k200_top1": 0.75}) + "\n")
    out = train.poll(ctx, **poll_args(paths.run_id, first["seen_live"], first["sig"]))
    assert out["knn_chart"]["visible"] is True
    rows = out["knn_chart"]["value"].to_dict()["datasets"]["points"]
    assert {(row["kind"], row["value"]) for row in rows} == {("class token, k=20", 0.7),
                                                             ("class token, k=200", 0.75)}
    assert "validation" in {row["kind"] for row in
                            out["chart"].to_dict()["datasets"]["points"]}


@pytest.mark.parametrize("garbage", [
    dict(overlay=-1), dict(overlay=2.5), dict(overlay=True), dict(overlay=["x", 3, None]),
    dict(action={"foo": 1}), dict(action="string"), dict(action=5), dict(action={"kind": "ok"}),
    dict(sig=[1, 2]), dict(run_id=["a"]), dict(seen_live=7), dict(metric=["loss"]),
])
def test_the_live_view_takes_what_an_api_client_sends_as_empty(ctx, garbage):
    """/poll and /select are API endpoints too: a client's -1 for the overlay or {"foo": 1} for the
    last action was an "Internal error in the live view" (TypeError, KeyError)."""
    paths = make_run(ctx)
    out = train.poll(ctx, **{**poll_args(paths.run_id), **garbage})
    assert "sig" in out and 'data-kind="error"' not in str(out.get("message", ""))


def test_a_run_live_in_another_runs_folder_greys_start_and_offers_queue(ctx, tmp_path, stand_ins):
    """Another app's run (its own --runs-dir) held the devices: Start was refused with "stop it, or
    Queue this run to start when it ends" beside a greyed Queue, and nothing on the page said
    why. Now Start is greyed, Queue offered, and the status panel names the run."""
    from mae_core.runs import RunManager

    other = RunManager(tmp_path / "other-app-runs")
    theirs = create_run(TINY.resolved(), runs_dir=other.runs_dir)
    make_live(theirs, stand_ins())
    mine = make_run(ctx, state="finished", step=4)
    first = train.poll(ctx, **poll_args())
    assert first["run_pick"]["value"] == mine.run_id
    assert first["start"]["interactive"] is False and first["queue"]["interactive"] is True
    assert first["resume"]["interactive"] is False
    assert str(theirs.root) in first["status"] and "another runs folder" in first["status"]
    with pytest.raises(RunError, match="Queue this run"):  # what a press of Start would say
        trainactions.start_run(ctx.manager, {**form_values(TINY), "data": ""})
    # Its run over, the buttons come back and the note goes.
    theirs.write_status(state="finished")
    after = train.poll(ctx, **poll_args(mine.run_id, first["seen_live"], first["sig"]))
    assert after["start"]["interactive"] is True and after["queue"]["interactive"] is False
    assert "another runs folder" not in after["status"]
