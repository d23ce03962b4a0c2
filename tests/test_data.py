"""Data folders: what a scan finds, and the paths it refuses before a walk could hang or wander."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mae_core.data import DataError, check_data, find_images


def _photo(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.mark.parametrize("folder", ["/", "/proc", "/proc/self", "/sys", "/sys/kernel", "/dev",
                                    "/dev/shm", "//", "/proc/../proc"])
def test_root_and_kernel_folders_are_refused_naming_the_folder(folder):
    with pytest.raises(DataError) as err:
        find_images(folder)
    assert folder in str(err.value) and "system folder" in str(err.value)
    with pytest.raises(DataError):
        check_data(folder)


def test_a_symlink_to_a_kernel_folder_is_refused_and_not_followed_inside_a_data_set(tmp_path):
    (tmp_path / "proc-link").symlink_to("/proc")
    with pytest.raises(DataError, match="system folder"):
        find_images(str(tmp_path / "proc-link"))
    photos = tmp_path / "photos"
    _photo(photos / "a.png")
    (photos / "sys").symlink_to("/sys")
    (photos / "kcore.png").symlink_to("/proc/self/environ")  # a "photo" inside /proc
    assert find_images(str(photos)) == [str(photos / "a.png")]


def test_symlink_loops_end_the_walk_and_each_folder_is_read_once(tmp_path):
    photos = tmp_path / "photos"
    _photo(photos / "a.png")
    _photo(photos / "deep" / "b.jpg", seed=1)
    (photos / "deep" / "up").symlink_to(photos)          # a loop back to the top
    (photos / "deep" / "self").symlink_to(photos / "deep")  # a loop onto itself
    outside = tmp_path / "more"
    _photo(outside / "c.png", seed=2)
    (photos / "linked").symlink_to(outside)               # a symlinked folder is still read
    (photos / "linked-again").symlink_to(outside)         # ...but once
    # Links up to / or to a folder above: the walk went through the whole file system (6-9 s,
    # and its refusals quoted other users' files); neither is read.
    _photo(tmp_path / "beside.png", seed=3)
    (photos / "root").symlink_to("/")
    (photos / "deep" / "parent").symlink_to(tmp_path)
    found = find_images(str(photos))
    real = sorted(Path(p).resolve() for p in found)
    assert real == sorted({photos / "a.png", photos / "deep" / "b.jpg", outside / "c.png"})
    assert check_data(str(photos)).files == 3


def test_a_folder_of_images_is_found_recursively_sorted_and_counted(tmp_path):
    paths = [_photo(tmp_path / name, seed=i) for i, name in
             enumerate(["b.png", "a.JPG", "sub/c.webp", "sub/deeper/d.bmp"])]
    (tmp_path / "notes.txt").write_text("not an image")
    found = find_images(str(tmp_path))
    assert found == [str(p) for p in sorted(paths)]
    assert check_data(str(tmp_path)).files == 4


def test_the_walk_lists_files_in_the_order_sorted_paths_have(tmp_path, monkeypatch):
    # The order is the cache key's and the held-out split's: it must stay that of sorted Paths
    # (by parts: "a/x" before "a-b", which sorted strings put first), now that paths are strings.
    names = ["a/x.png", "a-b/y.png", "a.png", "a b/z.png", "A/w.png", "é.png", "b..jpg",
             "x/y/z/deep.tif", "x/7.TIFF", ".hidden/h.png", "sub.dir/q.webp"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    (tmp_path / ".png").write_bytes(b"")  # a hidden file with no suffix, as Path.suffix has it
    (tmp_path / "c.").write_bytes(b"")
    found = find_images(str(tmp_path))
    assert found == [str(p) for p in sorted(tmp_path / name for name in names)]
    assert sorted(found) != found  # (the case this test is for: string order differs)
    monkeypatch.chdir(tmp_path)  # a relative folder: the paths Path would write, "a.png"
    assert find_images(".") == [str(p) for p in sorted(Path(name) for name in names)]


def test_a_folder_nested_deeper_than_the_recursion_limit_is_walked(tmp_path):
    deep = tmp_path
    for _ in range(1200):  # os.walk recursed: a RecursionError, not a refusal or a data set
        deep = deep / "d"
    deep.mkdir(parents=True)
    _photo(deep / "a.png")
    try:
        assert find_images(str(tmp_path)) == [str(deep / "a.png")]
    finally:  # pytest's own clean-up recurses too
        (deep / "a.png").unlink()
        while deep != tmp_path:
            deep.rmdir()
            deep = deep.parent


@pytest.mark.parametrize("folder, message", [
    ("does/not/exist", "does not exist"), ("with\0nul", "cannot be read"),
    ("x" * 5000, "cannot be read"),
], ids=["missing", "nul", "5000-chars"])
def test_impossible_paths_are_refused_with_a_short_message(folder, message):
    with pytest.raises(DataError, match=message) as err:
        find_images(folder)
    assert len(str(err.value)) < 600


@pytest.mark.parametrize("url", ["http://example.com/images", "file:///tmp", "S3://bucket/set"])
def test_a_url_that_cannot_be_read_is_said_to_be_one(url):
    """The data field, Evaluate and ``python -m mae_core.evaluate --data`` read ``http://host/x``
    as a folder: "data folder http:/host/x does not exist" (``//`` made one)."""
    with pytest.raises(DataError, match="is a URL this app cannot read") as err:
        check_data(url)
    assert url in str(err.value) and "does not exist" not in str(err.value)


def _unknown_user() -> str:
    import pwd

    name = "nosuchuser-mae-studio"
    with pytest.raises(KeyError):  # really no such account on this machine
        pwd.getpwnam(name)
    return name


@pytest.mark.parametrize("name", ["a" * 300, "é" * 140], ids=["300-bytes", "280-bytes-utf8"])
def test_a_name_longer_than_the_file_system_allows_is_said_in_words(tmp_path, name):
    """The check asked whether a prepared set was there first: "Internal error: OSError: [Errno
    36] File name too long" in the data field and at Start."""
    folder = str(tmp_path / name)
    with pytest.raises(DataError, match="cannot be read .*longer than the file system allows"):
        check_data(folder)


def test_an_unknown_users_home_is_said_in_words():
    """~nosuchuser: pathlib's bare "RuntimeError: Could not determine home directory"."""
    user = _unknown_user()
    with pytest.raises(DataError, match=f"~{user} names no home folder .*no user named {user}"):
        check_data(f"~{user}/photos")


def test_a_folder_past_the_file_cap_is_refused_and_imagenet_is_not(tmp_path, monkeypatch):
    """The cap stops the walk of a wrong folder; a real data set is under it. It was 1 M, so
    ImageNet-1k (1,281,167 images, the MAE paper's) was refused, even by the preparation tool."""
    from mae_core import data

    assert data.MAX_IMAGE_FILES >= 14_197_122  # ImageNet-21k, the largest set a user may bring
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(5):
        Image.new("RGB", (8, 8)).save(folder / f"{i}.png")
    monkeypatch.setattr(data, "MAX_IMAGE_FILES", 4)
    with pytest.raises(DataError, match=r"holds more than 4 image files .*: choose a smaller"):
        find_images(str(folder))
    monkeypatch.setattr(data, "MAX_IMAGE_FILES", 5)
    assert len(find_images(str(folder))) == 5


def test_a_file_and_an_empty_folder_are_refused(tmp_path):
    with pytest.raises(DataError, match="not a folder"):
        find_images(str(_photo(tmp_path / "one.png")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        find_images(str(tmp_path / "empty"))


def test_the_embedded_photos_are_the_default():
    assert check_data("").files == len(find_images("")) >= 10
    assert all(os.path.isfile(p) for p in find_images(""))


@pytest.mark.parametrize("workers, accumulate, batches", [
    (0, 1, 4),      # in-process loading: 4 optimizer steps, as before
    (0, 3, 12),     # whole accumulation cycles
    (2, 1, 64),     # 32 batches per loader worker
    (2, 3, 66),     # ... rounded up to whole cycles of 3
])
def test_a_small_set_is_repeated_to_enough_batches_that_loader_workers_stay_busy(
        workers, accumulate, batches):
    """Loader workers all drain at an epoch's end: 4-batch epochs with 8 workers capped an H200
    at ~2,600 images/s. The repeat grows with the workers; without workers it stays 4 steps."""
    import pytorch_lightning as pl

    from mae_core.data import BATCHES_PER_WORKER_PER_EPOCH, MAEDataModule

    module = MAEDataModule("", 32, 4, workers)
    module.trainer = pl.Trainer(accelerator="cpu", devices=1, accumulate_grad_batches=accumulate,
                                logger=False, enable_checkpointing=False)
    module.setup("fit")
    loader = module.train_dataloader()
    assert len(loader) == batches
    assert len(loader) % accumulate == 0
    assert len(loader) >= BATCHES_PER_WORKER_PER_EPOCH * workers
    assert len(module.dataset) >= batches * 4  # the 17 photos, or the repeat when longer


# --- extreme aspect ratios ------------------------------------------------------------------------

def test_a_long_strip_is_used_by_its_central_part_so_a_tiny_file_cannot_grow_to_gigabytes(tmp_path):
    """A ~100-byte 1×400,000 PNG scaled to the cache's short side was 144 × 57.6 M pixels: +2 GB
    and 9 s in the app. Past MAX_ASPECT:1 only the central part is used, in the data set, the
    previews and the Reconstruct tab alike."""
    import torch

    from mae_core.data import ImageFolderDataset
    from mae_core.images import MAX_ASPECT, center_square, resize_short_side

    strip = tmp_path / "strip.png"
    Image.new("1", (400_000, 1), 1).save(strip)
    assert strip.stat().st_size < 1000
    dataset = ImageFolderDataset([strip], image_size=64)
    assert dataset.skipped == 0 and dataset.cache[0].shape == (3, 128, 128 * MAX_ASPECT)
    assert dataset[0].shape == (3, 64, 64)
    tall = torch.arange(3 * 5000, dtype=torch.float32).reshape(1, 5000, 3)
    assert resize_short_side(tall, 12).shape == (1, 12 * MAX_ASPECT, 12)
    assert center_square(tall, 32).shape == (1, 32, 32)
    # up to MAX_ASPECT:1 nothing is cut
    assert resize_short_side(torch.zeros(3, 10, 10 * MAX_ASPECT), 10).shape == (3, 10, 80)


@pytest.mark.parametrize("width", [700, 1001, 4096])
def test_mae_crops_of_a_very_long_image_are_the_crops_of_its_central_part(width):
    """MAE's random crop (0.2–1 of the area, aspect 3/4–4/3) cannot fit in an image longer than
    6.7:1 and takes the centre crop; the central MAX_ASPECT:1 part holds it (to a pixel of
    rounding), so cutting the rest changes no crop. Checked with the trainer's own crop."""
    import torch

    from mae_core.data import mae_augmentation
    from mae_core.images import MAX_ASPECT, central_box

    crop = mae_augmentation(32).transforms[0]
    assert MAX_ASPECT > crop.ratio[1] / crop.scale[0]  # the cut stays beyond what a crop reaches
    height = 64
    full = torch.zeros(3, height, width, dtype=torch.uint8)
    top, left, kept_h, kept_w = central_box(height, width)
    assert (top, kept_h, kept_w) == (0, height, min(width, MAX_ASPECT * height))
    for seed in range(20):
        torch.manual_seed(seed)
        whole = crop.make_params([full])
        torch.manual_seed(seed)
        part = crop.make_params([full[..., left:left + kept_w]])
        assert (part["height"], part["width"]) == (whole["height"], whole["width"])
        assert abs(left + part["left"] - whole["left"]) <= 1 and part["top"] == whole["top"]
