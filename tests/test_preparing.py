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

from mae_core import prepared
from mae_core.preparing import Preparation, Preparations
from mae_core.process import group_members


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
        found = prepared.describe(str(folder), auto_prepare_above=10)
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
        assert prepared.describe(str(folder), auto_prepare_above=10).kind == "folder"
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
