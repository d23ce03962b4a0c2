"""Encoder evaluations (:func:`mae_core.evaluate.evaluate_run`) as background jobs, one at a time.

Each evaluation embeds hundreds of images on the CPUs, so an app runs one at a time: a job runs in
its own daemon thread (it ends, and saves its result, even if the page that started it is gone),
keeps its progress, then its result or error, for any page to read; a second start while one runs
is refused (:class:`EvaluationBusy`) and remembered on the running job. Showing a job is the UI's.

Example:
    >>> evaluations = Evaluations()
    >>> job = evaluations.start(run_id, run_dir, data=None, linear_probe=False)
    >>> job.done.wait(); job.result or job.error
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mae_core.rundir import RunError


class EvaluationBusy(RunError):
    """Another evaluation is running; the message names it and its progress."""


@dataclass(eq=False)  # a job is itself (identity), not its fields: hashable, weakly referable
class EvaluationJob:
    """One evaluation running in a background thread: its progress, then its result or error."""

    run_id: str
    fraction: float = 0.0
    text: str = "starting"
    result: dict[str, Any] | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    refused: str | None = None  # a run whose evaluation was asked for while this one ran

    def run(self, run_dir: Path, data: str | None, linear_probe: bool) -> None:
        from mae_core.evaluate import evaluate_run  # (torch: imported when one runs)

        def progress(fraction: float, text: str) -> None:
            self.fraction, self.text = fraction, text

        try:
            self.result = evaluate_run(run_dir, data, linear_probe=linear_probe, progress=progress)
        except BaseException as err:  # noqa: BLE001 - handed to whoever waits on the job
            self.error = err
        finally:
            self.done.set()


class Evaluations:
    """The app's evaluations, one at a time; ``current`` is the running or last one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.current: EvaluationJob | None = None

    def start(self, run_id: str, run_dir: Path, data: str | None, linear_probe: bool
              ) -> EvaluationJob:
        """Evaluate ``run_dir`` on ``data`` (None: the demo set) in a new thread; EvaluationBusy
        while another runs (one for another run is remembered as its ``refused``)."""
        with self._lock:
            running = self.current
            if running is not None and not running.done.is_set():
                if run_id != running.run_id:
                    running.refused = run_id
                raise EvaluationBusy(f"`{running.run_id}` is being evaluated ({running.text}, "
                                     f"{running.fraction:.0%}); wait until it ends.")
            job = self.current = EvaluationJob(run_id)
        threading.Thread(target=job.run, args=(run_dir, data, linear_probe), daemon=True,
                         name=f"evaluate-{run_id}").start()
        return job
