"""The trainer: ``python -m mae_core.train --config RUN.yaml [--field value ...]``.

One Lightning ``Trainer`` (DDP over every device: GPUs with NCCL, or CPU processes over gloo), writing
a run directory a person (or the app) can follow: ``status.json``, ``metrics.jsonl``, checkpoints,
weights and previews. The same command runs under ``torchrun`` or SLURM with ``--num-nodes``; pass
``--run-dir`` there so every node writes to the same (shared) directory.

Exit codes: 0 finished or stopped on request, 1 training failed, 2 the config or data was refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import Logger
from pytorch_lightning.plugins.io import TorchCheckpointIO
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.utilities import rank_zero_only

from mae_core.config import ConfigError, ModelConfig, RunConfig, TrainConfig, parse_bool
from mae_core.data import DataError, MAEDataModule, check_data, preview_images
from mae_core.fileio import (append_line, atomic_write, atomic_write_json, fsync_file, read_json,
                             remove_stale_temp_files)
from mae_core.flops import training_flops_per_image
from mae_core.hardware import device_peak, mfu
from mae_core.model import MAELightning
from mae_core.reconstruct import grid_image, reconstruct
from mae_core.rundir import RunPaths, process_record
from mae_core.weights import save_weights

RUN_DIR_ENV = "MAE_STUDIO_RUN_DIR"
# Normalising batches on the device is the point of MAELightning.on_after_batch_transfer.
warnings.filterwarnings("ignore", message=".*overridden `on_after_batch_transfer`.*")
DEFAULT_RUNS_DIR = "checkpoints"
PREVIEW_SEED = 0


# --- what the run writes ----------------------------------------------------------------------

class JsonlLogger(Logger):
    """A Lightning logger that appends one flushed JSON line per log call to ``metrics.jsonl``.

    Lightning's own CSV logger buffers 100 steps; a live curve needs each line on disk at once.
    It carries the per-epoch summaries; the per-step lines are written by :class:`ProgressRecorder`
    itself, before the step's checkpoint (Lightning logs a step only after every callback ran).
    """

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    @property
    def name(self) -> str:
        return "jsonl"

    @property
    def version(self) -> str:
        return "0"

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass  # config.yaml already holds them

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        # Lightning passes the 0-based index of the batch just trained; the file counts completed
        # optimizer steps, as status.json and the checkpoints do.
        row = {"step": (step or 0) + 1, **{k: _plain(v) for k, v in metrics.items()}}
        append_line(self.path, json.dumps(row))


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, torch.Tensor) else value


def optimizer_stepped(trainer: pl.Trainer) -> bool:
    """Whether the batch that just ended closed an optimizer step (in ``on_train_batch_end``).

    Always true without gradient accumulation; with it, only the last batch of each group of
    ``accumulate_grad_batches`` (or of the epoch). Step-keyed work (a metrics line, a checkpoint,
    a preview, the stop check) runs once per optimizer step, not once per micro-batch.
    """
    return not trainer.fit_loop._should_accumulate()


class ProgressRecorder(pl.Callback):
    """Writes loss, lr, throughput and time each step to ``metrics.jsonl`` and keeps
    ``status.json`` current (rank 0).

    The step's line is on disk before :class:`SaveCheckpoints` (a later callback) saves that
    step: a kill between the two then never leaves a checkpoint newer than the curve, so a resume
    finds a line for every step up to the checkpoint's.
    """

    def __init__(self, paths: RunPaths, status_every_s: float = 1.0, log_every_n_steps: int = 1
                 ) -> None:
        self.paths = paths
        self.status_every_s = status_every_s
        self.log_every_n_steps = log_every_n_steps
        self._last_status = 0.0
        self._elapsed_before = 0.0
        self._fit_start = 0.0
        self._step_start = 0.0
        self._step_loss: torch.Tensor | None = None  # accumulation: the step's micro-batches
        self._step_images = 0
        self.flops_per_image: float | None = None  # training FLOPs of one image (rank 0)
        self.peak_flops: float | None = None  # one device's peak FLOP/s (rank 0)
        self._mfu: float | None = None  # the last step's

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:  # once per run, before the clock starts (a first probe: ~1 s)
            self.flops_per_image, self.peak_flops = _flops_and_peak(trainer, pl_module)
        self._fit_start = self._step_start = time.perf_counter()
        if trainer.is_global_zero:
            # A resume continues from the checkpoint's step: later lines of the killed run go.
            self.paths.truncate_metrics(trainer.global_step)
            elapsed = [row["elapsed_s"] for row in self.paths.read_metrics() if "elapsed_s" in row]
            self._elapsed_before = float(elapsed[-1]) if elapsed else 0.0
            dataset = getattr(trainer.datamodule, "dataset", None)
            self.paths.write_status(state="running", pid=os.getpid(), step=trainer.global_step,
                                    total_steps=_total_steps(trainer), epoch=trainer.current_epoch,
                                    world_size=trainer.world_size, error=None, log_tail=None,
                                    images=getattr(dataset, "num_images", None),
                                    skipped_files=getattr(dataset, "skipped", None),
                                    flops_per_image=self.flops_per_image,
                                    peak_flops=self.peak_flops, mfu=None)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        # Gradient accumulation: called after every micro-batch, whose loss Lightning divides by
        # accumulate_grad_batches; the step's line sums them on the device (the step's mean loss)
        # and counts the images of every micro-batch.
        loss = outputs["loss"].detach()
        self._step_loss = loss if self._step_loss is None else self._step_loss + loss
        self._step_images += batch.shape[0] * trainer.world_size
        if not optimizer_stepped(trainer):
            return
        loss, images, self._step_loss, self._step_images = self._step_loss, self._step_images, None, 0
        now = time.perf_counter()
        row = {"step": trainer.global_step, "epoch": trainer.current_epoch,
               "loss": loss.item(),
               "lr": trainer.optimizers[0].param_groups[0]["lr"],
               "images_per_s": images / max(now - self._step_start, 1e-9),
               "elapsed_s": self._elapsed_before + now - self._fit_start}
        row["mfu"] = self._mfu = mfu(row["images_per_s"], self.flops_per_image, self.peak_flops,
                                     trainer.world_size)
        for name in ("loss", "images_per_s"):  # for status.json; the file gets `row` directly
            pl_module.log(name, row[name], rank_zero_only=True, logger=False)
        if trainer.is_global_zero and trainer.global_step % self.log_every_n_steps == 0:
            append_line(self.paths.metrics, json.dumps(row))
        self._step_start = now
        if trainer.is_global_zero and (now - self._last_status >= self.status_every_s):
            self._last_status = now
            self.write_progress(trainer, row["loss"])

    def write_progress(self, trainer: pl.Trainer, loss: float | None = None, **fields: Any) -> None:
        metrics = trainer.callback_metrics
        self.paths.write_status(
            step=trainer.global_step, total_steps=_total_steps(trainer), epoch=trainer.current_epoch,
            loss=loss if loss is not None else _plain(metrics.get("loss")),
            images_per_s=_plain(metrics.get("images_per_s")), mfu=self._mfu,
            elapsed_s=self._elapsed_before + time.perf_counter() - self._fit_start, **fields)


def _flops_and_peak(trainer: pl.Trainer, pl_module: pl.LightningModule
                    ) -> tuple[float | None, float | None]:
    """The model's training FLOPs per image and one device's peak FLOP/s: MFU's two constants.

    The peak comes from :mod:`mae_core.hardware` (on the CPU a matmul probe with this process's
    threads, cached per machine; on a known GPU its datasheet). Neither may stop a run: a failure
    leaves MFU unreported.
    """
    cfg = getattr(pl_module, "cfg", None)
    flops = training_flops_per_image(cfg) if isinstance(cfg, ModelConfig) else None
    try:
        device = pl_module.device
        peak = device_peak(device.type, str(trainer.precision), index=device.index or 0).flops
    except Exception as err:  # noqa: BLE001 - MFU is a report, not a reason to fail the run
        print(f"peak FLOP/s not measured ({type(err).__name__}: {err}): no MFU", flush=True)
        peak = None
    return flops, peak


def _total_steps(trainer: pl.Trainer) -> int:
    if trainer.max_steps > 0:
        return trainer.max_steps
    return int(trainer.estimated_stepping_batches)


class StopOnRequest(pl.Callback):
    """Stops after the current step once the run directory holds a ``STOP`` file.

    Every rank must stop at the same step, so the decision is reduced across ranks (any rank that
    saw the file stops them all); setting ``should_stop`` on one rank alone would hang DDP.
    """

    def __init__(self, paths: RunPaths, recorder: ProgressRecorder) -> None:
        self.paths = paths
        self.recorder = recorder
        self.requested = False

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if not optimizer_stepped(trainer):
            return  # stop on a step boundary (and reduce across ranks once per step)
        seen = self.paths.stop_request.exists()
        if trainer.strategy.reduce_boolean_decision(seen, all=False):
            self.requested = True
            trainer.should_stop = True
            if trainer.is_global_zero:
                self.recorder.write_progress(trainer, state="stopping")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``torch.save`` checkpoints, written beside the target and renamed into place.

    Lightning's own IO writes to a temp file in ``$TMPDIR`` and moves it; where ``$TMPDIR`` is
    another file system (a tmpfs ``/tmp``) the move is a copy that truncates the old checkpoint
    first, and a kill mid-copy leaves a 0-byte ``last.ckpt``. :func:`atomic_write` never does.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


class SaveCheckpoints(pl.Callback):
    """``last.ckpt`` (Lightning, for resume) and ``model.safetensors`` every N steps and at the end.

    Both are written atomically beside their target (:class:`AtomicCheckpointIO`,
    :func:`save_weights`), so a kill never leaves a half-written file; the temp files of a kill are
    removed when the next trainer starts in the run directory.
    """

    def __init__(self, paths: RunPaths, every_n_steps: int) -> None:
        self.paths = paths
        self.every_n_steps = every_n_steps

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.is_global_zero:
            removed = remove_stale_temp_files(self.paths.root)
            if removed:
                print(f"removed {len(removed)} temporary file(s) left by an interrupted save",
                      flush=True)

    def save(self, trainer: pl.Trainer, pl_module: MAELightning) -> None:
        if trainer.is_global_zero and self.paths.metrics.exists():
            fsync_file(self.paths.metrics)  # the curve up to this step survives what the ckpt does
        trainer.save_checkpoint(self.paths.last_ckpt, weights_only=False)  # optimizer too, for resume
        if trainer.is_global_zero:
            save_weights(pl_module.mae, self.paths.weights, step=trainer.global_step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if not optimizer_stepped(trainer):
            return
        if trainer.global_step % self.every_n_steps == 0 and not trainer.should_stop:
            self.save(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.save(trainer, pl_module)


class Previews(pl.Callback):
    """Reconstructions of a fixed set of images on a fixed mask, every N steps: ``previews/step_*.png``."""

    def __init__(self, paths: RunPaths, images: torch.Tensor, every_n_steps: int) -> None:
        self.paths = paths
        self.images = images
        self.every_n_steps = every_n_steps

    @rank_zero_only
    def write(self, trainer: pl.Trainer, pl_module: MAELightning) -> None:
        if len(self.images) == 0:
            return
        results = reconstruct(pl_module.mae, self.images, seed=PREVIEW_SEED)
        image = grid_image(results, size=max(96, pl_module.cfg.image_size))
        target = self.paths.previews / f"step_{trainer.global_step:07d}.png"
        atomic_write(target, lambda tmp: image.save(tmp, format="PNG"))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step == 0:
            self.write(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if optimizer_stepped(trainer) and trainer.global_step % self.every_n_steps == 0:
            self.write(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not (self.paths.previews / f"step_{trainer.global_step:07d}.png").exists():
            self.write(trainer, pl_module)


# --- building and running -------------------------------------------------------------------

def make_strategy(cfg: RunConfig) -> Any:
    t = cfg.train
    if t.world_size == 1:
        return "auto"
    find_unused = bool(t.find_unused_parameters)
    # static_graph lets DDP skip per-step graph bookkeeping. It also tolerates unused parameters,
    # which would hide the very failure the reference policy demonstrates: ddp-clean only.
    # Gradient accumulation skips the all-reduce of all but the last micro-batch (no_sync), which
    # a static graph's reducer cannot follow (torch fails "expect_autograd_hooks_ INTERNAL ASSERT").
    static = (t.static_graph and not find_unused and cfg.model.policy == "ddp-clean"
              and t.accumulate_grad_batches == 1)
    return DDPStrategy(find_unused_parameters=find_unused, static_graph=static,
                       process_group_backend="nccl" if t.accelerator == "gpu" else "gloo",
                       timeout=datetime.timedelta(minutes=10))


def run_training(cfg: RunConfig, paths: RunPaths, resume: bool = False,
                 datamodule: pl.LightningDataModule | None = None,
                 extra_callbacks: list[pl.Callback] | None = None) -> int:
    """Train ``cfg`` (already resolved) into ``paths``; returns the process exit code.

    ``datamodule`` replaces the image-folder data and ``extra_callbacks`` run after the trainer's
    own callbacks: ``bench`` feeds the naive recipe's loader and its step timer this way.
    """
    t = cfg.train
    pl.seed_everything(t.seed, workers=True, verbose=False)
    torch.set_float32_matmul_precision("high")
    recorder = ProgressRecorder(paths, log_every_n_steps=t.log_every_n_steps)
    stopper = StopOnRequest(paths, recorder)
    callbacks = [recorder, stopper, SaveCheckpoints(paths, t.checkpoint_every_n_steps)]
    if t.num_previews:
        callbacks.append(Previews(paths, preview_images(t.data, cfg.model.image_size, t.num_previews),
                                  t.preview_every_n_steps))
    callbacks.extend(extra_callbacks or [])
    trainer = pl.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, precision=t.precision,
        strategy=make_strategy(cfg), max_steps=t.max_steps, max_epochs=t.max_epochs or -1,
        accumulate_grad_batches=t.accumulate_grad_batches,  # max_steps counts optimizer steps
        callbacks=callbacks, logger=JsonlLogger(paths.metrics), log_every_n_steps=t.log_every_n_steps,
        plugins=[AtomicCheckpointIO()], enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(paths.root), num_sanity_val_steps=0)
    model = MAELightning.from_config(cfg)
    data = datamodule if datamodule is not None else MAEDataModule(
        t.data, cfg.model.image_size, t.batch_size, t.num_workers or 0,
        pin_memory=t.accelerator == "gpu")
    ckpt = str(paths.last_ckpt) if resume else None
    try:
        trainer.fit(model, datamodule=data, ckpt_path=ckpt, weights_only=True)
    except BaseException as err:  # noqa: BLE001 - reported in status.json, then re-raised
        if trainer.is_global_zero:
            detail = "".join(traceback.format_exception_only(type(err), err)).strip()
            paths.write_status(state="failed", error=detail or type(err).__name__,
                               log_tail=traceback.format_exc()[-4000:])
        raise
    if trainer.is_global_zero:
        state = "stopped" if stopper.requested else "finished"
        paths.stop_request.unlink(missing_ok=True)
        recorder.write_progress(trainer, state=state)
    return 0


# --- command line -----------------------------------------------------------------------------

def _flag_parser(text: str, annotation: str):
    def parse(value: str) -> Any:
        if value.lower() in ("auto", "none", "null") and "None" in annotation:
            return None
        if "bool" in annotation:
            try:
                return parse_bool(value)
            except argparse.ArgumentTypeError:
                raise argparse.ArgumentTypeError(f"{text} must be true or false, got {value!r}") from None
        kind = "int" if "int" in annotation else "float" if "float" in annotation else None
        try:
            return int(value) if kind == "int" else float(value) if kind == "float" else value
        except ValueError:
            # Named like the config's own errors: "2.5" for a batch size is refused, not rounded.
            what = "an integer" if kind == "int" else "a number"
            raise argparse.ArgumentTypeError(f"{text} must be {what}, got {value!r}") from None
    parse.__name__ = annotation
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mae_core.train",
                                     description="Pretrain a Masked Autoencoder with Lightning DDP.")
    parser.add_argument("--config", help="RUN.yaml (model: and train: sections); flags override it")
    parser.add_argument("--run-dir", help="the run directory (default: a new one under --runs-dir)")
    parser.add_argument("--runs-dir", default=DEFAULT_RUNS_DIR, help="where new runs are created")
    parser.add_argument("--resume", action="store_true", help="continue --run-dir from last.ckpt")
    for cls in (ModelConfig, TrainConfig):
        for f in dataclasses.fields(cls):
            flags = ["--" + f.name.replace("_", "-")]
            if f.name == "preset":
                flags.insert(0, "--model")
            parser.add_argument(*flags, dest=f.name, default=argparse.SUPPRESS,
                                type=_flag_parser(flags[0], str(f.type)),
                                help=f"{f.type} (default {f.default!r})")
    return parser


def prepare(args: argparse.Namespace) -> tuple[RunConfig, RunPaths, bool]:
    """Resolve the config and the run directory; only the first process writes anything.

    A run directory that already holds ``config.yaml`` (made by the run manager, by rank 0 for the
    ranks Lightning launches, or by a previous session for ``--resume``) is the config's source.
    """
    overrides = {k: v for k, v in vars(args).items()
                 if k not in ("config", "run_dir", "runs_dir", "resume")}
    inherited = os.environ.get(RUN_DIR_ENV)  # set for the ranks Lightning launches
    writer = _first_process()
    run_dir = args.run_dir or inherited
    if args.resume and not run_dir:
        raise ConfigError("resume", "--resume continues an existing run: name it with "
                                    "--run-dir checkpoints/<run-id>")
    if run_dir:
        paths = RunPaths(Path(run_dir))
        if not writer and not _wait_for(paths.config):
            raise ConfigError("run_dir", f"rank 0 wrote no {paths.config}: this rank cannot start")
        if paths.config.exists():
            cfg = RunConfig.load(paths.config)
            if args.resume and not paths.last_ckpt.exists():
                raise ConfigError("resume", f"{paths.last_ckpt} does not exist: nothing to resume")
            if overrides and writer:  # e.g. --max-steps to extend a run; the ranks read it back
                cfg = cfg.with_overrides(**overrides).resolved()
                check_data(cfg.train.data)
                cfg.save(paths.config)
            if writer:
                _record_process(paths)
            return cfg, paths, args.resume
        if args.resume:
            raise ConfigError("resume", f"{paths.config} does not exist: nothing to resume")
    from mae_core.rundir import create_run

    base = RunConfig.load(args.config) if args.config else RunConfig()
    cfg = base.with_overrides(**overrides).resolved()
    summary = check_data(cfg.train.data)
    # process.json goes in before config.yaml (what makes the directory a run): a reader never
    # sees a live run that has no process to check.
    paths = create_run(cfg, runs_dir=args.runs_dir, run_dir=run_dir,
                       process=process_record(command=sys.argv), data_files=summary.files)
    return cfg, paths, False


def _record_process(paths: RunPaths) -> None:
    """Record this process in ``process.json`` unless the run manager that launched it already
    did, so the app can follow (and stop) a run started by hand, torchrun or SLURM."""
    if (read_json(paths.process) or {}).get("pid") != os.getpid():
        atomic_write_json(paths.process, process_record(command=sys.argv))


def _first_process() -> bool:
    """Whether this is the job's first process, the one that writes the run directory's files.

    Not a rank Lightning launched (they inherit the run directory), and rank 0 of a torchrun
    (``RANK``) or SLURM (``SLURM_PROCID``) job.
    """
    global_rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0"
    return RUN_DIR_ENV not in os.environ and global_rank == "0"


def _wait_for(path: Path, timeout_s: float = 120.0) -> bool:
    """Other ranks of a torchrun/SLURM job wait for rank 0 to write the run's config; whether it
    appeared."""
    deadline = time.monotonic() + timeout_s
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    return path.exists()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg, paths, resume = prepare(args)
    except (ConfigError, DataError) as err:
        parser.exit(2, f"error: {err}\n")
    os.environ[RUN_DIR_ENV] = str(paths.root.resolve())
    if int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0:
        print(f"run directory: {paths.root}", flush=True)
    try:
        return run_training(cfg, paths, resume)
    except KeyboardInterrupt:
        return 1
    except Exception:  # noqa: BLE001 - the traceback goes to train.log, the summary to status.json
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main())
