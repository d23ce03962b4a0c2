"""Prepared data sets: the cache key, one preparation under a lock, what ``--data`` resolves to,
reduced-size decoding, and real two-process gloo DDP runs that record every sample id they train on
(``tests/record_ids.py``): disjoint shards, each sample once per epoch, and a resume that neither
repeats nor skips the interrupted epoch's samples."""

from __future__ import annotations

import io
import json
import math
import os
import random
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mae_core import crops, datasource, prepared, shards
from mae_core.config import RunConfig
from mae_core.data import DataError, check_data, find_images
from mae_core.rundir import RUN_DATA_NAME, RunPaths

REPO_ROOT = Path(__file__).resolve().parent.parent


def _photos(folder: Path, count: int, size=(40, 48)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels = np.random.default_rng(i).integers(0, 255, (*size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:03d}.jpg")
    return folder


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(prepared.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_cache_key_follows_the_file_list_sizes_and_mtimes(tmp_path):
    folder = _photos(tmp_path / "photos", 3)
    key = prepared.cache_key(str(folder), find_images(str(folder)), 448)
    assert prepared.cache_key(str(folder), find_images(str(folder)), 448) == key  # stable
    assert prepared.cache_key(str(folder), find_images(str(folder)), 512) != key  # short side
    first = folder / "000.jpg"
    os.utime(first, ns=(first.stat().st_atime_ns, first.stat().st_mtime_ns + 10**9))
    touched = prepared.cache_key(str(folder), find_images(str(folder)), 448)
    assert touched != key
    _photos(tmp_path / "more", 1)
    (tmp_path / "more" / "000.jpg").rename(folder / "new.jpg")
    added = prepared.cache_key(str(folder), find_images(str(folder)), 448)
    assert added not in (key, touched)
    (folder / "new.jpg").unlink()
    assert prepared.cache_key(str(folder), find_images(str(folder)), 448) == touched  # removed again


def test_prepare_skips_corrupt_files_bounds_the_short_side_and_leaves_no_temp(tmp_path):
    src = _photos(tmp_path / "src", 3, size=(600, 900))
    (src / "corrupt.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (src / "empty.png").write_bytes(b"")
    manifest = prepared.prepare(str(src), tmp_path / "out", short_side=256, workers=1, verbose=False)
    assert (manifest["files"], manifest["count"], manifest["skipped"]) == (5, 3, 2)
    assert prepared.read_manifest(tmp_path / "out") == manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # the temp dir is gone
    dataset = shards.streaming_dataset(str(tmp_path / "out"), None, shuffle=False)
    stored = Image.open(io.BytesIO(bytes(dataset[0]["image"])))
    assert stored.format == "JPEG" and min(stored.size) == 256 and max(stored.size) == 384
    assert sorted(int(dataset[i]["id"]) for i in range(len(dataset))) == [0, 1, 2]
    with pytest.raises(DataError, match="not empty"):
        prepared.prepare(str(src), tmp_path / "out", workers=1, verbose=False)
    bad = _photos(tmp_path / "bad", 0)
    (bad / "x.jpg").write_bytes(b"nope")
    with pytest.raises(DataError, match="none of the 1 image files"):
        prepared.prepare(str(bad), tmp_path / "out2", workers=1, verbose=False)
    assert not (tmp_path / "out2").exists() and not list(tmp_path.glob(".out2*"))


def _crop_boxes(item: dict, size: int, samples: int) -> np.ndarray:
    """(x0, y0, x1, y1, flipped) in [0, 1] of each of ``samples`` crops of a gradient image whose
    red channel is x and green channel is y: read back from the crops' edge pixels."""
    random.seed(0)
    transform = crops.DecodeAugment(size)
    boxes = []
    for _ in range(samples):
        out = transform(item)["image"]
        assert out.dtype == torch.uint8 and tuple(out.shape) == (3, size, size)
        red, green = out[0].float() / 255, out[1].float() / 255
        left, right = red[:, 0].mean().item(), red[:, -1].mean().item()
        top, bottom = green[0].mean().item(), green[-1].mean().item()
        # edge pixel centres lie half an output pixel inside the crop box
        grow = size / (size - 1)
        span_x, span_y = abs(right - left) * grow, (bottom - top) * grow
        x0, y0 = min(left, right) - (grow - 1) / 2 * abs(right - left), top - (grow - 1) / 2 * (bottom - top)
        boxes.append((x0, y0, x0 + span_x, y0 + span_y, float(right < left)))
    return np.array(boxes)


def test_ctrl_c_is_the_callers_again_once_the_preparation_ends(tmp_path):
    """litdata.optimize installs its own Ctrl+C handler (os._exit(0): a success, nothing recorded)
    and left it installed: a trainer's Ctrl+C between its preparation and its training ended the
    run as if it had finished."""
    import signal

    def ours(signum, frame):
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGINT, ours)
    try:
        prepared.prepare(str(_photos(tmp_path / "src", 2)), tmp_path / "out", workers=1,
                         verbose=False)
        assert signal.getsignal(signal.SIGINT) is ours
    finally:
        signal.signal(signal.SIGINT, before)


@pytest.mark.parametrize("size", [64, 160, 224])
def test_crops_keep_maetransforms_distribution_whatever_the_decode(tmp_path, size):
    """The crop is drawn before decoding and cut from a reduced copy or a reduced-scale decode when
    that still has the output's pixels: outputs stay uint8 size x size, the crop's area stays in
    MAETransform's scale range (0.2, 1), spread over it, its aspect ratio in (3/4, 4/3), and half
    the crops are flipped."""
    height, width = 448, 600
    x, y = np.meshgrid(np.linspace(0, 255, width), np.linspace(0, 255, height))
    pixels = np.stack([x, y, np.full_like(x, 128)], axis=-1).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "gradient.png")
    item = prepared._encode((7, str(tmp_path / "gradient.png")), short_side=448)
    assert Image.open(io.BytesIO(item["small"])).size == (214, 160)
    assert Image.open(io.BytesIO(item["mid"])).size == (425, 317)
    boxes = _crop_boxes(item, size, 200)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    aspect = (boxes[:, 2] - boxes[:, 0]) * width / ((boxes[:, 3] - boxes[:, 1]) * height)
    assert 0.17 < area.min() < 0.3 and 0.85 < area.max() < 1.05, (area.min(), area.max())
    # the same as MAETransform's own crop draws on an image of this size (~0.50: a large crop
    # of an extreme aspect ratio does not fit and is drawn again)
    from torchvision.transforms import RandomResizedCrop

    reference = [h * w / (width * height) for h, w in (
        RandomResizedCrop.get_params(Image.new("RGB", (width, height)), [0.2, 1.0], [3 / 4, 4 / 3])[2:]
        for _ in range(2000))]
    assert abs(area.mean() - np.mean(reference)) < 0.04, (area.mean(), np.mean(reference))
    assert 0.7 < aspect.min() and aspect.max() < 1.4
    assert boxes[:, :2].min() > -0.03 and boxes[:, 2:4].max() < 1.03  # inside the image
    assert 70 < boxes[:, 4].sum() < 130  # flipped about half the time
    old = {"image": item["image"], "id": 7}  # a set prepared before the small copies existed
    assert tuple(crops.DecodeAugment(32)(old)["image"].shape) == (3, 32, 32)


def test_crops_of_any_image_shape_come_out_whole(tmp_path):
    """Odd, tiny, extreme and already-small images (the small copy is then the image itself):
    every output is uint8 (3, size, size); a float's last bit past the edge is not an error."""
    rng = np.random.default_rng(0)
    for width, height in [(33, 47), (300, 257), (1001, 999), (161, 160), (17, 900)]:
        pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "odd.png")
        item = prepared._encode((0, str(tmp_path / "odd.png")), short_side=448)
        for size in (16, 32, 64, 224):
            transform = crops.DecodeAugment(size)
            for _ in range(15):
                out = transform(item)["image"]
                assert out.dtype == torch.uint8 and tuple(out.shape) == (3, size, size)


def test_a_cached_set_damaged_on_disk_is_prepared_again_not_refused_for_ever(tmp_path, cache,
                                                                           capsys):
    """The cache's copy of a folder loses a chunk: the folder, still there, is prepared again
    under the same key. A refusal ("prepare it again") would name a set the person never made,
    and come back on every start."""
    folder = _photos(tmp_path / "photos", 6)
    run = RunPaths(tmp_path / "runs" / "reader")
    run.root.mkdir(parents=True)
    found = datasource.run_data(str(folder), run.root, auto_prepare_above=5)  # the run's set, noted
    run.write_status(state="running")
    chunk = sorted(Path(found.path).glob("chunk-*.bin"))[0]  # one per encoding worker
    chunk.write_bytes(chunk.read_bytes()[:100])  # cut short
    assert datasource.describe(str(folder), auto_prepare_above=5).kind == "folder"  # not usable
    with pytest.raises(DataError, match=f"the live run {run.root} reads it: stop that run"):
        datasource.resolve(str(folder), workers=1, auto_prepare_above=5)  # not under its reader
    run.write_status(state="stopped")
    again = datasource.resolve(str(folder), workers=1, auto_prepare_above=5)
    assert again.path == found.path and again.count == 6
    assert prepared.check_set(again.path)[0] is not None
    assert "is damaged (its chunk" in capsys.readouterr().out
    name = Path(found.path).name  # the set, and its note of the runs that use it; no copy aside
    assert sorted(p.name for p in cache.iterdir() if p.is_dir()) == [name, f"{name}.runs"]


def test_a_cached_set_whose_samples_do_not_decode_is_made_again_for_its_resumed_run(
        tmp_path, cache):
    """Bytes damaged inside a chunk of the right size: the run failed with "prepare the data set
    again", but the data field said prepared, Prepare said "Already prepared", and a resume
    read the same set. The reader marks it damaged; the resume makes it again, same key."""
    import struct

    folder = _photos(tmp_path / "photos", 6)
    run = RunPaths(tmp_path / "runs" / "reader")
    run.root.mkdir(parents=True)
    found = datasource.run_data(str(folder), run.root, auto_prepare_above=5)
    for chunk in Path(found.path).glob("chunk-*.bin"):  # the item count: same size, garbage
        data = bytearray(chunk.read_bytes())
        data[:4] = struct.pack("<I", 33_554_472)
        chunk.write_bytes(bytes(data))
    assert prepared.check_set(found.path)[0] is not None  # the sizes alone see nothing
    dataset = shards.streaming_dataset(found.path, 32, shuffle=False)
    with pytest.raises(DataError, match="prepared again at the next start or resume"):
        [dataset[i] for i in range(len(dataset))]
    assert "could not decode its samples" in prepared.check_set(found.path)[1]
    # An I/O error of this machine (an errno), or a remote set, marks nothing: not the set's bytes.
    from types import SimpleNamespace

    from mae_core.crops import UndecodableSet

    (Path(found.path) / prepared.DAMAGED_NAME).unlink()
    for url, cause in ((None, OSError(5, "Input/output error")), ("s3://b/set", ValueError("x"))):
        err = UndecodableSet("item 0 of the prepared set cannot be used")
        err.__cause__ = cause
        reader = SimpleNamespace(input_dir=SimpleNamespace(url=url, path=found.path))
        shards.TolerantStreamingDataset._mark_damaged(reader, err)
        assert not (Path(found.path) / prepared.DAMAGED_NAME).exists()
    err.__cause__ = OSError("broken data stream when reading image file")  # PIL's: no errno
    shards.TolerantStreamingDataset._mark_damaged(
        SimpleNamespace(input_dir=SimpleNamespace(url=None, path=found.path)), err)
    assert "delete that file if the set is whole" in prepared.check_set(found.path)[1]
    run.write_status(state="starting")  # resumed: live itself, and the set's only reader
    again = datasource.run_data(str(folder), run.root, auto_prepare_above=5)
    assert again.path == found.path and prepared.check_set(again.path)[0] is not None
    dataset = shards.streaming_dataset(again.path, 32, shuffle=False)
    assert sorted(dataset[i]["id"] for i in range(len(dataset))) == list(range(6))


def test_a_cache_that_cannot_be_written_is_named_before_any_run_exists(tmp_path, monkeypatch):
    """A read-only home, or a file where the cache folder goes: Prepare showed a traceback, and
    Start made a run that then failed with a bare NotADirectoryError."""
    from mae_core.config import ModelConfig, TrainConfig
    from mae_core.runs import RunManager

    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    monkeypatch.setenv(prepared.CACHE_ENV, str(blocked / "prepared"))
    folder = _photos(tmp_path / "photos", 6)
    said = f"the data cache {blocked / 'prepared'} cannot be used \\(Not a directory\\)"
    with pytest.raises(DataError, match=said + f".*set {prepared.CACHE_ENV}"):
        datasource.resolve(str(folder), workers=1, auto_prepare_above=5)
    monkeypatch.setattr(datasource, "AUTO_PREPARE_ABOVE", 5)  # what Start decides by
    manager = RunManager(tmp_path / "runs")
    cfg = RunConfig(ModelConfig(image_size=32, patch_size=8),
                    TrainConfig(data=str(folder), accelerator="cpu", devices=1, num_workers=0))
    with pytest.raises(DataError, match=said) as refused:
        manager.start(cfg)
    assert refused.value.field == "data" and manager.list() == []


def test_a_damaged_prepared_set_is_refused_before_training_with_the_reason(tmp_path):
    """A prepared directory copied in part or cut short: LitData failed hours into a run
    ("buffer is smaller than requested size"); now the data check names what is wrong."""
    import shutil

    good = tmp_path / "good"
    prepared.prepare(str(_photos(tmp_path / "photos", 4)), good, workers=1, verbose=False)
    chunk = json.loads((good / "index.json").read_text())["chunks"][0]["filename"]
    damages = {"index": lambda d: (d / "index.json").unlink(),
               "missing": lambda d: (d / chunk).unlink(),
               "short": lambda d: os.truncate(d / chunk, 100)}
    reasons = {"index": "index.json is missing", "missing": f"chunk {chunk} is missing",
               "short": f"chunk {chunk} holds 100 bytes"}
    for name, damage in damages.items():
        folder = tmp_path / name
        shutil.copytree(good, folder)
        damage(folder)
        for check in (datasource.describe, check_data):
            with pytest.raises(DataError, match=f"is damaged \\(its {reasons[name]}"):
                check(str(folder))
    assert check_data(str(good)).files == 4


def test_a_manifest_or_index_of_the_wrong_types_is_refused_as_damaged(tmp_path):
    """A manifest's ``"count": "many"`` reached the data field's note (ValueError: Cannot specify
    ','), a run's data.json and then every row of the Runs table; -5 and 1e400 read as "-5 images"
    and "inf images"; an index.json whose chunks are no list gave "Internal error". Each is now
    the data set refused as damaged, with the field and its value, before a run records anything."""
    import shutil

    from mae_core.preparing import data_note

    good = tmp_path / "good"
    prepared.prepare(str(_photos(tmp_path / "photos", 3)), good, workers=1, verbose=False)
    manifest = json.loads((good / prepared.MANIFEST_NAME).read_text())
    index = json.loads((good / "index.json").read_text())
    chunk = index["chunks"][0]
    bad_manifests = [("count", "many"), ("count", -5), ("count", 1e400), ("count", 2.0),
                     ("count", True), ("count", 0), ("count", 2**70), ("bytes", "12"),
                     ("skipped", "1"), ("files", -1), ("short_side", None), ("seconds", "3"),
                     ("seconds", -1), ("seconds", 1e400), ("source", ["a"]), ("created", 5)]
    bad_indexes = [{"chunks": "abc"}, {"chunks": [1, 2]}, {"config": "x"},
                   {"chunks": [{**chunk, "chunk_bytes": "64MB"}]},
                   {"chunks": [{**chunk, "filename": 5}]}, {"chunks": [{**chunk, "chunk_size": -1}]}]
    cases = [(f"{key}-{i}", prepared.MANIFEST_NAME, {**manifest, key: value},
              f"records {key} ") for i, (key, value) in enumerate(bad_manifests)]
    cases += [(f"index-{i}", "index.json", {**index, **change}, "index.json is not as LitData")
              for i, change in enumerate(bad_indexes)]
    for name, file, content, reason in cases:
        folder = tmp_path / name
        shutil.copytree(good, folder)
        (folder / file).write_text(json.dumps(content))  # (1e400 is written as Infinity)
        for check in (datasource.describe, check_data, data_note, prepared.read_manifest):
            with pytest.raises(DataError, match=f"is damaged \\(its .*{reason}"):
                check(str(folder))
        run = tmp_path / "runs" / name
        run.mkdir(parents=True)
        with pytest.raises(DataError, match="is damaged"):  # a run on it starts nothing
            datasource.run_data(str(folder), run)
        assert not (run / RUN_DATA_NAME).exists()
    assert prepared.check_set(good) == (manifest, None)
    assert data_note(str(good)).startswith("prepared: 3 images (0 unreadable skipped)")
    del manifest["seconds"], manifest["bytes"]  # optional: a field absent is not damage
    (good / prepared.MANIFEST_NAME).write_text(json.dumps(manifest))
    assert datasource.describe(str(good)).count == 3


def test_one_process_prepares_while_the_others_wait(tmp_path, cache):
    folder = _photos(tmp_path / "photos", 8)
    code = ("import sys; from mae_core import prepared; "
            "print('DIR', prepared.prepare_cached(sys.argv[1], workers=1))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(folder)], cwd=REPO_ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    dirs = {line for out in outputs for line in out.splitlines() if line.startswith("DIR")}
    assert len(dirs) == 1, outputs
    assert sum(out.count("preparing 8 images") for out in outputs) == 1, outputs
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 1


def test_a_run_waiting_on_another_preparation_of_its_set_says_so(tmp_path, cache):
    """A run's start whose folder another process was preparing (the app's Prepare, another
    run) sat silent in its log for the whole wait, hours for a large folder."""
    from helpers import cache_lock_held, poll

    folder = _photos(tmp_path / "photos", 8)
    code = ("import sys; from mae_core import prepared; "
            "print('DIR', prepared.prepare_cached(sys.argv[1], workers=1))")
    log = tmp_path / "run.log"
    with cache_lock_held(folder), open(log, "w") as out:
        waiting = subprocess.Popen([sys.executable, "-c", code, str(folder)], cwd=REPO_ROOT,
                                   stdout=out, stderr=subprocess.STDOUT, text=True)
        said = poll(lambda: "waiting for another process" in log.read_text(), 120)
        assert waiting.poll() is None  # still waiting: the lock is held
    assert said, log.read_text()
    assert waiting.wait(timeout=120) == 0 and "DIR" in log.read_text()


def test_a_stop_ends_the_preparation_and_keeps_nothing(tmp_path, cache, monkeypatch):
    """A run's Stop while its data was prepared waited for the whole preparation (the app's
    watchdog force-killed it after 60 s), then trained a step: the encoders now end it."""
    folder = _photos(tmp_path / "photos", 40)
    stop = tmp_path / "run" / "STOP"
    stop.parent.mkdir()
    real = prepared.encode_copies
    calls = [0]

    def slow(image, side):  # (each forked encoder has its own count) a STOP asked mid-way
        calls[0] += 1
        if calls[0] == 3:
            stop.touch()
        return real(image, side)

    monkeypatch.setattr(prepared, "encode_copies", slow)
    with pytest.raises(prepared.StopRequested):
        prepared.prepare_cached(str(folder), workers=2, stop_file=stop)
    assert not [p for p in cache.iterdir() if p.is_dir()], list(cache.iterdir())  # no set, no tmp
    stop.unlink()
    monkeypatch.setattr(prepared, "encode_copies", real)
    assert prepared.read_manifest(prepared.prepare_cached(str(folder), workers=1))["count"] == 40


def test_a_stop_ends_the_wait_for_another_preparation_of_the_set(tmp_path, cache):
    """A run stopped while another process (the app's Prepare, another run) prepared its set
    waited for that whole preparation before it could stop."""
    import threading
    import time

    from helpers import cache_lock_held

    folder = _photos(tmp_path / "photos", 4)
    stop = tmp_path / "STOP"
    outcome: list[BaseException] = []

    def start() -> None:
        try:
            prepared.prepare_cached(str(folder), workers=1, stop_file=stop)
        except BaseException as err:  # noqa: BLE001 - the test reads it
            outcome.append(err)

    with cache_lock_held(folder):
        waiting = threading.Thread(target=start, daemon=True)
        waiting.start()
        time.sleep(1.0)
        assert waiting.is_alive() and not outcome  # waits on the lock
        stop.touch()
        waiting.join(timeout=5)
        assert not waiting.is_alive(), "the wait did not end on the stop"
    assert len(outcome) == 1 and isinstance(outcome[0], prepared.StopRequested), outcome


# --- real DDP runs -------------------------------------------------------------------------------

DDP = ["--devices", "2", "--accelerator", "cpu", "--image-size", "32", "--patch-size", "8",
       "--batch-size", "4", "--num-previews", "0", "--checkpoint-every-n-steps", "1"]


def _record(run_module, ids_dir: Path, run_dir: Path, data: Path, *flags: str):
    result = run_module("tests.record_ids", ids_dir, *DDP, "--data", data, "--run-dir", run_dir, *flags)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _steps(ids_dir: Path) -> dict[int, dict[int, list[int]]]:
    """{rank: {step: ids}} of every step each rank trained, over every session of the run."""
    seen: dict[int, dict[int, list[int]]] = {}
    for rank in (0, 1):
        for line in (ids_dir / f"rank{rank}.jsonl").read_text().splitlines():
            row = json.loads(line)
            assert row["step"] not in seen.setdefault(rank, {}), f"step {row['step']} trained twice"
            seen[rank][row["step"]] = row["ids"]
    return seen


def test_two_processes_shard_an_epoch_and_resume_mid_epoch_without_repeats(run_module, tmp_path):
    src = _photos(tmp_path / "photos", 48)
    data = tmp_path / "prepared"
    prepared.prepare(str(src), data, workers=1, verbose=False)
    ids_dir, run_dir = tmp_path / "ids", tmp_path / "runs" / "run"
    # 48 images, 2 ranks × batch 4: an epoch is 6 steps. Stop after 3, then resume to 9.
    _record(run_module, ids_dir, run_dir, data, "--max-steps", "3")
    assert sorted(len(steps) for steps in _steps(ids_dir).values()) == [3, 3]
    _record(run_module, ids_dir, run_dir, data, "--max-steps", "9", "--resume")
    seen = _steps(ids_dir)
    assert all(sorted(steps) == list(range(9)) for steps in seen.values())
    epoch = {rank: [i for step in range(6) for i in steps[step]] for rank, steps in seen.items()}
    assert not set(epoch[0]) & set(epoch[1])  # disjoint shards
    assert sorted(epoch[0] + epoch[1]) == list(range(48))  # every sample once, across the resume
    nxt = [i for steps in seen.values() for step in range(6, 9) for i in steps[step]]
    assert len(set(nxt)) == len(nxt) == 24  # the next epoch starts afresh, still no repeats
    # each rank draws its own crops (no loader workers: the draws run in the training process);
    # rank 1 once drew rank 0's very boxes step for step, and a resume replayed the first session's
    rows = {rank: [json.loads(line) for line in (ids_dir / f"rank{rank}.jsonl").read_text().splitlines()]
            for rank in (0, 1)}
    boxes = {rank: [Counter(tuple(box) for box in row["boxes"]) for row in rows[rank]] for rank in rows}
    runs = {rank: sum(steps, Counter()) for rank, steps in boxes.items()}
    assert min(sum(run.values()) for run in runs.values()) >= 24, runs
    assert sum((runs[0] & runs[1]).values()) < 6, runs[0] & runs[1]
    first, resumed = sum(boxes[0][:3], Counter()), sum(boxes[0][3:6], Counter())
    assert sum((first & resumed).values()) < 3, first & resumed
    assert not any(row["decoded_here"] for rows_of in rows.values() for row in rows_of)
    record = json.loads((run_dir / RUN_DATA_NAME).read_text())
    assert record["kind"] == "prepared" and record["count"] == 48
    assert json.loads(RunPaths(run_dir).status.read_text())["state"] == "finished"


@pytest.mark.parametrize("images, batch, world, workers, passes", [
    (48, 4, 2, 0, 1),              # no loader workers: nothing idles, one pass
    (48, 4, 2, 1, 6),              # 6 batches a rank: 6 passes give the 32 a worker
    (2000, 256, 1, 8, 37),         # the H200's 7-batch epoch: 256 batches for 8 workers
    (1_281_167, 256, 8, 8, 1),     # ImageNet on 8 GPUs: 625 batches a rank, once
    (7, 4, 2, 8, 1),               # too few for a batch a rank: refused later with the reason
])
def test_a_small_prepared_set_is_read_again_until_its_loader_workers_stay_busy(
        images, batch, world, workers, passes):
    """An H200 fed by a 2,000-image set (7 batches an epoch) trained at ~3,000 images/s where its
    cores decode 9,600: every loader worker idles from an epoch's last batch to the next's first."""
    from mae_core.data import BATCHES_PER_WORKER_PER_EPOCH as PER_WORKER

    assert shards.epoch_passes(images, batch, world, workers) == passes
    for images in range(world * batch, 40 * world * batch, 7):  # the fewest passes that suffice
        found = shards.epoch_passes(images, batch, world, workers)
        batches = images // (world * batch)
        assert found * batches >= PER_WORKER * workers
        assert found == 1 or (found - 1) * batches < PER_WORKER * workers


def test_loader_workers_read_a_small_set_in_whole_passes_across_a_mid_epoch_resume(run_module,
                                                                                   tmp_path):
    """Two processes, one loader worker each, 24 images at batch 4: an epoch is 11 passes (33
    steps a rank), and each sample is trained exactly 11 times in it, a resume at step 10 included
    (LitData shuffles the passes together: a sample may come back before another's first turn)."""
    src = _photos(tmp_path / "photos", 24)
    data = tmp_path / "prepared"
    prepared.prepare(str(src), data, workers=1, verbose=False)
    ids_dir, run_dir = tmp_path / "ids", tmp_path / "runs" / "run"
    workers = ("--num-workers", "1", "--checkpoint-every-n-steps", "10")
    _record(run_module, ids_dir, run_dir, data, *workers, "--max-steps", "10")
    _record(run_module, ids_dir, run_dir, data, *workers, "--max-steps", "35", "--resume")
    seen = _steps(ids_dir)
    assert all(sorted(steps) == list(range(35)) for steps in seen.values())
    epoch = Counter(i for steps in seen.values() for step in range(33) for i in steps[step])
    assert epoch == Counter({i: 11 for i in range(24)})


def test_decoding_on_the_device_trains_two_processes_on_disjoint_shards(run_module, tmp_path):
    """decode_on_device: the workers only draw crops and the training process decodes the batch
    (nvJPEG on a GPU; here the CPU): the same sharding, a finished run, a loss that is a number."""
    src = _photos(tmp_path / "photos", 16)
    data = tmp_path / "prepared"
    prepared.prepare(str(src), data, workers=1, verbose=False)
    ids_dir, run_dir = tmp_path / "ids", tmp_path / "runs" / "run"
    _record(run_module, ids_dir, run_dir, data, "--max-steps", "2", "--decode-on-device", "true")
    seen = _steps(ids_dir)
    ids = {rank: [i for step in steps.values() for i in step] for rank, steps in seen.items()}
    assert sorted(ids[0] + ids[1]) == list(range(16)) and not set(ids[0]) & set(ids[1])
    assert RunConfig.load(RunPaths(run_dir).config).train.decode_on_device is True
    rows = [json.loads(line) for rank in (0, 1)
            for line in (ids_dir / f"rank{rank}.jsonl").read_text().splitlines()]
    assert rows and all(row["decoded_here"] for row in rows)
    assert json.loads(RunPaths(run_dir).status.read_text())["state"] == "finished"
    losses = [json.loads(line)["loss"] for line in RunPaths(run_dir).metrics.read_text().splitlines()
              if '"loss"' in line]
    assert losses and all(math.isfinite(loss) for loss in losses)


def test_two_nodes_over_loopback_train_one_prepared_set_into_one_run(tmp_path):
    """``torchrun --nnodes 2`` on 127.0.0.1, one CPU process per "node", one shared run directory:
    every sample once per epoch across the nodes, and only node 0 writes the run's files."""
    from helpers import free_port

    from mae_core.process import clean_env

    src = _photos(tmp_path / "photos", 32)
    data = tmp_path / "prepared"
    prepared.prepare(str(src), data, workers=1, verbose=False)
    ids_dir, run_dir, port = tmp_path / "ids", tmp_path / "runs" / "run", free_port()
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port),
               "-m", "tests.record_ids", str(ids_dir), "--devices", "1", "--num-nodes", "2",
               "--accelerator", "cpu", "--image-size", "32", "--patch-size", "8", "--batch-size", "4",
               "--num-previews", "0", "--max-steps", "4", "--data", str(data), "--run-dir", str(run_dir)]
        procs.append(subprocess.Popen(cmd, cwd=REPO_ROOT, env=clean_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, start_new_session=True))
    try:
        outputs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    seen = _steps(ids_dir)  # 32 images, 2 nodes × batch 4: one epoch is 4 steps
    epoch = [i for steps in seen.values() for step in range(4) for i in steps[step]]
    assert sorted(epoch) == list(range(32))
    paths = RunPaths(run_dir)
    status = json.loads(paths.status.read_text())
    assert status["state"] == "finished" and status["world_size"] == 2
    steps = [row["step"] for row in paths.read_metrics() if "loss" in row]
    assert steps == sorted(set(steps)) == [1, 2, 3, 4]  # one writer: each step logged once
    assert "run directory:" in outputs[0] and "run directory:" not in outputs[1]


@pytest.mark.parametrize("data", ["/tmp/" + "a" * 300, "/tmp/" + "é" * 140,
                                  "~nosuchuser-mae-studio/photos"],
                         ids=["too-long", "too-long-utf8", "unknown-user"])
def test_a_path_that_cannot_exist_is_no_prepared_set(data):
    """is_prepared raised the path's OSError or RuntimeError before the folder check could say
    what is wrong with it."""
    assert prepared.is_prepared(data) is False


def test_a_position_saved_in_another_set_starts_the_epoch_over_on_this_one(tmp_path, capsys):
    """A run's cached set gone and its folder changed since: the folder is prepared again into a
    new set, and LitData refused the checkpoint's place in the old one at every resume ("The
    provided `input_dir` path state doesn't match"): the run could never train again. Now the
    interrupted epoch starts over on the new set, said in the log; a place in the same set is
    still taken up where it was."""
    old, new = (tmp_path / name for name in ("old", "new"))
    prepared.prepare(str(_photos(tmp_path / "photos", 24)), old, workers=1, verbose=False)
    prepared.prepare(str(_photos(tmp_path / "photos", 32)), new, workers=1, verbose=False)

    def loader(path: Path):
        module = shards.StreamingMAEDataModule(str(path), 32, batch_size=4, num_workers=0)
        module.setup("fit")
        return module.train_dataloader()

    first = loader(old)
    batches = iter(first)
    taken = [int(i) for _ in range(3) for i in next(batches)["id"]]
    saved = first.state_dict()
    resumed = loader(new)
    resumed.load_state_dict(saved)
    ids = [int(i) for batch in resumed for i in batch["id"]]
    assert sorted(ids) == list(range(32))  # the whole new set, once
    assert "this epoch starts over on the new set" in capsys.readouterr().out
    same = loader(old)
    same.load_state_dict(saved)  # the same set: the rest of its epoch, nothing again
    rest = [int(i) for batch in same for i in batch["id"]]
    assert sorted(taken + rest) == list(range(24))
    assert "starts over" not in capsys.readouterr().out


def test_a_run_whose_cached_set_went_and_whose_folder_changed_resumes(run_module, tmp_path, cache):
    """The trainer end to end (found by a fault pass): the set a folder run trained on removed
    from the cache, images added to the folder, Resume read "Resumed" and then failed within
    seconds, every time. Now the folder is prepared again and the run trains on to its end."""
    folder = _photos(tmp_path / "photos", prepared.AUTO_PREPARE_ABOVE + 2, size=(32, 32))
    run_dir = tmp_path / "runs" / "run"
    flags = [*DDP, "--data", str(folder), "--run-dir", str(run_dir),
             "--checkpoint-every-n-steps", "2"]
    first = run_module("mae_core.train", *flags, "--max-steps", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    for cached in cache.iterdir():
        if cached.is_dir() and not cached.name.endswith(".runs"):
            shutil.rmtree(cached)  # a clean-up of the cache
    _photos(tmp_path / "more", 1, size=(32, 32))
    (tmp_path / "more" / "000.jpg").rename(folder / "added.jpg")
    resumed = run_module("mae_core.train", "--run-dir", str(run_dir), "--resume",
                         "--max-steps", "4")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "this epoch starts over on the new set" in resumed.stdout + resumed.stderr
    status = RunPaths(run_dir).read_status()
    assert (status["state"], status["step"]) == ("finished", 4), status
