"""MAE Studio: the web UI. Pretrain a Masked Autoencoder, watch it learn, look inside it.

    python app.py [--host 127.0.0.1] [--port 7860] [--share] [--runs-dir checkpoints] [--no-browser]

This file is the thin UI: every action calls :mod:`mae_core` (mostly :class:`RunManager`), and all
state lives in the run directories, so two browser tabs, or a reload in the middle of a run, show
the same thing. Every handler has an ``api_name`` and can be called with ``gradio_client``.

The torch-heavy modules are imported after the server is up (``main``) or inside handlers, so the
first page appears within seconds.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import html
import logging
import math
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: no phoning home

import gradio as gr  # noqa: E402

from mae_core import curves  # noqa: E402
from mae_core.config import (ACCELERATORS, POLICIES, PRECISIONS, PRESETS, ConfigError,  # noqa: E402
                             ModelConfig, RunConfig)
from mae_core.rundir import LIVE_STATES  # noqa: E402

if TYPE_CHECKING:
    from mae_core.runs import RunManager

log = logging.getLogger("mae_studio")

DEFAULTS = RunConfig()  # the form's defaults: the config dataclasses are the single source of truth
MAX_UPLOAD = "64mb"
MAX_IMAGES = 16  # per reconstruction request
NUM_SAMPLE_IMAGES = 3
POLL_S = 1.5  # the Train tab's live refresh
SLOW_POLL_S = 5.0  # checkpoint list, previews and the runs table
PRECISION_CHOICES = ("auto", *PRECISIONS)
NO_RUN = ("(none: audit the preset and sizes →)", "")
PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777")
STATE_COLOURS = {"starting": "#b45309", "running": "#15803d", "stopping": "#b45309",
                 "stopped": "#475569", "finished": "#1d4ed8", "failed": "#b91c1c"}
STATUS_COLOURS = {"trainable": "#dcfce7", "frozen": "#dbeafe", "removed": "#fee2e2"}
CSS = """
.gradio-container { max-width: 1500px !important; }
#train-message p, #runs-message p { margin: 0; }
"""


# --- errors --------------------------------------------------------------------------------------

def _user_errors() -> tuple[type[Exception], ...]:
    """The refusals mae_core raises with a message meant for a person (imported lazily: torch)."""
    from mae_core.data import DataError
    from mae_core.images import ImageError
    from mae_core.runs import RunError
    from mae_core.weights import WeightsError

    return ConfigError, DataError, ImageError, RunError, WeightsError


def user_error(message: str) -> gr.Error:
    """A ``gr.Error`` for a person: shown in the page (as text, never HTML) and sent to API clients."""
    return gr.Error(html.escape(message, quote=False), print_exception=False)


def _readable(err: Exception) -> str:
    if isinstance(err, ConfigError):
        return f"Invalid setting, {err}"
    return str(err)


# --- the run manager, loaded after the server is up ------------------------------------------------

class LazyRunManager:
    """A :class:`RunManager` whose (torch-heavy) import runs in the background.

    ``main`` launches the server first and then calls :meth:`start_loading`, so the page is served
    within seconds; any use of the manager waits until it is ready.
    """

    def __init__(self, runs_dir: str | Path) -> None:
        self.runs_dir = Path(runs_dir)
        self._manager: RunManager | None = None
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
        except BaseException as err:  # noqa: BLE001 - re-raised on first use
            self._error = err
        finally:
            self._ready.set()

    def ready(self) -> RunManager:
        self.start_loading()
        self._ready.wait()
        if self._error is not None:
            raise RuntimeError(f"MAE Studio could not load its run manager: {self._error}")
        assert self._manager is not None
        return self._manager

    def __getattr__(self, name: str) -> Any:
        return getattr(self.ready(), name)


# --- caches --------------------------------------------------------------------------------------

class ModelCache:
    """Loaded models by (weights path, mtime): repeated reconstructions do not reload weights, and
    a checkpoint that training has since overwritten is loaded afresh."""

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


@functools.lru_cache(maxsize=16)
def cached_audit(cfg: ModelConfig) -> Any:
    """The parameter audit of ``cfg`` (builds the model once: 112M parameters for vit-base)."""
    from mae_core.params import audit

    return audit(cfg)


# --- small helpers -------------------------------------------------------------------------------

def _as_int(value: Any, field: str, allow_none: bool = False) -> int | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        if allow_none:
            return None
        raise ConfigError(field, "is required")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(field, f"must be a whole number, got {value!r}") from None
    if not math.isfinite(number) or not number.is_integer():
        raise ConfigError(field, f"must be a whole number, got {value!r}")
    return int(number)


def _as_float(value: Any, field: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(field, f"must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ConfigError(field, f"must be a finite number, got {value!r}")
    return number


def form_config(data: str, preset: str, image_size: Any, patch_size: Any, mask_ratio: Any,
                batch_size: Any, base_lr: Any, max_steps: Any, max_epochs: Any, accelerator: str,
                devices: Any, precision: str, policy: str, seed: Any = 0,
                checkpoint_every_n_steps: Any = None, preview_every_n_steps: Any = None) -> RunConfig:
    """The Train form as a :class:`RunConfig`; 0 devices / epochs and "auto" precision mean auto."""
    epochs = _as_int(max_epochs, "max_epochs", allow_none=True)
    device_count = _as_int(devices, "devices", allow_none=True)
    overrides = dict(
        data=(data or "").strip(), preset=preset, image_size=_as_int(image_size, "image_size"),
        patch_size=_as_int(patch_size, "patch_size"), mask_ratio=_as_float(mask_ratio, "mask_ratio"),
        batch_size=_as_int(batch_size, "batch_size"), base_lr=_as_float(base_lr, "base_lr"),
        max_steps=_as_int(max_steps, "max_steps"), max_epochs=epochs or None,
        accelerator=accelerator or "auto", devices=device_count or None,
        precision=None if precision in (None, "", "auto") else precision, policy=policy,
        seed=_as_int(seed, "seed"),
    )
    if checkpoint_every_n_steps not in (None, ""):
        overrides["checkpoint_every_n_steps"] = _as_int(checkpoint_every_n_steps,
                                                        "checkpoint_every_n_steps")
    if preview_every_n_steps not in (None, ""):
        overrides["preview_every_n_steps"] = _as_int(preview_every_n_steps, "preview_every_n_steps")
    return DEFAULTS.with_overrides(**overrides)


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def status_html(status: dict[str, Any] | None, cfg: RunConfig | None = None) -> str:
    """The Train tab's status panel (inline styles: it needs no stylesheet)."""
    box = ("border:1px solid #cbd5e1;border-radius:8px;padding:12px 14px;background:#f8fafc;"
           "color:#0f172a;font-size:14px;line-height:1.5")
    if not status:
        return (f'<div id="run-status" data-state="none" style="{box}">No run yet: fill in the form '
                "and press <b>Start</b>.</div>")
    state = status.get("state", "?")
    colour = STATE_COLOURS.get(state, "#475569")
    step, total = status.get("step") or 0, status.get("total_steps")
    fraction = curves.progress_fraction(status)
    bar = ""
    if fraction is not None:
        bar = ('<div style="background:#e2e8f0;border-radius:6px;height:14px;margin:8px 0;'
               'overflow:hidden"><div class="progress-fill" style="height:100%;'
               f'width:{fraction * 100:.1f}%;background:{colour}"></div></div>')
    eta = curves.eta_seconds(status) if state in LIVE_STATES else None
    cells = [("step", f"{step} / {total}" if total else str(step)),
             ("epoch", status.get("epoch", "–")),
             ("images/s", curves.format_number(status.get("images_per_s"), 3)),
             ("elapsed", curves.format_duration(status.get("elapsed_s"))),
             ("ETA", curves.format_duration(eta) if state in LIVE_STATES else "–"),
             ("last loss", curves.format_number(status.get("loss")))]
    grid = "".join(f'<div><div style="color:#64748b;font-size:12px">{_esc(k)}</div>'
                   f'<div data-field="{_esc(k)}" style="font-weight:600">{_esc(v)}</div></div>'
                   for k, v in cells)
    about = ""
    if cfg is not None:
        m, t = cfg.model, cfg.train
        about = (f'<div style="color:#475569;font-size:12px;margin-top:6px">{_esc(m.preset)} · '
                 f"{_esc(m.policy)} · {m.image_size}px / patch {m.patch_size} · mask {m.mask_ratio} · "
                 f"batch {t.batch_size} × {_esc(t.devices or 'auto')} {_esc(t.accelerator)} "
                 f"process(es) · {_esc(t.precision or 'auto precision')} · "
                 f"data: {_esc(t.data or 'sample photos')}</div>")
    notes = ""
    if status.get("stop_requested") and state in LIVE_STATES:
        notes += '<div style="color:#b45309;margin-top:6px">Stop requested: finishing the current step…</div>'
    if status.get("error"):
        notes += (f'<div style="color:{"#b91c1c" if state == "failed" else "#475569"};margin-top:8px">'
                  f"<b>{'Error' if state == 'failed' else 'Note'}:</b> {_esc(status['error'])}</div>")
    if state == "failed" and status.get("log_tail"):
        notes += ('<details open style="margin-top:6px"><summary>log tail</summary><pre style="'
                  "max-height:260px;overflow:auto;background:#0f172a;color:#e2e8f0;padding:8px;"
                  f'border-radius:6px;font-size:12px;white-space:pre-wrap">{_esc(status["log_tail"])}'
                  "</pre></details>")
    return (f'<div id="run-status" data-state="{_esc(state)}" data-step="{int(step)}" style="{box}">'
            f'<div style="display:flex;justify-content:space-between;align-items:center">'
            f'<span style="font-family:monospace">{_esc(status.get("run_id", ""))}</span>'
            f'<span style="background:{colour};color:white;border-radius:999px;padding:2px 10px;'
            f'font-weight:600">{_esc(state)}</span></div>{bar}'
            f'<div style="display:grid;grid-template-columns:repeat(6,1fr);gap:8px">{grid}</div>'
            f"{about}{notes}</div>")


def audit_table_html(result: Any) -> str:
    """One policy's audit: verdict, totals and every tensor, rows coloured by status."""
    ok = result.ddp_safe
    verdict = (f'<div class="audit-verdict" data-safe="{str(ok).lower()}" style="padding:8px 10px;'
               f'border-radius:6px;margin-bottom:8px;color:#0f172a;background:'
               f'{"#dcfce7" if ok else "#fee2e2"};border:1px solid {"#16a34a" if ok else "#dc2626"}">'
               f"<b>{'✔' if ok else '✘'} {_esc(result.verdict())}</b></div>")
    totals = " · ".join(f'<span style="background:{STATUS_COLOURS[s]};padding:1px 6px;'
                        f'border-radius:4px">{s} {result.totals.get(s, 0):,}</span>'
                        for s in STATUS_COLOURS)
    head = "".join(f'<th style="text-align:left;padding:3px 6px;position:sticky;top:0;'
                   f'background:#e2e8f0">{h}</th>' for h in ("name", "shape", "count", "status", "reason"))
    body = []
    for row in result.rows:
        no_grad = row.name in result.no_grad
        style = f"background:{STATUS_COLOURS.get(row.status, 'white')}"
        if no_grad:
            style += ";outline:2px solid #dc2626;outline-offset:-2px"
        flag = " ⚠ no gradient" if no_grad else ""
        body.append(f'<tr data-name="{_esc(row.name)}" data-status="{_esc(row.status)}" style="{style}">'
                    f'<td style="padding:2px 6px;font-family:monospace;font-size:11px;'
                    f'white-space:nowrap">{_esc(row.name)}</td>'
                    f'<td style="padding:2px 6px;white-space:nowrap">{"×".join(map(str, row.shape))}</td>'
                    f'<td style="padding:2px 6px;text-align:right;white-space:nowrap">{row.numel:,}</td>'
                    f'<td style="padding:2px 6px;font-weight:600;white-space:nowrap">{_esc(row.status)}'
                    f'{flag}</td><td style="padding:2px 6px;min-width:160px">{_esc(row.reason)}</td></tr>')
    return (f'<div class="audit" data-policy="{_esc(result.policy)}" style="color:#0f172a">'
            f'<h3 style="margin:0 0 6px">policy: {_esc(result.policy)}</h3>{verdict}'
            f'<div style="margin-bottom:6px;font-size:13px">{totals} '
            f"(constructed {result.constructor_total:,})</div>"
            '<div style="max-height:560px;overflow:auto;border:1px solid #cbd5e1;border-radius:6px">'
            '<table style="border-collapse:collapse;min-width:100%;width:max-content;max-width:none;'
            f'font-size:12px"><thead><tr>{head}'
            f'</tr></thead><tbody>{"".join(body)}</tbody></table></div></div>')


def audit_diff_html(clean: Any, reference: Any) -> str:
    """The tensors whose status differs between the two policies: the DDP problem at a glance."""
    ref = {r.name: r for r in reference.rows}
    rows = []
    for row in clean.rows:
        other = ref.get(row.name)
        if other is None or other.status == row.status:
            continue
        cells = []
        for r, result in ((row, clean), (other, reference)):
            mark = " ⚠ no gradient" if r.name in result.no_grad else ""
            cells.append(f'<td style="padding:2px 8px;background:{STATUS_COLOURS.get(r.status)}">'
                         f"{_esc(r.status)}{mark}</td>")
        rows.append(f'<tr><td style="padding:2px 8px;font-family:monospace">{_esc(row.name)}</td>'
                    f'{"".join(cells)}<td style="padding:2px 8px">{_esc(row.reason)}</td></tr>')
    if not rows:
        return "<div>Both policies treat every tensor the same way.</div>"
    head = "".join(f'<th style="text-align:left;padding:2px 8px">{h}</th>'
                   for h in ("tensor", "ddp-clean", "reference", "why"))
    return ('<div style="color:#0f172a"><b>Where the policies differ</b>'
            '<table style="border-collapse:collapse;font-size:13px;margin-top:4px">'
            f'<thead><tr style="background:#e2e8f0">{head}</tr></thead><tbody>{"".join(rows)}'
            "</tbody></table></div>")


def audit_json(result: Any) -> dict[str, Any]:
    return {"preset": result.preset, "policy": result.policy, "verdict": result.verdict(),
            "ddp_safe": result.ddp_safe, "no_grad": list(result.no_grad), "totals": result.totals,
            "rows": [[r.name, list(r.shape), r.numel, r.status, r.reason] for r in result.rows]}


def reconstruction_views(model: Any, images: list[tuple[str, Any]], mask_ratio: float,
                         seed: int) -> tuple[list[tuple[Any, str]], Any]:
    """Gallery items (the paper's four panels and the error heat map per image) and the loss table."""
    import pandas as pd
    import torch

    from mae_core.images import center_square
    from mae_core.reconstruct import PANEL_TITLES, error_heatmap, panels, reconstruct

    size = model.cfg.image_size
    batch = torch.stack([center_square(image, size) for _, image in images])
    results = reconstruct(model, batch, mask_ratio=mask_ratio, seed=seed)
    display = max(160, size)  # small models' panels are scaled up (nearest) to stay visible
    gallery, losses = [], []
    for (name, _), result in zip(images, results):
        captions = [f"{name} ({PANEL_TITLES[0]})", *PANEL_TITLES[1:]]
        gallery += list(zip(panels(result, display), captions))
        gallery.append((error_heatmap(result, display), "per-patch error"))
        losses.append([name, round(result.loss, 5), int(result.patch_masked.sum())])
    return gallery, pd.DataFrame(losses, columns=["image", "loss (masked patches)", "masked patches"])


def _weights_step(path: Path) -> str:
    from mae_core.weights import read_metadata

    try:
        return read_metadata(path).get("step", "?")
    except Exception:  # noqa: BLE001 - only a label
        return "?"


# --- the app -------------------------------------------------------------------------------------

def build_app(manager: RunManager) -> gr.Blocks:
    """The MAE Studio Blocks, driving ``manager``; launch with ``demo.queue().launch(...)``."""
    models = ModelCache()

    def handler(fn: Callable) -> Callable:
        """mae_core's refusals become readable ``gr.Error`` messages; nothing else is swallowed."""

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if isinstance(manager, LazyRunManager):
                manager.ready()
            try:
                return fn(*args, **kwargs)
            except gr.Error:
                raise
            except Exception as err:  # noqa: BLE001
                if isinstance(err, _user_errors()):
                    raise user_error(_readable(err)) from None
                log.exception("handler %s failed", fn.__name__)
                raise user_error(f"Internal error in {fn.__name__}: {type(err).__name__}: {err}") from None

        return wrapper

    # --- shared queries ---

    def statuses() -> list[dict[str, Any]]:
        return manager.list()

    def live_of(runs: list[dict[str, Any]]) -> str | None:
        return next((s["run_id"] for s in runs if s.get("state") in LIVE_STATES), None)

    def run_choices(runs: list[dict[str, Any]]) -> list[tuple[str, str]]:
        return [(f"{s['run_id']} · {s.get('state', '?')}", s["run_id"]) for s in runs]

    def weight_runs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [s for s in runs if manager.paths(s["run_id"]).weights.exists()]

    def ckpt_choices(runs: list[dict[str, Any]]) -> list[tuple[str, str]]:
        return [(f"{s['run_id']}{' · live' if s.get('state') in LIVE_STATES else ''}", s["run_id"])
                for s in weight_runs(runs)]

    def default_ckpt(runs: list[dict[str, Any]]) -> str | None:
        with_weights = weight_runs(runs)
        live = live_of(runs)
        for s in with_weights:
            if s["run_id"] == live:
                return live
        return with_weights[0]["run_id"] if with_weights else None

    def status_outputs(run_id: str | None, live: str | None) -> tuple:
        status = manager.status(run_id) if run_id else None
        cfg = None
        if run_id:
            try:
                cfg = manager.config(run_id)
            except Exception:  # noqa: BLE001 - a damaged config only loses the summary line
                cfg = None
        state = (status or {}).get("state")
        stopping = bool(status and status.get("stop_requested")) and state in LIVE_STATES
        return (status or {}, status_html(status, cfg),
                gr.update(interactive=live is None),
                gr.update(interactive=run_id is not None and state in LIVE_STATES,
                          value="Force stop" if stopping else "Stop"),
                gr.update(interactive=bool(status and status.get("resumable")) and live is None))

    def plot_outputs(run_ids: list[str], metric: str, log_scale: bool, smoothing: float) -> tuple:
        """(curve data, points summary, plot style); the style goes to :func:`apply_plot_style`."""
        metric = metric or "loss"
        smoothing = 0.0 if metric == "lr" else float(smoothing or 0)  # a schedule needs no smoothing
        series = {r: manager.metrics(r, -1) for r in run_ids}
        labels = curves.run_labels(run_ids)
        frame = curves.curve_frame(series, metric, smoothing, bool(log_scale), labels=labels)
        counts = []
        for r, rows in series.items():
            steps, values = curves.series_values(rows, metric)
            last = f", last {metric} {curves.format_number(values[-1])} at step {steps[-1]}" if steps else ""
            counts.append(f"`{r}`: {len(steps)} points{last}")
        info = "  \n".join(counts) if counts else "No run selected."
        if smoothing > 0 and counts:
            info += "  \nLight lines: raw values; dark lines: EMA-smoothed."
        colours, legend = {}, []
        pairs = frame[["series", "run", "kind"]].drop_duplicates().itertuples(index=False)
        for name, run, kind in pairs:
            hue = PALETTE[run_ids.index(run) % len(PALETTE)]
            colours[name] = hue + ("70" if kind == "raw" and smoothing else "")
            if kind == "smoothed" or not smoothing:
                legend.append(name)
        style = {"series": list(colours), "legend": legend, "colours": colours,
                 "y_title": curves.axis_title(metric, bool(log_scale))}
        return frame, info, style

    def metrics_mtimes(run_ids: list[str]) -> tuple:
        out = []
        for r in run_ids:
            try:
                out.append(manager.paths(r).metrics.stat().st_mtime_ns)
            except Exception:  # noqa: BLE001 - no file yet, or the run was deleted
                out.append(None)
        return tuple(out)

    # --- Train tab handlers ---

    @handler
    def hardware() -> str:
        from mae_core.config import hardware_summary

        return f"**Hardware:** {hardware_summary()}"

    @handler
    def start(data: str, preset: str, image_size: float, patch_size: float, mask_ratio: float,
              batch_size: float, base_lr: float, max_steps: float, max_epochs: float,
              accelerator: str, devices: float, precision: str, policy: str, seed: float,
              checkpoint_every_n_steps: float, preview_every_n_steps: float):
        cfg = form_config(data, preset, image_size, patch_size, mask_ratio, batch_size, base_lr,
                          max_steps, max_epochs, accelerator, devices, precision, policy, seed,
                          checkpoint_every_n_steps, preview_every_n_steps)
        run_id = manager.start(cfg)
        return f"Started run `{run_id}`.", run_id

    @handler
    def show_run(run_id: str):
        """Point the Train tab at ``run_id`` (just started) and treat it as the live run seen."""
        runs = statuses()
        return gr.update(choices=run_choices(runs), value=run_id), run_id

    @handler
    def stop(run_id: str) -> str:
        if not run_id:
            raise user_error("Choose a run to stop.")
        status = manager.stop(run_id)
        if status.get("state") in LIVE_STATES:
            return (f"Stop requested for `{run_id}`: it saves a checkpoint after the current step "
                    "(Force stop ends it at once).")
        return f"Run `{run_id}` is {status.get('state')}."

    @handler
    def resume(run_id: str, max_steps: float):
        if not run_id:
            raise user_error("Choose a run to resume.")
        steps = _as_int(max_steps, "max_steps", allow_none=True) or None
        status = manager.resume(run_id, max_steps=steps)
        return (f"Resumed `{run_id}` from step {status.get('step', 0)} "
                f"towards {status.get('total_steps')} steps.", run_id)

    @handler
    def status(run_id: str):
        runs = statuses()
        return status_outputs(run_id or None, live_of(runs))

    @handler
    def metrics(run_ids: list[str], metric: str, log_scale: bool, smoothing: float):
        if isinstance(run_ids, str):
            run_ids = [run_ids] if run_ids else []
        known = {s["run_id"] for s in statuses()}
        return plot_outputs([r for r in run_ids or [] if r in known], metric, log_scale, smoothing)

    @handler
    def select_run(run_id: str, metric: str, log_scale: bool, smoothing: float):
        runs = statuses()
        run_ids = [run_id] if run_id else []
        return (gr.update(value=run_ids), *status_outputs(run_id or None, live_of(runs)),
                *plot_outputs(run_ids, metric, log_scale, smoothing))

    @handler
    def poll(run_id: str, overlay: list[str], metric: str, log_scale: bool, smoothing: float,
             seen_live: str | None, sig: dict | None):
        """The live refresh (gr.Timer): follows a newly started run, status, buttons, curve."""
        sig = dict(sig or {})
        runs = statuses()
        ids = [s["run_id"] for s in runs]
        live = live_of(runs)
        selected = run_id if run_id in ids else None
        if live is not None and live != seen_live:
            selected = live  # a run started (here or in another tab): show it
        if selected is None and ids:
            selected = live or ids[0]
        choices = run_choices(runs)
        if choices != sig.get("choices") or selected != run_id:
            pick = gr.update(choices=choices, value=selected)
        else:
            pick = gr.skip()
        overlay_update = gr.update(choices=ids) if ids != sig.get("ids") else gr.skip()
        sig.update(choices=choices, ids=ids)
        plotted = [r for r in (overlay or []) if r in ids] or ([selected] if selected else [])
        key = (tuple(plotted), metric, bool(log_scale), float(smoothing or 0), metrics_mtimes(plotted))
        if key != sig.get("plot"):
            sig["plot"] = key
            plot, info, style = plot_outputs(plotted, metric, log_scale, smoothing)
        else:
            plot, info, style = gr.skip(), gr.skip(), gr.skip()
        return (pick, overlay_update, *status_outputs(selected, live), plot, info, style, live, sig)

    @handler
    def apply_plot_style(style: dict | None, applied: dict | None):
        """Legend, colours and axis title of the curve, sent only when they change.

        Gradio's LinePlot fixes its colour domain when it builds the chart and only swaps the data
        afterwards, so a run added to the overlay would not be drawn. Changing the legend after the
        new data has arrived rebuilds the chart with every series (one run's raw and smoothed curves
        share a hue).
        """
        if not style or style == applied:
            return gr.skip(), applied
        return (gr.LinePlot(colors_in_legend=style["legend"], color_map=style["colours"],
                            y_title=style["y_title"]), style)

    # --- Reconstruct tab handlers ---

    @handler
    def reconstruct(files: list[str] | None, use_samples: bool, run_id: str, mask_ratio: float,
                    seed: float):
        from mae_core.data import sample_photo_paths
        from mae_core.images import open_rgb

        ratio = _as_float(mask_ratio, "mask_ratio")
        if not 0 < ratio < 1:
            raise ConfigError("mask_ratio", f"must be strictly between 0 and 1, got {ratio}")
        seed = _as_int(seed, "seed")
        sources = [Path(f) for f in ([files] if isinstance(files, str) else files or [])]
        if use_samples:
            sources += sample_photo_paths()[:NUM_SAMPLE_IMAGES]
        if not sources:
            raise user_error("Upload one or more images, or tick “use the sample photos”.")
        if not run_id:
            raise user_error("Choose a checkpoint: no run has saved weights yet (train one first).")
        note = f" (the first {MAX_IMAGES} of {len(sources)})" if len(sources) > MAX_IMAGES else ""
        images = [(p.name, open_rgb(p, name=p.name)) for p in sources[:MAX_IMAGES]]  # names the file
        weights = manager.weights(run_id)
        gallery, table = reconstruction_views(models.get(weights), images, ratio, seed)
        message = (f"Run `{run_id}`, weights from step {_weights_step(weights)}, mask ratio {ratio}, "
                   f"seed {seed}: {len(images)} image(s){note}.")
        return gallery, table, message

    @handler
    def checkpoints(current: str | None, follow: bool):
        runs = statuses()
        choices = ckpt_choices(runs)
        values = [c[1] for c in choices]
        if follow or current not in values:
            value = default_ckpt(runs)  # the live run's weights, else the newest run's
        else:
            value = current
        return gr.update(choices=choices, value=value)

    def preview_items(run_id: str | None) -> list[tuple[str, str]]:
        if not run_id:
            return []
        items = []
        for path in manager.previews(run_id)[-24:]:
            step = path.stem.split("_")[-1].lstrip("0") or "0"
            items.append((str(path), f"step {step}"))
        return items[::-1]  # newest first

    @handler
    def previews(run_id: str | None):
        if not run_id:
            return []
        try:
            return preview_items(run_id)
        except Exception as err:  # noqa: BLE001 - e.g. the run was just deleted
            if isinstance(err, _user_errors()):
                return []
            raise

    @handler
    def pick_checkpoint(run_id: str | None) -> bool:
        """A checkpoint chosen by hand stays chosen (no more following the live run)."""
        return not run_id

    # --- Parameters tab handlers ---

    def audit_outputs(base: ModelConfig, title: str) -> tuple:
        clean = cached_audit(dataclasses.replace(base, policy="ddp-clean"))
        reference = cached_audit(dataclasses.replace(base, policy="reference"))
        summary = (f"### {title}\nEvery tensor the constructors make, and what each policy does "
                   "with it. Rows: green trainable, blue frozen, red removed; a red outline marks a "
                   "trainable tensor that gets no gradient (plain DDP fails on it).")
        return (summary, audit_diff_html(clean, reference), audit_table_html(clean),
                audit_table_html(reference),
                {"ddp-clean": audit_json(clean), "reference": audit_json(reference)})

    def preset_config(preset: str, image_size: Any, patch_size: Any) -> ModelConfig:
        return ModelConfig(preset=preset, image_size=_as_int(image_size, "image_size"),
                           patch_size=_as_int(patch_size, "patch_size"))

    @handler
    def params(run_id: str, preset: str, image_size: float, patch_size: float):
        """Audit a run's model (its preset and geometry fill the fields), or, with no run, the fields."""
        if run_id:
            base = manager.config(run_id).model
            title = f"Run `{run_id}`: {base.preset}, {base.image_size}px, patch {base.patch_size}"
        else:
            base = preset_config(preset, image_size, patch_size)
            title = f"Preset {base.preset}, {base.image_size}px, patch {base.patch_size}"
        return (base.preset, base.image_size, base.patch_size, *audit_outputs(base, title))

    @handler
    def params_custom(preset: str, image_size: float, patch_size: float):
        """Audit the preset and geometry in the fields (leaving any selected run)."""
        base = preset_config(preset, image_size, patch_size)
        return ("", *audit_outputs(base, f"Preset {base.preset}, {base.image_size}px, "
                                         f"patch {base.patch_size}"))

    @handler
    def params_for_run(run_id: str | None, preset: str, image_size: float, patch_size: float):
        """Opening the tab: audit the Train tab's run (or the fields when there is none)."""
        runs = statuses()
        value = run_id if run_id in {s["run_id"] for s in runs} else ""
        return (gr.update(choices=[NO_RUN] + run_choices(runs), value=value),
                *params.__wrapped__(value, preset, image_size, patch_size))

    # --- Runs tab handlers ---

    def runs_frame(runs: list[dict[str, Any]]):
        import pandas as pd

        return pd.DataFrame(curves.run_rows(runs), columns=list(curves.RUN_TABLE_HEADERS))

    @handler
    def list_runs(current: str | None = None):
        runs = statuses()
        ids = [s["run_id"] for s in runs]
        value = current if current in ids else (ids[0] if ids else None)
        return runs_frame(runs), gr.update(choices=ids, value=value)

    @handler
    def pick_run_row(evt: gr.SelectData):
        row = evt.row_value or []
        return gr.update(value=row[0]) if row else gr.skip()

    @handler
    def delete_run(run_id: str, confirm: bool):
        if not run_id:
            raise user_error("Choose a run to delete.")
        if not confirm:
            raise user_error(f"Tick “yes, delete” first: deleting {run_id} removes its checkpoints, "
                           "weights and previews for good.")
        manager.delete(run_id)
        frame, pick = list_runs.__wrapped__(None)
        return f"Deleted run `{run_id}`.", False, frame, pick

    @handler
    def export(run_id: str):
        if not run_id:
            raise user_error("Choose a run to export.")
        path, snippet = manager.export(run_id)
        return str(path), snippet, f"Exported the encoder of `{run_id}` to `{path}`."

    @handler
    def open_run(run_id: str):
        if not run_id:
            raise user_error("Choose a run to open.")
        runs = statuses()
        if run_id not in {s["run_id"] for s in runs}:
            raise user_error(f"no run named {run_id!r}")
        ckpts = ckpt_choices(runs)
        ckpt = (gr.update(choices=ckpts, value=run_id) if run_id in {c[1] for c in ckpts}
                else gr.update(choices=ckpts))
        return (gr.update(choices=run_choices(runs), value=run_id), ckpt, False,
                gr.Tabs(selected="train"), f"Opened `{run_id}` in the Train and Reconstruct tabs.")

    @handler
    def refresh_lists(ckpt: str | None, follow: bool, runs_pick: str | None, sig: dict | None):
        """The slow refresh: checkpoint choices, previews and the runs table, when they change."""
        sig = dict(sig or {})
        runs = statuses()
        ckpt_update = checkpoints.__wrapped__(ckpt, follow)
        ckpt_value = ckpt_update.get("value")
        ckpt_key = (tuple(ckpt_choices(runs)), ckpt_value)
        if ckpt_key == sig.get("ckpt"):
            ckpt_update = gr.skip()
        sig["ckpt"] = ckpt_key
        try:
            items = preview_items(ckpt_value)
        except Exception:  # noqa: BLE001 - deleted meanwhile
            items = []
        gallery = items if items != sig.get("previews") else gr.skip()
        sig["previews"] = items
        rows = curves.run_rows(runs)
        if rows != sig.get("rows"):
            sig["rows"] = rows
            frame, pick = list_runs.__wrapped__(runs_pick)
        else:
            frame, pick = gr.skip(), gr.skip()
        return ckpt_update, gallery, frame, pick, sig

    # --- layout ---

    d_model, d_train = DEFAULTS.model, DEFAULTS.train
    with gr.Blocks(title="MAE Studio") as demo:
        gr.Markdown("# MAE Studio\nPretrain a Masked Autoencoder (timm ViT + lightly, Lightning DDP), "
                    "watch it learn, and look inside it. Runs live in their directories: every tab "
                    "and every browser sees the same state.")
        seen_live = gr.State(None)
        poll_sig = gr.State(None)
        slow_sig = gr.State(None)
        ckpt_follow = gr.State(True)
        plot_style = gr.State(None)  # what the curve's legend should be
        plot_applied = gr.State(None)  # what it is
        with gr.Tabs(elem_id="tabs") as tabs:
            with gr.Tab("Train", id="train", elem_id="tab-train"):
                with gr.Row():
                    with gr.Column(scale=2, min_width=320):
                        gr.Markdown("### Run config")
                        data = gr.Textbox(label="data folder", value=d_train.data, elem_id="data",
                                          placeholder="empty = the embedded sample photos")
                        with gr.Row():
                            preset = gr.Dropdown(list(PRESETS), value=d_model.preset, label="model preset",
                                                 elem_id="preset")
                            policy = gr.Dropdown(list(POLICIES), value=d_model.policy,
                                                 label="parameter policy", elem_id="policy")
                        with gr.Row():
                            image_size = gr.Number(d_model.image_size, label="image size", precision=0,
                                                   elem_id="image-size")
                            patch_size = gr.Number(d_model.patch_size, label="patch size", precision=0,
                                                   elem_id="patch-size")
                        mask_ratio = gr.Slider(0.05, 0.95, value=d_model.mask_ratio, step=0.05,
                                               label="mask ratio", elem_id="mask-ratio")
                        with gr.Row():
                            batch_size = gr.Number(d_train.batch_size, label="batch size (per process)",
                                                   precision=0, elem_id="batch-size")
                            base_lr = gr.Number(d_train.base_lr, label="base lr (× batch / 256)",
                                                elem_id="base-lr")
                        with gr.Row():
                            max_steps = gr.Number(d_train.max_steps, label="max steps (-1 = by epochs)",
                                                  precision=0, elem_id="max-steps")
                            max_epochs = gr.Number(d_train.max_epochs or 0, label="max epochs (0 = none)",
                                                   precision=0, elem_id="max-epochs")
                        hardware_md = gr.Markdown("**Hardware:** checking…", elem_id="hardware")
                        with gr.Row():
                            accelerator = gr.Dropdown(list(ACCELERATORS), value=d_train.accelerator,
                                                      label="accelerator", elem_id="accelerator")
                            devices = gr.Number(d_train.devices or 0, label="devices (0 = auto)",
                                                precision=0, elem_id="devices")
                            precision = gr.Dropdown(list(PRECISION_CHOICES),
                                                    value=d_train.precision or "auto",
                                                    label="precision", elem_id="precision")
                        with gr.Accordion("more", open=False):
                            with gr.Row():
                                seed = gr.Number(d_train.seed, label="seed", precision=0, elem_id="seed")
                                ckpt_every = gr.Number(d_train.checkpoint_every_n_steps, precision=0,
                                                       label="checkpoint every N steps",
                                                       elem_id="ckpt-every")
                                preview_every = gr.Number(d_train.preview_every_n_steps, precision=0,
                                                          label="preview every N steps",
                                                          elem_id="preview-every")
                            resume_steps = gr.Number(0, precision=0, elem_id="resume-steps",
                                                     label="resume until step (0 = the run's own max steps)")
                        with gr.Row():
                            start_btn = gr.Button("Start", variant="primary", elem_id="start-btn")
                            stop_btn = gr.Button("Stop", variant="stop", interactive=False,
                                                 elem_id="stop-btn")
                            resume_btn = gr.Button("Resume", interactive=False, elem_id="resume-btn")
                        train_msg = gr.Markdown(elem_id="train-message")
                        started = gr.Textbox(visible=False, label="started run")
                    with gr.Column(scale=3, min_width=420):
                        run_pick = gr.Dropdown([], value=None, label="run", elem_id="run-pick", allow_custom_value=True,
                                               info="the live run, else the most recent one")
                        status_panel = gr.HTML(status_html(None), elem_id="status-panel")
                        status_json = gr.JSON(visible=False)
                        with gr.Row():
                            overlay = gr.Dropdown([], value=[], multiselect=True, scale=3,
                                                  label="runs to plot (overlay to compare)",
                                                  elem_id="overlay", allow_custom_value=True)
                            metric = gr.Radio([(label, key) for key, label in curves.METRICS.items()],
                                              value="loss", label="metric", scale=2, elem_id="metric")
                        with gr.Row():
                            log_scale = gr.Checkbox(False, label="log scale (plot log10)",
                                                    elem_id="log-scale")
                            smoothing = gr.Slider(0.0, 0.99, value=0.8, step=0.01,
                                                  label="EMA smoothing", elem_id="smoothing")
                        plot = gr.LinePlot(None, x="step", y="value",
                                           color="series", x_title="step", color_title="run",
                                           y_title=curves.axis_title("loss", False),
                                           label="training curve", elem_id="loss-plot")
                        plot_info = gr.Markdown(elem_id="plot-info")
            with gr.Tab("Reconstruct", id="reconstruct", elem_id="tab-reconstruct") as recon_tab:
                with gr.Row():
                    with gr.Column(scale=1, min_width=300):
                        uploads = gr.File(label="images (any size; a few at a time)",
                                          file_count="multiple", type="filepath", elem_id="uploads")
                        use_samples = gr.Checkbox(False, label="use the sample photos",
                                                  elem_id="use-samples")
                        ckpt_pick = gr.Dropdown([], value=None, label="checkpoint (run with weights)",
                                                elem_id="ckpt-pick", allow_custom_value=True,
                                                info="follows the live run's latest weights")
                        recon_ratio = gr.Slider(0.05, 0.95, value=d_model.mask_ratio, step=0.05,
                                                label="mask ratio", elem_id="recon-ratio")
                        recon_seed = gr.Number(0, precision=0, label="mask seed (same seed = same mask "
                                               "on every checkpoint)", elem_id="recon-seed")
                        recon_btn = gr.Button("Reconstruct", variant="primary", elem_id="recon-btn")
                        recon_msg = gr.Markdown(elem_id="recon-message")
                    with gr.Column(scale=3):
                        recon_gallery = gr.Gallery(label="input · masked · reconstruction · "
                                                   "reconstruction + visible · per-patch error",
                                                   columns=5, height="auto", object_fit="contain",
                                                   format="png", elem_id="recon-gallery")
                        recon_losses = gr.Dataframe(headers=["image", "loss (masked patches)",
                                                             "masked patches"],
                                                    interactive=False, elem_id="recon-losses")
                gr.Markdown("### Training previews (fixed images and mask, newest first)")
                preview_gallery = gr.Gallery(columns=6, height=320, object_fit="contain", fit_columns=False,
                                             label="previews", elem_id="preview-gallery")
            with gr.Tab("Parameters", id="parameters", elem_id="tab-parameters") as params_tab:
                with gr.Row():
                    param_run = gr.Dropdown([NO_RUN], value="",
                                            label="run", scale=3, elem_id="param-run", allow_custom_value=True)
                    param_preset = gr.Dropdown(list(PRESETS), value=d_model.preset, label="preset",
                                               scale=1, elem_id="param-preset")
                    param_image = gr.Number(d_model.image_size, precision=0, label="image size",
                                            scale=1, elem_id="param-image")
                    param_patch = gr.Number(d_model.patch_size, precision=0, label="patch size",
                                            scale=1, elem_id="param-patch")
                    audit_btn = gr.Button("Audit", scale=1, elem_id="audit-btn")
                params_md = gr.Markdown("Auditing the selected run's model…")
                params_diff = gr.HTML(elem_id="params-diff")
                with gr.Row():
                    params_clean = gr.HTML(elem_id="params-clean")
                    params_ref = gr.HTML(elem_id="params-reference")
                params_json = gr.JSON(visible=False)
            with gr.Tab("Runs", id="runs", elem_id="tab-runs") as runs_tab:
                runs_table = gr.Dataframe(headers=list(curves.RUN_TABLE_HEADERS),
                                          interactive=False, elem_id="runs-table")
                with gr.Row():
                    runs_pick = gr.Dropdown([], value=None, label="run", scale=3, elem_id="runs-pick", allow_custom_value=True)
                    refresh_btn = gr.Button("Refresh", scale=1, elem_id="refresh-btn")
                    open_btn = gr.Button("Open in Train & Reconstruct", scale=1, elem_id="open-btn")
                    export_btn = gr.Button("Export encoder", scale=1, elem_id="export-btn")
                with gr.Row():
                    confirm = gr.Checkbox(False, label="yes, delete this run's files", scale=3,
                                          elem_id="confirm-delete")
                    delete_btn = gr.Button("Delete run", variant="stop", scale=1, elem_id="delete-btn")
                runs_msg = gr.Markdown(elem_id="runs-message")
                with gr.Row():
                    export_file = gr.File(label="encoder (timm safetensors)", interactive=False,
                                          elem_id="export-file")
                    export_code = gr.Code(language="python", label="load it with timm",
                                          elem_id="export-code")

        timer = gr.Timer(POLL_S)
        slow_timer = gr.Timer(SLOW_POLL_S)

        # --- events ---
        status_outs = [status_json, status_panel, start_btn, stop_btn, resume_btn]
        hidden = "hidden"
        plot_outs = [plot, plot_info, plot_style]
        style_io = dict(fn=apply_plot_style, inputs=[plot_style, plot_applied],
                        outputs=[plot, plot_applied], show_progress=hidden)
        form = [data, preset, image_size, patch_size, mask_ratio, batch_size, base_lr, max_steps,
                max_epochs, accelerator, devices, precision, policy, seed, ckpt_every, preview_every]

        demo.load(hardware, None, hardware_md, api_name="hardware", show_progress=hidden)
        gr.on([demo.load, timer.tick], poll,
              [run_pick, overlay, metric, log_scale, smoothing, seen_live, poll_sig],
              [run_pick, overlay, *status_outs, *plot_outs, seen_live, poll_sig],
              api_name="poll", show_progress=hidden, trigger_mode="always_last").then(
            **style_io, api_name="plot_style")
        gr.on([demo.load, slow_timer.tick], refresh_lists,
              [ckpt_pick, ckpt_follow, runs_pick, slow_sig],
              [ckpt_pick, preview_gallery, runs_table, runs_pick, slow_sig],
              api_name="refresh_lists", show_progress=hidden, trigger_mode="always_last")

        start_btn.click(start, form, [train_msg, started], api_name="start",
                        concurrency_id="run_actions").then(
            show_run, started, [run_pick, seen_live], api_name="show_run", show_progress=hidden)
        stop_btn.click(stop, run_pick, train_msg, api_name="stop", concurrency_id="run_actions").then(
            status, run_pick, status_outs, api_name="status", show_progress=hidden)
        resume_btn.click(resume, [run_pick, resume_steps], [train_msg, seen_live], api_name="resume",
                         concurrency_id="run_actions").then(
            status, run_pick, status_outs, api_name="status_after_resume", show_progress=hidden)
        run_pick.change(select_run, [run_pick, metric, log_scale, smoothing],
                        [overlay, *status_outs, *plot_outs], api_name="select_run",
                        show_progress=hidden).then(**style_io, api_name="plot_style_1")
        gr.on([overlay.input, metric.change, log_scale.change, smoothing.release], metrics,
              [overlay, metric, log_scale, smoothing], plot_outs, api_name="metrics",
              show_progress=hidden).then(**style_io, api_name="plot_style_2")

        recon_btn.click(reconstruct, [uploads, use_samples, ckpt_pick, recon_ratio, recon_seed],
                        [recon_gallery, recon_losses, recon_msg], api_name="reconstruct")
        recon_tab.select(checkpoints, [ckpt_pick, ckpt_follow], ckpt_pick, api_name="checkpoints",
                         show_progress=hidden)
        ckpt_pick.input(pick_checkpoint, ckpt_pick, ckpt_follow, api_name="pick_checkpoint",
                        show_progress=hidden)
        ckpt_pick.change(previews, ckpt_pick, preview_gallery, api_name="previews",
                         show_progress=hidden)

        params_outs = [params_md, params_diff, params_clean, params_ref, params_json]
        fields = [param_preset, param_image, param_patch]
        params_tab.select(params_for_run, [run_pick, *fields], [param_run, *fields, *params_outs],
                          api_name="params_for_run")
        param_run.input(params, [param_run, *fields], [*fields, *params_outs], api_name="params")
        gr.on([audit_btn.click, param_preset.input], params_custom, fields,
              [param_run, *params_outs], api_name="params_custom")

        gr.on([runs_tab.select, refresh_btn.click], list_runs, runs_pick, [runs_table, runs_pick],
              api_name="list_runs", show_progress=hidden)
        runs_table.select(pick_run_row, None, runs_pick, api_name="pick_run_row",
                          show_progress=hidden)
        delete_btn.click(delete_run, [runs_pick, confirm], [runs_msg, confirm, runs_table, runs_pick],
                         api_name="delete_run", concurrency_id="run_actions")
        export_btn.click(export, runs_pick, [export_file, export_code, runs_msg], api_name="export")
        open_btn.click(open_run, runs_pick, [run_pick, ckpt_pick, ckpt_follow, tabs, runs_msg],
                       api_name="open_run")
    demo.model_cache = models  # for tests and diagnostics: how often weights were loaded
    return demo


# --- command line --------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python app.py", description="MAE Studio web UI")
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to bind (default 127.0.0.1; 0.0.0.0 exposes it to the network)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    parser.add_argument("--runs-dir", default="checkpoints", help="where runs live (default checkpoints)")
    parser.add_argument("--no-browser", action="store_true",
                        help="do not open a browser tab (none is opened without a display anyway)")
    return parser.parse_args(argv)


def _has_display() -> bool:
    return sys.platform in ("darwin", "win32") or bool(
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own start-up requests
    runs_dir = Path(args.runs_dir).expanduser().resolve()
    runs_dir.mkdir(parents=True, exist_ok=True)
    manager = LazyRunManager(runs_dir)
    demo = build_app(manager)  # type: ignore[arg-type]
    demo.queue(default_concurrency_limit=4).launch(
        server_name=args.host, server_port=args.port, share=args.share, max_file_size=MAX_UPLOAD,
        allowed_paths=[str(runs_dir)], prevent_thread_lock=True, css=CSS, quiet=True,
        inbrowser=not args.no_browser and _has_display())
    manager.start_loading()  # the torch-heavy import, now that the page is already served
    print(f"MAE Studio is running at {demo.local_url}", flush=True)
    if getattr(demo, "share_url", None):
        print(f"public link: {demo.share_url}", flush=True)
    print(f"runs directory: {runs_dir} (training runs keep going if the app stops)", flush=True)
    try:
        demo.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        demo.close(verbose=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
