"""The benchmark: ``python -m mae_core.bench [--preset vit-tiny ...] [--out bench/results.md]``.

Measures, in one sitting, on this machine:

1. **Training throughput** of the project's trainer (:func:`mae_core.train.run_training`) with the
   ``ddp-clean`` policy (plain DDP, ``find_unused_parameters=False``, ``static_graph`` as
   :func:`~mae_core.train.make_strategy` decides, images decoded once and cached as uint8) against
   the **naive recipe** on the same model, data and batch: the ``reference`` policy under
   ``ddp_find_unused_parameters_true``, fed by a loader that opens every sample from disk with PIL
   and applies lightly's ``MAETransform`` (normalised float tensors made on the CPU), as the common
   examples do. Both run through real Lightning DDP (CPU processes over gloo, or every GPU), end to
   end from the image files. Each measurement is its own ``python -m mae_core.bench --_worker``
   launch (Lightning re-executes the command for the other ranks); a callback on every rank
   records per-step wall times after the warm-up steps and the peak RSS, and writes them to JSON.
   Launches alternate between the two recipes and the median of the repeats is reported.
2. **Reconstruction latency** of one uploaded photo through the app's inference path (JPEG bytes →
   :func:`~mae_core.images.open_rgb` → :func:`~mae_core.images.center_square` →
   :func:`~mae_core.reconstruct.reconstruct` → :func:`~mae_core.reconstruct.panels`), per preset.
3. **The app's time from launch to serving** (``python app.py --port P`` until ``/`` answers 200)
   and its peak RSS. If ``app.py`` is missing or fails, the table says ``n/a`` and why.

The results go to a Markdown file (``bench/results.md``) with the machine, the library versions and
the exact command, and to stdout. Exit code 0, or 1 if a training or reconstruction measurement
failed (the app never fails the benchmark).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mae_core.rundir import tail_lines

PROJECT_ROOT = Path(__file__).resolve().parents[1]
WORKER_FLAG = "--_worker"
RECIPES = ("ddp-clean", "naive")
# Variables of an enclosing distributed job that would make a worker think it is a launched rank.
_DDP_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE",
            "MASTER_ADDR", "MASTER_PORT", "MAE_STUDIO_RUN_DIR")
MIB = 1024 * 1024


# --- the naive recipe's data ------------------------------------------------------------------

def _naive_dataset_class() -> type:
    """The naive recipe's dataset (built lazily: the parent need not import torch)."""
    from lightly.transforms import MAETransform
    from torch.utils.data import Dataset
    from torchvision.datasets.folder import pil_loader

    class NaiveImageDataset(Dataset):
        """What the common examples do: every item opens its file with PIL and applies lightly's
        ``MAETransform`` (random resized crop, flip, ``ToTensor``, ``Normalize``) on the CPU."""

        def __init__(self, paths: list[Path], image_size: int, length: int | None = None) -> None:
            self.paths = [str(p) for p in paths]
            self.transform = MAETransform(input_size=image_size)
            self.num_images = len(self.paths)
            self.skipped = 0
            self.length = max(self.num_images, length or 0)

        def __len__(self) -> int:
            return self.length

        def __getitem__(self, index: int) -> Any:
            image = pil_loader(self.paths[index % self.num_images])
            return self.transform(image)[0]  # MAETransform returns a list of one view

    return NaiveImageDataset


# --- the worker: one training measurement (every DDP rank runs this) ----------------------------

def peak_rss_bytes(pid: int | str = "self") -> int | None:
    """The process's peak resident set (VmHWM), or None where /proc cannot tell."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if pid == "self":
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return None


def _step_timer(warmup: int, steps: int, result: Path) -> Any:
    import pytorch_lightning as pl
    import torch

    class StepTimer(pl.Callback):
        """Wall time of every step on this rank; after ``warmup + steps`` steps writes its JSON."""

        def __init__(self) -> None:
            self.starts: list[float] = []
            self.marks: list[float] = []  # train start, then the end of every step
            self.info: dict[str, Any] = {}

        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            strategy = trainer.strategy
            ddp = dict(getattr(strategy, "_ddp_kwargs", {}) or {})
            self.info = {
                "rank": trainer.global_rank, "world_size": trainer.world_size,
                "strategy": type(strategy).__name__,
                "find_unused_parameters": bool(ddp.get("find_unused_parameters", False)),
                "static_graph": bool(ddp.get("static_graph", False)),
                "backend": getattr(strategy, "process_group_backend", None),
                "accelerator": type(trainer.accelerator).__name__,
                "precision": str(trainer.precision),
                "torch_threads": torch.get_num_threads(),
                "batch_size": trainer.datamodule.batch_size,
                "num_workers": trainer.datamodule.num_workers,
                "files": getattr(trainer.datamodule.dataset, "num_images", None),
            }
            self.marks = [time.perf_counter()]

        def on_train_batch_start(self, *args: Any) -> None:
            self.starts.append(time.perf_counter())

        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            self.marks.append(time.perf_counter())
            if len(self.marks) - 1 == warmup + steps:
                self.write()

        def write(self) -> None:
            window = self.marks[warmup:warmup + steps + 1]
            step_s = [b - a for a, b in zip(window, window[1:])]
            # start of step i minus end of step i-1: fetching the batch (and Lightning's loop).
            wait_s = [self.starts[i] - self.marks[i] for i in range(warmup, warmup + steps)]
            payload = {**self.info, "warmup": warmup, "steps": steps, "step_s": step_s,
                       "wait_s": wait_s, "window_s": window[-1] - window[0],
                       "startup_to_first_step_s": self.marks[1] - self.marks[0],
                       "peak_rss_bytes": peak_rss_bytes()}
            path = result.with_name(f"{result.stem}.rank{self.info['rank']}.json")
            path.write_text(json.dumps(payload))

    return StepTimer()


def worker_main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    import torch

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    from mae_core.config import RunConfig
    from mae_core.rundir import RunPaths
    from mae_core.train import run_training

    cfg = RunConfig().with_overrides(**spec["overrides"]).resolved()
    paths = RunPaths(Path(spec["run_dir"]))
    paths.root.mkdir(parents=True, exist_ok=True)
    data = None
    if spec["recipe"] == "naive":
        from mae_core.data import MAEDataModule

        t = cfg.train
        data = MAEDataModule(t.data, cfg.model.image_size, t.batch_size, int(spec["naive_workers"]),
                             pin_memory=t.accelerator == "gpu",
                             dataset_factory=_naive_dataset_class())
    timer = _step_timer(int(spec["warmup"]), int(spec["steps"]), Path(spec["result"]))
    return run_training(cfg, paths, datamodule=data, extra_callbacks=[timer])


# --- the parent: launching measurements -------------------------------------------------------

def _child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _DDP_ENV}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def _stop_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """End the process group this benchmark started for ``proc`` (SIGTERM, then SIGKILL)."""
    if proc.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


@dataclass
class TrainSettings:
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


def _overrides(s: TrainSettings, recipe: str) -> dict[str, Any]:
    clean = recipe == "ddp-clean"
    return {
        "preset": s.preset, "image_size": s.image_size, "patch_size": s.patch_size,
        "policy": "ddp-clean" if clean else "reference", "batch_size": s.batch_size,
        "devices": s.devices, "accelerator": s.accelerator, "data": s.data,
        "find_unused_parameters": not clean, "static_graph": s.static_graph,
        "compile": s.compile and clean, "num_workers": s.num_workers,
        "max_steps": s.warmup + s.steps, "num_previews": 0,
        "checkpoint_every_n_steps": 10**9, "log_every_n_steps": 1,
    }


def _resolved_workers(s: TrainSettings) -> int:
    from mae_core.config import RunConfig

    cfg = RunConfig().with_overrides(**_overrides(s, "ddp-clean")).resolved()
    return int(cfg.train.num_workers or 0)


def run_measurement(s: TrainSettings, recipe: str, workdir: Path) -> dict[str, Any]:
    """One launch of the trainer for ``recipe``; rank 0's timings, or ``{"error": ...}``."""
    workdir.mkdir(parents=True, exist_ok=True)
    naive_workers = s.naive_workers if s.naive_workers is not None else _resolved_workers(s)
    spec = {"recipe": recipe, "overrides": _overrides(s, recipe), "warmup": s.warmup,
            "steps": s.steps, "threads": s.threads, "naive_workers": naive_workers,
            "run_dir": str(workdir / "run"), "result": str(workdir / "result.json")}
    spec_path = workdir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    log_path = workdir / "worker.log"
    extra = {"OMP_NUM_THREADS": str(s.threads)} if s.threads else {}
    started = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "mae_core.bench", WORKER_FLAG, str(spec_path)],
                                cwd=PROJECT_ROOT, env=_child_env(**extra), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc: int | str = proc.wait(timeout=s.timeout_s)
        except subprocess.TimeoutExpired:
            _stop_group(proc, grace_s=5.0)
            rc = f"timed out after {s.timeout_s:.0f} s"
        except BaseException:
            _stop_group(proc, grace_s=2.0)
            raise
    ranks = sorted(workdir.glob("result.rank*.json"))
    results = {}
    for path in ranks:
        try:
            row = json.loads(path.read_text())
            results[int(row["rank"])] = row
        except (OSError, ValueError, KeyError):
            continue
    if rc != 0 or 0 not in results:
        return {"error": f"worker exit {rc}; log tail:\n{tail_lines(log_path, 25)}"}
    out = dict(results[0])
    out["launch_s"] = time.perf_counter() - started
    out["peak_rss_all_ranks_bytes"] = [results[r].get("peak_rss_bytes") for r in sorted(results)]
    images = out["batch_size"] * out["world_size"] * out["steps"]
    out["images_per_s"] = images / out["window_s"]
    out["s_per_step"] = out["window_s"] / out["steps"]
    out["wait_s_per_step"] = statistics.median(out["wait_s"])
    return out


@dataclass
class TrainSummary:
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


def benchmark_training(s: TrainSettings, repeats: int, root: Path,
                       say: Any = print) -> dict[str, TrainSummary]:
    summaries = {recipe: TrainSummary(s.preset, recipe) for recipe in RECIPES}
    for repeat in range(repeats):
        # Alternate the recipes so slow drift (another job on the machine) hits both alike.
        order = RECIPES if repeat % 2 == 0 else RECIPES[::-1]
        for recipe in order:
            result = run_measurement(s, recipe, root / f"{s.preset}-{recipe}-{repeat}")
            summary = summaries[recipe]
            if "error" in result:
                summary.errors.append(result["error"])
                say(f"  {s.preset} {recipe} #{repeat + 1}: FAILED\n{result['error']}")
            else:
                summary.runs.append(result)
                say(f"  {s.preset} {recipe} #{repeat + 1}: {result['images_per_s']:.1f} images/s, "
                    f"{result['s_per_step']:.3f} s/step (wait {result['wait_s_per_step']:.3f}), "
                    f"launch {result['launch_s']:.1f} s")
    return summaries


# --- reconstruction latency -------------------------------------------------------------------

def sample_upload(path: str | None = None) -> tuple[bytes, str]:
    """The bytes of the photo to "upload": ``path`` as is, or the first sample photo as a JPEG."""
    if path:
        return Path(path).read_bytes(), Path(path).name
    import io

    from mae_core.data import find_images
    from mae_core.images import open_rgb

    source = find_images("")[0]
    image = open_rgb(source)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue(), f"{source.stem}.jpg"


def _percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values), q))


def benchmark_reconstruction(preset: str, image_size: int, patch_size: int, upload: bytes,
                             runs: int, warmup: int) -> dict[str, Any]:
    import torch

    from mae_core.config import ModelConfig
    from mae_core.images import center_square, open_rgb
    from mae_core.model import MaskedAutoencoder
    from mae_core.reconstruct import panels, reconstruct

    cfg = ModelConfig(preset=preset, image_size=image_size, patch_size=patch_size)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        torch.manual_seed(0)
        built = time.perf_counter()
        model = MaskedAutoencoder(cfg).eval()
        build_s = time.perf_counter() - built

        def once() -> None:
            image = open_rgb(upload, name="upload.jpg")
            square = center_square(image, cfg.image_size)
            [result] = reconstruct(model, square[None], seed=0)
            pictures = panels(result)
            assert len(pictures) == 4 and pictures[0].size == (cfg.image_size, cfg.image_size)

        for _ in range(warmup):
            once()
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            once()
            times.append(time.perf_counter() - started)
        return {"preset": preset, "image_size": image_size, "patch_size": patch_size,
                "p50_ms": 1000 * _percentile(times, 50), "p95_ms": 1000 * _percentile(times, 95),
                "mean_ms": 1000 * statistics.fmean(times), "runs": runs, "warmup": warmup,
                "threads": torch.get_num_threads(), "build_s": build_s}
    finally:
        torch.set_num_threads(threads_before)


# --- the app ----------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def benchmark_app(timeout_s: float, app: Path | None = None) -> dict[str, Any]:
    """Seconds from ``python app.py --port P`` to HTTP 200 on ``/``, and the app's peak RSS.

    The app runs in a scratch working directory (so its runs folder is an empty one of its own)
    and is always terminated. Any failure is returned as ``{"error": ...}``, never raised.
    """
    app = app or PROJECT_ROOT / "app.py"
    if not app.is_file():
        return {"error": "app.py not found"}
    scratch = Path(tempfile.mkdtemp(prefix="mae-bench-app-"))
    log_path = scratch / "app.log"
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    no_proxy = ",".join(p for p in ("127.0.0.1", "localhost", os.environ.get("NO_PROXY", "")) if p)
    env = _child_env(GRADIO_ANALYTICS_ENABLED="False", NO_PROXY=no_proxy, no_proxy=no_proxy)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    proc = None
    try:
        with open(log_path, "w") as log:
            started = time.perf_counter()
            proc = subprocess.Popen([sys.executable, str(app), "--port", str(port)], cwd=scratch,
                                    env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            while True:
                if proc.poll() is not None:
                    return {"error": f"app exited with code {proc.returncode} before serving; "
                                     f"log tail:\n{tail_lines(log_path, 12)}"}
                elapsed = time.perf_counter() - started
                if elapsed > timeout_s:
                    return {"error": f"no HTTP 200 from {url} within {timeout_s:.0f} s; log tail:\n"
                                     f"{tail_lines(log_path, 12)}"}
                try:
                    with opener.open(url, timeout=2) as response:
                        if response.status == 200:
                            break
                except (urllib.error.URLError, OSError, ValueError):
                    pass
                time.sleep(0.1)
            serving_s = time.perf_counter() - started
            serving_rss = peak_rss_bytes(proc.pid)
            return {"serving_s": serving_s, "serving_rss_bytes": serving_rss,
                    "peak_rss_bytes": _settled_peak_rss(proc.pid), "port": port}
    except Exception as err:  # noqa: BLE001 - the app part must never stop the benchmark
        return {"error": f"{type(err).__name__}: {err}"}
    finally:
        if proc is not None:
            _stop_group(proc)


def _settled_peak_rss(pid: int, quiet_s: float = 3.0, timeout_s: float = 60.0) -> int | None:
    """Peak RSS once the app has finished loading in the background (torch, the run manager):
    the first value that has not grown for ``quiet_s``."""
    peak, since, deadline = peak_rss_bytes(pid), time.monotonic(), time.monotonic() + timeout_s
    while time.monotonic() < deadline and time.monotonic() - since < quiet_s:
        time.sleep(0.25)
        now = peak_rss_bytes(pid)
        if now is None:
            break
        if now != peak:
            peak, since = now, time.monotonic()
    return peak


# --- the machine and the report ---------------------------------------------------------------

def machine_info() -> dict[str, str]:
    import importlib.metadata as metadata

    import torch

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or "unknown"
    ram = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = f"{int(line.split()[1]) / 1024**2:.1f} GiB"
    except (OSError, ValueError):
        pass
    gpus = torch.cuda.device_count()
    gpu = (", ".join(f"{torch.cuda.get_device_name(i)}" for i in range(gpus)) if gpus else "none")
    info = {"CPU": cpu, "cores": str(os.cpu_count()), "RAM": ram, "GPU": gpu,
            "OS": platform.platform(), "python": platform.python_version()}
    for package in ("torch", "torchvision", "pytorch-lightning", "timm", "lightly", "gradio",
                    "pillow"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = "not installed"
    try:
        info["load average at start"] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        pass
    return info


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / MIB:.0f}"


def _one_line(text: str, limit: int = 160) -> str:
    text = " ".join(text.replace("|", "/").split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def render_markdown(command: str, machine: dict[str, str], settings: list[TrainSettings],
                    training: dict[str, dict[str, TrainSummary]], repeats: int,
                    recon: list[dict[str, Any]], recon_skipped: bool, app: dict[str, Any] | None,
                    upload_name: str, upload_bytes: int, total_s: float) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = ["# MAE Studio benchmark", "", f"Command: `{command}`", "",
             f"Run {now}; the whole benchmark took {total_s:.0f} s.", "", "## Machine", "",
             "| Item | Value |", "|---|---|"]
    lines += [f"| {k} | {_one_line(v)} |" for k, v in machine.items()]

    lines += ["", "## Training throughput", ""]
    if not settings:
        lines.append("Skipped (`--skip-train`).")
    for s in settings:
        summaries = training.get(s.preset, {})
        clean, naive = summaries.get("ddp-clean"), summaries.get("naive")
        first = next((r for summ in (clean, naive) if summ for r in summ.runs), None)
        world = first["world_size"] if first else (s.devices or "auto")
        where = (f"{first['accelerator'].replace('Accelerator', '').lower()}, {first['precision']}, "
                 f"{first['backend']}") if first else s.accelerator
        files = first.get("files") if first else None
        data = s.data or "embedded sample photos"
        lines += [f"**{s.preset}**, {s.image_size} px, patch {s.patch_size}; batch {s.batch_size} "
                  f"per process × {world} processes ({where}); data: {data}"
                  f"{f' ({files} files)' if files else ''}; {s.steps} measured steps after "
                  f"{s.warmup} warm-up steps; median of {repeats} launches per recipe, alternating.",
                  "",
                  "| Preset | Recipe | Policy | DDP | Data pipeline | Threads/process | "
                  "Loader workers | images/s | s/step | images/s range | data wait s/step | "
                  "peak RSS rank 0 (MiB) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for recipe, summary in (("ddp-clean", clean), ("naive", naive)):
            if summary is None:
                continue
            policy = "ddp-clean" if recipe == "ddp-clean" else "reference"
            pipeline = ("uint8 cache, v2 crop+flip, normalise on device" if recipe == "ddp-clean"
                        else "PIL open per sample, MAETransform, normalise on CPU")
            if not summary.runs:
                error = _one_line(summary.errors[-1] if summary.errors else "no result")
                lines.append(f"| {s.preset} | {recipe} | {policy} | | {pipeline} | | | failed | "
                             f"failed | {error} | | |")
                continue
            run = summary.runs[0]
            ddp = (f"find_unused={run['find_unused_parameters']}, "
                   f"static_graph={run['static_graph']}"
                   if run["strategy"] == "DDPStrategy" else run["strategy"])
            if recipe == "ddp-clean" and s.compile:
                ddp += ", torch.compile"
            low, high = summary.spread("images_per_s") or (None, None)
            lines.append(
                f"| {s.preset} | {recipe} | {policy} | {ddp} | {pipeline} | "
                f"{run['torch_threads']} | {run['num_workers']} | "
                f"{_fmt(summary.median('images_per_s'))} | {_fmt(summary.median('s_per_step'), 3)} | "
                f"{_fmt(low)}–{_fmt(high)} | {_fmt(summary.median('wait_s_per_step'), 3)} | "
                f"{_mib(summary.median('peak_rss_bytes'))} |")
        ratio = None
        if clean and naive and clean.runs and naive.runs:
            ratio = clean.median("images_per_s") / naive.median("images_per_s")
        lines += [f"| {s.preset} | speed-up (ddp-clean / naive) | | | | | | "
                  f"{'n/a' if ratio is None else f'{ratio:.2f}×'} | | | | |", ""]

    lines += ["## Reconstruction latency (one uploaded image, the app's inference path)", ""]
    if recon_skipped:
        lines.append("Skipped (`--skip-recon`).")
    else:
        lines += [f"Upload: `{upload_name}`, {upload_bytes / 1024:.0f} KiB of JPEG bytes → "
                  "`open_rgb` → `center_square` → `reconstruct` → `panels`; freshly initialised "
                  "models (the time does not depend on the weights).", "",
                  "| Preset | Input | p50 (ms) | p95 (ms) | mean (ms) | runs | torch threads |",
                  "|---|---|---|---|---|---|---|"]
        for row in recon:
            if "error" in row:
                lines.append(f"| {row['preset']} | | failed | failed | {_one_line(row['error'])} | | |")
            else:
                lines.append(f"| {row['preset']} | {row['image_size']} px / patch "
                             f"{row['patch_size']} | {_fmt(row['p50_ms'])} | {_fmt(row['p95_ms'])} | "
                             f"{_fmt(row['mean_ms'])} | {row['runs']} | {row['threads']} |")

    lines += ["", "## App", ""]
    if app is None:
        lines.append("Skipped (`--skip-app`).")
    else:
        lines += ["| Measure | Value |", "|---|---|"]
        if "error" in app:
            reason = _one_line(app["error"])
            lines += [f"| launch to serving (s) | n/a ({reason}) |", "| peak RSS (MiB) | n/a |"]
        else:
            lines += [f"| launch to serving (s) | {app['serving_s']:.1f} |",
                      f"| peak RSS when serving (MiB) | {_mib(app['serving_rss_bytes'])} |",
                      f"| peak RSS once loaded (MiB) | {_mib(app['peak_rss_bytes'])} |"]
        lines += ["", "`python app.py --port P` in a scratch directory, polled every 0.1 s until "
                  "`GET /` answers 200; peak RSS is the app process's VmHWM, when it first "
                  "serves and once its background loading (torch, the run manager) has settled."]
    lines += ["", "Peak RSS is VmHWM at the end of the measured steps (loader worker processes, "
              "if any, not included).", ""]
    return "\n".join(lines)


def results_json(command: str, machine: dict[str, str],
                 training: dict[str, dict[str, TrainSummary]], recon: list[dict[str, Any]],
                 app: dict[str, Any] | None) -> dict[str, Any]:
    """The same results, machine-readable (medians per preset and recipe, and the speed-up)."""
    train_out: dict[str, Any] = {}
    for preset, summaries in training.items():
        row: dict[str, Any] = {}
        for recipe, summary in summaries.items():
            first = summary.runs[0] if summary.runs else {}
            row[recipe] = {
                "images_per_s": summary.median("images_per_s"),
                "s_per_step": summary.median("s_per_step"),
                "wait_s_per_step": summary.median("wait_s_per_step"),
                "peak_rss_bytes": summary.median("peak_rss_bytes"),
                "launches": len(summary.runs), "errors": summary.errors,
                **{k: first.get(k) for k in ("world_size", "strategy", "find_unused_parameters",
                                             "static_graph", "backend", "accelerator",
                                             "precision", "batch_size", "num_workers")},
            }
        clean, naive = row.get("ddp-clean", {}), row.get("naive", {})
        if clean.get("images_per_s") and naive.get("images_per_s"):
            row["speedup"] = clean["images_per_s"] / naive["images_per_s"]
        train_out[preset] = row
    return {"command": command, "machine": machine, "training": train_out,
            "reconstruction": recon, "app": app}


# --- command line -----------------------------------------------------------------------------

def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


def _non_negative(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {value}")
    return number


def build_parser() -> argparse.ArgumentParser:
    from mae_core.config import PRESETS, parse_bool

    p = argparse.ArgumentParser(
        prog="python -m mae_core.bench",
        description="Benchmark MAE Studio: DDP training throughput (ddp-clean vs the naive "
                    "recipe), reconstruction latency and the app's time to serving.")
    p.add_argument("--preset", nargs="+", default=["vit-tiny"], choices=list(PRESETS),
                   help="preset(s) to train (default vit-tiny)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--batch-size", type=_positive, default=32, help="per process")
    p.add_argument("--devices", type=_positive, default=None,
                   help="DDP processes (default: the trainer's choice for this machine)")
    p.add_argument("--accelerator", default="auto", choices=("auto", "cpu", "gpu"))
    p.add_argument("--data", default="", help="image folder (default: the embedded sample photos)")
    p.add_argument("--steps", type=_positive, default=30, help="measured steps per launch")
    p.add_argument("--warmup-steps", type=_non_negative, default=5, help="steps excluded first")
    p.add_argument("--repeats", type=_positive, default=3, help="launches per recipe (median)")
    p.add_argument("--threads", type=_positive, default=None,
                   help="torch threads per training process (default: Lightning's, cores/processes)")
    p.add_argument("--num-workers", type=_non_negative, default=None,
                   help="loader workers per process for ddp-clean (default: the trainer's choice)")
    p.add_argument("--naive-workers", type=_non_negative, default=None,
                   help="loader workers per process for the naive recipe (default: as ddp-clean)")
    p.add_argument("--static-graph", type=parse_bool, default=True,
                   help="TrainConfig.static_graph for ddp-clean: on (default) or off")
    p.add_argument("--compile", action="store_true", help="torch.compile the ddp-clean loss")
    p.add_argument("--train-timeout", type=float, default=600.0, help="seconds per launch")
    p.add_argument("--recon-presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    p.add_argument("--recon-size", type=int, default=224)
    p.add_argument("--recon-patch", type=int, default=16)
    p.add_argument("--recon-runs", type=_positive, default=20)
    p.add_argument("--recon-warmup", type=_non_negative, default=3)
    p.add_argument("--photo", help="the image file to upload (default: a sample photo as JPEG)")
    p.add_argument("--app-timeout", type=float, default=180.0)
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-recon", action="store_true")
    p.add_argument("--skip-app", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the workers' run directories and logs")
    p.add_argument("--out", default="bench/results.md", help="the Markdown file to write")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [WORKER_FLAG]:
        return worker_main(argv[1])
    parser = build_parser()
    args = parser.parse_args(argv)
    from mae_core.config import ConfigError, ModelConfig

    for preset in args.preset:
        try:
            ModelConfig(preset=preset, image_size=args.image_size, patch_size=args.patch_size)
        except ConfigError as err:
            parser.error(str(err))
    command = shlex.join(["python", "-m", "mae_core.bench", *argv])
    started = time.perf_counter()

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    machine = machine_info()
    failed = False
    settings: list[TrainSettings] = []
    training: dict[str, dict[str, TrainSummary]] = {}
    scratch = Path(tempfile.mkdtemp(prefix="mae-bench-"))
    try:
        if not args.skip_train:
            for preset in args.preset:
                s = TrainSettings(
                    preset=preset, image_size=args.image_size, patch_size=args.patch_size,
                    batch_size=args.batch_size, devices=args.devices, accelerator=args.accelerator,
                    data=args.data, warmup=args.warmup_steps, steps=args.steps,
                    threads=args.threads, num_workers=args.num_workers,
                    naive_workers=args.naive_workers, static_graph=args.static_graph,
                    compile=args.compile, timeout_s=args.train_timeout)
                settings.append(s)
                say(f"training: {preset} ({args.repeats} × {', '.join(RECIPES)})")
                training[preset] = benchmark_training(s, args.repeats, scratch, say)
                failed |= any(not summ.runs for summ in training[preset].values())
    finally:
        if args.keep:
            say(f"worker directories kept in {scratch}")
        else:
            import shutil

            shutil.rmtree(scratch, ignore_errors=True)

    recon: list[dict[str, Any]] = []
    upload, upload_name = b"", ""
    if not args.skip_recon:
        upload, upload_name = sample_upload(args.photo)
        for preset in args.recon_presets:
            say(f"reconstruction: {preset}")
            try:
                row = benchmark_reconstruction(preset, args.recon_size, args.recon_patch, upload,
                                               args.recon_runs, args.recon_warmup)
                say(f"  p50 {row['p50_ms']:.1f} ms, p95 {row['p95_ms']:.1f} ms")
            except Exception as err:  # noqa: BLE001 - reported in the table
                row = {"preset": preset, "error": f"{type(err).__name__}: {err}"}
                say(f"  FAILED: {row['error']}")
                failed = True
            recon.append(row)

    app = None
    if not args.skip_app:
        say("app: launch to serving")
        app = benchmark_app(args.app_timeout)
        say("  " + (app["error"] if "error" in app else f"{app['serving_s']:.1f} s"))

    markdown = render_markdown(command, machine, settings, training, args.repeats, recon,
                               args.skip_recon, app, upload_name, len(upload),
                               time.perf_counter() - started)
    from mae_core.fileio import atomic_write_json, atomic_write_text

    out = Path(args.out)
    atomic_write_text(out, markdown)
    atomic_write_json(out.with_suffix(".json"),
                      results_json(command, machine, training, recon, app))
    print(markdown)
    say(f"written to {out} and {out.with_suffix('.json')}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
