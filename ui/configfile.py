"""The Train form ↔ a config file: load an uploaded RUN.yaml into the form, write the form as a YAML
file to download, or copy an existing run's config into the form; and the form kept in the
browser (its values survive a reload, or the app's restart) until Reset puts the defaults back.

The plain functions take and return plain values (tests call them without a server); :func:`build`
lays out the "config file" accordion inside the Train form and :func:`wire` its events, which fill
the form's fields and report in the accordion's own message, under its buttons (the Train tab's
message sits a screen above them, where a refusal went unseen).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import gradio as gr

from mae_core.config import ConfigError, RunConfig
from mae_core.fileio import atomic_write_text
from ui import render
from ui.common import (DEFAULTS, FIELD_NAMES, FORM_FIELDS, AppContext, UserError,
                       config_from_form, form_by_name, form_values, guarded, widget_kind)

CONFIG_FILE_MAX_AGE_S = 86400.0  # Gradio's own cache keeps a download a day (ui.blocks)
FORM_STORAGE_KEY = "mae-studio-train-form"
# BrowserState encrypts what it stores with this; a fixed one (the form holds nothing secret)
# keeps the form through the app's restart, which a per-start random one would lose.
FORM_STORAGE_SECRET = "mae-studio-train-form-v1"
MAX_REMEMBERED_TEXT = 4096  # a field's text longer than any path or list the form takes


# The form as the browser keeps it (ui.common.form_by_name), built in the browser on each change:
# a keystroke costs no request (a server-side save sent the whole form there and back on each).
# Twice: for the browser (the BrowserState, shared by its tabs: a new tab starts from the last form
# edited anywhere), and for this tab alone (sessionStorage, kept through its reloads: two tabs
# shared one form, and a reload showed the other tab's last edit).
REMEMBER_FORM_JS = f"""(...values) => {{
  const form = Object.fromEntries({json.dumps(list(FIELD_NAMES))}.map((name, i) => [name, values[i]]));
  try {{ sessionStorage.setItem("{FORM_STORAGE_KEY}", JSON.stringify(form)); }} catch (e) {{}}
  return form;
}}"""


# What each field shows after a reload, in FIELD_NAMES order: the value the browser kept for it, or
# the one it shows (the default) where it kept none, or nothing its widget holds (a field of another
# version of the app, a damaged store: one value a widget cannot take would fail the whole restore).
# In the browser alone: a restore from the server came a second or two after the form was shown,
# and took back what a quick hand had typed meanwhile. The value itself is checked when the run
# starts, as a typed one is. Each field's kind is its widget's (ui.common.widget_kind).
RESTORE_FORM_JS = f"""(saved, ...shown) => {{
  const fields = {json.dumps([[f.name, widget_kind(f), f.optional] for f in FORM_FIELDS])};
  const isForm = (v) => v && typeof v === "object" && !Array.isArray(v);
  let own = null;  // this tab's own form (REMEMBER_FORM_JS), before the browser's last one
  try {{ own = JSON.parse(sessionStorage.getItem("{FORM_STORAGE_KEY}")); }} catch (e) {{}}
  const kept = isForm(own) ? own : isForm(saved) ? saved : {{}};
  const fits = (kind, optional, v) => {{
    if (kind === "dropdown" || kind === "text")
      return typeof v === "string" && v.length <= {MAX_REMEMBERED_TEXT};
    if (kind === "checkbox") return typeof v === "boolean";
    if (v === null) return kind === "number" && optional;  // a blank number box: auto
    return typeof v === "number" && Number.isFinite(v);
  }};
  return fields.map(([name, kind, optional], i) =>
    Object.prototype.hasOwnProperty.call(kept, name) && fits(kind, optional, kept[name])
      ? kept[name] : shown[i]);
}}"""


def config_yaml_file(values: dict[str, Any]) -> str:
    """The form's config as a YAML file to download (validated first: a bad form is refused).

    Gradio copies the file into its own cache, which it purges; this copy is named by its
    content, so downloading the same config again writes nothing new, and copies a day old are
    removed here (one per download piled up in the temp folder for good)."""
    text = config_from_form(values).to_yaml()
    folder = Path(tempfile.gettempdir()) / f"mae-studio-configs-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    _remove_older_than(folder, CONFIG_FILE_MAX_AGE_S)
    path = folder / f"mae-config-{hashlib.sha256(text.encode()).hexdigest()[:16]}.yaml"
    atomic_write_text(path, text)
    return str(path)


def _remove_older_than(folder: Path, age_s: float) -> None:
    cutoff = time.time() - age_s
    for old in folder.glob("mae-config-*.yaml"):
        with contextlib.suppress(OSError):  # another request removed it first
            if old.stat().st_mtime < cutoff:
                old.unlink()


def form_from_yaml(path: str | None) -> dict[str, Any]:
    """A config file's values for the form (an uploaded ``config.yaml``); refused if invalid."""
    if not path:
        raise UserError("Choose a config file (YAML, as a run's config.yaml).")
    try:
        size = Path(path).stat().st_size
    except OSError as err:  # gone from the upload folder meanwhile, or unreadable
        raise UserError(f"{Path(path).name} cannot be read ({err.strerror or err}): upload it "
                        "again.") from None
    if size > 1_000_000:
        raise UserError("That config file is over 1 MB: not a run config.")
    try:
        cfg = RunConfig.load(path)
    except ConfigError as err:
        # An upload sits in Gradio's temp folder: name the file as the person knows it, and keep
        # the server's folders off the page.
        reason = str(err).removeprefix(f"{err.field}: ").replace(str(path), Path(path).name)
        raise ConfigError(err.field, reason) from None
    return form_values(cfg)


def form_from_run(manager: Any, run_id: str | None) -> dict[str, Any]:
    """The selected run's config, as the form shows it ("copy this run's config into the form")."""
    if not run_id:
        raise UserError("Choose a run whose config to copy.")
    from mae_core.channels import for_new_data
    from mae_core.config import with_auto_restored

    # Channels and data set statistics are computed again at Start from the folder the form
    # names: the same folder gives the same numbers, another one its own. So is what was "auto"
    # (the base lr for the batch, the devices): a copy is a new run's starting point.
    return form_values(with_auto_restored(for_new_data(manager.config(run_id))))


def build(c: dict[str, Any]) -> None:
    """The "config file" accordion (inside the Train form): copy, download, upload and the file."""
    with gr.Accordion("config file", open=False, elem_id="config-tools"):
        with gr.Row():
            c["copy_config"] = gr.Button("Copy the shown run's config into the form",
                                         elem_id="copy-config")
            c["download_config"] = gr.Button("Download the form as YAML", elem_id="download-config")
        c["upload_config"] = gr.UploadButton("Load a config YAML into the form",
                                             file_types=[".yaml", ".yml"], elem_id="upload-config")
        c["reset_form"] = gr.Button("Reset the form to the defaults", elem_id="reset-form")
        c["config_message"] = gr.HTML(elem_id="config-message")
        c["config_file"] = gr.File(label="config.yaml", interactive=False, elem_id="config-file")
    c["form_memory"] = gr.BrowserState({}, storage_key=FORM_STORAGE_KEY, secret=FORM_STORAGE_SECRET)


def wire(ctx: AppContext, c: dict[str, Any], fields: list[Any]) -> None:
    """The accordion's events; ``fields`` are the form's widgets in :data:`FIELD_NAMES` order, and
    ``c["run_pick"]`` (the run copied from) and :func:`build`'s components exist."""
    message = c["config_message"]
    to_fields = lambda values: [values[name] for name in FIELD_NAMES]  # noqa: E731
    notice_only = lambda text: {message: render.notice("error", text)}  # noqa: E731

    @guarded("copying the run's config", notice_only)
    def on_copy(run_id: str | None) -> dict:
        values = to_fields(form_from_run(ctx.manager, run_id))
        note = render.notice("ok", f"The form now holds the config of `{run_id}`.")
        return {**dict(zip(fields, values)), message: note}

    @guarded("loading the config file", notice_only)
    def on_upload(file: Any) -> dict:
        path = getattr(file, "name", file)
        values = to_fields(form_from_yaml(path))
        note = render.notice("ok", f"The form now holds the config from `{Path(path).name}`.")
        return {**dict(zip(fields, values)), message: note}

    # A refused form takes back the file of an earlier download: it is not this form's config.
    @guarded("writing the config file", lambda text: {c["config_file"]: None,
                                                      **notice_only(text)})
    def on_download(*values: Any) -> dict:
        return {c["config_file"]: config_yaml_file(form_by_name(values)),
                message: render.notice("ok", "Config written: download it below.")}

    copied = c["copy_config"].click(on_copy, c["run_pick"], [*fields, message],
                                    api_name="copy_config")
    loaded = c["upload_config"].upload(on_upload, c["upload_config"], [*fields, message],
                                       api_name="load_config")
    c["download_config"].click(on_download, fields, [c["config_file"], message],
                               api_name="download_config")

    def on_reset() -> dict:
        values = to_fields(form_values(DEFAULTS))
        return {**dict(zip(fields, values)),
                message: render.notice("ok", "The form holds the defaults again.")}

    reset = c["reset_form"].click(on_reset, None, [*fields, message], api_name="reset_form")
    # Every change, typed, copied, loaded or reset, is kept; the page's load puts it back
    # (ui.blocks.build_app: c["restore_form_spec"]).
    gr.on([field.change for field in fields], None, fields, c["form_memory"], js=REMEMBER_FORM_JS,
          api_visibility="private", trigger_mode="always_last", show_progress="hidden")
    c["restore_form_spec"] = dict(fn=None, inputs=[c["form_memory"], *fields], outputs=fields,
                                  js=RESTORE_FORM_JS, api_visibility="private",
                                  show_progress="hidden")
    # A form filled by the server (copied, loaded, reset, restored) says what its data field
    # holds, as a typed one does when the field is left.
    for filled in (copied, loaded, reset):
        filled.then(**c["data_info_spec"])
