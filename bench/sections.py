"""The Markdown section of each job's results: a heading, what was measured and how, and a table.

Each function returns the section's lines, heading first; :mod:`bench.report` puts them together.
"""

from __future__ import annotations

from typing import Any

from bench.training import TrainSettings, TrainSummary, measurement_name

MIB = 1024 * 1024
HEADINGS = {
    "train": "## Training throughput",
    "recon": "## Reconstruction latency (one uploaded image, the app's inference path)",
    "app": "## App",
    "poll": "## Polling a long run (the live view's data)",
}
# The note that closes the training section; older reports put it after the App section.
RSS_NOTE = ("Peak RSS is VmHWM at the end of the measured steps (loader worker processes, "
            "if any, not included).")


def fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / MIB:.0f}"


def one_line(text: str, limit: int = 160) -> str:
    """``text`` fit for a table cell: one line, no pipes, at most ``limit`` characters."""
    text = " ".join(text.replace("|", "/").split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def not_run(job: str) -> list[str]:
    return [HEADINGS[job], "",
            f"Not run by this command (`--job` without `{job}`, or `--skip-{job}`)."]


# --- training ---------------------------------------------------------------------------------

_TRAIN_HEADER = ["| Preset | Recipe | Policy | DDP | Data pipeline | Threads/process | "
                 "Loader workers | GFLOP/image | images/s | MFU | peak GFLOP/s per device | "
                 "s/step | images/s range | data wait s/step | peak RSS rank 0 (MiB) |",
                 "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
MFU_NOTE = ("GFLOP/image: one image's training step (3 × the forward pass, counted by "
            "`mae_core.flops`). MFU = images/s × GFLOP/image ÷ (peak × devices). "
            "Peak per device "
            "(one CPU training process with its threads, or one GPU): the trainer's own figure "
            "from `mae_core.hardware`, a 1024² matmul probe of the run's precision on the CPU "
            "(cached per machine), the datasheet's dense figure on a known GPU.")


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def gflops(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value / 1e9:,.{digits}f}"


def _recipe_row(s: TrainSettings, recipe: str, summary: TrainSummary) -> str:
    policy = "ddp-clean" if recipe == "ddp-clean" else "reference"
    from bench.worker import NAIVE_PIPELINE

    fallback = NAIVE_PIPELINE if recipe == "naive" else ""  # a failed launch reported none
    pipeline = summary.runs[0].get("pipeline", fallback) if summary.runs else fallback
    if not summary.runs:
        error = one_line(summary.errors[-1] if summary.errors else "no result")
        return (f"| {s.preset} | {recipe} | {policy} | | {pipeline} | | | | failed | | | "
                f"failed | {error} | | |")
    run = summary.runs[0]
    ddp = (f"find_unused={run['find_unused_parameters']}, static_graph={run['static_graph']}"
           if run["strategy"] == "DDPStrategy" else run["strategy"])
    if recipe == "ddp-clean" and s.compile:
        ddp += ", torch.compile"
    low, high = summary.spread("images_per_s") or (None, None)
    # Each launch's MFU is its images/s scaled by the same constants: the median is the median's.
    images_per_s, peak, utilisation = (summary.median(k) for k in ("images_per_s", "peak_flops",
                                                                    "mfu"))
    return (f"| {s.preset} | {recipe} | {policy} | {ddp} | {pipeline} | "
            f"{run['torch_threads']} | {run['num_workers']} | "
            f"{gflops(run.get('flops_per_image'))} | {fmt(images_per_s)} | {pct(utilisation)} | "
            f"{gflops(peak, 0)} | {fmt(summary.median('s_per_step'), 3)} | "
            f"{fmt(low)}–{fmt(high)} | {fmt(summary.median('wait_s_per_step'), 3)} | "
            f"{mib(summary.median('peak_rss_bytes'))} |")


def _preset_block(s: TrainSettings, summaries: dict[str, TrainSummary], repeats: int) -> list[str]:
    clean, naive = summaries.get("ddp-clean"), summaries.get("naive")
    first = next((r for summ in (clean, naive) if summ for r in summ.runs), None)
    world = first["world_size"] if first else (s.devices or "auto")
    where = (f"{first['accelerator'].replace('Accelerator', '').lower()}, {first['precision']}, "
             f"{first['backend']}") if first else s.accelerator
    files = first.get("files") if first else None
    data = s.data or "embedded sample photos"
    lines = [f"**{s.preset}**, {s.image_size} px, patch {s.patch_size}; batch {s.batch_size} "
             f"per process × {world} processes ({where}); data: {data}"
             f"{f' ({files} files)' if files else ''}; {s.steps} measured steps after "
             f"{s.warmup} warm-up steps; median of {repeats} launches per recipe, alternating.",
             "", *_TRAIN_HEADER]
    lines += [_recipe_row(s, recipe, summary)
              for recipe, summary in (("ddp-clean", clean), ("naive", naive)) if summary]
    ratio = None
    if clean and naive and clean.runs and naive.runs:
        ratio = clean.median("images_per_s") / naive.median("images_per_s")
    if naive is not None:
        lines += [f"| {s.preset} | speed-up (ddp-clean / naive) | | | | | | | "
                  f"{'n/a' if ratio is None else f'{ratio:.2f}×'} | | | | | | |"]
    return lines + [""]


def training_section(settings: list[TrainSettings], training: dict[str, dict[str, TrainSummary]],
                     repeats: int) -> list[str]:
    lines = [HEADINGS["train"], ""]
    for s in settings:
        lines += _preset_block(s, training.get(measurement_name(s), {}), repeats)
    return lines + [MFU_NOTE, "", RSS_NOTE]


# --- reconstruction and the app ---------------------------------------------------------------

def recon_section(recon: list[dict[str, Any]], upload_name: str, upload_bytes: int) -> list[str]:
    lines = [HEADINGS["recon"], "",
             f"Upload: `{upload_name}`, {upload_bytes / 1024:.0f} KiB of JPEG bytes; one request "
             "is `open_rgb` → `reconstruct_uploads` (centre crop, mask, encode, decode, the four "
             "panels and the heat map), the functions the Reconstruct tab calls. Freshly "
             "initialised models (the time does not depend on the weights), saved and loaded "
             "back with `load_model` as the app loads a checkpoint; that load is timed once, "
             "apart, as the app caches loaded models.", "",
             "| Preset | Input | p50 (ms) | p95 (ms) | mean (ms) | runs | torch threads | "
             "load_model (ms) |",
             "|---|---|---|---|---|---|---|---|"]
    for row in recon:
        if "error" in row:
            error = one_line(row["error"])
            lines.append(f"| {row['preset']} | | failed | failed | {error} | | | |")
        else:
            lines.append(f"| {row['preset']} | {row['image_size']} px / patch "
                         f"{row['patch_size']} | {fmt(row['p50_ms'])} | {fmt(row['p95_ms'])} | "
                         f"{fmt(row['mean_ms'])} | {row['runs']} | {row['threads']} | "
                         f"{fmt(row['load_ms'])} |")
    return lines


def app_section(app: dict[str, Any]) -> list[str]:
    lines = [HEADINGS["app"], "", "| Measure | Value |", "|---|---|"]
    if "error" in app:
        lines += [f"| launch to serving (s) | n/a ({one_line(app['error'])}) |",
                  "| peak RSS (MiB) | n/a |"]
    else:
        lines += [f"| launch to serving (s) | {app['serving_s']:.1f} |",
                  f"| peak RSS when serving (MiB) | {mib(app['serving_rss_bytes'])} |",
                  f"| peak RSS once loaded (MiB) | {mib(app['peak_rss_bytes'])} |"]
    return lines + ["", "`python app.py --port P` in a scratch directory, polled every 0.1 s until "
                    "`GET /` answers 200; peak RSS is the app process's VmHWM, when it first "
                    "serves and once its background loading (torch, the run manager) has settled."]


# --- polling ---------------------------------------------------------------------------------

POLLER_LABELS = {"metrics": "data only (`mae_core.metrics`)", "ui": "the Train tab's chart (`ui`)"}
_SITUATION_LABELS = {"idle": "nothing new", "append_1": "after the trainer appended 1 line",
                     "append_100": "after the trainer appended 100 lines"}


def _points(shape: dict[str, Any]) -> str:
    if not shape.get("sent"):
        return "nothing sent (chart unchanged)"
    counts = ", ".join(f"{k} {n:,}" for k, n in shape["payload_points"].items())
    return f"{counts}; {shape['payload_bytes']:,} bytes"


def _ms(value: float) -> str:
    return f"{value:.2f}" if value < 1 else f"{value:.1f}"  # a stat() is microseconds: show it


def _poller_rows(name: str, row: dict[str, Any]) -> list[str]:
    label = POLLER_LABELS.get(name, name)
    if "error" in row:
        return [f"| {label} | failed: {one_line(row['error'])} | | | | |"]
    lines = [f"| {label} | first read (the whole file parsed) | {fmt(row['first_read_ms'], 0)} "
             f"| | | {_points(row['first_read'])} |"]
    for situation, text in _SITUATION_LABELS.items():
        timing = row[situation]
        sent = row["idle_payload"] if situation == "idle" else row["last"]
        p50, p95, mean = (_ms(timing[k]) for k in ("p50_ms", "p95_ms", "mean_ms"))
        lines.append(f"| {label} | {text} | {p50} | {p95} | {mean} | {_points(sent)} |")
    return lines


def _poll_verdict(name: str, row: dict[str, Any], target_ms: float) -> str:
    label = POLLER_LABELS.get(name, name)
    if "error" in row:
        return f"- {label}: not measured ({one_line(row['error'])})."
    verdict = "yes" if row["under_target"] else "**no**"
    return (f"- {label}: {row['description']}. Every poll after the first read under "
            f"{target_ms:.0f} ms at p95: {verdict} (worst p95 {fmt(row['worst_p95_ms'])} ms); "
            f"at most {row['max_points']:,} points per series.")


def poll_section(poll: dict[str, Any]) -> list[str]:
    steps, rows = poll["lines"], poll["rows"]
    lines = [
        HEADINGS["poll"], "",
        f"A run's `metrics.jsonl` of {steps:,} steps ({rows:,} lines with its {rows - steps:,} "
        f"epoch lines, {poll['file_bytes'] / MIB:.1f} MiB) in the trainer's line format, polled "
        f"as the live view polls it; between polls the file grows by the lines the trainer "
        f"appends ({poll['polls']} polls per situation). Load average (1 / 5 / 15 min) "
        f"{poll['load_average_start']} at the start, {poll['load_average_end']} at the end.", "",
        "| Poller | Poll | p50 (ms) | p95 (ms) | mean (ms) | sent to the browser (last poll) |",
        "|---|---|---|---|---|---|"]
    for name, row in poll["pollers"].items():
        lines += _poller_rows(name, row)
    lines.append("")
    lines += [_poll_verdict(name, row, poll["target_ms"]) for name, row in poll["pollers"].items()]
    return lines
