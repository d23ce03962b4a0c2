"""Processes the benchmark starts: a clean environment, group kill, peak memory, a free port.

The tests use :func:`free_port` too; nothing in ``mae_core`` imports this package.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from mae_core.process import clean_env


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment as the app's trainers get it (:func:`mae_core.process.clean_env`:
    no launcher variables or ``PL_TRAINER_*`` defaults, the project importable), with ``extra``."""
    return clean_env(**extra)


def stop_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """End the process group this benchmark started for ``proc`` (SIGTERM, then SIGKILL)."""
    if proc.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def peak_rss_bytes(pid: int | str = "self") -> int | None:
    """The process's peak resident set (VmHWM), or None where /proc cannot tell."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if pid == "self":
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return None


def settled_peak_rss(pid: int, quiet_s: float = 3.0, timeout_s: float = 60.0) -> int | None:
    """Peak RSS once a process has finished loading in the background: the first value that has
    not grown for ``quiet_s`` (the app loads torch and the run manager after its page is up)."""
    peak, since, deadline = peak_rss_bytes(pid), time.monotonic(), time.monotonic() + timeout_s
    while time.monotonic() < deadline and time.monotonic() - since < quiet_s:
        time.sleep(0.25)
        now = peak_rss_bytes(pid)
        if now is None:
            break
        if now != peak:
            peak, since = now, time.monotonic()
    return peak


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def load_average() -> str | None:
    """The 1, 5 and 15 minute load averages as ``"a / b / c"``, or None where unknown: figures
    measured on a busy shared machine say so."""
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return None
