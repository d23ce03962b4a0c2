"""The run folders the trainer's command line names: those refused before anything is written,
and those continued (--resume, --auto-resume, a job's later ranks)."""

from __future__ import annotations

import pytest

from helpers import resume_state
from mae_core.config import ConfigError, RunConfig
from mae_core.rundir import RunPaths, create_run
from mae_core.runsetup import prepare
from mae_core.trainargs import build_parser


def _prepare(*argv: str):
    return prepare(build_parser().parse_args(list(argv)))


@pytest.mark.parametrize("flag", ["--resume", "--auto-resume"])
def test_a_resume_needs_the_run_folder(flag):
    with pytest.raises(ConfigError, match=f"resume: {flag} continues a named run: give it with "
                                          "--run-dir"):
        _prepare(flag)


def test_a_new_run_is_refused_in_a_folder_of_other_files(tmp_path):
    """``--run-dir ~/photos`` wrote a run's files among the user's, and the app's Delete of that
    run removes the folder with everything in it."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg"):
        (photos / name).write_bytes(b"jpeg")
    with pytest.raises(ConfigError, match=r"run_dir: .*photos already holds files that are not a "
                                          r"run's \(a.jpg, b.jpg, c.jpg, …\): a new run needs a "
                                          "new or empty folder"):
        _prepare("--run-dir", str(photos), "--max-steps", "2")
    assert sorted(p.name for p in photos.iterdir()) == ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file: give a new folder"):
        _prepare("--run-dir", str(tmp_path / "file"))


def test_a_new_run_is_refused_inside_another_run(tmp_path):
    """A run inside another run's folder is listed nowhere (the app lists a runs folder's
    children), and deleting the outer run deletes it."""
    outer = create_run(RunConfig(), run_dir=tmp_path / "outer")
    with pytest.raises(ConfigError, match=r"run_dir: .*inner is inside the run .*outer: give a "
                                          "folder beside it"):
        _prepare("--run-dir", str(outer.root / "sub" / "inner"))
    assert not (outer.root / "sub").exists()


def test_a_folder_a_start_left_before_its_config_may_be_started_again(tmp_path):
    """What a start that failed before writing config.yaml leaves (a status, a log) is not
    "other files": the same command starts the run there."""
    root = tmp_path / "run"
    root.mkdir()
    (root / "status.json").write_text('{"state": "failed"}')
    (root / "train.log").write_text("killed\n")
    cfg, paths, resume = _prepare("--run-dir", str(root), "--max-steps", "2", "--image-size", "32",
                                  "--devices", "1", "--accelerator", "cpu")
    assert paths.root == root and not resume and RunPaths(root).is_run()
    assert cfg.train.max_steps == 2


def test_a_new_run_by_hand_is_refused_beside_a_live_run_on_the_same_devices(tmp_path):
    """The app refuses to start beside a run started by hand; a run started by hand in the app's
    runs folder went beside the app's live run, on the same CPU (or the same GPUs)."""
    from mae_core.process import process_record

    runs = tmp_path / "runs"
    live = create_run(RunConfig().with_overrides(accelerator="cpu", devices=2), runs_dir=runs,
                      state="running", process=process_record())  # this process: alive, here
    with pytest.raises(ConfigError, match=f"devices: run {live.run_id} is training on this "
                                          "machine's devices"):
        _prepare("--runs-dir", str(runs), "--accelerator", "cpu", "--devices", "1")
    assert [p.name for p in runs.iterdir() if p.is_dir()] == [live.run_id]  # nothing made
    live.write_status(state="stopped")
    cfg, paths, _ = _prepare("--runs-dir", str(runs), "--accelerator", "cpu", "--devices", "1",
                             "--image-size", "32")
    assert paths.root.parent == runs and paths.run_id != live.run_id


def test_a_run_by_hand_checks_the_devices_again_under_the_lock_the_apps_start_takes(
        tmp_path, monkeypatch):
    """Between a run by hand's device check and its config (the seconds its data takes), an app's
    Start went ahead: two runs trained at once on the same devices. It checks again, and makes
    its run, under the runs folder's lock, which the app holds from its own check to its launch:
    here the app's run appears while the hand's start waits for that lock."""
    import fcntl
    import threading

    from mae_core.process import process_record
    from mae_core.rundir import LOCK_NAME, runs_folder_lock

    runs = tmp_path / "runs"
    outcome: list = []
    waiting = threading.Event()
    real_flock = fcntl.flock

    def flock(fd, operation):  # the real lock; says when the hand's start is about to wait on it
        if threading.current_thread().name == "by-hand":
            waiting.set()
        return real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock)

    def start_by_hand():
        try:
            outcome.append(_prepare("--runs-dir", str(runs), "--accelerator", "cpu",
                                    "--devices", "1", "--image-size", "32"))
        except ConfigError as err:
            outcome.append(err)

    with runs_folder_lock(runs):  # the app's Start, between its check and its launch
        by_hand = threading.Thread(target=start_by_hand, name="by-hand")
        by_hand.start()
        assert waiting.wait(120), f"it never took the lock: {outcome}"
        apps = create_run(RunConfig().with_overrides(accelerator="cpu", devices=2),
                          runs_dir=runs, state="running", process=process_record())
    by_hand.join(60)
    [refused] = outcome
    assert isinstance(refused, ConfigError), refused
    assert f"run {apps.run_id} is training on this machine's devices" in str(refused)
    assert [p.name for p in runs.iterdir() if p.is_dir()] == [apps.run_id]  # nothing made
    # Nor does a run of another runs folder start beside it (two apps on two folders started a
    # CPU run each at once): the machine's runs folders are noted (mae_core.runsdirs).
    elsewhere = tmp_path / "home"
    elsewhere.mkdir()
    mine = ("--run-dir", str(elsewhere / "mine"), "--accelerator", "cpu", "--devices", "1",
            "--image-size", "32")
    with pytest.raises(ConfigError, match=f"run {apps.root} is training on this machine's"):
        _prepare(*mine)
    apps.write_status(state="finished")
    # A --run-dir of your own choosing leaves no lock file beside it where no app made one.
    _prepare(*mine)
    assert sorted(p.name for p in elsewhere.iterdir()) == ["mine"] and LOCK_NAME == ".runs.lock"


@pytest.mark.parametrize("state", ["finished", "stopped"])
def test_an_automatic_resume_of_a_run_at_its_max_steps_has_nothing_to_do(tmp_path, state):
    """A Stop (or SLURM's requeue signal) that landed on the last step left the run "stopped" at
    its max steps: every requeued start of the job was refused ("raise max steps above")."""
    import torch

    from mae_core.runsetup import AlreadyFinished

    paths = create_run(RunConfig().with_overrides(max_steps=4), run_dir=tmp_path / "run",
                       state=state)
    torch.save({"global_step": 4, "epoch": 0, "state_dict": {}, "loops": {},
                "pytorch-lightning_version": "2", **resume_state()},
               paths.last_ckpt)
    with pytest.raises(AlreadyFinished, match="already finished at step 4: nothing to do"):
        _prepare("--run-dir", str(paths.root), "--auto-resume")
    # A model flag is refused as a resume refuses it (it said "already finished", exit 0).
    with pytest.raises(ConfigError, match="preset: a resume continues the run's own model"):
        _prepare("--run-dir", str(paths.root), "--auto-resume", "--preset", "vit-small")


def test_a_run_that_ended_at_its_max_epochs_resumes_only_past_that_limit(tmp_path):
    """Finished at max epochs 2 (step 8): ``--resume --max-steps 28`` ended at once, still at step
    8, "finished"; a requeued ``--auto-resume`` trained nothing and finished again."""
    from mae_core.fileio import atomic_write_json, read_json
    from mae_core.runsetup import AlreadyFinished

    for max_steps in (-1, 300):  # trained by epochs alone, or by both limits (epochs came first)
        trained = RunConfig().with_overrides(max_steps=max_steps, max_epochs=2, image_size=32,
                                             accelerator="cpu", devices=1)
        paths = create_run(trained, run_dir=tmp_path / f"run{max_steps}", state="finished")
        atomic_write_json(paths.status, {**read_json(paths.status), "step": 8})
        paths.last_ckpt.write_bytes(b"checked after the limits")
        run = ["--run-dir", str(paths.root)]
        with pytest.raises(AlreadyFinished, match="already finished its 2 epochs: nothing to do"):
            _prepare(*run, "--auto-resume")
        for same in ([], ["--max-epochs", "2"], ["--max-steps", "-1"]):
            with pytest.raises(ConfigError, match=r"resume: run .* finished its 2 epochs at step "
                                                  r"8: raise max steps above 8 \(the epoch limit "
                                                  r"then goes\) or max epochs above 2"):
                _prepare(*run, "--resume", *same)
        assert RunConfig.load(paths.config) == trained  # nothing written
        # Past the limit, it goes on to the checkpoint's own checks (this one is no checkpoint).
        for further in (["--max-steps", "28"], ["--max-epochs", "3"]):
            with pytest.raises(ConfigError, match="last.ckpt"):
                _prepare(*run, "--resume", *further)


def test_a_new_run_on_tiffs_with_an_alpha_sample_says_what_becomes_of_it(tmp_path, capsys):
    import numpy as np
    import tifffile

    data = tmp_path / "tiles"
    data.mkdir()
    for i in range(2):  # tifffile's default for H×W×4: RGB + alpha
        tifffile.imwrite(data / f"{i}.tif", np.full((16, 16, 4), 40 * i, np.uint8))
    cfg, _, _ = _prepare("--runs-dir", str(tmp_path / "runs"), "--data", str(data),
                         "--accelerator", "cpu", "--devices", "1")
    assert cfg.model.in_chans == 3
    assert ("note: 2 TIFF(s) tag a sample as alpha: read as transparency (composited on white), "
            "not as a band") in capsys.readouterr().out


def test_a_linked_run_folder_is_judged_by_the_name_the_app_lists(tmp_path):
    """The name check read the link's target: ``runs/my link`` → ``other/good`` trained where the
    app, which lists ``my link``, could not see it."""
    (tmp_path / "other" / "good").mkdir(parents=True)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "my link").symlink_to(tmp_path / "other" / "good")
    with pytest.raises(ConfigError, match="run_dir: the run folder's name 'my link' may hold only"):
        _prepare("--run-dir", str(tmp_path / "runs" / "my link"))


def test_a_link_to_a_folder_that_does_not_exist_is_refused_in_words(tmp_path):
    """It made ``create_run`` raise FileExistsError, a traceback naming neither the link nor its
    target."""
    (tmp_path / "runs").mkdir()
    link = tmp_path / "runs" / "run1"
    link.symlink_to(tmp_path / "elsewhere" / "run1")
    with pytest.raises(ConfigError, match=r"run_dir: .*run1 is a link to .*elsewhere/run1, which "
                                          "does not exist: make that folder first"):
        _prepare("--run-dir", str(link))
    assert not (tmp_path / "elsewhere").exists()


@pytest.fixture
def trainer_of(tmp_path):
    """``trainer_of(run_dir)``: a process whose command line trains ``run_dir`` (as a trainer's
    does), ended after the test."""
    from helpers import poll, stand_in_trainer
    from mae_core.process import find_trainer

    started = []

    def start(run_dir):
        started.append(stand_in_trainer(tmp_path, "--run-dir", str(run_dir)))
        assert poll(lambda: find_trainer(run_dir) == started[-1].pid, 10)
        return started[-1]

    yield start
    for process in started:
        process.kill()
        process.wait()


def test_a_live_trainer_whose_process_json_is_gone_is_still_seen(tmp_path, trainer_of):
    """The trainer's own checks trusted process.json alone (the app also finds a trainer by its
    command line): with the file deleted, ``--auto-resume`` started a second trainer on the same
    run, and a new run went beside it on the same devices."""
    import torch

    runs = tmp_path / "runs"
    paths = create_run(RunConfig().with_overrides(accelerator="cpu", devices=1, max_steps=8),
                       runs_dir=runs, state="running")
    torch.save({"global_step": 4}, paths.last_ckpt)
    trainer = trainer_of(paths.root)
    assert not paths.process.exists()
    with pytest.raises(ConfigError, match=f"run_dir: .* is being trained by process {trainer.pid}: "
                                          "stop it first"):
        _prepare("--run-dir", str(paths.root), "--auto-resume")
    with pytest.raises(ConfigError, match=f"devices: run {paths.run_id} is training on this "
                                          f"machine's devices \\(process {trainer.pid}\\)"):
        _prepare("--runs-dir", str(runs), "--accelerator", "cpu", "--devices", "1")


def test_a_later_rank_trains_with_the_flags_rank_0_writes_into_the_config(tmp_path):
    """``--max-steps 6`` given to a 2-rank job restarting a run (srun, torchrun: every rank runs
    the command): the later rank read config.yaml before rank 0 rewrote it, trained to the old 4
    steps, and rank 0 waited in DDP for a fifth step until gloo gave up, 10 minutes later."""
    import subprocess
    import sys

    from mae_core.process import PROJECT_ROOT, clean_env

    root = tmp_path / "run"
    create_run(RunConfig().with_overrides(max_steps=4, image_size=32, accelerator="cpu",
                                          devices=2), run_dir=root, state="failed")
    flags = ["--run-dir", str(root), "--max-steps", "6"]
    read = ("import sys; from mae_core.runsetup import prepare; "
            "from mae_core.trainargs import build_parser; "
            "print('max_steps', prepare(build_parser().parse_args(sys.argv[1:]))[0].train.max_steps)")
    later = subprocess.Popen([sys.executable, "-c", read, *flags], cwd=PROJECT_ROOT, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             env=clean_env(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1"))
    try:
        said = later.stdout.readline()
        assert "waiting for rank 0 to write the run's config with this command's flags" in said
        cfg, _, _ = _prepare(*flags)  # rank 0
        assert cfg.train.max_steps == 6
        assert later.communicate(timeout=60)[0].split() == ["max_steps", "6"]
    finally:
        later.kill()
        later.wait()


def test_a_stop_request_older_than_the_trainer_is_cleared_one_made_since_stands(tmp_path):
    """A STOP left by a trainer killed before it cleared it stopped every start by hand after its
    first step (a requeued SLURM job ended for good); the app's Resume clears it, a command did
    not. A Stop clicked in the app while this trainer starts up is kept."""
    import os

    from mae_core.process import started_at

    def stale_stop(paths: RunPaths) -> None:
        paths.request_stop()
        before = started_at() - 5  # this process (the "trainer") started after it was made
        os.utime(paths.stop_request, (before, before))

    flags = ["--max-steps", "8", "--image-size", "32", "--accelerator", "cpu", "--devices", "1"]
    new = RunPaths(tmp_path / "new")
    new.root.mkdir()
    stale_stop(new)  # all a folder may hold for a new run
    _prepare("--run-dir", str(new.root), *flags)
    assert new.is_run() and not new.stop_requested()

    paths = create_run(RunConfig().with_overrides(max_steps=8, image_size=32, accelerator="cpu",
                                                  devices=1), run_dir=tmp_path / "run",
                       state="failed")
    stale_stop(paths)
    _prepare("--run-dir", str(paths.root))  # started again (no checkpoint yet)
    assert not paths.stop_requested()
    paths.request_stop()  # made now: after this process started
    _prepare("--run-dir", str(paths.root))
    assert paths.stop_requested()


def test_a_run_trained_on_another_host_is_refused_while_heard_from_unless_its_job_requeued(
        tmp_path, monkeypatch):
    """A shared runs folder: a start on host B of a run whose trainer is live on host A passed
    every check (they compare pids, which mean nothing across hosts) and trained the run twice at
    once. The record's host and the status's age are what the app judges such a run by."""
    import time

    from mae_core.fileio import atomic_write_json, read_json
    from mae_core.process import on_this_host
    from mae_core.runwatch import REMOTE_SILENCE_S

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    cfg = RunConfig().with_overrides(max_steps=8, image_size=32, accelerator="cpu", devices=1)
    elsewhere = {"pid": 4242, "start_time": "1", "host": "gpu-node-7", "slurm_job": "913"}
    paths = create_run(cfg, run_dir=tmp_path / "run", state="running", process=elsewhere)
    recorded = read_json(paths.process)
    assert recorded == elsewhere | {"run_dir": str(paths.root.resolve())}

    def heard(seconds_ago: float, state: str = "running") -> None:
        atomic_write_json(paths.status, {**read_json(paths.status), "state": state,
                                         "updated": time.time() - seconds_ago})

    heard(30)
    with pytest.raises(ConfigError, match=r"run_dir: .*run is being trained on host gpu-node-7 "
                                          r"\(heard from 3\d s ago\): stop it there first"):
        _prepare("--run-dir", str(paths.root))
    monkeypatch.setenv("SLURM_JOB_ID", "914")  # another job: as refused
    with pytest.raises(ConfigError, match="being trained on host gpu-node-7"):
        _prepare("--run-dir", str(paths.root))
    assert read_json(paths.process) == recorded  # nothing written

    # The same job, requeued after its node failed: started on this host, recorded here.
    monkeypatch.setenv("SLURM_JOB_ID", "913")
    _prepare("--run-dir", str(paths.root))
    record = read_json(paths.process)
    assert on_this_host(record) and record["slurm_job"] == "913"

    # Silent past the app's limit, or no longer live: the trainer there is gone.
    monkeypatch.delenv("SLURM_JOB_ID")
    for seconds_ago, state in ((REMOTE_SILENCE_S + 5, "running"), (5, "failed")):
        atomic_write_json(paths.process, elsewhere)
        heard(seconds_ago, state)
        _prepare("--run-dir", str(paths.root))
        assert on_this_host(read_json(paths.process))


def test_a_runs_config_linked_elsewhere_is_refused_your_own_linked_config_file_is_read(tmp_path):
    """A config.yaml planted as a link in a run folder was read through it: every tab that loads
    the config quoted the linked file's lines back in its "not valid YAML" message. The
    ``--config`` you give is your own file, and may be a link (dotfiles)."""
    mine = tmp_path / "dotfiles" / "mae.yaml"
    mine.parent.mkdir()
    RunConfig().with_overrides(max_steps=7, image_size=32, accelerator="cpu", devices=1).save(mine)
    (tmp_path / "mae.yaml").symlink_to(mine)
    cfg, paths, _ = _prepare("--config", str(tmp_path / "mae.yaml"), "--run-dir",
                             str(tmp_path / "run"))
    assert cfg.train.max_steps == 7

    secret = tmp_path / "secret.txt"
    secret.write_text("password: [hunter2\n")
    paths.config.unlink()
    paths.config.symlink_to(secret)
    for load in (lambda: RunConfig.load(paths.config),
                 lambda: _prepare("--run-dir", str(paths.root))):
        with pytest.raises(ConfigError, match=r"is not a regular file \(a link,") as err:
            load()
        assert "hunter2" not in str(err.value)


def test_a_runs_folder_that_cannot_hold_a_run_is_refused_before_it_is_noted(tmp_path,
                                                                             monkeypatch):
    """``--runs-dir /etc/passwd`` ended in "FileExistsError" and ``--runs-dir /proc`` in
    "FileNotFoundError: '/proc/.runs.lock'", tracebacks after the data check, each folder noted
    first in the machine's list of runs folders (which every Start then walked)."""
    registry = tmp_path / "runs-dirs.json"
    monkeypatch.setenv("MAE_STUDIO_RUNS_DIRS", str(registry))
    afile = tmp_path / "afile"
    afile.write_text("x")
    cpu = ("--accelerator", "cpu", "--devices", "1", "--image-size", "32")
    for flag, folder, words in (
            ("--runs-dir", afile, f"runs_dir: {afile} is a file, not a folder: pass another "
                                  "--runs-dir"),
            ("--runs-dir", afile / "sub", f"runs_dir: {afile} is a file"),
            ("--runs-dir", "/proc", "runs_dir: /proc cannot be written"),
            ("--run-dir", "/proc/new-run", "run_dir: /proc/new-run cannot be written .*: pass "
                                           "another --run-dir"),
            ("--run-dir", afile / "new-run", f"run_dir: {afile} is a file")):
        with pytest.raises(ConfigError, match=words):
            _prepare(flag, str(folder), *cpu)
    assert not registry.exists() or "/proc" not in registry.read_text()
    cfg, paths, _ = _prepare("--runs-dir", str(tmp_path / "new" / "runs"), *cpu)
    assert paths.root.parent == tmp_path / "new" / "runs"
