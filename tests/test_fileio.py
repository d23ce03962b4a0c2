"""Atomic writes: a kill or an error mid-write keeps the previous file, and leftovers are cleaned."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers import poll
from mae_core.fileio import (NotRegularFileError, atomic_write, atomic_write_text, is_temp_file,
                             open_regular, read_json, remove_stale_temp_files)

REPO_ROOT = Path(__file__).resolve().parent.parent

# A writer that dies (kill -9) halfway through its write: 1 MB written, the rest never comes.
HALF_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from mae_core.fileio import atomic_write

    target, ready = sys.argv[1], Path(sys.argv[2])

    def write(tmp):
        with open(tmp, "wb") as handle:
            handle.write(b"new" * 350_000)
            handle.flush()
            ready.write_text(tmp)
            time.sleep(120)
            handle.write(b"never")

    atomic_write(target, write)
""")


def _temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if is_temp_file(p)]


def test_a_kill_mid_write_keeps_the_previous_file_and_the_leftover_is_removed(tmp_path):
    target = tmp_path / "run" / "last.ckpt"
    atomic_write_text(target, "previous checkpoint")
    ready = tmp_path / "ready"
    writer = subprocess.Popen([sys.executable, "-c", HALF_WRITER, str(target), str(ready)],
                              cwd=REPO_ROOT)
    try:
        assert poll(ready.exists, timeout_s=120), "the writer never started writing"
        tmp = Path(ready.read_text())
        assert tmp.parent == target.parent and tmp.stat().st_size > 1_000_000  # beside, not $TMPDIR
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    finally:
        writer.kill()
        writer.wait()
    assert target.read_text() == "previous checkpoint"
    assert _temp_files(tmp_path / "run") == [tmp]  # what a kill leaves behind...
    assert remove_stale_temp_files(tmp_path / "run") == [tmp]  # ...until the next start
    assert _temp_files(tmp_path / "run") == []
    assert target.read_text() == "previous checkpoint"


def test_an_error_inside_the_write_keeps_the_previous_file_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "model.safetensors"
    atomic_write_text(target, "previous weights")

    def failing_write(tmp: str) -> None:
        Path(tmp).write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, failing_write)
    assert target.read_text() == "previous weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_writes_never_touch_tmpdir(tmp_path, monkeypatch):
    # The kill-9 hazard of Lightning's own IO was a temp file in $TMPDIR moved across file systems.
    tmpdir = tmp_path / "elsewhere"
    tmpdir.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    monkeypatch.setattr("tempfile.tempdir", None)  # forget the cached default, read TMPDIR again
    for i in range(3):
        atomic_write_text(tmp_path / "run" / "status.json", f"{i}")
    assert list(tmpdir.iterdir()) == []
    assert (tmp_path / "run" / "status.json").read_text() == "2"
    assert _temp_files(tmp_path / "run") == []


def test_temp_files_of_live_writers_are_kept_and_of_dead_or_zombie_ones_removed(tmp_path):
    alive = subprocess.Popen(["sleep", "120"])
    zombie = subprocess.Popen(["true"])
    try:
        poll(lambda: Path(f"/proc/{zombie.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
             == "Z", timeout_s=30)
        live_tmp = tmp_path / f".status.json.{alive.pid}.abcd1234.tmp"
        zombie_tmp = tmp_path / "previews" / f".step_0000010.png.{zombie.pid}.abcd1234.tmp"
        old_style = tmp_path / ".last.ckpt.x7_k2m9q.tmp"  # an older version's name, no pid
        library = tmp_path / ".tmpXw6B6M"  # safetensors' own, left by an older version's weights
        for path in (live_tmp, zombie_tmp, old_style, library):
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(b"partial")
        (tmp_path / "last.ckpt").write_bytes(b"kept")
        removed = remove_stale_temp_files(tmp_path)
        assert sorted(removed) == sorted([zombie_tmp, old_style, library])
        assert live_tmp.exists() and (tmp_path / "last.ckpt").read_bytes() == b"kept"
    finally:
        alive.kill()
        alive.wait()
        zombie.wait()
    assert remove_stale_temp_files(tmp_path) == [live_tmp]  # its writer is gone now


def test_only_regular_files_are_opened_for_reading_and_a_fifo_never_blocks(tmp_path):
    """A FIFO put in place of a run's file blocked its reader forever at open(): open_regular
    opens it without blocking and refuses it, as it does a folder."""
    fifo, folder, plain = tmp_path / "status.json", tmp_path / "folder", tmp_path / "plain.json"
    os.mkfifo(fifo)
    folder.mkdir()
    plain.write_text('{"state": "running"}')
    for other in (fifo, folder):
        with pytest.raises(NotRegularFileError, match="not a regular file"):
            open_regular(other)
        assert read_json(other) is None
    with open_regular(plain) as handle:
        assert handle.read() == b'{"state": "running"}'
    assert read_json(plain) == {"state": "running"}
    with pytest.raises(FileNotFoundError):
        open_regular(tmp_path / "missing")


def test_a_link_in_a_files_place_is_never_followed_a_linked_folder_is(tmp_path):
    """A run's file linked to one outside the runs folder was read (shown, served) and appended
    to. A linked run folder (the app supports one) is still read through its link."""
    outside = tmp_path / "secret.txt"
    outside.write_text('{"password": "hunter2"}')
    run = tmp_path / "run"
    run.mkdir()
    (run / "status.json").symlink_to(outside)
    for append in (False, True):
        with pytest.raises(NotRegularFileError, match="not a regular file"):
            open_regular(run / "status.json", append=append)
    assert read_json(run / "status.json") is None
    assert outside.read_text() == '{"password": "hunter2"}'
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "status.json").write_text('{"state": "running"}')
    (tmp_path / "linked").symlink_to(tmp_path / "real")
    assert read_json(tmp_path / "linked" / "status.json") == {"state": "running"}


def test_a_refused_write_names_the_file_not_its_temp_file(tmp_path):
    """A resume on a read-only mount said ".config.yaml.20919.808vl1zc.tmp cannot be changed":
    the error names the file being written, whatever step of the write failed."""
    target = tmp_path / "not-a-folder" / "config.yaml"
    target.parent.write_text("a file where the run folder should be")
    with pytest.raises(NotADirectoryError) as raised:
        atomic_write_text(target, "x", make_dirs=False)
    assert raised.value.filename == str(target)

    def refused(tmp: str) -> None:
        raise PermissionError(13, "Permission denied", tmp)

    target = tmp_path / "status.json"
    with pytest.raises(PermissionError) as raised:
        atomic_write(target, refused)
    assert raised.value.filename == str(target) and not list(tmp_path.glob(".status.json*"))


def test_a_line_appended_after_a_half_line_is_kept_whole(tmp_path):
    """A metrics.jsonl left ending mid-line (a half line pasted or cut by hand) had the trainer's
    next line glued to it: that step's line was lost, read as garbage."""
    from mae_core.fileio import append_lines
    from mae_core.rundir import RunPaths

    paths = RunPaths(tmp_path)
    append_lines(paths.metrics, ['{"step": 1, "loss": 1.0}'])
    with open(paths.metrics, "a") as handle:
        handle.write('{"step": 2, "lo')
    append_lines(paths.metrics, ['{"step": 2, "loss": 0.9}', '{"step": 3, "loss": 0.8}'])
    assert [row["step"] for row in paths.read_metrics()] == [1, 2, 3]
    assert paths.metrics.read_text().endswith('"loss": 0.8}\n')
    append_lines(tmp_path / "new.jsonl", ["{}"])  # a new file or a whole last line: as it was
    append_lines(tmp_path / "new.jsonl", ["{}"])
    assert (tmp_path / "new.jsonl").read_text() == "{}\n{}\n"
