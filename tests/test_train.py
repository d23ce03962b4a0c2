"""The trainer process under faults: kills mid-save and mid-run, a tmpfs $TMPDIR, then resume.

Every run is a real ``python -m mae_core.train`` (through a small wrapper that can add an audit hook
or kill -9 the whole process group at a chosen point) with a tiny ViT on 32 px photos.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from unittest import mock

import pytest
import torch

from helpers import poll, squeue_saying
from mae_core.fileio import is_temp_file
from mae_core.process import clean_env
from mae_core.rundir import RunError, RunPaths
from mae_core.runs import RunManager
from mae_core.train import ended_line
from mae_core.weights import load_model

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY = ["--model", "vit-tiny", "--image-size", "32", "--patch-size", "8", "--batch-size", "4",
        "--accelerator", "cpu", "--checkpoint-every-n-steps", "2", "--preview-every-n-steps", "2",
        "--num-previews", "2"]

# ``python -m mae_core.train`` plus two optional fault tools, chosen by environment variables:
# MAE_TEST_AUDIT records every file opened for writing and every rename/copy (Python audit events);
# MAE_TEST_KILL_AT kills the whole run (kill -9 of the process group) right after the trainer's
# own callbacks finished that step, i.e. just after its checkpoint was saved.
WRAPPER = textwrap.dedent("""
    import atexit, json, os, signal, sys
    import pytorch_lightning as pl
    from mae_core import train

    records = []
    if os.environ.get("MAE_TEST_AUDIT"):
        def hook(event, args):
            # An int is a descriptor os.open already opened (and recorded), as os.fdopen's is.
            if event == "open" and args[0] is not None and not isinstance(args[0], int) and (
                    (args[1] and any(c in str(args[1]) for c in "wax+")) or
                    (isinstance(args[2], int) and args[2] & (os.O_WRONLY | os.O_RDWR))):
                records.append(["write", os.fsdecode(args[0])])
            elif event in ("os.rename", "os.replace", "shutil.copyfile", "shutil.move"):
                records.append([event, os.fsdecode(args[0]), os.fsdecode(args[1])])
        sys.addaudithook(hook)
        atexit.register(lambda: open(os.environ["MAE_TEST_AUDIT"] + f".{os.getpid()}", "x")
                        .write(json.dumps(records)))

    class KillAfterStep(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.is_global_zero and trainer.global_step == int(os.environ["MAE_TEST_KILL_AT"]):
                os.killpg(os.getpgid(0), signal.SIGKILL)

    if os.environ.get("MAE_TEST_KILL_AT"):
        real = train.run_training
        train.run_training = lambda cfg, paths, resume=False: real(
            cfg, paths, resume, extra_callbacks=[KillAfterStep()])
    sys.exit(train.main())
""")


def _train(tmp_path: Path, *args: str, tmpdir: Path | None = None, **env_extra: str
           ) -> subprocess.CompletedProcess:
    """Run the trainer (through :data:`WRAPPER`) in its own process group; kill what is left."""
    script = tmp_path / "trainer_wrapper.py"
    script.write_text(WRAPPER)
    env = clean_env(**env_extra)  # no launcher variables; the project importable
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    proc = subprocess.Popen([sys.executable, str(script), *args], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=300)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(proc.args, proc.returncode, output, "")


@pytest.fixture
def tmpfs_tmpdir(tmp_path):
    """A $TMPDIR on another file system than the run directory (tmpfs /dev/shm where there is one)."""
    base = Path("/dev/shm") if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) \
        else tmp_path
    folder = base / f"mae-test-tmpdir-{uuid.uuid4().hex}"
    folder.mkdir()
    yield folder
    for path in sorted(folder.rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    folder.rmdir()


def _files_in(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def _audit(tmp_path: Path) -> list[list[str]]:
    records = []
    for path in tmp_path.glob("audit.*"):
        records += json.loads(path.read_text())
        path.unlink()
    return records


def _checkpoint_step(paths: RunPaths) -> int:
    return torch.load(paths.last_ckpt, map_location="cpu", weights_only=True)["global_step"]


def _assert_written_in_place(tmp_path: Path, paths: RunPaths, tmpdir: Path) -> None:
    """The audit of a run: checkpoint and weights written in the run directory, nothing through
    $TMPDIR, every file renamed into place from a temp file in its own folder, none left over."""
    records = _audit(tmp_path)
    run_root = str(paths.root.resolve())
    written = [r[1] for r in records if r[0] == "write" and r[1].startswith(run_root)]
    assert any("last.ckpt" in p for p in written) and any("model.safetensors" in p for p in written)
    assert not [r for r in records if r[0] == "write" and r[1].startswith(str(tmpdir))]
    moves = [r for r in records if r[0] != "write" and r[2].startswith(run_root)]
    assert moves and all(r[0] in ("os.rename", "os.replace") for r in moves), moves
    assert all(Path(src).parent == Path(dst).parent for _, src, dst in moves), moves
    assert [p for p in _files_in(tmpdir) if "torchinductor" not in str(p)] == []
    assert [p for p in paths.root.rglob("*") if is_temp_file(p)] == []


# A save of last.ckpt through the trainer's own CheckpointIO that is killed halfway: the checkpoint
# holds an object whose pickling announces itself and then hangs (as a slow disk would).
HANGING_SAVE = textwrap.dedent("""
    import sys, time, torch
    from pathlib import Path
    from mae_core.checkpointing import AtomicCheckpointIO

    class Hang:
        def __reduce__(self):
            Path(sys.argv[2]).touch()
            time.sleep(120)

    checkpoint = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
    checkpoint["hang"] = Hang()
    AtomicCheckpointIO().save_checkpoint(checkpoint, sys.argv[1])
""")


def test_files_are_written_in_place_and_a_kill_mid_save_keeps_the_last_checkpoint(tmp_path,
                                                                                   tmpfs_tmpdir):
    """A fresh run and its resume write every file beside its target, never through $TMPDIR; a
    save killed halfway between them leaves the last checkpoint whole and a temp file that the
    resume removes."""
    paths = RunPaths(tmp_path / "run")
    first = _train(tmp_path, "--run-dir", paths.root, *TINY, "--devices", "1", "--max-steps", "2",
                   tmpdir=tmpfs_tmpdir, MAE_TEST_AUDIT=str(tmp_path / "audit"))
    assert first.returncode == 0, first.stdout[-3000:]
    _assert_written_in_place(tmp_path, paths, tmpfs_tmpdir)
    assert _checkpoint_step(paths) == 2 and paths.read_status()["state"] == "finished"
    assert load_model(paths.weights).cfg.image_size == 32
    size = paths.last_ckpt.stat().st_size

    ready = tmp_path / "saving"
    saver = subprocess.Popen([sys.executable, "-c", HANGING_SAVE, str(paths.last_ckpt), str(ready)],
                             cwd=REPO_ROOT, env={**os.environ, "TMPDIR": str(tmpfs_tmpdir)})
    try:
        assert poll(ready.exists, timeout_s=120), "the save never started"
        saver.send_signal(signal.SIGKILL)
        saver.wait()
    finally:
        saver.kill()
        saver.wait()
    assert paths.last_ckpt.stat().st_size == size and _checkpoint_step(paths) == 2
    leftovers = [p for p in paths.root.rglob("*") if is_temp_file(p)]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".last.ckpt.")

    resumed = _train(tmp_path, "--run-dir", paths.root, "--resume", "--max-steps", "4",
                     tmpdir=tmpfs_tmpdir, MAE_TEST_AUDIT=str(tmp_path / "audit"))
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "removed 1 temporary file" in resumed.stdout
    _assert_written_in_place(tmp_path, paths, tmpfs_tmpdir)  # a resumed run writes in place too
    assert _checkpoint_step(paths) == 4 and paths.read_status()["state"] == "finished"


def test_resume_after_a_kill_right_after_a_checkpoint_has_every_step_once(tmp_path):
    # Killed (whole group, kill -9) just after step 4's checkpoint, before anything else happened.
    paths = RunPaths(tmp_path / "run")
    killed = _train(tmp_path, "--run-dir", paths.root, *TINY, "--devices", "2", "--max-steps", "8",
                    MAE_TEST_KILL_AT="4")
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:]
    assert _checkpoint_step(paths) == 4

    resumed = _train(tmp_path, "--run-dir", paths.root, "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    steps = [row["step"] for row in paths.read_metrics() if "loss" in row]
    assert steps == list(range(1, 9))
    assert _checkpoint_step(paths) == 8 and paths.read_status()["state"] == "finished"



def test_a_resume_on_a_folder_that_lost_files_says_so(tmp_path):
    """Eight of ten images deleted before a resume: it trained on what was left, and said only
    "skipping" for an unreadable one."""
    from PIL import Image

    data = tmp_path / "photos"
    data.mkdir()
    for i in range(10):
        Image.new("RGB", (40, 40), (20 * i, 90, 30)).save(data / f"{i}.png")
    paths = RunPaths(tmp_path / "run")
    first = _train(tmp_path, "--run-dir", paths.root, *TINY, "--devices", "1", "--max-steps", "2",
                   "--data", str(data))
    assert first.returncode == 0, first.stdout[-3000:]
    for i in range(1, 9):
        (data / f"{i}.png").unlink()
    (data / "9.png").write_bytes(b"no longer an image")
    resumed = _train(tmp_path, "--run-dir", paths.root, "--resume", "--max-steps", "4")
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert ("warning: the data now holds 2 image files to train on, 8 fewer than the 10 this run "
            "last read; the resumed run trains on the 1 left") in resumed.stdout
    # Mid-epoch (an epoch is at least 4 steps): Lightning's "unreliable results" is not said of
    # a folder read in memory, whose rest of the epoch is a fresh shuffle (mae_core/train.py).
    assert "unreliable results" not in resumed.stdout  # (stderr is in it)
    from mae_core.callbacks import data_shrink_note

    # Images held out are not in the training part, then or now: no word of a loss.
    assert data_shrink_note({"images": 6, "skipped_files": 0, "data_files": 10}, 6, 0) is None
    assert data_shrink_note({"images": 6}, 5, 1) is None and data_shrink_note({}, 1, 0) is None


def test_an_existing_run_is_never_trained_twice_restarted_or_resumed_into_another_model(
        tmp_path, run_module, stand_in):
    """By hand, ``--run-dir`` of an existing run: while its trainer lives, a second one would
    interleave the metrics and take over process.json; without --resume a trained run restarted
    from step 0 over its metrics and checkpoint; a resume with another patch size failed to load
    and left config.yaml changed, so every later resume failed too. Each is refused (exit 2)
    before anything is written."""
    from mae_core.config import RunConfig
    from mae_core.fileio import atomic_write_json
    from mae_core.process import process_record
    from mae_core.rundir import create_run

    cfg = RunConfig().with_overrides(accelerator="cpu", devices=1, image_size=32, patch_size=8,
                                     max_steps=6).resolved()
    paths = create_run(cfg, run_dir=tmp_path / "run", state="stopped")
    paths.last_ckpt.write_bytes(b"a trained run's checkpoint")
    paths.metrics.write_text('{"step": 1, "loss": 0.5}\n')

    def refused(*args: str) -> str:
        before = {p.name: p.read_bytes() for p in paths.root.iterdir()}
        result = run_module("mae_core.train", "--run-dir", str(paths.root), *args)
        assert result.returncode == 2, result.stdout + result.stderr
        assert {p.name: p.read_bytes() for p in paths.root.iterdir()} == before
        return result.stderr

    atomic_write_json(paths.process, process_record(stand_in.pid, command=["sleep"]))
    assert f"is being trained by process {stand_in.pid}: stop it first" in refused("--resume")
    paths.process.unlink()
    assert "holds a trained run: add --resume" in refused("--max-steps", "9")
    err = refused("--resume", "--patch-size", "4")
    assert err.startswith("error: patch_size:") and "start a new run" in err
    assert stand_in.poll() is None  # refused, nothing killed


def test_a_failure_before_training_starts_is_recorded_not_left_starting(tmp_path, run_module,
                                                                       monkeypatch):
    """A remote set without credentials fails before fit (while the previews load): the run was
    left "starting" for ever, with a traceback only in the log. (Offline: no credentials and no
    instance metadata, so botocore refuses before any connection.)"""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    run_dir = tmp_path / "run"
    result = run_module("mae_core.train", "--run-dir", run_dir, "--data", "s3://no-such-bucket/set",
                        *TINY, "--devices", "1", "--max-steps", "2")
    assert result.returncode == 1
    assert "opening the remote data set s3://no-such-bucket/set" in result.stdout
    status = RunPaths(run_dir).read_status()
    assert status["state"] == "failed" and "credentials" in status["error"].lower(), status


def test_a_rank_whose_rank_0_is_gone_goes_too(tmp_path):
    """Started by hand with ``MASTER_PORT`` taken: rank 0 cannot listen and exits at once, but
    rank 1, which Lightning had started before, waited out the rendezvous timeout (30 min) as an
    orphan. Now the kernel ends it with its parent (``process.die_with_parent``)."""
    import socket

    run_dir = tmp_path / "run"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        env = clean_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(taken.getsockname()[1]))
        with open(tmp_path / "log", "w") as log:
            rank0 = subprocess.Popen(
                [sys.executable, "-m", "mae_core.train", "--run-dir", str(run_dir), *TINY,
                 "--devices", "2", "--max-steps", "2"], env=env, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            assert rank0.wait(timeout=120) == 1
            assert "is in use by another process" in (tmp_path / "log").read_text()
            ranks = lambda: [pid for pid in proc_pids() if str(run_dir) in cmdline(pid)]  # noqa: E731
            assert poll(lambda: not ranks(), 15), f"rank 1 outlived rank 0: {ranks()}"
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(rank0.pid, signal.SIGKILL)


def proc_pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


# --- the trainer's environment: variables left in the shell --------------------------------------

def test_pl_trainer_variables_in_the_shell_do_not_change_the_run(tmp_path, monkeypatch, capsys):
    """Lightning fills every Trainer argument the code leaves out from ``PL_TRAINER_<ARG>``: with
    ``PL_TRAINER_FAST_DEV_RUN=1`` in the shell a 3-step run "finished" at step 1 without a
    checkpoint. The trainer ignores them, says so, and its ranks do not inherit them."""
    from mae_core.config import ModelConfig, RunConfig, TrainConfig
    from mae_core.rundir import create_run
    from mae_core.train import run_training

    monkeypatch.setenv("PL_TRAINER_FAST_DEV_RUN", "1")
    monkeypatch.setenv("PL_TRAINER_LIMIT_TRAIN_BATCHES", "1")
    cfg = RunConfig(model=ModelConfig(preset="vit-tiny", image_size=32, patch_size=8),
                    train=TrainConfig(batch_size=4, max_steps=3, accelerator="cpu", devices=1,
                                      precision="32-true", num_previews=0,
                                      checkpoint_every_n_steps=3)).resolved()
    paths = create_run(cfg, runs_dir=tmp_path)
    assert run_training(cfg, paths) == 0
    assert [row["step"] for row in paths.read_metrics() if "loss" in row] == [1, 2, 3]
    assert _checkpoint_step(paths) == 3 and paths.read_status()["state"] == "finished"
    assert "ignoring PL_TRAINER_FAST_DEV_RUN, PL_TRAINER_LIMIT_TRAIN_BATCHES" in \
        capsys.readouterr().out
    assert not [name for name in os.environ if name.startswith("PL_TRAINER_")]


def test_a_run_on_named_gpus_started_by_hand_stays_within_the_shells_gpus(tmp_path):
    """A run on ``gpus=0,1`` (a config the app or ``--gpus`` made, started by hand under
    ``CUDA_VISIBLE_DEVICES=2,3``, whose GPUs 0 and 1 are the machine's 2 and 3) ran again with
    ``CUDA_VISIBLE_DEVICES=0,1``: GPUs the user had fenced off. It runs again once (then it says
    its run directory), on 2 and 3. (No GPU here: it fails later, after the check.)"""
    from mae_core.config import ModelConfig, RunConfig, TrainConfig
    from mae_core.rundir import create_run

    cfg = RunConfig(model=ModelConfig(preset="vit-tiny", image_size=32, patch_size=8),
                    train=TrainConfig(gpus="0,1", accelerator="gpu", devices=2,
                                      precision="32-true", num_previews=0))
    paths = create_run(cfg, run_dir=tmp_path / "run", state="stopped")
    log = tmp_path / "log"
    shell = {**clean_env(), "CUDA_VISIBLE_DEVICES": "2,3"}  # as the user exported it
    with open(log, "w") as out:
        trainer = subprocess.Popen([sys.executable, "-m", "mae_core.train", "--run-dir",
                                    str(paths.root)], cwd=REPO_ROOT, env=shell, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert poll(lambda: "run directory:" in log.read_text(), 60), log.read_text()[-3000:]
        environ = Path(f"/proc/{trainer.pid}/environ").read_bytes().split(b"\0")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(trainer.pid, signal.SIGKILL)
        trainer.wait()
    assert b"CUDA_VISIBLE_DEVICES=2,3" in environ
    assert log.read_text().count("run directory:") == 1


@pytest.mark.parametrize("stale, says", [
    ({"LOCAL_RANK": "1"}, "LOCAL_RANK=1 is set"),
    ({"RANK": "1"}, "RANK=1 is set"),
    ({"RANK": "3", "LOCAL_RANK": "1"}, "RANK=3 and LOCAL_RANK=1 are set"),
    ({"SLURM_PROCID": "1", "SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, "SLURM_PROCID=1 is set"),
])
def test_a_rank_variable_left_in_the_shell_is_refused_at_once(tmp_path, stale, says):
    """``LOCAL_RANK=1`` exported in the shell, no launcher: the trainer created the run (status
    "starting", process.json naming it, so the app refused every Start), then waited in silence
    up to 6 h for "rank 0", itself, to record the data set; ``RANK=1`` waited with no run at all.
    Refused (exit 2) before anything is written, naming what to unset."""
    run_dir = tmp_path / "run"
    env = clean_env(**stale)
    result = subprocess.run([sys.executable, "-m", "mae_core.train", "--run-dir", str(run_dir),
                             *TINY, "--devices", "1", "--max-steps", "2"], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=30)  # it hung for 6 h
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr == (f"error: {says} but no launcher started this process: unset "
                             f"{'them' if ' and ' in says else 'it'}\n")
    assert not run_dir.exists()


def test_a_rank_a_launcher_started_says_it_waits_for_rank_0(tmp_path):
    """A torchrun rank whose rank 0 has not written the run yet waits (up to 120 s for its
    config, then for its data set): it says so, once, instead of looking hung."""
    run_dir, log = tmp_path / "run", tmp_path / "log"
    env = clean_env(RANK="1", LOCAL_RANK="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                    TORCHELASTIC_RUN_ID="test")
    with open(log, "w") as out:
        rank = subprocess.Popen([sys.executable, "-m", "mae_core.train", "--run-dir",
                                 str(run_dir), *TINY, "--devices", "1"], cwd=REPO_ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        said = poll(log.read_text, 30)  # its wait is 120 s
    finally:
        os.killpg(rank.pid, signal.SIGKILL)
        rank.wait()
    assert said == f"waiting for rank 0 to write {run_dir / 'config.yaml'} (up to 120 s)\n"
    assert not run_dir.exists()  # a later rank writes nothing


def test_rank_0_of_a_launched_job_says_it_waits_for_the_others(tmp_path):
    """Rank 0 of a torchrun or srun job waited in silence for ranks that never came (an sbatch
    script without srun), until the 10-minute timeout."""
    import socket

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    run_dir, log = tmp_path / "run", tmp_path / "log"
    env = clean_env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                    MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCHELASTIC_RUN_ID="test")
    with open(log, "w") as out:
        rank = subprocess.Popen([sys.executable, "-m", "mae_core.train", "--run-dir",
                                 str(run_dir), *TINY, "--devices", "2", "--num-previews", "0"],
                                cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        said = poll(lambda: "to join" in log.read_text(), 120)
    finally:
        os.killpg(rank.pid, signal.SIGKILL)
        rank.wait()
    assert said, log.read_text()[-3000:]
    assert (f"waiting for the job's other 1 process to join at 127.0.0.1:{port} (started by "
            "torchrun or srun on every node; given up after 10 minutes)") in log.read_text()


def _long_run(run_dir: Path, devices: int, image_size: int, max_steps: int = 1000) -> list[str]:
    return ["--run-dir", str(run_dir), "--preset", "vit-tiny", "--image-size", str(image_size),
            "--patch-size", "8", "--batch-size", "4", "--devices", str(devices), "--accelerator",
            "cpu", "--num-previews", "0", "--checkpoint-every-n-steps", "2", "--max-steps",
            str(max_steps)]


def _signalled_run(tmp_path: Path, devices: int, image_size: int, signum: int,
                   group: bool, **env: str) -> tuple[RunPaths, int, str]:
    """Start a long run by hand, send it ``signum`` (to its process group, or to rank 0 alone)
    once it saved a checkpoint; (its paths, its exit code, the end of its output)."""
    paths = RunPaths(tmp_path / "run")
    log = tmp_path / "log"
    with open(log, "w") as out:
        trainer = subprocess.Popen(
            [sys.executable, "-m", "mae_core.train", *_long_run(paths.root, devices, image_size)],
            cwd=REPO_ROOT, env=clean_env(**env), stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
    try:
        assert poll(paths.last_ckpt.exists, 180), log.read_text()[-3000:]
        if group:
            os.killpg(trainer.pid, signum)
        else:
            trainer.send_signal(signum)
        code = trainer.wait(timeout=90)  # a hang (gloo's 10 minutes) fails here
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(trainer.pid, signal.SIGKILL)
        trainer.wait()
    return paths, code, log.read_text()[-3000:]


@pytest.mark.parametrize(("devices", "to"), [(1, "process"), (2, "group"), (2, "process")],
                         ids=["one-process", "two-ranks-group", "two-ranks-rank-0"])
def test_a_sigterm_ends_the_run_after_its_step_saying_so_and_resume_continues_it(tmp_path,
                                                                                devices, to):
    """SIGTERM (docker stop, a shutdown, kill, timeout) failed the run with the bare text
    ``pytorch_lightning.utilities.exceptions.SIGTERMException`` (and exit code 0). On two ranks,
    a SIGTERM to the whole group (``timeout``, ``kill -TERM -PGID``) hung it for gloo's 10
    minutes: Lightning's handler broadcast from inside the signal, into the other rank's gradient
    all-reduce. Now every rank stops after the same step and saves it, the run says what
    happened and where Resume takes it up, and Resume does."""
    # 64 px on two ranks signalled together: the signal then mostly lands in a backward pass,
    # where Lightning's broadcast hung (at 32 px, mostly between steps).
    size = 64 if to == "group" else 32
    paths, code, log = _signalled_run(tmp_path, devices, size, signal.SIGTERM, group=to == "group")
    assert code == 1, log
    step = _checkpoint_step(paths)
    status = paths.read_status()
    assert status["state"] == "failed", status
    assert status["error"] == ("terminated by SIGTERM (the machine or container was shut down, or "
                               f"someone ran kill); Resume continues from step {step}")
    assert f"run run {status['error']}" in log  # on the terminal too (it said nothing)
    # The step it stopped after was saved: nothing trained is lost.
    assert status["step"] == step == max(row["step"] for row in paths.read_metrics())
    if devices > 1:
        return  # resumed below in this process, on one

    # Resumed in this process (what a Resume's trainer runs, without importing torch again).
    from mae_core.config import RunConfig
    from mae_core.train import run_training

    cfg = RunConfig.load(paths.config).with_overrides(max_steps=step + 1)
    assert run_training(cfg, paths, resume=True) == 0
    assert paths.read_status()["state"] == "finished" and _checkpoint_step(paths) == step + 1
    assert [row["step"] for row in paths.read_metrics() if "loss" in row] == \
        list(range(1, step + 2))


def test_slurms_requeue_signal_saves_the_step_requeues_and_the_next_start_continues(tmp_path):
    """``sbatch --requeue --signal=USR1@90``: Lightning's own requeue handler saved from inside
    the signal, mid-step (the same DDP hang as its SIGTERM broadcast), and the requeued job, the
    same command, was refused ("holds a trained run: add --resume"). Now the run stops after its
    step, saved, asks SLURM to requeue the job, and the requeued start continues it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"  # SLURM's, as a stand-in that records what it was asked
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.calls'}\n")
    scontrol.chmod(0o755)
    slurm = dict(SLURM_NTASKS="1", SLURM_JOB_NAME="mae", SLURM_JOB_ID="4242", SLURM_PROCID="0",
                 SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_NODELIST="localhost",
                 PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    paths, code, log = _signalled_run(tmp_path, 1, 32, signal.SIGUSR1, group=False, **slurm)
    assert code == 0, log
    step = _checkpoint_step(paths)
    status = paths.read_status()
    assert status["state"] == "stopped" and status["step"] == step, status
    assert "requeued SLURM job 4242: its next start continues the run" in log
    # The app shows it as the requeue it is, not as a user's Stop.
    assert status["error"] == (f"stopped at step {step} by SLURM's requeue signal; requeued SLURM "
                               "job 4242: its next start continues the run"), status
    assert (tmp_path / "scontrol.calls").read_text() == "requeue 4242\n"
    # The app's Resume would train it beside the job's next start: refused while SLURM holds it.
    assert status["requeued_job"] == "4242"
    squeue_saying(bin_dir, "PENDING")
    with pytest.raises(RunError, match=f"run {paths.run_id} is continued by SLURM job 4242 "
                                       r"\(pending\) when it starts again: cancel it \(scancel "
                                       r"4242\) to resume the run here"):
        with mock.patch.dict(os.environ, PATH=slurm["PATH"]):
            RunManager(paths.root.parent).resume(paths.run_id)
    assert paths.read_status() == status  # nothing changed

    # The requeued job: the same command (here with max steps cut short), SLURM_RESTART_COUNT=1.
    command = _long_run(paths.root, 1, 32, max_steps=step + 2)
    again = _train(tmp_path, *command, SLURM_RESTART_COUNT="1", **slurm)
    assert again.returncode == 0, again.stdout[-3000:]
    assert paths.read_status()["state"] == "finished" and _checkpoint_step(paths) == step + 2
    assert paths.read_status()["error"] is None  # the requeue note goes with the next start
    assert paths.read_status()["requeued_job"] is None
    assert [r["step"] for r in paths.read_metrics() if "loss" in r] == list(range(1, step + 3))
    # Started once more (or by a script with --auto-resume) after it finished: nothing to do.
    done = _train(tmp_path, *command, "--auto-resume")
    assert done.returncode == 0, done.stdout[-3000:]
    assert f"already finished at step {step + 2}: nothing to do" in done.stdout
    assert _checkpoint_step(paths) == step + 2


@pytest.mark.parametrize("name", ["my run", "été", ".hidden"])
def test_a_run_folder_the_app_cannot_list_is_refused_by_hand(tmp_path, name):
    """``--run-dir "runs/my run"`` trained where the app could not list it: the app showed no live
    run and started a second one on the same devices."""
    run_dir = tmp_path / name
    result = subprocess.run([sys.executable, "-m", "mae_core.train", "--run-dir", str(run_dir),
                             *TINY, "--devices", "1", "--max-steps", "2"], cwd=REPO_ROOT,
                            env=clean_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith(f"error: run_dir: the run folder's name {name!r} may hold "
                                    "only ASCII letters"), result.stderr
    assert not run_dir.exists()


def test_ctrl_c_stops_every_rank_after_its_step_as_a_stop_does(tmp_path):
    """Ctrl-C in the terminal (SIGINT to the process group) failed the run with the bare text
    ``KeyboardInterrupt`` and exit code 1, saving nothing since the last checkpoint."""
    paths, code, log = _signalled_run(tmp_path, 2, 32, signal.SIGINT, group=True)
    assert code == 0, log
    status = paths.read_status()
    assert status["state"] == "stopped" and not status.get("error"), status
    assert status["step"] == _checkpoint_step(paths) == max(r["step"] for r in paths.read_metrics())
    # Said on the terminal too (it ended in silence), with the command that continues it.
    assert f"stopped at step {status['step']}/" in log, log
    assert f"python -m mae_core.train --run-dir {paths.root} --resume" in log, log


def test_the_end_of_a_run_says_where_it_got_and_what_goes_on(tmp_path):
    row = {"step": 30, "loss": 0.98765}
    finished = ended_line("finished", 30, 30, row, tmp_path / "my run")
    assert finished.startswith("finished at step 30/30 (loss 0.9877); weights in ")
    for command in ("mae_core.evaluate --run", "mae_core.export --run",
                    "mae_core.train --run-dir"):
        assert f"python -m {command} '{tmp_path / 'my run'}'" in finished  # quoted: a space
    stopped = ended_line("stopped", 16, -1, None, tmp_path)
    assert stopped == (f"stopped at step 16, saved; continue it with python -m mae_core.train "
                       f"--run-dir {tmp_path} --resume")


def test_ctrl_c_while_the_run_prepares_its_data_is_a_stop_before_training(tmp_path):
    """Ctrl+C while the trainer prepared a large folder (LitData's handler: ``os._exit(0)``) ended
    the run as if it had finished: exit 0 with the run left "starting", untrained, and LitData's
    half-written set left in the cache."""
    from PIL import Image

    from mae_core import prepared
    from mae_core.proctree import descendants

    folder = tmp_path / "large"
    folder.mkdir()
    for i in range(2 * prepared.AUTO_PREPARE_ABOVE):  # a few seconds of encoding by one process
        Image.new("RGB", (96, 96), (i % 251, i // 251, 9)).save(folder / f"{i:04d}.png")
    run, log = tmp_path / "run", tmp_path / "trainer.log"
    env = clean_env(**{prepared.CACHE_ENV: str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"})
    proc = subprocess.Popen(
        [sys.executable, "-m", "mae_core.train", "--run-dir", str(run), "--data", str(folder),
         "--preset", "vit-tiny", "--image-size", "32", "--patch-size", "8", "--batch-size", "4",
         "--max-steps", "3", "--devices", "1", "--accelerator", "cpu", "--num-workers", "1",
         "--num-previews", "0"], cwd=REPO_ROOT, env=env, stdout=log.open("w"),
        stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # LitData forks its encoding process once its handler is in place: Ctrl+C then.
        preparing = lambda: "preparing" in log.read_text() and descendants(proc.pid)  # noqa: E731
        assert poll(preparing, 120, every_s=0.02), log.read_text()
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl+C sends
        proc.wait(timeout=120)
    finally:
        proc.kill()
    output = log.read_text()
    assert proc.returncode == 0, output
    status = RunPaths(run).read_status()
    assert status["state"] == "stopped" and status["step"] == 0 and not status.get("error"), status
    assert "stopped on request before training a step (at step 0)" in output
    assert not RunPaths(run).last_ckpt.exists() and RunPaths(run).read_metrics() == []
    assert not [p for p in (tmp_path / "cache").rglob("*") if ".tmp-" in p.name]


def test_a_resume_by_hand_is_checked_as_the_apps_resume(tmp_path):
    """``--resume`` took a checkpoint with overwritten bytes (and trained on), and a max steps at
    or below the checkpoint's step ("finished" at once, the config rewritten); the app's Resume
    refused both."""
    run = tmp_path / "run"
    common = ["--run-dir", str(run), "--preset", "vit-tiny", "--image-size", "32", "--patch-size",
              "8", "--batch-size", "4", "--devices", "1", "--accelerator", "cpu",
              "--num-previews", "0"]
    first = _train(tmp_path, *common, "--max-steps", "2")
    assert first.returncode == 0, first.stdout[-3000:]
    config = (run / "config.yaml").read_text()
    again = _train(tmp_path, "--run-dir", str(run), "--resume")  # the run's own max steps
    assert again.returncode == 2, again.stdout[-3000:]
    assert "the checkpoint of run is at step 2: raise max steps above 2" in again.stdout
    # One below, in this process (the command line's own checks, without another start-up).
    from mae_core.config import ConfigError
    from mae_core.runsetup import prepare
    from mae_core.trainargs import build_parser

    with pytest.raises(ConfigError, match="the checkpoint of run is at step 2: raise max steps "
                                          "above 2"):
        prepare(build_parser().parse_args(["--run-dir", str(run), "--resume", "--max-steps", "1"]))
    assert (run / "config.yaml").read_text() == config  # nothing rewritten
    _damaged_resume_state_is_refused(run)
    data = bytearray((run / "last.ckpt").read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = b"\0" * 64
    (run / "last.ckpt").write_bytes(bytes(data))
    corrupt = _train(tmp_path, "--run-dir", str(run), "--resume", "--max-steps", "4")
    assert corrupt.returncode == 2, corrupt.stdout[-3000:]
    assert "last.ckpt" in corrupt.stdout and "Traceback" not in corrupt.stdout
    assert RunPaths(run).read_status()["state"] == "finished"


def _damaged_resume_state_is_refused(run: Path) -> None:
    """A last.ckpt whose optimizer or schedule state was emptied or mangled (its tensors sound)
    resumed with AdamW's moments or the warm-up started over, or failed in the launched trainer
    with a KeyError: refused before, naming what is wrong, and the file left as it was."""
    from mae_core.config import ConfigError
    from mae_core.lastckpt import checkpoint_step
    from mae_core.runsetup import prepare
    from mae_core.trainargs import build_parser

    sound = (run / "last.ckpt").read_bytes()
    checkpoint = torch.load(run / "last.ckpt", map_location="cpu", weights_only=True)
    damages = {
        "it holds 0 optimizer states where the run has one optimizer": {"optimizer_states": []},
        "it holds 2 optimizer states": {"optimizer_states": checkpoint["optimizer_states"] * 2},
        "its optimizer state lacks AdamW's state or parameter groups": {"optimizer_states": [{}]},
        r"its optimizer state is empty at step 2 \(AdamW's moments would start over\)": {
            "optimizer_states": [{**checkpoint["optimizer_states"][0], "state": {}}]},
        r"it holds 0 learning-rate schedule states where the run has one \(its warm-up would "
        r"start over\)": {"lr_schedulers": []},
    }
    for said, change in damages.items():
        torch.save({**checkpoint, **change}, run / "last.ckpt")
        with pytest.raises(ConfigError, match=f"last.ckpt is damaged: {said}"):
            prepare(build_parser().parse_args(["--run-dir", str(run), "--resume",
                                               "--max-steps", "4"]))
        (run / "last.ckpt").write_bytes(sound)
    assert checkpoint_step(run / "last.ckpt") == 2  # the sound one passes the same checks


def test_torchrun_processes_must_be_the_runs_devices_times_nodes(tmp_path):
    """``--devices 1`` under ``torchrun --nproc-per-node 2``: two single-process runs trained into
    one folder, each step logged twice, exit code 0."""
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
         "-m", "mae_core.train", "--run-dir", str(run), "--devices", "1", "--max-steps", "3",
         "--image-size", "32", "--patch-size", "8", "--accelerator", "cpu"],
        cwd=REPO_ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert ("error: devices: torchrun started 2 processes (2 per node), but devices × num_nodes "
            "is 1 × 1: give --devices 2") in result.stdout + result.stderr
    assert not run.exists()  # refused before anything was written


def test_a_taken_master_port_is_said_in_one_line(tmp_path):
    """A MASTER_PORT left in the shell that another process listens on: torch's 45-line
    DistNetworkError (EADDRINUSE) was the run's record and its output."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = tmp_path / "run"
        result = _train(tmp_path, "--run-dir", str(run), "--preset", "vit-tiny", "--image-size",
                        "32", "--patch-size", "8", "--batch-size", "4", "--devices", "2",
                        "--accelerator", "cpu", "--max-steps", "2", "--num-previews", "0",
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    said = f"MASTER_PORT={port} is in use by another process: unset MASTER_PORT"
    assert result.returncode == 1 and f"error: {said}" in result.stdout, result.stdout[-3000:]
    assert "Traceback" not in result.stdout
    status = RunPaths(run).read_status()
    assert status["state"] == "failed" and status["error"].startswith(said), status


def test_a_stop_before_training_waits_for_the_ranks_a_launcher_started_beside_rank_0(
        tmp_path, monkeypatch):
    """Under torchrun (or srun) the other ranks are started beside rank 0 and wait for it in the
    rendezvous: rank 0 ending the run on a Stop before ``fit`` left them waiting there for torch's
    30 minutes while the run read "stopped". There the stop is the ranks' check at the start of
    training (StopOnRequest); alone, rank 0 still ends the run at once."""
    from mae_core import train
    from mae_core.checks import StopRequested

    paths = RunPaths(tmp_path / "run")
    paths.root.mkdir()
    paths.stop_request.write_text("")
    for name in ("WORLD_SIZE", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "RANK", "LOCAL_RANK",
                 "NODE_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(StopRequested):
        train._stop_if_asked(paths)
    for name in ("WORLD_SIZE", "SLURM_NTASKS"):
        with monkeypatch.context() as env:
            env.setenv(name, "2")
            train._stop_if_asked(paths)  # the ranks beside it decide together, in fit
