"""MAE Studio: pretrain a Masked Autoencoder in the browser, watch it learn, look inside it.

    python app.py [--host 127.0.0.1] [--port 7860] [--share] [--auth USER:PASSWORD]
                  [--runs-dir checkpoints] [--no-browser]

This file only parses the command line and launches; the UI is the ``ui`` package, the work is
``mae_core``. The torch-heavy run manager loads after the page is served, so it appears in seconds.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: no phoning home

from ui.launch import (launch_options, parse_args, require_runs_dir,  # noqa: E402
                       quit_now, require_free_port)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if hasattr(faulthandler, "register"):  # POSIX: `kill -USR1 <pid>` shows where a stuck app is
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    # A job a script starts in the background inherits SIGINT ignored, and Python then installs
    # no KeyboardInterrupt for it: Ctrl+C and `kill -INT` did nothing (CI saw the app outlive it).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own start-up requests
    try:
        options = launch_options(args)
        require_free_port(args.host, args.port)
    except ValueError as err:  # e.g. a public address without authentication, a port in use
        print(f"error: {err}", file=sys.stderr)
        return 2
    runs_dir = Path(args.runs_dir).expanduser().resolve()
    try:
        runs_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        print(f"error: the runs directory {runs_dir} cannot be created ({err.strerror}): "
              "pass another --runs-dir", file=sys.stderr)
        return 2
    try:
        require_runs_dir(runs_dir)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from ui import parameters
    from ui.blocks import build_app
    from ui.common import LazyRunManager
    from ui.render import page_style

    manager = LazyRunManager(runs_dir)
    demo = build_app(manager)
    try:
        demo.queue(default_concurrency_limit=4).launch(**options, **page_style(),
                                                       allowed_paths=[str(runs_dir)],
                                                       prevent_thread_lock=True, quiet=True)
    except OSError as err:  # gradio's "Cannot find empty port in range: P-P", an unknown host
        print(f"error: cannot serve on {args.host}:{args.port} ({str(err).splitlines()[0]}); "
              "another program (or MAE Studio) may hold that port: pass another --port",
              file=sys.stderr)
        return 2
    manager.start_loading()  # the torch-heavy import, now that the page is already served
    parameters.warm_default_audit()
    print(f"MAE Studio is running at {demo.local_url}", flush=True)
    if getattr(demo, "share_url", None):
        print(f"public link: {demo.share_url}", flush=True)
    print(f"runs directory: {runs_dir} (training runs keep going if the app stops)", flush=True)
    try:
        while demo.is_running:
            time.sleep(0.1)
    except KeyboardInterrupt:
        pass
    finally:
        quit_now(demo)
    return 0


if __name__ == "__main__":
    from ui.launch import exit_now

    exit_now(main())
