"""Small helpers the test files share (waiting on real processes, picking ports)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from mae_core.bench import free_port

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

