"""mae_core.monitor: the held-out split, the evaluation plan, lightly's kNN scoring, and a real
two-process gloo DDP run whose validation loss and kNN accuracy are checked against the same
numbers computed here, in one process, from the run's final weights."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mae_core.config import AUTO_VAL_MIN_IMAGES, RunConfig, TrainConfig
from mae_core.data import DataError, find_images
from mae_core.splits import MIN_HELD_OUT, fixed_crops, split_folder
from mae_core.model import draw_token_mask, seeded_generator
from mae_core.monitor import (KNN_K, VAL_MASK_SEED, EvalPlan, embed, knn_scores,
                              no_evaluation_note, plan_evaluation)
from mae_core.rundir import RunPaths
from mae_core.weights import load_model

PER_CLASS = 20
VAL_COUNT = 8
EVAL_EVERY = 6
MAX_STEPS = 12
RUN = ["--devices", "2", "--accelerator", "cpu", "--image-size", "32", "--patch-size", "8",
       "--batch-size", "8", "--max-steps", str(MAX_STEPS), "--num-previews", "0",
       "--precision", "32-true", "--eval-every-n-steps", str(EVAL_EVERY)]


def labelled_folder(root: Path, per_class: int = PER_CLASS, flat: bool = False) -> Path:
    """Two visually different classes (reddish horizontal stripes, bluish vertical ones) in
    ``root/<class>/``; ``flat`` puts the same images directly in ``root`` (no labels)."""
    rng = np.random.default_rng(0)
    for name, colour, axis in (("reds", (200, 40, 40), 0), ("blues", (40, 60, 200), 1)):
        folder = root if flat else root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, (40, 40, 3)) + np.array(colour)
            stripes = (np.arange(40) // (3 + i % 3)) % 2 * 60
            pixels += stripes[:, None, None] if axis == 0 else stripes[None, :, None]
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
                folder / f"{name}-{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    return labelled_folder(tmp_path_factory.mktemp("labelled"))


# --- the split ----------------------------------------------------------------------------------

def test_split_is_deterministic_disjoint_and_complete(labelled):
    first = split_folder(str(labelled), seed=3, count=VAL_COUNT)
    assert first == split_folder(str(labelled), seed=3, count=VAL_COUNT)  # every rank agrees
    assert len(first.held_out) == VAL_COUNT
    assert not set(first.train) & set(first.held_out)
    assert sorted(first.train + first.held_out) == find_images(str(labelled))
    assert first.classes == ("blues", "reds")
    for paths, labels in ((first.train, first.train_labels), (first.held_out, first.held_out_labels)):
        assert [first.classes[label] for label in labels] == [Path(p).parent.name for p in paths]
    other = split_folder(str(labelled), seed=4, count=VAL_COUNT)
    assert set(other.held_out) != set(first.held_out)  # the seed chooses the held-out images


def test_split_sizes_fraction_auto_and_refusals(labelled, tmp_path):
    total = 2 * PER_CLASS
    assert len(split_folder(str(labelled), fraction=0.25).held_out) == 10
    assert len(split_folder(str(labelled), fraction=0.01).held_out) == MIN_HELD_OUT
    assert split_folder(str(labelled)).held_out == ()  # nothing asked, nothing held out
    # Automatic: a folder below AUTO_VAL_MIN_IMAGES holds out nothing, a bigger one 10 %.
    small = TrainConfig(data=str(labelled))
    assert plan_evaluation(small) == EvalPlan()
    big = labelled_folder(tmp_path / "big", per_class=AUTO_VAL_MIN_IMAGES // 2)
    plan = plan_evaluation(TrainConfig(data=str(big)))
    assert len(plan.val) == AUTO_VAL_MIN_IMAGES // 10 and len(plan.train) == AUTO_VAL_MIN_IMAGES * 9 // 10
    with pytest.raises(DataError, match="^val_count: holding out .* leaves none to train on"):
        split_folder(str(labelled), count=total)
    with pytest.raises(DataError, match="^val_fraction: holding out .* lower val_fraction"):
        split_folder(str(labelled), fraction=0.99)
    few = sorted(labelled.rglob("*.png"))[:3]
    with pytest.raises(DataError, match=r"holding out 4 of 3 images \(a share holds out at least "
                                        r"4\) .*: clear val_fraction and set val_count below 3"):
        split_folder(str(labelled), fraction=0.1, paths=tuple(few))


def test_the_default_run_on_the_sample_photos_evaluates_nothing():
    plan = plan_evaluation(TrainConfig())
    assert not plan.active and plan.train is None  # trains on all 17 photos, as before


def test_a_small_folder_of_ones_own_says_why_it_evaluates_nothing(labelled):
    """A 40-image labelled folder trained with no validation loss and no kNN monitor, in silence:
    the trainer now says why, and what holds images out. Said only where that default is why."""
    t = TrainConfig(data=str(labelled))
    assert not plan_evaluation(t).active
    note = no_evaluation_note(t, "memory", 2 * PER_CLASS)
    assert note is not None and f"{2 * PER_CLASS} images, fewer than the {AUTO_VAL_MIN_IMAGES}" in note
    assert "--val-count" in note and "kNN monitor" in note
    # Not for the sample photos, a split asked for, evaluation off, a streamed set, a large folder.
    for quiet, kind, files in ((TrainConfig(), "memory", 17),
                               (TrainConfig(data=str(labelled), val_count=8), "memory", 40),
                               (TrainConfig(data=str(labelled), eval_every_n_steps=0), "memory", 40),
                               (t, "prepared", 40), (t, "memory", AUTO_VAL_MIN_IMAGES)):
        assert no_evaluation_note(quiet, kind, files) is None


def test_plan_bounds_the_bank_with_every_class_and_needs_labels_for_eval_data(labelled, tmp_path):
    plan = plan_evaluation(TrainConfig(data=str(labelled), val_count=VAL_COUNT, eval_max_images=6))
    assert plan.knn and len(plan.val) == 6 and len(plan.query) == 6 and len(plan.bank) == 6
    assert set(plan.bank_labels) == {0, 1}  # a random subset, not the first class's files
    assert not set(plan.bank) & set(plan.val)
    flat = labelled_folder(tmp_path / "flat", flat=True)
    unlabelled = plan_evaluation(TrainConfig(data=str(flat), val_count=VAL_COUNT))
    assert unlabelled.val and not unlabelled.knn
    with pytest.raises(DataError, match="class subfolders"):
        plan_evaluation(TrainConfig(eval_data=str(flat)))
    few = tmp_path / "few"  # too few to split, and no classes: the classes are what to fix
    few.mkdir()
    for path in sorted(flat.rglob("*.png"))[:3]:
        (few / path.name).write_bytes(path.read_bytes())
    with pytest.raises(DataError, match="eval_data: .*few.* needs class subfolders"):
        plan_evaluation(TrainConfig(eval_data=str(few)))
    tiny = tmp_path / "tiny"  # two classes of two: labelled, but no bank beside 4 queries
    for path in sorted(labelled.rglob("*.png"))[:2] + sorted(labelled.rglob("*.png"))[-2:]:
        (tiny / path.parent.name).mkdir(parents=True, exist_ok=True)
        (tiny / path.parent.name / path.name).write_bytes(path.read_bytes())
    with pytest.raises(DataError, match="eval_data: .*tiny.* holds 4 images, too few for a kNN "
                                        "bank and its held-out queries") as refused:
        plan_evaluation(TrainConfig(eval_data=str(tiny)))
    assert refused.value.field == "eval_data"
    # The sample photos train; the labelled folder is the kNN monitor's own (20 % queries).
    separate = plan_evaluation(TrainConfig(eval_data=str(labelled)))
    assert separate.train is None and not separate.val
    assert len(separate.query) == 8 and len(separate.bank) == 32


# --- kNN scoring --------------------------------------------------------------------------------

def test_knn_scores_separable_and_random_features():
    torch.manual_seed(0)
    centres = torch.randn(3, 16) * 5
    bank_labels = torch.arange(3).repeat(10)
    bank = centres[bank_labels] + torch.randn(30, 16) * 0.1
    query_labels = torch.tensor([0, 1, 2, 2])
    query = centres[query_labels] + torch.randn(4, 16) * 0.1
    scores = knn_scores(query, query_labels, bank, bank_labels, 3, "knn_cls")
    assert set(scores) == {f"knn_cls_k{k}_top{t}" for k in KNN_K for t in (1, 5)}
    assert scores["knn_cls_k20_top1"] == 1.0  # k=200 is capped at the bank's 30: no error
    # Wrong labels for every query: top-1 is 0, top-5 of 3 classes is always 1.
    wrong = knn_scores(query, (query_labels + 1) % 3, bank, bank_labels, 3, "x")
    assert wrong["x_k20_top1"] == 0.0 and wrong["x_k20_top5"] == 1.0


# --- a real DDP run -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ddp_result(run_module, labelled, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    result = run_module("mae_core.train", "--runs-dir", runs, *RUN, "--data", labelled,
                        "--val-count", str(VAL_COUNT))
    dirs = [p for p in runs.iterdir() if p.is_dir()]
    assert result.returncode == 0 and len(dirs) == 1, result.stderr[-4000:]
    return RunPaths(dirs[0]), result.stdout + result.stderr


@pytest.fixture(scope="module")
def ddp_run(ddp_result):
    return ddp_result[0]


def test_the_knn_monitors_gather_prints_no_library_warning(ddp_result):
    """Lightning's all_gather goes through torch.distributed.nn's, deprecated: each rank printed
    the warning into the terminal (and train.log) at the first kNN evaluation."""
    output = ddp_result[1]
    assert "kNN on" in output and "deprecated" not in output, output[-3000:]


def test_ddp_run_records_validation_loss_and_knn_at_fixed_steps(ddp_run):
    rows = [row for row in ddp_run.read_metrics() if "val_loss" in row]
    assert [row["step"] for row in rows] == list(range(0, MAX_STEPS + 1, EVAL_EVERY))
    for row in rows:
        assert math.isfinite(row["val_loss"]) and 0 < row["val_loss"] < 10
        assert 0 <= row["knn_top1"] <= row["knn_top5"] <= 1
        assert row["knn_top1"] >= 0.75  # reds against blues: a random ViT separates them
        # The headline is Evaluate's: the mean patch token at k=20 (it was the class token, k=200).
        assert (row["knn_top1"], row["knn_top5"]) == (row["knn_mean_k20_top1"],
                                                      row["knn_mean_k20_top5"])
    status = json.loads(ddp_run.status.read_text())
    assert status["world_size"] == 2
    assert status["images"] == 2 * PER_CLASS - VAL_COUNT  # the held-out images are not trained on
    board = ddp_run.root / "tensorboard"
    assert any(board.iterdir())


def test_ddp_run_keeps_weight_snapshots_for_the_history_slider(ddp_run):
    from safetensors.torch import load_file

    from mae_core.snapshots import list_snapshots

    snapshots = list_snapshots(ddp_run.root)
    assert [step for step, _ in snapshots] == [0, MAX_STEPS]  # the start and the end (1 writer)
    final, start = load_file(snapshots[-1][1]), load_file(snapshots[0][1])
    assert all(torch.equal(final[k], v) for k, v in load_file(ddp_run.weights).items())
    assert not all(torch.equal(start[k], v) for k, v in final.items())  # it trained in between
    assert snapshots[-1][1].stat().st_ino == ddp_run.weights.stat().st_ino  # linked, not rewritten


def test_ddp_figures_are_those_of_the_whole_held_out_set(ddp_run):
    """The last evaluation, recomputed here in one process from the final weights: the all-reduce
    and the all-gather cover both ranks' shares (one rank's half would give other numbers)."""
    cfg = RunConfig.load(ddp_run.config)
    mae = load_model(ddp_run.weights)
    plan = plan_evaluation(cfg.train)
    images, kept = fixed_crops(plan.val, cfg.model.image_size)
    assert kept == list(range(VAL_COUNT))
    keep, mask = draw_token_mask(VAL_COUNT, cfg.model.num_patches, cfg.model.mask_ratio,
                                 seeded_generator(VAL_MASK_SEED))
    with torch.no_grad():
        expected = mae.loss(mae.normalize(images), keep, mask).item()
        halves = [mae.loss(mae.normalize(images[r::2]), keep[r::2], mask[r::2]).item()
                  for r in (0, 1)]
    last = [row for row in ddp_run.read_metrics() if "val_loss" in row][-1]
    assert last["step"] == MAX_STEPS
    assert last["val_loss"] == pytest.approx(expected, rel=1e-4)
    assert all(abs(h - expected) > 1e-4 * expected for h in halves)  # the check can tell
    bank_cls, bank_mean = embed(mae, fixed_crops(plan.bank, 32)[0], 8)
    query_cls, query_mean = embed(mae, fixed_crops(plan.query, 32)[0], 8)
    labels = torch.tensor(plan.bank_labels), torch.tensor(plan.query_labels)
    for name, query, bank in (("cls", query_cls, bank_cls), ("mean", query_mean, bank_mean)):
        scores = knn_scores(query, labels[1], bank, labels[0], 2, f"knn_{name}")
        for key, value in scores.items():
            assert last[key] == pytest.approx(value), key


def test_an_impossible_split_is_refused_before_the_run_exists(run_module, labelled, tmp_path):
    result = run_module("mae_core.train", "--runs-dir", tmp_path / "runs", *RUN, "--data", labelled,
                        "--val-count", str(2 * PER_CLASS))
    assert result.returncode == 2 and "val_count: holding out" in result.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_the_run_manager_refuses_unlabelled_or_missing_eval_data_before_a_run_exists(labelled,
                                                                                     tmp_path):
    from mae_core.runs import RunManager

    manager = RunManager(tmp_path / "runs")
    flat = labelled_folder(tmp_path / "flat", flat=True)
    for folder, message in ((flat, "class subfolders"), (tmp_path / "missing", "does not exist")):
        cfg = RunConfig(train=TrainConfig(eval_data=str(folder), accelerator="cpu", devices=1))
        with pytest.raises(DataError, match=message) as err:
            manager.start(cfg)
        assert "eval_data" in str(err.value)
        with pytest.raises(DataError):
            manager.enqueue(cfg)
    assert manager.list() == []


# --- eval_data that cannot be read ---------------------------------------------------------------

def _eval_folder(root: Path, data: bytes) -> Path:
    for name in ("cats", "dogs"):
        (root / name).mkdir(parents=True)
        for i in range(4):
            (root / name / f"{i}.png").write_bytes(data)
    return root


def test_an_eval_folder_of_unreadable_images_is_refused_before_a_run_exists(tmp_path):
    """Zero-byte images passed the check (it only listed them) and the run died at step 0 with
    ZeroDivisionError."""
    from mae_core.runs import RunManager

    empty = _eval_folder(tmp_path / "empty", b"")
    manager = RunManager(tmp_path / "runs")
    cfg = RunConfig(train=TrainConfig(eval_data=str(empty), eval_every_n_steps=1,
                                      accelerator="cpu", devices=1))
    with pytest.raises(DataError, match="eval_data .*none of the .* images in its kNN bank can be "
                                        "read .*put readable images"):
        manager.start(cfg)
    assert manager.list() == []


def test_an_eval_folder_of_another_channel_count_is_refused_when_the_model_is_known(labelled):
    t = TrainConfig(eval_data=str(labelled), eval_every_n_steps=1)
    assert plan_evaluation(t, split_data=False, channels=3).knn  # RGB photos for an RGB model
    with pytest.raises(DataError, match="can be read as 1-channel images"):
        plan_evaluation(t, split_data=False, channels=1)


def test_start_refuses_an_eval_folder_the_model_cannot_read(tmp_path, labelled):
    """Grayscale training data makes a 1-channel model; an RGB eval folder used to pass Start and
    leave the run without a kNN figure."""
    from mae_core.runs import RunManager

    gray = tmp_path / "gray"
    gray.mkdir()
    for i in range(8):
        Image.new("L", (40, 40), 20 * i).save(gray / f"{i}.png")
    manager = RunManager(tmp_path / "runs")
    cfg = RunConfig(train=TrainConfig(data=str(gray), eval_data=str(labelled),
                                      eval_every_n_steps=1, accelerator="cpu", devices=1))
    with pytest.raises(DataError, match="1-channel images"):
        manager.start(cfg)
    assert manager.list() == []


def test_a_run_whose_eval_images_cannot_be_decoded_goes_on_without_knn(run_module, tmp_path):
    """Headers that read and pixels that do not (PNGs cut after their header) pass the check:
    the monitor says in train.log why it has no kNN figure, and the run finishes."""
    whole = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 30, 30)).save(whole, "PNG")
    cut = _eval_folder(tmp_path / "cut", whole.getvalue()[:45])
    runs = tmp_path / "runs"
    result = run_module("mae_core.train", "--runs-dir", runs, "--devices", "1", "--accelerator",
                        "cpu", "--image-size", "32", "--patch-size", "8", "--batch-size", "4",
                        "--max-steps", "2", "--num-previews", "0", "--precision", "32-true",
                        "--eval-every-n-steps", "1", "--weight-snapshots", "0", "--eval-data", cut)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "no kNN accuracy (none of the 4 bank images could be read" in result.stdout
    [run] = [RunPaths(p) for p in runs.iterdir() if p.is_dir()]
    evaluations = [row for row in run.read_metrics() if "eval_s" in row]
    assert [row["step"] for row in evaluations] == [0, 1, 2]
    assert not any(key.startswith("knn") for row in evaluations for key in row)
