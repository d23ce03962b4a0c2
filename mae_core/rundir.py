"""The run directory: where a run's files live and how they are read and written.

``checkpoints/<run-id>/`` holds ``config.yaml`` (the resolved config), ``status.json`` (state and
progress, written by the trainer), ``process.json`` (the launched process, written by the manager),
``metrics.jsonl`` (one line per logged step), ``train.log``, ``last.ckpt`` (for resume),
``model.safetensors`` (weights) and ``previews/``. A ``STOP`` file asks the trainer to stop.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mae_core.fileio import atomic_write_json, atomic_write_text, read_json

STATES = ("starting", "running", "stopping", "stopped", "finished", "failed")
LIVE_STATES = frozenset({"starting", "running", "stopping"})


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def run_id(self) -> str:
        return self.root.name

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def status(self) -> Path:
        return self.root / "status.json"

    @property
    def process(self) -> Path:
        return self.root / "process.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def log(self) -> Path:
        return self.root / "train.log"

    @property
    def last_ckpt(self) -> Path:
        return self.root / "last.ckpt"

    @property
    def weights(self) -> Path:
        return self.root / "model.safetensors"

    @property
    def previews(self) -> Path:
        return self.root / "previews"

    @property
    def stop_request(self) -> Path:
        return self.root / "STOP"

    def read_status(self) -> dict[str, Any]:
        return read_json(self.status) or {"run_id": self.run_id, "state": "failed",
                                          "error": "status.json is missing or unreadable"}

    def write_status(self, **fields: Any) -> dict[str, Any]:
        """Merge ``fields`` into status.json (atomically) and return the new status."""
        status = read_json(self.status) or {"run_id": self.run_id}
        status.update(fields, updated=time.time())
        atomic_write_json(self.status, status)
        return status

    def log_tail(self, lines: int = 40) -> str:
        return tail_lines(self.log, lines)

    def read_metrics(self, since_step: int = -1) -> list[dict[str, Any]]:
        """Metric lines with ``step > since_step``; a line being written right now is skipped."""
        rows = []
        try:
            with open(self.metrics) as handle:
                for line in handle:
                    try:
                        row = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(row, dict) and row.get("step", -1) > since_step:
                        rows.append(row)
        except OSError:
            pass
        return rows

    def truncate_metrics(self, last_step: int) -> None:
        """Drop lines logged after ``last_step`` (a resume restarts from the checkpoint's step)."""
        if not self.metrics.exists():
            return
        kept = [json.dumps(row) for row in self.read_metrics() if row.get("step", 0) <= last_step]
        atomic_write_text(self.metrics, "".join(line + "\n" for line in kept))


def new_run_id(runs_dir: Path, preset: str, policy: str) -> str:
    """A readable, unique run id: date, time, preset and policy."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = f"{stamp}-{preset}-{policy}"
    run_id, n = base, 1
    while (runs_dir / run_id).exists():
        n += 1
        run_id = f"{base}-{n}"
    return run_id


def tail_lines(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a (log) file, reading only its end; "" if it cannot be read."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, 2)
            handle.seek(max(0, handle.tell() - 64 * 1024))
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def process_start_time(pid: int) -> str | None:
    """The process's start time from /proc (Linux), so a recycled pid is not mistaken for it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def process_record(pid: int | None = None, **extra: Any) -> dict[str, Any]:
    """What ``process.json`` holds: enough to tell later whether this very process still lives."""
    pid = os.getpid() if pid is None else pid
    return {"pid": pid, "start_time": process_start_time(pid), "host": socket.gethostname(),
            "launched": time.time(), **extra}
