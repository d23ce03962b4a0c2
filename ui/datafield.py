"""The Train tab's data field: what the folder (or prepared set) holds before Start, and preparing a
large folder now, in the background, with its progress and a Cancel.

The plain functions return ``{name: update}`` for the names of :func:`build`'s components; the
preparation itself is :mod:`mae_core.preparing` (its own process; a cancel leaves nothing behind).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import gradio as gr

from mae_core.preparing import Preparations, Progress
from ui import render
from ui.common import UserError, describe, guarded

POLL_S = 1.0
HIDDEN = "hidden"
KEEP_NOTE_S = 30.0  # how long a page load reuses the last load's note on the same folder


def data_info(folder: str | None) -> str:
    """What the data field holds: image files found, unreadable ones, prepared or not, size on disk;
    or why it cannot be trained on."""
    return render.notice(*_describe(folder))


def _describe(folder: str | None) -> tuple[str, str]:
    """(notice kind, text) of :func:`data_info`."""
    from mae_core.data import check_data
    from mae_core.prepared import is_prepared, is_remote
    from mae_core.preparing import data_note, survey

    data = (folder or "").strip()
    try:
        summary = check_data(data)
        found = survey(data, summary)
    except Exception as err:  # noqa: BLE001 - shown beside the field
        return "error", describe(err, "checking the data folder") + read_from(data)
    where = f"`{data}`{read_from(data)}" if data else "the sample photos"
    if is_prepared(data) or is_remote(data):  # the manifest's count is in the note
        return "ok", f"{where}: {data_note(data, found)}"
    kind = "" if summary.channels == 3 and summary.bits == 8 else (
        f" {summary.describe()} images: in_chans {summary.channels}, normalised with the data "
        "set's own statistics (computed at start);")
    text = f"{where}: {summary.files:,} image file(s) found;{kind} {data_note(data, found)}"
    if note := summary.alpha_note():  # a band about to be read as transparency: said before Start
        return "warn", f"{text} — {note}."
    return "ok", text


class RecentNotes:
    """:func:`data_info` for page loads, each note kept ``keep_s``: every load (a reload, each
    open tab) walked the restored folder again, reading a header per image of a large folder.
    Refusals are not kept (a folder made meanwhile is found at the next load), nor a note taken
    before a preparation of the folder in ``jobs`` ended (it said "not prepared yet"), and an edit
    or a blur of the field always checks afresh."""

    def __init__(self, keep_s: float = KEEP_NOTE_S, size: int = 16,
                 jobs: Preparations | None = None) -> None:
        self.keep_s, self.size, self.jobs = keep_s, size, jobs
        self._notes: dict[str, tuple[float, str, Any]] = {}
        self._lock = threading.Lock()

    def _preparation(self, key: str) -> Any:
        """The folder's preparation in ``jobs`` and whether it has ended: a note is kept for one."""
        job = self.jobs.get(key) if self.jobs is not None else None
        return None if job is None else (str(job.progress_dir), job.progress().finished)

    def note(self, folder: str | None) -> str:
        key, now = (folder or "").strip(), time.monotonic()
        preparation = self._preparation(key)
        with self._lock:
            kept = self._notes.get(key)
        if kept and now - kept[0] < self.keep_s and kept[2] == preparation:
            return kept[1]
        kind, text = _describe(folder)
        note = render.notice(kind, text)
        if kind != "error":
            with self._lock:
                self._notes.pop(key, None)
                self._notes[key] = (now, note, preparation)
                while len(self._notes) > self.size:  # the oldest goes
                    del self._notes[next(iter(self._notes))]
        return note


def read_from(data: str) -> str:
    """Where a relative path is read from, said; "" for any other path. A run keeps the absolute
    path, made from the folder the app was started in, which the page never showed."""
    from mae_core.checks import is_url, path_shown

    expanded = os.path.expanduser(data)
    # "~nouser/x" stays as typed (mae_core.config keeps it so, and the data check says why)
    if not data or is_url(data) or os.path.isabs(expanded) or expanded.startswith("~"):
        return ""
    return (f" (that is `{path_shown(os.path.abspath(data))}`: a relative path is read from "
            f"`{os.getcwd()}`, where the app was started)")


def _nothing_to_prepare(data: str) -> str | None:
    """Why Prepare need not run for ``data`` (news, not a failure), or None when it should."""
    from mae_core.preparing import survey

    found = survey(data)
    if found.kind == "remote":
        return "A remote data set is prepared where it lives: nothing to prepare here."
    if found.kind == "prepared":
        return f"Already prepared: {found.count:,} images at `{found.path}`."
    if found.kind == "memory":
        return (f"{found.files:,} image files: a folder this small is decoded into memory at "
                "start, nothing to prepare.")
    return None


def progress_html(progress: Progress | None) -> str:
    """A progress bar and one line: files done of the total, seconds so far, or the outcome."""
    if progress is None:
        return ""
    if progress.state == "walking":
        return render.notice("info", f"Preparing: finding the image files ({progress.seconds:.0f} s)…")
    if progress.state == "waiting":  # on the set's lock: a run's start or another app has it
        return render.notice("info", f"Preparing: waiting for another process (a run starting on "
                                     f"this folder, or another app) that is preparing the same "
                                     f"{progress.total or 0:,} files to finish "
                                     f"({progress.seconds:.0f} s)…")
    if progress.state == "encoding":
        total = progress.total or 0
        bar = (f'<progress id="prepare-bar" value="{progress.done}" max="{max(total, 1)}" '
               'style="width:100%"></progress>')
        text = (f"Preparing: {progress.done:,} of {total:,} files ({100 * progress.fraction:.0f} %), "
                f"{progress.seconds:.0f} s")
        return bar + render.notice("info", text)
    kind = {"done": "ok", "cancelled": "warn"}.get(progress.state, "error")
    return render.notice(kind, f"Preparation {progress.state}: {progress.message}")


def refuses(note: str | None) -> bool:
    """Whether a note of :func:`data_info` refuses its folder (an error notice)."""
    return 'data-kind="error"' in (note or "")


def prepare_button(jobs: Preparations, note: str | None, preparing: str | None = None
                   ) -> dict[str, Any]:
    """Prepare's state for the data field's note: greyed where the note refuses the folder (the
    reason stands just above it: pressing Prepare only said it again) and while the preparation
    this page follows (``preparing``) runs; enabled again once the field holds a folder that can
    be prepared. Another page's preparation greys nothing here: this page has no timer to see it
    end, and its Prepare stayed greyed after it (its press says who prepares, or follows it)."""
    job = jobs.get(preparing) if preparing is not None else None
    running = job is not None and not job.progress().finished
    return gr.update(interactive=not refuses(note) and not running)


def _buttons(running: bool, note: str | None = None) -> dict[str, Any]:
    return {"prepare": gr.update(interactive=not running and not refuses(note)),
            "cancel": gr.update(interactive=running), "timer": gr.Timer(active=running)}


def start_preparing(jobs: Preparations, folder: str | None) -> dict[str, Any]:
    """Start preparing ``folder`` in the background (or show the one already under way)."""
    data = (folder or "").strip()
    busy = [other for other in jobs.running() if other != data]
    if busy:  # one at a time: the page follows (and cancels) one preparation
        raise UserError(f"`{busy[0] or 'the sample photos'}` is being prepared: wait for it or "
                        "cancel it first.")
    if reason := _nothing_to_prepare(data):
        return {"progress": render.notice("info", reason)}
    job = jobs.start(data)  # the same folder again: its running preparation, shown anew
    return {"preparing": data, "progress": progress_html(job.progress()), **_buttons(True)}


def current_preparation(jobs: Preparations) -> dict[str, Any]:
    """A page load's view (a reload, another tab): the preparation the app is running, whichever
    page started it, followed as if started here (its progress, Cancel, the timer on, Prepare
    greyed); nothing when none runs. The job is the app's, the page only kept its name."""
    running = jobs.running()
    job = jobs.get(running[0]) if running else None
    if job is None:
        return {}
    return {"preparing": job.folder, "progress": progress_html(job.progress()), **_buttons(True)}


def preparing_view(jobs: Preparations, preparing: str | None) -> dict[str, Any]:
    """The timer's refresh: the job's progress; once it has ended, the outcome, the buttons back,
    the timer off and the data field's description anew (now "prepared")."""
    job = jobs.get(preparing) if preparing is not None else None
    if job is None:
        return {"progress": "", **_buttons(False)}
    progress = job.progress()
    if not progress.finished:
        return {"progress": progress_html(progress)}
    note = data_info(preparing)
    return {"progress": progress_html(progress), "info": note, **_buttons(False, note)}


def cancel_preparing(jobs: Preparations, preparing: str | None) -> dict[str, Any]:
    """Stop the preparation; its partial output is removed (see :meth:`Preparation.cancel`)."""
    if preparing is None or jobs.get(preparing) is None:
        raise UserError("No preparation is running.")
    progress = jobs.cancel(preparing)
    note = data_info(preparing)
    return {"progress": progress_html(progress), "info": note, **_buttons(False, note)}


def build(c: dict[str, Any]) -> None:
    """The widgets under the data field (inside the Train form); ``c["field.data"]`` exists."""
    c["data_info"] = gr.HTML(elem_id="data-info")
    with gr.Row():
        c["prepare"] = gr.Button("Prepare now (large folders)", size="sm", elem_id="prepare-btn")
        c["cancel_prepare"] = gr.Button("Cancel preparing", size="sm", interactive=False,
                                        elem_id="cancel-prepare-btn")
    c["prepare_progress"] = gr.HTML(elem_id="prepare-progress")
    c["prepare_timer"] = gr.Timer(POLL_S, active=False)
    c["preparing"] = gr.State(None)


def wire(c: dict[str, Any], jobs: Preparations) -> None:
    names = {"info": c["data_info"], "progress": c["prepare_progress"], "prepare": c["prepare"],
             "cancel": c["cancel_prepare"], "timer": c["prepare_timer"], "preparing": c["preparing"]}
    outputs = list(names.values())
    as_updates = lambda out: {names[k]: v for k, v in out.items()}
    error = lambda text: {names["progress"]: render.notice("error", text)}
    data = c["field.data"]
    # Only reads; unlimited, or every page's load (ui.blocks) and every blur would wait in one
    # queue behind the walk of one large folder. A blur while a check runs is checked after it,
    # with the field as it is then (dropped, the note went on describing the folder before).
    gr.on([data.blur, data.submit], data_info, data, c["data_info"], api_name="check_data",
          concurrency_limit=None, trigger_mode="always_last")
    # For a form the server fills (ui.configfile), where no blur comes.
    c["data_info_spec"] = dict(fn=data_info, inputs=data, outputs=c["data_info"],
                               api_visibility="private", show_progress=HIDDEN,
                               concurrency_limit=None)
    c["data_info_on_load"] = c["data_info_spec"] | {"fn": RecentNotes(jobs=jobs).note}
    # A page load (ui.blocks) follows the preparation the app is running, started by any page;
    # none running, the page stays as built (an empty dict is no dict of updates to Gradio).
    on_load = lambda: as_updates(current_preparation(jobs)) or {names["progress"]: gr.skip()}
    c["preparing_on_load"] = dict(fn=guarded("preparation progress", error)(on_load), inputs=None,
                                  outputs=outputs, api_visibility="private",
                                  show_progress=HIDDEN, concurrency_limit=None)
    # However the note came (a blur, a page load, a form filled from a config, a preparation's
    # end), Prepare follows it: greyed where it refuses the folder.
    c["data_info"].change(guarded("prepare", error)(lambda note, preparing: as_updates(
        {"prepare": prepare_button(jobs, note, preparing)})), [c["data_info"], c["preparing"]],
        outputs,
        api_visibility="private", show_progress=HIDDEN, concurrency_limit=None)
    c["prepare"].click(guarded("prepare", error)(lambda folder: as_updates(start_preparing(jobs, folder))),
                       data, outputs, api_name="prepare_data", show_progress=HIDDEN)
    c["prepare_timer"].tick(
        guarded("preparation progress", error)(lambda p: as_updates(preparing_view(jobs, p))),
        c["preparing"], outputs, api_name="prepare_progress", show_progress=HIDDEN)
    c["cancel_prepare"].click(
        guarded("cancel", error)(lambda p: as_updates(cancel_preparing(jobs, p))),
        c["preparing"], outputs, api_name="cancel_prepare", show_progress=HIDDEN)
