"""The trainer: ``python -m mae_core.train --config RUN.yaml [--field value ...]``.

One Lightning ``Trainer`` (DDP over every device: GPUs with NCCL, or CPU processes over gloo), writing
a run directory a person (or the app) can follow: ``status.json``, ``metrics.jsonl``, checkpoints,
weights and previews. The same command runs under ``torchrun`` or SLURM with ``--num-nodes``; pass
``--run-dir`` there so every node writes to the same (shared) directory.

Exit codes: 0 finished or stopped on request, 1 training failed, 2 the config or data was refused.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import logging
import os
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Only light modules here: a refused flag or config answers at once, without the seconds torch,
# Lightning, timm and lightly take to import; run_training imports them.
from mae_core.checks import DataError
from mae_core.config import ConfigError, ModelConfig, RunConfig, TrainConfig, parse_bool
from mae_core.fileio import atomic_write_json, read_json
from mae_core.process import (TRAINER_ENV_PREFIX, GpuNotVisibleError, die_with_parent,
                              first_process, gpu_env, gpus_narrowed, later_rank_vars,
                              launcher_evident, on_this_host, record_alive)
from mae_core.rundir import (DEFAULT_RUNS_DIR, LIVE_STATES, RUN_ID_RULE, RunPaths, process_record,
                             valid_run_id)

if TYPE_CHECKING:
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import Logger

    from mae_core.data import DataSummary

RUN_DIR_ENV = "MAE_STUDIO_RUN_DIR"
RANK0_PID_ENV = "MAE_STUDIO_RANK0_PID"  # set by a node's first process for the ranks it starts
# Normalising batches on the device is the point of MAELightning.on_after_batch_transfer.
warnings.filterwarnings("ignore", message=".*overridden `on_after_batch_transfer`.*")
# Lightning 2.6 asks torch's pytree a question torch 2.14 deprecates, twice per run, in every
# rank's log the app shows: not the user's to act on.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, (LeafSpec|TreeSpec)\)")


class _NoAdverts(logging.Filter):
    """Lightning 2.6 advertises its cloud logger at every start, in the log the app shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_NoAdverts())


# --- building and running -------------------------------------------------------------------

def make_strategy(cfg: RunConfig) -> Any:
    from pytorch_lightning.strategies import DDPStrategy

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
                       gradient_as_bucket_view=True,
                       process_group_backend="nccl" if t.accelerator == "gpu" else "gloo",
                       timeout=datetime.timedelta(minutes=10))


def loggers(cfg: RunConfig, paths: RunPaths) -> list[Logger]:
    """``metrics.jsonl`` (the app's source) and TensorBoard event files in ``<run>/tensorboard``,
    so ``tensorboard --logdir checkpoints`` shows every run beside the app."""

    from mae_core import prepared
    from mae_core.loggers import BoardLogger, JsonlLogger

    board = BoardLogger(save_dir=str(paths.tensorboard.parent), name=paths.tensorboard.name,
                        version="", default_hp_metric=False)
    # The job's global rank 0 only: under torchrun every node has a LOCAL_RANK 0 (and no NODE_RANK),
    # and the other ranks' TensorBoard experiment is None.
    if prepared.first_process():
        from torch.utils.tensorboard.summary import hparams

        params = {f"{part}.{name}": value if value is not None else "auto"
                  for part, values in cfg.to_dict().items() for name, value in values.items()}
        board.log_hyperparams(params)  # hparams.yaml
        # The HParams dashboard, with the run's loss series as its metrics (no fake values).
        for summary in hparams(board._sanitize_params(params), {"epoch_loss": 0.0, "loss": 0.0}):
            board.experiment._get_file_writer().add_summary(summary)
    return [JsonlLogger(paths.metrics), board]


def run_training(cfg: RunConfig, paths: RunPaths, resume: bool = False,
                 datamodule: pl.LightningDataModule | None = None,
                 extra_callbacks: list[pl.Callback] | None = None) -> int:
    """Train ``cfg`` (already resolved) into ``paths``; returns the process exit code.

    ``datamodule`` replaces the image-folder data and ``extra_callbacks`` run after the trainer's
    own callbacks: ``bench`` feeds the naive recipe's loader and its step timer this way.
    """
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from mae_core import prepared
    from mae_core.callbacks import (AtomicCheckpointIO, Previews, ProgressRecorder,
                                     SaveCheckpoints, StopOnRequest)
    from mae_core.data import TrainSplitDataModule
    from mae_core.model import MAELightning
    from mae_core.monitor import EvalPlan, HeldOutMonitor, plan_evaluation
    from mae_core.snapshots import WeightSnapshots

    t = cfg.train
    pl.seed_everything(t.seed, workers=True, verbose=False)
    torch.set_float32_matmul_precision("high")
    recorder = ProgressRecorder(paths, log_every_n_steps=t.log_every_n_steps)
    stopper = StopOnRequest(paths, recorder)
    callbacks = [recorder, stopper, SaveCheckpoints(paths, t.checkpoint_every_n_steps, recorder)]
    # A folder, a prepared set or a URL: decided (and a large folder prepared) once per run.
    if prepared.is_remote(t.data):  # a network wait (credentials, retries) must not look like a hang
        print(f"opening the remote data set {t.data}", flush=True)
    try:
        source = prepared.run_data(t.data, paths.root)
    except DataError as err:  # the other ranks and nodes wait on status.json to give up
        if prepared.first_process():
            paths.write_status(state="failed", error=str(err))
        raise
    if t.num_previews:
        callbacks.append(Previews(paths, prepared.source_previews(
            source, cfg.model.image_size, t.num_previews, cfg.model.channels), t.preview_every_n_steps))
    callbacks.extend(extra_callbacks or [])
    # Held-out evaluation (issue 14); a caller's own data module has no split to evaluate, and a
    # streamed (prepared) set is trained whole: its kNN monitor needs a separate eval_data folder.
    plan = (plan_evaluation(t, split_data=source.kind == "memory") if datamodule is None
            else EvalPlan())
    if plan.active:  # before SaveCheckpoints: a step's line is on disk before its checkpoint
        callbacks.insert(2, HeldOutMonitor(plan, paths.metrics, t.eval_every_n_steps,
                                           t.batch_size, recorder))
    if t.weight_snapshots:  # the Reconstruct tab's weights history (issue 14, item 5)
        callbacks.append(WeightSnapshots(paths.root, t.weight_snapshots, t.checkpoint_every_n_steps))
    callbacks.append(_failure_recorder(paths, stopper))
    _drop_trainer_env()
    trainer = pl.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, precision=t.precision,
        strategy=make_strategy(cfg), max_steps=t.max_steps, max_epochs=t.max_epochs or -1,
        accumulate_grad_batches=t.accumulate_grad_batches,  # max_steps counts optimizer steps
        callbacks=callbacks, logger=loggers(cfg, paths), log_every_n_steps=t.log_every_n_steps,
        plugins=[AtomicCheckpointIO()], enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(paths.root), num_sanity_val_steps=0,
        # Shapes are fixed (one image size, whole batches), so cuDNN may time its algorithms once
        # and keep the fastest, as the MAE reference sets it: its default heuristic ran the patch
        # embedding (a 16×16, stride-16 conv from 3 channels) at 2 ms of a 52 ms compiled H200
        # step: its FLOPs at the step's matmul rate take ~0.1 ms. No effect on the CPU.
        benchmark=True)
    model = MAELightning.from_config(cfg)
    data = datamodule if datamodule is not None else prepared.make_datamodule(
        source, cfg.model.image_size, t.batch_size, t.num_workers or 0, seed=t.seed,
        pin_memory=t.accelerator == "gpu", channels=cfg.model.channels,
        decode_on_device=t.decode_on_device)
    if plan.train is not None:  # the held-out images are never trained on
        data = TrainSplitDataModule(plan.train, cfg.model.image_size, t.batch_size,
                                    t.num_workers or 0, pin_memory=t.accelerator == "gpu",
                                    channels=cfg.model.channels)
    ckpt = str(paths.last_ckpt) if resume else None
    try:
        trainer.fit(model, datamodule=data, ckpt_path=ckpt, weights_only=True)
    except SIGTERMException:  # a SystemExit: left alone, the failed run exited 0
        if trainer.is_global_zero and paths.read_status().get("state") in LIVE_STATES:
            _record_termination(paths)  # not written in on_exception (a full disk): again
        return 1
    if stopper.terminated:  # stopped after its step, saved: said as SIGTERM, exit 1
        if trainer.is_global_zero:
            paths.clear_stop_request()
            _record_termination(paths)
        return 1
    if trainer.is_global_zero:
        state = "stopped" if stopper.requested else "finished"
        paths.clear_stop_request()
        recorder.write_progress(trainer, state=state)
    return 0


TERMINATED = "terminated by SIGTERM (the machine or container was shut down, or someone ran kill)"


def termination_text(paths: RunPaths) -> str:
    """Why a run ended on SIGTERM, and where Resume takes it up (Lightning's own record of it is
    the bare name ``pytorch_lightning.utilities.exceptions.SIGTERMException``)."""
    from mae_core.rundir import RunError, checkpoint_step

    try:
        # Unverified: only its step is read (memory-mapped); a shutdown's grace period (docker
        # stop: 10 s) is no time to read a large checkpoint through, and a resume verifies it.
        step = checkpoint_step(paths.last_ckpt, verify=False)
    except RunError:
        return f"{TERMINATED}; it had saved no checkpoint: start it again"
    return f"{TERMINATED}; Resume continues from step {step}"


def _record_termination(paths: RunPaths) -> None:
    with contextlib.suppress(OSError):  # never in place of the exit under way
        paths.write_status(state="failed", error=termination_text(paths),
                           log_tail=paths.log_tail())


def _failure_recorder(paths: RunPaths, stopper: Any) -> pl.Callback:
    """:class:`mae_core.callbacks.RecordFailure`, saying a SIGTERM in words at the same moment
    (before the teardown, after which Lightning may kill rank 0): one that came before the
    stopper took over the signal (Lightning's SIGTERMException), or one that a failure followed
    (a rank that died of it first)."""
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from mae_core.callbacks import RecordFailure

    class RecordFailureOrTermination(RecordFailure):
        def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                         exception: BaseException) -> None:
            if not (stopper.signalled or isinstance(exception, SIGTERMException)):
                super().on_exception(trainer, pl_module, exception)
            elif trainer.is_global_zero:
                _record_termination(self.paths)

    return RecordFailureOrTermination(paths)


def _int_or_none(text: str | None) -> int | None:
    return int(text) if text and text.isdigit() else None


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
    writer = first_process()
    # Set for the ranks Lightning launches (they run rank 0's command line, which may name no run
    # directory); in a first process it can only be left over from another run's environment.
    inherited = None if writer else os.environ.get(RUN_DIR_ENV)
    run_dir = args.run_dir or inherited
    if args.resume and not run_dir:
        raise ConfigError("resume", "--resume continues an existing run: name it with "
                                    "--run-dir checkpoints/<run-id>")
    if run_dir and not valid_run_id(Path(run_dir).resolve().name):
        # The app lists (and counts as live) only folders with such names: a run it cannot see
        # would get another started beside it on the same devices.
        raise ConfigError("run_dir", f"the run folder's name {Path(run_dir).resolve().name!r} "
                          f"may hold only {RUN_ID_RULE}; the app lists no other")
    if run_dir:
        paths = RunPaths(Path(run_dir))
        if not writer and not _wait_for(paths.config):
            raise ConfigError("run_dir", f"rank 0 wrote no {paths.config}: this rank cannot start")
        if paths.config.exists():
            cfg = RunConfig.load(paths.config)
            _require_launcher_world(cfg.with_overrides(**overrides))
            if args.resume and not paths.last_ckpt.exists():
                raise ConfigError("resume", f"{paths.last_ckpt} does not exist: nothing to resume")
            if writer:
                _check_continuation(cfg, paths, args.resume, overrides)
            if args.resume and writer:  # checked as the app's Resume checks it, before any write
                _check_resumable(paths, cfg.with_overrides(**overrides))
            if overrides and writer:  # e.g. --max-steps to extend a run; the ranks read it back
                cfg, _ = _resolve_data(cfg.with_overrides(**overrides).resolved())
                cfg.save(paths.config)
            if writer:
                _record_process(paths)
            return cfg, paths, args.resume
        if args.resume:
            raise ConfigError("resume", f"{paths.config} does not exist: nothing to resume")
    from mae_core.rundir import create_run

    base = RunConfig.load(args.config) if args.config else RunConfig()
    resolved = base.with_overrides(**overrides).resolved()
    _require_launcher_world(resolved)
    cfg, summary = _resolve_data(resolved)
    # process.json goes in before config.yaml (what makes the directory a run): a reader never
    # sees a live run that has no process to check.
    paths = create_run(cfg, runs_dir=args.runs_dir, run_dir=run_dir,
                       process=process_record(command=sys.argv), data_files=summary.files)
    return cfg, paths, False


def _check_continuation(cfg: RunConfig, paths: RunPaths, resume: bool,
                        overrides: dict[str, Any]) -> None:
    """What a command may do to an existing run: never train it twice at once, never restart a
    trained run from step 0 (its metrics and checkpoint would be overwritten), never resume it
    into a model its checkpoint cannot load (the config would keep the change)."""
    record = read_json(paths.process) or {}
    if record.get("pid") != os.getpid() and on_this_host(record) and record_alive(record):
        raise ConfigError("run_dir", f"{paths.root} is being trained by process {record['pid']}: "
                                     "stop it first")
    if not resume and paths.last_ckpt.exists():
        raise ConfigError("resume", f"{paths.root} holds a trained run: add --resume to continue "
                                    "it, or give a new --run-dir")
    model = cfg.with_overrides(**overrides).model if resume else cfg.model
    changed = [f.name for f in dataclasses.fields(model)
               if getattr(model, f.name) != getattr(cfg.model, f.name)]
    if changed:
        raise ConfigError(changed[0], "a resume continues the run's own model, which its checkpoint "
                                      "holds: start a new run to change it")


def _require_launcher_world(cfg: RunConfig) -> None:
    """Under torchrun, the processes it started are the run's: ``devices`` × ``num_nodes`` must
    be torchrun's world size. (With --devices 1 under --nproc-per-node 2, two single-process runs
    trained into one folder, each step logged twice; the reverse failed with a traceback.)"""
    world = os.environ.get("WORLD_SIZE", "")
    if "TORCHELASTIC_RUN_ID" not in os.environ or not world.isdigit():
        return
    t = cfg.train
    devices = t.devices if isinstance(t.devices, int) else None
    if devices is not None and devices * t.num_nodes != int(world):
        per_node = os.environ.get("LOCAL_WORLD_SIZE", "?")
        raise ConfigError("devices", f"torchrun started {world} processes ({per_node} per node), "
                          f"but devices × num_nodes is {devices} × {t.num_nodes}: give "
                          f"--devices {per_node} --num-nodes <the number of nodes>")


def _check_resumable(paths: RunPaths, cfg: RunConfig) -> None:
    from mae_core.runs import RunError, check_resumable

    try:
        check_resumable(paths, cfg)
    except RunError as err:
        raise ConfigError("resume", str(err)) from None


def _resolve_data(cfg: RunConfig) -> tuple[RunConfig, DataSummary]:
    # The one step of ``prepare`` that needs torch: imported here, after the flags are checked.
    from mae_core.channels import resolve_data

    return resolve_data(cfg)


def _record_process(paths: RunPaths) -> None:
    """Record this process in ``process.json`` unless the run manager that launched it already
    did, so the app can follow (and stop) a run started by hand, torchrun or SLURM."""
    if (read_json(paths.process) or {}).get("pid") != os.getpid():
        atomic_write_json(paths.process, process_record(command=sys.argv))


def _wait_for(path: Path, timeout_s: float = 120.0) -> bool:
    """Other ranks of a torchrun/SLURM job wait for rank 0 to write the run's config; whether it
    appeared."""
    if not path.exists():
        _say_waiting(f"to write {path} (up to {timeout_s:.0f} s)")
    deadline = time.monotonic() + timeout_s
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    return path.exists()


_said_waiting = False


def _say_waiting(what: str) -> None:
    """One line, once per process: a rank that waits in silence looks hung."""
    global _said_waiting
    if not _said_waiting:
        _said_waiting = True
        print(f"waiting for rank 0 {what}", flush=True)


def _refuse_stale_rank() -> str | None:
    """Why this process must not start, if a rank variable makes it other than the first while
    no launcher started it (a stale export in the shell): it would wait for a rank 0 that never
    comes (for its own run's data, up to 6 h), in silence."""
    if first_process() or launcher_evident():
        return None
    named = later_rank_vars()
    return (f"{' and '.join(named)} {'is' if len(named) == 1 else 'are'} set but no launcher "
            f"started this process: unset {'it' if len(named) == 1 else 'them'}")


def _drop_trainer_env() -> list[str]:
    """Remove ``PL_TRAINER_*`` from this process's environment (its ranks inherit the rest): the
    run's config says how it trains, a variable left in a shell must not
    (``PL_TRAINER_FAST_DEV_RUN`` ended a 12-step run at step 1 without a checkpoint). The names
    it removed."""
    names = sorted(k for k in os.environ if k.startswith(TRAINER_ENV_PREFIX))
    for name in names:
        del os.environ[name]
    if names:
        print(f"ignoring {', '.join(names)}: the run's config sets how it trains", flush=True)
    return names


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    stale = _refuse_stale_rank()
    if stale:
        parser.exit(2, f"error: {stale}\n")
    if os.environ.get("LOCAL_RANK", "0") != "0":  # a rank Lightning (or torchrun) started
        die_with_parent(_int_or_none(os.environ.get(RANK0_PID_ENV)))
    else:  # the ranks Lightning starts from this process know their parent by it
        os.environ[RANK0_PID_ENV] = str(os.getpid())
    try:
        cfg, paths, resume = prepare(args)
    except (ConfigError, DataError) as err:
        parser.exit(2, f"error: {err}\n")
    os.environ[RUN_DIR_ENV] = str(paths.root.resolve())
    gpus = cfg.train.gpus
    if gpus and not gpus_narrowed(gpus):
        # CUDA fixes the visible devices when it starts (resolving the config started it): the
        # trainer runs again, in this same process, seeing only the run's GPUs as 0..n-1 (mapped
        # through the shell's own CUDA_VISIBLE_DEVICES: never a GPU it fenced off).
        try:
            os.environ.update(gpu_env(gpus))
        except GpuNotVisibleError as err:
            parser.exit(2, f"error: gpus: {err}\n")
        command = [sys.executable, "-m", "mae_core.train", "--run-dir", str(paths.root.resolve())]
        os.execv(sys.executable, command + (["--resume"] if resume else []))
    if first_process():  # before torch is imported: said at once
        print(f"run directory: {paths.root}", flush=True)
    from mae_core import prepared
    from mae_core.diskspace import check_room
    from mae_core.fileio import DiskFullError

    if not first_process():
        known = prepared.read_run_data(paths.root)
        if known is None or known.source != cfg.train.data:
            _say_waiting(f"to record the run's data set in {paths.data_record}")
    if first_process():  # also where no app checked it (torchrun, SLURM, a script)
        try:
            check_room(cfg, paths.root, resuming=resume)
        except DiskFullError as err:
            print(f"error: {err.strerror}", file=sys.stderr, flush=True)
            with contextlib.suppress(OSError):
                paths.write_status(state="failed", error=err.strerror)
            return 2
    try:
        return run_training(cfg, paths, resume)
    except KeyboardInterrupt:
        return 1
    except Exception as err:  # noqa: BLE001 - the traceback goes to train.log, the summary to status.json
        from mae_core.callbacks import port_taken

        taken = port_taken(err)
        if taken:
            print(f"error: {taken}", file=sys.stderr, flush=True)
        else:
            traceback.print_exc()
        if first_process() and paths.read_status().get("state") in LIVE_STATES:
            from mae_core.callbacks import record_failure  # before fit, or not written in it

            record_failure(paths, err)
        return 1


if __name__ == "__main__":
    from mae_core.process import exit_quickly

    exit_quickly(main())
