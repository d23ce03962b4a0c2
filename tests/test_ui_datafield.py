"""ui.datafield's handlers without a server: what the data field says before Start (files,
unreadable files, prepared or not, size on disk), and Prepare → progress → done / Cancel on a real
background preparation."""

from __future__ import annotations

import io
import re
import time
from pathlib import Path

import pytest
from PIL import Image

from helpers import cache_lock_held
from mae_core import prepared
from mae_core.preparing import WAITING_NAME, Preparations
from ui import datafield
from ui.common import UserError


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(prepared.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def jobs():
    jobs = Preparations()
    yield jobs
    jobs.close()


def _folder(folder: Path, count: int, size=(32, 24)) -> Path:
    folder.mkdir(parents=True)
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 10)).save(buffer, format="JPEG")
    for i in range(count):
        (folder / f"{i:04d}.jpg").write_bytes(buffer.getvalue())
    return folder


def test_the_data_field_says_files_unreadable_and_size_of_a_small_folder(tmp_path):
    folder = _folder(tmp_path / "photos", 3)
    (folder / "broken.png").write_bytes(b"not a png")
    info = datafield.data_info(f" {folder} ")
    assert 'data-kind="ok"' in info and "4 image file(s) found" in info
    assert "1 of them not images (skipped)" in info and " KB on disk" in info
    assert "decoded into memory" in info
    missing = datafield.data_info(str(tmp_path / "nope"))
    assert 'data-kind="error"' in missing and "does not exist" in missing
    # News, not a failure: said as such, nothing started.
    jobs = Preparations()
    answer = datafield.start_preparing(jobs, str(folder))
    assert list(answer) == ["progress"] and 'data-kind="info"' in answer["progress"]
    assert "decoded into memory at start, nothing to prepare" in answer["progress"]
    assert jobs.running() == []


def test_the_data_field_walks_the_folder_and_reads_each_header_once(tmp_path, monkeypatch):
    """Checking a folder and describing it share one walk and one header scan: a folder on a
    slow shared disk is not read twice each time the field loses focus."""
    from mae_core import channels, data

    folder = _folder(tmp_path / "photos", 5)
    (folder / "broken.png").write_bytes(b"not a png")
    walks, probes = [], []
    real_walk, real_probe = data.find_images, channels.probe
    monkeypatch.setattr(data, "find_images", lambda f: walks.append(f) or real_walk(f))
    monkeypatch.setattr(channels, "probe", lambda p: probes.append(p) or real_probe(p))
    info = datafield.data_info(str(folder))
    assert "6 image file(s) found" in info and "1 of them not images (skipped)" in info
    assert len(walks) == 1
    assert sorted(probes) == sorted(str(p) for p in folder.iterdir())


def test_page_loads_reuse_a_recent_note_but_never_a_refusal(tmp_path, monkeypatch):
    """Each page load (a reload, every open tab) walked the restored folder and read every
    image's header again. A load within KEEP_NOTE_S of the last takes its note; a refusal is not
    kept, so a folder made meanwhile is found at the next load."""
    from mae_core import data

    folder = _folder(tmp_path / "photos", 3)
    walks = []
    real_walk = data.find_images
    monkeypatch.setattr(data, "find_images", lambda f: walks.append(f) or real_walk(f))
    notes = datafield.RecentNotes()
    first = notes.note(str(folder))
    assert "3 image file(s) found" in first and len(walks) == 1
    (folder / "more.jpg").write_bytes((folder / "0000.jpg").read_bytes())
    assert notes.note(f" {folder} ") == first and len(walks) == 1  # the same folder, kept
    assert "4 image file(s) found" in datafield.data_info(str(folder))  # a blur: afresh
    assert "4 image file(s) found" in datafield.RecentNotes(keep_s=0).note(str(folder))
    later = tmp_path / "later"
    assert 'data-kind="error"' in notes.note(str(later))
    _folder(later, 2)
    assert "2 image file(s) found" in notes.note(str(later))
    _folder(tmp_path / "third", 1)
    small = datafield.RecentNotes(size=2)
    for name in ("photos", "later", "third"):
        small.note(str(tmp_path / name))
    assert list(small._notes) == [str(tmp_path / "later"), str(tmp_path / "third")]  # bounded


def test_prepare_shows_progress_then_the_prepared_set(tmp_path, cache, jobs):
    folder = _folder(tmp_path / "large", prepared.AUTO_PREPARE_ABOVE + 1)
    before = datafield.data_info(str(folder))
    assert f"{prepared.AUTO_PREPARE_ABOVE + 1:,} image file(s) found" in before
    assert "not prepared yet" in before and re.search(r"[\d.,]+ [KM]B on disk", before)
    started = datafield.start_preparing(jobs, str(folder))
    assert started["preparing"] == str(folder) and started["timer"].active
    assert started["cancel"]["interactive"] and not started["prepare"]["interactive"]
    deadline, view = time.monotonic() + 120, {}
    while "info" not in view and time.monotonic() < deadline:  # the timer's ticks
        time.sleep(0.2)
        view = datafield.preparing_view(jobs, str(folder))
        assert "Preparing" in view["progress"] or "info" in view
    assert 'data-kind="ok"' in view["progress"] and "Preparation done" in view["progress"]
    assert f"prepared: {prepared.AUTO_PREPARE_ABOVE + 1:,} images (0 unreadable" in view["info"]
    assert not view["timer"].active and view["prepare"]["interactive"]
    again = datafield.start_preparing(jobs, str(folder))
    assert 'data-kind="info"' in again["progress"] and "Already prepared" in again["progress"]
    with pytest.raises(UserError, match="No preparation is running"):
        datafield.cancel_preparing(Preparations(), str(folder))


def test_cancel_stops_the_preparation_and_the_folder_stays_unprepared(tmp_path, cache, jobs):
    folder = _folder(tmp_path / "large", prepared.AUTO_PREPARE_ABOVE + 1)
    datafield.start_preparing(jobs, str(folder))
    again = datafield.start_preparing(jobs, f" {folder} ")  # a reloaded page finds it again
    assert again["preparing"] == str(folder) and jobs.running() == [str(folder)]
    other = _folder(tmp_path / "other", prepared.AUTO_PREPARE_ABOVE + 1)
    with pytest.raises(UserError, match="is being prepared: wait for it or cancel it first"):
        datafield.start_preparing(jobs, str(other))
    cancelled = datafield.cancel_preparing(jobs, str(folder))
    assert "Preparation cancelled: nothing was kept" in cancelled["progress"]  # said once
    assert 'data-kind="warn"' in cancelled["progress"]
    assert "not prepared yet" in cancelled["info"] and not cancelled["timer"].active
    assert [p for p in cache.glob("*") if not p.name.endswith(".lock")] == []


def test_a_page_load_follows_the_preparation_the_app_is_running(tmp_path, cache, jobs):
    """A reload (or another tab) during Prepare now showed no progress, a greyed Cancel and
    Prepare enabled, and another folder's Prepare was refused with nothing on the page to cancel:
    the job was known only to the page that started it. A load now follows whatever the app is
    preparing; one that waits on another process's preparation of the set says it waits."""
    folder = _folder(tmp_path / "large", prepared.AUTO_PREPARE_ABOVE + 1)
    assert datafield.current_preparation(jobs) == {}  # nothing running: the page stays as built
    notes = datafield.RecentNotes(jobs=jobs)  # the loads' notes
    with cache_lock_held(folder):
        datafield.start_preparing(jobs, str(folder))
        assert "not prepared yet" in notes.note(str(folder))
        loaded = datafield.current_preparation(jobs)  # a new page: no state of its own
        assert loaded["preparing"] == str(folder) and loaded["timer"].active
        assert loaded["cancel"]["interactive"] and not loaded["prepare"]["interactive"]
        assert "Preparing" in loaded["progress"]
        deadline = time.monotonic() + 60
        while "waiting" not in loaded["progress"] and time.monotonic() < deadline:
            time.sleep(0.2)
            loaded = datafield.current_preparation(jobs)
        # "Preparing: 0 of 1,001 files (0 %)" while it was only waiting
        assert (f"waiting for another process (a run starting on this folder, or another app) "
                f"that is preparing the same {prepared.AUTO_PREPARE_ABOVE + 1:,} files") in \
            loaded["progress"], loaded["progress"]
        assert "0 of" not in loaded["progress"] and loaded["cancel"]["interactive"]
    deadline, view = time.monotonic() + 120, {}
    while "info" not in view and time.monotonic() < deadline:  # the timer the load turned on
        time.sleep(0.2)
        view = datafield.preparing_view(jobs, loaded["preparing"])
    assert "Preparation done" in view["progress"] and "prepared: " in view["info"]
    assert not (jobs.get(str(folder)).progress_dir / WAITING_NAME).exists()  # said while it waited
    assert datafield.current_preparation(jobs) == {}  # ended: a later load shows nothing
    # nor the note a load took while it ran ("not prepared yet"), if still within keep_s
    assert f"prepared: {prepared.AUTO_PREPARE_ABOVE + 1:,} images" in notes.note(str(folder))


def test_the_field_says_what_a_folder_holds(tmp_path):
    missing = datafield.data_info(str(tmp_path / "no-such-folder"))
    assert 'data-kind="error"' in missing and "no-such-folder" in missing
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    Image.new("RGB", (40, 30), (10, 200, 30)).save(photos / "a.png")
    Image.new("L", (50, 50), 128).save(photos / "sub" / "b.jpg")
    (photos / "notes.txt").write_text("not an image")
    found = datafield.data_info(f"  {photos}  ")
    assert 'data-kind="ok"' in found and "2 image file(s) found" in found
    empty = tmp_path / "empty"
    empty.mkdir()
    assert 'data-kind="error"' in datafield.data_info(str(empty))
    samples = datafield.data_info("")
    assert 'data-kind="ok"' in samples and "sample photos" in samples
    assert "decoded into memory" in samples  # 17 photos: no preparation
    assert "where the app was started" not in found + samples  # an absolute path, the samples: nothing to add


def test_prepare_is_greyed_while_the_field_refuses_its_folder(tmp_path, cache, jobs):
    """Prepare stayed enabled beside a note refusing the folder, and pressing it only said the
    refusal again: greyed while the note refuses (the reason above it), enabled for a folder that
    can be prepared, and greyed while a preparation runs whatever the note says."""
    missing = datafield.data_info(str(tmp_path / "no-such-folder"))
    assert datafield.prepare_button(jobs, missing)["interactive"] is False
    empty = tmp_path / "empty"
    empty.mkdir()
    assert datafield.prepare_button(jobs, datafield.data_info(str(empty)))["interactive"] is False
    folder = _folder(tmp_path / "large", prepared.AUTO_PREPARE_ABOVE + 1)
    note = datafield.data_info(str(folder))
    assert datafield.prepare_button(jobs, note)["interactive"] is True
    assert datafield.prepare_button(jobs, datafield.data_info(""))["interactive"] is True
    with cache_lock_held(folder):  # waits on the lock: still running while the buttons are read
        page = datafield.start_preparing(jobs, str(folder))["preparing"]  # the page's gr.State
        assert datafield.prepare_button(jobs, note, page)["interactive"] is False
        # Another page (another tab, loaded before): no timer of its own follows this job, so
        # greyed here its Prepare stayed greyed after the job ended. Its press says who prepares.
        assert datafield.prepare_button(jobs, note, None)["interactive"] is True
        with pytest.raises(UserError, match="is being prepared: wait for it or cancel it"):
            datafield.start_preparing(jobs, str(tmp_path / "other"))
        assert datafield.cancel_preparing(jobs, str(folder))["prepare"]["interactive"] is True


def test_a_relative_path_says_the_folder_it_is_read_from(tmp_path, monkeypatch):
    """A run keeps a relative path made absolute against the folder the app was started in: the
    field says which folder that is, found or not."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    Image.new("RGB", (40, 30), (10, 200, 30)).save(tmp_path / "photos" / "a.png")
    found = datafield.data_info("photos")
    assert 'data-kind="ok"' in found and "1 image file(s) found" in found
    assert (f"(that is <code>{tmp_path / 'photos'}</code>: a relative path is read from "
            f"<code>{tmp_path}</code>, where the app was started)") in found
    missing = datafield.data_info("./nope")
    assert 'data-kind="error"' in missing and f"<code>{tmp_path / 'nope'}</code>" in missing
    # Not read from here: kept as typed (an unknown user's home), or not a folder of this machine
    for elsewhere in ("~no-such-user-here/photos", "s3://bucket/photos", str(tmp_path),
                      "http://host/photos"):
        assert datafield.read_from(elsewhere) == "", elsewhere
    url = datafield.data_info("http://host/photos")  # read "that is <cwd>/http:/host/photos"
    assert 'data-kind="error"' in url and "is a URL this app cannot read" in url
    assert "where the app was started" not in url


def test_a_hostile_relative_path_is_said_short(tmp_path, monkeypatch):
    """The check named the folder cut short, then "(that is <the whole path>: ...)" added all of
    it: 5,000 characters typed came back as 5,500, and a NUL byte as it is."""
    monkeypatch.chdir(tmp_path)
    long = datafield.data_info("x" * 5000)
    assert 'data-kind="error"' in long and len(long) < 1200
    assert "where the app was started" in long
    nul = datafield.data_info("a\0b")
    assert "\0" not in nul and f"<code>{tmp_path}/a\\0b</code>" in nul


def test_the_field_warns_of_a_tiff_band_tagged_as_alpha(tmp_path):
    """tifffile.imwrite tags the fourth sample of an H×W×4 8-bit array as alpha by default: an
    RGB + NIR set written so trained as RGB, the NIR band composited away, with nothing said."""
    import numpy as np
    import tifffile

    tagged, bands = tmp_path / "tagged", tmp_path / "bands"
    for folder in (tagged, bands):
        folder.mkdir()
    tiles = np.random.default_rng(0).integers(0, 255, (2, 16, 16, 4), dtype=np.uint8)
    for i, tile in enumerate(tiles):
        tifffile.imwrite(tagged / f"{i}.tif", tile)  # the default: RGB + alpha
        tifffile.imwrite(bands / f"{i}.tif", tile, photometric="minisblack", planarconfig="contig")
    warned = datafield.data_info(str(tagged))
    assert 'data-kind="warn"' in warned and "2 TIFF(s) tag a sample as alpha" in warned
    assert "photometric=&#x27;minisblack&#x27;" in warned or "photometric='minisblack'" in warned
    four = datafield.data_info(str(bands))
    assert 'data-kind="ok"' in four and "4-channel" in four and "alpha" not in four


def test_the_alpha_warning_of_a_large_folder_says_it_counts_the_files_read(tmp_path, monkeypatch):
    """Above channels.MAX_PROBED files an even spread of the headers is read: the count is of
    those, and says so (it read as a count of the whole folder)."""
    import numpy as np
    import tifffile

    from mae_core import channels

    monkeypatch.setattr(channels, "MAX_PROBED", 3)
    tile = np.random.default_rng(0).integers(0, 255, (16, 16, 4), dtype=np.uint8)
    for i in range(6):
        tifffile.imwrite(tmp_path / f"{i}.tif", tile)
    warned = datafield.data_info(str(tmp_path))
    assert "3 of the 3 files read (an even spread of its 6) are TIFFs that tag a sample" in warned


def test_the_field_describes_a_prepared_set(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 30), (10 * i, 200, 30)).save(photos / f"{i}.png")
    (photos / "bad.jpg").write_bytes(b"nope")
    prepared.prepare(str(photos), tmp_path / "prepared", workers=1, verbose=False)
    found = datafield.data_info(str(tmp_path / "prepared"))
    assert 'data-kind="ok"' in found and "prepared: 3 images (1 unreadable skipped)" in found
    assert " KB on disk" in found
