"""The run queue: runs waiting for the devices, in order, kept on disk in the runs directory.

A queued run is a run directory in state ``queued`` (its config checked, nothing launched) plus its
place in ``.queue.json``. The run manager changes the order only under the runs directory's lock
(the one "one live run" uses), so two apps sharing the directory keep one queue; an app restart
loses nothing.
"""

from __future__ import annotations

from pathlib import Path

from mae_core.fileio import atomic_write_json, read_json

QUEUE_NAME = ".queue.json"


class RunQueue:
    """The order of the queued runs of one runs directory (callers hold the runs lock)."""

    def __init__(self, runs_dir: str | Path) -> None:
        self.path = Path(runs_dir) / QUEUE_NAME

    def ids(self) -> list[str]:
        order = (read_json(self.path) or {}).get("order")
        return [r for r in order if isinstance(r, str)] if isinstance(order, list) else []

    def _write(self, ids: list[str]) -> None:
        atomic_write_json(self.path, {"order": list(dict.fromkeys(ids))})

    def add(self, run_id: str) -> int:
        """Append ``run_id``; its 1-based position."""
        ids = [r for r in self.ids() if r != run_id] + [run_id]
        self._write(ids)
        return len(ids)

    def remove(self, run_id: str) -> bool:
        ids = self.ids()
        if run_id not in ids:
            return False
        self._write([r for r in ids if r != run_id])
        return True

    def move(self, run_id: str, offset: int) -> int:
        """Move ``run_id`` by ``offset`` places (negative: earlier), clamped; its new position."""
        ids = self.ids()
        if run_id not in ids:
            raise KeyError(run_id)
        index = ids.index(run_id)
        ids.pop(index)
        target = max(0, min(len(ids), index + offset))
        ids.insert(target, run_id)
        self._write(ids)
        return target + 1
