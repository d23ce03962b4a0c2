"""The config refuses impossible values naming the field, and resolves "auto" for this machine."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from mae_core import config as config_module
from mae_core import precision as precision_module
from mae_core.config import MAX_SEED, ConfigError, ModelConfig, RunConfig, TrainConfig


def test_without_gpus_cpu_ddp_over_at_least_two_processes_in_full_precision(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # a no-op here; hides a GPU elsewhere
    # A CPU without native bf16 (tests/test_precision.py covers the one with it).
    monkeypatch.setattr(precision_module, "cpu_bf16_feature", lambda: None)
    cfg = RunConfig().resolved()
    cores = os.cpu_count() or 1
    assert cfg.train.accelerator == "cpu" and cfg.train.precision == "32-true"
    assert cfg.train.devices == (1 if cores < 2 else max(2, cores // 2))
    assert cfg.train.num_workers == 0  # decoded images are cached; the cores go to the ranks
    assert cfg.train.find_unused_parameters is False  # ddp-clean: plain DDP
    reference = RunConfig(model=ModelConfig(policy="reference")).resolved()
    assert reference.train.find_unused_parameters is True

    with pytest.raises(ConfigError) as err:
        RunConfig(train=TrainConfig(accelerator="gpu")).resolved()
    assert err.value.field == "accelerator"
    with pytest.raises(ConfigError) as err:
        RunConfig(train=TrainConfig(precision="bf16-mixed")).resolved()
    assert err.value.field == "precision"


def test_with_gpus_every_gpu_in_bf16(monkeypatch):
    # No GPU is lent to CI: only the detection is stood in for, the resolution logic is real.
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(precision_module, "_bf16_ok", lambda: True)
    cfg = RunConfig().resolved()
    assert (cfg.train.accelerator, cfg.train.devices, cfg.train.precision) == ("gpu", 4, "bf16-mixed")
    assert RunConfig(train=TrainConfig(devices=2)).resolved().train.devices == 2
    with pytest.raises(ConfigError) as err:
        RunConfig(train=TrainConfig(devices=8)).resolved()
    assert err.value.field == "devices"
    monkeypatch.setattr(precision_module, "_bf16_ok", lambda: False)  # e.g. a V100
    assert RunConfig().resolved().train.precision == "32-true"


# --- hostile values: every field, from Python, YAML and the command line ----------------------

def _bad_values(f: dataclasses.Field) -> list:
    """Values that must be refused for field ``f``, whatever the entry point."""
    kind = str(f.type)
    bad: list = [["x"], {"a": 1}]
    if f.name in ("data", "eval_data"):  # folder paths: any string without a NUL
        return [5, 1.5, True, "photos\0", ["x"]]
    if "bool" in kind:
        return bad + ["abc", "yes", 1, 0.0]
    if kind.startswith("str"):
        return bad + ["abc", 5, True]
    bad += ["abc", "1", True, float("nan"), float("inf"), -float("inf"), 2**70, -(2**70)]
    if "int" in kind:
        bad += [2.5, 4.0]
    return bad


ALL_FIELDS = [(cls, f) for cls in (ModelConfig, TrainConfig) for f in dataclasses.fields(cls)]


@pytest.mark.parametrize("cls, f", ALL_FIELDS, ids=[f.name for _, f in ALL_FIELDS])
def test_every_field_refuses_wrong_types_and_non_finite_numbers_naming_itself(cls, f):
    section = "model" if cls is ModelConfig else "train"
    for value in _bad_values(f):
        with pytest.raises(ConfigError) as err:
            cls(**{f.name: value})
        assert err.value.field == f.name, (f.name, value, err.value)
        # From a YAML file: the same refusal, naming the same field.
        with pytest.raises(ConfigError) as err:
            RunConfig.from_dict({section: {f.name: value}})
        assert err.value.field == f.name


@pytest.mark.parametrize("seed", [-1, MAX_SEED + 1, 2**70, 2.0, "7"])
def test_seed_outside_what_every_generator_accepts_is_refused(seed):
    with pytest.raises(ConfigError) as err:
        TrainConfig(seed=seed)
    assert err.value.field == "seed" and str(MAX_SEED) in str(err.value)


def test_seed_edges_are_accepted():
    assert TrainConfig(seed=0).seed == 0 and TrainConfig(seed=MAX_SEED).seed == MAX_SEED


def test_a_hostile_value_does_not_flood_the_message():
    with pytest.raises(ConfigError) as err:
        ModelConfig(preset="x" * 5000)
    assert len(str(err.value)) < 300


def _alias_bomb(levels: int) -> str:
    """YAML of ~50 bytes a level whose value, expanded, holds 10**levels strings."""
    anchors = ["&a0 [" + ", ".join(["x"] * 10) + "]"]
    anchors += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, levels)]
    return "model:\n  preset: [" + ", ".join(anchors) + "]\n"


def test_hostile_config_files_are_refused_with_a_short_message(tmp_path):
    """A 450-byte alias bomb (10⁸ strings once expanded: the old message builder took 8 s and 1 GB
    on it, each level more ×10), a 5,000-digit number, 5,000 nested lists, a 1,000-character
    field name."""
    for name, text, field in [
            ("bomb", _alias_bomb(8), "preset"),
            ("empty", "", "config"),  # a truncated file: never silently the defaults
            ("digits", "train:\n  batch_size: 1" + "0" * 5000 + "\n", "config"),
            ("nested", "model: " + "[" * 5000 + "]" * 5000, "config"),
            ("name", "model:\n  " + "k" * 1000 + ": 1\n", "k" * 60)]:
        path = tmp_path / f"{name}.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError) as err:
            RunConfig.load(path)
        assert err.value.field == field and len(str(err.value)) < 400, name
    with pytest.raises(ConfigError) as err:
        TrainConfig(batch_size=10**5000)
    assert err.value.field == "batch_size" and "16610 bits" in str(err.value)


def test_a_decoder_of_billions_of_parameters_is_refused_naming_its_size():
    with pytest.raises(ConfigError) as err:
        ModelConfig(decoder_dim=4096, decoder_depth=64, decoder_heads=64)
    assert err.value.field == "decoder_dim" and "12.9 B parameters" in str(err.value)
    ModelConfig(decoder_dim=1024, decoder_depth=64, decoder_heads=16)  # 805 M: allowed


def test_run_config_parts_must_be_config_objects():
    for kwargs, field in [({"model": {"preset": "vit-tiny"}}, "model"), ({"train": 5}, "train")]:
        with pytest.raises(ConfigError) as err:
            RunConfig(**kwargs)
        assert err.value.field == field


def test_config_file_sections_must_be_mappings(tmp_path):
    for text, field in [("[1, 2]", "config"), ("model: 5", "model"), ("train: [a]", "train"),
                        ("train: {seed: .nan}", "seed"), ("train: {batch_size: 2.5}", "batch_size")]:
        path = tmp_path / "run.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError) as err:
            RunConfig.load(path)
        assert err.value.field == field, text


@pytest.mark.parametrize("args, field", [
    (["--seed", "-1"], "seed"), (["--seed", str(2**70)], "seed"),
    (["--batch-size", "2.5"], "batch-size"), (["--base-lr", "nan"], "base_lr"),
    (["--mask-ratio", "abc"], "mask-ratio"), (["--compile", "maybe"], "compile"),
])
def test_command_line_refuses_bad_numbers_with_exit_2_and_creates_nothing(run_module, tmp_path,
                                                                           args, field):
    runs_dir = tmp_path / "runs"
    result = run_module("mae_core.train", "--runs-dir", runs_dir, "--max-steps", "1", *args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert field in result.stderr.strip().splitlines()[-1], result.stderr
    assert not runs_dir.exists()


# --- what resolved() refuses or fixes for this machine ----------------------------------------

def test_more_cpu_processes_than_cores_are_refused_naming_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    cores = config_module.usable_cores()
    assert cores == len(os.sched_getaffinity(0))
    assert RunConfig(train=TrainConfig(devices=cores, accelerator="cpu")).resolved().train.devices \
        == cores
    for accelerator in ("cpu", "auto"):
        with pytest.raises(ConfigError) as err:
            RunConfig(train=TrainConfig(devices=cores + 1, accelerator=accelerator)).resolved()
        assert err.value.field == "devices" and str(cores) in str(err.value)
    with pytest.raises(ConfigError) as err:
        RunConfig(train=TrainConfig(devices=64, accelerator="cpu")).resolved()
    assert err.value.field == "devices"


def test_resolved_data_folder_is_absolute_so_the_trainer_reads_the_same_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = RunConfig(train=TrainConfig(data="photos/set1", devices=1)).resolved()
    assert cfg.train.data == str(tmp_path / "photos" / "set1")
    monkeypatch.chdir("/")
    assert cfg.resolved().train.data == str(tmp_path / "photos" / "set1")  # once, not per call
    assert RunConfig(train=TrainConfig(devices=1)).resolved().train.data == ""  # embedded photos


# --- held-out evaluation (issue 14) --------------------------------------------------------------

@pytest.mark.parametrize("values, field", [
    ({"val_fraction": 0.0}, "val_fraction"), ({"val_fraction": 1.0}, "val_fraction"),
    ({"val_fraction": -0.1}, "val_fraction"), ({"val_fraction": 1.5}, "val_fraction"),
    ({"val_count": 0}, "val_count"), ({"val_fraction": 0.1, "val_count": 5}, "val_count"),
    ({"eval_every_n_steps": -1}, "eval_every_n_steps"), ({"eval_max_images": 0}, "eval_max_images"),
    ({"eval_data": "labels\0"}, "eval_data")])
def test_held_out_evaluation_values_are_refused_naming_the_field(values, field):
    with pytest.raises(ConfigError) as err:
        TrainConfig(**values)
    assert err.value.field == field
    with pytest.raises(ConfigError) as err:  # from a YAML file too
        RunConfig.from_dict({"train": values})
    assert err.value.field == field


def test_held_out_evaluation_defaults_and_resolved_eval_folder(tmp_path, monkeypatch):
    t = TrainConfig(val_fraction=0.2, eval_every_n_steps=0)
    assert (t.val_fraction, t.val_count, t.eval_every_n_steps) == (0.2, None, 0)
    assert TrainConfig().val_fraction is None and TrainConfig().eval_data == ""  # automatic, none
    monkeypatch.chdir(tmp_path)
    resolved = RunConfig(train=TrainConfig(eval_data="labelled", accelerator="cpu",
                                           devices=1)).resolved()
    assert resolved.train.eval_data == str(tmp_path / "labelled")  # the trainer may run elsewhere


@pytest.mark.parametrize("mean, std, field", [("1e308", "0.2", "pixel_mean"),
                                              ("-0.1", "0.2", "pixel_mean"),
                                              ("0.5", "1e-308", "pixel_std")])
def test_statistics_that_would_normalise_pixels_to_infinity_are_refused(mean, std, field):
    with pytest.raises(ConfigError) as err:
        ModelConfig(in_chans=1, normalize="dataset", pixel_mean=mean, pixel_std=std)
    assert err.value.field == field


def test_gpus_are_indices_of_the_gpus_this_process_sees(monkeypatch):
    """Under ``CUDA_VISIBLE_DEVICES=2,3`` this process sees two GPUs, 0 and 1. ``gpus=2,3`` was
    accepted because it read like the list itself, and its trainer then trained on those two:
    GPU 2 and 3 of this process do not exist."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(precision_module, "_bf16_ok", lambda: True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    monkeypatch.delenv("MAE_STUDIO_GPUS", raising=False)
    with pytest.raises(ConfigError) as err:
        RunConfig(train=TrainConfig(gpus="2,3")).resolved()
    assert err.value.field == "gpus" and "2 visible" in str(err.value)
    assert RunConfig(train=TrainConfig(gpus="0,1")).resolved().train.devices == 2
    # The trainer of a run on the app's GPUs 4 and 5 (physical 6 and 7) sees only those, as
    # 0 and 1, and its own gpus are still "4,5": they are its, not indices to check again.
    from mae_core.process import gpu_env

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3,4,5,6,7")
    for name, value in gpu_env("4,5").items():
        monkeypatch.setenv(name, value)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "6,7"
    assert RunConfig(train=TrainConfig(gpus="4,5")).resolved().train.devices == 2


@pytest.mark.parametrize(("data", "message"), [
    ({"modle": {}}, "modle: unknown config section (did you mean model?)"),
    # A flat file (as /start_run takes) is told where its fields go, not "unknown section".
    ({"preset": "vit-tiny", "data": "/x"}, "data: belongs under train:, not at the top level"),
    ({"image_size": 32}, "image_size: belongs under model:, not at the top level"),
    ({"model": {"batch_size": 8}}, "batch_size: belongs under train:, not model:"),
    ({"train": {"mask_ratio": 0.5}}, "mask_ratio: belongs under model:, not train:"),
    ({"train": {"max_step": 8}}, "max_step: unknown field under train: (did you mean max_steps"),
    ({"train": {"zzz": 1}}, "zzz: unknown field under train: (valid: accelerator, "),
])
def test_an_unknown_name_in_a_config_file_says_what_was_meant(data, message):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict(data)
    assert str(err.value).startswith(message)


def test_a_section_or_field_written_twice_is_refused(tmp_path):
    """YAML keeps the last of two equal keys: a second model: section replaced the first whole."""
    twice = tmp_path / "twice.yaml"
    twice.write_text("model:\n  preset: vit-tiny\n  image_size: 32\ntrain:\n  max_steps: 5\n"
                     "model:\n  preset: vit-huge\n")
    with pytest.raises(ConfigError, match="'model' appears twice"):
        RunConfig.load(twice)
    twice.write_text("train:\n  max_steps: 5\n  max_steps: 50\n")
    with pytest.raises(ConfigError, match="'max_steps' appears twice"):
        RunConfig.load(twice)
    once = tmp_path / "once.yaml"
    once.write_text("model:\n  preset: vit-tiny\ntrain:\n  max_steps: 5\n")
    assert RunConfig.load(once).train.max_steps == 5


def test_a_yaml_merge_key_is_read_as_yaml_reads_it(tmp_path):
    """``<<:`` merges a mapping's keys, the mapping's own replacing them: the duplicate-key check
    built the merge key itself and refused the file as "not valid YAML ... could not determine a
    constructor for the tag 'tag:yaml.org,2002:merge'"."""
    merged = tmp_path / "merged.yaml"
    merged.write_text("model:\n  <<: {preset: vit-small, image_size: 32}\n  image_size: 48\n"
                      "train:\n  <<: [{max_steps: 5}, {batch_size: 4}]\n")
    cfg = RunConfig.load(merged)
    assert (cfg.model.preset, cfg.model.image_size) == ("vit-small", 48)
    assert (cfg.train.max_steps, cfg.train.batch_size) == (5, 4)
    merged.write_text("train:\n  <<: {max_steps: 5}\n  max_steps: 6\n  max_steps: 7\n")
    with pytest.raises(ConfigError, match="'max_steps' appears twice"):  # its own keys: once each
        RunConfig.load(merged)


def test_a_data_folder_of_an_unknown_users_home_is_said_as_such():
    """``~nosuchuser/x`` was made absolute against the working folder first, and then read
    "data folder /current/dir/~nosuchuser/x does not exist"."""
    from mae_core.data import DataError, check_data

    cfg = RunConfig().with_overrides(data="~nosuchuser/x").resolved()
    with pytest.raises(DataError, match="~nosuchuser names no home folder on this machine"):
        check_data(cfg.train.data)
    assert RunConfig().with_overrides(data="~/x").resolved().train.data.startswith("/")


@pytest.mark.parametrize("url", ["http://example.com/images", "https://host/x", "file:///tmp/x",
                                 "S3://bucket/set", "ftp://host/x"])
def test_a_url_that_cannot_be_read_is_refused_as_a_url_not_a_folder(url):
    """``http://host/x`` was made absolute against the working folder and refused as "data folder
    /app/dir/http:/host/x does not exist", a folder the person never named."""
    with pytest.raises(ConfigError) as err:
        TrainConfig(data=url)
    assert err.value.field == "data" and "is a URL this app cannot read" in str(err.value)
    assert "s3://, gs://, azure://, hf://" in str(err.value) and os.getcwd() not in str(err.value)
    with pytest.raises(ConfigError, match="eval_data: must be a labelled folder on this machine"):
        TrainConfig(eval_data=url)
    assert TrainConfig(data="s3://bucket/set").data == "s3://bucket/set"  # a prepared set: read
    assert TrainConfig(data="photos/2024:x").data == "photos/2024:x"  # a colon alone: a folder
