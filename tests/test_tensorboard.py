"""Every run also writes TensorBoard event files, read back here with TensorBoard's own reader:
the step scalars of metrics.jsonl, the preview images and the hyper-parameters."""

from __future__ import annotations

import json

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def test_a_run_writes_tensorboard_scalars_previews_and_hparams(run_module, tmp_path):
    run_dir = tmp_path / "run"
    result = run_module("mae_core.train", "--run-dir", run_dir, "--model", "vit-tiny",
                        "--image-size", "32", "--patch-size", "8", "--batch-size", "4",
                        "--devices", "1", "--accelerator", "cpu", "--max-steps", "4",
                        "--preview-every-n-steps", "2", "--num-previews", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0}).Reload()
    tags = events.Tags()
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    for tag in ("loss", "lr", "images_per_s"):
        assert [e.step for e in events.Scalars(tag)] == steps, tag
    losses = {e.step: e.value for e in events.Scalars("loss")}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            assert abs(losses[row["step"]] - row["loss"]) < 1e-6  # the very same numbers
    # Lightning's own scalar at the same step count as the others: it sat a step early, before
    # the last step its mean covers.
    epoch_steps = [json.loads(line)["step"] for line in
                   (run_dir / "metrics.jsonl").read_text().splitlines()
                   if "epoch_loss" in json.loads(line)]
    assert epoch_steps and [e.step for e in events.Scalars("epoch_loss")] == epoch_steps
    assert set(epoch_steps) <= set(steps)
    assert [e.step for e in events.Images("previews")] == [0, 2, 4]
    assert "_hparams_/experiment" in tags["tensors"] or "hparams" in str(events.PluginTagToContent("hparams"))
    hparams = (run_dir / "tensorboard" / "hparams.yaml").read_text()
    assert "model.preset: vit-tiny" in hparams and "train.max_steps: 4" in hparams
