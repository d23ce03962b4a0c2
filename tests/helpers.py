"""Small helpers the test files share (waiting on real processes, picking ports)."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from torch.overrides import TorchFunctionMode

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # the benchmark package lives beside mae_core, at the top
    sys.path.insert(0, str(REPO_ROOT))

from bench.procs import free_port  # noqa: E402 - the benchmark's port picker, shared

__all__ = ["SYNC_OPS", "SlowDisk", "TensorCalls", "free_port", "poll"]
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


class SlowDisk:
    """Wraps a real function (a data scan) so that it runs only when told to: ``scanning`` is set
    once a call waits, ``release`` lets it (and every later call) go on."""

    def __init__(self, real: Callable[..., T]) -> None:
        self.real = real
        self.scanning, self.release = threading.Event(), threading.Event()

    def __call__(self, *args: object) -> object:
        self.scanning.set()
        self.release.wait(60)
        return self.real(*args)


class TensorCalls(TorchFunctionMode):
    """Records the name of every torch function and tensor method called while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # torch's signature
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


# Each of these waits for the device (copies a value to the host or sizes an output by the data).
SYNC_OPS = frozenset({"item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__",
                      "__index__", "nonzero", "argwhere", "masked_select", "unique"})
