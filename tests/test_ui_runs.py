"""ui.runs' handlers on real run directories (no server): the table names a live run's loss for what
it is, Delete is never offered for a live run and asks first, and the export loads into timm."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

from mae_core import display
from mae_core.config import ConfigError, ModelConfig, RunConfig, TrainConfig
from mae_core.evaljobs import EvaluationJob, Evaluations
from mae_core.fileio import atomic_write_json
from mae_core.model import MaskedAutoencoder
from mae_core.process import process_record
from mae_core.rundir import RunPaths, create_run
from mae_core.runs import RunError
from mae_core.weights import save_weights
from ui import evaluation, runs
from ui.common import AppContext, UserError

MODEL = ModelConfig(image_size=32, patch_size=8)
TINY = RunConfig(model=MODEL, train=TrainConfig(accelerator="cpu", devices=1, batch_size=4,
                                                max_steps=4, num_workers=0))


def make_run(ctx: AppContext, state: str = "stopped", **status) -> RunPaths:
    paths = create_run(TINY.resolved(), runs_dir=ctx.manager.runs_dir)
    paths.write_status(state=state, **status)
    time.sleep(0.01)
    return paths


def make_live(paths: RunPaths, process: subprocess.Popen, **status) -> None:
    atomic_write_json(paths.process, process_record(process.pid))
    paths.write_status(state="running", **status)


def test_the_runs_table_columns_have_fixed_pixel_widths():
    """Shares of the page broke "finished" and "ddp-clean" mid-word at 800 px: fixed widths keep
    words whole (the table scrolls sideways in its frame) and still fit a 1440 px page."""
    assert len(runs.COLUMN_WIDTHS) == len(runs.HEADERS)
    pixels = [int(w.removesuffix("px")) for w in runs.COLUMN_WIDTHS
              if w.endswith("px") and w.removesuffix("px").isdigit()]
    assert len(pixels) == len(runs.COLUMN_WIDTHS), runs.COLUMN_WIDTHS
    assert all(p >= 80 for p in pixels)
    assert pixels[runs.HEADERS.index("run")] >= 200
    assert sum(pixels) <= 1214  # the table's frame on a 1440 px page


def test_a_live_runs_loss_is_marked_live(ctx, stand_in):
    done = make_run(ctx, "finished", step=4, total_steps=4, loss=0.4321, elapsed_s=75)
    with open(done.metrics, "w") as handle:
        handle.write(json.dumps({"step": 4, "loss": 0.4321}) + "\n")
        handle.write(json.dumps({"step": 4, "epoch": 0, "epoch_loss": 0.55}) + "\n")
    live = make_run(ctx, "starting")
    make_live(live, stand_in, step=2, total_steps=4, loss=0.91234)
    assert "last logged" in runs.HEADERS[runs.HEADERS.index("loss (last logged)")]
    table = runs.table_rows(ctx, ctx.manager.list())
    rows = {row[0]: dict(zip(runs.HEADERS, row, strict=True)) for row in table}
    assert rows[live.run_id]["loss (last logged)"] == "0.9123 (live)"
    assert rows[live.run_id]["state"] == "running" and rows[live.run_id]["steps"] == "2 / 4"
    assert rows[done.run_id]["loss (last logged)"] == "0.4321"  # a finished run's last loss
    assert rows[done.run_id]["epoch loss (last)"] == "0.55"
    assert rows[done.run_id]["duration"] == "1 min 15 s"
    assert re.fullmatch(r"[\d,]+ KB", rows[done.run_id]["disk"])  # what deleting it would free
    assert rows[done.run_id]["policy"] == "ddp-clean" and rows[done.run_id]["preset"] == "vit-tiny"
    assert rows[live.run_id]["epoch loss (last)"] == "–"


def test_a_live_run_without_a_loss_yet_says_nothing_live(ctx, stand_in):
    live = make_run(ctx, "starting")
    make_live(live, stand_in, step=0)
    [row] = runs.table_rows(ctx, ctx.manager.list())
    assert row[3] == "–"


def test_delete_is_offered_only_for_a_run_that_is_not_live(ctx, stand_in):
    stopped = make_run(ctx, "stopped", step=3)
    live = make_run(ctx, "starting")
    make_live(live, stand_in)
    out = runs.refresh(ctx, live.run_id, None)
    assert out["pick"]["value"] == live.run_id
    assert set(out["pick"]["choices"]) == {live.run_id, stopped.run_id}
    assert out["delete"]["interactive"] is False
    table = out["table"]  # the rows, or an update holding them
    assert len(table["value"] if isinstance(table, dict) else table) == 2
    out = runs.refresh(ctx, stopped.run_id, out["sig"])
    assert out["delete"]["interactive"] is True
    idle = runs.refresh(ctx, stopped.run_id, out["sig"])
    assert set(idle) == {"sig"}  # nothing changed: nothing sent
    # The live run picked again, then it ends: Delete becomes possible for it.
    out = runs.refresh(ctx, live.run_id, idle["sig"])
    assert out["delete"]["interactive"] is False
    live.write_status(state="stopped", step=2)
    out = runs.refresh(ctx, live.run_id, out["sig"])
    assert out["delete"]["interactive"] is True and "table" in out


def test_refresh_with_no_runs_or_a_vanished_pick(ctx):
    out = runs.refresh(ctx, None, None)
    assert out["pick"]["value"] is None and out["delete"]["interactive"] is False
    # An empty grid said nothing: it says, right under it, that there are no runs yet and where
    # they are looked for (the panel below the buttons, ~300 px lower, was missed).
    assert f"No runs in <code>{ctx.manager.runs_dir}</code> yet" in out["empty"]
    assert out["evaluation"] == ""
    paths = make_run(ctx)
    out = runs.refresh(ctx, "deleted-meanwhile", out["sig"])
    assert out["pick"]["value"] == paths.run_id
    assert out["empty"] == "" and "No runs" not in out["evaluation"]
    assert "empty" not in runs.refresh(ctx, paths.run_id, out["sig"])  # said once, not re-sent


def test_buttons_that_could_only_refuse_are_greyed_out(ctx, tmp_path):
    """Sooner and Later were enabled for a finished run (then said "not queued"), and for the
    only queued run (Sooner for the first, Later for the last, too); Open, Export and Evaluate
    with no run at all, and Evaluate for a run with no weights yet (a queued one)."""
    def usable(out):
        return {name for name in ("open", "export", "evaluate", "delete", "sooner", "later")
                if out[name]["interactive"]}

    assert usable(runs.refresh(ctx, None, None)) == set()  # no run
    finished = make_run(ctx, "finished", step=4)
    assert usable(runs.refresh(ctx, finished.run_id, None)) == {"open", "delete"}
    weights = tmp_path / "model.safetensors"
    save_weights(MaskedAutoencoder(MODEL), weights, step=4)
    finished.weights.write_bytes(weights.read_bytes())
    assert usable(runs.refresh(ctx, finished.run_id, None)) == {"open", "export", "evaluate",
                                                                "delete"}
    queued = make_run(ctx, "queued")
    assert usable(runs.refresh(ctx, queued.run_id, None)) == {"open", "delete"}  # the only one
    behind = make_run(ctx, "queued")
    assert ctx.manager.queued() == [queued.run_id, behind.run_id]
    assert usable(runs.refresh(ctx, behind.run_id, None)) == {"open", "delete", "sooner"}
    out = runs.refresh(ctx, queued.run_id, None)
    assert usable(out) == {"open", "delete", "later"}
    back = runs.refresh(ctx, finished.run_id, out["sig"])  # only what changed is sent
    assert {name: update["interactive"] for name, update in back.items()
            if name in ("export", "evaluate", "later")} == {"export": True, "evaluate": True,
                                                            "later": False}
    assert "open" not in back and "delete" not in back
    # The handlers still refuse in words: an API client can press any of them.
    with pytest.raises(RunError, match="not queued"):
        runs.move_in_queue(ctx, finished.run_id, -1)
    with pytest.raises(UserError, match="Choose a run"):
        runs.export_run(ctx, None)


def test_delete_asks_first_then_deletes(ctx):
    keep = make_run(ctx, "finished", step=4)
    doomed = make_run(ctx, "stopped", step=2)
    with pytest.raises(UserError, match="Tick"):
        runs.delete_run(ctx, doomed.run_id, False)
    assert doomed.root.exists() and doomed.config.exists()
    with pytest.raises(UserError, match="Choose a run"):
        runs.delete_run(ctx, None, True)
    message = runs.delete_run(ctx, doomed.run_id, True)
    assert doomed.run_id in message and not doomed.root.exists()
    assert [s["run_id"] for s in ctx.manager.list()] == [keep.run_id]


def test_a_live_run_is_not_deleted_even_when_ticked(ctx, stand_in):
    live = make_run(ctx, "starting")
    make_live(live, stand_in)
    with pytest.raises(RunError, match="stop it before deleting"):
        runs.delete_run(ctx, live.run_id, True)
    assert live.root.exists()


def test_delete_refuses_a_path_as_run_id(ctx, tmp_path):
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "config.yaml").write_text("model: {}\n")
    with pytest.raises(RunError):
        runs.delete_run(ctx, "../precious", True)
    assert outside.exists()


def test_export_writes_an_encoder_timm_loads(ctx):
    paths = make_run(ctx, "finished", step=5)
    torch.manual_seed(0)
    model = MaskedAutoencoder(MODEL)
    save_weights(model, paths.weights, step=5)
    file, snippet, message = runs.export_run(ctx, paths.run_id)
    assert Path(file).is_file() and paths.run_id in message
    vit = timm.create_model(MODEL.preset_spec.timm_name, pretrained=False, num_classes=0,
                            img_size=32, patch_size=8)
    state = load_file(file)
    vit.load_state_dict(state)  # strict: every encoder tensor, nothing else
    trained = model.state_dict()["backbone.vit.blocks.0.attn.qkv.weight"]
    assert torch.equal(vit.state_dict()["blocks.0.attn.qkv.weight"], trained)
    with torch.no_grad():
        assert vit(torch.zeros(1, 3, 32, 32)).shape == (1, 192)
    # The snippet shown beside the file runs as given (it fine-tunes with a fresh 10-class head).
    exec(compile(snippet, "snippet", "exec"), {})


def test_export_refusals(ctx):
    no_weights = make_run(ctx, "failed")
    with pytest.raises(RunError, match="no saved weights"):
        runs.export_run(ctx, no_weights.run_id)
    with pytest.raises(UserError, match="Choose a run"):
        runs.export_run(ctx, None)
    # A config it cannot read is refused before the encoder file is written, not after.
    broken = make_run(ctx, "finished", step=5)
    save_weights(MaskedAutoencoder(MODEL), broken.weights, step=5)
    broken.config.write_text("model: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        runs.export_run(ctx, broken.run_id)
    assert not broken.encoder.exists()


def test_queued_runs_show_their_place_and_move(ctx):
    from ui.common import form_values
    from ui.trainactions import queue_run

    values = {**form_values(TINY), "data": ""}
    first = queue_run(ctx.manager, values)["run_id"]
    second = queue_run(ctx.manager, values)["run_id"]
    states = {row[0]: row[1] for row in runs.table_rows(ctx, ctx.manager.list())}
    assert states == {first: "queued (#1)", second: "queued (#2)"}
    assert "number 1" in runs.move_in_queue(ctx, second, -1)
    states = {row[0]: row[1] for row in runs.table_rows(ctx, ctx.manager.list())}
    assert states == {first: "queued (#2)", second: "queued (#1)"}
    with pytest.raises(UserError):
        runs.move_in_queue(ctx, None, 1)


def _labelled(root: Path) -> Path:
    """Two classes a random encoder tells apart: dark and bright images with a little noise."""
    generator = torch.Generator().manual_seed(0)
    for name, level in (("dark", 40), ("bright", 210)):
        (root / name).mkdir(parents=True)
        for i in range(8):
            pixels = (level + 30 * torch.rand(40, 40, 3, generator=generator)).byte().numpy()
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def test_evaluate_reports_progress_then_the_table_and_the_runs_table_shows_it(ctx, tmp_path):
    paths = make_run(ctx, "finished", step=4)
    torch.manual_seed(0)
    save_weights(MaskedAutoencoder(MODEL), paths.weights, step=4)
    [row] = runs.table_rows(ctx, ctx.manager.list())
    knn = runs.HEADERS.index("kNN top-1 % (pretrained / random init)")
    assert row[knn] == "–"  # not evaluated yet
    before = runs.refresh(ctx, paths.run_id, None)
    assert before["evaluation"] == ""
    updates = list(evaluation.evaluation_updates(ctx, Evaluations(), paths.run_id,
                                           f"  {_labelled(tmp_path / 'set')}  ", True, poll_s=0.01))
    assert all("Evaluating" in u["message"] for u in updates[:-1])
    last = updates[-1]
    assert re.search(r"kNN top-1 [\d.]+% pretrained against [\d.]+% at random init \([+-][\d.]+ "
                     r"points; p = [\d.e-]+, (more than chance|within chance on these images)\)",
                     last["message"]) and 'data-kind="ok"' in last["message"]
    assert "exact McNemar" in last["evaluation"]
    assert "linear probe top-1" in last["evaluation"] and "random init" in last["evaluation"]
    saved = json.loads((paths.root / "evaluation.json").read_text())
    trained, random_init = saved["trained"]["knn_top1"], saved["random_init"]["knn_top1"]
    [row] = runs.table_rows(ctx, ctx.manager.list())
    assert row[knn] == f"{trained:.1f} / {random_init:.1f} ({trained - random_init:+.1f})"
    after = runs.refresh(ctx, paths.run_id, before["sig"])
    assert "evaluation-result" in after["evaluation"] and "table" in after
    assert f"<caption>Evaluation of run {paths.run_id}</caption>" in after["evaluation"]
    assert "evaluation" not in runs.refresh(ctx, paths.run_id, after["sig"])  # unchanged


def test_evaluate_refusals_reach_the_page_as_messages(ctx, tmp_path):
    from mae_core.data import DataError

    evaluations = Evaluations()
    with pytest.raises(UserError, match="Choose a run"):
        next(evaluation.evaluation_updates(ctx, evaluations, None, "", False))
    with pytest.raises(RunError):
        next(evaluation.evaluation_updates(ctx, evaluations, "../elsewhere", "", False))
    paths = make_run(ctx, "failed")
    with pytest.raises(RunError, match="no saved weights yet"):
        list(evaluation.evaluation_updates(ctx, evaluations, paths.run_id, "", False, poll_s=0.01))
    save_weights(MaskedAutoencoder(MODEL), paths.weights, step=1)
    (tmp_path / "flat").mkdir()
    with pytest.raises(DataError, match="no class subfolders"):
        list(evaluation.evaluation_updates(ctx, evaluations, paths.run_id, str(tmp_path / "flat"),
                                     False, poll_s=0.01))
    evaluations.current = EvaluationJob("someone-else")  # still running
    with pytest.raises(UserError, match="someone-else"):
        next(evaluation.evaluation_updates(ctx, evaluations, paths.run_id, "", False))
    assert not (paths.root / "evaluation.json").exists()


@pytest.fixture
def slow_evaluation(monkeypatch):
    """evaluate_run stood in by one that reports progress and waits until ``release`` is set."""
    import threading

    release = threading.Event()

    def evaluate_run(run_dir, data=None, linear_probe=False, progress=None):
        progress(0.4, "embedding the bank")
        if not release.wait(30):
            raise TimeoutError("the test never released the evaluation")
        return {"seconds": 1.5, "trained": {"knn_top1": 62.3}, "random_init": {"knn_top1": 50.0},
                "delta": {"knn_top1": 12.3}}

    monkeypatch.setattr("mae_core.evaluate.evaluate_run", evaluate_run)
    yield release
    release.set()


def test_a_reloaded_page_follows_the_running_evaluation_and_a_second_press_waits(
        ctx, slow_evaluation):
    """A reload lost the progress (the message line stayed empty while the job ran on), and an
    Evaluate pressed for another run meanwhile went unanswered."""
    first, second = make_run(ctx), make_run(ctx)
    evaluations = Evaluations()
    pressed = evaluation.evaluation_updates(ctx, evaluations, first.run_id, "", False, poll_s=0.01)
    assert "Evaluating" in next(pressed)["message"]
    reloaded = runs.refresh(ctx, None, None, evaluations)  # a fresh page: no sig yet
    progress = f"Evaluating <code>{first.run_id}</code>: embedding the bank (40%)"
    assert progress in reloaded["message"]
    assert "message" not in runs.refresh(ctx, None, reloaded["sig"], evaluations)  # unchanged

    with pytest.raises(UserError, match=f"{first.run_id}.*wait until it ends"):
        next(evaluation.evaluation_updates(ctx, evaluations, second.run_id, "", False))
    waiting = runs.refresh(ctx, None, reloaded["sig"], evaluations)["message"]
    assert 'data-kind="warn"' in waiting and f"<code>{second.run_id}</code> waits" in waiting
    assert waiting == next(pressed)["message"]  # the first press's progress keeps saying so

    slow_evaluation.set()
    ended = runs.refresh(ctx, None, reloaded["sig"], evaluations)
    while "Evaluated" not in ended.get("message", ""):
        time.sleep(0.01)
        ended = runs.refresh(ctx, None, ended["sig"], evaluations)
    assert "kNN top-1 62.3% pretrained against 50.0% at random init (+12.3 points)" in \
        ended["message"] and 'data-kind="ok"' in ended["message"]
    assert "message" not in runs.refresh(ctx, None, ended["sig"], evaluations)  # said once
    assert "message" not in runs.refresh(ctx, None, None, evaluations)  # not to a later page


def test_an_evaluate_press_is_answered_while_one_runs(ctx):
    """Gradio's default trigger mode dropped a press made while the last one's event ran (and a
    concurrency limit would queue it behind a whole evaluation): the page said nothing."""
    from ui.blocks import build_app

    demo = build_app(ctx.manager)
    [evaluate] = [f for f in demo.fns.values() if f.api_name == "evaluate_run"]
    assert evaluate.trigger_mode == "multiple" and evaluate.concurrency_limit is None


def test_the_table_names_each_runs_data_set(ctx, tmp_path):
    from mae_core.rundir import RUN_DATA_NAME

    queued = make_run(ctx, "queued", data_files=17)  # not started: the config's folder
    memory = make_run(ctx, "finished")
    atomic_write_json(memory.root / RUN_DATA_NAME, {"kind": "memory", "path": "", "source": "",
                                                    "files": 17})
    cached = make_run(ctx, "finished")
    atomic_write_json(cached.root / RUN_DATA_NAME, {
        "kind": "prepared", "path": "/cache/photos-abc", "source": "/data/photos", "files": 20001,
        "count": 20000, "skipped": 1})
    given = make_run(ctx, "finished")
    atomic_write_json(given.root / RUN_DATA_NAME, {"kind": "prepared", "path": "/data/prep",
                                                   "source": "/data/prep", "count": 5000})
    remote = make_run(ctx, "finished")
    atomic_write_json(remote.root / RUN_DATA_NAME, {"kind": "remote", "path": "s3://b/p",
                                                    "source": "s3://b/p"})
    cells = {row[0]: dict(zip(runs.HEADERS, row, strict=True))["data"]
             for row in runs.table_rows(ctx, ctx.manager.list())}
    assert cells[queued.run_id] == "sample photos (17 files found)"
    assert cells[memory.run_id] == "sample photos (17 images, in memory)"
    assert cells[cached.run_id] == "/data/photos (20,000 images, prepared)"
    assert cells[given.run_id] == "/data/prep (5,000 images, prepared)"
    assert cells[remote.run_id] == "s3://b/p (remote, streamed)"


def test_the_data_cache_panel_lists_sets_and_removes_only_superseded_ones_no_run_uses(
        ctx, tmp_path, monkeypatch):
    """A folder prepared twice (a file added): the old set is listed as superseded; while a run's
    data.json names it, Remove keeps it; once no run does, Remove frees it and keeps the newest."""
    import numpy as np

    from mae_core import prepared
    from mae_core.rundir import RUN_DATA_NAME
    from ui import datacache

    monkeypatch.setenv(prepared.CACHE_ENV, str(tmp_path / "cache"))
    assert "holds no prepared set" in datacache.cache_listing(ctx)[0]
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        pixels = np.random.default_rng(i).integers(0, 255, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(photos / f"{i}.jpg")
    old = prepared.prepare_cached(str(photos), workers=1)
    Image.fromarray(np.zeros((40, 48, 3), dtype=np.uint8)).save(photos / "added.jpg")
    new = prepared.prepare_cached(str(photos), workers=1)
    run = ctx.manager.runs_dir / "stopped-run"
    run.mkdir(parents=True)
    atomic_write_json(run / RUN_DATA_NAME, {"kind": "prepared", "path": str(old)})
    listing = datacache.cache_listing(ctx)[0]
    assert listing.count("<tr><td") == 2 and "superseded" in listing and "stopped-run" in listing
    assert "0 superseded and used by no run" in listing
    assert datacache.cache_listing(ctx)[1] is False  # Remove stays greyed: nothing to remove
    assert datacache.remove_superseded(ctx).startswith("Nothing removed")
    assert old.is_dir() and new.is_dir()
    (run / RUN_DATA_NAME).unlink()  # the run was deleted
    assert "1 superseded and used by no run" in datacache.cache_listing(ctx)[0]
    assert datacache.cache_listing(ctx)[1] is True
    assert datacache.remove_superseded(ctx).startswith("Removed 1 superseded set(s)")
    assert not old.exists() and new.is_dir()
    assert datacache.cache_listing(ctx)[0].count("<tr><td") == 1
    assert datacache.cache_listing(ctx)[1] is False


def test_a_damaged_data_record_costs_its_own_cell_only(ctx):
    """A data.json with ``"count": "many"`` (copied from a damaged manifest) made the Runs table
    fail for every run (``{count:,}``); -5 and 1e400 showed as "-5 images" and "inf images". Now
    such a count is unknown, a record naming no data set falls back to the config's folder, and
    the table and refresh serve every run."""
    from mae_core.rundir import RUN_DATA_NAME

    good = make_run(ctx, "finished")
    atomic_write_json(good.root / RUN_DATA_NAME, {"kind": "prepared", "path": "/data/prep",
                                                  "source": "/data/prep", "count": 5000})
    base = {"kind": "prepared", "path": "/cache/p", "source": "/data/photos"}
    bad = {}
    for count in ("many", -5, float("inf"), 2.5, [3], True):
        run = make_run(ctx, "finished")
        atomic_write_json(run.root / RUN_DATA_NAME, {**base, "count": count, "files": "x"})
        bad[run.run_id] = "/data/photos (images: ?, prepared)"
    for record in ({**base, "kind": 5}, {**base, "source": ["a"]}, [1, 2]):
        run = make_run(ctx, "finished", data_files="many")
        atomic_write_json(run.root / RUN_DATA_NAME, record)
        bad[run.run_id] = "sample photos"  # the config's folder (TINY trains on the samples)
    out = runs.refresh(ctx, None, None)
    table = out["table"]
    rows = table["value"] if isinstance(table, dict) else table
    cells = {row[0]: dict(zip(runs.HEADERS, row, strict=True))["data"] for row in rows}
    assert cells == {good.run_id: "/data/prep (5,000 images, prepared)", **bad}


def test_the_data_cache_panel_shows_and_removes_around_a_damaged_entry(ctx, tmp_path, monkeypatch):
    """One damaged entry (a count that is no number, a source that is a list, a run note that is
    no note) broke Show and Remove for the whole cache; now it is a row that says "damaged"."""
    from mae_core import prepared
    from ui import datacache

    cache = tmp_path / "cache"
    monkeypatch.setenv(prepared.CACHE_ENV, str(cache))
    for name, fields in (("count-x", {"count": "x"}), ("listed", {"source": ["a"]})):
        (cache / name).mkdir(parents=True)
        (cache / name / prepared.MANIFEST_NAME).write_text(json.dumps({"format": 2, **fields}))
        (cache / f"{name}.runs").mkdir()
        (cache / f"{name}.runs" / "note.json").write_text('{"run": 5}')
    (cache / "listed.runs" / "list.json").write_text("[1]")
    listing = datacache.cache_listing(ctx)[0]
    assert listing.count("<tr><td") == 2 and listing.count("damaged: its mae_manifest.json") == 2
    assert "records count &#x27;x&#x27;, not a whole number" in listing  # (escaped)
    assert "2 damaged: kept, not read" in listing
    assert datacache.remove_superseded(ctx).startswith("Nothing removed")
    assert (cache / "count-x").is_dir() and (cache / "listed").is_dir()


@pytest.mark.parametrize("saved", [
    {"note": 1},  # KeyError: 'trained'
    {"trained": {"knn_top1": "71"}, "random_init": {"knn_top1": 63.0}},  # Unknown format code 'f'
])
def test_a_damaged_saved_evaluation_reads_as_not_evaluated(ctx, saved):
    """The runs list said "Internal error in the runs list" for a partial or hand-edited
    evaluation.json; it shows the run as not evaluated."""
    paths = make_run(ctx, "finished", step=4)
    (paths.root / "evaluation.json").write_text(json.dumps(saved))
    [row] = runs.table_rows(ctx, ctx.manager.list())
    assert row[runs.HEADERS.index("kNN top-1 % (pretrained / random init)")] == "–"
    assert runs.refresh(ctx, paths.run_id, None)["evaluation"] == ""
    assert evaluation.evaluation_html(saved, "r1") == ""


def test_a_saved_evaluation_without_its_delta_shows_the_delta_derived(ctx):
    """Without "delta" the result table raised KeyError: 'delta'; the delta is derived from the
    figures, and the metrics the file lacks show as unknown."""
    paths = make_run(ctx, "finished", step=4)
    (paths.root / "evaluation.json").write_text(json.dumps(
        {"trained": {"knn_top1": 71.0}, "random_init": {"knn_top1": 63.0}, "k": "<b>20</b>"}))
    [row] = runs.table_rows(ctx, ctx.manager.list())
    assert row[runs.HEADERS.index("kNN top-1 % (pretrained / random init)")] == "71.0 / 63.0 (+8.0)"
    shown = runs.refresh(ctx, paths.run_id, None)["evaluation"]
    assert "<td>71.0</td><td>63.0</td><td>+8.0</td>" in shown
    assert "<td>linear probe top-1</td><td>–</td><td>–</td><td>–</td>" in shown
    assert "<b>20</b>" not in shown and "&lt;b&gt;20&lt;/b&gt;" in shown  # escaped: no markup


def test_a_run_folder_that_lost_its_config_is_listed_to_be_deleted(ctx, stand_in, monkeypatch):
    """A kill between a new run's mkdir and its config.yaml, or the file deleted by hand, left a
    folder no listing showed: it held its disk, and the app could not delete it."""
    kept = make_run(ctx, "finished", step=4)
    lost = make_run(ctx, "stopped", step=2)
    lost.last_ckpt.write_bytes(os.urandom(300_000))  # incompressible: 300 KB on any disk
    lost.config.unlink()
    killed_after_mkdir = ctx.manager.runs_dir / "20261130-101010-vit-tiny-ddp-clean"
    killed_after_mkdir.mkdir()
    mine = ctx.manager.runs_dir / "my-notes"  # the user's own folder: not ours to list or delete
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    (ctx.manager.runs_dir / "backup").mkdir()  # empty, and yours: not a run killed at its mkdir
    young = make_run(ctx, "starting")  # still being made, for all a reader knows
    young.config.unlink()
    minutes_ago = time.time() - 120
    for folder in (lost.root, killed_after_mkdir, mine, ctx.manager.runs_dir / "backup"):
        os.utime(folder, (minutes_ago, minutes_ago))

    out = runs.refresh(ctx, lost.run_id, None)
    damaged = {lost.run_id, killed_after_mkdir.name}
    assert set(out["pick"]["choices"]) == {kept.run_id} | damaged
    assert out["pick"]["value"] == lost.run_id
    assert set(out["compare_runs"]["choices"]) == {kept.run_id}  # nothing there to compare
    rows = {row[0]: row for row in out["table"]}
    assert set(rows) == {kept.run_id} | damaged
    assert rows[lost.run_id][1] == "damaged" and "config.yaml" in rows[lost.run_id][-1]
    assert re.fullmatch(r"30\d KB", rows[lost.run_id][runs.HEADERS.index("disk")])  # to free
    # Its size is walked again only when the folder changes (it was at every 5 s refresh).
    walked = []
    real_size = runs.folder_size
    monkeypatch.setattr(runs, "folder_size", lambda root: walked.append(root) or real_size(root))
    assert runs.refresh(ctx, lost.run_id, None)["table"] == out["table"] and walked == []
    (lost.root / "train.log").write_text("x" * 20_000)
    os.utime(lost.root, (minutes_ago, minutes_ago))  # still no run being made
    rows = {row[0]: row for row in runs.refresh(ctx, lost.run_id, None)["table"]}
    assert walked == [lost.root]
    assert re.fullmatch(r"3[23]\d KB", rows[lost.run_id][runs.HEADERS.index("disk")])
    assert "config.yaml is missing" in out["evaluation"] and lost.run_id in out["evaluation"]
    assert {name for name in ("open", "export", "evaluate", "delete", "sooner", "later")
            if out[name]["interactive"]} == {"delete"}
    assert [s["run_id"] for s in ctx.manager.list()] == [kept.run_id]  # no run to the other tabs

    # Its trainer still alive (the file deleted under a live run): refused, saying what to do.
    atomic_write_json(lost.process, process_record(stand_in.pid))
    os.utime(lost.root, (minutes_ago, minutes_ago))
    with pytest.raises(RunError, match=rf"pid {stand_in.pid}\) still runs.*progress save"):
        runs.delete_run(ctx, lost.run_id, True)
    assert lost.last_ckpt.exists()
    lost.process.unlink()
    os.utime(lost.root, (minutes_ago, minutes_ago))

    for folder in damaged:
        assert folder in runs.delete_run(ctx, folder, True)
    assert not lost.root.exists() and not killed_after_mkdir.exists()
    with pytest.raises(RunError, match="no run named"):
        runs.delete_run(ctx, "my-notes", True)
    assert (mine / "notes.txt").read_text() == "keep me" and young.root.exists()
    assert (ctx.manager.runs_dir / "backup").is_dir()
    out = runs.refresh(ctx, None, out["sig"])
    assert out["pick"]["choices"] == [kept.run_id]


def test_the_runs_table_reads_a_runs_files_again_only_once_they_change(ctx):
    """Past the 64 metrics readers the app keeps, every 5 s refresh of every open page parsed
    every run's whole metrics.jsonl again (11 s of a core for 300 runs). A run's file cells are
    read again when its folder changes, and only that run's, however many runs there are (the
    old table asked the store at every refresh for every run, so a few runs show it)."""
    made = [make_run(ctx, "finished", step=4) for _ in range(6)]
    for i, paths in enumerate(made):
        paths.metrics.write_text(json.dumps({"step": 4, "epoch_loss": 0.5 + i / 1000}) + "\n")
    read = []
    real_reader = ctx.metrics.reader
    ctx.metrics.reader = lambda path: read.append(path) or real_reader(path)
    out = runs.refresh(ctx, None, None)
    assert len(read) == 6
    rows = {row[0]: row for row in out["table"]}
    assert rows[made[3].run_id][4] == display.format_number(0.503)
    read.clear()
    assert set(runs.refresh(ctx, None, out["sig"])) == {"sig"} and read == []
    # One run's files change: that run, and only it, is read again, and its row shows it.
    with made[3].metrics.open("a") as handle:
        handle.write(json.dumps({"step": 8, "epoch_loss": 0.25}) + "\n")
    out = runs.refresh(ctx, None, out["sig"])
    assert read == [made[3].metrics]
    assert {row[0]: row for row in out["table"]}[made[3].run_id][4] == display.format_number(0.25)
    runs.delete_run(ctx, made[0].run_id, True)  # a deleted run's cells go with it
    runs.refresh(ctx, None, out["sig"])
    assert made[0].root not in ctx.run_cells and len(ctx.run_cells) == 5
