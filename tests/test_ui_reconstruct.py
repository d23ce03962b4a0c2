"""ui.reconstruct's handlers on real run directories with real weights (no server, no trainer):
every readable image is reconstructed and each refused file is listed with its reason; the heat map
has one fixed scale; the checkpoint follows the live run unless one was picked by hand."""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from mae_core.config import MAX_SEED, ConfigError, ModelConfig, RunConfig, TrainConfig
from mae_core.fileio import atomic_write_json
from mae_core.model import MaskedAutoencoder
from mae_core.process import process_record
from mae_core.reconstruct import (HEATMAP_MAX, MODEL_PANEL_TITLES, PANEL_TITLES, Reconstruction,
                                  colorbar, error_heatmap)
from mae_core.rundir import RunPaths, create_run
from mae_core.runs import RunError
from mae_core.weights import save_weights
from ui import reconstruct, render
from ui.common import AppContext, UserError

MODEL = ModelConfig(image_size=32, patch_size=8, norm_pix_loss=True)
TINY = RunConfig(model=MODEL, train=TrainConfig(accelerator="cpu", devices=1, batch_size=4,
                                                max_steps=4, num_workers=0))


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "model.safetensors"
    save_weights(MaskedAutoencoder(MODEL), path, step=5)
    return path


def make_run(ctx: AppContext, weights: Path | None, state: str = "stopped") -> RunPaths:
    paths = create_run(TINY.resolved(), runs_dir=ctx.manager.runs_dir)
    paths.write_status(state=state, step=5)
    if weights is not None:
        paths.weights.write_bytes(weights.read_bytes())
    time.sleep(0.01)
    return paths


@pytest.fixture
def run(ctx, weights_file) -> RunPaths:
    return make_run(ctx, weights_file)


def photo(path: Path, size=(48, 40), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def corrupt(path: Path) -> Path:
    good = photo(path.with_name("whole-" + path.name))
    path.write_bytes(good.read_bytes()[:120])  # a PNG cut short
    return path


def test_one_bad_file_does_not_spoil_the_batch(ctx, run, tmp_path):
    bad, good = corrupt(tmp_path / "broken.png"), photo(tmp_path / "holiday.png")
    result = reconstruct.reconstruct_files(ctx, [str(bad), str(good)], False, run.run_id, 0.75, 0)
    assert [row[0] for row in result.rows] == ["holiday.png"]
    assert result.rows[0][2] == 12  # 75 % of the 16 patches are masked
    assert [name for name, _ in result.refused] == ["broken.png"]
    assert "corrupt or truncated" in result.refused[0][1]
    assert 'data-kind="warn"' in result.message
    assert "1 image(s) reconstructed, 1 refused" in result.message and "step 5" in result.message
    assert 'data-name="holiday.png"' in result.html and 'id="recon-refused"' in result.html
    assert "broken.png" in result.html


def test_a_non_image_and_a_missing_file_are_refused_readably(ctx, run, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("these are my notes, not a picture")
    missing = tmp_path / "gone.jpg"
    result = reconstruct.reconstruct_files(ctx, [str(text), str(missing)], False, run.run_id,
                                           0.5, 1)
    reasons = dict(result.refused)
    assert "not an image" in reasons["notes.png"]
    assert "no such file" in reasons["gone.jpg"]
    assert result.rows == [] and 'data-kind="error"' in result.message
    assert "0 image(s) reconstructed, 2 refused" in result.message


def test_hostile_files_are_refused_by_name_and_the_rest_reconstructed(ctx, run, tmp_path):
    """A damaged EXIF block or a DDS header named .png raised past the refusals: "Internal error
    in reconstruct" for the whole batch."""
    from tests.test_images import hostile_files

    hostile = hostile_files(tmp_path / "hostile")
    good = photo(tmp_path / "holiday.png")
    result = reconstruct.reconstruct_files(ctx, [str(p) for p in hostile + [good]], False,
                                           run.run_id, 0.75, 0)
    assert [row[0] for row in result.rows] == ["holiday.png"]
    assert [name for name, _ in result.refused] == [p.name for p in hostile]


def test_every_readable_image_is_reconstructed_up_to_the_limit(ctx, run, tmp_path):
    files = [str(photo(tmp_path / f"p{i:02d}.png", (33 + i, 32), seed=i))
             for i in range(reconstruct.MAX_IMAGES + 1)]
    result = reconstruct.reconstruct_files(ctx, files, False, run.run_id, 0.75, 3)
    assert len(result.rows) == reconstruct.MAX_IMAGES
    assert result.refused == [("p16.png", f"over the {reconstruct.MAX_IMAGES} images of one request")]


def test_the_sample_photos_and_weights_loaded_once(ctx, run):
    first = reconstruct.reconstruct_files(ctx, None, True, run.run_id, 0.75, 0)
    assert len(first.rows) == reconstruct.NUM_SAMPLE_IMAGES and not first.refused
    assert 'data-kind="ok"' in first.message
    again = reconstruct.reconstruct_files(ctx, [], True, run.run_id, 0.75, 0)
    assert again.rows == first.rows  # same seed, same masks, same losses
    assert ctx.models.loads == 1  # the second call reused the loaded model


@pytest.mark.parametrize("ratio,seed,field", [(0, 0, "mask_ratio"), (1, 0, "mask_ratio"),
                                              ("abc", 0, "mask_ratio"), (float("nan"), 0, "mask_ratio"),
                                              (0.75, MAX_SEED + 1, "mask seed"),
                                              (0.75, -1, "mask seed"), (0.75, 1.5, "mask seed"),
                                              (0.75, "x", "mask seed")])
def test_bad_ratio_or_seed_is_refused_naming_the_field(ctx, run, tmp_path, ratio, seed, field):
    good = photo(tmp_path / "a.png")
    with pytest.raises(ConfigError) as caught:
        reconstruct.reconstruct_files(ctx, [str(good)], False, run.run_id, ratio, seed)
    assert caught.value.field == field


def test_no_images_or_no_checkpoint_gives_a_clear_error(ctx, run, tmp_path):
    with pytest.raises(UserError, match="Upload one or more images"):
        reconstruct.reconstruct_files(ctx, [], False, run.run_id, 0.75, 0)
    with pytest.raises(UserError, match="Upload one or more images"):
        reconstruct.reconstruct_files(ctx, None, False, run.run_id, 0.75, 0)
    good = str(photo(tmp_path / "a.png"))
    with pytest.raises(UserError, match="Choose a checkpoint"):
        reconstruct.reconstruct_files(ctx, [good], False, None, 0.75, 0)
    no_weights = make_run(ctx, None)
    with pytest.raises(RunError, match="no saved weights"):
        reconstruct.reconstruct_files(ctx, [good], False, no_weights.run_id, 0.75, 0)


# --- honest colours: the model's own output beside the reconstruction ---------------------------

def test_the_view_says_the_colours_are_borrowed_and_shows_the_models_output(ctx, run, tmp_path):
    result = reconstruct.reconstruct_files(ctx, [str(photo(tmp_path / "a.png"))], True,
                                           run.run_id, 0.75, 0)
    images = 1 + reconstruct.NUM_SAMPLE_IMAGES
    assert 'id="recon-note" data-norm-pix="true"' in result.html
    assert render.esc(render.HONEST_NOTE) in result.html
    assert result.html.count('class="model-output"') == 2 * images
    for caption in PANEL_TITLES + MODEL_PANEL_TITLES + ("per-patch error",):
        assert result.html.count(f"<figcaption>{caption}</figcaption>") == images
    # per image: four panels, output, target, heat map; then the colour bar
    assert result.html.count("<img") == 7 * images + 1
    # the model's output comes after the paper's four panels, before the heat map
    item = result.html.split('class="recon-item"')[1]
    order = [item.index(f"<figcaption>{c}</figcaption>") for c in
             ("reconstruction + visible", MODEL_PANEL_TITLES[0], MODEL_PANEL_TITLES[1],
              "per-patch error")]
    assert order == sorted(order)


def test_without_norm_pix_loss_the_view_says_the_reconstruction_is_the_output(ctx, tmp_path):
    raw = ModelConfig(image_size=32, patch_size=8, norm_pix_loss=False)
    torch.manual_seed(0)
    save_weights(MaskedAutoencoder(raw), tmp_path / "raw.safetensors", step=2)
    paths = make_run(ctx, tmp_path / "raw.safetensors")
    result = reconstruct.reconstruct_files(ctx, [str(photo(tmp_path / "a.png"))], False,
                                           paths.run_id, 0.75, 0)
    assert 'data-norm-pix="false"' in result.html and render.esc(render.RAW_NOTE) in result.html
    assert 'class="model-output"' not in result.html and result.html.count("<img") == 5 + 1


# --- heat map on one fixed scale --------------------------------------------------------------

def synthetic(errors: list[list[float]]) -> Reconstruction:
    """A result with a black image, so the heat map shows the error colour alone."""
    grid = torch.tensor(errors)
    black = torch.zeros(3, 8 * grid.shape[0], 8 * grid.shape[1])
    return Reconstruction(black, black, black, black, grid, torch.ones_like(grid, dtype=torch.bool),
                          float(grid.mean()))


def pixel(image: Image.Image, row: int, col: int, patch: int = 8) -> tuple:
    return image.getpixel((col * patch + patch // 2, row * patch + patch // 2))


def test_the_same_patch_error_has_the_same_colour_in_every_image():
    low = synthetic([[1.0, 0.1], [0.1, 0.1]])  # 1.0 is this image's largest error
    high = synthetic([[1.0, 1.9], [3.0, 0.5]])  # here it is far from the largest
    a, b = error_heatmap(low), error_heatmap(high)
    assert pixel(a, 0, 0) == pixel(b, 0, 0)
    # Beyond the scale's top, colours saturate; below it they stay apart.
    assert pixel(b, 1, 0) == error_heatmap(synthetic([[HEATMAP_MAX] * 2] * 2)).getpixel((4, 4))
    assert pixel(a, 0, 1) != pixel(a, 0, 0)
    assert pixel(b, 0, 1) != pixel(b, 1, 0)


def test_real_reconstructions_share_the_scale(ctx, run, tmp_path):
    """Two uploads in two calls: a patch's colour depends on its error alone, not on the image's
    own maximum (the largest error of an image is not always drawn in the top colour)."""
    from mae_core.reconstruct import reconstruct as run_model

    model = ctx.models.get(run.weights)
    pictures = [np.array(Image.open(photo(tmp_path / f"{i}.png", (32, 32), i))) for i in range(2)]
    images = torch.stack([torch.from_numpy(p).permute(2, 0, 1) for p in pictures])
    first = run_model(model, images[:1], 0.75, seed=0)[0]
    second = run_model(model, images[1:], 0.75, seed=9)[0]
    for result in (first, second):
        black = Reconstruction(*(torch.zeros_like(result.original),) * 4, result.patch_error,
                               result.patch_masked, result.loss)
        heat = error_heatmap(black)
        top = torch.nonzero((result.patch_error == result.patch_error[result.patch_masked].max())
                            & result.patch_masked)[0].tolist()
        error = float(result.patch_error[top[0], top[1]])
        beside_larger = error_heatmap(synthetic([[error, 3 * error]]))
        assert pixel(heat, *top) == pixel(beside_larger, 0, 0)


def test_colorbar_is_an_image_from_low_to_high():
    bar = colorbar()
    assert isinstance(bar, Image.Image) and bar.width > bar.height
    left, right = np.asarray(bar)[bar.height // 2, 0], np.asarray(bar)[bar.height // 2, -1]
    assert left.sum() < right.sum()  # dark for no error, bright for the scale's top
    zero = np.asarray(error_heatmap(synthetic([[0.0]])).getpixel((4, 4)))
    top = np.asarray(error_heatmap(synthetic([[HEATMAP_MAX]])).getpixel((4, 4)))
    assert zero.sum() < top.sum()


def test_results_carry_the_colour_bar_with_its_values(ctx, run, tmp_path):
    result = reconstruct.reconstruct_files(ctx, [str(photo(tmp_path / "a.png"))], False,
                                           run.run_id, 0.75, 0)
    assert 'id="heat-colorbar"' in result.html and "data:image/png;base64," in result.html
    assert f"≥{HEATMAP_MAX:g}" in result.html and "one scale for every image" in result.html


# --- which checkpoint ------------------------------------------------------------------------

def test_refresh_follows_the_live_run_unless_picked_by_hand(ctx, weights_file, stand_in):
    older = make_run(ctx, weights_file)
    make_run(ctx, None)  # no weights yet: not a checkpoint to offer
    live = make_run(ctx, weights_file, state="starting")
    atomic_write_json(live.process, process_record(stand_in.pid))
    live.write_status(state="running")
    (live.previews).mkdir(exist_ok=True)
    Image.new("RGB", (8, 8)).save(live.previews / "step_000010.png")
    Image.new("RGB", (8, 8)).save(live.previews / "step_000020.png")
    os.mkfifo(live.previews / "step_000030.png")  # serving it would block the page forever

    out = reconstruct.refresh(ctx, None, True, None)
    choices = out["ckpt_pick"]["choices"]
    assert [value for _, value in choices] == [live.run_id, older.run_id]
    assert choices[0][0].endswith("· live")
    assert out["ckpt_pick"]["value"] == live.run_id
    assert [caption for _, caption in out["previews"]] == ["step 20", "step 10"]

    idle = reconstruct.refresh(ctx, live.run_id, True, out["sig"])
    assert set(idle) == {"sig"}  # nothing changed: nothing sent

    picked = reconstruct.refresh(ctx, older.run_id, False, idle["sig"])
    assert picked["ckpt_pick"]["value"] == older.run_id
    assert picked["previews"] == []  # the older run has none
    still = reconstruct.refresh(ctx, older.run_id, False, picked["sig"])
    assert "ckpt_pick" not in still

    following = reconstruct.refresh(ctx, older.run_id, True, still["sig"])
    assert following["ckpt_pick"]["value"] == live.run_id


def test_a_live_run_without_weights_yet_says_whose_weights_are_shown(ctx, weights_file, stand_in):
    """Before the live run's first checkpoint the picker showed an older run's weights, and said
    it followed the live run."""
    older = make_run(ctx, weights_file)
    live = make_run(ctx, None, state="starting")  # checkpoints every 100 steps, 4 in all
    atomic_write_json(live.process, process_record(stand_in.pid))
    live.write_status(state="running", step=1, total_steps=400)

    out = reconstruct.refresh(ctx, None, True, None)
    assert out["ckpt_pick"]["value"] == older.run_id
    assert out["ckpt_pick"]["info"] == (f"run {live.run_id} is training: its first weights come "
                                        f"at step 100; showing run {older.run_id}'s")
    assert "ckpt_pick" not in reconstruct.refresh(ctx, None, True, out["sig"])  # said once
    live.write_status(state="running", step=2, total_steps=40)  # fewer steps than the interval
    assert "at step 40;" in reconstruct.refresh(ctx, None, True, out["sig"])["ckpt_pick"]["info"]

    # Its first weights saved: the picker follows it, and says so as before.
    live.weights.write_bytes(weights_file.read_bytes())
    out = reconstruct.refresh(ctx, None, True, out["sig"])
    assert out["ckpt_pick"]["value"] == live.run_id
    assert out["ckpt_pick"]["info"] == reconstruct.FOLLOWS


def test_a_live_run_and_no_weights_anywhere_says_so(ctx, stand_in):
    live = make_run(ctx, None, state="starting")  # 4 steps: its weights come at the last one
    atomic_write_json(live.process, process_record(stand_in.pid))
    out = reconstruct.refresh(ctx, None, True, None)
    assert out["ckpt_pick"]["value"] is None
    assert out["ckpt_pick"]["info"] == (f"run {live.run_id} is starting: its first weights come "
                                        "at step 4; no other run has weights to show")


def test_refresh_without_a_live_run_offers_the_newest(ctx, weights_file):
    first = make_run(ctx, weights_file)
    second = make_run(ctx, weights_file, state="finished")
    out = reconstruct.refresh(ctx, None, True, None)
    assert out["ckpt_pick"]["value"] == second.run_id
    assert reconstruct.refresh(ctx, first.run_id, False, None)["ckpt_pick"]["value"] == first.run_id
    # A pick of a run that has since been deleted falls back to the default.
    assert reconstruct.refresh(ctx, "deleted-run", False, None)["ckpt_pick"]["value"] == second.run_id


# --- the weights history (issue 14, item 5) -------------------------------------------------------

def test_weights_history_slider_and_reconstruction_at_a_step(ctx, tmp_path):
    from mae_core.snapshots import WeightSnapshots, list_snapshots, nearest_snapshot

    data = tmp_path / "photos"
    data.mkdir()
    for i in range(6):
        photo(data / f"p{i}.png", seed=i)
    cfg = RunConfig(model=MODEL, train=TrainConfig(data=str(data), accelerator="cpu", devices=1,
                                                   val_count=2, num_workers=0))
    paths = create_run(cfg.resolved(), runs_dir=ctx.manager.runs_dir)
    assert reconstruct.history_slider(ctx, paths.run_id)["visible"] is False
    with pytest.raises(UserError, match="kept no weight snapshots"):
        reconstruct.reconstruct_history(ctx, paths.run_id, 0, 0.75, 0)
    # Three snapshots, 50 steps apart, kept 2 at a time by the trainer's own callback (rank 0).
    keeper = WeightSnapshots(paths.root, keep=2, every_n_steps=50)
    for step in (0, 50, 100):
        torch.manual_seed(step)
        keeper.save(SimpleNamespace(global_step=step), SimpleNamespace(mae=MaskedAutoencoder(MODEL)))
    assert [step for step, _ in list_snapshots(paths.root)] == [50, 100]
    assert nearest_snapshot(list_snapshots(paths.root), 70)[0] == 50
    slider = reconstruct.history_slider(ctx, paths.run_id)
    assert (slider["minimum"], slider["maximum"], slider["step"], slider["value"]) == (50, 100, 50, 100)
    html_50, message_50 = reconstruct.reconstruct_history(ctx, paths.run_id, 50, 0.75, 0)
    html_100, message_100 = reconstruct.reconstruct_history(ctx, paths.run_id, 100, 0.75, 0)
    assert "snapshot of step 50" in message_50 and "snapshot of step 100" in message_100
    assert "(held out)" in message_50  # a validation image: never trained on
    assert html_50 != html_100  # other weights, same image and mask: another reconstruction
    again, _ = reconstruct.reconstruct_history(ctx, paths.run_id, 40, 0.75, 0)
    assert again == html_50  # fixed image and mask: the same weights give the same picture
    paths.weights.write_bytes(paths.snapshot(100).read_bytes())  # a run with weights
    out = reconstruct.refresh(ctx, paths.run_id, False, None)
    assert out["history_step"]["value"] == 100 and out["history_step"]["visible"] is True


def test_the_weights_history_of_a_run_on_a_prepared_set_shows_an_image_of_the_set(ctx, tmp_path):
    """A run that streamed a prepared set: its history image comes from the set (a folder reader
    found "no images" there) and is never called held out (the trainer holds none out)."""
    from mae_core import datasource, prepared
    from mae_core.snapshots import WeightSnapshots

    src = tmp_path / "photos"
    src.mkdir()
    for i in range(6):
        photo(src / f"p{i}.png", seed=i)
    data = tmp_path / "prepared"
    prepared.prepare(str(src), data, workers=1, verbose=False)
    cfg = RunConfig(model=MODEL, train=TrainConfig(data=str(data), accelerator="cpu", devices=1,
                                                   val_count=2, num_workers=0))
    paths = create_run(cfg.resolved(), runs_dir=ctx.manager.runs_dir)
    # recorded as the trainer does
    assert datasource.run_data(str(data), paths.root).kind == "prepared"
    WeightSnapshots(paths.root, keep=2, every_n_steps=50).save(
        SimpleNamespace(global_step=50), SimpleNamespace(mae=MaskedAutoencoder(MODEL)))
    html, message = reconstruct.reconstruct_history(ctx, paths.run_id, 50, 0.75, 0)
    assert "first preview photo (trained on)" in message and "held out" not in message
    assert "<img" in html


def test_a_history_step_typed_past_either_end_takes_the_nearest_snapshot(ctx, tmp_path):
    """The slider's number box takes any number: 99999 or -3 typed there reconstructs with the
    newest or oldest snapshot (Gradio refused both with a toast), and text is refused naming the
    field, as a message (it was an internal error)."""
    from mae_core.snapshots import WeightSnapshots

    data = tmp_path / "photos"
    data.mkdir()
    for i in range(4):
        photo(data / f"p{i}.png", seed=i)
    cfg = RunConfig(model=MODEL, train=TrainConfig(data=str(data), accelerator="cpu", devices=1,
                                                   num_workers=0))
    paths = create_run(cfg.resolved(), runs_dir=ctx.manager.runs_dir)
    keeper = WeightSnapshots(paths.root, keep=2, every_n_steps=50)
    for step in (50, 100):
        keeper.save(SimpleNamespace(global_step=step),
                    SimpleNamespace(mae=MaskedAutoencoder(MODEL)))
    for typed, snapshot in ((99999, 100), (-3, 50), ("60", 50)):
        _, message = reconstruct.reconstruct_history(ctx, paths.run_id, typed, 0.75, 0)
        assert f"snapshot of step {snapshot}:" in message, typed
    with pytest.raises(ConfigError, match="weights history step"):
        reconstruct.reconstruct_history(ctx, paths.run_id, "abc", 0.75, 0)


def _sent(out: dict) -> dict:
    """``out`` as after Gradio sent it: it takes an update's value out of the dict it was given
    (gradio.utils.postprocess_update_dict), which is the very dict the refresh may keep."""
    for update in out.values():
        if isinstance(update, dict) and update.get("__type__") == "update":
            update.pop("value", None)
    return out


def test_the_history_step_chosen_stays_until_the_run_changes(ctx, weights_file):
    """The slider went back to the newest snapshot at every refresh (every 5 s), so no older
    step could be looked at: its value is sent for a new run, a slider just shown, or a step
    the run's snapshots no longer span."""
    from mae_core.snapshots import WeightSnapshots

    first, second = make_run(ctx, weights_file), make_run(ctx, weights_file)
    keeper = WeightSnapshots(first.root, keep=3, every_n_steps=10)

    def snapshot(step: int) -> None:
        keeper.save(SimpleNamespace(global_step=step), SimpleNamespace(mae=MaskedAutoencoder(MODEL)))

    hidden = _sent(reconstruct.refresh(ctx, first.run_id, False, None))
    assert hidden["history_step"]["visible"] is False
    snapshot(10)  # the first: shown at its step, not left at the hidden slider's 0
    out = reconstruct.refresh(ctx, first.run_id, False, hidden["sig"], 0)
    assert out["history_step"]["value"] == 10
    _sent(out)
    snapshot(20)
    out = _sent(reconstruct.refresh(ctx, first.run_id, False, out["sig"], 20))
    assert "history_step" in out
    assert "history_step" not in _sent(reconstruct.refresh(ctx, first.run_id, False, out["sig"], 10))
    snapshot(30)
    grown = reconstruct.refresh(ctx, first.run_id, False, out["sig"], 10)
    assert grown["history_step"]["maximum"] == 30 and "value" not in grown["history_step"]
    snapshot(40)  # step 10 pruned (3 kept): the step chosen is no longer spanned
    pruned = reconstruct.refresh(ctx, first.run_id, False, _sent(grown)["sig"], 10)
    assert pruned["history_step"]["minimum"] == 20 and pruned["history_step"]["value"] == 40
    other = reconstruct.refresh(ctx, second.run_id, False, _sent(pruned)["sig"], 40)
    assert other["history_step"]["visible"] is False and other["history_step"]["value"] == 0


def test_opening_the_picker_is_not_a_pick_and_a_pick_is_said(ctx, weights_file):
    """Opening the checkpoint list and leaving it sends the run it shows as an input: the
    picker then stopped following the live run, while its line still said it followed."""
    older, newer = make_run(ctx, weights_file), make_run(ctx, weights_file)
    sig = reconstruct.refresh(ctx, None, True, None)["sig"]
    assert reconstruct.follows_after_pick(newer.run_id, True, sig) is True  # left as it was
    assert reconstruct.follows_after_pick(older.run_id, True, sig) is False  # another run
    assert reconstruct.follows_after_pick(None, False, sig) is True  # cleared: follows again
    assert reconstruct.follows_after_pick(newer.run_id, False, sig) is False  # picked before
    picked = reconstruct.refresh(ctx, older.run_id, False, sig)
    assert picked["ckpt_pick"]["info"] == reconstruct.PICKED
    assert reconstruct.refresh(ctx, None, True, picked["sig"])["ckpt_pick"]["info"] == \
        reconstruct.FOLLOWS


def test_results_of_another_runs_weights_are_taken_away():
    """After another run was picked (or followed), the results under it were still the earlier
    run's, read as this one's."""
    assert reconstruct.stale_results("b", "b", "b") == {}
    assert reconstruct.stale_results("b", None, None) == {}
    other = reconstruct.stale_results("a", "b", "b")
    assert other["results"] == "" and other["losses"] == [] and other["results_run"] is None
    assert "now run <code>a</code>" in other["message"] and 'data-kind="info"' in other["message"]
    assert other["history"] == "" and other["history_run_id"] is None
    assert "history" not in reconstruct.stale_results("a", "b", "a")
    # Picked again: the saying names the run picked now (it went on naming the first).
    again = reconstruct.stale_results("c", None, None, "a")
    assert "now run <code>c</code>" in again["message"] and again["noticed_run"] == "c"
    assert reconstruct.stale_results("c", None, None, "c") == {}


def test_the_losses_table_is_shown_only_with_a_row_in_it():
    """Empty, its three headers sat under the Reconstruct button before any result."""
    import pandas as pd

    headers = ["image", "loss (masked patches)", "masked patches"]
    for empty in (None, [], pd.DataFrame(columns=headers),
                  pd.DataFrame([["", "", ""]], columns=headers)):
        assert reconstruct.table_shown(empty)["visible"] is False, empty
    assert reconstruct.table_shown(pd.DataFrame([["a.png", 0.31, 48]], columns=headers))["visible"]
    assert reconstruct.table_shown([["a.png", 0.31, 48]])["visible"]


def test_weights_of_another_model_copied_into_a_run_are_refused_as_export_refuses_them(
        ctx, tmp_path):
    """A model.safetensors (or a snapshot) of another model put in a run was reconstructed with,
    its pictures shown as the run's, where Export and Resume refuse it."""
    other = tmp_path / "other.safetensors"
    save_weights(MaskedAutoencoder(ModelConfig(image_size=48, patch_size=8)), other, step=7)
    paths = make_run(ctx, other)
    with pytest.raises(RunError, match="are not of its model .* put back the model.safetensors"):
        reconstruct.reconstruct_files(ctx, None, True, paths.run_id, 0.75, 0)
    snapshot = paths.snapshot(7)
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    snapshot.write_bytes(other.read_bytes())
    with pytest.raises(RunError, match="are not of its model"):
        reconstruct.reconstruct_history(ctx, paths.run_id, 7, 0.75, 0)
    assert ctx.models.loads == 0  # refused before the model was built
