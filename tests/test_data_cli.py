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
