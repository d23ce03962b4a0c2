"""What a run must satisfy before it is started or resumed, checked before any trainer is launched.

A resume needs a sound ``last.ckpt`` of the run's own model, max steps above the checkpoint's step,
the devices the run trains on still visible here, and (from the app) a single node. These guards
are shared by the app's :class:`mae_core.runs.RunManager` (Start, Queue and Resume) and the
command line ``python -m mae_core.train --resume``; each raises :class:`~mae_core.rundir.RunError`
saying why not, so a refused resume changes nothing instead of failing in the launched trainer.
"""

from __future__ import annotations

from pathlib import Path

from mae_core.config import ConfigError, ModelConfig, RunConfig
# mae_core.weights (torch) is imported inside the two checks that read a file: the page imports
# NoStepsLeft from here while torch is still loading in the background.
from mae_core.lastckpt import checkpoint_step
from mae_core.rundir import RunError, RunPaths, RunState


class NoStepsLeft(RunError):
    """A resume that would train no step: the run, or its checkpoint, is at its end. It keeps what
    its sentence is made of, so a caller with other controls than the command line's flags (the
    page's box beside Resume, which cannot raise a run's max epochs) says it in its own terms."""

    def __init__(self, what: str, step: int, epochs: int | None = None):
        self.what, self.step, self.epochs = what, step, epochs
        super().__init__(self.said())

    def said(self, raise_steps: str = "raise max steps", epochs_too: bool = True) -> str:
        """"<what>: <raise_steps> above <step> [...] to train it further"."""
        if self.epochs is None:
            return f"{self.what}: {raise_steps} above {self.step} to train it further"
        epochs = f" or max epochs above {self.epochs}" if epochs_too else ""
        return (f"{self.what}: {raise_steps} above {self.step} (the epoch limit then goes)"
                f"{epochs} to train it further")


def check_resumable(paths: RunPaths, cfg: RunConfig) -> int:
    """The step ``paths``' ``last.ckpt`` resumes ``cfg`` from, once its bytes, its model and
    ``cfg``'s max steps allow it (RunError says why not): what Resume checks, in the app and in
    ``python -m mae_core.train --resume`` (which took an overwritten checkpoint, or max steps at
    or below its step, and "finished" at once)."""
    step = checkpoint_step(paths.last_ckpt)
    require_same_model(paths, cfg)
    require_steps_left(cfg, step, paths.run_id)
    return step


def stopped_untrained(paths: RunPaths, status: dict) -> bool:
    """Whether the run was stopped before it trained a step, with no checkpoint (a Stop while
    its data was prepared): its Resume starts it from step 0. A run that trained steps and lost
    its checkpoint is not: starting it over would overwrite its curve."""
    return (status.get("state") == RunState.STOPPED and not status.get("step")
            and not paths.last_ckpt.exists() and not paths.weights.exists()
            and not paths.read_metrics())


def ended_at_max_epochs(status: dict, cfg: RunConfig) -> bool:
    """Whether the run finished at its max epochs, short of its max steps: resumed under the same
    epoch limit, Lightning ends the fit at once and the run "finishes" again, untrained."""
    t, step = cfg.train, status.get("step")
    return (status.get("state") == RunState.FINISHED and t.max_epochs is not None
            and (t.max_steps == -1 or (isinstance(step, int) and step < t.max_steps)))


def past_the_epoch_limit(status: dict, old: RunConfig, new: RunConfig, run_id: str) -> RunConfig:
    """``new``, the config a resume of a run that trained under ``old`` asks for, as it must be to
    train further (RunError if it cannot). A run that ended at its max epochs, given a new max
    steps, loses the epoch limit that ended it (Resume "towards 28 steps" used to end at once,
    still at step 8); given neither more steps nor more epochs, it is refused."""
    if not ended_at_max_epochs(status, old):
        return new
    epochs = old.train.max_epochs
    if 0 < new.train.max_steps != old.train.max_steps and new.train.max_epochs == epochs:
        new = new.with_overrides(max_epochs=None)
    if new.train.max_epochs is not None and new.train.max_epochs <= epochs:
        step = status.get("step")
        raise NoStepsLeft(f"run {run_id} finished its {epochs} epoch{'s' if epochs != 1 else ''} "
                          f"at step {step}", step, epochs)
    return new


def require_steps_past_the_end(status: dict, max_steps: int | None, run_id: str) -> None:
    """A finished run resumes only towards a max steps above the step it finished at."""
    step = status.get("step", 0)
    if status.get("state") == RunState.FINISHED and (max_steps is None or max_steps <= step):
        raise NoStepsLeft(f"run {run_id} has finished", step)


def require_steps_left(cfg: RunConfig, step: int, run_id: str) -> None:
    # max_steps -1 trains by epochs (max_epochs): no step count to be above.
    if cfg.train.max_steps != -1 and cfg.train.max_steps <= step:
        raise NoStepsLeft(f"the checkpoint of {run_id} is at step {step}", step)


def require_same_model(paths: RunPaths, cfg: RunConfig) -> None:
    """Refuse a ``last.ckpt`` of another model before a trainer is launched on it."""
    from mae_core.weights import checkpoint_mismatch

    mismatch = checkpoint_mismatch(paths.last_ckpt, cfg.model)
    if mismatch:
        raise RunError(f"{paths.last_ckpt} is not a checkpoint of this run's model "
                       f"({cfg.model.encoder_name}, {cfg.model.image_size} px / patch "
                       f"{cfg.model.patch_size}): {mismatch}. It cannot be resumed; start a new "
                       "run, or put back the last.ckpt this run wrote")


def require_weights_of(model: ModelConfig, weights: Path, run_id: str) -> ModelConfig:
    """The config ``weights`` were saved with; weights of another model than the run's (a file
    copied in by hand) refused, as :func:`require_same_model` refuses such a checkpoint: the
    encoder exported from them fits no snippet of the run's."""
    from mae_core.weights import load_model_config

    saved = load_model_config(weights)
    key = lambda cfg: (cfg.encoder_name, cfg.image_size, cfg.patch_size, cfg.channels)  # noqa: E731
    said = lambda cfg: (f"{cfg.encoder_name}, {cfg.image_size} px / patch {cfg.patch_size}, "  # noqa: E731
                        f"{cfg.channels} channels")
    if key(saved) != key(model):
        raise RunError(f"the weights of run {run_id} ({said(saved)}) are not of its model "
                       f"({said(model)}): put back the model.safetensors this run wrote")
    return saved


def require_one_node(cfg: RunConfig, run_id: str | None = None) -> None:
    """The app launches one machine's processes: a run on several nodes starts and resumes from
    their launcher (it waited in "starting" for nodes that never came)."""
    nodes = cfg.train.num_nodes
    if nodes > 1:
        what = f"run {run_id} trains" if run_id else "a run"
        raise RunError(f"{what} on {nodes} nodes: the app starts one machine's processes; "
                       "run it on every node with torchrun or srun (python -m mae_core.train "
                       f"--num-nodes {nodes} ...{' --resume' if run_id else ''})")


def require_devices(cfg: RunConfig, run_id: str) -> None:
    """The devices the run trained on are still here: checked as Start checks them (after an app
    restart under a narrower CUDA_VISIBLE_DEVICES, or on a machine with fewer cores, the trainer
    failed at launch instead)."""
    try:
        cfg.resolved()
    except ConfigError as err:
        raise RunError(f"run {run_id} cannot be resumed here: {err}") from None


def require_no_waiting_job(run_id: str, status: dict) -> None:
    """Refuse to resume a run that a SLURM job requeued itself to continue while SLURM still
    holds that job: both trainers would train it (the job's start, the later, is refused then,
    and the job ends). Once the job is cancelled or over, or where no squeue can say, it goes."""
    from mae_core.slurm import waiting_job_state

    job = status.get("requeued_job")
    state = waiting_job_state(job) if job else None
    if state is not None:
        raise RunError(f"run {run_id} is continued by SLURM job {job} ({state.lower()}) when it "
                       f"starts again: cancel it (scancel {job}) to resume the run here")
