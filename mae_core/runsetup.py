"""The run directory the trainer's command line names (:mod:`mae_core.trainargs`), checked before
anything is written.

``python -m mae_core.train`` (:mod:`mae_core.train`) gets its config and run directory from
:func:`prepare`. Only the job's first process writes; every other rank (Lightning's, torchrun's,
SLURM's) reads back what it wrote.

A job that may be started again with the same command (SLURM requeues it after a preemption, a
script retries it) passes ``--auto-resume``: it continues its ``--run-dir`` from the last
checkpoint when there is one, starts it when there is none, and exits 0 when it already finished.
A requeued SLURM job (``SLURM_RESTART_COUNT`` > 0) does so without the flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mae_core.config import ConfigError, RunConfig
from mae_core.devices import share_devices
from mae_core.fileio import atomic_write_json, read_json
from mae_core.process import (first_process, later_rank_vars, launcher_evident, live_trainer,
                              on_this_host, started_at)
from mae_core.lastckpt import checkpoint_step
from mae_core.rundir import (LIVE_STATES, RUN_ID_RULE, RunError, RunPaths, RunState,
                             create_run, process_record, runs_folder_lock, valid_run_id)
from mae_core.runsdirs import live_runs, note_runs_dir, other_runs_dirs
from mae_core.slurm import requeued_start, slurm_job

if TYPE_CHECKING:
    from mae_core.data import DataSummary

RUN_DIR_ENV = "MAE_STUDIO_RUN_DIR"


# --- the run directory ------------------------------------------------------------------------

class AlreadyFinished(Exception):
    """``--auto-resume`` of a run that already reached its end: nothing to do (exit 0)."""


def prepare(args: argparse.Namespace) -> tuple[RunConfig, RunPaths, bool]:
    """Resolve the config and the run directory; only the first process writes anything.

    A run directory that already holds ``config.yaml`` (made by the run manager, by rank 0 for the
    ranks Lightning launches, or by a previous session for ``--resume``) is the config's source.
    Raises :class:`AlreadyFinished` for an automatic resume of a finished run.
    """
    overrides = {k: v for k, v in vars(args).items()
                 if k not in ("config", "run_dir", "runs_dir", "resume", "auto_resume")}
    writer = first_process()
    # Set for the ranks Lightning launches (they run rank 0's command line, which may name no run
    # directory); in a first process it can only be left over from another run's environment.
    inherited = None if writer else os.environ.get(RUN_DIR_ENV)
    run_dir = args.run_dir or inherited
    automatic = getattr(args, "auto_resume", False) or (requeued_start() and run_dir is not None)
    if (args.resume or automatic) and not run_dir:
        flag = "--resume" if args.resume else "--auto-resume"
        raise ConfigError("resume", f"{flag} continues a named run: give it with "
                                    "--run-dir checkpoints/<run-id>, the same at every start")
    # The name the app lists is the one in its runs folder: a link's own, not its target's.
    name = Path(os.path.abspath(run_dir)).name if run_dir else ""
    if run_dir and not valid_run_id(name):
        # The app lists (and counts as live) only folders with such names: a run it cannot see
        # would get another started beside it on the same devices.
        raise ConfigError("run_dir", f"the run folder's name {name!r} "
                          f"may hold only {RUN_ID_RULE}; the app lists no other")
    if run_dir:
        paths = RunPaths(Path(run_dir))
        if not writer and not wait_for(paths.config):
            raise ConfigError("run_dir", f"rank 0 wrote no {paths.config}: this rank cannot start")
        if paths.config.exists():
            cfg = RunConfig.load(paths.config)
            resume = args.resume or (automatic and paths.last_ckpt.exists())
            if automatic and resume:  # a model flag is refused, finished or not
                _require_same_model(cfg, overrides)
                _stop_if_finished(cfg, cfg.with_overrides(**overrides), paths)
            return _continue_run(cfg, paths, resume, overrides, writer)
        if args.resume:
            raise ConfigError("resume", f"{paths.config} does not exist: nothing to resume")
        if writer:
            _require_new_run_folder(paths.root)
    # Your own file, perhaps a link (dotfiles): a run's config.yaml is never read through one.
    base = RunConfig.load(Path(args.config).resolve()) if args.config else RunConfig()
    resolved = base.with_overrides(**overrides).resolved()
    _require_launcher_world(resolved)
    runs_dir = Path(run_dir).parent if run_dir else Path(args.runs_dir)
    # before the machine's list of runs folders notes it
    if run_dir:
        _require_runs_folder(Path(run_dir), "run_dir")
    else:
        _require_runs_folder(runs_dir, "runs_dir")
    _require_devices_free(resolved, runs_dir)  # before the seconds the data takes
    cfg, summary = _resolve_data(resolved)
    if note := summary.alpha_note():
        print(f"note: {note}", flush=True)
    # Checked again, and the run made, under the runs folder's lock, as the app's Start does:
    # a Start in the seconds the data took went ahead beside this run on the same devices.
    with runs_folder_lock(runs_dir, make=run_dir is None) as locked:
        if not locked:
            print(f"note: {runs_dir} cannot be locked (its file system has no flock): an app's "
                  "Start there at this very moment could share this run's devices", flush=True)
        _require_devices_free(resolved, runs_dir)
        # process.json goes in before config.yaml (what makes the directory a run): a reader
        # never sees a live run that has no process to check.
        paths = create_run(cfg, runs_dir=args.runs_dir, run_dir=run_dir,
                           process=_own_record(overrides), data_files=summary.files)
    _clear_stale_stop(paths)
    return cfg, paths, False


def _require_runs_folder(target: Path, flag: str) -> None:
    """``target`` (``--runs-dir``, or a new ``--run-dir``: ``flag``) a folder a run can be made
    in (made later where missing, in the nearest folder that exists): a file there, or a folder
    nothing can be written in (``/proc``), ended the trainer in a traceback after the data check,
    and the runs folder was noted in the machine's list of runs folders first."""
    folder = Path(os.path.abspath(target))
    other = f"pass another --{flag.replace('_', '-')}"
    try:
        existing = next(p for p in (folder, *folder.parents) if p.exists())
        if not existing.is_dir():
            raise ConfigError(flag, f"{existing} is a file, not a folder: {other}")
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise ConfigError(flag, f"{folder} cannot be written ({err.strerror or err}): "
                                f"{other}") from None


def _continue_run(cfg: RunConfig, paths: RunPaths, resume: bool, overrides: dict[str, Any],
                  writer: bool) -> tuple[RunConfig, RunPaths, bool]:
    """The config of a run directory that exists: resumed, started again before its first
    checkpoint, or joined by a later rank."""
    _require_launcher_world(cfg.with_overrides(**overrides))
    if writer and (problem := paths.misplaced()):
        raise ConfigError("run_dir", f"{paths.root} cannot be trained in: {problem}. Move or "
                                     "delete what is in the way")
    if resume and not paths.last_ckpt.exists():
        raise ConfigError("resume", f"{paths.last_ckpt} does not exist: nothing to resume")
    if writer:
        _check_continuation(cfg, paths, resume, overrides)
        wanted = cfg.with_overrides(**overrides)
        if resume:  # checked as the app's Resume checks it, before any write
            wanted = _resume_config(paths, cfg, wanted)
        if overrides:  # e.g. --max-steps to extend a run; the ranks read it back
            cfg, _ = _resolve_data(wanted.resolved())
            cfg.save(paths.config)
        if _record_process(paths, overrides):  # started by hand (the app clears it itself)
            _clear_stale_stop(paths)
    elif overrides:
        cfg = _config_with(paths, overrides)
    return cfg, paths, resume


def _stop_if_finished(trained: RunConfig, cfg: RunConfig, paths: RunPaths) -> None:
    """An automatic resume of a run that finished (or was stopped) at or past its max steps, or
    at its max epochs, has nothing to do: a requeued job that had ended, a script run once more.
    Every rank reads the same files (the first process writes nothing in this case), so all exit
    together. ``trained``: the config the run trained under; ``cfg``: with this command's flags."""
    from mae_core.resumecheck import past_the_epoch_limit

    status = paths.read_status()
    try:
        past_the_epoch_limit(status, trained, cfg, paths.root.name)
    except RunError:
        raise AlreadyFinished(f"{paths.root} already finished its {trained.train.max_epochs} "
                              "epochs: nothing to do (give a higher --max-steps or --max-epochs "
                              "to train it further)") from None
    if status.get("state") not in (RunState.FINISHED, RunState.STOPPED) or cfg.train.max_steps < 0:
        return
    try:
        step = checkpoint_step(paths.last_ckpt, verify=False)  # the resume checks it in full
    except RunError:
        return
    if step >= cfg.train.max_steps:
        raise AlreadyFinished(f"{paths.root} already finished at step {step}: nothing to do "
                              "(give a higher --max-steps to train it further)")


def _require_new_run_folder(root: Path) -> None:
    """A new run goes into a new (or empty) folder that is not inside another run: a folder of
    photos would get a run's files (and a Delete in the app removes the folder with everything in
    it), and a run inside another run is listed nowhere (the app lists a runs folder's children)."""
    if root.is_symlink() and not root.exists():
        raise ConfigError("run_dir", f"{root} is a link to {os.readlink(root)}, which does not "
                          "exist: make that folder first, or give another --run-dir")
    for parent in root.resolve().parents:
        if RunPaths(parent).is_run():
            raise ConfigError("run_dir", f"{root} is inside the run {parent}: give a folder "
                              "beside it, e.g. with --runs-dir")
    if root.is_file():
        raise ConfigError("run_dir", f"{root} is a file: give a new folder")
    if root.is_dir():
        # What a run folder holds before its config.yaml: a start that failed there may start again.
        run = RunPaths(root)
        before_config = {p.name for p in (run.status, run.process, run.log, run.stop_request)}
        try:
            others = sorted(p.name for p in root.iterdir() if p.name not in before_config
                            and not p.name.startswith("."))
        except OSError:
            return  # unreadable: creating the run there says why in its own words
        if others:
            raise ConfigError("run_dir", f"{root} already holds files that are not a run's "
                              f"({', '.join(others[:3])}{', …' if len(others) > 3 else ''}): a "
                              "new run needs a new or empty folder")


def _require_devices_free(cfg: RunConfig, runs_dir: Path) -> None:
    """A new run started by hand is refused where the app would refuse it: beside a live run on
    this machine, of its runs folder or any other (:mod:`mae_core.runsdirs`), that holds devices
    it needs (each CPU run holds them all). The app refuses to start beside a run started by
    hand; the reverse went unchecked."""
    note_runs_dir(runs_dir)
    here = os.path.realpath(runs_dir)
    for paths, pid, other in live_runs([Path(runs_dir), *other_runs_dirs(runs_dir)]):
        if share_devices(cfg, other):
            name = (paths.run_id if os.path.realpath(paths.root.parent) == here
                    else str(paths.root))
            raise ConfigError("devices", f"run {name} is training on this machine's devices "
                              f"(process {pid}): stop it first, or give --gpus that it does not "
                              "use")


def _check_continuation(cfg: RunConfig, paths: RunPaths, resume: bool,
                        overrides: dict[str, Any]) -> None:
    """What a command may do to an existing run: never train it twice at once, never restart a
    trained run from step 0 (its metrics and checkpoint would be overwritten), never resume it
    into a model its checkpoint cannot load (the config would keep the change)."""
    record = read_json(paths.process) or {}
    pid = live_trainer(record, paths.root, besides=os.getpid())
    if pid is not None:
        raise ConfigError("run_dir", f"{paths.root} is being trained by process {pid}: "
                                     "stop it first")
    _refuse_a_trainer_elsewhere(paths, record)
    if not resume and paths.last_ckpt.exists():
        raise ConfigError("resume", f"{paths.root} holds a trained run: add --resume (or "
                                    "--auto-resume) to continue it, or give a new --run-dir")
    if resume:
        _require_same_model(cfg, overrides)


def _refuse_a_trainer_elsewhere(paths: RunPaths, record: dict[str, Any]) -> None:
    """A run recorded on another host (a shared runs folder) counts as trained there while its
    status is live and was refreshed lately, as the app judges it: no pid check sees across hosts,
    so a start on host B trained the run beside its live trainer on host A. A start of the SLURM
    job the record names is that job requeued (a node failure): SLURM never runs a job twice."""
    if on_this_host(record):
        return
    from mae_core.runwatch import REMOTE_SILENCE_S, heard_within, silent_for

    status = paths.read_status()
    if status.get("state") not in LIVE_STATES or not heard_within(status, REMOTE_SILENCE_S):
        return
    job = slurm_job()
    if job is not None and record.get("slurm_job") == job:
        return
    raise ConfigError("run_dir", f"{paths.root} is being trained on host {record.get('host')} "
                      f"(heard from {max(silent_for(status), 0):.0f} s ago): stop it there first. "
                      f"If that host is down, Force stop the run in the app, or start again once "
                      f"it has been silent for {REMOTE_SILENCE_S / 60:.0f} minutes")


def _require_same_model(cfg: RunConfig, overrides: dict[str, Any]) -> None:
    """A resume continues the model its checkpoint holds: a model flag that changes it is refused
    (the config would keep the change, and the checkpoint not load into it)."""
    model = cfg.with_overrides(**overrides).model
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


def _resume_config(paths: RunPaths, trained: RunConfig, wanted: RunConfig) -> RunConfig:
    """The config ``--resume`` continues the run under, checked as the app's Resume checks it."""
    from mae_core.resumecheck import check_resumable, past_the_epoch_limit

    try:
        cfg = past_the_epoch_limit(paths.read_status(), trained, wanted, paths.root.name)
        check_resumable(paths, cfg)
    except RunError as err:
        raise ConfigError("resume", str(err)) from None
    return cfg


def _resolve_data(cfg: RunConfig) -> tuple[RunConfig, DataSummary]:
    # The one step of ``prepare`` that needs torch: imported here, after the flags are checked.
    from mae_core.channels import resolve_data

    return resolve_data(cfg)


def _record_process(paths: RunPaths, overrides: dict[str, Any]) -> bool:
    """Record this process in ``process.json`` unless the run manager that launched it already
    did, so the app can follow (and stop) a run started by hand, torchrun or SLURM. Whether it
    was started so (not by the app)."""
    if (read_json(paths.process) or {}).get("pid") == os.getpid():
        return False
    record = _own_record(overrides) | {"run_dir": str(paths.root.resolve())}
    atomic_write_json(paths.process, record)
    return True


def _clear_stale_stop(paths: RunPaths) -> None:
    """A STOP file older than this process asks nothing of it: left by a trainer killed before
    it could clear it (a Force stop, a crash), it stopped every start by hand after its first
    step (a requeued SLURM job then ended for good). One made since (Stop clicked in the app
    while this trainer starts up) stands."""
    started = started_at()
    try:
        made = paths.stop_request.stat().st_mtime
    except OSError:
        return
    if started is not None and made < started:
        paths.clear_stop_request()


def _own_record(overrides: dict[str, Any]) -> dict[str, Any]:
    """This process's record, with the flags it applied to the run's config: the sign, for the
    job's later ranks, that config.yaml is the one this command wrote (:func:`_config_with`)."""
    job = slurm_job()
    return process_record(command=sys.argv, overrides=_as_recorded(overrides),
                          **({"slurm_job": job} if job else {}))


def _as_recorded(overrides: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(overrides, sort_keys=True))


# --- the other ranks ----------------------------------------------------------------------------

def wait_for(path: Path, timeout_s: float = 120.0) -> bool:
    """Other ranks of a torchrun/SLURM job wait for rank 0 to write the run's config; whether it
    appeared."""
    return _wait_until(path.exists, f"to write {path}", timeout_s)


def _wait_until(done: Callable[[], bool], what: str, timeout_s: float) -> bool:
    """Poll ``done`` until it holds or ``timeout_s`` pass, saying once what this rank waits for
    rank 0 ``what``; whether it held."""
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() >= deadline:
            return False
        say_waiting(f"{what} (up to {timeout_s:.0f} s)")
        time.sleep(0.2)
    return True


_said_waiting = False


def _config_with(paths: RunPaths, overrides: dict[str, Any],
                 timeout_s: float = 120.0) -> RunConfig:
    """The run's config once rank 0 of this job has written it with the command's flags. Read
    before (``--max-steps 6`` given to a requeued 2-rank job), a later rank trained to the old max
    steps while rank 0 trained to 6, and the longer one waited in DDP for steps the other never
    took until gloo gave up (10 minutes). Rank 0 records the flags in process.json after it saves
    the config; a record with the same flags from an earlier start names a config with them too."""
    wanted = _as_recorded(overrides)
    if not _wait_until(lambda: (read_json(paths.process) or {}).get("overrides") == wanted,
                       "to write the run's config with this command's flags", timeout_s):
        raise ConfigError("run_dir", f"rank 0 wrote no config with this command's flags "
                          f"({', '.join(sorted(overrides))}) in {timeout_s:.0f} s: this rank "
                          "cannot start")
    return RunConfig.load(paths.config)


def say_waiting(what: str) -> None:
    """One line, once per process: a rank that waits in silence looks hung."""
    global _said_waiting
    if not _said_waiting:
        _said_waiting = True
        print(f"waiting for rank 0 {what}", flush=True)


def refuse_stale_rank() -> str | None:
    """Why this process must not start, if a rank variable makes it other than the first while
    no launcher started it (a stale export in the shell): it would wait for a rank 0 that never
    comes (for its own run's data, up to 6 h), in silence."""
    if first_process() or launcher_evident():
        return None
    named = later_rank_vars()
    return (f"{' and '.join(named)} {'is' if len(named) == 1 else 'are'} set but no launcher "
            f"started this process: unset {'it' if len(named) == 1 else 'them'}")
