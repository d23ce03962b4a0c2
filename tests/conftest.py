"""Shared by the test files: run ``python -m mae_core.<module>`` as a real process from the repo root."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch  # loaded before OMP_NUM_THREADS is set (below): keeps its threads

from mae_core.process import clean_env

# One OpenMP thread in each process the tests start (this one keeps its own: set after torch has
# loaded). The suite runs processes side by side on a few cores, where a trainer with as many
# threads as cores collapses: its threads spin at every barrier while the thread they wait for
# waits for a core. test_channels' two 1-process trainers took 39 s at 2 threads each, 8 s at 1
# (python -m bench.contention measures one run beside a busy process).
os.environ["OMP_NUM_THREADS"] = "1"

# The machine's list of runs folders (mae_core.runsdirs) is this test process's own, and each
# test's own (the autouse fixture below): the two workers' runs, and runs a test left looking live
# (a process record of the test process itself), would otherwise refuse other tests' runs as
# sharing devices; the user's own list (~/.cache) is never touched.
os.environ["MAE_STUDIO_RUNS_DIRS"] = os.path.join(
    tempfile.gettempdir(), f"mae-studio-tests-{os.getpid()}", "runs-dirs.json")


@pytest.fixture(autouse=True)
def own_runs_dirs_list(tmp_path, monkeypatch):
    monkeypatch.setenv("MAE_STUDIO_RUNS_DIRS", str(tmp_path / "machine-runs-dirs.json"))

# pytest.ini runs the test files in worker processes side by side (pytest-xdist): each worker's
# own torch gets its share of the cores, for the same reason.
if (workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))) > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))

REPO_ROOT = Path(__file__).resolve().parent.parent
SUBPROCESS_TIMEOUT_S = 300



def _run_module(module: str, *args: str, timeout_s: float = SUBPROCESS_TIMEOUT_S,
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m module args...`` in the repo root; stdout and stderr captured as text; ``env``:
    variables set for this command alone.

    The command gets its own process group, so DDP ranks it launched cannot outlive the test: the
    group is killed once the command has returned (or timed out).
    """
    env = clean_env(**(env or {}))  # no launcher variables: a fresh trainer is no one's rank
    proc = subprocess.Popen([sys.executable, "-m", module, *map(str, args)], cwd=REPO_ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"python -m {module} {' '.join(map(str, args))} ran past "
                             f"{timeout_s} s\n--- stderr ---\n{stderr[-4000:]}") from None
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # leftover ranks of this command only
        except (ProcessLookupError, PermissionError):
            pass
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.fixture(scope="session")
def run_module():
    """The helper that runs ``python -m <module> [args]`` from the repo root (see ``_run_module``)."""
    return _run_module


@pytest.fixture
def ctx(tmp_path):
    """The UI's context over a real run manager in an empty runs directory."""
    from mae_core.runs import RunManager
    from ui.common import AppContext

    return AppContext(RunManager(tmp_path / "runs"))


@pytest.fixture
def stand_in():
    """A real process standing in for a live trainer; ended by its own pid after the test."""
    process = subprocess.Popen(["sleep", "300"], start_new_session=True)
    yield process
    process.kill()
    process.wait()


@pytest.fixture
def small_disk(tmp_path):
    """``small_disk(mb)``: a fresh folder on its own ``mb`` MB file system, unmounted after."""
    mounted = []

    def mount(size_mb: int) -> Path:
        if os.geteuid() != 0:  # the one missing resource this skips for; CI runs as root
            pytest.skip("mounting a small tmpfs needs root (CI and this project's machines are)")
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs",
                               str(where)], capture_output=True, text=True)
        assert done.returncode == 0, f"root could not mount a tmpfs: {done.stderr.strip()}"
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)
