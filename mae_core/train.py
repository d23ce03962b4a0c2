"""The trainer: ``python -m mae_core.train --config RUN.yaml [--field value ...]``.

One Lightning ``Trainer`` (DDP over every device: GPUs with NCCL, or CPU processes over gloo), writing
a run directory a person (or the app) can follow: ``status.json``, ``metrics.jsonl``, checkpoints,
weights and previews. The same command runs under ``torchrun`` or SLURM with ``--num-nodes``; pass
``--run-dir`` there so every node writes to the same (shared) directory, and ``--auto-resume`` where
the job may start again (a SLURM requeue). The command line is :mod:`mae_core.trainargs`; the
run directory it names is checked by :mod:`mae_core.runsetup`.

Exit codes: 0 finished or stopped on request, 1 training failed, 2 the config or data was refused.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import shlex
import sys
import traceback
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Only light modules here: a refused flag or config answers at once, without the seconds torch,
# Lightning, timm and lightly take to import; run_training imports them.
from mae_core.checks import DataError, StopRequested
from mae_core.config import ConfigError, RunConfig
from mae_core.process import (TRAINER_ENV_PREFIX, GpuNotVisibleError, die_with_parent, env_count,
                              first_process, gpu_env, gpus_narrowed)
from mae_core.rundir import LIVE_STATES, RunPaths, RunState
from mae_core.runsetup import (RUN_DIR_ENV, AlreadyFinished, prepare, refuse_stale_rank,
                               say_waiting)
from mae_core.trainargs import build_parser

if TYPE_CHECKING:
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import Logger

RANK0_PID_ENV = "MAE_STUDIO_RANK0_PID"  # set by a node's first process for the ranks it starts
# Normalising batches on the device is the point of MAELightning.on_after_batch_transfer.
warnings.filterwarnings("ignore", message=".*overridden `on_after_batch_transfer`.*")
# Lightning 2.6 asks torch's pytree a question torch 2.14 deprecates, twice per run, in every
# rank's log the app shows: not the user's to act on.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, (LeafSpec|TreeSpec)\)")
# A resume mid-epoch of a folder read in memory: its loader keeps no place, so the rest of that
# epoch is a fresh shuffle of the same images, each drawn with a new random crop and mask anyway
# (a prepared set's loader does keep its place). "Unreliable results" alarmed every resume's log.
warnings.filterwarnings("ignore", message=r".*checkpoint that ended before the epoch ended.*")


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

    from mae_core import datasource
    from mae_core.loggers import BoardLogger, JsonlLogger

    board = BoardLogger(save_dir=str(paths.tensorboard.parent), name=paths.tensorboard.name,
                        version="", default_hp_metric=False)
    # The job's global rank 0 only: under torchrun every node has a LOCAL_RANK 0 (and no NODE_RANK),
    # and the other ranks' TensorBoard experiment is None.
    if datasource.first_process():
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

    from mae_core.failures import record_termination
    from mae_core.model import MAELightning
    from mae_core.monitor import EvalPlan, no_evaluation_note, plan_evaluation

    t = cfg.train
    pl.seed_everything(t.seed, workers=True, verbose=False)
    torch.set_float32_matmul_precision("high")
    source = _open_data(t.data, paths)
    _stop_if_asked(paths)  # the data may have taken hours: a Stop meanwhile trains no step
    # Held-out evaluation (issue 14); a caller's own data module has no split to evaluate, and a
    # streamed (prepared) set is trained whole: its kNN monitor needs a separate eval_data folder.
    plan = (plan_evaluation(t, split_data=source.kind == "memory") if datamodule is None
            else EvalPlan())
    if datamodule is None and first_process() and not plan.active:
        note = no_evaluation_note(t, source.kind, source.files)
        if note:
            print(note, flush=True)
    callbacks = _callbacks(cfg, paths, source, plan, extra_callbacks or [])
    recorder, stopper = callbacks[0], callbacks[1]
    trainer = _trainer(cfg, paths, callbacks)
    model = MAELightning.from_config(cfg)
    data = datamodule if datamodule is not None else _datamodule(cfg, source, plan)
    _stop_if_asked(paths)
    _say_joining(trainer)
    try:
        trainer.fit(model, datamodule=data, ckpt_path=str(paths.last_ckpt) if resume else None,
                    weights_only=True)
    except SIGTERMException:  # a SystemExit: left alone, the failed run exited 0
        if trainer.is_global_zero and paths.read_status().get("state") in LIVE_STATES:
            record_termination(paths)  # not written in on_exception (a full disk): again
        return 1
    return _ended(trainer, paths, recorder, stopper)


def _stop_if_asked(paths: RunPaths) -> None:
    """Before training starts, the job's first process ends the run here once a stop is asked
    (:class:`StopRequested`, :func:`_stopped_before_training`). Once the ranks train, the stop
    is theirs to decide together (:class:`mae_core.callbacks.StopOnRequest`). Under torchrun or
    srun the other ranks started beside this one and wait for it in the rendezvous: ended here,
    it left them waiting there (torch's 30 minutes) while the run read "stopped", so there the
    stop waits for the ranks' own check at the start of training."""
    if first_process() and not _ranks_started_beside() and paths.stop_requested():
        raise StopRequested("a stop was asked before the run trained a step")


def _ranks_started_beside() -> bool:
    """Whether a launcher (torchrun, srun) started this job's other ranks beside this process;
    the ranks Lightning starts come later, from this process's own ``fit``."""
    launched = ("WORLD_SIZE", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS")
    return max(env_count(name) for name in launched) > 1


def _stopped_before_training(paths: RunPaths) -> int:
    """A stop that came before the first step (in the data check, the data preparation, a wait
    for another process preparing the same set): the run reads stopped, its Resume starts where
    it was (step 0, or a resumed run's checkpoint), and nothing was trained. Exit 0, as a Stop."""
    if not first_process():
        return 0  # the first process records it
    step = paths.read_status().get("step") or 0
    paths.clear_stop_request()
    with contextlib.suppress(OSError, ValueError):  # a full disk: the app reads the exit
        paths.write_status(state=RunState.STOPPED, error=None, log_tail=None)
    print(f"stopped on request before training a step (at step {step}): nothing was trained; "
          "Resume starts it from there", flush=True)
    return 0


def _open_data(data: str, paths: RunPaths) -> Any:
    """What the run trains on (:func:`mae_core.datasource.run_data`): a folder, a prepared set or
    a URL, decided (and a large folder prepared) once per run."""
    from mae_core import datasource

    if datasource.is_remote(data):  # a network wait (credentials, retries) must not look like a hang
        print(f"opening the remote data set {data}", flush=True)
    try:
        return datasource.run_data(data, paths.root)
    except KeyboardInterrupt:  # Ctrl+C while the data are prepared is a Stop, as it is in training
        raise StopRequested from None
    except DataError as err:  # the other ranks and nodes wait on status.json to give up
        if datasource.first_process():
            paths.write_status(state=RunState.FAILED, error=str(err))
        raise


def _callbacks(cfg: RunConfig, paths: RunPaths, source: Any, plan: Any,
               extra: list[pl.Callback]) -> list[pl.Callback]:
    """The trainer's callbacks, in the order they run each step: the recorder and the stopper
    first (the stop is decided before anything saves), a step's metric lines before its
    checkpoint, the caller's after the trainer's own, the failure record last."""
    from mae_core import datasource
    from mae_core.callbacks import Previews, ProgressRecorder, StopOnRequest
    from mae_core.checkpointing import SaveCheckpoints
    from mae_core.failures import RecordFailure
    from mae_core.monitor import HeldOutMonitor
    from mae_core.snapshots import WeightSnapshots

    t = cfg.train
    recorder = ProgressRecorder(paths, log_every_n_steps=t.log_every_n_steps)
    stopper = StopOnRequest(paths, recorder)
    callbacks: list[pl.Callback] = [recorder, stopper]
    if plan.active:
        callbacks.append(HeldOutMonitor(plan, paths.metrics, t.eval_every_n_steps, t.batch_size,
                                        recorder))
    callbacks.append(SaveCheckpoints(paths, t.checkpoint_every_n_steps, recorder))
    if t.num_previews:
        callbacks.append(Previews(paths, datasource.source_previews(
            source, cfg.model.image_size, t.num_previews, cfg.model.channels), t.preview_every_n_steps))
    callbacks.extend(extra)
    if t.weight_snapshots:  # the Reconstruct tab's weights history (issue 14, item 5)
        callbacks.append(WeightSnapshots(paths.root, t.weight_snapshots, t.checkpoint_every_n_steps))
    callbacks.append(RecordFailure(paths, stopper))
    return callbacks


def _trainer(cfg: RunConfig, paths: RunPaths, callbacks: list[pl.Callback]) -> pl.Trainer:
    import pytorch_lightning as pl

    from mae_core.checkpointing import AtomicCheckpointIO
    from mae_core.slurm import slurm_environment

    t = cfg.train
    _drop_trainer_env()
    plugins = [AtomicCheckpointIO(), slurm_environment()]
    return pl.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, precision=t.precision,
        strategy=make_strategy(cfg), max_steps=t.max_steps, max_epochs=t.max_epochs or -1,
        accumulate_grad_batches=t.accumulate_grad_batches,  # max_steps counts optimizer steps
        callbacks=callbacks, logger=loggers(cfg, paths), log_every_n_steps=t.log_every_n_steps,
        plugins=[p for p in plugins if p is not None], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(paths.root), num_sanity_val_steps=0,
        # Shapes are fixed (one image size, whole batches), so cuDNN may time its algorithms once
        # and keep the fastest, as the MAE reference sets it: its default heuristic ran the patch
        # embedding (a 16×16, stride-16 conv from 3 channels) at 2 ms of a 52 ms compiled H200
        # step: its FLOPs at the step's matmul rate take ~0.1 ms. No effect on the CPU.
        benchmark=True)


def _datamodule(cfg: RunConfig, source: Any, plan: Any) -> pl.LightningDataModule:
    from mae_core import datasource
    from mae_core.splits import TrainSplitDataModule

    t = cfg.train
    if plan.train is not None:  # the held-out images are never trained on
        return TrainSplitDataModule(plan.train, cfg.model.image_size, t.batch_size,
                                    t.num_workers or 0, pin_memory=t.accelerator == "gpu",
                                    channels=cfg.model.channels)
    return datasource.make_datamodule(
        source, cfg.model.image_size, t.batch_size, t.num_workers or 0, seed=t.seed,
        pin_memory=t.accelerator == "gpu", channels=cfg.model.channels,
        decode_on_device=t.decode_on_device)


def _ended(trainer: pl.Trainer, paths: RunPaths, recorder: Any, stopper: Any) -> int:
    """Rank 0 records how fit ended (finished, stopped, requeued or terminated); the exit code."""
    from mae_core.failures import record_termination
    from mae_core.slurm import requeue_slurm_job, slurm_job

    if stopper.terminated and not stopper.requeue:  # stopped after its step, saved: exit 1
        if trainer.is_global_zero:
            paths.clear_stop_request()
            record_termination(paths)
        return 1
    # A stop or a requeue that lands on the last step: the run is done (requeued, every later
    # start of the job would be refused: nothing left to resume).
    done = 0 < trainer.max_steps <= trainer.global_step
    if trainer.is_global_zero:
        state = (RunState.STOPPED if (stopper.requested or stopper.requeue) and not done
                 else RunState.FINISHED)
        paths.clear_stop_request()
        recorder.write_progress(trainer, state=state)
        if not (stopper.requeue and not done):
            print(ended_line(state, trainer.global_step, trainer.max_steps, recorder.last_row,
                             paths.root), flush=True)
        if stopper.requeue and not done:  # SLURM's time limit or preemption is near: requeued
            requeued, said = requeue_slurm_job()
            print(said, flush=True)
            # Said where the app shows the run: it reads "stopped" like a user's Stop, and its
            # Resume is refused while the job waits to continue it (RunManager.resume).
            with contextlib.suppress(OSError):  # the job may be ending already
                paths.write_status(error=f"stopped at step {trainer.global_step} by SLURM's "
                                         f"requeue signal; {said}",
                                   requeued_job=slurm_job() if requeued else None)
    return 0


def ended_line(state: str, step: int, max_steps: int, last_row: dict[str, Any] | None,
               root: Path) -> str:
    """What a run started by hand says as it ends (a Ctrl-C Stop used to end in silence, a finished
    run on Lightning's "`max_steps=30` reached"): where it got, and the command that goes on."""
    run = shlex.quote(str(root))
    loss = f" (loss {last_row['loss']:.4f})" if last_row and "loss" in last_row else ""
    of = f"/{max_steps:,}" if max_steps > 0 else ""
    if state == RunState.STOPPED:
        return (f"stopped at step {step:,}{of}{loss}, saved; continue it with "
                f"python -m mae_core.train --run-dir {run} --resume")
    return (f"finished at step {step:,}{of}{loss}; weights in {run}/model.safetensors\n"
            f"  evaluate it:     python -m mae_core.evaluate --run {run}\n"
            f"  export for timm: python -m mae_core.export --run {run}\n"
            f"  train further:   python -m mae_core.train --run-dir {run} --resume --max-steps N")


def _say_joining(trainer: pl.Trainer) -> None:
    """Rank 0 of a job whose processes torchrun or srun start waits for them all in fit, silent
    for up to the 10-minute timeout when one never comes (an sbatch script without srun, a node
    that did not start): it says so first."""
    # Before fit, the trainer's ranks and world size are not set yet: the job's own are read.
    world = trainer.num_nodes * trainer.num_devices
    if world < 2 or not first_process():
        return
    if not trainer.strategy.cluster_environment.creates_processes_externally:
        return  # the ranks Lightning starts itself
    where = os.environ.get("MASTER_ADDR", "")
    where = f" at {where}:{os.environ.get('MASTER_PORT', '?')}" if where else ""
    others = world - 1
    print(f"waiting for the job's other {others} process{'es' if others > 1 else ''} to join"
          f"{where} (started by torchrun or srun on every node; given up after 10 minutes)",
          flush=True)


def _int_or_none(text: str | None) -> int | None:
    return int(text) if text and text.isdigit() else None


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
    from mae_core.slurm import catch_requeue_signal_early

    catch_requeue_signal_early()
    parser = build_parser()
    args = parser.parse_args(argv)
    stale = refuse_stale_rank()
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
    except AlreadyFinished as done:
        print(done, flush=True)
        return 0
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
        paths.keep_status_fresh()  # through a data preparation of hours, a step of minutes
    try:
        _stop_if_asked(paths)  # asked while the config and the data were checked
        from mae_core import datasource
        from mae_core.diskspace import check_room
        from mae_core.fileio import DiskFullError
    except StopRequested:
        return _stopped_before_training(paths)

    if not first_process():
        known = datasource.read_run_data(paths.root)
        if known is None or known.source != cfg.train.data:
            say_waiting(f"to record the run's data set in {paths.data_record}")
    if first_process():  # also where no app checked it (torchrun, SLURM, a script)
        try:
            check_room(cfg, paths.root, resuming=resume)
        except DiskFullError as err:
            print(f"error: {err.strerror}", file=sys.stderr, flush=True)
            with contextlib.suppress(OSError):
                paths.write_status(state=RunState.FAILED, error=err.strerror)
            return 2
    try:
        return run_training(cfg, paths, resume)
    except KeyboardInterrupt:
        return 1
    except StopRequested:
        return _stopped_before_training(paths)
    except Exception as err:  # noqa: BLE001 - the traceback goes to train.log, the summary to status.json
        from mae_core.failures import port_taken

        taken = port_taken(err)
        if taken:
            print(f"error: {taken}", file=sys.stderr, flush=True)
        else:
            traceback.print_exc()
        if first_process() and paths.read_status().get("state") in LIVE_STATES:
            from mae_core.failures import record_failure  # before fit, or not written in it

            record_failure(paths, err)
        return 1


if __name__ == "__main__":
    from mae_core.process import exit_quickly

    exit_quickly(main())
