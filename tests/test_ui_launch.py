"""ui.launch: the command line, and authentication required wherever others can reach the app."""

from __future__ import annotations

from pathlib import Path

import pytest

from ui import launch
from ui.launch import AUTH_ENV, launch_options, parse_args
from ui.render import page_style


@pytest.fixture(autouse=True)
def no_auth_env(monkeypatch):
    monkeypatch.delenv(AUTH_ENV, raising=False)


def options(*argv: str) -> dict:
    return launch_options(parse_args(list(argv)))


def test_defaults_bind_loopback_without_auth():
    opts = options()
    assert opts["server_name"] == "127.0.0.1" and opts["server_port"] == 7860
    assert opts["auth"] is None and opts["share"] is False


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"])
def test_loopback_hosts_need_no_auth(host):
    assert options("--host", host)["auth"] is None


@pytest.mark.parametrize("argv", [("--host", "0.0.0.0"), ("--host", "192.168.1.20"),
                                  ("--host", "::"), ("--host", "my-workstation.lan"),
                                  ("--share",), ("--host", "127.0.0.1", "--share")])
def test_exposed_without_auth_is_refused(argv):
    with pytest.raises(ValueError, match="--auth"):
        options(*argv)


def test_auth_flag_is_passed_to_launch():
    opts = options("--host", "0.0.0.0", "--auth", "ada:s3cret:with:colons")
    assert opts["auth"] == ("ada", "s3cret:with:colons")
    assert opts["server_name"] == "0.0.0.0"
    assert options("--share", "--auth", "u:p")["auth"] == ("u", "p")


def test_auth_from_the_environment(monkeypatch):
    monkeypatch.setenv(AUTH_ENV, "env-user:env-pass")
    assert options("--host", "0.0.0.0")["auth"] == ("env-user", "env-pass")
    assert options("--share")["share"] is True
    # The flag wins over the environment.
    assert options("--host", "0.0.0.0", "--auth", "flag:pw")["auth"] == ("flag", "pw")


@pytest.mark.parametrize("auth", ["justuser", "user:", ":password", ":"])
def test_malformed_auth_is_refused(auth):
    with pytest.raises(ValueError, match="USER:PASSWORD"):
        options("--host", "0.0.0.0", "--auth", auth)
    with pytest.raises(ValueError, match="USER:PASSWORD"):
        options("--auth", auth)  # even where none is needed: a typo must not pass silently


def test_malformed_auth_in_the_environment_is_refused(monkeypatch):
    monkeypatch.setenv(AUTH_ENV, "no-colon")
    with pytest.raises(ValueError, match="USER:PASSWORD"):
        options("--host", "0.0.0.0")


def test_runs_dir_port_and_browser_flags():
    args = parse_args(["--runs-dir", "/tmp/elsewhere", "--port", "8123", "--no-browser"])
    assert args.runs_dir == "/tmp/elsewhere"
    opts = launch_options(args)
    assert opts["server_port"] == 8123 and opts["inbrowser"] is False
    style = page_style()  # app.py launches with both
    assert "mae-box" in style["css"]  # the theme-variable CSS travels with the launch
    # Field hints in a grey that reads on a light page (the default's is 2.6:1 on white).
    assert style["theme"].body_text_color_subdued == "*neutral_500"


@pytest.mark.parametrize("port", ["99999", "-1", "0", "80.5", "http"])
def test_a_port_out_of_range_is_refused_by_the_command_line(port, capsys):
    """A port past 65535 or below 1 ended in the server's bind() traceback."""
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--port", port])
    assert exit_info.value.code == 2
    assert "a port is a whole number from 1 to 65535" in capsys.readouterr().err


def test_a_host_that_does_not_resolve_is_said_to_be_so():
    """It read "another program may hold that port: pass another --port"."""
    with pytest.raises(ValueError, match="--host 999.1.1.1 cannot be resolved"):
        options("--host", "999.1.1.1", "--auth", "u:p")


def test_a_port_in_use_is_refused_before_the_page_is_built():
    """Found by the server's own bind, a port in use was said after the whole UI was made."""
    import socket

    from ui.launch import require_free_port

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(ValueError, match=f"cannot serve on 127.0.0.1:{port} .*another "
                                             "program \\(or MAE Studio\\) may hold that port"):
            require_free_port("127.0.0.1", port)
    require_free_port("127.0.0.1", port)  # free again: nothing said


def test_ctrl_c_stops_the_server_whole_with_a_client_still_connected(tmp_path):
    """Gradio's own Ctrl+C path (``block_thread``) closed the server with the clients' streams
    still open, and uvicorn waited on them until gradio stopped waiting, 5 s later, its thread
    still alive: ``python app.py`` took ~7 s to quit. quit_now ends the streams first."""
    from gradio_client import Client

    from helpers import free_port
    from mae_core.runs import RunManager
    from ui.blocks import build_app
    from ui.launch import quit_now

    demo = build_app(RunManager(tmp_path / "runs"))
    demo.queue(default_concurrency_limit=4).launch(prevent_thread_lock=True, quiet=True,
                                                   server_port=free_port())
    table, *_ = Client(demo.local_url, verbose=False).predict(None, api_name="/list_runs")
    assert table["data"] == []
    thread = demo.server.thread
    quit_now(demo)
    assert not thread.is_alive()


@pytest.mark.parametrize("folder", ["/", "/proc", "/sys/kernel", "/dev"])
def test_a_runs_directory_the_page_must_not_serve_or_cannot_write_is_refused(folder):
    """The page serves the runs directory's files: ``--runs-dir /`` served every file of the
    machine; ``/proc`` was taken, and every Start then failed."""
    with pytest.raises(ValueError, match=f"the runs directory {folder} is the root or a system "
                                         "folder .*: pass another --runs-dir"):
        launch.require_runs_dir(Path(folder))


def test_a_runs_directory_that_cannot_be_written_is_refused_and_a_plain_one_taken(tmp_path,
                                                                                  monkeypatch):
    launch.require_runs_dir(tmp_path)  # taken: nothing raised

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr(launch.tempfile, "TemporaryFile", read_only)
    with pytest.raises(ValueError, match=f"the runs directory {tmp_path} cannot be written "
                                         r"\(Read-only file system\): pass another --runs-dir"):
        launch.require_runs_dir(tmp_path)
