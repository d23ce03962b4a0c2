"""What the tabs share: readable errors, the app's context (run manager, caches), and the Train form,
generated from the config dataclasses.

Adding a field to :class:`ModelConfig` or :class:`TrainConfig` needs no UI edit: it appears under
"more settings" with a widget chosen by its type. A :class:`Hint` in :data:`HINTS` (the one edit)
gives it a better label, choices, or a place in the main form.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from mae_core.checks import shown
from mae_core.config import (ACCELERATORS, MAX_SEED, MIN_AUTO_LR, NORMALIZATIONS, PAPER_BASE_LR,
                             POLICIES, PRECISIONS, PRESETS, ConfigError, ModelConfig, RunConfig,
                             unknown_name)
from mae_core.metrics import MetricsStore

log = logging.getLogger("mae_studio")
DEFAULTS = RunConfig()
AUTO = "auto"


# --- errors ----------------------------------------------------------------------------------

class UserError(Exception):
    """A request the UI itself refuses (nothing chosen, a missing tick); the message is for people."""


def user_errors() -> tuple[type[Exception], ...]:
    """The refusals meant for a person (imported lazily: some modules pull in torch)."""
    from mae_core.data import DataError
    from mae_core.images import ImageError
    from mae_core.runs import RunError
    from mae_core.weights import WeightsError

    return UserError, ConfigError, DataError, ImageError, RunError, WeightsError


def describe(err: BaseException, action: str = "") -> str:
    """``err`` in words for the page; an unexpected one is logged with its traceback."""
    if isinstance(err, ConfigError):
        # Named as the form labels it (a person never sees "max_steps"), the field's own name
        # beside it for YAML files and the API.
        hint = HINTS.get(err.field)
        if hint is None or not hint.label:
            return f"Invalid setting, {err}"
        reason = str(err).removeprefix(f"{err.field}: ")
        return f"Invalid setting, {hint.label} ({err.field}): {reason}"
    if isinstance(err, user_errors()):
        field, text = refused_field(err), str(err)
        hint = HINTS.get(field) if field else None
        if hint is not None and hint.label and text.startswith(f"{field}: "):  # as a ConfigError
            return f"{hint.label} ({field}): {text.removeprefix(f'{field}: ')}"
        return text
    from mae_core.fileio import is_disk_full

    if is_disk_full(err):  # a save, an export, an upload's copy: the machine's state, not a bug
        from mae_core.diskspace import full_disk_message

        where = getattr(err, "filename", None)  # None: a writer that did not say where
        return f"{action or 'It'} failed: {full_disk_message(where, then='try again')}"
    log.error("%s failed", action or "a handler", exc_info=err)
    return f"Internal error{' in ' + action if action else ''}: {type(err).__name__}: {err}"


def refused_field(err: BaseException) -> str | None:
    """The Train form's field a refusal is about (a :class:`ConfigError`'s, or a ``DataError``'s
    where it knows one), for the page to show it; None for any other error."""
    field = getattr(err, "field", None) if isinstance(err, user_errors()) else None
    return field if field in FIELD_NAMES else None


# --- the app's context -----------------------------------------------------------------------

class LazyRunManager:
    """A :class:`mae_core.runs.RunManager` whose torch-heavy import runs in the background, so the
    page is served within seconds; any use waits until it is ready."""

    def __init__(self, runs_dir: str | Path) -> None:
        self.runs_dir = Path(runs_dir)
        self._manager: Any = None
        self._error: BaseException | None = None
        self._ready = threading.Event()
        self._started = False
        self._lock = threading.Lock()

    def start_loading(self) -> None:
        with self._lock:
            if self._started:
                return
            self._started = True
        threading.Thread(target=self._load, name="load-run-manager", daemon=True).start()

    def _load(self) -> None:
        try:
            from mae_core.runs import RunManager

            self._manager = RunManager(self.runs_dir)
            self._manager.start_queue_worker()  # queued runs start even with no page open
        except BaseException as err:  # noqa: BLE001 - re-raised on first use
            self._error = err
        finally:
            self._ready.set()

    def ready(self) -> Any:
        self.start_loading()
        self._ready.wait()
        if self._error is not None:
            raise RuntimeError(f"MAE Studio could not load its run manager: {self._error}")
        return self._manager

    def __getattr__(self, name: str) -> Any:
        return getattr(self.ready(), name)


class ModelCache:
    """Loaded models by (weights path, mtime): repeated reconstructions do not reload weights, and
    weights that training has since overwritten are loaded afresh."""

    def __init__(self, size: int = 3) -> None:
        self.size = size
        self.loads = 0
        self._models: collections.OrderedDict[tuple[str, int], Any] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: Path) -> Any:
        from mae_core.weights import WeightsError, load_model

        try:
            key = (str(path.resolve()), path.stat().st_mtime_ns)
        except OSError:
            raise WeightsError(f"no weights file at {path}") from None
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            model = load_model(path)
            self.loads += 1
            self._models[key] = model
            while len(self._models) > self.size:
                self._models.popitem(last=False)
            return model


@functools.lru_cache(maxsize=32)
def cached_audit(cfg: ModelConfig) -> Any:
    """The parameter audit of ``cfg``, once per (preset, sizes, policy) (built on the meta
    device: about a second, no memory, whatever size a person types)."""
    from mae_core.audit import audit

    return audit(cfg)


@dataclass
class AppContext:
    """What every tab's handlers use: the run manager and the caches behind the live views."""

    manager: Any
    models: ModelCache = dataclasses.field(default_factory=ModelCache)
    metrics: MetricsStore = dataclasses.field(default_factory=MetricsStore)
    # The Runs tab's cells read from each run's files (ui.runs.file_cells), by run folder; and
    # the size of each folder that lost its config.yaml (ui.runs.damaged_rows).
    run_cells: dict[Path, Any] = dataclasses.field(default_factory=dict)
    damaged_sizes: dict[Path, Any] = dataclasses.field(default_factory=dict)


# --- numbers from the page or the API ----------------------------------------------------------

def as_int(value: Any, name: str, optional: bool = False) -> int | None:
    """A whole number from a form or API value (2.5, "abc", NaN are refused); blank is None when
    ``optional``."""
    number = _as_number(value, name, optional, "a whole number")
    if number is None:
        return None
    if not number.is_integer():
        raise ConfigError(name, f"must be a whole number, got {shown(value)}")
    return int(number)


def as_float(value: Any, name: str, optional: bool = False) -> float | None:
    """A finite number from a form or API value; blank is None when ``optional``."""
    return _as_number(value, name, optional, "a finite number")


def _as_number(value: Any, name: str, optional: bool, kind: str) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        if optional:
            return None
        raise ConfigError(name, "is required")
    try:
        if isinstance(value, bool):  # True is not 1 here: a form never sends a switch as a number
            raise TypeError
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(name, f"must be {kind}, got {shown(value)}") from None
    if not math.isfinite(number):
        raise ConfigError(name, f"must be {kind}, got {shown(value)}")
    return number


def as_seed(value: Any, name: str = "seed") -> int:
    seed = as_int(value, name)
    if not 0 <= seed <= MAX_SEED:
        raise ConfigError(name, f"must be a whole number in [0, {MAX_SEED}], got {shown(value)}")
    return seed


def as_ratio(value: Any, name: str = "mask_ratio") -> float:
    ratio = as_float(value, name)
    if not 0 < ratio < 1:
        raise ConfigError(name, f"must be strictly between 0 and 1, got {shown(value)}")
    return ratio


def as_run_id(value: Any) -> str | None:
    """A run id from a form or API value: text, or None for none chosen (blank, null). A list or a
    number is refused by name; the run manager says whether such a run exists."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise UserError(f"a run id is text (a run's folder name), not {shown(value)}")
    return value


def as_bool(value: Any, name: str) -> bool:
    """True or false from a form or API value: "false", "no", "0", null are false; a value that
    is neither (a list, "abc", NaN) is refused, never taken as true for being non-empty."""
    if isinstance(value, bool):
        return value
    if value is None:
        return False
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off", ""):
        return False
    raise ConfigError(name, f"must be true or false, got {shown(value)}")


# --- the Train form, from the dataclasses ----------------------------------------------------

@dataclass(frozen=True)
class Hint:
    """How one config field looks in the form; a field without a hint gets a generic widget."""

    label: str | None = None
    choices: tuple[str, ...] | None = None
    info: str | None = None
    step: float | None = None  # a number box's arrows (gr.Number's own: 1)
    main: bool = False  # in the main form, else under "more settings"
    zero_is_auto: bool = True  # an optional number's 0 means None (auto); False where 0 is valid
    hidden: bool = False  # set by other means (the command line), not by the form


HINTS: dict[str, Hint] = {
    "data": Hint("data folder", info="blank = the sample photos that ship with scikit-image",
                 main=True),
    "preset": Hint("model preset", tuple(PRESETS), main=True),
    "policy": Hint("parameter policy", POLICIES, main=True,
                   info="ddp-clean: head removed, encoder mask token frozen (plain DDP)"),
    "image_size": Hint("image size", main=True),
    "patch_size": Hint("patch size", main=True),
    # A number box, not a slider: Gradio's slider moved a typed 2 (or a blank) to its nearest
    # end when the box was left, so a run started at 0.95 (or 0.05) with no word said.
    "mask_ratio": Hint("mask ratio", main=True, step=0.05,
                       info="share of patches hidden, between 0 and 1 (the paper: 0.75)"),
    "batch_size": Hint("batch size (per process)", main=True),
    "base_lr": Hint("base lr (× effective batch / 256; 0 = auto)", main=True,
                    info="effective batch = batch × processes × accumulated batches; auto: "
                         f"{PAPER_BASE_LR:g} (the paper's), but lr at least {MIN_AUTO_LR:g}"),
    "max_steps": Hint("max steps (-1 = by epochs)", main=True),
    "max_epochs": Hint("max epochs (0 = no limit)", main=True,
                       info="a small data set is repeated per epoch: a folder held in memory "
                            "to at least 4 steps; with loader workers, any small set to enough "
                            "batches that the workers stay busy"),
    "accelerator": Hint("accelerator", ACCELERATORS, main=True),
    "devices": Hint("devices (0 = all)", main=True),
    "gpus": Hint("GPUs for this run (blank = all)",
                 info="e.g. 0,1: runs naming disjoint GPUs may train at the same time"),
    "precision": Hint("precision", PRECISIONS, main=True,
                      info="auto: bf16-mixed on GPUs and on CPUs with AMX / AVX-512 BF16"),
    "find_unused_parameters": Hint("find_unused_parameters (auto: only for reference)"),
    "num_workers": Hint("loader workers per process (blank = auto)", zero_is_auto=False),
    "compile": Hint("torch.compile the model",
                    info="about a minute of compiling at start, then faster steps on a GPU (the "
                         "README's Benchmark has the figures); no gain on the CPU"),
    "decode_on_device": Hint("decode on the device (prepared sets)",
                             info="workers only draw the crops; the GPU decodes the JPEGs "
                                  "(nvJPEG) and cuts them"),
    "accumulate_grad_batches": Hint("batches accumulated per optimizer step"),
    "timm_model": Hint("timm model (blank = the preset's encoder)",
                       info="any timm VisionTransformer with a class token, e.g. "
                            "vit_small_patch14_dinov2; the preset still picks the decoder"),
    "decoder_dim": Hint("decoder width (0 = the preset's)"),
    "decoder_depth": Hint("decoder blocks (0 = the preset's)"),
    "decoder_heads": Hint("decoder heads (0 = the preset's)"),
    "num_nodes": Hint(hidden=True, info="multi-node runs start from torchrun or SLURM"),
    # Any channels (mae_core/channels.py): filled from the data when the run starts.
    "in_chans": Hint("channels per pixel (0 = from the data)",
                     info="1 grayscale, 3 RGB, N multi-band TIFF; must match the data"),
    "normalize": Hint("normalisation statistics", NORMALIZATIONS,
                      info="auto: ImageNet's for 8-bit RGB data, else the data set's own"),
    "pixel_mean": Hint("per-channel mean (blank = from the data)",
                       info="fractions of full scale, comma-separated, e.g. 0.31 or 0.4,0.4,0.3,0.5"),
    "pixel_std": Hint("per-channel std (blank = from the data)"),
    # Held-out evaluation (issue 14, mae_core/monitor.py).
    "val_fraction": Hint("held-out share (0 = auto)",
                         info="auto: 10 % of a folder of 100+ images, none of a smaller one"),
    "val_count": Hint("held-out images (0 = use the share)"),
    "eval_every_n_steps": Hint("evaluate every N steps (0 = never)",
                               info="validation loss, and kNN accuracy when there are labels"),
    "eval_data": Hint("labelled folder for the kNN monitor",
                      info="folder/<class>/*.jpg; blank = the data folder's own class subfolders"),
    "eval_max_images": Hint("kNN bank / validation images at most"),
    "weight_snapshots": Hint("weight snapshots kept (Reconstruct tab's history)"),
}


@dataclass(frozen=True)
class FormField:
    name: str
    kind: str  # int, float, bool, str
    optional: bool  # None ("auto"/blank) is allowed
    default: Any
    hint: Hint

    @property
    def label(self) -> str:
        return self.hint.label or self.name.replace("_", " ")


def _form_field(f: dataclasses.Field, owner: Any) -> FormField:
    text = str(f.type).replace(" ", "")
    kind = next(k for k in ("bool", "int", "float", "str") if k in text.split("|"))
    return FormField(f.name, kind, "None" in text, getattr(owner, f.name), HINTS.get(f.name, Hint()))


FORM_FIELDS: tuple[FormField, ...] = tuple(
    _form_field(f, owner) for owner in (DEFAULTS.model, DEFAULTS.train)
    for f in dataclasses.fields(owner) if not HINTS.get(f.name, Hint()).hidden)
FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in FORM_FIELDS)
# The main form in the order of HINTS (data first), the rest in the dataclasses' order.
MAIN_FIELDS: tuple[FormField, ...] = tuple(sorted((f for f in FORM_FIELDS if f.hint.main),
                                                  key=lambda f: list(HINTS).index(f.name)))


def display_value(field: FormField, value: Any) -> Any:
    """A config value as its widget shows it: None is "auto" in a dropdown, blank elsewhere."""
    if value is None and (field.hint.choices or field.kind == "bool"):
        return AUTO
    if value is None and field.kind in ("int", "float") and field.hint.zero_is_auto:
        return 0
    if field.kind == "bool" and field.optional:
        return str(value).lower()
    return value


def parse_value(field: FormField, value: Any) -> Any:
    """A widget's (or API caller's) value as the config field's type, naming the field if wrong."""
    if field.optional and (value is None or value == AUTO or value == ""):
        return None
    if field.optional and field.kind in ("int", "float") and field.hint.zero_is_auto:
        number = as_float(value, field.name, optional=True)
        if number == 0:  # "0" from the API too
            return None  # a number box cannot be blank in every browser: 0 stands for "auto"
    if field.hint.choices:
        if value not in field.hint.choices:
            allowed = (AUTO,) * field.optional + field.hint.choices
            raise ConfigError(field.name, f"choose one of {', '.join(allowed)}; got {shown(value)}")
        return value
    if field.kind == "int":
        return as_int(value, field.name, field.optional)
    if field.kind == "float":
        return as_float(value, field.name, field.optional)
    if field.kind == "bool":
        return as_bool(value, field.name)
    return as_text(value, field.name)


def as_text(value: Any, name: str) -> str:
    """A text field's value from a form or API value: a number is its digits (``"gpus": 0``, a
    folder named 2024), None is blank; a list or a mapping is refused by name (``["a", "b"]``
    was written out and read as the folder ``/app/dir/['a', 'b']``)."""
    if value is None:
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise ConfigError(name, f"must be text, got {shown(value)}")
    return value.strip()


def config_from_form(values: dict[str, Any]) -> RunConfig:
    """The form's values (by field name) as a validated :class:`RunConfig`; missing fields keep
    their defaults."""
    by_name = {f.name: f for f in FORM_FIELDS}
    unknown = set(values) - set(by_name)
    if unknown:  # a name of another type too (a Python caller's 1 or None: no slicing, no order)
        name = sorted(map(str, unknown))[0]
        raise ConfigError(name[:60], unknown_name("config field", name, by_name))
    overrides = {name: parse_value(by_name[name], value) for name, value in values.items()}
    if overrides.get("seed") is not None:
        as_seed(overrides["seed"])
    return DEFAULTS.with_overrides(**overrides)


def form_by_name(values: Any) -> dict[str, Any]:
    """The form's widgets' values (in :data:`FIELD_NAMES` order) by field name, as a handler given
    the whole form, and the browser keeping it (ui.configfile), take it."""
    return dict(zip(FIELD_NAMES, values))


def form_values(cfg: RunConfig) -> dict[str, Any]:
    """What the form shows for ``cfg``: a run's config copied into the form."""
    flat = {**dataclasses.asdict(cfg.model), **dataclasses.asdict(cfg.train)}
    return {f.name: display_value(f, flat[f.name]) for f in FORM_FIELDS}


def guarded(action: str, fallback: Callable[[str], Any]) -> Callable[[Callable], Callable]:
    """Run an event function; a refusal or failure becomes ``fallback(message)`` (a notice in the
    tab's message area) instead of an error badge over the inputs. The app never dies of one."""

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(*args: Any) -> Any:
            try:
                return fn(*args)
            except Exception as err:  # noqa: BLE001 - shown to the person, logged if unexpected
                return fallback(describe(err, action))

        return run

    return wrap



# --- widgets whose values reach the handler as sent ------------------------------------------

class FieldNumber(gr.Number):
    """A number box that passes its value through untouched, so the handler refuses 2.5 for a
    whole-number field, "abc" or NaN naming the field (gr.Number rounds silently to its precision,
    or fails with a message that names nothing)."""

    is_template = True  # drawn by gr.Number's front end

    def preprocess(self, payload: Any) -> Any:
        return payload


class FieldSlider(gr.Slider):
    """A slider that passes its value through untouched (see :class:`FieldNumber`). Gradio's
    front end still moves a number typed past an end to that end when the box is left: a slider
    only where the nearest allowed value is what was meant (a chart's smoothing, a step of the
    weights history, the Reconstruct tab's mask ratio), never for a run's setting."""

    is_template = True

    def preprocess(self, payload: Any) -> Any:
        return payload


def widget_kind(field: FormField) -> str:
    """Which widget shows ``field``: "dropdown" for choices (and a switch that may be auto),
    "checkbox" for a switch, "number" for numbers, "text" otherwise."""
    if field.hint.choices or (field.kind == "bool" and field.optional):
        return "dropdown"
    if field.kind == "bool":
        return "checkbox"
    return "number" if field.kind in ("int", "float") else "text"


def field_widget(field: FormField, value: Any) -> gr.components.Component:
    """The widget for one config field (:func:`widget_kind`)."""
    hint, label = field.hint, field.label
    common = dict(label=label, info=hint.info, elem_id=f"field-{field.name.replace('_', '-')}")
    display = display_value(field, value)
    kind = widget_kind(field)
    if kind == "dropdown":
        choices = hint.choices or ("true", "false")
        return gr.Dropdown(list((AUTO,) * field.optional + choices), value=display,
                           allow_custom_value=True, **common)
    if kind == "checkbox":
        return gr.Checkbox(bool(display), **common)
    if kind == "number":
        return FieldNumber(display, **common, **({"step": hint.step} if hint.step else {}))
    return gr.Textbox(display, **common)
