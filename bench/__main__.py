"""The benchmark's command line: ``python -m bench [--job train recon app poll] [--out FILE.md]``.

Runs the chosen jobs (all four by default; see :mod:`bench`) in one sitting, prints the Markdown
report and writes it with its JSON twin (:mod:`bench.report`). Exit code 0, or 1 if a training or
reconstruction measurement failed (the app never fails the benchmark), or 2 for bad options,
refused before anything runs. ``python -m bench --gpu`` is the GPU check instead (:mod:`bench.gpu`;
exit 2 where CUDA is absent). ``python -m bench --_worker spec.json`` is one training measurement
(:mod:`bench.worker`), launched by the benchmark itself.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import JOBS
from bench.args import non_negative, positive
from bench.gpu import GPU_BATCH
from bench.worker import WORKER_FLAG

Say = Callable[[str], None]


def _train_options(p: argparse.ArgumentParser) -> None:
    from mae_core.config import PRECISIONS, PRESETS, parse_bool

    p.add_argument("--preset", nargs="+", default=None, choices=list(PRESETS),
                   help="preset(s) to train (default vit-tiny; vit-base with --gpu)")
    p.add_argument("--image-size", type=int, default=None, help="default 64; 224 with --gpu")
    p.add_argument("--patch-size", type=int, default=None, help="default 8; 16 with --gpu")
    p.add_argument("--batch-size", type=positive, default=None,
                   help=f"per process (default 32; {GPU_BATCH} per GPU with --gpu)")
    p.add_argument("--precision", nargs="+", default=None, choices=list(PRECISIONS),
                   help="precision(s) to measure, each its own rows (default: the trainer's "
                        "choice for this machine)")
    p.add_argument("--devices", type=positive, default=None,
                   help="DDP processes (default: the trainer's choice for this machine)")
    p.add_argument("--accelerator", default="auto", choices=("auto", "cpu", "gpu"))
    p.add_argument("--data", default="", help="image folder (default: the embedded sample photos)")
    p.add_argument("--steps", type=positive, default=None,
                   help="measured steps per launch (default 30; 50 with --gpu)")
    p.add_argument("--warmup-steps", type=non_negative, default=5, help="steps excluded first")
    p.add_argument("--repeats", type=positive, default=3, help="launches per recipe (median)")
    p.add_argument("--threads", type=positive, default=None,
                   help="torch threads per training process "
                        "(default: Lightning's, cores/processes)")
    p.add_argument("--num-workers", type=non_negative, default=None,
                   help="loader workers per process for ddp-clean (default: the trainer's choice)")
    p.add_argument("--naive-workers", type=non_negative, default=None,
                   help="loader workers per process for the naive recipe (default: as ddp-clean)")
    p.add_argument("--static-graph", type=parse_bool, default=True,
                   help="TrainConfig.static_graph for ddp-clean: on (default) or off")
    p.add_argument("--compile", action="store_true", help="torch.compile the ddp-clean loss")
    p.add_argument("--decode-on-device", action="store_true",
                   help="prepared sets: decode and crop on the training device "
                        "(TrainConfig.decode_on_device)")
    p.add_argument("--train-timeout", type=float, default=600.0, help="seconds per launch")
    p.add_argument("--keep", action="store_true", help="keep the workers' run directories and logs")


def _other_options(p: argparse.ArgumentParser) -> None:
    from mae_core.config import PRESETS

    p.add_argument("--recon-presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    p.add_argument("--recon-size", type=int, default=224)
    p.add_argument("--recon-patch", type=int, default=16)
    p.add_argument("--recon-runs", type=positive, default=20)
    p.add_argument("--recon-warmup", type=non_negative, default=3)
    p.add_argument("--photo", help="the image file to upload (default: a sample photo as JPEG)")
    p.add_argument("--app-timeout", type=float, default=180.0)
    p.add_argument("--poll-lines", type=positive, default=1_000_000,
                   help="steps in the polled metrics.jsonl (default 1,000,000)")
    p.add_argument("--poll-max-points", type=positive, default=2000,
                   help="points per series sent to the browser (default 2000)")
    p.add_argument("--poll-repeats", type=positive, default=30, help="polls timed per situation")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark MAE Studio: DDP training throughput (ddp-clean vs the naive "
                    "recipe), reconstruction latency, the app's time to serving, and the cost of "
                    "polling a long run's metrics.")
    p.add_argument("--gpu", action="store_true",
                   help="the GPU check instead: a 50-step vit-base 224 px bf16-mixed run on every "
                        "visible GPU, its MFU and the gap to 30%% MFU, written to "
                        "bench/results-gpu.md and .json (exit 2 without CUDA)")
    p.add_argument("--job", nargs="+", default=list(JOBS), choices=JOBS,
                   help="the jobs to run (default: all); the report keeps the others' sections "
                        "from the file it replaces")
    _train_options(p)
    _other_options(p)
    for job in JOBS:
        p.add_argument(f"--skip-{job}", action="store_true", help=f"do not run the {job} job")
    p.add_argument("--fresh", action="store_true",
                   help="do not keep the sections of jobs not run from an existing --out file")
    p.add_argument("--out", default=None, help="the Markdown file to write (default "
                   "bench/results.md; bench/results-gpu.md with --gpu)")
    return p


def _fill_defaults(args: argparse.Namespace) -> None:
    """The defaults that differ between the CPU benchmark and the GPU check (``--gpu``)."""
    from bench.gpu import (GPU_IMAGE_SIZE, GPU_PATCH_SIZE, GPU_PRECISION, GPU_PRESET,
                           GPU_STEPS)

    gpu = args.gpu
    args.preset = args.preset or [GPU_PRESET if gpu else "vit-tiny"]
    args.image_size = args.image_size or (GPU_IMAGE_SIZE if gpu else 64)
    args.patch_size = args.patch_size or (GPU_PATCH_SIZE if gpu else 8)
    args.steps = args.steps or (GPU_STEPS if gpu else 30)
    args.out = args.out or ("bench/results-gpu.md" if gpu else "bench/results.md")
    if gpu:
        args.precision = args.precision or [GPU_PRECISION]


# --- the jobs ---------------------------------------------------------------------------------

def run_train(args: argparse.Namespace, say: Say) -> tuple[list[str], dict, bool]:
    """The training section's lines, its JSON, and whether a recipe failed outright."""
    from bench.sections import training_section
    from bench.training import (RECIPES, TrainSettings, benchmark_training, measurement_name,
                                training_json)
    from mae_core import prepared

    recipes = RECIPES
    if args.data and (prepared.is_prepared(args.data) or prepared.is_remote(args.data)):
        recipes = ("ddp-clean",)  # the naive recipe opens image files: a prepared set has none
        say(f"{args.data} is a prepared data set: the naive recipe (PIL per file) cannot read it, "
            "so only ddp-clean is measured")
    settings, training, failed = [], {}, False
    scratch = Path(tempfile.mkdtemp(prefix="mae-bench-"))
    try:
        for preset, precision in ((p, q) for p in args.preset for q in args.precision or [None]):
            s = TrainSettings(
                preset=preset, image_size=args.image_size, patch_size=args.patch_size,
                batch_size=args.batch_size or 32, devices=args.devices,
                accelerator=args.accelerator, data=args.data, warmup=args.warmup_steps,
                steps=args.steps, threads=args.threads, num_workers=args.num_workers,
                naive_workers=args.naive_workers, static_graph=args.static_graph,
                compile=args.compile, timeout_s=args.train_timeout, precision=precision,
                recipes=recipes, decode_on_device=args.decode_on_device)
            settings.append(s)
            name = measurement_name(s)
            say(f"training: {name} ({args.repeats} × {', '.join(s.recipes)})")
            training[name] = benchmark_training(s, args.repeats, scratch, say)
            failed |= any(not summ.runs for summ in training[name].values())
    finally:
        if args.keep:
            say(f"worker directories kept in {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    return training_section(settings, training, args.repeats), training_json(training), failed


def run_recon(args: argparse.Namespace, say: Say) -> tuple[list[str], list[dict], bool]:
    from bench.reconstruction import benchmark_reconstruction, sample_upload
    from bench.sections import recon_section

    upload, upload_name = sample_upload(args.photo)
    rows, failed = [], False
    for preset in args.recon_presets:
        say(f"reconstruction: {preset}")
        try:
            row = benchmark_reconstruction(preset, args.recon_size, args.recon_patch, upload,
                                           upload_name, args.recon_runs, args.recon_warmup)
            say(f"  p50 {row['p50_ms']:.1f} ms, p95 {row['p95_ms']:.1f} ms")
        except Exception as err:  # noqa: BLE001 - reported in the table
            row = {"preset": preset, "error": f"{type(err).__name__}: {err}"}
            say(f"  FAILED: {row['error']}")
            failed = True
        rows.append(row)
    return recon_section(rows, upload_name, len(upload)), rows, failed


def run_jobs(args: argparse.Namespace, jobs: list[str], say: Say) -> tuple[dict, bool]:
    """Each job's (lines, data), in report order, and whether any measurement failed."""
    from bench.sections import app_section, poll_section

    results: dict[str, tuple[list[str], Any]] = {}
    failed = False
    if "train" in jobs:
        lines, data, bad = run_train(args, say)
        results["train"], failed = (lines, data), failed or bad
    if "recon" in jobs:
        lines, rows, bad = run_recon(args, say)
        results["recon"], failed = (lines, rows), failed or bad
    if "app" in jobs:
        from bench.app_startup import benchmark_app

        say("app: launch to serving")
        app = benchmark_app(args.app_timeout)
        say("  " + (app["error"] if "error" in app else f"{app['serving_s']:.1f} s"))
        results["app"] = (app_section(app), app)
    if "poll" in jobs:
        from bench.poll import PollSettings, benchmark_poll

        say(f"poll: a {args.poll_lines:,}-step metrics.jsonl")
        poll = benchmark_poll(PollSettings(args.poll_lines, args.poll_max_points,
                                           args.poll_repeats), say)
        results["poll"] = (poll_section(poll), poll)
    return results, failed


def _check_presets(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse a model the config would refuse, before any job runs (exit 2, the field named)."""
    from mae_core.config import ConfigError, ModelConfig

    for preset in args.preset:
        try:
            ModelConfig(preset=preset, image_size=args.image_size, patch_size=args.patch_size)
        except ConfigError as err:
            parser.error(str(err))


def gpu_main(args: argparse.Namespace, command: str, say: Say) -> int:
    """``python -m bench --gpu`` (:mod:`bench.gpu`): 2 without CUDA, 1 if the run failed, else 0."""
    from bench.gpu import cuda_missing, run_gpu_check, write_gpu_report
    from bench.report import machine_info, now_utc

    reason = cuda_missing()
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    machine, run_at = machine_info(), now_utc()
    lines, data, failed = run_gpu_check(args, say)
    out = Path(args.out)
    print(write_gpu_report(out, command, machine, lines, data, run_at))
    say(f"written to {out} and {out.with_suffix('.json')}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [WORKER_FLAG]:
        from bench.worker import worker_main

        return worker_main(argv[1])
    parser = build_parser()
    args = parser.parse_args(argv)
    _fill_defaults(args)
    _check_presets(parser, args)
    jobs = [job for job in args.job if not getattr(args, f"skip_{job}")]
    command = shlex.join(["python", "-m", "bench", *argv])
    started = time.perf_counter()

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    if args.gpu:
        return gpu_main(args, command, say)
    from bench.report import Section, machine_info, now_utc, sitting, write_report

    from mae_core.config import ConfigError

    machine, run_at = machine_info(), now_utc()
    try:
        results, failed = run_jobs(args, jobs, say)
    except ConfigError as err:  # e.g. --accelerator gpu where there is none: nothing measured
        parser.exit(2, f"error: {err}\n")
    this_sitting = sitting(command, run_at, machine)
    fresh = {job: Section(job, lines, data, this_sitting) for job, (lines, data) in results.items()}
    out = Path(args.out)
    markdown = write_report(out, command, machine, fresh, run_at, time.perf_counter() - started,
                            keep_previous=not args.fresh)
    print(markdown)
    say(f"written to {out} and {out.with_suffix('.json')}")
    return 1 if failed else 0


if __name__ == "__main__":
    from mae_core.process import exit_quickly

    exit_quickly(main())  # the training workers exit ~1 s sooner
