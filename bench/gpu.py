"""The one-command GPU check, ``python -m bench --gpu``: how close to the GPUs' limit training runs.

A 50-step vit-base 224 px / patch 16 ``bf16-mixed`` run of the project's trainer on every visible
GPU (DDP over NCCL, through the same :mod:`bench.worker` launch as the CPU benchmark), then the
throughput table: images/s, the FLOPs per image, each GPU's peak (datasheet and measured), the MFU
and the gap to the target of 30% MFU (on an H100, ~5,000 images/s per GPU), with the clocks,
power and slowdown reasons the GPUs ran at (:mod:`bench.gpuclocks`). Written to
``bench/results-gpu.md`` and ``bench/results-gpu.json``, beside the CPU figures. Without CUDA it
measures nothing and exits 2 with the reason.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.gpuclocks import ClockSampler, clock_lines
from bench.training import TrainSettings, benchmark_training, measurement_name, training_json

TARGET_MFU = 0.30
GPU_PRESET, GPU_IMAGE_SIZE, GPU_PATCH_SIZE = "vit-base", 224, 16
GPU_BATCH = 256  # per GPU: MAE's encoder sees a quarter of the patches, so this fits 40 GB
GPU_STEPS = 50
GPU_PRECISION = "bf16-mixed"


def cuda_missing() -> str | None:
    """Why the GPU check cannot run here, or None where CUDA is available."""
    import torch

    if torch.cuda.is_available():
        return None
    built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    return (f"python -m bench --gpu needs a CUDA GPU: torch {torch.__version__} ({built}) sees "
            "none (torch.cuda.is_available() is False). Run it on a machine with NVIDIA GPUs "
            "and their driver; the CPU benchmark is plain `python -m bench`.")


def gpu_settings(args: argparse.Namespace, precision: str) -> TrainSettings:
    """The check's measurement: every visible GPU unless ``--devices`` says fewer."""
    return TrainSettings(
        preset=args.preset[0], image_size=args.image_size, patch_size=args.patch_size,
        batch_size=args.batch_size or GPU_BATCH, devices=args.devices, accelerator="gpu",
        data=args.data, warmup=args.warmup_steps, steps=args.steps, threads=args.threads,
        num_workers=args.num_workers, naive_workers=None, static_graph=args.static_graph,
        compile=args.compile, timeout_s=args.train_timeout, precision=precision,
        recipes=("ddp-clean",), decode_on_device=args.decode_on_device)


def _peaks(dtype: str) -> list[dict[str, Any]]:
    """Each visible GPU's datasheet and measured matmul peak (the measured one cached)."""
    import torch

    from mae_core.hardware import gpu_peak

    return [gpu_peak(dtype, index=i).to_dict() for i in range(torch.cuda.device_count())]


def check_rows(training: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per measurement: throughput, MFU and what 30% MFU would take."""
    rows = []
    for name, recipes in training.items():
        row = dict(recipes.get("ddp-clean") or {})
        gpus = row.get("world_size") or 1
        per_gpu = row["images_per_s"] / gpus if row.get("images_per_s") else None
        target = (TARGET_MFU * row["peak_flops"] / row["flops_per_image"]
                  if row.get("peak_flops") and row.get("flops_per_image") else None)
        rows.append({**row, "name": name, "images_per_s_per_gpu": per_gpu,
                     "target_mfu": TARGET_MFU, "target_images_per_s_per_gpu": target,
                     "speedup_to_target": target / per_gpu if target and per_gpu else None})
    return rows


def _gap(row: dict[str, Any]) -> str:
    needed = row.get("speedup_to_target")
    if needed is None:
        return "n/a"
    if needed <= 1:
        return f"meets {TARGET_MFU:.0%} MFU ({1 / needed:.2f}× the target)"
    return f"{needed:.2f}× short of {TARGET_MFU:.0%} MFU"


def check_table(rows: list[dict[str, Any]], peaks: list[dict[str, Any]]) -> list[str]:
    """The Markdown throughput table with MFU and the gap to the target."""
    from bench.sections import fmt, gflops, pct

    measured = ", ".join(gflops(p.get("measured"), 0) for p in peaks) or "n/a"
    lines = ["## GPU check: throughput against the hardware", "",
             "| Measurement | GPUs | Precision | batch/GPU | images/s | images/s per GPU | "
             "GFLOP/image | peak TFLOP/s per GPU (used) | MFU | images/s per GPU at "
             f"{TARGET_MFU:.0%} MFU | gap |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        peak = "n/a" if not row.get("peak_flops") else f"{row['peak_flops'] / 1e12:,.0f}"
        lines.append(
            f"| {row['name']} ({row.get('image_size')} px / patch {row.get('patch_size')}) | "
            f"{row.get('world_size')} | {row.get('precision')} | {row.get('batch_size')} | "
            f"{fmt(row.get('images_per_s'))} | {fmt(row.get('images_per_s_per_gpu'))} | "
            f"{gflops(row.get('flops_per_image'), 1)} | {peak} | {pct(row.get('mfu'))} | "
            f"{fmt(row.get('target_images_per_s_per_gpu'), 0)} | {_gap(row)} |")
    for row in rows:
        steps = row.get("step_s_quantiles")
        if steps:
            lines += ["", f"Step times of {row['name']} (host clock, s): p10 {steps['p10']:.3f}, "
                      f"median {steps['p50']:.3f}, p90 {steps['p90']:.3f}, longest "
                      f"{steps['max']:.3f}."]
    names = ", ".join(f"{p['name']} ({p['source']})" for p in peaks) or "none"
    dtype = peaks[0]["dtype"] if peaks else "matmul"
    lines += ["", f"GPUs: {names}. The peak used is the datasheet's dense figure where the GPU is "
              f"known, else the measured one; measured {dtype} 8192² matmul peak per GPU: "
              f"{measured} GFLOP/s."]
    return lines


def run_gpu_check(args: argparse.Namespace, say: Callable[[str], None]
                  ) -> tuple[list[str], dict[str, Any], bool]:
    """Measure; the report's lines, its JSON and whether the run failed."""
    from bench.sections import training_section
    from mae_core.hardware import matmul_type

    settings = [gpu_settings(args, precision) for precision in args.precision]
    scratch = Path(tempfile.mkdtemp(prefix="mae-bench-gpu-"))
    summaries, clocks = {}, {}
    try:
        for s in settings:
            name = measurement_name(s)
            say(f"GPU check: {name}, {s.image_size} px, {s.steps} steps")
            with ClockSampler() as sampler:
                summaries[name] = benchmark_training(s, 1, scratch, say)
            clocks[name] = sampler.summary()
    finally:
        if args.keep:
            say(f"worker directories kept in {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    training = training_json(summaries)
    peaks = _peaks(matmul_type(args.precision[0], "cuda"))
    rows = check_rows(training)
    lines = check_table(rows, peaks) + [""]
    for name, sampled in clocks.items():
        lines += clock_lines(name, sampled) + [""]
    lines += training_section(settings, summaries, 1)
    failed = any(not summary.runs for recipes in summaries.values() for summary in recipes.values())
    return lines, {"target_mfu": TARGET_MFU, "rows": rows, "peaks": peaks, "clocks": clocks,
                   "training": training}, failed


def write_gpu_report(out: Path, command: str, machine: dict[str, str], lines: list[str],
                     data: dict[str, Any], run_at: str) -> str:
    """``out`` (Markdown) and its ``.json`` twin, written atomically; the Markdown."""
    from bench.sections import one_line
    from mae_core.fileio import atomic_write_json, atomic_write_text

    head = ["# MAE Studio GPU check", "", f"Command: `{command}`", "", f"Run {run_at}.", "",
            "## Machine", "", "| Item | Value |", "|---|---|"]
    head += [f"| {k} | {one_line(v)} |" for k, v in machine.items()]
    markdown = "\n".join(head + [""] + lines) + "\n"
    atomic_write_text(out, markdown)
    atomic_write_json(out.with_suffix(".json"), {"command": command, "run_at": run_at,
                                                 "machine": machine, **data})
    return markdown
