"""The web UI through its API: every action called with gradio_client on a live server.

One server (``ui.blocks.build_app(RunManager(tmp))``) serves the whole module; the tests run in
file order and share one tiny CPU run (32 px, patch 8, batch 8): it is started, watched while live,
refused a second start, stopped, resumed to a few more steps, reconstructed from, exported, and
deleted.
The handlers themselves are unit-tested without a server in ``test_ui_*.py``.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import urllib.request
import zlib
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from helpers import free_port, poll  # noqa: E402
from mae_core.data import sample_photo_paths  # noqa: E402
from mae_core.rundir import LIVE_STATES  # noqa: E402
from mae_core.runs import RunManager  # noqa: E402
from ui.blocks import build_app  # noqa: E402
from ui.common import DEFAULTS, FIELD_NAMES, form_values  # noqa: E402

TINY = dict(image_size=32, patch_size=8, batch_size=8, max_steps=5000, seed=0,
            checkpoint_every_n_steps=1000, preview_every_n_steps=1000)
STATE_TIMEOUT_S = 150  # the machine is shared: starting two DDP ranks can take a while


def form(**overrides) -> list:
    """The Train form's values in the order /start takes them: defaults, TINY, then overrides."""
    values = {**form_values(DEFAULTS), **TINY, **overrides}
    return [values[name] for name in FIELD_NAMES]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    runs_dir = tmp_path_factory.mktemp("runs")
    manager = RunManager(runs_dir, stop_timeout_s=60)
    demo = build_app(manager)
    demo.queue().launch(prevent_thread_lock=True, server_port=free_port(), quiet=True)
    try:
        yield {"demo": demo, "manager": manager, "url": demo.local_url, "runs_dir": runs_dir,
               "client": Client(demo.local_url, verbose=False)}
    finally:
        live = manager.live_run()
        if live:  # a failed test must not leave DDP ranks behind
            manager.stop(live)
            if not poll(lambda: manager.status(live)["state"] not in LIVE_STATES, 30):
                manager.stop(live, force=True)
        demo.close()


@pytest.fixture(scope="module")
def run_state():
    """What the tests share about the one run they drive."""
    return {}


def _status(client: Client, run_id: str) -> dict:
    return client.predict(run_id, api_name="/status")


def _wait_state(client: Client, run_id: str, states: set[str], timeout_s: float = STATE_TIMEOUT_S) -> dict:
    last = {}

    def reached():
        nonlocal last
        last = _status(client, run_id)
        return last if last.get("state") in states else None

    status = poll(reached, timeout_s, every_s=1.0)
    assert status, f"run {run_id} did not reach {states} in {timeout_s} s; last status: {last}"
    return status


def _still_serving(client: Client) -> None:
    table, *_ = client.predict(None, api_name="/list_runs")
    assert "headers" in table


def _start(client: Client, **overrides) -> dict:
    return client.predict(*form(**overrides), api_name="/start")


# --- refusals before anything starts -------------------------------------------------------------

def test_bad_hyperparameters_name_the_field_and_create_nothing(server):
    client = server["client"]
    for field, value, words in (("image_size", 36, "divisible"), ("patch_size", 0, "patch_size"),
                                ("batch_size", 0, "batch_size"), ("batch_size", 2.5, "whole number"),
                                ("base_lr", -1, "base_lr"), ("mask_ratio", "abc", "mask_ratio"),
                                ("seed", -1, "seed"), ("seed", 2**70, "seed"),
                                ("preset", "vit-gigantic", "preset"),
                                ("accelerator", "tpu", "accelerator"),
                                ("devices", 64, "devices")):
        action = _start(client, **{field: value})
        assert action["kind"] == "error" and field in action["text"], (field, value, action)
        assert words in action["text"], (field, value, action)
    assert server["manager"].list() == []
    assert not any(server["runs_dir"].iterdir())


def test_missing_or_empty_data_folder_is_refused(server, tmp_path):
    missing = tmp_path / "no-such-folder"
    action = _start(server["client"], data=str(missing))
    assert action["kind"] == "error" and "does not exist" in action["text"]
    empty = tmp_path / "empty"
    empty.mkdir()
    action = _start(server["client"], data=str(empty))
    assert action["kind"] == "error" and "holds no images" in action["text"]
    info = server["client"].predict(str(empty), api_name="/check_data")
    assert "holds no images" in info and 'data-kind="error"' in info
    assert server["manager"].list() == []


def test_the_data_field_counts_images_before_start(server):
    info = server["client"].predict("", api_name="/check_data")
    assert f"{len(sample_photo_paths())} image file(s) found" in info


# --- one run: start, watch, refuse, stop, resume -------------------------------------------------

def test_start_then_status_and_live_metrics(server, run_state):
    client = server["client"]
    # A script names the settings it changes (the page's /start takes its whole form by
    # position); the rest are the defaults, as /start's form() gives them.
    action = client.predict(TINY, api_name="/start_run")
    assert action["kind"] == "ok", action
    saved = server["manager"].config(action["run_id"])
    flat = {**vars(saved.model), **vars(saved.train)}
    assert {name: flat[name] for name in TINY} == TINY
    assert (saved.model.preset, saved.train.weight_decay) == (DEFAULTS.model.preset,
                                                              DEFAULTS.train.weight_decay)
    run_id = action["run_id"]
    assert run_id in action["text"]
    run_state["id"] = run_id

    def live_points():
        status = _status(client, run_id)
        assert status["state"] in LIVE_STATES, f"the run ended early: {status}"
        curve = client.predict(run_id, "loss", api_name="/metric")
        return (status, curve) if status["state"] == "running" and curve["steps"] else None

    result = poll(live_points, STATE_TIMEOUT_S, every_s=1.0)
    assert result, f"no loss points while the run was live: {_status(client, run_id)}"
    status, curve = result
    assert status["total_steps"] == TINY["max_steps"]
    assert curve["steps"] == sorted(curve["steps"]) and all(v > 0 for v in curve["values"])
    lr = client.predict(run_id, "lr", api_name="/metric")
    assert lr["values"] and all(0 < v < 1 for v in lr["values"])


def test_a_fresh_page_shows_the_live_run(server, run_state):
    """State lives in the run directories: a new client (another tab) sees the same live run."""
    other = Client(server["url"], verbose=False)
    outputs = other.predict("", [], "loss", True, 0.8, None, api_name="/poll")
    pick, status_html = outputs[0], outputs[2]
    assert pick["value"] == run_state["id"]
    assert run_state["id"] in status_html and 'data-state="running"' in status_html
    assert "plain DDP" in status_html  # the DDP mode of a ddp-clean run


def test_second_start_and_deleting_a_live_run_are_refused(server, run_state):
    client = server["client"]
    action = _start(client)
    assert action["kind"] == "error" and "still live" in action["text"]
    action = client.predict({"max_steps": 3}, api_name="/start_run")
    assert action["kind"] == "error" and "still live" in action["text"]
    action = client.predict({"max_steps": "x"}, api_name="/queue_run")
    assert action["kind"] == "error" and action["field"] == "max_steps", action
    # (the Delete button, disabled for a live run, is checked in the browser test)
    message, _ = client.predict(run_state["id"], True, api_name="/delete_run")
    assert "stop it before deleting" in message
    assert len(server["manager"].list()) == 1


def test_stop(server, run_state):
    client = server["client"]
    # force as a JSON client may send it: "abc" is refused, "false" only asks (any non-empty
    # string used to count as true, and force-killed the run)
    action = client.predict(run_state["id"], "abc", api_name="/stop")
    assert action["kind"] == "error" and "force: must be true or false" in action["text"]
    assert _status(client, run_state["id"])["state"] == "running"
    action = client.predict(run_state["id"], "false", api_name="/stop")
    assert action["kind"] == "ok" and action["run_id"] == run_state["id"]
    status = _wait_state(client, run_state["id"], {"stopped", "failed", "finished"})
    assert status["state"] == "stopped" and not status.get("error"), status
    assert status["resumable"] is True
    assert status["step"] > 0
    run_state["stopped_at"] = status["step"]
    action = client.predict(run_state["id"], api_name="/stop")
    assert action["kind"] == "error" and "not running" in action["text"]


def test_resume_quotes_the_checkpoint_step_and_runs_to_the_new_end(server, run_state):
    client = server["client"]
    target = run_state["stopped_at"] + 3
    action = client.predict(run_state["id"], target, api_name="/resume")
    assert action["kind"] == "ok", action
    assert f"at step {run_state['stopped_at']}" in action["text"]  # the checkpoint's step
    assert f"schedule now ends at step {target}" in action["text"]
    status = _wait_state(client, run_state["id"], {"finished", "failed", "stopped"})
    assert status["state"] == "finished", status
    assert status["step"] == target
    curve = client.predict(run_state["id"], "loss", api_name="/metric")
    assert curve["steps"] == list(range(1, target + 1))  # a line for every step, no gap
    with pytest.raises(AppError, match="logged no metric named 'abc'; it logged: .*images_per_s"):
        client.predict(run_state["id"], "abc", api_name="/metric")


# --- reconstruct ----------------------------------------------------------------------------------

def _recon(client, files, samples, run_id, ratio=0.75, seed=0):
    return client.predict(files, samples, run_id, ratio, seed, api_name="/reconstruct")


def test_reconstruct_an_uploaded_photo(server, run_state):
    client = server["client"]
    photo = sample_photo_paths()[0]
    html, losses, message = _recon(client, [handle_file(str(photo))], False, run_state["id"], 0.75, 3)
    assert html.count("<img") == 5 + 1  # four panels and the heat map, then the colour bar
    # the default model predicts pixels (no norm_pix_loss): the note says the colours are its own
    assert 'data-norm-pix="false"' in html and 'class="model-output"' not in html
    assert "heat-colorbar" in html and "≥2" in html
    [[name, loss, masked]] = losses["data"]
    assert name == photo.name and 0 < float(loss) < 100 and int(masked) == 12  # 75% of 16 patches
    assert f"step {run_state['stopped_at'] + 3}" in message
    loads = server["demo"].model_cache.loads
    # the same seed gives the same mask, and the model is not loaded again
    _, again, _ = _recon(client, [handle_file(str(photo))], False, run_state["id"], 0.75, 3)
    assert again["data"] == losses["data"]
    assert server["demo"].model_cache.loads == loads


def test_reconstruct_the_sample_photos(server, run_state):
    html, losses, _ = _recon(server["client"], None, True, run_state["id"], 0.5, 0)
    assert len(losses["data"]) == 3 and html.count('class="recon-item"') == 3


def test_any_image_mode_is_accepted(server, run_state, tmp_path):
    from PIL import Image

    images = {
        "gray.png": Image.new("L", (50, 30), 128),
        "rgba.png": Image.new("RGBA", (40, 90), (10, 200, 30, 100)),
        "deep.png": Image.new("I;16", (33, 33), 40000),
        "tiny.jpg": Image.new("RGB", (5, 7), (255, 0, 0)),
        "rotated.jpg": Image.new("RGB", (60, 20), (0, 0, 255)),
        "palette.gif": Image.new("P", (21, 22), 3),
    }
    files = []
    for name, image in images.items():
        if name == "rotated.jpg":
            exif = Image.Exif()
            exif[0x0112] = 6  # EXIF orientation: rotate 90° on display
            image.save(tmp_path / name, exif=exif)
        else:
            image.save(tmp_path / name)
        files.append(handle_file(str(tmp_path / name)))
    _, losses, _ = _recon(server["client"], files, False, run_state["id"])
    assert [row[0] for row in losses["data"]] == list(images)


def _png_bomb(width: int, height: int) -> bytes:
    """A valid 1×1 PNG whose header claims ``width``×``height`` pixels."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr:ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


def test_bad_files_are_listed_and_the_good_ones_still_reconstructed(server, run_state, tmp_path):
    corrupt = tmp_path / "holiday.png"
    corrupt.write_bytes(os.urandom(4096))
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_bomb(100_000, 100_000))
    good = sample_photo_paths()[1]
    html, losses, message = _recon(server["client"], [handle_file(str(corrupt)),
                                                      handle_file(str(good)),
                                                      handle_file(str(bomb))],
                                   False, run_state["id"])
    assert [row[0] for row in losses["data"]] == [good.name]
    assert "holiday.png" in html and "not an image" in html
    assert "bomb.png" in html and "decompression bomb" in html
    assert "1 image(s) reconstructed, 2 refused" in message
    # only bad files: nothing reconstructed, each reason listed, the app keeps serving
    html, losses, message = _recon(server["client"], [handle_file(str(corrupt))], False,
                                   run_state["id"])
    assert losses["data"] in ([], [["", "", ""]]) and "holiday.png" in html
    assert 'data-kind="error"' in message
    _still_serving(server["client"])


def test_reconstruct_refusals_name_the_problem(server, run_state):
    client = server["client"]
    _, _, message = _recon(client, None, False, run_state["id"])
    assert "Upload one or more images" in message
    _, _, message = _recon(client, None, True, "no-such-run")
    assert "no run named" in message
    _, _, message = _recon(client, None, True, run_state["id"], 0.75, 2**65)
    assert "mask seed" in message
    _, _, message = _recon(client, None, True, run_state["id"], "abc", 0)
    assert "mask_ratio" in message


def test_checkpoints_and_previews(server, run_state):
    pick, previews, history = server["client"].predict("", api_name="/refresh_checkpoints")
    assert pick["value"] == run_state["id"]
    assert history["visible"] is True  # the run kept weight snapshots: the history slider shows
    assert [c[1] for c in pick["choices"]] == [run_state["id"]]
    assert previews and previews[0]["caption"].startswith("step ")
    assert all(Path(p["image"]).is_file() for p in previews)


# --- parameters ----------------------------------------------------------------------------------

def test_the_parameters_tab_opened_before_the_first_poll_audits_the_run_shown(server, run_state):
    """Opened within a second of the page's load, before the Train tab's poll had chosen its run,
    the Parameters tab audited the default preset instead of the run the Train tab then showed."""
    assert server["client"].predict(None, api_name="/params_for_run")["value"] == run_state["id"]


def test_parameter_audit_of_a_preset(server):
    title, diff, clean_html, ref_html, audit, message = server["client"].predict(
        "", "vit-tiny", 32, 8, "", api_name="/audit")
    clean = {row["name"]: row for row in audit["ddp-clean"]["rows"]}
    reference = audit["reference"]
    assert clean["backbone.vit.head.weight"]["status"] == "removed"
    assert clean["backbone.vit.head.bias"]["status"] == "removed"
    assert clean["backbone.mask_token"]["status"] == "frozen"
    assert audit["ddp-clean"]["ddp_safe"] is True
    assert audit["ddp-clean"]["verdict"].startswith("plain DDP safe")
    assert reference["ddp_safe"] is False
    assert "backbone.vit.head.weight" in reference["no_grad"]
    assert 'data-name="backbone.vit.head.weight" data-status="removed"' in clean_html
    assert 'data-name="backbone.vit.head.weight" data-status="trainable"' in ref_html
    assert 'data-group="classification head"' in clean_html and "DDP-relevant" in clean_html
    assert "backbone.mask_token" in diff and "32px" in title and not message


def test_parameter_audit_of_a_run_uses_its_geometry(server, run_state):
    title, _, _, _, audit, _ = server["client"].predict(run_state["id"], "vit-base", 224, 16, "",
                                                        api_name="/audit")
    assert run_state["id"] in title and "32px, patch 8" in title
    rows = {row["name"]: row for row in audit["ddp-clean"]["rows"]}
    assert rows["backbone.vit.pos_embed"]["shape"] == [1, 17, 192]  # 4×4 patches + class token
    *_, message = server["client"].predict("", "vit-tiny", 32, 64, api_name="/audit")
    assert "patch_size" in message
    *_, message = server["client"].predict("", "resnet50", 32, 8, api_name="/audit")
    assert "preset" in message
    *_, message = server["client"].predict("", ["vit-tiny"], 32, 8, api_name="/audit")
    assert "(preset): choose one of" in message  # was "Internal error … unhashable type: 'list'"
    *_, message = server["client"].predict(["x"], "vit-tiny", 32, 8, api_name="/audit")
    assert "a run id is text" in message


def test_choosing_no_run_in_the_parameters_tab_keeps_the_fields(server, run_state):
    """"(none: audit the preset and sizes below)": the fields' event returned an empty dict, which
    Gradio took as one value for its five outputs, and failed (the audit after it never ran)."""
    *fields, message = server["client"].predict("", api_name="/run_fields")
    assert message == ""
    *fields, message = server["client"].predict(run_state["id"], api_name="/run_fields")
    assert fields[:3] == ["vit-tiny", 32, 8] and message == ""


# --- runs: list, open, export, delete -------------------------------------------------------------

def test_list_runs(server, run_state):
    table, pick, *_ = server["client"].predict(None, api_name="/list_runs")
    assert table["headers"][:4] == ["run", "state", "steps", "loss (last logged)"]
    [row] = table["data"]
    assert row[0] == run_state["id"] and row[1] == "finished"
    assert row[2] == f"{run_state['stopped_at'] + 3} / {run_state['stopped_at'] + 3}"
    assert pick["value"] == run_state["id"]


def test_open_run(server, run_state):
    pick, ckpt, message = server["client"].predict(run_state["id"], api_name="/open_run")
    assert pick["value"] == run_state["id"] and ckpt["value"] == run_state["id"]
    assert run_state["id"] in message
    *_, message = server["client"].predict([run_state["id"]], api_name="/open_run")
    assert "a run id is text" in message and "Internal error" not in message


def test_copy_a_runs_config_into_the_form(server, run_state):
    outputs = server["client"].predict(run_state["id"], api_name="/copy_config")
    values = dict(zip(FIELD_NAMES, outputs[:len(FIELD_NAMES)]))
    assert values["image_size"] == 32 and values["batch_size"] == 8
    assert values["max_steps"] == run_state["stopped_at"] + 3  # the resume's new end


def test_export_loads_into_timm(server, run_state):
    import timm
    from safetensors.torch import load_file

    path, snippet, message = server["client"].predict(run_state["id"], api_name="/export")
    assert Path(path).name == "encoder.safetensors" and "timm.create_model" in snippet
    state = load_file(path)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                              num_classes=10)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert set(missing) == {"head.weight", "head.bias"} and not unexpected
    exec(snippet, {})  # the snippet shown in the page runs as it is (its asserts included)
    # Refused (no such run), a client gets no file and no snippet, not gradio's update markers.
    path, snippet, message = server["client"].predict("no-such-run", api_name="/export")
    assert (path, snippet) == (None, "") and "no-such-run" in message, (path, snippet, message)


def test_metrics_csv_gives_an_api_client_the_files_path(server, run_state):
    """/metrics_csv gave a client gradio's update dict (the page's label rode along with it)."""
    path, message = server["client"].predict(run_state["id"], api_name="/metrics_csv")
    assert isinstance(path, str) and Path(path).name.endswith(".csv"), path
    header, *rows = Path(path).read_text().splitlines()
    assert "step" in header.split(",") and rows
    assert run_state["id"] in message


def test_delete_asks_first_then_deletes(server, run_state):
    client = server["client"]
    for unconfirmed in (False, "false", "no", None):  # a non-empty string used to delete
        message, _ = client.predict(run_state["id"], unconfirmed, api_name="/delete_run")
        assert "yes, delete" in message and 'data-kind="error"' in message, unconfirmed
        assert (server["runs_dir"] / run_state["id"]).is_dir()
    message, _ = client.predict(run_state["id"], "maybe", api_name="/delete_run")
    assert "confirmed: must be true or false" in message
    message, confirm = client.predict(run_state["id"], True, api_name="/delete_run")
    assert run_state["id"] in message and confirm is False
    assert not (server["runs_dir"] / run_state["id"]).exists()
    with pytest.raises(AppError, match="no run named"):
        client.predict(run_state["id"], api_name="/status")
    _still_serving(client)


# --- python app.py ---------------------------------------------------------------------------------

def test_python_app_py_serves_on_localhost(tmp_path):
    """The command line: binds 127.0.0.1 (not 0.0.0.0), prints the URL, answers the API."""
    port = free_port()
    runs_dir = tmp_path / "runs"
    # Started as a script's background job is: SIGINT ignored, inherited (the app outlived its
    # Ctrl+C in CI, and `python app.py &` from a script ignored `kill -INT`).
    process = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--runs-dir",
                                str(runs_dir)], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        url = f"http://127.0.0.1:{port}/"
        started = time.monotonic()

        def page():
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    return response.status == 200
            except OSError:
                return False

        assert poll(page, 60, every_s=0.1), "python app.py did not serve its page within 60 s"
        first_page_s = time.monotonic() - started
        table, *_ = Client(url, verbose=False).predict(None, api_name="/list_runs")
        assert table["data"] == [] and runs_dir.is_dir()
        if shutil.which("ss"):  # listening on loopback only, not on the machine's other addresses
            listening = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True,
                                       text=True).stdout
            assert f"127.0.0.1:{port}" in listening, listening
            assert f"0.0.0.0:{port}" not in listening and f"[::]:{port}" not in listening, listening
        print(f"python app.py: first page after {first_page_s:.1f} s")
        # A second app on the same port, or a runs directory that cannot be made: said in a line
        # (exit 2), not gradio's or pathlib's traceback.
        for args, said in ((["--port", str(port)], f"error: cannot serve on 127.0.0.1:{port}"),
                           (["--runs-dir", "/proc/no-runs-here"], "error: the runs directory")):
            second = subprocess.run([sys.executable, "app.py", "--runs-dir", str(tmp_path / "b"),
                                     *args], cwd=REPO_ROOT, capture_output=True, text=True,
                                    timeout=120)
            assert second.returncode == 2 and said in second.stderr, second
            assert "Traceback" not in second.stderr + second.stdout, second.stderr
    finally:
        os.killpg(process.pid, signal.SIGINT)
        try:
            output = process.communicate(timeout=20)[0]
        except subprocess.TimeoutExpired:  # where it is stuck: every thread's stack, then the kill
            os.killpg(process.pid, signal.SIGUSR1)
            time.sleep(2)
            os.killpg(process.pid, signal.SIGKILL)
            output = process.communicate()[0]
    assert re.search(rf"MAE Studio is running at http://127\.0\.0\.1:{port}", output), output
    # Ctrl+C ends it cleanly: exit 0, no traceback (uvicorn logged the cancelled lifespan's).
    assert process.returncode == 0 and "Traceback" not in output, output


def test_python_app_py_refuses_a_public_address_without_auth(tmp_path):
    result = subprocess.run([sys.executable, "app.py", "--host", "0.0.0.0", "--port",
                             str(free_port()), "--runs-dir", str(tmp_path / "runs")],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
                            env={k: v for k, v in os.environ.items() if k != "MAE_STUDIO_AUTH"})
    assert result.returncode == 2
    assert "--auth" in result.stderr and "0.0.0.0" in result.stderr


def test_files_are_served_only_from_the_runs_directory_and_the_upload_cache(server):
    """Anyone reaching the port must not read the host's files through the file route."""
    import urllib.error

    for path in ("/etc/passwd", str(REPO_ROOT / "app.py"), str(REPO_ROOT / "README.md")):
        url = f"{server['url']}gradio_api/file={path}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                status = response.status
        except urllib.error.HTTPError as err:
            status = err.code
        assert status in (403, 404), (path, status)


def test_the_form_downloads_as_a_yaml_config_that_loads_back(server, tmp_path):
    path, message = server["client"].predict(*form(max_steps=77), api_name="/download_config")
    assert Path(path).is_file() and "Config written" in message
    from mae_core.config import RunConfig

    assert RunConfig.load(path).train.max_steps == 77
    outputs = server["client"].predict(handle_file(path), api_name="/load_config")
    assert dict(zip(FIELD_NAMES, outputs))["max_steps"] == 77


def test_an_api_caller_cannot_make_the_app_read_a_server_path(server, run_state, tmp_path):
    """A raw API call naming a file on the server, instead of uploading one, is refused (by
    Gradio's own upload-folder check) before any handler reads it."""
    import json as json_module

    secret = tmp_path / "private.png"
    from PIL import Image

    Image.new("RGB", (40, 40), (255, 0, 0)).save(secret)
    body = json_module.dumps({"data": [[{"path": str(secret), "meta": {"_type": "gradio.FileData"}}],
                                       False, None, 0.75, 0]}).encode()
    request = urllib.request.Request(f"{server['url']}gradio_api/call/reconstruct", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        event_id = json_module.loads(response.read())["event_id"]
    with urllib.request.urlopen(f"{server['url']}gradio_api/call/reconstruct/{event_id}",
                                timeout=60) as response:
        stream = response.read().decode()
    assert "event: error" in stream and "event: complete" not in stream
    assert "recon-item" not in stream
