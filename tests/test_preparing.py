"""mae_core.preparing: a real background preparation process reports its progress, prepares into
the cache a run's start uses, and a cancel ends it and its encoding workers and leaves no
half-written set."""

from __future__ import annotations

import io
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mae_core import datasource, prepared
from mae_core.preparing import Preparation, Preparations
from mae_core.proctree import group_members


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(prepared.CACHE_ENV, str(tmp_path / "cache"))  # the job inherits it
    return tmp_path / "cache"


def _copies(folder: Path, count: int, size: tuple[int, int]) -> Path:
    """``count`` copies of one noise JPEG: each costs a full decode and re-encode to prepare."""
    folder.mkdir(parents=True)
    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    for i in range(count):
        (folder / f"{i:04d}.jpg").write_bytes(buffer.getvalue())
    return folder


def _wait(job: Preparation, until, timeout_s: float = 120.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        progress = job.progress()
        if until(progress):
            return progress
        time.sleep(0.1)
    raise AssertionError(f"no such progress within {timeout_s} s: {job.progress()}\n{job.log_tail()}")


def test_a_preparation_reports_progress_and_fills_the_cache_a_run_uses(tmp_path, cache):
    folder = _copies(tmp_path / "photos", 40, (64, 48))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    job = Preparation(str(folder), workers=1)
    try:
        done = _wait(job, lambda p: p.finished)
        assert done.state == "done", done.message
        assert (done.done, done.total, done.fraction) == (41, 41, 1.0)
        assert "prepared 40 images (1 unreadable skipped)" in done.message
        # the same set a run's start would look for: found, not prepared again
        found = datasource.describe(str(folder), auto_prepare_above=10)
        assert found.kind == "prepared" and found.count == 40 and found.skipped == 1
        assert Path(done.target) == Path(found.path)
    finally:
        job.close()
    assert not job.progress_dir.exists()


def test_cancel_ends_the_workers_and_leaves_no_partial_set(tmp_path, cache):
    folder = _copies(tmp_path / "big", 250, (900, 700))
    job = Preparation(str(folder), workers=1)
    try:
        running = _wait(job, lambda p: p.state == "encoding" and p.done > 0 or p.finished)
        assert running.state == "encoding", running  # 250 large files take seconds: not done yet
        assert 0 < running.done < running.total == 250
        members = group_members(job.process.pid)
        assert len(members) >= 2  # the job and its LitData encoding worker
        cancelled = job.cancel()
        assert cancelled.state == "cancelled" and job.process.returncode is not None
        assert group_members(job.process.pid) == []  # every worker ended with it
        assert job.cancel().state == "cancelled"  # twice is harmless
        leftovers = [p.name for p in cache.iterdir() if not p.name.endswith(".lock")]
        assert leftovers == []  # neither the target nor its .tmp-<pid> folder
        assert datasource.describe(str(folder), auto_prepare_above=10).kind == "folder"
    finally:
        job.close()


def test_a_folder_that_cannot_be_prepared_fails_with_the_reason(tmp_path, cache):
    jobs = Preparations()
    try:
        job = jobs.start(str(tmp_path / "missing"))
        assert jobs.start(str(tmp_path / "missing")) in (job, jobs.get(str(tmp_path / "missing")))
        failed = _wait(job, lambda p: p.finished)
        assert failed.state == "failed" and "does not exist" in failed.message
    finally:
        jobs.close()
    shutil.rmtree(cache, ignore_errors=True)


def test_an_app_that_exits_leaves_the_preparation_running_into_the_cache_and_nothing_in_tmp(
        tmp_path, cache):
    """The app exits mid-preparation: the job finishes into the cache (a later run finds the set)
    and removes its own progress files; at exit the app removes those of the jobs that ended."""
    import json
    import subprocess
    import sys

    from mae_core.process import PROJECT_ROOT, pid_alive

    folder = _copies(tmp_path / "photos", 60, (320, 240))
    done_folder = _copies(tmp_path / "small", 3, (64, 48))
    app = ("import json, sys, time; from mae_core.preparing import Preparations\n"
           "jobs = Preparations()\n"
           "ended = jobs.start(sys.argv[2])\n"
           "while not ended.progress().finished: time.sleep(0.1)\n"
           "job = jobs.start(sys.argv[1])\n"
           "print(json.dumps([str(ended.progress_dir), str(job.progress_dir), job.process.pid]))\n"
           "jobs.release()  # what the app registers to run at its exit\n")
    out = subprocess.run([sys.executable, "-c", app, str(folder), str(done_folder)], cwd=PROJECT_ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    ended_dir, running_dir, pid = json.loads(out.stdout.strip().splitlines()[-1])
    assert not Path(ended_dir).exists()  # removed by the app at its exit
    deadline = time.monotonic() + 120
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not pid_alive(pid), "the preparation never ended"
    assert not Path(running_dir).exists()  # removed by the job itself: no app to read it
    found = datasource.describe(str(folder), auto_prepare_above=10)
    assert found.kind == "prepared" and found.count == 60


def test_a_manifest_of_the_wrong_types_is_a_clear_refusal_not_a_crash(tmp_path, cache):
    """``"count": "many"`` (or a size that is text) in a prepared set's manifest made the data
    field's note raise ValueError/TypeError and Prepare's "already prepared" message fail; both now
    refuse the set as damaged, naming the field (the data field shows it, a job fails with it)."""
    import json

    from mae_core.checks import DataError
    from mae_core.preparing import _run, data_note
    from ui.datafield import data_info

    def whole_shards(folder: Path) -> Path:  # an index and its chunk: only the manifest is bad
        folder.mkdir(parents=True)
        (folder / "chunk-0-0.bin").write_bytes(b"abc")
        (folder / "index.json").write_text(json.dumps(
            {"chunks": [{"filename": "chunk-0-0.bin", "chunk_bytes": 3}],
             "config": {"data_format": ["int", "bytes", "bytes", "bytes"]}}))
        return folder

    folder = whole_shards(tmp_path / "prepared")
    for fields, reason in (({"count": "many"}, "records count 'many'"),
                           ({"count": 3, "bytes": "12 MB"}, "records bytes '12 MB'"),
                           ({"count": 3, "skipped": 1.5}, "records skipped 1.5"),
                           ({"count": -5}, "records count -5")):
        (folder / prepared.MANIFEST_NAME).write_text(json.dumps({"format": 2, **fields}))
        with pytest.raises(DataError, match=f"is damaged \\(its mae_manifest.json {reason}"):
            data_note(str(folder))
        assert "is damaged" in data_info(str(folder))  # a notice beside the field, no traceback
    photos = _copies(tmp_path / "photos", 2, (64, 48))  # its cache entry damaged the same way
    target = prepared.cache_dir(str(photos), sorted(photos.iterdir()), prepared.DEFAULT_SHORT_SIDE)
    whole_shards(target)
    (target / prepared.MANIFEST_NAME).write_text(json.dumps({"format": 2, "count": "many"}))
    progress = tmp_path / "progress"
    progress.mkdir()
    # The cache's copy of a folder still there is made again (as Start makes it), where Prepare
    # answered "already prepared" from its manifest alone.
    result = _run(str(photos), progress, workers=1)
    assert result["state"] == "done" and result["manifest"]["count"] == 2
    assert prepared.check_set(target)[0] is not None


def test_a_preparation_that_fills_the_disk_says_so_and_keeps_nothing(tmp_path, small_disk,
                                                                     monkeypatch):
    """The cache's disk fills up while the shards are written (a real 1 MB tmpfs): the job fails
    saying the disk is full, not with LitData's traceback, and leaves no partial set behind."""
    disk = small_disk(1)
    monkeypatch.setenv(prepared.CACHE_ENV, str(disk))  # the job inherits it
    jobs = Preparations()
    try:
        job = jobs.start(str(_copies(tmp_path / "photos", 40, (320, 240))))
        failed = _wait(job, lambda p: p.finished)
    finally:
        jobs.close()
    assert failed.state == "failed", failed
    assert failed.message.startswith("nothing was kept: the disk is full (the disk holding "
                                     f"{disk}"), failed.message
    assert failed.message.endswith("then prepare the folder again")
    assert [p for p in disk.iterdir() if p.is_dir()] == []  # no partial set, no temp folder


def test_a_preparation_says_how_far_it_got_every_few_seconds(tmp_path, capsys):
    """A long preparation in a terminal or a log: its own readable lines, summed over the
    encoding processes' counts (LitData's bar redraws with escapes a log file cannot show)."""
    from mae_core.preparing import reported_progress

    (tmp_path / "done-11").write_text("3")
    (tmp_path / "done-12").write_text("2")
    with reported_progress(tmp_path, total=20, every_s=0.05):
        time.sleep(0.2)
    lines = capsys.readouterr().out.splitlines()
    assert lines and set(lines) == {"encoded 5 of 20 images (25 %)"}


def test_the_commands_help_says_what_it_is_for(capsys):
    """README names ``python -m mae_core.preparing``; its help listed two bare positionals."""
    from mae_core.preparing import main

    with pytest.raises(SystemExit) as done:
        main(["--help"])
    said = capsys.readouterr().out
    assert done.value.code == 0
    assert "Prepare now" in said and "python -m mae_core.data optimize" in said
    assert "the image folder to prepare" in said
