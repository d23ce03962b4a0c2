"""mae_core.process: launching, liveness and reaping, on real child processes (their ending:
test_proctree)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from helpers import poll
from mae_core import process as proc

PRINT_ENV = [sys.executable, "-c", "import json, os; print(json.dumps(dict(os.environ)))"]


def test_launch_gives_a_clean_environment_a_new_session_and_a_log_file(tmp_path, monkeypatch):
    # The app itself may run inside a launcher (torchrun, SLURM, a trainer's own environment):
    # a trainer it starts must not believe it is one of that job's ranks.
    for name in ("MAE_STUDIO_RUN_DIR", "RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK",
                 "MASTER_ADDR", "MASTER_PORT", "PL_GLOBAL_SEED"):
        monkeypatch.setenv(name, "7")
    monkeypatch.setenv("KEEP_ME", "yes")
    log = tmp_path / "train.log"
    log.write_text("earlier run\n")
    child = proc.launch(PRINT_ENV, log, cwd=tmp_path)
    assert os.getsid(child.pid) == child.pid  # its own session: one killpg ends all its ranks
    assert child.wait(timeout=60) == 0
    first, second = log.read_text().splitlines()[:2]
    assert first == "earlier run"  # appended, not truncated: a resume keeps the earlier log
    env = json.loads(second)
    assert not set(proc.LAUNCHER_VARS) & set(env)
    assert env["KEEP_ME"] == "yes" and env["PYTHONUNBUFFERED"] == "1"
    assert str(proc.PROJECT_ROOT) in env["PYTHONPATH"].split(os.pathsep)


def test_trainer_command_names_the_run_directory_absolutely(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    command = proc.trainer_command(Path("runs/a"), resume=True)
    assert command[1:4] == ["-m", "mae_core.train", "--run-dir"]
    assert command[4] == str(tmp_path / "runs" / "a") and command[-1] == "--resume"


def test_liveness_checks_the_start_time_and_counts_a_zombie_as_dead():
    me = proc.process_record()
    assert proc.record_alive(me) and proc.on_this_host(me)
    assert proc.pid_alive(os.getpid(), me["start_time"])
    assert not proc.pid_alive(os.getpid(), str(int(me["start_time"]) + 1))  # a recycled pid
    assert not proc.record_alive({"pid": "12"}) and not proc.pid_alive(0)
    assert not proc.on_this_host({"host": "another-node"})

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    start = proc.process_start_time(child.pid)
    try:
        # Exited but not reaped: /proc still lists it (state Z), yet it is dead.
        assert poll(lambda: child.pid in proc.zombie_children(), 30, 0.05)
        assert not proc.pid_alive(child.pid, start)
        assert proc.child_exit_code(child.pid) == 0
        assert child.pid in proc.zombie_children()  # asking did not reap it
    finally:
        child.wait()
    assert child.pid not in proc.zombie_children()
    assert proc.process_start_time(child.pid) is None


@pytest.mark.parametrize("how, code", [("exit", 3), ("kill", -signal.SIGKILL)])
def test_watch_reports_the_exit_and_reaps_the_child(tmp_path, how, code):
    script = "import sys; sys.exit(3)" if how == "exit" else "import time; time.sleep(300)"
    child = proc.launch([sys.executable, "-c", script], tmp_path / "log")
    seen: list[tuple[int, bool]] = []
    done = threading.Event()

    def on_exit(returncode: int) -> None:
        # Called before the reap: the pid is still this (dead) child's, so its group is ours.
        seen.append((returncode, child.pid in proc.zombie_children()))
        done.set()

    thread = proc.watch(child, on_exit)
    if how == "kill":
        assert proc.child_exit_code(child.pid) is None  # still running
        os.kill(child.pid, signal.SIGKILL)
    assert done.wait(60)
    thread.join(30)
    assert seen == [(code, True)]
    assert child.pid not in proc.zombie_children()  # reaped without anyone polling it


def test_a_rank_whose_launcher_is_already_gone_ends_at_once():
    """die_with_parent: a child whose parent is the one its launcher named lives on; one whose
    parent is no longer it (the launcher died while the child was starting) ends itself."""
    code = ("import sys; from mae_core.process import die_with_parent; "
            "print(die_with_parent(expected_parent=int(sys.argv[1])), flush=True)")
    env = proc.clean_env()
    lives = subprocess.run([sys.executable, "-c", code, str(os.getpid())], env=env,
                           capture_output=True, text=True, timeout=60)
    assert lives.returncode == 0 and lives.stdout.strip() == "True", lives.stderr
    orphan = subprocess.run([sys.executable, "-c", code, str(2**22 + 1)], env=env,
                            capture_output=True, text=True, timeout=60)
    assert orphan.returncode == -signal.SIGKILL and orphan.stdout == ""


@pytest.mark.parametrize("pid", [0, -1, 1, True, 2**22 + 1, 10**30, 3.0, "123", None])
def test_a_pid_read_from_disk_that_names_no_one_process_is_refused(pid):
    """process.json is a file anyone can edit: 0 names the caller's own process group to kill(),
    -1 every process, 1 init; ``true`` is an int to Python."""
    assert proc.valid_pid(pid) is None
    assert proc.record_pid({"pid": pid}) is None
    assert not proc.record_alive({"pid": pid})


def test_find_trainer_finds_the_leading_process_of_a_runs_trainer(tmp_path):
    """A relative --run-dir is read from the process's own working folder; a later rank
    (LOCAL_RANK=1, or another srun task of the job: SLURM_PROCID=1) leads nothing; other runs
    do not count, nor the trainer asking (``besides``), nor a launcher whose own arguments name
    the module (torchrun's ``-m mae_core.train``: the trainer it launched refused to resume)."""
    from helpers import stand_in_trainer

    run_dir = tmp_path / "runs" / "r1"
    run_dir.mkdir(parents=True)
    started = []

    def start(*args: str, **env: str) -> subprocess.Popen:
        started.append(stand_in_trainer(tmp_path, *args, **env))
        return started[-1]

    try:
        assert proc.find_trainer(run_dir) is None
        later = start("--run-dir", "runs/r1", LOCAL_RANK="1")
        task = start("--run-dir", str(run_dir), SLURM_PROCID="1", SLURM_LOCALID="1")
        start("--run-dir", str(tmp_path / "runs" / "other"))
        launcher = subprocess.Popen(  # as `python .../torchrun --nproc-per-node 2 -m ...` is
            [sys.executable, "-c", "import time; time.sleep(60)", "--nproc-per-node", "2", "-m",
             "mae_core.train", "--run-dir", str(run_dir)], cwd=tmp_path, env=proc.clean_env())
        started.append(launcher)
        for process in (later, task, launcher):
            poll(lambda: proc.pid_alive(process.pid) and Path(
                f"/proc/{process.pid}/cmdline").read_bytes().count(b"--run-dir"), 10)
        assert proc.find_trainer(run_dir) is None  # later ranks alone: its run has ended
        first = start("--run-dir=runs/r1")
        assert poll(lambda: proc.find_trainer(run_dir) == first.pid, 10)
        assert proc.find_trainer(run_dir, besides=first.pid) is None
    finally:
        for process in started:
            process.kill()
            process.wait()
    assert proc.find_trainer(run_dir) is None


def test_a_trainer_gets_no_pl_trainer_defaults_from_the_shell(monkeypatch):
    """Lightning fills every Trainer argument the code leaves out from ``PL_TRAINER_<ARG>``: with
    ``PL_TRAINER_FAST_DEV_RUN=1`` in the app's environment a 12-step run "finished" at step 1."""
    for name in ("PL_TRAINER_FAST_DEV_RUN", "PL_TRAINER_MAX_TIME", "PL_TRAINER_DETECT_ANOMALY",
                 "PL_TRAINER_LIMIT_TRAIN_BATCHES", "PL_TRAINER_GRADIENT_CLIP_VAL"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("PL_TORCH_DISTRIBUTED_BACKEND", "gloo")  # not a Trainer default: kept
    env = proc.clean_env()
    assert not [name for name in env if name.startswith("PL_TRAINER_")]
    assert env["PL_TORCH_DISTRIBUTED_BACKEND"] == "gloo"


@pytest.mark.parametrize("app_sees, gpus, trainer_gets", [
    (None, "0,1", "0,1"),  # every GPU visible: indices are the machine's
    ("2,3", "0,1", "2,3"),
    ("2,3", "1", "3"),
    ("4,5,6,7", "3,0", "7,4"),
    ("GPU-8f0a1b2c-1111-2222-3333-444455556666,GPU-0d9e8f7a-aaaa", "1",
     "GPU-0d9e8f7a-aaaa"),
    ("MIG-5c1a0b2d-1111-2222-3333-444455556666,MIG-7e2f3a4b-bbbb", "1,0",
     "MIG-7e2f3a4b-bbbb,MIG-5c1a0b2d-1111-2222-3333-444455556666"),
])
def test_a_runs_gpus_are_taken_from_the_gpus_the_app_sees(monkeypatch, app_sees, gpus,
                                                           trainer_gets):
    """``gpus`` are indices of the GPUs the app sees (they are validated against its device
    count): under ``CUDA_VISIBLE_DEVICES=2,3`` the trainer of ``gpus=0,1`` got ``0,1``, two GPUs
    the user had fenced off."""
    if app_sees is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", app_sees)
    env = proc.clean_env(CUDA_VISIBLE_DEVICES=gpus)
    assert env["CUDA_VISIBLE_DEVICES"] == trainer_gets
    # The trainer knows its list is already narrowed (it must not map "2,3" through itself again).
    for name in ("CUDA_VISIBLE_DEVICES", proc.GPUS_ENV):
        monkeypatch.setenv(name, env[name])
    assert proc.gpus_narrowed(gpus)
    assert not proc.gpus_narrowed("0")


@pytest.mark.parametrize("app_sees", ["2,3", "2,-1,5", "2,,5", ""])
def test_a_gpu_the_app_does_not_see_is_never_given_to_a_trainer(monkeypatch, app_sees):
    """CUDA reads its list up to the first entry that names no device: GPU 1 of ``2,-1,5`` does
    not exist, and passing "2" on would name a GPU outside the app's list. The error is an
    OSError, which the run manager records as a failed launch."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", app_sees)
    with pytest.raises(proc.GpuNotVisibleError, match=r"GPU 2 is named") as err:
        proc.clean_env(CUDA_VISIBLE_DEVICES="0,2" if app_sees == "2,3" else "2")
    assert isinstance(err.value, OSError)
    assert proc.clean_env(CUDA_VISIBLE_DEVICES="")["CUDA_VISIBLE_DEVICES"] == ""  # hides them all


def test_a_stale_narrowing_marker_does_not_count(monkeypatch):
    """A marker copied into a shell whose list has changed since says nothing about this one."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    monkeypatch.setenv(proc.GPUS_ENV, "0,1:2,3")
    assert not proc.gpus_narrowed("0,1")
    assert proc.GPUS_ENV not in proc.clean_env()  # a launch that names no GPUs drops it too


@pytest.mark.parametrize("args, module", [
    (["/usr/bin/python3", "-m", "mae_core.train", "--run-dir", "r"], "mae_core.train"),
    (["python", "-u", "-X", "dev", "-W", "ignore", "-m", "mae_core.train"], "mae_core.train"),
    (["python3.11", "-mmae_core.train"], "mae_core.train"),
    (["python", "/usr/local/bin/torchrun", "--nproc-per-node", "2", "-m", "mae_core.train"], None),
    (["srun", "python", "-m", "mae_core.train"], None),
    (["python", "-c", "pass", "-m", "mae_core.train"], None),
    ([], None),
])
def test_the_module_a_command_line_runs(args, module):
    assert proc.python_module(args) == module
