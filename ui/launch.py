"""The app's command line, and the launch options it implies (safe by default).

The server binds the loopback address unless told otherwise. Anyone who reaches the port controls
the machine (they start and delete runs, and read what the app serves), so binding any other
address, or a public ``--share`` link, requires authentication: ``--auth USER:PASSWORD`` or the
``MAE_STUDIO_AUTH`` environment variable (which keeps the password out of the process list).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

from mae_core.checks import is_system_path
from mae_core.rundir import DEFAULT_RUNS_DIR

AUTH_ENV = "MAE_STUDIO_AUTH"
MAX_UPLOAD = "64mb"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python app.py", description="MAE Studio web UI")
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to bind (default 127.0.0.1; any other needs --auth)")
    parser.add_argument("--port", type=_port, default=7860, help="port (default 7860)")
    parser.add_argument("--share", action="store_true",
                        help="also open a public gradio.live link (needs --auth)")
    parser.add_argument("--auth", metavar="USER:PASSWORD",
                        help=f"require this login (or set {AUTH_ENV}=USER:PASSWORD)")
    parser.add_argument("--runs-dir", default=DEFAULT_RUNS_DIR,
                        help=f"where runs live (default {DEFAULT_RUNS_DIR})")
    parser.add_argument("--no-browser", action="store_true",
                        help="do not open a browser tab (none is opened without a display anyway)")
    return parser.parse_args(argv)


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:  # the server's bind() failed on it with a traceback
        raise argparse.ArgumentTypeError(f"a port is a whole number from 1 to 65535, not {text!r}")
    return port


def _require_resolvable(host: str) -> None:
    """An unknown host name is said as such (it read as a port held by another program)."""
    try:
        socket.getaddrinfo(host.strip("[]"), None)
    except (socket.gaierror, UnicodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else err
        raise ValueError(f"--host {host} cannot be resolved ({reason}): give an address of this "
                         "machine, or a name that resolves to one") from None


def require_free_port(host: str, port: int) -> None:
    """Refuse a port another program (or another MAE Studio) listens on, before the page is built:
    found by the server's own bind, it was said ten seconds later, after the whole UI was made."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return  # said by _require_resolvable
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
        try:
            probe.bind(address)
        except OSError as err:
            raise ValueError(f"cannot serve on {host}:{port} ({err.strerror}); another program "
                             "(or MAE Studio) may hold that port: pass another --port") from None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def parse_auth(text: str | None) -> tuple[str, str] | None:
    if not text:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise ValueError("authentication must be given as USER:PASSWORD (both non-empty)")
    return user, password


def launch_options(args: argparse.Namespace) -> dict[str, Any]:
    """``launch()`` keyword arguments for ``args``; ValueError when the setup would be unsafe."""
    auth = parse_auth(args.auth or os.environ.get(AUTH_ENV))
    exposed = args.share or not is_loopback(args.host)
    if exposed and auth is None:
        where = "a public --share link" if args.share else f"--host {args.host}"
        raise ValueError(f"{where} lets anyone who reaches it start, stop and delete runs: add "
                         f"--auth USER:PASSWORD (or set {AUTH_ENV}=USER:PASSWORD), or bind 127.0.0.1")
    _require_resolvable(args.host)
    # The page's style (ui.render.page_style) is not here: it loads gradio, and a refused launch
    # is said before that (six seconds here).
    return dict(server_name=args.host, server_port=args.port, share=args.share, auth=auth,
                max_file_size=MAX_UPLOAD, inbrowser=not args.no_browser and _has_display())


def _has_display() -> bool:
    return sys.platform in ("darwin", "win32") or bool(
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def quit_now(demo: Any) -> None:
    """Ctrl+C quits at once. Gradio's ``block_thread`` closed the server without ending the open
    pages' heartbeat streams, and uvicorn waited on them until gradio gave up: ~5 s more with a
    tab open. ``close`` ends them first; nothing else is waited for (runs train on regardless)."""
    import logging

    from gradio.tunneling import CURRENT_TUNNELS

    # Starlette's lifespan task, cancelled by the forced exit, logged a CancelledError traceback
    # on every quit: nothing failed.
    logging.getLogger("uvicorn.error").setLevel(logging.CRITICAL)
    if getattr(demo, "server", None) is not None:
        demo.server.force_exit = True
    demo.close(verbose=False)
    for tunnel in CURRENT_TUNNELS:  # a --share link
        tunnel.kill()


def exit_now(code: int) -> None:
    """The app's exit, once the server is closed: the exit handlers run (logging's flush, a
    preparation's release), then the process ends without the interpreter's teardown.

    That teardown took 1.6 s, and it aborted the process ("terminate called without an active
    exception", SIGABRT) when Ctrl+C came while a thread was still in torch: the start-up audit
    (ui.parameters.warm_default_audit) runs a backward pass, and destroying torch's autograd
    engine under it ends in std::terminate. Runs are separate processes and every file the app
    writes is written atomically, so nothing is lost by skipping it."""
    import atexit
    import threading

    # A daemon thread the exit cuts short (the start-up audit, still running) could fail once the
    # exit handlers had torn down what it used, and print its traceback: its work is moot now.
    threading.excepthook = lambda args: None
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def require_runs_dir(runs_dir: Path) -> None:
    """A ValueError unless ``runs_dir`` (made already) can hold runs. The page serves files from
    it (``allowed_paths``): ``--runs-dir /`` served every file of the machine to anyone who could
    reach the page; ``/proc`` was taken, and every Start then failed."""
    real = os.path.realpath(runs_dir)
    ram_disk = real == "/dev/shm" or real.startswith("/dev/shm/")  # may hold runs
    if real == os.path.sep or (is_system_path(real) and not ram_disk):
        raise ValueError(f"the runs directory {runs_dir} is the root or a system folder (the "
                         "page serves the runs directory's files): pass another --runs-dir")
    try:
        with tempfile.TemporaryFile(dir=runs_dir):
            pass
    except OSError as err:
        raise ValueError(f"the runs directory {runs_dir} cannot be written ({err.strerror}): "
                         "pass another --runs-dir") from None
