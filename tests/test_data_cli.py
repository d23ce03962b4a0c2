"""The data command line (mae_core/data_cli.py): ``python -m mae_core.data optimize`` prepares a
folder, counting the files it skipped, in its own progress lines; bad input is refused with exit
code 2 and one line."""

from __future__ import annotations

import pytest

from mae_core.data import check_data
from mae_core.data_cli import main as data_main
from tests.test_data import _photo


def test_optimize_command_prepares_a_folder_counts_skipped_and_refuses_bad_input(run_module,
                                                                                  tmp_path, capsys):
    for i in range(3):
        _photo(tmp_path / "src" / "sub" / f"{i}.png", seed=i)  # found recursively
    (tmp_path / "src" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    out = tmp_path / "prepared"
    result = run_module("mae_core.data", "optimize", tmp_path / "src", out, "--workers", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "prepared 3 images (1 skipped: unreadable)" in result.stdout
    # Its own lines only: LitData's advert, per-worker chatter and redrawn bar read as noise
    # (and escapes in a log file).
    assert result.stdout.startswith(f"preparing 4 images of {tmp_path / 'src'} into {out} (1 "
                                    "encoding process)\n"), result.stdout
    assert "lightning.ai" not in result.stdout + result.stderr
    assert "\r" not in result.stdout + result.stderr and "\x1b" not in result.stdout + result.stderr
    summary = check_data(str(out))  # a prepared directory is a data set too
    assert summary.files == 3
    # The refusals through the same main(), in this process (the command's entry point is proven
    # above; a process each would only import torch again): exit 2, one line, no traceback.
    for args, message in [((tmp_path / "src", out), "already exists"),
                          ((tmp_path / "src", tmp_path / "x", "--short-side", "64"),
                           "at least 256"),
                          ((tmp_path / "nope", tmp_path / "y"), "does not exist"),
                          # an output that cannot be a folder: a file, a path under a file
                          ((tmp_path / "src", tmp_path / "src" / "broken.jpg"),
                           "cannot be written"),
                          ((tmp_path / "src", tmp_path / "src" / "broken.jpg" / "x"),
                           "cannot be written")]:
        with pytest.raises(SystemExit) as refused:
            data_main(["optimize", *map(str, args)])
        assert refused.value.code == 2
        err = capsys.readouterr().err
        assert message in err and err.startswith("error: ") and "Traceback" not in err


def test_ctrl_c_while_the_images_are_encoded_exits_130_and_keeps_nothing(tmp_path):
    """Ctrl+C while LitData encoded (its handler: ``os._exit(0)``) exited 0, as a success, and left
    the half-written ``.OUT.tmp-<pid>`` folder beside OUT."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import numpy as np
    from PIL import Image

    from helpers import REPO_ROOT, poll
    from mae_core.proctree import descendants

    source = tmp_path / "src"
    source.mkdir()
    noise = np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8)
    for i in range(3000):  # a few seconds of encoding by one process
        Image.fromarray(np.roll(noise, i, axis=1)).save(source / f"{i:04d}.png", compress_level=0)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "mae_core.data", "optimize", str(source),
                             str(out), "--workers", "1"], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        # LitData forks its encoding process once its handler is in place: Ctrl+C then.
        assert poll(lambda: descendants(proc.pid), 120, every_s=0.02), proc.communicate()[0]
        time.sleep(0.3)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl+C sends
        output, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, output
    assert output.endswith(f"interrupted: nothing was written to {out}\n"), output
    assert "Traceback" not in output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no OUT, no .out.tmp-<pid>
    assert poll(lambda: not _commands_naming(str(out)) or None, 30), "an encoding process is left"


def _commands_naming(text: str) -> list[str]:
    """The command lines of this machine's processes that hold ``text``."""
    from pathlib import Path

    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            command = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        if text in command:
            found.append(command)
    return found
