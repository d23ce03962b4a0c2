"""``python -m mae_core.export``: the Runs tab's Export from the command line; the file loads in
timm as its printed snippet says."""

from __future__ import annotations

import timm
import torch
from safetensors.torch import load_file

from mae_core.config import ModelConfig, RunConfig, TrainConfig
from mae_core.export import export_run
from mae_core.model import MaskedAutoencoder
from mae_core.rundir import create_run
from mae_core.weights import save_weights

CFG = RunConfig(ModelConfig(image_size=32, patch_size=8),
                TrainConfig(accelerator="cpu", devices=1, batch_size=4, max_steps=4))


def _run_with_weights(tmp_path):
    paths = create_run(CFG.resolved(), runs_dir=tmp_path / "runs")
    torch.manual_seed(0)
    model = MaskedAutoencoder(CFG.model)
    save_weights(model, paths.weights, step=4)
    return paths, model


def test_the_command_writes_the_encoder_and_prints_the_snippet_that_loads_it(tmp_path, run_module):
    paths, model = _run_with_weights(tmp_path)
    result = run_module("mae_core.export", "--run", paths.root)
    assert result.returncode == 0, result.stderr
    assert paths.encoder.is_file() and f"wrote {paths.encoder}" in result.stderr
    namespace: dict = {}
    exec(result.stdout, namespace)  # the snippet as printed: its own assert checks the keys
    vit = namespace["model"]
    assert isinstance(vit, timm.models.VisionTransformer)
    assert torch.equal(vit.blocks[0].attn.qkv.weight, model.backbone.vit.blocks[0].attn.qkv.weight)


def test_out_writes_elsewhere_and_refusals_exit_2_in_one_line(tmp_path, run_module):
    paths, _ = _run_with_weights(tmp_path)
    out = tmp_path / "exported" / "tiny.safetensors"
    target, names, snippet = export_run(paths.root, out)
    assert target == out and not paths.encoder.exists()
    assert set(load_file(out)) == set(names) and not any(n.startswith("head.") for n in names)
    assert repr(str(out)) in snippet
    target, _, _ = export_run(paths.root, out.parent)  # a folder: named by the run
    assert target == out.parent / f"{paths.run_id}-encoder.safetensors" and target.is_file()
    bare = create_run(CFG.resolved(), runs_dir=tmp_path / "runs")
    for args, says in ((["--run", tmp_path / "nothing"], "no run directory"),
                       (["--run", bare.root], "no saved weights yet")):
        result = run_module("mae_core.export", *args)
        assert result.returncode == 2 and says in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def test_out_naming_a_file_of_the_run_or_a_folder_in_the_encoders_place_is_refused(tmp_path):
    """``--out <run>/model.safetensors`` replaced the run's weights with the encoder alone (its
    decoder gone: no resume, evaluation or preview of it again); a folder where the default
    encoder.safetensors goes took the export inside it, where the app's Export refuses it."""
    import pytest

    from mae_core.rundir import RunError

    paths, model = _run_with_weights(tmp_path)
    weights = paths.weights.read_bytes()
    for own in (paths.weights, paths.root / "." / "model.safetensors", paths.config):
        with pytest.raises(RunError, match="is inside the run's folder, which holds its own files"):
            export_run(paths.root, own)
    assert paths.weights.read_bytes() == weights
    paths.encoder.mkdir()
    with pytest.raises(RunError, match="`encoder.safetensors` is a folder where the file goes"):
        export_run(paths.root)
    assert list(paths.encoder.iterdir()) == []
    paths.encoder.rmdir()
    assert export_run(paths.root)[0] == paths.encoder and paths.encoder.is_file()


def test_out_never_replaces_what_is_not_an_earlier_export(tmp_path):
    """The export is renamed over --out: it replaced, as root, a device node such as /dev/full,
    a FIFO, or any file of one's own; a path through a file said only "File exists"."""
    import os

    import pytest

    from mae_core.rundir import RunError

    paths, _ = _run_with_weights(tmp_path)
    weights = paths.weights.read_bytes()
    other = tmp_path / "notes.txt"
    other.write_text("mine")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for out, says in ((paths.weights, "inside the run's folder"),
                      (paths.root / "previews", "inside the run's folder"),
                      (other, "not an encoder export"), (fifo, "not a regular file"),
                      (other / "x.safetensors", f"{other} is a file, not a folder")):
        with pytest.raises(RunError, match=says):
            export_run(paths.root, out)
    assert paths.weights.read_bytes() == weights and other.read_text() == "mine"
    assert fifo.is_fifo()
    export_run(paths.root, paths.encoder)  # the run's own export, and again over it
    target, _, _ = export_run(paths.root, tmp_path / "enc.safetensors")
    assert export_run(paths.root, target)[0] == target
