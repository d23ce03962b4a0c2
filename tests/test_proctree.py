"""mae_core.proctree: a trainer and every rank it launched end, whoever leads them; no one else is
signalled. Real processes (``sh`` and ``sleep`` standing in for a trainer and its ranks)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from helpers import poll
from mae_core import process as proc
from mae_core import proctree


def test_kill_group_ends_every_process_of_the_group(tmp_path):
    # A shell with two background children stands in for a trainer and the ranks it spawned.
    leader = proc.launch(["sh", "-c", "sleep 300 & sleep 300 & wait"], tmp_path / "log")
    assert poll(lambda: len(proctree.group_members(leader.pid)) == 3, 30, 0.05)
    record = proc.process_record(leader.pid)
    proctree.terminate_group(leader.pid, str(int(record["start_time"]) + 1))  # not our process
    assert len(proctree.group_members(leader.pid)) == 3
    proctree.terminate_group(leader.pid, record["start_time"], grace_s=5)
    assert poll(lambda: not proctree.group_members(leader.pid), 30, 0.05)
    assert leader.wait(timeout=30) == -signal.SIGTERM


def test_kill_group_never_signals_its_callers_own_group_or_every_process(tmp_path):
    """Run in a child of its own session: had a hostile pid reached os.killpg, the child dies."""
    script = ("import os, signal; from mae_core import proctree\n"
              "for pid in (0, -1, 1, True, os.getpgrp()):\n"
              "    proctree.kill_group(pid, signal.SIGKILL)\n"
              "print('alive')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=proc.PROJECT_ROOT, start_new_session=True, timeout=60,
                          env=proc.clean_env())
    assert done.returncode == 0 and done.stdout.strip() == "alive", (done.returncode, done.stderr)


def test_a_trainer_started_inside_another_group_is_ended_with_its_ranks_alone(tmp_path):
    """A trainer started by hand from a script (or under timeout, nohup, torchrun) leads no group
    of its own: a group kill of its pid reached no one, so Force stop recorded "stopped" while it
    trained on. It and what it launched end; the script that started it goes on."""
    # Its two "ranks" ignore SIGTERM (as a rank busy in a collective may): SIGKILL ends them
    # after the trainer is gone, when they are no longer its children.
    ranks = "(trap '' TERM; sleep 300) & (trap '' TERM; sleep 300) & wait"
    script = proc.launch(["sh", "-c", f'sh -c "{ranks}"; echo script-goes-on'], tmp_path / "log")
    trainer = poll(lambda: next(iter(proctree.descendants(script.pid)), None), 30, 0.05)
    def sleeping_ranks() -> int:  # both sleeps forked (not just their subshells): none leaks
        return sum(Path(f"/proc/{p}/comm").read_text().strip() == "sleep"
                   for p in proctree.descendants(trainer) if Path(f"/proc/{p}/comm").exists())

    assert poll(lambda: sleeping_ranks() == 2, 30, 0.05)
    ranks = proctree.descendants(trainer)
    assert os.getpgid(trainer) == script.pid != trainer
    assert proctree.terminate_group(trainer, proc.process_start_time(trainer), grace_s=5)
    assert poll(lambda: not any(proc.pid_alive(pid) for pid in ranks), 10, 0.05)
    assert script.wait(timeout=30) == 0  # not signalled: it went on to its echo
    assert "script-goes-on" in (tmp_path / "log").read_text()


AGENT = """import os, signal, subprocess, sys, time
env = {**os.environ, "TORCHELASTIC_RUN_ID": "job"}
workers = [subprocess.Popen(["sleep", "300"], env=env) for _ in range(2)]
def end(*_):
    for worker in workers:
        worker.terminate()
    sys.exit(0)
signal.signal(signal.SIGTERM, end)
while True:
    time.sleep(1)
"""


def test_rank_0_of_a_torchrun_job_is_ended_with_its_sibling_ranks_through_the_agent(tmp_path):
    """Under torchrun the other ranks are rank 0's siblings, the agent's workers: a Force stop of
    rank 0 alone left them (and a --max-restarts agent started rank 0 again while the run read
    "stopped"). A stand-in agent, a script named torchrun started from a shell script."""
    agent_script = tmp_path / "torchrun"
    agent_script.write_text(AGENT)
    script = proc.launch(["sh", "-c", f"{sys.executable} {agent_script}; echo script-goes-on"],
                         tmp_path / "log")
    agent = poll(lambda: next(iter(proctree.descendants(script.pid)), None), 30, 0.05)
    assert poll(lambda: len(proctree.descendants(agent)) == 2, 30, 0.05)
    rank0, rank1 = sorted(proctree.descendants(agent))
    assert proctree.torchrun_agent(rank0) == (agent, proc.process_start_time(agent))
    assert proctree.torchrun_agent(agent) is None  # not a worker itself
    assert proctree.terminate_group(rank0, proc.process_start_time(rank0), grace_s=5)
    assert poll(lambda: not any(proc.pid_alive(p) for p in (rank1, agent)), 10, 0.05)
    assert script.wait(timeout=30) == 0 and "script-goes-on" in (tmp_path / "log").read_text()
