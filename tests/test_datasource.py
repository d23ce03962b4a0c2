"""What a run trains on (mae_core/datasource.py): ``--data`` resolves to a folder in memory, a
prepared set (the cache's, made when missing) or a URL; ``<run>/data.json`` is written by the job's
first process and read, in one place, by every other rank, a damaged record as none."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from mae_core import datasource, prepared
from mae_core.data import DataError, check_data
from mae_core.rundir import RUN_DATA_NAME
from tests.test_prepared import _photos


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(prepared.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_data_resolves_to_memory_prepared_cache_or_remote(tmp_path, cache):
    small = datasource.describe("")  # the 17 embedded photos stay on the in-memory path
    assert small.kind == "memory" and small.files == 17
    folder = _photos(tmp_path / "photos", 6)
    assert datasource.describe(str(folder), auto_prepare_above=5).kind == "folder"  # not yet
    found = datasource.resolve(str(folder), workers=1, auto_prepare_above=5)
    assert found.kind == "prepared" and found.count == 6 and found.source == str(folder)
    assert Path(found.path).parent == cache
    again = datasource.describe(str(folder), auto_prepare_above=5)  # found in the cache now
    assert again.kind == "prepared" and again.path == found.path
    assert datasource.describe(found.path).kind == "prepared"
    assert check_data(found.path).files == 6
    assert datasource.describe("s3://bucket/set").kind == "remote"
    manifest_path = Path(found.path) / prepared.MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    assert manifest["format"] == 2 and manifest["mid_side"] == 317
    for version, readable in ((1, True), (3, False)):  # a set of the previous layout still reads
        manifest_path.write_text(json.dumps({**manifest, "format": version}))
        if readable:
            assert datasource.describe(found.path).count == 6
        else:
            with pytest.raises(DataError, match="prepare it again"):
                datasource.describe(found.path)
    with pytest.raises(DataError, match="prepare it again"):
        (Path(found.path) / prepared.MANIFEST_NAME).write_text("{}")
        datasource.describe(found.path)


def test_a_damaged_run_data_record_reads_as_missing_or_its_count_as_unknown(tmp_path,
                                                                           monkeypatch):
    """``<run>/data.json`` is read in one place (datasource.read_run_data): a kind, path or source
    of another type is no record (the first process decides again, the other ranks keep waiting);
    a count of another type is unknown. Nothing else is raised."""
    from mae_core.fileio import atomic_write_json

    run = tmp_path / "run"
    run.mkdir()
    record = run / RUN_DATA_NAME
    base = {"kind": "prepared", "path": "/data/prep", "source": "/data/prep"}
    for bad in ({"count": "many"}, {"count": -5}, {"count": 1e400}, {"files": [1]},
                {"skipped": True}, {"bytes": 2.5}, {"short_side": {}}):
        atomic_write_json(record, {**base, "count": 7, **bad})
        found = datasource.read_run_data(run)
        assert found is not None and found.path == "/data/prep"
        assert all(getattr(found, key) is None for key in bad)
    atomic_write_json(record, {**base, "count": 7, "future_field": 1})  # another version's extra
    assert datasource.read_run_data(run).count == 7
    for damaged in ({**base, "kind": ["prepared"]}, {**base, "kind": "folder"},
                    {**base, "path": 5}, {**base, "source": {"a": 1}}, {**base, "path": "a\0b"},
                    {"path": "/data/prep"}):
        atomic_write_json(record, damaged)
        assert datasource.read_run_data(run) is None
        monkeypatch.setenv("RANK", "1")  # waits for a record; gives up on time, no TypeError
        atomic_write_json(run / "status.json", {"state": "failed", "updated": "soon"})
        with pytest.raises(DataError, match="recorded no data set"):
            datasource.run_data("", run, timeout_s=0.3)
        monkeypatch.setenv("RANK", "0")  # the first process records the set afresh
        assert datasource.run_data("", run).kind == "memory"
        assert datasource.read_run_data(run).source == ""
    record.write_text("[1, 2]")
    assert datasource.read_run_data(run) is None
    assert datasource.read_run_data(tmp_path / "none") is None


def test_the_first_process_records_the_run_data_and_the_other_ranks_read_it(tmp_path,
                                                                           monkeypatch):
    from mae_core.fileio import atomic_write_json

    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.setenv("RANK", "1")  # a torchrun rank: waits for the record
    atomic_write_json(run / "status.json", {"state": "failed", "error": "disk full",
                                            "updated": 1.0})
    with pytest.raises(DataError, match="recorded no data set"):  # an old failure is not this one
        datasource.run_data("", run, timeout_s=1.0)
    atomic_write_json(run / "status.json", {"state": "failed", "error": "disk full",
                                            "updated": time.time()})
    with pytest.raises(DataError, match="disk full"):
        datasource.run_data("", run, timeout_s=30.0)
    # The run folder moved away while a rank waited: said at once, not after the 6 h wait.
    moved = run.rename(tmp_path / "moved")
    with pytest.raises(DataError, match=r"run folder .*/run went \(moved or deleted\)"):
        datasource.run_data("", run, timeout_s=5.0)
    moved.rename(run)
    monkeypatch.setenv("RANK", "0")
    first = datasource.run_data("", run)
    assert first.kind == "memory" and (run / RUN_DATA_NAME).is_file()
    monkeypatch.setenv("RANK", "1")
    assert datasource.run_data("", run, timeout_s=1.0) == first
