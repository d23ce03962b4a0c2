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

from mae_core import caches, datasource, prepared
from mae_core.data import find_images
from mae_core.rundir import RUN_DATA_NAME

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
    (runs_dir / name / RUN_DATA_NAME).write_text(json.dumps({"kind": "prepared", "path": str(data)}))


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
    assert datasource.describe(str(second)).count == 4  # the stopped run's set still reads
    assert caches.remove_superseded([runs]) == []  # nothing more to do


def _other_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "other"
    folder.mkdir()
    for i in range(2):
        _photo(folder / f"{i}.jpg", 20 + i)
    return folder


def test_the_command_line_lists_the_sets_and_removes_the_superseded(tmp_path, cache, capsys):
    first, _, newest = _three_versions(tmp_path / "photos")
    env = {**os.environ, prepared.CACHE_ENV: str(cache)}
    command = [sys.executable, "-m", "mae_core.data", "caches", "--runs-dir", str(tmp_path / "runs")]
    listing = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                             timeout=120, check=False)
    assert listing.returncode == 0, listing.stderr
    assert "3 prepared set(s)" in listing.stdout and listing.stdout.count("superseded") == 2
    assert f"{newest.name}: 4 images of {tmp_path / 'photos'}" in listing.stdout
    assert first.is_dir()  # listing removes nothing
    # The same command's removal, in this process (the command imports torch, ~5 s here).
    from mae_core import data_cli

    assert data_cli.main([*command[3:], "--remove-superseded"]) == 0
    removing = capsys.readouterr().out
    assert "removed 2 superseded set(s) no run uses" in removing, removing
    assert [c.path for c in caches.cached_sets([])] == [newest]


def test_a_run_in_another_runs_folder_keeps_its_set_until_it_is_deleted(tmp_path, cache):
    """The app knows its own runs folder only; a run trained from the command line elsewhere
    notes its use beside the set (datasource.run_data), so the set it would resume on is kept."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        _photo(folder / f"{i}.jpg", i)
    elsewhere = tmp_path / "elsewhere" / "cli-run"
    elsewhere.mkdir(parents=True)
    source = datasource.run_data(str(folder), elsewhere, auto_prepare_above=0)
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
    assert datasource.run_data(str(folder), elsewhere).path == source.path
    assert caches.remove_superseded([app_runs]) == [] and old.path.is_dir()
    shutil.rmtree(elsewhere)  # the run is deleted: its note no longer counts
    assert [c.path for c in caches.remove_superseded([app_runs])] == [old.path]
    assert not old.path.exists() and not (old.path.parent / f"{old.path.name}.runs").exists()
    assert newest.is_dir()


def _fake_set(cache: Path, name: str, written_s: int, **manifest) -> Path:
    """A whole set as check_set sees one (a manifest, an index and its one chunk) without LitData;
    ``written_s``: its manifest's time, which orders the sets."""
    folder = cache / name
    folder.mkdir(parents=True)
    (folder / "chunk-0-0.bin").write_bytes(b"abc")
    (folder / "index.json").write_text(json.dumps(
        {"chunks": [{"filename": "chunk-0-0.bin", "chunk_bytes": 3, "chunk_size": 1}],
         "config": {"compression": None, "data_format": ["int", "bytes", "bytes", "bytes"]}}))
    fields = {"format": 2, "source": "/data/photos", "count": 1, "bytes": 3, "created": "then"}
    (folder / prepared.MANIFEST_NAME).write_text(json.dumps({**fields, **manifest}))
    os.utime(folder / prepared.MANIFEST_NAME, (written_s, written_s))
    return folder


def test_a_damaged_entry_or_note_is_listed_as_such_and_breaks_nothing_else(tmp_path, cache):
    """One damaged entry broke the whole listing and Remove ("count": "x": ValueError; a source
    that is a list: unhashable; a run note {"run": 5} or a list: TypeError). Now a damaged set is
    listed with the reason and kept, a damaged note or data.json is skipped, the rest works."""
    old = _fake_set(cache, "photos-old", 1000)
    new = _fake_set(cache, "photos-new", 2000)
    damaged = {"count-x": {"count": "x"}, "source-list": {"source": ["a"]},
               "bytes-neg": {"bytes": -5}, "format-str": {"format": "2"}}
    for i, (name, fields) in enumerate(damaged.items()):
        _fake_set(cache, name, 3000 + i, **fields)  # newer than both: they must not supersede
    _fake_set(cache, "chunk-gone", 4000).joinpath("chunk-0-0.bin").unlink()
    notes = cache / "photos-old.runs"
    notes.mkdir()
    for i, note in enumerate(['{"run": 5}', "[1, 2]", '{"run": ["x"]}', '{"run": "a\\u0000b"}',
                              '{"run": ""}', "not json"]):
        (notes / f"{i}.json").write_text(note)
    runs = tmp_path / "runs"
    _run_on(runs, "good-run", new)
    (runs / "bad-run").mkdir()  # its data.json names nothing readable
    (runs / "bad-run" / RUN_DATA_NAME).write_text(json.dumps({"kind": "prepared", "path": 7}))
    (runs / "list-run").mkdir()
    (runs / "list-run" / RUN_DATA_NAME).write_text("[1]")
    listed = {c.path.name: c for c in caches.cached_sets([runs])}
    assert set(listed) == {"photos-old", "photos-new", *damaged, "chunk-gone"}
    assert listed["photos-old"].superseded and not listed["photos-new"].superseded
    assert listed["photos-old"].runs == () and listed["photos-new"].runs == (str(runs / "good-run"),)
    assert listed["count-x"].damage == f"its {prepared.MANIFEST_NAME} records count 'x', not a whole number of at least 1"
    assert "records source ['a'], not text" in listed["source-list"].damage
    assert "records bytes -5" in listed["bytes-neg"].damage
    assert listed["format-str"].damage == prepared.UNREADABLE
    assert listed["chunk-gone"].damage == "its chunk chunk-0-0.bin is missing"
    assert all(listed[name].damage and not listed[name].superseded for name in [*damaged, "chunk-gone"])
    assert listed["count-x"].source == "/data/photos" and listed["source-list"].source == ""
    assert listed["count-x"].bytes > 0  # measured on disk
    lines = caches.report([runs])
    assert sum("damaged (" in line for line in lines) == 5 and "7 prepared set(s)" in lines[0]
    assert [c.path for c in caches.remove_superseded([runs])] == [old]
    assert not old.exists() and not notes.exists() and new.is_dir()
    assert all((cache / name).is_dir() for name in [*damaged, "chunk-gone"])  # damaged: kept


def test_a_superseded_set_linked_into_the_cache_is_unlinked_never_followed(tmp_path, cache):
    """A set that is a symbolic link (moved to a bigger disk, linked back): Remove failed with
    "Cannot call rmtree on a symbolic link"; now the link goes and what it points to stays."""
    elsewhere = _fake_set(tmp_path / "big-disk", "photos-old", 1000)
    cache.mkdir()
    (cache / "photos-old").symlink_to(elsewhere, target_is_directory=True)
    (cache / "photos-old.runs").symlink_to(tmp_path / "big-disk", target_is_directory=True)
    new = _fake_set(cache, "photos-new", 2000)
    [linked] = [c for c in caches.cached_sets([]) if c.superseded]
    assert linked.path == cache / "photos-old" and linked.count == 1
    assert [c.path for c in caches.remove_superseded([])] == [cache / "photos-old"]
    assert not (cache / "photos-old").exists() and not (cache / "photos-old").is_symlink()
    assert not (cache / "photos-old.runs").is_symlink()
    assert (elsewhere / prepared.MANIFEST_NAME).is_file() and (elsewhere / "chunk-0-0.bin").is_file()
    assert [c.path for c in caches.cached_sets([])] == [new]


def test_a_killed_preparations_partial_shards_go_at_the_next_preparation(tmp_path, cache):
    """A Force stop during a large folder's preparation (SIGKILL to its process group) left its
    ``.<set>.tmp-<pid>`` in the cache, partial shards up to the set's size, for good."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        _photo(folder / f"{i}.jpg", i)
    target = prepared.cache_dir(str(folder), find_images(str(folder)), prepared.DEFAULT_SHORT_SIDE)
    abandoned = target.parent / f".{target.name}.tmp-4242"
    (abandoned / "chunk-0-0.bin").parent.mkdir(parents=True)
    (abandoned / "chunk-0-0.bin").write_bytes(b"\0" * 1024)
    other = target.parent / f".{target.name}x.tmp-4242"  # another set's: not this one's to remove
    other.mkdir()
    assert prepared.prepare_cached(str(folder), workers=1) == target
    assert not abandoned.exists() and other.is_dir()
    assert prepared.check_set(target)[0] is not None
