"""``python -m mae_core.export --run checkpoints/<run>``: a run's encoder as timm weights, from the
command line.

The Runs tab's Export (``RunManager.export``) was the only way to get ``encoder.safetensors``: a
researcher who trained and evaluated by hand had to start the app for it. This writes the same
file (:func:`mae_core.weights.export_encoder`) and prints the same snippet that loads it in timm.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mae_core.config import ConfigError
from mae_core.evaluate import EvaluationError, _run_with_weights
from mae_core.fileio import wrong_kind
from mae_core.rundir import RunError, RunPaths


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mae_core.export",
        description="Write a run's encoder (model.safetensors) as timm VisionTransformer weights "
                    "and print the Python that loads it for fine-tuning. Exit 2 when refused.")
    parser.add_argument("--run", required=True, help="the run's folder (checkpoints/<run>)")
    parser.add_argument("--out", default=None,
                        help="the file to write, or a folder to write <run-id>-encoder.safetensors "
                             "in (default: <run>/encoder.safetensors, where the app's Export "
                             "writes it)")
    return parser


def export_run(run_dir: str | Path, out: str | Path | None = None) -> tuple[Path, list[str], str]:
    """Export the run's encoder to ``out``; (the file written, its tensor names, the timm snippet)."""
    paths, cfg = _run_with_weights(run_dir)  # refused before torch is imported
    from mae_core.resumecheck import require_weights_of
    from mae_core.weights import WeightsError, export_encoder, timm_snippet

    target = Path(out).expanduser() if out else paths.encoder
    if out and target.is_dir():  # a folder of exports: named by the run, so several runs fit in one
        target = target / f"{paths.run_id}-encoder.safetensors"
    _refuse_target(paths, target)
    try:
        # The weights' own config (their normalisation) is what fine-tuning must read images with.
        model = require_weights_of(cfg.model, paths.weights, paths.run_id)
        names = export_encoder(paths.weights, target)
    except WeightsError as err:  # damaged weights: said as the run's
        raise RunError(f"run {paths.run_id}: {err}") from None
    return target, names, timm_snippet(model, target.resolve())


def _refuse_target(paths: RunPaths, target: Path) -> None:
    """RunError where writing ``target`` would destroy something, before anything is written. The
    export is renamed over whatever the path holds: ``--out <run>/model.safetensors`` replaced the
    run's weights with the encoder alone (its decoder lost: no resume, evaluation or preview of it
    again), and, as root, ``--out /dev/full`` replaced the device node with a regular file. Only an
    earlier export is replaced. A folder where the default ``encoder.safetensors`` goes is refused
    as the app's Export refuses it (the export went into it)."""
    from mae_core.weights import WeightsError, read_metadata

    if target == paths.encoder and (kind := wrong_kind(target)):
        raise RunError(f"the encoder of {paths.run_id} cannot be exported: `{target.name}` is "
                       f"{kind} where the file goes. Move or delete it, then export")
    for folder in (target.parent, *target.parent.parents):  # the first one that is there
        if folder.exists() or folder.is_symlink():
            if not folder.is_dir():  # mkdir said only "File exists"
                raise RunError(f"cannot write {target}: {folder} is a file, not a folder")
            break
    real = target.resolve()
    if real != paths.encoder.resolve() and paths.root.resolve() in real.parents:
        raise RunError(f"--out {target} is inside the run's folder, which holds its own files: "
                       f"leave --out out (it writes {paths.encoder}) or name a path outside it")
    if not (target.exists() or target.is_symlink()):
        return
    if not target.is_file():  # a FIFO, a device, a socket, a dangling link
        raise RunError(f"--out {target} is not a regular file (nothing was written): name a new "
                       "file or a folder")
    try:
        exported = read_metadata(target).get("format") == "timm-vit"
    except WeightsError:
        exported = False
    if not exported:  # only an earlier export is replaced: anything else may be all there is
        raise RunError(f"--out {target} exists and is not an encoder export (it was left as it "
                       "is): name a new file, or a folder to write the export in")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        target, names, snippet = export_run(args.run, args.out)
    except (EvaluationError, ConfigError, RunError) as err:
        parser.exit(2, f"error: {err}\n")
    except OSError as err:  # --out in a missing or read-only folder
        parser.exit(2, f"error: cannot write {args.out or 'the encoder'}: "
                       f"{err.strerror or err}\n")
    print(f"wrote {target} ({len(names)} encoder tensors, no head); load it with timm:\n",
          file=sys.stderr)
    print(snippet)
    return 0


if __name__ == "__main__":
    from mae_core.process import exit_quickly

    exit_quickly(main())
