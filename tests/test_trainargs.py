"""The trainer's command line: its help, and the run folders it refuses before writing anything."""

from __future__ import annotations

import dataclasses

import pytest

from mae_core.config import ConfigError, ModelConfig, RunConfig, TrainConfig
from mae_core.rundir import RunPaths, create_run
from mae_core.trainargs import FIELD_HELP, build_parser, prepare


def _prepare(*argv: str):
    return prepare(build_parser().parse_args(list(argv)))


def test_help_says_what_every_flag_means_with_its_choices_and_default():
    """``--help`` listed each flag with its Python type only ("int | None (default None)")."""
    names = [f.name for cls in (ModelConfig, TrainConfig) for f in dataclasses.fields(cls)]
    assert sorted(FIELD_HELP) == sorted(names)  # a new config field needs its help line
    text = " ".join(build_parser().format_help().split())  # argparse wraps the lines
    for name in names:
        flag = "--" + name.replace("_", "-")
        assert flag in text
        assert " ".join(FIELD_HELP[name].replace("%%", "%").split()) in text, name
    assert "vit-tiny, vit-small, vit-base" in text and "32-true, bf16-mixed" in text
    assert "--max-steps N optimizer steps to train (-1: train by max epochs) (default 300)" in text
    assert "int | None" not in text


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


@pytest.mark.parametrize("state", ["finished", "stopped"])
def test_an_automatic_resume_of_a_run_at_its_max_steps_has_nothing_to_do(tmp_path, state):
    """A Stop (or SLURM's requeue signal) that landed on the last step left the run "stopped" at
    its max steps: every requeued start of the job was refused ("raise max steps above")."""
    import torch

    from mae_core.trainargs import AlreadyFinished

    paths = create_run(RunConfig().with_overrides(max_steps=4), run_dir=tmp_path / "run",
                       state=state)
    torch.save({"global_step": 4, "epoch": 0, "state_dict": {}, "loops": {},
                "pytorch-lightning_version": "2", "optimizer_states": [], "lr_schedulers": []},
               paths.last_ckpt)
    with pytest.raises(AlreadyFinished, match="already finished at step 4: nothing to do"):
        _prepare("--run-dir", str(paths.root), "--auto-resume")


def test_a_linked_run_folder_is_judged_by_the_name_the_app_lists(tmp_path):
    """The name check read the link's target: ``runs/my link`` → ``other/good`` trained where the
    app, which lists ``my link``, could not see it."""
    (tmp_path / "other" / "good").mkdir(parents=True)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "my link").symlink_to(tmp_path / "other" / "good")
    with pytest.raises(ConfigError, match="run_dir: the run folder's name 'my link' may hold only"):
        _prepare("--run-dir", str(tmp_path / "runs" / "my link"))
