"""The run manager: starts, stops, resumes and watches training processes; its state is the disk.

The UI calls this and nothing below it. Each run is a ``python -m mae_core.train`` process in its own
session (so stopping it can end every DDP rank at once), with its output in ``train.log``. A new
manager (an app restart) re-attaches to live runs from ``process.json`` and reports runs whose
process died without finishing as ``failed``, with the log tail.

Example:
    >>> manager = RunManager("checkpoints")
    >>> run_id = manager.start(RunConfig())
    >>> manager.metrics(run_id, since_step=-1)[-1]  # {"step": ..., "loss": ..., "lr": ...}
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

from mae_core.config import RunConfig
from mae_core.data import check_data
from mae_core.fileio import atomic_write_json, read_json
from mae_core.rundir import LIVE_STATES, RunPaths, new_run_id, process_record, process_start_time
from mae_core.weights import export_encoder, timm_snippet

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# A run on another node counts as alive while its status.json was rewritten this recently.
REMOTE_SILENCE_S = 600.0
# A run with no recorded process yet counts as alive this long after it was created.
LAUNCH_GRACE_S = 30.0


class RunError(RuntimeError):
    """A request the manager refuses; the message says why, for a person to read."""


class RunManager:
    """Owns the training processes of one runs directory.

    Args:
        runs_dir: where run directories live (``checkpoints/`` by default).
        stop_timeout_s: how long a graceful stop may take before the process group is terminated.
    """

    def __init__(self, runs_dir: str | Path = "checkpoints", stop_timeout_s: float = 60.0) -> None:
        self.runs_dir = Path(runs_dir)
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.stop_timeout_s = stop_timeout_s
        self._processes: dict[str, subprocess.Popen] = {}
        self._lock = threading.RLock()

    # --- queries ------------------------------------------------------------------------------

    def paths(self, run_id: str) -> RunPaths:
        if not run_id or "/" in run_id or run_id.startswith("."):
            raise RunError(f"no run named {run_id!r}")
        paths = RunPaths(self.runs_dir / run_id)
        if not paths.config.exists():
            raise RunError(f"no run named {run_id!r} in {self.runs_dir}")
        return paths

    def status(self, run_id: str) -> dict[str, Any]:
        """The run's status.json, corrected for a process that died without saying so."""
        with self._lock:
            paths = self.paths(run_id)
            status = paths.read_status()
            if status.get("state") in LIVE_STATES and not self._alive(paths):
                status = self._mark_dead(paths)
        status["run_id"] = run_id
        status["stop_requested"] = paths.stop_request.exists()
        status["resumable"] = (status.get("state") in ("stopped", "failed")
                               and paths.last_ckpt.exists())
        return status

    def list(self) -> list[dict[str, Any]]:
        """Every run, newest first."""
        runs = []
        for root in self.runs_dir.iterdir():
            if (root / "config.yaml").exists():
                try:
                    runs.append(self.status(root.name))
                except RunError:
                    continue
        return sorted(runs, key=lambda s: (s.get("created") or 0, s["run_id"]), reverse=True)

    def live_run(self) -> str | None:
        for status in self.list():
            if status.get("state") in LIVE_STATES:
                return status["run_id"]
        return None

    def config(self, run_id: str) -> RunConfig:
        return RunConfig.load(self.paths(run_id).config)

    def metrics(self, run_id: str, since_step: int = -1) -> list[dict[str, Any]]:
        return self.paths(run_id).read_metrics(since_step)

    def previews(self, run_id: str) -> list[Path]:
        return sorted(self.paths(run_id).previews.glob("step_*.png"))

    def weights(self, run_id: str) -> Path:
        path = self.paths(run_id).weights
        if not path.exists():
            raise RunError(f"run {run_id} has no saved weights yet")
        return path

    # --- actions ------------------------------------------------------------------------------

    def start(self, cfg: RunConfig) -> str:
        """Validate ``cfg`` and its data, then launch it; refused while another run is live."""
        with self._lock:
            self._refuse_if_live()
            cfg = cfg.resolved()
            check_data(cfg.train.data)
            run_id = new_run_id(self.runs_dir, cfg.model.preset, cfg.model.policy)
            paths = RunPaths(self.runs_dir / run_id)
            paths.root.mkdir(parents=True)
            cfg.save(paths.config)
            paths.write_status(state="starting", step=0, total_steps=cfg.train.max_steps,
                               preset=cfg.model.preset, policy=cfg.model.policy, created=time.time())
            self._launch(paths, resume=False)
            return run_id

    def stop(self, run_id: str) -> dict[str, Any]:
        """Ask the run to stop after its current step (it saves a checkpoint first).

        A second stop, or one not obeyed within ``stop_timeout_s``, terminates the process group.
        """
        with self._lock:
            status = self.status(run_id)
            if status.get("state") not in LIVE_STATES:
                raise RunError(f"run {run_id} is not running (it is {status.get('state')})")
            paths = self.paths(run_id)
            if paths.stop_request.exists():
                self._terminate(paths, reason="stopped by force on a second stop request")
                return self.status(run_id)
            paths.stop_request.touch()
        threading.Thread(target=self._enforce_stop, args=(paths,), daemon=True).start()
        return self.status(run_id)

    def resume(self, run_id: str, max_steps: int | None = None) -> dict[str, Any]:
        """Continue a stopped or failed run from ``last.ckpt`` (optionally with a new ``max_steps``)."""
        with self._lock:
            self._refuse_if_live()
            paths = self.paths(run_id)
            status = self.status(run_id)
            cfg = RunConfig.load(paths.config)
            if max_steps is not None:
                cfg = cfg.with_overrides(max_steps=max_steps)
            if status.get("state") == "finished" and (max_steps is None
                                                      or max_steps <= status.get("step", 0)):
                raise RunError(f"run {run_id} has finished; raise max steps above "
                               f"{status.get('step')} to train it further")
            _check_checkpoint(paths.last_ckpt)
            check_data(cfg.train.data)
            self._wait_for_exit(paths)
            cfg.save(paths.config)
            paths.stop_request.unlink(missing_ok=True)
            paths.write_status(state="starting", error=None, log_tail=None,
                               total_steps=cfg.train.max_steps)
            self._launch(paths, resume=True)
        return self.status(run_id)

    def delete(self, run_id: str) -> None:
        with self._lock:
            status = self.status(run_id)
            if status.get("state") in LIVE_STATES:
                raise RunError(f"run {run_id} is {status['state']}: stop it before deleting it")
            shutil.rmtree(self.paths(run_id).root)

    def export(self, run_id: str) -> tuple[Path, str]:
        """Write the run's encoder as timm weights; returns the file and a snippet that loads it."""
        paths = self.paths(run_id)
        out = paths.root / "encoder.safetensors"
        export_encoder(self.weights(run_id), out)
        return out, timm_snippet(RunConfig.load(paths.config).model, out)

    # --- processes ----------------------------------------------------------------------------

    def _refuse_if_live(self) -> None:
        live = self.live_run()
        if live is not None:
            raise RunError(f"run {live} is still live: stop it before starting or resuming another "
                           "(one run at a time uses all the devices)")

    def _launch(self, paths: RunPaths, resume: bool) -> None:
        command = [sys.executable, "-m", "mae_core.train", "--run-dir", str(paths.root.resolve())]
        if resume:
            command.append("--resume")
        env = dict(os.environ, PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(PROJECT_ROOT),
                                                            os.environ.get("PYTHONPATH")])))
        env.pop("MAE_STUDIO_RUN_DIR", None)
        # Output goes to a file, never a pipe: nobody may be reading when the buffer fills.
        with open(paths.log, "ab") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, cwd=PROJECT_ROOT, env=env,
                                       start_new_session=True)
        self._processes[paths.run_id] = process
        atomic_write_json(paths.process, process_record(process.pid, command=command))

    def _alive(self, paths: RunPaths) -> bool:
        process = self._processes.get(paths.run_id)
        if process is not None:
            return process.poll() is None
        info = read_json(paths.process)
        if not info:
            # Between "starting" and the launch being recorded (another app's manager at work).
            status = paths.read_status()
            return (status.get("state") == "starting"
                    and time.time() - (status.get("updated") or 0) < LAUNCH_GRACE_S)
        if not _on_this_host(info):
            # Launched on another node (torchrun/SLURM): its pid means nothing here, so a
            # status the trainer keeps refreshing is the sign of life.
            updated = paths.read_status().get("updated") or 0
            return time.time() - updated < REMOTE_SILENCE_S
        return _pid_alive(int(info["pid"]), info.get("start_time"))

    def _wait_for_exit(self, paths: RunPaths, timeout_s: float = 15.0) -> None:
        """A stopped trainer writes its final state just before it exits: let it finish exiting
        before a resume starts another one on the same files."""
        info = read_json(paths.process) or {}
        if not info.get("pid") or not _on_this_host(info):
            return
        deadline = time.monotonic() + timeout_s
        while _pid_alive(int(info["pid"]), info.get("start_time")):
            if time.monotonic() > deadline:
                raise RunError(f"run {paths.run_id}'s previous trainer process "
                               f"(pid {info['pid']}) is still exiting; try again in a moment")
            time.sleep(0.1)

    def _mark_dead(self, paths: RunPaths) -> dict[str, Any]:
        """The process is gone; unless it recorded its own end just before exiting, it failed."""
        info = read_json(paths.process) or {}
        pid = info.get("pid")
        # Orphaned DDP ranks go too. A pid that now belongs to another process (other start time)
        # means our group is already empty: Linux does not reuse a pid that still names a group.
        if pid and process_start_time(int(pid)) in (None, info.get("start_time")):
            _kill_group(int(pid), signal.SIGKILL)
        status = paths.read_status()
        if status.get("state") not in LIVE_STATES:
            return status
        process = self._processes.get(paths.run_id)
        code = process.returncode if process is not None else None
        if code is not None and code < 0:
            how = f"was killed by {signal.Signals(-code).name}"
        elif code is not None:
            how = f"exited with code {code}"
        else:
            how = "is gone (killed, or out of memory)"
        return paths.write_status(state="failed", log_tail=paths.log_tail(),
                                  error=f"the trainer process {how} before finishing")

    def _enforce_stop(self, paths: RunPaths) -> None:
        deadline = time.monotonic() + self.stop_timeout_s
        while time.monotonic() < deadline:
            if not self._alive(paths):
                return
            time.sleep(0.2)
        with self._lock:
            if self._alive(paths):
                self._terminate(paths, reason=f"stopped by force: the trainer did not stop within "
                                              f"{self.stop_timeout_s:.0f} s")

    def _terminate(self, paths: RunPaths, reason: str) -> None:
        """End every process of the run (SIGTERM, then SIGKILL), and record it as stopped."""
        info = read_json(paths.process) or {}
        pid = int(info.get("pid", 0))
        if pid:
            _kill_group(pid, signal.SIGTERM)
            deadline = time.monotonic() + 5
            while self._alive(paths) and time.monotonic() < deadline:
                time.sleep(0.1)
            _kill_group(pid, signal.SIGKILL)
            process = self._processes.get(paths.run_id)
            if process is not None:
                process.wait(timeout=10)
        paths.stop_request.unlink(missing_ok=True)
        paths.write_status(state="stopped", error=reason, log_tail=paths.log_tail())


def _check_checkpoint(path: Path) -> None:
    """Refuse a missing or damaged ``last.ckpt`` before launching (torch.save writes a zip)."""
    if not path.exists():
        raise RunError(f"{path.parent.name} has no checkpoint to resume from")
    try:
        with zipfile.ZipFile(path) as archive:
            if not archive.namelist():
                raise zipfile.BadZipFile("empty")
    except (zipfile.BadZipFile, OSError) as err:
        raise RunError(f"the checkpoint {path} is corrupt ({err}); it cannot be resumed") from None


def _on_this_host(process_info: dict[str, Any]) -> bool:
    """Whether a ``process.json`` record names a process of this machine (older ones have no host)."""
    return process_info.get("host") in (None, socket.gethostname())


def _pid_alive(pid: int, start_time: str | None) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: fall back to asking the kernel
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return False
    return start_time is None or fields[19] == start_time


def _kill_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
