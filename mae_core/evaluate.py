"""Does the encoder learn? A run's encoder against the same architecture freshly initialised.

Both encoders embed a labelled folder (``root/<class>/*``; by default the offline demo set of
:mod:`mae_core.demo_data`) frozen, every patch visible; stratified 5-fold cross-validation (every
image a query once against the other folds; ``--folds 1``: one train/val split) then gives kNN
accuracy (lightly's ``knn_predict``, k = 20 and 200, temperature 0.07, as lightly's ViT benchmarks)
and, with ``--linear-probe``, a linear probe (:func:`mae_core.features.linear_probe`). The random
encoder is the run's own starting point: the trainer seeds torch with the run's seed before it
builds the model, and so does this. An exact McNemar test on the headline kNN top-1, image by
image (:func:`paired_test`), says whether the delta is more than chance on those images. The
result is saved as ``<run>/evaluation.json``.

Example:
    $ python -m mae_core.evaluate --run checkpoints/<run> --data checkpoints/.demo-labelled --json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

# Light modules only: the command refuses a bad seed or run folder at once, not after the seconds
# torch takes to import (the features, the model and the weights bring it in when one runs).
from mae_core.checks import DataError, _check_int
from mae_core.config import MAX_SEED, ConfigError, RunConfig
from mae_core.demo_data import DEFAULT_PATH as DEMO_PATH
from mae_core.demo_data import ensure_demo_set
from mae_core.fileio import atomic_write_json, read_json
from mae_core.metrics import HEADLINE_KNN_K
from mae_core.rundir import RunError, RunPaths

if TYPE_CHECKING:
    from mae_core import features
    from torch import Tensor

    from mae_core.model import MaskedAutoencoder

# The headline figures: kNN with lightly's k=20 on the mean of the patch tokens (MAE trains no
# class token objective: its class token sees no loss, the patch tokens do). Every feature × k
# combination is in "details".
HEADLINE_FEATURE = "mean_patch"
HEADLINE_K = HEADLINE_KNN_K  # the live monitor's headline too
SIGNIFICANCE = 0.05  # the paired test's level
# Every image a query once, against the other 4/5: on the demo set one 80/20 split's 100 val
# images gave +12 points and p = 0.036 for a run whose 5 folds gave +0.6 and p = 0.86.
DEFAULT_FOLDS = 5
MAX_FOLDS = 100
METRICS = ("knn_top1", "knn_top5", "linear_top1")
Progress = Callable[[float, str], None]


class EvaluationError(RunError):
    """The run cannot be evaluated (no run there, no weights yet); the message says why."""


def read_result(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's saved evaluation, or None if it has none or it is damaged: the one place
    ``evaluation.json`` is read, so a partial or hand-edited file reads as "not evaluated"
    everywhere (the Runs table, its result, Compare) instead of breaking the page."""
    return valid_result(read_json(RunPaths(Path(run_dir)).evaluation))


def valid_result(result: Any) -> dict[str, Any] | None:
    """``result`` with both encoders' figures checked and the delta derived from them, or None.

    Each encoder needs a headline kNN top-1; every metric must be a percentage or null (missing
    is null). The delta is recomputed: it is derived data, and a stored one may disagree.
    """
    if not isinstance(result, dict):
        return None
    scores = {name: _figures(result.get(name)) for name in ("trained", "random_init")}
    if any(figures is None or figures["knn_top1"] is None for figures in scores.values()):
        return None
    trained, random_init = scores["trained"], scores["random_init"]
    delta = {m: None if trained[m] is None or random_init[m] is None
             else round(trained[m] - random_init[m], 2) for m in METRICS}
    classes = result.get("classes")
    return {**result, **scores, "delta": delta, "paired": _paired(result.get("paired")),
            "classes": classes if isinstance(classes, list) else []}


def _paired(saved: Any) -> dict[str, Any] | None:
    """A saved paired test, or None (none saved: an evaluation from before it; or damaged)."""
    if not isinstance(saved, dict):
        return None
    counts = [saved.get(key) for key in ("trained_only", "random_init_only")]
    p = saved.get("p_value")
    if not all(type(n) is int and n >= 0 for n in counts) or not (
            isinstance(p, (int, float)) and not isinstance(p, bool) and 0 <= p <= 1):
        return None
    return saved


def _figures(saved: Any) -> dict[str, Any] | None:
    """One encoder's saved figures with every metric present, or None if any is no percentage."""
    if not isinstance(saved, dict):
        return None
    figures = {**saved, **{m: saved.get(m) for m in METRICS}}
    return figures if all(_percentage(figures[m]) for m in METRICS) else None


def _percentage(value: Any) -> bool:
    """None or a number in [0, 100] (not a bool, not a string, not a 400-digit integer)."""
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)
                             and 0 <= value <= 100)


def _run_with_weights(run_dir: str | Path) -> tuple[RunPaths, RunConfig]:
    """The run at ``run_dir`` and its config, once it has weights to evaluate."""
    paths = RunPaths(Path(run_dir))
    if not paths.root.is_dir():
        what = "a file, not a run directory" if paths.root.exists() else "no run directory"
        raise EvaluationError(f"{what} at {run_dir}: pass a run's folder (checkpoints/<run>)")
    if not paths.config.is_file():
        raise EvaluationError(f"{run_dir} is not a run directory (no config.yaml)")
    cfg = RunConfig.load(paths.config)
    if not paths.weights.is_file():
        raise EvaluationError(f"run {paths.run_id} has no saved weights yet ({paths.weights.name} "
                              "is written at the first checkpoint and at the end of training)")
    return paths, cfg


def _load_run(run_dir: str | Path
              ) -> tuple[RunPaths, MaskedAutoencoder, MaskedAutoencoder, int | None]:
    """(paths, trained model, random-init model, step of the weights)."""
    import torch

    from mae_core.model import MaskedAutoencoder
    from mae_core.weights import load_model, read_metadata

    paths, cfg = _run_with_weights(run_dir)
    trained = load_model(paths.weights)
    step = read_metadata(paths.weights).get("step")
    # The same constructor call after the same seed as the trainer's (pl.seed_everything(seed)
    # then MaskedAutoencoder(cfg.model)): the encoder before its first step.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        random_init = MaskedAutoencoder(trained.cfg).eval()
    return paths, trained, random_init, int(step) if step is not None else None


def score(model: MaskedAutoencoder, labelled: features.Labelled,
          splits: list[tuple[Tensor, Tensor]], linear: bool, seed: int
          ) -> tuple[dict[str, Any], Tensor]:
    """Every figure for one encoder (kNN for both features and both k, the linear probe if asked)
    over the (bank, query) ``splits`` of ``labelled``, pooled over their queries, and which queries
    the headline kNN top-1 gets right, split after split (for :func:`paired_test`)."""
    import torch

    from mae_core import features

    classes, labels = labelled.num_classes, labelled.labels
    cls, mean = features.embed(model, labelled.images)  # frozen: once, whatever the splits
    details: dict[str, Any] = {}
    for feature, x in (("cls", cls), ("mean_patch", mean)):
        for k in features.KNN_KS:
            details[f"knn_{feature}_k{k}"] = _pooled(
                [features.knn_accuracy(x[q], x[b], labels[b], labels[q], classes, k=k)
                 for b, q in splits], splits)
        if linear:
            details[f"linear_{feature}"] = _pooled(
                [features.linear_probe(x[b], labels[b], x[q], labels[q], classes, seed=seed)
                 for b, q in splits], splits)
    headline = details[f"knn_{HEADLINE_FEATURE}_k{HEADLINE_K}"]
    probe = details.get(f"linear_{HEADLINE_FEATURE}")
    x = mean if HEADLINE_FEATURE == "mean_patch" else cls
    hits = torch.cat([features.knn_hits(x[q], x[b], labels[b], labels[q], classes, k=HEADLINE_K)
                      for b, q in splits])
    return {"knn_top1": headline["top1"], "knn_top5": headline["top5"],
            "linear_top1": probe["top1"] if probe else None, "details": details}, hits


def _pooled(figures: list[dict[str, Any]], splits: list[tuple[Tensor, Tensor]]) -> dict[str, Any]:
    """Top-1 / top-5 over every query of every split (each split's weighted by its queries); the
    other fields (k capped by the bank, the probe's epochs) as the smallest split had them."""
    counts = [len(q) for _, q in splits]
    pooled = {key: min(f[key] for f in figures) for key in figures[0]}
    for key in ("top1", "top5"):
        pooled[key] = sum(f[key] * n for f, n in zip(figures, counts)) / sum(counts)
    return pooled


def paired_test(trained_hits: Tensor, random_hits: Tensor) -> dict[str, Any]:
    """Whether the two encoders' headline kNN top-1 differ by more than chance, on the same val
    images: the exact McNemar test (two-sided), which counts only the images one encoder gets
    right and the other wrong. On one split's 100 images one image is one point: a delta of a few
    points is often no evidence at all, and the table says which."""
    trained_only = int((trained_hits & ~random_hits).sum())
    random_only = int((random_hits & ~trained_hits).sum())
    return {"test": "exact McNemar, two-sided, headline kNN top-1",
            "trained_only": trained_only, "random_init_only": random_only,
            # Unrounded: rounded to 4 places, p = 0.04998 (117 against 150) was saved as 0.05,
            # "no evidence", and 1.9e-09 as 0.
            "p_value": mcnemar_p(trained_only, random_only)}


def mcnemar_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: of ``b + c`` discordant images, ``b`` went one way; under
    "no difference" each way is a fair coin's toss."""
    n = b + c
    # In logs: exact big integers took 4 s at 10,000 discordant images (and 2**n overflows a float).
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2)
            for i in range(min(b, c) + 1)]
    top = max(logs)
    tail = math.exp(top) * sum(math.exp(value - top) for value in logs)
    return min(1.0, 2 * tail)


def verdict(paired: dict[str, Any]) -> str:
    """The paired test in words, for the table and the app's message."""
    p = paired["p_value"]
    judged = ("a difference chance alone would rarely give" if p < SIGNIFICANCE
              else "within what chance gives on these images: no evidence either way")
    return (f"the pretrained encoder alone right on {paired['trained_only']} images, random "
            f"init alone on {paired['random_init_only']}: p = {p:.2g} (exact McNemar), {judged}")


def evaluate_run(run_dir: str | Path, data: str | Path | None = None, linear_probe: bool = False,
                 val_fraction: float = 0.2, seed: int = 0, progress: Progress | None = None,
                 save: bool = True, folds: int = DEFAULT_FOLDS) -> dict[str, Any]:
    """Evaluate the run's latest weights and its random init; saved in the run unless ``save``
    is False. ``data`` None is the demo set (written on first use). ``folds``: stratified
    cross-validation, every image a query once (:func:`mae_core.features.fold_splits`); 1 is
    one split holding out ``val_fraction``. Raises :class:`EvaluationError`,
    :class:`DataError`, :class:`ConfigError` or ``WeightsError``."""
    from mae_core import features

    _check_seed(seed)
    _check_int(SimpleNamespace(folds=folds), "folds", 1, MAX_FOLDS)
    report = progress or (lambda fraction, text: None)
    started = time.monotonic()
    report(0.0, "loading the run")
    paths, trained, random_init, step = _load_run(run_dir)
    report(0.1, "reading the labelled images")
    # The demo set lives in the runs directory (checkpoints/.demo-labelled), written once.
    folder = ensure_demo_set(paths.root.parent / DEMO_PATH.name) if data is None else Path(data)
    labelled = features.load_labelled(folder, trained.cfg.image_size, trained.cfg.channels)
    splits = ([features.split_index(labelled, val_fraction, seed)] if folds == 1
              else features.fold_splits(labelled, folds, seed))
    results, hits = {}, {}
    for i, (name, model) in enumerate((("trained", trained), ("random_init", random_init))):
        report(0.2 + 0.4 * i, f"embedding and scoring the {name.replace('_', ' ')} encoder")
        results[name], hits[name] = score(model, labelled, splits, linear_probe, seed)
    delta = {m: (None if results["trained"][m] is None
                 else round(results["trained"][m] - results["random_init"][m], 2))
             for m in METRICS}
    result = {
        "run_id": paths.run_id, "step": step, "data": str(folder), "classes": labelled.classes,
        # With folds, "val" is every image queried once, "train" the largest bank it met.
        "train_images": max(len(b) for b, _ in splits), "val_images": sum(len(q) for _, q in splits),
        "skipped_files": labelled.skipped, "folds": folds,
        "split": val_fraction if folds == 1 else None, "seed": seed,
        "feature": HEADLINE_FEATURE, "k": HEADLINE_K, "temperature": features.KNN_TEMPERATURE,
        "linear_probe": ("lightly LinearClassifier recipe on cached frozen features "
                         f"({features.PROBE_EPOCHS} epochs)") if linear_probe else None,
        "trained": results["trained"], "random_init": results["random_init"], "delta": delta,
        "paired": paired_test(hits["trained"], hits["random_init"]),
        "seconds": round(time.monotonic() - started, 1), "evaluated_at": time.time(),
    }
    if save:
        try:
            atomic_write_json(paths.evaluation, result, make_dirs=False)
        except FileNotFoundError:
            raise EvaluationError(f"run {paths.run_id} was deleted while it was evaluated") from None
    report(1.0, "done")
    return result


def _check_seed(seed: Any) -> None:
    # torch's generator took any int, and one past 64 bits ended in its overflow traceback
    _check_int(SimpleNamespace(seed=seed), "seed", 0, MAX_SEED)


def summary(result: dict[str, Any] | None) -> str:
    """A saved evaluation in one cell: headline kNN top-1, pretrained / random init (delta); "–"
    for none, or a damaged one."""
    result = valid_result(result)
    if result is None:
        return "–"
    trained, random_init = result["trained"]["knn_top1"], result["random_init"]["knn_top1"]
    return f"{trained:.1f} / {random_init:.1f} ({trained - random_init:+.1f})"


def _cell(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:+.1f}" if signed else f"{value:.1f}"


def images_said(result: dict[str, Any]) -> str:
    """How the images were split, in words ("400 train / 100 val images", or with folds "5-fold
    cross-validation: each of 500 images queried once against a bank of 400")."""
    folds = result.get("folds")
    if isinstance(folds, int) and folds > 1:
        return (f"{folds}-fold cross-validation: each of {result.get('val_images')} images queried "
                f"once against a bank of {result.get('train_images')}")
    return f"{result.get('train_images')} train / {result.get('val_images')} val images"


def table(result: dict[str, Any]) -> str:
    """The result as a text table: pretrained vs random init, delta in points."""
    headline = result["trained"]["details"].get(f"knn_{result['feature']}_k{HEADLINE_K}", {})
    k = headline.get("k", HEADLINE_K)  # capped by the bank's size
    names = {"knn_top1": f"kNN top-1 (k={k})", "knn_top5": f"kNN top-5 (k={k})",
             "linear_top1": "linear probe top-1"}
    lines = [(f"run {result['run_id']} at step {result['step']}, {result['data']}: "
              f"{len(result['classes'])} classes, {images_said(result)}, feature "
              f"{result['feature']}"),
             f"{'metric (%)':<22}{'pretrained':>11}{'random init':>13}{'delta (points)':>16}"]
    for metric in METRICS:
        lines.append(f"{names[metric]:<22}{_cell(result['trained'][metric]):>11}"
                     f"{_cell(result['random_init'][metric]):>13}"
                     f"{_cell(result['delta'][metric], signed=True):>16}")
    if result.get("paired"):
        lines.append(f"kNN top-1, image by image: {verdict(result['paired'])}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mae_core.evaluate", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("--run", required=True, help="the run directory (checkpoints/<run>)")
    parser.add_argument("--data", default=None, help="labelled folder root/<class>/*.png "
                        "(default: the demo set, written beside the run, e.g. "
                        f"{DEMO_PATH}, on first use)")
    parser.add_argument("--linear-probe", action="store_true", help="also train a linear probe")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--folds", type=int, default=None,
                        help=f"stratified cross-validation: every image a query once against the "
                             f"other folds (default {DEFAULT_FOLDS}; 1 = one split, --split)")
    parser.add_argument("--split", type=float, default=None,
                        help="with --folds 1 (which it implies), the validation fraction (0.2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and the probe")
    parser.add_argument("--no-save", action="store_true",
                        help=f"do not write {RunPaths(Path('<run>')).evaluation}")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.split is not None and args.folds not in (None, 1):
        parser.exit(2, "error: --split holds out one share of the images: it goes with --folds 1, "
                       f"not --folds {args.folds}\n")
    folds = args.folds if args.folds is not None else 1 if args.split is not None else DEFAULT_FOLDS
    try:
        _check_seed(args.seed)
        _check_int(SimpleNamespace(folds=folds), "folds", 1, MAX_FOLDS)
        _run_with_weights(args.run)
    except (EvaluationError, ConfigError) as err:  # said before torch is imported
        parser.exit(2, f"error: {err}\n")
    from mae_core.images import ImageError
    from mae_core.weights import WeightsError

    try:
        result = evaluate_run(args.run, args.data, linear_probe=args.linear_probe,
                              val_fraction=0.2 if args.split is None else args.split,
                              seed=args.seed, save=not args.no_save, folds=folds)
    except (EvaluationError, DataError, ConfigError, WeightsError, ImageError) as err:
        parser.exit(2, f"error: {err}\n")
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0


if __name__ == "__main__":
    from mae_core.process import exit_quickly

    exit_quickly(main())
