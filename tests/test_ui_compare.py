"""ui.compare on real run directories (no server): runs side by side with the settings that differ
first and marked, their results, and a run's metrics as CSV that reads back."""

from __future__ import annotations

import csv
import dataclasses
import json

import gradio as gr
import pytest

from mae_core.config import ModelConfig, RunConfig, TrainConfig
from mae_core.rundir import RunPaths, create_run
from ui import compare
from ui.common import AppContext, UserError

TINY = RunConfig(model=ModelConfig(image_size=32, patch_size=8),
                 train=TrainConfig(accelerator="cpu", devices=1, batch_size=4, max_steps=4,
                                   num_workers=0))


def make_run(ctx: AppContext, cfg: RunConfig, losses: list[float], **status) -> RunPaths:
    paths = create_run(cfg.resolved(), runs_dir=ctx.manager.runs_dir)
    paths.write_status(state="finished", step=len(losses), **status)
    with open(paths.metrics, "w") as handle:
        for step, loss in enumerate(losses, start=1):
            handle.write(json.dumps({"step": step, "loss": loss, "images_per_s": 100.0 + step}) + "\n")
        handle.write(json.dumps({"step": len(losses), "epoch_loss": min(losses)}) + "\n")
    return paths


def test_compare_puts_the_differing_settings_first_and_marks_them(ctx):
    a = make_run(ctx, TINY, [1.0, 0.8, 0.6], loss=0.6, mfu=0.25)
    b_cfg = dataclasses.replace(TINY, train=dataclasses.replace(TINY.train, base_lr=3e-4, seed=7))
    b = make_run(ctx, b_cfg, [1.0, 0.9], loss=0.9)
    html = compare.compare_html(ctx, [a.run_id, b.run_id])
    assert html.index(a.run_id) < html.index(b.run_id)
    differing = html[:html.index("settings that are the same")]
    for key in ("train.base_lr", "train.seed"):
        assert f'class="differs" data-key="{key}"' in differing
    assert 'data-key="model.preset"' not in differing  # the same in both: folded away
    assert 'data-key="model.preset"' in html
    assert "settings that differ (2)" in html
    assert "25.0%" in html  # MFU where the run reported it
    assert "0.6" in html and "0.9" in html  # best epoch losses


def test_compare_needs_two_runs_and_refuses_unknown_ones(ctx):
    a = make_run(ctx, TINY, [1.0])
    with pytest.raises(UserError, match="two or more"):
        compare.compare_html(ctx, [a.run_id])
    with pytest.raises(Exception, match="no run named"):
        compare.compare_html(ctx, [a.run_id, "../etc"])
    # Alone, an unknown id was "Only `<it, whole>` is chosen: pick two or more".
    for unknown in ("../etc", "x" * 5000):
        with pytest.raises(Exception, match="no run named") as err:
            compare.compare_html(ctx, [unknown])
        assert len(str(err.value)) < 300


def test_metrics_download_as_csv_reads_back(ctx):
    a = make_run(ctx, TINY, [1.0, 0.8, 0.6])
    path = compare.metrics_csv(ctx, a.run_id)
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["step"] for r in rows] == ["1", "2", "3", "3"]
    assert [float(r["loss"]) for r in rows[:3]] == [1.0, 0.8, 0.6]
    assert rows[3]["loss"] == "" and float(rows[3]["epoch_loss"]) == 0.6
    with pytest.raises(UserError):
        compare.metrics_csv(ctx, None)


def test_compare_shows_each_runs_saved_evaluation(ctx):
    a = make_run(ctx, TINY, [1.0, 0.8])
    b = make_run(ctx, TINY, [1.0, 0.9])
    (a.root / "evaluation.json").write_text(json.dumps(
        {"trained": {"knn_top1": 71.0}, "random_init": {"knn_top1": 63.0}}))
    assert compare.run_results(ctx, a.run_id)["kNN top-1 % (pretrained / random init)"] == \
        "71.0 / 63.0 (+8.0)"
    assert compare.run_results(ctx, b.run_id)["kNN top-1 % (pretrained / random init)"] == "–"
    assert "71.0 / 63.0 (+8.0)" in compare.compare_html(ctx, [a.run_id, b.run_id])


def test_a_damaged_saved_evaluation_reads_as_none_in_compare(ctx):
    """A figure saved as text ("71") made Compare raise "Unknown format code 'f'"."""
    a = make_run(ctx, TINY, [1.0, 0.8])
    b = make_run(ctx, TINY, [1.0, 0.9])
    (a.root / "evaluation.json").write_text(json.dumps(
        {"trained": {"knn_top1": "71"}, "random_init": {"knn_top1": 63.0}}))
    (b.root / "evaluation.json").write_text(json.dumps({"note": 1}))
    for run_id in (a.run_id, b.run_id):
        assert compare.run_results(ctx, run_id)["kNN top-1 % (pretrained / random init)"] == "–"
    assert a.run_id in compare.compare_html(ctx, [a.run_id, b.run_id])


def test_compare_pressed_with_no_runs_says_what_to_do(ctx):
    """The Compare button with nothing chosen: the message names the field and the next step."""
    with gr.Blocks() as demo:
        c = compare.build(ctx, gr.Dropdown(allow_custom_value=True))
    on_compare = next(f.fn for f in demo.fns.values() if f.api_name == "compare")
    for nothing in ([], None, [""]):
        message = on_compare(nothing)[c["message"]]
        assert 'data-kind="error"' in message
        assert "No runs chosen" in message and "two or more" in message
        assert "runs to compare" in message and "press Compare" in message
    a = make_run(ctx, TINY, [1.0])
    message = on_compare([a.run_id])[c["message"]]
    assert f"<code>{a.run_id}</code>" in message and "two or more" in message
