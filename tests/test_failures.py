"""What a run's record says when it ended badly: a full disk, a taken port, a SIGTERM."""

from __future__ import annotations

import torch

from helpers import resume_state
from mae_core.failures import TERMINATED, failure_text, port_taken, termination_text
from mae_core.rundir import RunPaths


def test_failure_text_names_a_full_disk_whatever_raised_it(tmp_path):
    paths = RunPaths(tmp_path)
    wrapped = RuntimeError("enforce fail at inline_container.cc:672 . unexpected pos 576 vs 534")
    wrapped.__cause__ = OSError(28, "No space left on device")
    assert failure_text(paths, wrapped).startswith("the disk is full")
    assert failure_text(paths, ValueError("bad value")) == "ValueError: bad value"
    assert "is intact" not in failure_text(paths, wrapped)  # there is no checkpoint to speak of


def test_a_taken_port_is_one_line_naming_the_variable(monkeypatch):
    monkeypatch.setenv("MASTER_PORT", "29500")
    err = RuntimeError("The server socket has failed to listen on any local network address. "
                       "port: 29500, useIpv6: false, code: -98, name: EADDRINUSE, message: "
                       "address already in use")
    assert port_taken(err) == ("MASTER_PORT=29500 is in use by another process: unset "
                               "MASTER_PORT (a free port is then chosen) or give a free one")
    assert failure_text(RunPaths("."), err) == port_taken(err)
    assert port_taken(ValueError("bad value")) is None


def test_a_sigterm_says_where_resume_takes_the_run_up(tmp_path):
    paths = RunPaths(tmp_path)
    assert termination_text(paths) == f"{TERMINATED}; it had saved no checkpoint: start it again"
    torch.save({"global_step": 7, "epoch": 0, "state_dict": {}, "pytorch-lightning_version": "2",
                "loops": {}, **resume_state()}, paths.last_ckpt)
    assert termination_text(paths) == f"{TERMINATED}; Resume continues from step 7"
