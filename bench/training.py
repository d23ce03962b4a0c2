"""Training throughput: the project's trainer (``ddp-clean``) against the naive recipe.

Both recipes run the same model, data and batch through real Lightning DDP (CPU processes over gloo,
or every GPU), end to end from the image files. ``ddp-clean`` is plain DDP
(``find_unused_parameters=False``, ``static_graph`` as :func:`mae_core.train.make_strategy`
decides) fed by the project's uint8 cache; the naive recipe is the ``reference`` policy under
``find_unused_parameters=True`` fed by a loader that opens every sample with PIL and applies
lightly's ``MAETransform``, as the common examples do. Each measurement is its own
``python -m bench --_worker`` launch (:mod:`bench.worker`; Lightning re-executes it for the other
ranks). Launches alternate between the recipes and the median of the repeats is reported.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import PROJECT_ROOT
from bench.procs import child_env, stop_group
from bench.worker import WORKER_FLAG
from mae_core.rundir import tail_lines

RECIPES = ("ddp-clean", "naive")


@dataclass(frozen=True)
class TrainSettings:
    """One preset's measurement, as the command line asked for it."""

    preset: str
    image_size: int
    patch_size: int
    batch_size: int
    devices: int | None
    accelerator: str
    data: str
    warmup: int
    steps: int
    threads: int | None
    num_workers: int | None
    naive_workers: int | None
    static_graph: bool
    compile: bool
    timeout_s: float
    precision: str | None = None  # None: the trainer's choice for this machine
    decode_on_device: bool = False
    recipes: tuple[str, ...] = RECIPES


def measurement_name(s: TrainSettings) -> str:
    """The key of a measurement in the report: its preset, and its precision where one was asked."""
    return s.preset if s.precision is None else f"{s.preset} {s.precision}"


def overrides(s: TrainSettings, recipe: str) -> dict[str, Any]:
    """The :class:`~mae_core.config.RunConfig` overrides of ``recipe`` under settings ``s``."""
    clean = recipe == "ddp-clean"
    return {
        "preset": s.preset, "image_size": s.image_size, "patch_size": s.patch_size,
        "policy": "ddp-clean" if clean else "reference", "batch_size": s.batch_size,
        "devices": s.devices, "accelerator": s.accelerator, "data": s.data,
        "find_unused_parameters": not clean, "static_graph": s.static_graph,
        "compile": s.compile and clean, "num_workers": s.num_workers, "precision": s.precision,
        "decode_on_device": s.decode_on_device and clean,
        "max_steps": s.warmup + s.steps, "num_previews": 0,
        "checkpoint_every_n_steps": 10**9, "log_every_n_steps": 1,
    }


def _resolved_workers(s: TrainSettings) -> int:
    from mae_core.config import RunConfig

    cfg = RunConfig().with_overrides(**overrides(s, "ddp-clean")).resolved()
    return int(cfg.train.num_workers or 0)


def _launch(s: TrainSettings, spec_path: Path, log_path: Path) -> int | str:
    """Run the worker to its end; its exit code, or why it was stopped."""
    extra = {"OMP_NUM_THREADS": str(s.threads)} if s.threads else {}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "bench", WORKER_FLAG, str(spec_path)],
                                cwd=PROJECT_ROOT, env=child_env(**extra), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=s.timeout_s)
        except subprocess.TimeoutExpired:
            stop_group(proc, grace_s=5.0)
            return f"timed out after {s.timeout_s:.0f} s"
        except BaseException:
            stop_group(proc, grace_s=2.0)
            raise


def _rank_results(workdir: Path) -> dict[int, dict[str, Any]]:
    results = {}
    for path in sorted(workdir.glob("result.rank*.json")):
        try:
            row = json.loads(path.read_text())
            results[int(row["rank"])] = row
        except (OSError, ValueError, KeyError):
            continue
    return results


def run_measurement(s: TrainSettings, recipe: str, workdir: Path) -> dict[str, Any]:
    """One launch of the trainer for ``recipe``; rank 0's timings, or ``{"error": ...}``."""
    workdir.mkdir(parents=True, exist_ok=True)
    naive_workers = s.naive_workers if s.naive_workers is not None else _resolved_workers(s)
    spec = {"recipe": recipe, "overrides": overrides(s, recipe), "warmup": s.warmup,
            "steps": s.steps, "threads": s.threads, "naive_workers": naive_workers,
            "run_dir": str(workdir / "run"), "result": str(workdir / "result.json")}
    spec_path = workdir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    log_path = workdir / "worker.log"
    started = time.perf_counter()
    rc = _launch(s, spec_path, log_path)
    results = _rank_results(workdir)
    if rc != 0 or 0 not in results:
        return {"error": f"worker exit {rc}; log tail:\n{tail_lines(log_path, 25)}"}
    out = step_figures(results[0])
    out["launch_s"] = time.perf_counter() - started
    out["peak_rss_all_ranks_bytes"] = [results[r].get("peak_rss_bytes") for r in sorted(results)]
    return {**out, **_model_figures(s, workdir / "run", out["images_per_s"], out["world_size"])}


def step_figures(rank0: dict[str, Any]) -> dict[str, Any]:
    """Rank 0's timings with images/s, s/step and the data wait per step added."""
    out = dict(rank0)
    images = out["batch_size"] * out["world_size"] * out["steps"]
    out["images_per_s"] = images / out["window_s"]
    out["s_per_step"] = out["window_s"] / out["steps"]
    # The mean, not the median: workers each deliver a whole batch, so a loader slower than the
    # step shows as a few long waits between runs of ready batches, which a median hid (a
    # loader-bound GPU run read 0.001 s/step).
    out["wait_s_per_step"] = statistics.fmean(out["wait_s"])
    return out


def _model_figures(s: TrainSettings, run_dir: Path, images_per_s: float, world_size: int
                   ) -> dict[str, Any]:
    """What was trained and how close it came to the hardware: the trainer's own FLOPs per image
    and peak FLOP/s (from the run's ``status.json``), and the MFU of the measured images/s."""
    from mae_core.hardware import mfu
    from mae_core.rundir import RunPaths

    status = RunPaths(run_dir).read_status()
    flops, peak = status.get("flops_per_image"), status.get("peak_flops")
    return {"preset": s.preset, "image_size": s.image_size, "patch_size": s.patch_size,
            "flops_per_image": flops, "peak_flops": peak,
            "mfu": mfu(images_per_s, flops, peak, world_size)}


@dataclass
class TrainSummary:
    """Every launch of one preset and recipe: the successful ones and why the others failed."""

    preset: str
    recipe: str
    runs: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def median(self, key: str) -> float | None:
        values = [r[key] for r in self.runs if r.get(key) is not None]
        return statistics.median(values) if values else None

    def spread(self, key: str) -> tuple[float, float] | None:
        values = [r[key] for r in self.runs if r.get(key) is not None]
        return (min(values), max(values)) if values else None


def probe_cpu_peak(s: TrainSettings) -> str | None:
    """Probe the CPU peak the workers will divide by, before they start: with this benchmark's
    own processes idle, the best figure for the cache (:func:`mae_core.hardware.cpu_peak` keeps
    the highest probe). Returns what was probed, in words; None on a GPU (datasheet figures)."""
    import os

    import torch

    from mae_core.config import ConfigError, RunConfig
    from mae_core.hardware import cpu_peak, matmul_type

    try:
        t = RunConfig().with_overrides(**overrides(s, "ddp-clean")).resolved().train
    except ConfigError:
        return None  # the workers refuse the same config, and the report says why
    if t.accelerator != "cpu":
        return None
    # Lightning gives each CPU process cores // processes threads, unless told (--threads).
    threads = s.threads or max(1, (os.cpu_count() or 1) // (t.devices or 1))
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # as run_training sets it: the same cache entry
    try:
        peak = cpu_peak(matmul_type(t.precision, "cpu"), threads=threads, refresh=True)
    finally:
        torch.set_float32_matmul_precision(before)
    if peak.flops is None:
        return f"no {peak.dtype} peak: this CPU has no native {peak.dtype}"
    return f"peak {peak.dtype}, {threads} thread(s): {peak.flops / 1e9:,.0f} GFLOP/s (best probe)"


def benchmark_training(s: TrainSettings, repeats: int, root: Path,
                       say: Callable[[str], None] = print) -> dict[str, TrainSummary]:
    """``repeats`` launches of each recipe, alternating; one summary per recipe."""
    probed = probe_cpu_peak(s)
    if probed:
        say(f"  {probed}")
    summaries = {recipe: TrainSummary(s.preset, recipe) for recipe in s.recipes}
    for repeat in range(repeats):
        # Alternate the recipes so slow drift (another job on the machine) hits both alike.
        order = s.recipes if repeat % 2 == 0 else s.recipes[::-1]
        for recipe in order:
            result = run_measurement(s, recipe, root / f"{s.preset}-{recipe}-{repeat}")
            summary = summaries[recipe]
            if "error" in result:
                summary.errors.append(result["error"])
                say(f"  {s.preset} {recipe} #{repeat + 1}: FAILED\n{result['error']}")
            else:
                summary.runs.append(result)
                mfu = "n/a" if result["mfu"] is None else f"{100 * result['mfu']:.1f}%"
                say(f"  {s.preset} {recipe} #{repeat + 1}: {result['images_per_s']:.1f} images/s, "
                    f"MFU {mfu}, {result['s_per_step']:.3f} s/step "
                    f"(wait {result['wait_s_per_step']:.3f}), launch {result['launch_s']:.1f} s")
    return summaries


def step_quantiles(runs: list[dict[str, Any]]) -> dict[str, float] | None:
    """The measured steps' durations over every launch (host clock): a pace that is slow
    throughout reads a high median; one held up now and then (a flush, a save, a loader that
    runs dry) reads a median near the model's step and a long p90 or longest step."""
    steps = sorted(x for run in runs for x in run.get("step_s") or [])
    if not steps:
        return None

    def at(share: float) -> float:
        return steps[min(len(steps) - 1, int(share * len(steps)))]

    return {"p10": at(0.1), "p50": statistics.median(steps), "p90": at(0.9), "max": steps[-1]}


def training_json(training: dict[str, dict[str, TrainSummary]]) -> dict[str, Any]:
    """Machine-readable results: medians per measurement (a preset, or ``"<preset> <precision>"``)
    and recipe, and the speed-up. Each recipe's row says what ran (preset, image and patch size,
    precision) and how close to the hardware: FLOPs per image, peak FLOP/s per device, MFU."""
    from mae_core.hardware import mfu

    out: dict[str, Any] = {}
    for name, summaries in training.items():
        row: dict[str, Any] = {}
        for recipe, summary in summaries.items():
            first = summary.runs[0] if summary.runs else {}
            images_per_s, peak = summary.median("images_per_s"), summary.median("peak_flops")
            row[recipe] = {
                **{k: first.get(k) for k in ("preset", "image_size", "patch_size", "precision",
                                             "flops_per_image")},  # what ran
                "images_per_s": images_per_s, "peak_flops": peak,
                "mfu": mfu(images_per_s, first.get("flops_per_image"), peak,
                           first.get("world_size") or 1),
                "s_per_step": summary.median("s_per_step"),
                "step_s_quantiles": step_quantiles(summary.runs),
                "wait_s_per_step": summary.median("wait_s_per_step"),
                "peak_rss_bytes": summary.median("peak_rss_bytes"),
                "launches": len(summary.runs), "errors": summary.errors,
                **{k: first.get(k) for k in ("world_size", "strategy", "find_unused_parameters",
                                             "static_graph", "backend", "accelerator",
                                             "batch_size", "num_workers")},
            }
        clean, naive = row.get("ddp-clean", {}), row.get("naive", {})
        if clean.get("images_per_s") and naive.get("images_per_s"):
            row["speedup"] = clean["images_per_s"] / naive["images_per_s"]
        out[name] = row
    return out
