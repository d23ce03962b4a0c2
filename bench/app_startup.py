"""The app's start-up: seconds from ``python app.py --port P`` until ``GET /`` answers 200, and its
peak memory when it first serves and once its background loading has settled."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from bench import PROJECT_ROOT
from bench.procs import child_env, free_port, peak_rss_bytes, settled_peak_rss, stop_group
from mae_core.rundir import tail_lines


def _wait_for_page(proc: subprocess.Popen, url: str, log_path: Path, started: float,
                   timeout_s: float) -> str | None:
    """Poll ``url`` every 0.1 s until it answers 200 (None), or say why it never did."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    while True:
        if proc.poll() is not None:
            return (f"app exited with code {proc.returncode} before serving; "
                    f"log tail:\n{tail_lines(log_path, 12)}")
        if time.perf_counter() - started > timeout_s:
            return (f"no HTTP 200 from {url} within {timeout_s:.0f} s; "
                    f"log tail:\n{tail_lines(log_path, 12)}")
        try:
            with opener.open(url, timeout=2) as response:
                if response.status == 200:
                    return None
        except (urllib.error.URLError, OSError, ValueError):
            pass
        time.sleep(0.1)


def benchmark_app(timeout_s: float, app: Path | None = None) -> dict[str, Any]:
    """Seconds from launch to serving and the app's peak RSS, or ``{"error": ...}``, never raised.

    The app runs in a scratch working directory (so its runs folder is an empty one of its own)
    and is always terminated.
    """
    app = app or PROJECT_ROOT / "app.py"
    if not app.is_file():
        return {"error": "app.py not found"}
    scratch = Path(tempfile.mkdtemp(prefix="mae-bench-app-"))
    log_path = scratch / "app.log"
    port = free_port()
    no_proxy = ",".join(p for p in ("127.0.0.1", "localhost", os.environ.get("NO_PROXY", "")) if p)
    env = child_env(GRADIO_ANALYTICS_ENABLED="False", NO_PROXY=no_proxy, no_proxy=no_proxy)
    proc = None
    try:
        with open(log_path, "w") as log:
            started = time.perf_counter()
            proc = subprocess.Popen([sys.executable, str(app), "--port", str(port)], cwd=scratch,
                                    env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            error = _wait_for_page(proc, f"http://127.0.0.1:{port}/", log_path, started, timeout_s)
            if error:
                return {"error": error}
            serving_s = time.perf_counter() - started
            serving_rss = peak_rss_bytes(proc.pid)
            return {"serving_s": serving_s, "serving_rss_bytes": serving_rss,
                    "peak_rss_bytes": settled_peak_rss(proc.pid), "port": port}
    except Exception as err:  # noqa: BLE001 - the app part must never stop the benchmark
        return {"error": f"{type(err).__name__}: {err}"}
    finally:
        if proc is not None:
            stop_group(proc)
