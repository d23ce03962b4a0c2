"""ui.common: the Train form generated from the config dataclasses, values from the page parsed
and refused naming the field, and handlers that turn a failure into a message."""

from __future__ import annotations

import dataclasses
import math

import gradio as gr
import pytest

from mae_core.config import MAX_SEED, PRESETS, ConfigError, ModelConfig, RunConfig, TrainConfig
from mae_core.runs import RunError
from ui import common
from ui.common import (AUTO, DEFAULTS, FORM_FIELDS, HINTS, FieldNumber, FieldSlider, UserError,
                       config_from_form, describe, field_widget, form_values, guarded, parse_value)

BY_NAME = {f.name: f for f in FORM_FIELDS}


def test_every_config_field_is_in_the_form_unless_hidden():
    names = [f.name for owner in (ModelConfig, TrainConfig) for f in dataclasses.fields(owner)]
    hidden = {name for name, hint in HINTS.items() if hint.hidden}
    assert hidden == {"num_nodes"}  # set from the command line (torchrun, SLURM), not the form
    assert [f.name for f in FORM_FIELDS] == [n for n in names if n not in hidden]
    assert common.FIELD_NAMES == tuple(f.name for f in FORM_FIELDS)
    for field in FORM_FIELDS:  # each field's default is the dataclass's own
        owner = DEFAULTS.model if hasattr(DEFAULTS.model, field.name) else DEFAULTS.train
        assert field.default == getattr(owner, field.name), field.name


def test_main_form_holds_the_hinted_fields_data_first():
    main = [f.name for f in common.MAIN_FIELDS]
    assert main[0] == "data"
    assert set(main) == {n for n, h in HINTS.items() if h.main}
    assert "weight_decay" not in main  # unhinted: under "more settings"


def test_a_field_without_a_hint_gets_a_widget_by_its_type():
    @dataclasses.dataclass(frozen=True)
    class Future:  # fields a later version might add to TrainConfig
        ema_decay: float = 0.999
        accumulate_batches: int = 1
        channels_last: bool = False
        run_note: str = "x"
        clip_grad: float | None = None
        deterministic: bool | None = None

    fields = {f.name: common._form_field(f, Future()) for f in dataclasses.fields(Future)}
    assert [(f.kind, f.optional) for f in fields.values()] == [
        ("float", False), ("int", False), ("bool", False), ("str", False), ("float", True),
        ("bool", True)]
    kinds = {name: type(field_widget(f, f.default)) for name, f in fields.items()}
    assert kinds == {"ema_decay": FieldNumber, "accumulate_batches": FieldNumber,
                     "channels_last": gr.Checkbox, "run_note": gr.Textbox, "clip_grad": FieldNumber,
                     "deterministic": gr.Dropdown}
    assert fields["accumulate_batches"].label == "accumulate batches"
    # The same for today's unhinted fields.
    for name, widget in (("weight_decay", FieldNumber), ("seed", FieldNumber),
                         ("static_graph", gr.Checkbox), ("norm_pix_loss", gr.Checkbox)):
        assert name not in HINTS
        assert type(field_widget(BY_NAME[name], BY_NAME[name].default)) is widget, name


def test_hinted_widgets():
    preset = field_widget(BY_NAME["preset"], "vit-tiny")
    assert isinstance(preset, gr.Dropdown)
    assert [c[1] for c in preset.choices] == list(PRESETS)
    precision = field_widget(BY_NAME["precision"], None)
    assert [c[1] for c in precision.choices][0] == AUTO and precision.value == AUTO
    unused = field_widget(BY_NAME["find_unused_parameters"], None)
    assert [c[1] for c in unused.choices] == [AUTO, "true", "false"]
    # A slider moved a typed 2, or a blank, to one of its ends: a run started at 0.95 or 0.05.
    ratio = field_widget(BY_NAME["mask_ratio"], 0.75)
    assert type(ratio) is FieldNumber and ratio.step == 0.05  # its arrows: 0.75 → 0.8, not 1


def test_number_widgets_pass_values_through_untouched():
    # gr.Number would round 2.5 for a whole-number field: the handler must see it to refuse it.
    assert FieldNumber(0).preprocess(2.5) == 2.5
    assert FieldNumber(0).preprocess("abc") == "abc"
    assert FieldSlider(0, 1).preprocess(0.0) == 0.0


@pytest.mark.parametrize("value", [2.5, "abc", math.nan, "nan", math.inf, "-inf", True, False, "",
                                   None, [3]])
def test_bad_numbers_are_refused_naming_the_field(value):
    with pytest.raises(ConfigError) as caught:
        config_from_form({"batch_size": value})
    assert caught.value.field == "batch_size"
    assert "batch_size" in str(caught.value)


@pytest.mark.parametrize("name,value", [("base_lr", True), ("base_lr", "abc"), ("base_lr", math.nan),
                                        ("mask_ratio", math.inf), ("max_steps", 1.5),
                                        ("devices", 2.5), ("max_epochs", "x"),
                                        ("static_graph", "maybe")])
def test_other_bad_values_name_their_field(name, value):
    with pytest.raises(ConfigError) as caught:
        config_from_form({name: value})
    assert caught.value.field == name


@pytest.mark.parametrize("name,value", [("preset", "vit-gigantic"), ("preset", None),
                                        ("policy", "ddp-dirty"), ("policy", AUTO),
                                        ("accelerator", "tpu"), ("precision", "8-bit"),
                                        ("precision", 32)])
def test_values_outside_the_list_are_refused(name, value):
    with pytest.raises(ConfigError) as caught:
        config_from_form({name: value})
    assert caught.value.field == name
    assert "choose one of" in str(caught.value)


@pytest.mark.parametrize("seed", [-1, 2**70, MAX_SEED + 1, "-3"])
def test_seed_out_of_range_is_refused(seed):
    with pytest.raises(ConfigError) as caught:
        config_from_form({"seed": seed})
    assert caught.value.field == "seed"
    assert str(MAX_SEED) in str(caught.value)


def test_a_valid_seed_and_whole_float_are_accepted():
    cfg = config_from_form({"seed": MAX_SEED, "batch_size": 16.0, "base_lr": "3e-4"})
    assert cfg.train.seed == MAX_SEED
    assert cfg.train.batch_size == 16 and type(cfg.train.batch_size) is int
    assert cfg.train.base_lr == 3e-4


@pytest.mark.parametrize("blank", [0, "0", 0.0, "", None, AUTO])
def test_zero_blank_or_auto_mean_none_for_optional_fields(blank):
    values = {"devices": blank, "max_epochs": blank, "num_workers": blank, "decoder_dim": blank,
              "decoder_depth": blank, "decoder_heads": blank, "precision": blank,
              "find_unused_parameters": blank}
    if blank in (0, "0"):  # 0 is not a choice of the dropdowns; "0" is how the API sends it
        values.update(precision=AUTO, find_unused_parameters=AUTO, base_lr=blank)
    if blank in (0, "0"):  # 0 loader workers is a real choice (load in the training process)
        values.pop("num_workers")
        assert config_from_form({"num_workers": blank}).train.num_workers == 0
    cfg = config_from_form(values)
    assert cfg.train.devices is None and cfg.train.max_epochs is None and cfg.train.num_workers is None
    assert cfg.model.decoder_dim is None and cfg.model.decoder_depth is None
    assert cfg.model.decoder_heads is None
    assert cfg.train.precision is None and cfg.train.find_unused_parameters is None
    assert cfg.train.base_lr is None  # "auto"


def test_required_fields_do_not_treat_zero_as_auto():
    with pytest.raises(ConfigError) as caught:
        config_from_form({"batch_size": 0})
    assert caught.value.field == "batch_size"
    assert config_from_form({"seed": 0}).train.seed == 0
    assert parse_value(BY_NAME["devices"], 0) is None  # 0 = all devices
    assert parse_value(BY_NAME["num_workers"], 0) == 0  # 0 workers is valid, not "auto"
    assert parse_value(BY_NAME["num_workers"], "") is None
    assert parse_value(BY_NAME["num_workers"], 3) == 3


def test_unknown_form_field_is_refused():
    with pytest.raises(ConfigError) as caught:
        config_from_form({"batch_sise": 8})
    assert caught.value.field == "batch_sise"


@pytest.mark.parametrize("name,value", [("data", ["a", "b"]), ("data", {"path": "/x"}),
                                        ("timm_model", ["vit_small_patch16_224"]),
                                        ("gpus", [0, 1]), ("pixel_mean", [0.4]), ("eval_data", True)])
def test_a_text_field_refuses_a_list_or_a_mapping_naming_itself(name, value):
    """/start_run wrote ``{"data": ["a", "b"]}`` out and refused "data folder /app/dir/['a', 'b']
    does not exist", naming the app's own folder."""
    with pytest.raises(ConfigError, match=f"^{name}: must be text, got ") as caught:
        config_from_form({name: value})
    assert caught.value.field == name
    assert config_from_form({"gpus": 0, "accelerator": "gpu"}).train.gpus == "0"  # a number: text
    assert config_from_form({"data": None}).train.data == ""


def test_a_name_that_is_not_text_is_refused_as_unknown():
    """A Python caller's ``{1: 2}`` or ``{None: 2}``: "Internal error: TypeError: 'int' object is
    not subscriptable"."""
    for settings in ({1: 2}, {None: 2}, {1: 2, "zzz": 3}):
        with pytest.raises(ConfigError, match="unknown config field"):
            config_from_form(settings)


def test_cross_field_checks_still_name_a_field():
    with pytest.raises(ConfigError) as caught:
        config_from_form({"image_size": 36, "patch_size": 8})
    assert caught.value.field == "image_size"


def test_a_non_default_config_round_trips_through_the_form():
    cfg = RunConfig(
        model=ModelConfig(preset="vit-small", image_size=48, patch_size=8, mask_ratio=0.6,
                          decoder_dim=64, decoder_depth=2, decoder_heads=4, norm_pix_loss=True,
                          policy="reference"),
        train=TrainConfig(data="/tmp/photos", batch_size=16, base_lr=3e-4, weight_decay=0.1,
                          warmup_fraction=0.1, max_steps=123, max_epochs=7, accelerator="cpu",
                          devices=2, precision="32-true", find_unused_parameters=True,
                          static_graph=False, compile=True, num_workers=3, seed=42,
                          log_every_n_steps=5, checkpoint_every_n_steps=50,
                          preview_every_n_steps=25, num_previews=2))
    values = form_values(cfg)
    assert set(values) == set(common.FIELD_NAMES)
    assert config_from_form(values) == cfg
    assert config_from_form(form_values(DEFAULTS)) == DEFAULTS
    # As the widgets show it: None is "auto" in a dropdown, 0 in a number box.
    shown = form_values(DEFAULTS)
    assert shown["precision"] == AUTO and shown["find_unused_parameters"] == AUTO
    assert shown["devices"] == 0 and shown["decoder_dim"] == 0
    assert form_values(cfg)["find_unused_parameters"] == "true"


def test_a_saved_run_config_round_trips_through_the_form():
    """"Copy this run's config into the form" must give back what ran. A resolved config holds
    num_workers=0 (loading in the training process, a valid value that every CPU run resolves
    to); the form must not turn it into "auto", which another machine resolves differently."""
    cfg = RunConfig(model=ModelConfig(image_size=32, patch_size=8),
                    train=TrainConfig(accelerator="cpu", devices=1, batch_size=4)).resolved()
    assert cfg.train.num_workers == 0
    assert config_from_form(form_values(cfg)).train.num_workers == 0
    assert config_from_form(form_values(cfg)) == cfg


def test_guarded_turns_a_refusal_into_the_fallback():
    seen = []

    @guarded("start", lambda text: seen.append(text) or {"message": text})
    def handler(value):
        return config_from_form({"batch_size": value})

    result = handler(2.5)
    # Named as the form labels it, the field's own name beside it (for YAML files and the API).
    assert result["message"].startswith("Invalid setting, batch size (per process) (batch_size): ")
    assert seen == [result["message"]]
    assert isinstance(handler(8), RunConfig)  # a good call returns its value


@pytest.mark.parametrize("err,expected", [
    (UserError("Choose a run first."), "Choose a run first."),
    (RunError("run x is still live"), "run x is still live"),
    (ConfigError("seed", "must be ..."), "Invalid setting, seed: must be ..."),
])
def test_guarded_shows_user_errors_as_they_are(err, expected):
    def handler(*_):
        raise err

    assert guarded("stop", lambda text: text)(handler)("a", "b") == expected


def test_guarded_never_raises_on_an_internal_error(caplog):
    def handler():
        raise KeyError("boom")

    message = guarded("the live view", lambda text: {"msg": text})(handler)()
    assert message == {"msg": "Internal error in the live view: KeyError: 'boom'"}
    assert "the live view failed" in caplog.text  # logged with its traceback for the maintainer
    assert describe(ZeroDivisionError("x")).startswith("Internal error: ZeroDivisionError")


def test_a_full_disk_is_said_as_such_not_as_an_internal_error(tmp_path, caplog):
    """Whatever raised it: an atomic save, or safetensors' own writer in an export."""
    from mae_core.fileio import DiskFullError

    message = describe(DiskFullError(28, "the disk is full while writing", str(tmp_path / "x")),
                       "export")
    assert message.startswith(f"export failed: the disk is full (the disk holding {tmp_path}, ")
    assert "free now" in message and message.endswith("then try again")
    # A writer that does not say where: no disk is named (the app's own would mislead).
    message = describe(RuntimeError("Error while serializing: I/O error: No space left on device "
                                    "(os error 28)"), "export")
    assert message == ("export failed: the disk is full. Free some space (delete old runs in the "
                       "Runs tab), then try again")
    assert "failed" not in caplog.text  # the machine's state, not a bug to log


def test_no_number_a_person_types_is_refused_before_its_handler(tmp_path):
    """Every slider and number box of the app hands what was typed to its handler (which clamps
    it or refuses it as a message). A plain gr.Slider refused 5 in "EMA smoothing" itself, with
    a toast, on every 1.5 s poll: the live view stopped updating while the run trained on."""
    from mae_core.runs import RunManager
    from ui.blocks import build_app

    demo = build_app(RunManager(tmp_path / "runs"))
    fed = {block for fn in demo.fns.values() for block in fn.inputs
           if isinstance(block, (gr.Slider, gr.Number))}
    names = {block.elem_id for block in fed}
    assert {"smoothing", "history-step", "recon-ratio", "param-image"} <= names
    for block in fed:
        for typed in (99999, -3, 2.5, None):
            assert block.preprocess(typed) == typed, (block.elem_id, typed)
