"""The automatic data cache's housekeeping: a folder changed twice leaves three prepared sets; only
the superseded ones no run names are removed, never the newest, never one a run would resume on,
never one being prepared."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mae_core import caches, prepared

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(prepared.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def _photo(path: Path, seed: int) -> None:
    pixels = np.random.default_rng(seed).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _three_versions(folder: Path) -> list[Path]:
    """The cache of ``folder`` as it is prepared, then after a file is added, then touched."""
    folder.mkdir()
    for i in range(3):
        _photo(folder / f"{i}.jpg", i)
    versions = [prepared.prepare_cached(str(folder), workers=1)]
    _photo(folder / "added.jpg", 9)
    versions.append(prepared.prepare_cached(str(folder), workers=1))
    stat = (folder / "0.jpg").stat()
    os.utime(folder / "0.jpg", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    versions.append(prepared.prepare_cached(str(folder), workers=1))
    assert len(set(versions)) == 3 and all(v.is_dir() for v in versions)
    return versions


def _run_on(runs_dir: Path, name: str, data: Path) -> None:
    """A run directory whose data.json names ``data`` (as the trainer records it)."""
    (runs_dir / name).mkdir(parents=True)
    (runs_dir / name / prepared.RUN_DATA_NAME).write_text(json.dumps({"kind": "prepared", "path": str(data)}))


def test_superseded_sets_no_run_names_are_removed_and_nothing_else(tmp_path, cache):
    first, second, newest = _three_versions(tmp_path / "photos")
    other = prepared.prepare_cached(str(_other_folder(tmp_path)), workers=1)  # another source
    runs = tmp_path / "runs"
    _run_on(runs, "stopped-run", second)  # a stopped run resumes on exactly this set
    listed = {c.path: c for c in caches.cached_sets([runs])}
    assert set(listed) == {first, second, newest, other}
    assert [listed[p].superseded for p in (first, second, newest, other)] == [True, True, False, False]
    assert listed[second].runs == (str(runs / "stopped-run"),) and listed[first].runs == ()
    assert listed[newest].count == 4 and listed[first].count == 3

    # a preparation's lock held (another process working on that set): kept this time
    with open(cache / f"{first.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert caches.remove_superseded([runs]) == []
    removed = caches.remove_superseded([runs])
    assert [c.path for c in removed] == [first] and not first.exists()
    assert second.is_dir() and newest.is_dir() and other.is_dir()
    assert prepared.describe(str(second)).count == 4  # the stopped run's set still reads
    assert caches.remove_superseded([runs]) == []  # nothing more to do


def _other_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "other"
    folder.mkdir()
    for i in range(2):
        _photo(folder / f"{i}.jpg", 20 + i)
    return folder


def test_the_command_line_lists_the_sets_and_removes_the_superseded(tmp_path, cache):
    first, _, newest = _three_versions(tmp_path / "photos")
    env = {**os.environ, prepared.CACHE_ENV: str(cache)}
    command = [sys.executable, "-m", "mae_core.data", "caches", "--runs-dir", str(tmp_path / "runs")]
    listing = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                             timeout=120, check=False)
    assert listing.returncode == 0, listing.stderr
    assert "3 prepared set(s)" in listing.stdout and listing.stdout.count("superseded") == 2
    assert f"{newest.name}: 4 images of {tmp_path / 'photos'}" in listing.stdout
    assert first.is_dir()  # listing removes nothing
    removing = subprocess.run([*command, "--remove-superseded"], cwd=REPO_ROOT, env=env,
                              capture_output=True, text=True, timeout=120, check=False)
    assert "removed 2 superseded set(s) no run uses" in removing.stdout, removing.stdout
    assert [c.path for c in caches.cached_sets([])] == [newest]


def test_a_run_in_another_runs_folder_keeps_its_set_until_it_is_deleted(tmp_path, cache):
    """The app knows its own runs folder only; a run trained from the command line elsewhere
    notes its use beside the set (prepared.run_data), so the set it would resume on is kept."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        _photo(folder / f"{i}.jpg", i)
    elsewhere = tmp_path / "elsewhere" / "cli-run"
    elsewhere.mkdir(parents=True)
    source = prepared.run_data(str(folder), elsewhere, auto_prepare_above=0)
    assert source.kind == "prepared"
    _photo(folder / "added.jpg", 9)
    newest = prepared.prepare_cached(str(folder), workers=1)
    app_runs = tmp_path / "app-runs"
    app_runs.mkdir()
    [old] = [c for c in caches.cached_sets([app_runs]) if c.superseded]
    assert old.path == Path(source.path) and old.runs == (os.path.realpath(elsewhere),)
    assert caches.remove_superseded([app_runs]) == [] and old.path.is_dir()
    # resumed, the run notes it again (a run recorded before this note existed gets one too)
    shutil.rmtree(old.path.parent / f"{old.path.name}.runs")
    assert prepared.run_data(str(folder), elsewhere).path == source.path
    assert caches.remove_superseded([app_runs]) == [] and old.path.is_dir()
    shutil.rmtree(elsewhere)  # the run is deleted: its note no longer counts
    assert [c.path for c in caches.remove_superseded([app_runs])] == [old.path]
    assert not old.path.exists() and not (old.path.parent / f"{old.path.name}.runs").exists()
    assert newest.is_dir()
