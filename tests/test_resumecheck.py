"""mae_core.resumecheck: what a resume must satisfy, on hand-made checkpoints (no trainer runs).

The same guards through the run manager (Resume in the app) are in test_runs.py."""

from __future__ import annotations

import pytest
import torch

from helpers import resume_state
from mae_core.config import ModelConfig, RunConfig, TrainConfig
from mae_core.model import MaskedAutoencoder
from mae_core.resumecheck import (check_resumable, require_devices, require_one_node,
                                  require_same_model, require_steps_left)
from mae_core.rundir import RunError, RunPaths, create_run

MODEL = ModelConfig(image_size=32, patch_size=8)
TINY = RunConfig(model=MODEL, train=TrainConfig(accelerator="cpu", devices=1, max_steps=20))


def save_checkpoint(paths: RunPaths, step: int, model: ModelConfig = MODEL) -> None:
    """A Lightning-shaped last.ckpt of ``model`` at ``step``."""
    state = {f"mae.{k}": v for k, v in MaskedAutoencoder(model).state_dict().items()}
    torch.save({"state_dict": state, "global_step": step, "epoch": 0, "loops": {},
                "pytorch-lightning_version": "2", **resume_state()}, paths.last_ckpt)


@pytest.fixture
def paths(tmp_path) -> RunPaths:
    return create_run(TINY.resolved(), runs_dir=tmp_path / "runs", state="stopped")


def test_a_checkpoint_of_the_runs_model_resumes_from_its_step(paths):
    save_checkpoint(paths, 5)
    assert check_resumable(paths, TINY) == 5
    assert check_resumable(paths, TINY.with_overrides(max_steps=-1, max_epochs=3)) == 5  # by epochs


def test_no_steps_left_is_refused(paths):
    save_checkpoint(paths, 20)
    with pytest.raises(RunError, match=f"checkpoint of {paths.run_id} is at step 20: raise max "
                                       "steps above 20"):
        check_resumable(paths, TINY)
    require_steps_left(TINY, 19, paths.run_id)
    require_steps_left(TINY.with_overrides(max_steps=-1, max_epochs=3), 10**6, paths.run_id)


def test_a_missing_damaged_or_foreign_checkpoint_is_refused(paths):
    with pytest.raises(RunError, match="no checkpoint"):
        check_resumable(paths, TINY)
    paths.last_ckpt.write_bytes(b"")
    with pytest.raises(RunError, match="corrupt"):
        check_resumable(paths, TINY)
    save_checkpoint(paths, 5, ModelConfig(image_size=64, patch_size=8))
    with pytest.raises(RunError, match=r"not a checkpoint of this run's model .*32 px / patch 8"):
        check_resumable(paths, TINY)
    with pytest.raises(RunError, match="pos_embed"):
        require_same_model(paths, TINY)


def test_a_run_on_several_nodes_is_left_to_its_launcher():
    require_one_node(TINY)
    two = TINY.with_overrides(num_nodes=2)
    with pytest.raises(RunError, match=r"^a run on 2 nodes: .*--num-nodes 2 \.\.\.\)$"):
        require_one_node(two)
    with pytest.raises(RunError, match=r"^run r1 trains on 2 nodes: .*2 \.\.\. --resume\)$"):
        require_one_node(two, "r1")


def test_devices_no_longer_here_are_refused():
    require_devices(TINY, "r1")
    with pytest.raises(RunError, match="^run r1 cannot be resumed here: .*GPU"):
        require_devices(TINY.with_overrides(accelerator="gpu", gpus="1"), "r1")
