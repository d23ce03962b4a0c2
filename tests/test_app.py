"""The web UI through its API: every action of app.py called with gradio_client on a live server.

One server (``build_app(RunManager(tmp))``) serves the whole module; the tests run in file order and
share one tiny CPU run (32 px, patch 8, batch 8): it is started, watched while live, refused a second
start, stopped, resumed to a few more steps, reconstructed from, exported, and deleted.
"""

from __future__ import annotations

import io
import math
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

from app import build_app  # noqa: E402
from mae_core import curves  # noqa: E402
from helpers import free_port, poll  # noqa: E402
from mae_core.data import sample_photo_paths  # noqa: E402
from mae_core.reconstruct import PANEL_TITLES  # noqa: E402
from mae_core.rundir import LIVE_STATES  # noqa: E402
from mae_core.runs import RunManager  # noqa: E402

TINY = dict(image_size=32, patch_size=8, batch_size=8, max_steps=5000, seed=0,
            checkpoint_every_n_steps=1000, preview_every_n_steps=1000)
STATE_TIMEOUT_S = 150  # the machine is shared: starting two DDP ranks can take a while


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
                manager.stop(live)  # a second stop ends the process group at once
        demo.close()


@pytest.fixture(scope="module")
def run_state():
    """What the tests share about the one run they drive."""
    return {}


def _status(client: Client, run_id: str) -> dict:
    status, panel = client.predict(run_id, api_name="/status")
    assert run_id in panel
    return status


def _wait_state(client: Client, run_id: str, states: set[str], timeout_s: float = STATE_TIMEOUT_S) -> dict:
    last = {}

    def reached():
        nonlocal last
        last = _status(client, run_id)
        return last if last.get("state") in states else None

    status = poll(reached, timeout_s, every_s=1.0)
    assert status, f"run {run_id} did not reach {states} in {timeout_s} s; last status: {last}"
    return status


def _plot_rows(plot: dict) -> list[dict]:
    """The line plot's points as dicts (step, value, series, run, kind)."""
    value = plot.get("value", plot) if isinstance(plot, dict) else None
    if not value:
        return []
    return [dict(zip(value["columns"], row)) for row in value["data"]]


def _still_serving(client: Client) -> None:
    table, _ = client.predict(None, api_name="/list_runs")
    assert "headers" in table


# --- the data shaping behind the curve and the tables (mae_core.curves) ----------------------------

def test_ema_is_bias_corrected_and_zero_means_raw():
    assert curves.ema([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])
    assert curves.ema([1.0, 3.0], 0.0) == [1.0, 3.0]
    smooth = curves.ema([1.0, 0.0] * 50, 0.9)
    assert 0.4 < smooth[-1] < 0.6


def test_curve_frame_log_scale_overlay_and_thinning():
    rows_a = [{"step": s, "loss": 1.0 / s, "lr": 0.0 if s == 1 else 1e-4} for s in range(1, 11)]
    rows_b = [{"step": s, "loss": 2.0} for s in range(1, 6)] + [{"step": 3, "loss": 4.0}]
    frame = curves.curve_frame({"a": rows_a, "b": rows_b}, "loss", smoothing=0.5, log_scale=True,
                               labels={"a": "A", "b": "B"})
    assert set(frame["series"]) == {"A", "A · raw", "B", "B · raw"}
    raw_a = frame[(frame["run"] == "a") & (frame["kind"] == "raw")]
    assert raw_a["value"].tolist() == pytest.approx([math.log10(1.0 / s) for s in range(1, 11)])
    raw_b = frame[(frame["run"] == "b") & (frame["kind"] == "raw")]
    assert raw_b["step"].tolist() == [1, 2, 3, 4, 5]  # a repeated step (a resume): the last line wins
    assert raw_b["value"].tolist()[2] == pytest.approx(math.log10(4.0))
    lr = curves.curve_frame({"a": rows_a}, "lr", log_scale=True)
    assert lr["step"].tolist() == list(range(2, 11))  # log10(0) is dropped, not -inf
    many = curves.curve_frame({"a": [{"step": s, "loss": 1.0} for s in range(5000)]}, max_points=100)
    assert len(many) <= 100 and many["step"].iloc[-1] == 4999
    assert curves.curve_frame({}, "loss").empty
    with pytest.raises(ValueError, match="unknown metric"):
        curves.curve_frame({}, "accuracy")


def test_run_labels_progress_and_table_rows():
    ids = ["20251126-201828-vit-tiny-ddp-clean", "20251126-201900-vit-base-reference"]
    assert curves.run_labels(ids) == {ids[0]: "20:18:28 vit-tiny ddp-clean",
                                      ids[1]: "20:19:00 vit-base reference"}
    clash = ["20251126-201828-vit-tiny-ddp-clean", "20251127-201828-vit-tiny-ddp-clean"]
    assert curves.run_labels(clash) == {r: r for r in clash}
    status = {"run_id": "r", "state": "running", "step": 25, "total_steps": 100, "elapsed_s": 50.0,
              "loss": 0.123456, "policy": "ddp-clean", "preset": "vit-tiny"}
    assert curves.progress_fraction(status) == 0.25
    assert curves.eta_seconds(status) == pytest.approx(150.0)
    assert curves.eta_seconds({**status, "step": 0}) is None
    assert curves.format_duration(3725) == "1 h 02 min" and curves.format_duration(None) == "–"
    assert curves.run_rows([status]) == [["r", "running", "25 / 100", "0.1235", "50 s", "ddp-clean",
                                          "vit-tiny"]]


# --- refusals before anything runs ----------------------------------------------------------------

def test_bad_hyperparameters_name_the_field(server):
    with pytest.raises(AppError) as err:
        server["client"].predict(**{**TINY, "image_size": 36}, api_name="/start")
    assert "image_size" in str(err.value) and "divisible" in str(err.value)
    with pytest.raises(AppError, match="patch_size"):
        server["client"].predict(**{**TINY, "patch_size": 0}, api_name="/start")
    with pytest.raises(AppError, match="batch_size"):
        server["client"].predict(**{**TINY, "batch_size": 0}, api_name="/start")
    with pytest.raises(AppError, match="base_lr"):
        server["client"].predict(**{**TINY, "base_lr": -1}, api_name="/start")
    assert server["manager"].list() == []


def test_missing_data_folder_is_refused(server, tmp_path):
    missing = tmp_path / "no-such-folder"
    with pytest.raises(AppError, match="does not exist"):
        server["client"].predict(**TINY, data=str(missing), api_name="/start")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AppError, match="holds no images"):
        server["client"].predict(**TINY, data=str(empty), api_name="/start")
    assert server["manager"].list() == []


# --- one run: start, watch, refuse, stop, resume -------------------------------------------------

def test_start_then_status_and_live_metrics(server, run_state):
    client = server["client"]
    message, run_id = client.predict(**TINY, api_name="/start")
    assert run_id and run_id in message
    run_state["id"] = run_id

    def live_points():
        status = _status(client, run_id)
        assert status["state"] in LIVE_STATES, f"the run ended early: {status}"
        plot, info = client.predict([run_id], "loss", False, 0.8, api_name="/metrics")
        rows = _plot_rows(plot)
        return (status, rows, info) if status["state"] == "running" and rows else None

    result = poll(live_points, STATE_TIMEOUT_S, every_s=1.0)
    assert result, f"no loss points while the run was live: {_status(client, run_id)}"
    status, rows, info = result
    assert status["total_steps"] == TINY["max_steps"]
    assert {(row["run"], row["kind"]) for row in rows} == {(run_id, "raw"), (run_id, "smoothed")}
    assert "points" in info
    # lr, throughput and the log10 view of the same run
    plot, _ = client.predict([run_id], "lr", False, 0.0, api_name="/metrics")
    assert {row["kind"] for row in _plot_rows(plot)} == {"raw"}
    plot, _ = client.predict([run_id], "images_per_s", False, 0.0, api_name="/metrics")
    assert all(row["value"] > 0 for row in _plot_rows(plot))
    plot, _ = client.predict([run_id], "loss", True, 0.0, api_name="/metrics")
    assert all(row["value"] < 2 for row in _plot_rows(plot))  # log10 of a loss of a few units


def test_a_fresh_page_shows_the_live_run(server, run_state):
    """State lives in the run directories: a new client (another tab) sees the same live run."""
    other = Client(server["url"], verbose=False)
    pick, _overlay, status, panel, *_ = other.predict("", [], "loss", False, 0.8, api_name="/poll")
    assert pick["value"] == run_state["id"]
    assert status["run_id"] == run_state["id"] and status["state"] in LIVE_STATES
    assert f'data-state="{status["state"]}"' in panel


def test_second_start_and_deleting_a_live_run_are_refused(server, run_state):
    client = server["client"]
    with pytest.raises(AppError, match="still live"):
        client.predict(**TINY, api_name="/start")
    with pytest.raises(AppError, match="stop it before deleting"):
        client.predict(run_state["id"], True, api_name="/delete_run")
    assert len(server["manager"].list()) == 1


def test_stop(server, run_state):
    client = server["client"]
    message = client.predict(run_state["id"], api_name="/stop")
    assert "Stop requested" in message or "stopped" in message
    status = _wait_state(client, run_state["id"], {"stopped", "failed", "finished"})
    assert status["state"] == "stopped", status
    assert status["resumable"] is True
    assert status["step"] > 0
    run_state["stopped_at"] = status["step"]
    with pytest.raises(AppError, match="not running"):
        client.predict(run_state["id"], api_name="/stop")


def test_resume_to_a_few_more_steps(server, run_state):
    client = server["client"]
    target = run_state["stopped_at"] + 3
    message = client.predict(run_state["id"], target, api_name="/resume")
    assert "Resumed" in message
    status = _wait_state(client, run_state["id"], {"finished", "failed", "stopped"})
    assert status["state"] == "finished", status
    assert status["step"] == target
    plot, _ = client.predict([run_state["id"]], "loss", False, 0.0, api_name="/metrics")
    assert max(row["step"] for row in _plot_rows(plot)) == target


# --- reconstruct ----------------------------------------------------------------------------------

def test_reconstruct_an_uploaded_photo(server, run_state):
    client = server["client"]
    photo = sample_photo_paths()[0]
    gallery, losses, message = client.predict([handle_file(str(photo))], False, run_state["id"],
                                              0.75, 3, api_name="/reconstruct")
    captions = [item["caption"] for item in gallery]
    assert captions == [f"{photo.name} (input)", *PANEL_TITLES[1:], "per-patch error"]
    for item in gallery:
        assert Path(item["image"]).is_file()
    [[name, loss, masked]] = losses["data"]
    assert name == photo.name and 0 < float(loss) < 100 and int(masked) == 12  # 75% of 16 patches
    assert f"step {run_state['stopped_at'] + 3}" in message
    loads = server["demo"].model_cache.loads
    # the same seed gives the same mask, and the model is not loaded again
    _, again, _ = client.predict([handle_file(str(photo))], False, run_state["id"], 0.75, 3,
                                 api_name="/reconstruct")
    assert again["data"] == losses["data"]
    assert server["demo"].model_cache.loads == loads


def test_reconstruct_the_sample_photos(server, run_state):
    gallery, losses, _ = server["client"].predict(None, True, run_state["id"], 0.5, 0,
                                                  api_name="/reconstruct")
    assert len(losses["data"]) == 3 and len(gallery) == 15


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
    _, losses, _ = server["client"].predict(files, False, run_state["id"], 0.75, 0,
                                            api_name="/reconstruct")
    assert [row[0] for row in losses["data"]] == list(images)


def test_corrupt_upload_is_refused_readably(server, run_state, tmp_path):
    corrupt = tmp_path / "holiday.png"
    corrupt.write_bytes(os.urandom(4096))
    with pytest.raises(AppError) as err:
        server["client"].predict([handle_file(str(corrupt))], False, run_state["id"], 0.75, 0,
                                 api_name="/reconstruct")
    assert "holiday.png" in str(err.value) and "not an image" in str(err.value)
    _still_serving(server["client"])


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


def test_decompression_bomb_is_refused_readably(server, run_state, tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_bomb(100_000, 100_000))
    with pytest.raises(AppError) as err:
        server["client"].predict([handle_file(str(bomb))], False, run_state["id"], 0.75, 0,
                                 api_name="/reconstruct")
    assert "bomb.png" in str(err.value) and "decompression bomb" in str(err.value)
    _still_serving(server["client"])


def test_reconstruct_needs_images_and_a_checkpoint(server, run_state):
    with pytest.raises(AppError, match="Upload one or more images"):
        server["client"].predict(None, False, run_state["id"], 0.75, 0, api_name="/reconstruct")
    with pytest.raises(AppError, match="no run named"):
        server["client"].predict(None, True, "no-such-run", 0.75, 0, api_name="/reconstruct")


def test_checkpoints_and_previews(server, run_state):
    pick = server["client"].predict("", api_name="/checkpoints")
    assert pick["value"] == run_state["id"]
    assert [c[1] for c in pick["choices"]] == [run_state["id"]]
    previews = server["client"].predict(run_state["id"], api_name="/previews")
    assert previews and previews[0]["caption"].startswith("step ")
    assert all(Path(p["image"]).is_file() for p in previews)


# --- parameters ----------------------------------------------------------------------------------

def test_parameter_audit_of_a_preset(server):
    preset, image_size, patch_size, summary, diff, clean_html, ref_html, audit = server["client"].predict(
        "", "vit-tiny", 32, 8, api_name="/params")
    assert (preset, image_size, patch_size) == ("vit-tiny", 32, 8)
    clean = {row[0]: row for row in audit["ddp-clean"]["rows"]}
    reference = audit["reference"]
    assert clean["backbone.vit.head.weight"][3] == "removed"
    assert clean["backbone.vit.head.bias"][3] == "removed"
    assert clean["backbone.mask_token"][3] == "frozen"
    assert audit["ddp-clean"]["ddp_safe"] is True
    assert audit["ddp-clean"]["verdict"].startswith("plain DDP safe")
    assert reference["ddp_safe"] is False
    assert "backbone.mask_token" in reference["verdict"]
    assert "backbone.vit.head.weight" in reference["no_grad"]
    assert 'data-name="backbone.vit.head.weight" data-status="removed"' in clean_html
    assert 'data-name="backbone.vit.head.weight" data-status="trainable"' in ref_html
    assert "backbone.mask_token" in diff and "32px" in summary


def test_parameter_audit_of_a_run_uses_its_geometry(server, run_state):
    preset, image_size, patch_size, summary, _, _, _, audit = server["client"].predict(
        run_state["id"], "vit-base", 224, 16, api_name="/params")
    assert (preset, image_size, patch_size) == ("vit-tiny", 32, 8)  # the fields show the run's model
    assert run_state["id"] in summary and "32px, patch 8" in summary
    rows = {row[0]: row for row in audit["ddp-clean"]["rows"]}
    assert rows["backbone.vit.pos_embed"][1] == [1, 17, 192]  # 4×4 patches + class token, vit-tiny
    with pytest.raises(AppError, match="patch_size"):
        server["client"].predict("vit-tiny", 32, 64, api_name="/params_custom")
    run, summary, *_ = server["client"].predict("vit-small", 32, 8, api_name="/params_custom")
    assert run == "" and "vit-small, 32px" in summary


# --- runs: list, export, delete -------------------------------------------------------------------

def test_list_runs(server, run_state):
    table, pick = server["client"].predict(None, api_name="/list_runs")
    assert table["headers"] == ["run", "state", "steps", "final loss", "duration", "policy", "preset"]
    [row] = table["data"]
    assert row[0] == run_state["id"] and row[1] == "finished"
    assert row[2] == f"{run_state['stopped_at'] + 3} / {run_state['stopped_at'] + 3}"
    assert row[5] == "ddp-clean" and row[6] == "vit-tiny"
    assert pick["value"] == run_state["id"]


def test_open_run(server, run_state):
    pick, ckpt, message = server["client"].predict(run_state["id"], api_name="/open_run")
    assert pick["value"] == run_state["id"] and ckpt["value"] == run_state["id"]
    assert run_state["id"] in message


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
    headless = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                                 num_classes=0)
    headless.load_state_dict(state, strict=True)
    exec(snippet, {})  # the snippet shown in the page runs as it is (its asserts included)


def test_delete_asks_first_then_deletes(server, run_state):
    client = server["client"]
    with pytest.raises(AppError, match="yes, delete"):
        client.predict(run_state["id"], False, api_name="/delete_run")
    assert (server["runs_dir"] / run_state["id"]).is_dir()
    message, confirm, table, _ = client.predict(run_state["id"], True, api_name="/delete_run")
    assert run_state["id"] in message and confirm is False
    assert table["data"] == [] or all(row[0] != run_state["id"] for row in table["data"])
    assert not (server["runs_dir"] / run_state["id"]).exists()
    with pytest.raises(AppError, match="no run named"):
        client.predict(run_state["id"], api_name="/status")
    _still_serving(client)


# --- python app.py ---------------------------------------------------------------------------------

def test_python_app_py_serves_on_localhost(tmp_path):
    """The command line: binds 127.0.0.1 (not 0.0.0.0), prints the URL, answers the API."""
    port = free_port()
    runs_dir = tmp_path / "runs"
    process = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--runs-dir",
                                str(runs_dir)], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
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
        table, _ = Client(url, verbose=False).predict(None, api_name="/list_runs")
        assert table["data"] == [] and runs_dir.is_dir()
        if shutil.which("ss"):  # listening on loopback only, not on the machine's other addresses
            listening = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True,
                                       text=True).stdout
            assert f"127.0.0.1:{port}" in listening, listening
            assert f"0.0.0.0:{port}" not in listening and f"[::]:{port}" not in listening, listening
        print(f"python app.py: first page after {first_page_s:.1f} s")
    finally:
        os.killpg(process.pid, signal.SIGINT)
        try:
            output = process.communicate(timeout=20)[0]
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output = process.communicate()[0]
    assert re.search(rf"MAE Studio is running at http://127\.0\.0\.1:{port}", output), output
