"""Small helpers the test files share (waiting on real processes, picking ports)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # the benchmark package lives beside mae_core, at the top
    sys.path.insert(0, str(REPO_ROOT))

from bench.procs import free_port  # noqa: E402 - the benchmark's port picker, shared

__all__ = ["free_port", "poll"]
T = TypeVar("T")


def poll(predicate: Callable[[], T], timeout_s: float, every_s: float = 0.2) -> T | None:
    """``predicate()``'s first truthy value within ``timeout_s``, or None."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    return None

