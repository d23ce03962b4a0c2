"""The Runs tab: every run in the runs directory, and what can be done with one: open it in the other
tabs, export its encoder for timm, evaluate it against its random init (kNN / linear probe, a
background job of :mod:`mae_core.evaljobs`), delete it (asks first; never a live run), compare
runs (:mod:`ui.compare`)."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import gradio as gr

from mae_core import display
from mae_core.evaljobs import Evaluations
from mae_core.rundir import DAMAGED, DAMAGED_RUN_ERROR, DAMAGED_RUN_NOTE, LIVE_STATES, RunState
from ui import compare, datacache, render
from ui.evaluation import evaluation_html, evaluation_progress, evaluation_updates
from ui.common import AppContext, UserError, as_bool, as_run_id, describe, guarded

HEADERS = ("run", "state", "steps", "loss (last logged)", "epoch loss (last)", "duration", "disk",
           "policy", "preset", "kNN top-1 % (pretrained / random init)", "data")
# Fixed widths: by content alone, a long data folder would squeeze the kNN header to a letter a
# line; shares of the page broke "finished", "ddp-clean", "vit-tiny" mid-word on a narrow one.
# Each column is as wide as its longest word ("finished", "duration", "vit-large", "reference",
# "(pretrained"); together they fit a 1440 px page (1214 px of table), and on a narrower one the
# table scrolls sideways in its frame.
COLUMN_WIDTHS = ("220px", "90px", "80px", "80px", "80px", "90px", "80px", "100px", "100px", "120px",
                 "170px")


def table_rows(ctx: AppContext, statuses: Iterable[Mapping[str, Any]]) -> list[list[Any]]:
    """One row per run (``statuses``: every run's, as the run manager lists them). A live run's
    loss is its latest logged step's, not a final figure."""
    rows = []
    statuses = list(statuses)
    queue = ctx.manager.queued(statuses)
    for s in statuses:
        state = s.get("state", "?")
        if state == RunState.QUEUED and s["run_id"] in queue:
            state = f"queued (#{queue.index(s['run_id']) + 1})"
        steps = display.format_steps(s)
        loss = display.format_loss(s.get("loss"))
        if state in LIVE_STATES and loss != "–":
            loss += " (live)"
        epoch, size, evaluation, data = file_cells(ctx, s)
        rows.append([s["run_id"], state, steps, loss, epoch,
                     display.format_duration(s.get("elapsed_s")), size, s.get("policy") or "–",
                     s.get("preset") or "–", evaluation,
                     data])  # last: a long folder name scrolls, the rest stays
    keep = {ctx.manager.runs_dir / s["run_id"] for s in statuses}
    for gone in [root for root in list(ctx.run_cells) if root not in keep]:
        ctx.run_cells.pop(gone, None)
    return rows


def file_cells(ctx: AppContext, status: Mapping[str, Any]) -> tuple[str, str, str, str]:
    """A run's cells read from its files (last epoch loss, disk, evaluation, data), read again
    only when its folder changed (:func:`folder_signature`). Read at every 5 s refresh, a few
    hundred runs took 11 s of a core per open page: every whole metrics.jsonl parsed again."""
    paths = ctx.manager.paths(status["run_id"])

    def read() -> tuple[str, str, str, str]:
        epoch = ctx.metrics.reader(paths.metrics).last("epoch_loss")
        return (display.format_number(epoch[1]) if epoch else "–",
                run_size(ctx, status["run_id"]), saved_evaluation(ctx, status["run_id"]),
                data_cell(ctx, status))

    return read_unless_unchanged(ctx.run_cells, paths.root, read, status.get("data_files"))


def read_unless_unchanged(cache: dict[Path, Any], root: Path, read: Callable[[], Any],
                          also: Any = None) -> Any:
    """``read()``, or what it gave the last time ``cache`` was asked of ``root``, if neither the
    folder (:func:`folder_signature`) nor ``also`` changed since. A folder that cannot be listed
    is read each time."""
    key = (folder_signature(root), also)
    kept = cache.get(root)
    if kept is not None and key[0] is not None and kept[0] == key:
        return kept[1]
    cache[root] = (key, read())
    return cache[root][1]


def folder_signature(root: Path) -> tuple | None:
    """Each entry of a run folder with its size, blocks and time (a subfolder's time changes as
    files come and go in it; blocks settle after a write on some file systems, ZFS and btrfs):
    what a run's file cells come from. None if it cannot be read."""
    try:
        with os.scandir(root) as entries:
            return tuple(sorted((e.name, (st := e.stat(follow_symlinks=False)).st_size,
                                 st.st_blocks, st.st_mtime_ns) for e in entries))
    except OSError:
        return None


def damaged_rows(ctx: AppContext, damaged: Iterable[Mapping[str, Any]]) -> list[list[Any]]:
    """A row for each run folder that lost its config.yaml (:meth:`RunManager.damaged`): no run,
    but what it takes on disk shows, and it can be picked and deleted."""
    rows = []
    roots = [ctx.manager.runs_dir / d["run_id"] for d in damaged]
    for gone in set(ctx.damaged_sizes) - set(roots):  # a deleted folder's size goes
        del ctx.damaged_sizes[gone]
    for root in roots:
        cells = ["–"] * len(HEADERS)
        cells[:2] = root.name, DAMAGED
        # Walked again only when the folder changed, as a run's cells are read (file_cells).
        cells[HEADERS.index("disk")] = read_unless_unchanged(ctx.damaged_sizes, root,
                                                             functools.partial(folder_size, root))
        cells[-1] = DAMAGED_RUN_NOTE
        rows.append(cells)
    return rows


def run_size(ctx: AppContext, run_id: str) -> str:
    """What the run's folder takes on disk: which runs to delete when the disk is full."""
    return folder_size(ctx.manager.paths(run_id).root)


def folder_size(root: Path) -> str:
    from mae_core.diskspace import folder_bytes, size_text

    return size_text(folder_bytes(root))


def data_cell(ctx: AppContext, status: Mapping[str, Any]) -> str:
    """The run's data set in one cell: what it was given (folder, prepared directory or URL), how
    it is read and its image count, from ``<run>/data.json`` (written when the run started; a count
    of another type reads as unknown, :func:`mae_core.datasource.read_run_data`); before that, or if
    it is damaged, the config's folder and the file count found at launch."""
    from mae_core.datasource import read_run_data

    record = read_run_data(ctx.manager.paths(status["run_id"]).root)
    if record:
        given = record.source or "sample photos"
        count = record.count or record.files
        images = f"{count:,} images" if isinstance(count, int) and count > 0 else "images: ?"
        if record.kind == "memory":
            return f"{given} ({images}, in memory)"
        if record.kind == "remote":
            return f"{given} (remote, streamed)"
        return f"{given} ({images}, prepared)"  # (a folder's cached copy: in <run>/data.json)
    try:
        given = ctx.manager.config(status["run_id"]).train.data or "sample photos"
    except Exception:  # noqa: BLE001 - a run without a readable config still gets its row
        return "–"
    files = status.get("data_files")
    return f"{given} ({files:,} files found)" if type(files) is int and files >= 0 else given


def saved_evaluation(ctx: AppContext, run_id: str) -> str:
    """The run's saved evaluation in one cell ("–" if it has none)."""
    from mae_core.evaluate import read_result, summary

    return summary(read_result(ctx.manager.paths(run_id).root))


def delete_run(ctx: AppContext, run_id: str | None, confirmed: bool) -> str:
    run_id = as_run_id(run_id)
    if not run_id:
        raise UserError("Choose a run to delete.")
    # Strictly true: an API client's "false" is a non-empty string, and deleted the run.
    if not as_bool(confirmed, "confirmed"):
        raise UserError(f"Tick “yes, delete” first: deleting {run_id} removes its checkpoints, "
                        "weights and previews for good.")
    ctx.manager.delete(run_id)
    return f"Deleted run `{run_id}`."


def export_run(ctx: AppContext, run_id: str | None) -> tuple[str, str, str]:
    """(encoder file, snippet that loads it with timm, message)."""
    if not run_id:
        raise UserError("Choose a run to export.")
    path, snippet = ctx.manager.export(run_id)
    return str(path), snippet, f"Exported the encoder of `{run_id}` to `{path}`."


def move_in_queue(ctx: AppContext, run_id: str | None, offset: int) -> str:
    if not run_id:
        raise UserError("Choose a queued run to move.")
    position = ctx.manager.move_queued(run_id, offset)
    return f"`{run_id}` is now number {position} in the queue."


def saved_result(ctx: AppContext, run_id: str | None) -> dict[str, Any] | None:
    from mae_core.evaluate import read_result

    return read_result(ctx.manager.paths(run_id).root) if run_id else None


def _below_the_buttons(ctx: AppContext, run_id: str | None, state: str | None,
                       saved: dict[str, Any] | None) -> str:
    """What the panel under the run buttons says of the picked run: its evaluation, or why a
    damaged folder is no run."""
    if run_id is None:
        return ""
    if state == DAMAGED:
        return render.notice("error", f"{run_id}: {DAMAGED_RUN_ERROR}")
    return evaluation_html(saved, run_id)


def no_runs_html(ctx: AppContext) -> str:
    """What an empty table means (an empty grid said nothing), and where runs are looked for: a
    newcomer's first visit, or an app started with another ``--runs-dir``."""
    return render.notice("info", f"No runs in `{ctx.manager.runs_dir}` yet: a run started in the "
                                 "Train tab (or queued there) is listed here.")


def button_states(ctx: AppContext, run_id: str | None, state: str | None,
                  statuses: list[dict] | None = None) -> dict[str, bool]:
    """Which of the run buttons the picked run (``state``: its state) can use. A button that could
    only refuse is greyed out; the handlers still refuse in words (an API client calls them).
    ``statuses``: every run's, read already (the queue's order is found among them)."""
    picked = run_id is not None
    if state == DAMAGED:  # no run: it can only go
        return {"open": False, "evaluate": False, "export": False, "delete": True,
                "sooner": False, "later": False}
    order = ctx.manager.queued(statuses) if state == RunState.QUEUED else []
    place = order.index(run_id) if run_id in order else None  # None: not (or no longer) queued
    weights = picked and ctx.manager.paths(run_id).weights.exists()  # evaluated, exported
    return {"open": picked, "evaluate": weights, "export": weights,
            "delete": picked and state not in LIVE_STATES,
            "sooner": place is not None and place > 0,
            "later": place is not None and place < len(order) - 1}


def refresh(ctx: AppContext, current: str | None, sig: dict | None,
            evaluations: Evaluations | None = None) -> dict[str, Any]:
    """The runs table and the run chooser, when they changed; the run buttons usable for the
    picked run (:func:`button_states`); the running evaluation's progress
    (:func:`evaluation_progress`)."""
    sig = dict(sig or {})
    runs, damaged = ctx.manager.list(), ctx.manager.damaged()
    run_ids = [s["run_id"] for s in runs]
    ids = run_ids + [d["run_id"] for d in damaged]  # a damaged folder is picked only to delete it
    value = current if current in ids else (ids[0] if ids else None)
    rows = table_rows(ctx, runs) + damaged_rows(ctx, damaged)
    out: dict[str, Any] = {}
    if rows != sig.get("rows"):
        out["table"] = rows
    if (ids, value) != sig.get("pick"):
        out["pick"] = gr.update(choices=ids, value=value)
    if run_ids != sig.get("ids"):
        out["compare_runs"] = gr.update(choices=run_ids)
    state = next((s.get("state") for s in runs + damaged if s["run_id"] == value), None)
    saved = saved_result(ctx, value) if value in run_ids else None
    stamp = (value, state if state == DAMAGED else (saved or {}).get("evaluated_at"))
    if stamp != sig.get("evaluation"):
        out["evaluation"] = _below_the_buttons(ctx, value, state, saved)
    if (not ids) != sig.get("empty"):  # said right under the empty table; gone with a first run
        out["empty"] = "" if ids else no_runs_html(ctx)
    enabled = button_states(ctx, value, state, runs)
    for name, on in enabled.items():
        if on != (sig.get("enabled") or {}).get(name):
            out[name] = gr.update(interactive=on)
    sig.update(rows=rows, pick=(ids, value), enabled=enabled, ids=run_ids, evaluation=stamp,
               empty=not ids)
    out.update(evaluation_progress(evaluations, sig))
    out["sig"] = sig
    return out


def build(ctx: AppContext) -> dict[str, Any]:
    """Lay out the Runs tab (inside an open ``gr.Tab``) and wire its events."""
    c: dict[str, Any] = {}
    c["table"] = gr.Dataframe(headers=list(HEADERS), interactive=False, elem_id="runs-table",
                              wrap=True, column_widths=list(COLUMN_WIDTHS))
    c["empty"] = gr.HTML(elem_id="runs-empty")
    with gr.Row():
        # Wide enough for a run id: on a narrow page the buttons wrap below instead.
        c["pick"] = gr.Dropdown([], value=None, label="run", scale=3, min_width=400,
                                elem_id="runs-pick", allow_custom_value=True)
        c["refresh"] = gr.Button("Refresh", scale=1, min_width=90, elem_id="refresh-btn")
        # Short labels: at 800 px "Open in Train & Reconstruct" took three lines (Open shows the
        # run in the Train and Reconstruct tabs and switches to Train).
        # Every run button starts greyed out: the first refresh enables what the picked run allows.
        c["open"] = gr.Button("Open", scale=1, min_width=90, interactive=False, elem_id="open-btn")
        c["export"] = gr.Button("Export encoder", scale=1, min_width=120, interactive=False,
                                elem_id="export-btn")
    with gr.Row():
        # Move the chosen queued run up or down the queue (its place shows in the table's state).
        c["sooner"] = gr.Button("Sooner", scale=1, min_width=90, interactive=False,
                                elem_id="sooner-btn")
        c["later"] = gr.Button("Later", scale=1, min_width=90, interactive=False,
                               elem_id="later-btn")
        c["confirm"] = gr.Checkbox(False, label="yes, delete this run's files (or its place in "
                                   "the queue)", scale=3, elem_id="confirm-delete")
        c["delete"] = gr.Button("Delete run", variant="stop", scale=1, min_width=110,
                                interactive=False, elem_id="delete-btn")
    with gr.Row():
        c["eval_data"] = gr.Textbox("", label="labelled folder to evaluate on (root/<class>/*; "
                                    "empty: the demo set)", scale=3, elem_id="eval-data")
        c["eval_linear"] = gr.Checkbox(False, label="linear probe too", scale=1,
                                       elem_id="eval-linear")
        c["evaluate"] = gr.Button("Evaluate", scale=1, min_width=110, interactive=False,
                                  elem_id="evaluate-btn")
    c["message"] = gr.HTML(elem_id="runs-message")
    c["evaluation"] = gr.HTML(elem_id="runs-evaluation")
    # Shown once exported: empty, the two boxes took ~400 px (a whole phone screen) above
    # Compare. The code scrolls sideways: wrapped, its line numbers no longer matched its lines.
    with gr.Row(visible=False) as c["export_box"]:
        c["export_file"] = gr.File(label="encoder (timm safetensors)", interactive=False,
                                   elem_id="export-file", min_width=240)
        c["export_code"] = gr.Code(language="python", label="load it with timm", wrap_lines=False,
                                   elem_id="export-code")
    c["compare"] = compare.build(ctx, c["pick"])
    c["cache"] = datacache.build(ctx)
    c["sig"] = gr.State(None)
    _wire(ctx, c)
    return c


def _wire(ctx: AppContext, c: dict[str, Any]) -> None:
    error = lambda text: {c["message"]: render.notice("error", text)}  # noqa: E731
    evaluations = Evaluations()

    def on_evaluate(run_id: str | None, data: str | None, linear: bool) -> Iterator[dict]:
        # A generator (progress as it goes), so not @guarded: a refusal ends it as a notice.
        try:
            for update in evaluation_updates(ctx, evaluations, run_id, data, linear):
                yield {c[name]: value for name, value in update.items()}
        except Exception as err:  # noqa: BLE001 - shown to the person, logged if unexpected
            yield error(describe(err, "evaluate"))

    @guarded("the runs list", error)
    def on_refresh(current: str | None, sig: dict | None) -> dict:
        parts = {**c, "compare_runs": c["compare"]["runs"]}
        return {parts[name]: value
                for name, value in refresh(ctx, current, sig, evaluations).items()}

    @guarded("delete", error)
    def on_delete(run_id: str | None, confirmed: bool) -> dict:
        message = delete_run(ctx, run_id, confirmed)
        return {c["message"]: render.notice("ok", message), c["confirm"]: False}

    # A refusal clears the file and the snippet: an API client got gradio's "no change" markers
    # ({"__type__": "update"}) in their place.
    @guarded("export", lambda text: {**error(text), c["export_file"]: None, c["export_code"]: ""})
    def on_export(run_id: str | None) -> dict:
        path, snippet, message = export_run(ctx, run_id)
        return {c["export_file"]: path, c["export_code"]: snippet,
                c["message"]: render.notice("ok", message)}

    c["refresh_event"] = dict(fn=on_refresh, inputs=[c["pick"], c["sig"]],
                              outputs=[c["table"], c["pick"], c["delete"], c["compare"]["runs"],
                                       c["evaluation"], c["empty"], c["sig"], c["message"],
                                       c["sooner"], c["later"], c["open"], c["export"],
                                       c["evaluate"]],
                              show_progress="hidden")
    # Asked for by a person (or an API client): every part, changed or not.
    gr.on([c["refresh"].click, c["pick"].input], lambda current: on_refresh(current, None),
          c["pick"], c["refresh_event"]["outputs"], api_name="list_runs", show_progress="hidden")
    c["table"].select(_pick_row, None, c["pick"], api_name="pick_run_row",
                      show_progress="hidden").then(**c["refresh_event"])
    # A tick is for the run it was given for: picking another one takes it back (it deleted
    # whichever run was picked when Delete was pressed), and the message about the run picked
    # before goes (a refusal went on naming it beside the new pick, ticked).
    gr.on([c["pick"].input, c["table"].select], lambda: (False, ""), None,
          [c["confirm"], c["message"]], show_progress="hidden", queue=False)
    # A file made for one run is not offered under another (the encoder of a vit-tiny run, its
    # timm snippet and metrics.csv stayed under a vit-small run picked after it).
    hidden = gr.update(visible=False)
    c["pick"].change(lambda: (None, "", None, hidden, hidden), None,
                     [c["export_file"], c["export_code"], c["compare"]["csv_file"],
                      c["export_box"], c["compare"]["csv_box"]],
                     api_visibility="private", show_progress="hidden", queue=False)
    c["delete"].click(on_delete, [c["pick"], c["confirm"]], [c["message"], c["confirm"]],
                      api_name="delete_run", concurrency_id="run_actions",
                      show_progress="hidden").then(**c["refresh_event"])
    for name, offset in (("sooner", -1), ("later", 1)):
        c[name].click(guarded("queue", error)(lambda run_id, offset=offset: {
            c["message"]: render.notice("ok", move_in_queue(ctx, run_id, offset))}),
            c["pick"], c["message"], api_name=f"queue_{name}", show_progress="hidden").then(
            **c["refresh_event"])
    # Every press is answered: one made while an evaluation runs says to wait (trigger mode
    # "once" dropped it unsaid; a concurrency limit would queue it until the first one ended).
    # Evaluations itself runs one at a time.
    c["evaluate"].click(on_evaluate, [c["pick"], c["eval_data"], c["eval_linear"]],
                        [c["message"], c["evaluation"]], api_name="evaluate_run",
                        show_progress="hidden", trigger_mode="multiple",
                        concurrency_limit=None).then(**c["refresh_event"])
    c["export"].click(on_export, c["pick"], [c["export_file"], c["export_code"], c["message"]],
                      api_name="export", show_progress_on=[c["message"]]).then(
        lambda path: gr.update(visible=bool(path)), c["export_file"], c["export_box"],
        api_visibility="private", show_progress="hidden")


def _pick_row(evt: gr.SelectData) -> Any:
    row = evt.row_value or []
    return gr.update(value=row[0]) if row else gr.skip()
