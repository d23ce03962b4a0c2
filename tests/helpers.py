"""Small helpers the test files share (waiting on real processes, picking ports, and images of
other channel counts and bit depths, as TIFF scans and satellite tiles store them)."""

from __future__ import annotations

import contextlib
import fcntl
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np
import tifffile
from PIL import Image
from torch.overrides import TorchFunctionMode

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # the benchmark package lives beside mae_core, at the top
    sys.path.insert(0, str(REPO_ROOT))

from bench.procs import free_port  # noqa: E402 - the benchmark's port picker, shared

__all__ = ["SIZE", "SYNC_OPS", "SlowDisk", "TensorCalls", "cache_lock_held", "free_port",
           "make_four", "make_gray16", "poll", "resume_state", "rgb_png", "scan16", "tile4"]
T = TypeVar("T")


def resume_state() -> dict:
    """The optimizer and schedule part of a Lightning checkpoint at its smallest that a resume
    accepts (mae_core.lastckpt checks it): one AdamW with one parameter's moments, one LambdaLR."""
    return {"optimizer_states": [{"state": {0: {"step": 1.0}}, "param_groups": [{"params": [0]}]}],
            "lr_schedulers": [{"last_epoch": 1}]}


def poll(predicate: Callable[[], T], timeout_s: float, every_s: float = 0.2) -> T | None:
    """``predicate()``'s first truthy value within ``timeout_s``, or None."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    return None


@contextlib.contextmanager
def cache_lock_held(folder: Path) -> Iterator[None]:
    """Hold the cache lock of ``folder``'s prepared set (in the cache the environment names), as
    a run's start or another app preparing it does: a preparation of it waits on the lock, for as
    long as a test needs to look at it."""
    from mae_core import prepared
    from mae_core.data import find_images

    target = prepared.cache_dir(str(folder), find_images(str(folder)), prepared.DEFAULT_SHORT_SIDE)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


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


# --- images of other kinds: 16-bit grayscale, 4 bands ----------------------------------------

SIZE = 32  # their side


def scan16(index: int) -> np.ndarray:
    """A smooth 16-bit scan that fills ~12 bits around 20 % of full scale, like a CT or microscope
    image: 8-bit reading would leave it a few grey levels."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    values = 13000 + 5000 * np.sin((xx + 3 * index) / 5.0) + 3000 * np.cos((yy + index) / 4.0)
    return values.astype(np.uint16)


def tile4(index: int) -> np.ndarray:
    """4 bands (C, H, W) of 8-bit values, each band its own pattern and level."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    return np.stack([40 + 50 * c + 30 * np.sin((xx * (c + 1) + index) / 6.0) + 10 * np.cos(yy / 3.0)
                     for c in range(4)]).astype(np.uint8)


def make_gray16(folder: Path, count: int = 12) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        tifffile.imwrite(folder / f"scan_{i:02d}.tif", scan16(i))
    return folder


def make_four(folder: Path, count: int = 12) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        tifffile.imwrite(folder / f"tile_{i:02d}.tif", tile4(i), photometric="minisblack",
                         planarconfig="separate")
    return folder


def rgb_png(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(path)
    return path


def stand_in_trainer(cwd: Path, *args: str, **env: str):
    """A process whose command line is a trainer's, ``python -m mae_core.train ARGS`` (run in
    ``cwd``, with ``env`` set), that only sleeps: a ``mae_core.train`` module of its own comes
    first on its path. Started; the caller ends it."""
    import subprocess

    from mae_core.process import clean_env

    fake = cwd / ".stand-in-trainer"
    (fake / "mae_core").mkdir(parents=True, exist_ok=True)
    (fake / "mae_core" / "__init__.py").write_text("")
    (fake / "mae_core" / "train.py").write_text("import time\ntime.sleep(120)\n")
    base = clean_env(**env)
    base["PYTHONPATH"] = str(fake)
    return subprocess.Popen([sys.executable, "-m", "mae_core.train", *args], cwd=cwd, env=base)


def squeue_saying(folder: Path, state: str, exit_code: int = 0) -> Path:
    """A stand-in for SLURM's squeue that prints ``state`` for any job and records the call."""
    folder.mkdir(exist_ok=True)
    script = folder / "squeue"
    script.write_text(f"#!/bin/sh\necho \"$@\" >> {folder / 'calls'}\necho {state}\n"
                      f"exit {exit_code}\n")
    script.chmod(0o755)
    return folder
