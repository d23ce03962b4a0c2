"""ui.configfile's handlers, called as plain functions (no server): the Train form written as a YAML
file and read back, a run's config copied into the form, bad or hostile config files refused
readably, and downloads that do not pile up in the temp folder."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from PIL import Image

from mae_core.config import MIN_AUTO_LR, ConfigError, ModelConfig, RunConfig, TrainConfig
from mae_core.rundir import create_run
from ui import configfile
from ui.common import UserError, config_from_form, form_values, user_errors

TINY = RunConfig(model=ModelConfig(image_size=32, patch_size=8),
                 train=TrainConfig(accelerator="cpu", devices=1, batch_size=4, max_steps=4,
                                   num_workers=0))


def test_config_yaml_round_trips_into_the_form():
    values = {**form_values(TINY), "preset": "vit-small", "seed": 7, "base_lr": 3e-4,
              "policy": "reference", "max_epochs": 2}
    path = configfile.config_yaml_file(values)
    assert Path(path).read_text().startswith("model:")
    back = configfile.form_from_yaml(path)
    assert back["preset"] == "vit-small" and back["seed"] == 7 and back["policy"] == "reference"
    assert back == {**values, "max_epochs": 2}
    with pytest.raises(ConfigError, match="batch_size"):
        configfile.config_yaml_file({**values, "batch_size": "abc"})


def test_copy_a_runs_config_into_the_form_with_what_was_auto_as_auto(ctx):
    """A run saves what "auto" gave it (so a resume keeps its rate): copied as such, a base lr of
    0.064 (auto's at batch 4) trained the next run's batch of 256 at 64 times auto's rate."""
    ran = TINY.resolved()
    assert ran.train.base_lr == pytest.approx(0.064) and ran.train.precision is not None
    paths = create_run(ran, runs_dir=ctx.manager.runs_dir)
    copied = configfile.form_from_run(ctx.manager, paths.run_id)
    auto = form_values(RunConfig())
    changed = {k for k, v in copied.items() if v != form_values(ran)[k]}
    assert changed <= {"base_lr", "precision", "accelerator", "num_workers",
                       "find_unused_parameters"}
    for name in ("base_lr", "precision", "accelerator"):
        assert copied[name] == auto[name], name
    assert (copied["devices"], copied["batch_size"], copied["image_size"]) == (1, 4, 32)  # chosen
    bigger = config_from_form({**copied, "batch_size": 256}).resolved().train
    assert bigger.learning_rate() == pytest.approx(MIN_AUTO_LR)  # auto's at batch 256 (not 0.064)
    # A value set by hand is no auto value: it stays.
    own = create_run(TINY.with_overrides(base_lr=0.002, precision="32-true").resolved(),
                     runs_dir=ctx.manager.runs_dir)
    mine = configfile.form_from_run(ctx.manager, own.run_id)
    assert (mine["base_lr"], mine["precision"]) == (0.002, "32-true")
    with pytest.raises(UserError):
        configfile.form_from_run(ctx.manager, None)


@pytest.mark.parametrize("content,words", [
    (b"model: [unclosed\n", "not valid YAML"),
    (b"hello: world\n", "hello"),
    (b"- just\n- a list\n", "mapping"),
    (b"model:\n  image_size: 36\n", "image_size"),
    (b"train:\n  batch_sise: 8\n", "batch_sise"),
])
def test_a_bad_config_file_gives_a_clear_error(tmp_path, content, words):
    path = tmp_path / "config.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=words):
        configfile.form_from_yaml(str(path))


def test_a_bad_uploaded_config_names_the_file_not_the_servers_folder(tmp_path):
    upload = tmp_path / "gradio" / "3f9a0c1d" / "bad.yaml"  # where Gradio keeps an upload
    upload.parent.mkdir(parents=True)
    for content in (b"model: [unclosed\n", b"- just\n- a list\n"):
        upload.write_bytes(content)
        with pytest.raises(ConfigError) as caught:
            configfile.form_from_yaml(str(upload))
        assert "bad.yaml" in str(caught.value), content
        assert str(upload.parent) not in str(caught.value), content


def test_a_refused_download_takes_back_the_earlier_file(ctx):
    """A valid form downloaded, then made invalid: the refusal says why and no longer offers
    the earlier YAML (another form's config) for download."""
    from ui.blocks import build_app
    from ui.common import FIELD_NAMES

    demo = build_app(ctx.manager)
    [download] = [f for f in demo.fns.values() if f.api_name == "download_config"]
    by_id = {getattr(block, "elem_id", None): block for block in demo.blocks.values()}
    config_file, message = by_id["config-file"], by_id["config-message"]
    values = form_values(TINY)
    good = download.fn(*(values[name] for name in FIELD_NAMES))
    assert Path(good[config_file]).is_file()
    bad = download.fn(*({**values, "batch_size": "abc"}[name] for name in FIELD_NAMES))
    assert "batch_size" in bad[message] and 'data-kind="error"' in bad[message]
    assert config_file in bad and bad[config_file] is None


def test_the_accordion_reports_under_its_own_buttons(ctx, tmp_path):
    """Copy, load and download answer in the accordion, under its buttons: the Train tab's
    message sits about 1,000 px above them, where a refusal or a success went unseen."""
    from ui.blocks import build_app
    from ui.common import FIELD_NAMES

    demo = build_app(ctx.manager)
    by_id = {getattr(block, "elem_id", None): block for block in demo.blocks.values()}
    message, accordion = by_id["config-message"], by_id["config-tools"]
    assert message.parent is accordion
    order = [getattr(child, "elem_id", None) for child in accordion.children]
    assert order.index("config-message") > order.index("upload-config")  # under the buttons
    handler = {f.api_name: f for f in demo.fns.values()}
    for name in ("copy_config", "load_config", "download_config"):
        outputs = handler[name].outputs
        assert message in outputs and by_id["train-message"] not in outputs

    paths = create_run(TINY.resolved(), runs_dir=ctx.manager.runs_dir)
    assert "now holds the config of" in handler["copy_config"].fn(paths.run_id)[message]
    assert 'data-kind="error"' in handler["copy_config"].fn(None)[message]
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"model: [unclosed\n")
    assert "bad.yaml" in handler["load_config"].fn(str(bad))[message]
    values = form_values(TINY)
    written = handler["download_config"].fn(*(values[name] for name in FIELD_NAMES))
    assert "Config written" in written[message]


def test_a_non_text_file_is_refused_as_a_user_error(tmp_path):
    """An image uploaded by mistake is refused with a readable message, not an internal error."""
    path = tmp_path / "photo.yaml"
    Image.new("RGB", (16, 16), (200, 10, 10)).save(path, format="PNG")
    with pytest.raises(user_errors()) as caught:
        configfile.form_from_yaml(str(path))
    assert "photo.yaml" in str(caught.value)


def test_a_huge_or_missing_config_file_is_refused(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * 1_100_000 + "\n")
    with pytest.raises(UserError, match="1 MB"):
        configfile.form_from_yaml(str(big))
    with pytest.raises(UserError, match="Choose a config file"):
        configfile.form_from_yaml(None)
    # Gone from the upload folder meanwhile: it said "Internal error: FileNotFoundError".
    with pytest.raises(UserError, match="gone.yaml cannot be read .*: upload it again"):
        configfile.form_from_yaml(str(tmp_path / "gone.yaml"))


def test_config_downloads_do_not_pile_up_in_the_temp_folder():
    values = form_values(TINY)
    first = Path(configfile.config_yaml_file(values))
    assert Path(configfile.config_yaml_file(values)) == first  # the same config: the same file
    other = Path(configfile.config_yaml_file({**values, "seed": 11}))
    assert other != first and other.parent == first.parent
    day_old = time.time() - configfile.CONFIG_FILE_MAX_AGE_S - 60
    os.utime(first, (day_old, day_old))
    configfile.config_yaml_file({**values, "seed": 12})
    assert not first.exists() and other.exists()
