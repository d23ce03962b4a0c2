"""Frozen-encoder features and their scores: labels from class folders, a stratified deterministic
split, unmasked embeddings, lightly's kNN and the linear probe on features with known structure."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from mae_core import features
from mae_core.config import ModelConfig
from mae_core.data import DataError
from mae_core.model import MaskedAutoencoder


def _folder(root, counts: dict[str, int], size: int = 40):
    for c, (name, count) in enumerate(counts.items()):
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (size, size + 8), (40 * c, 255 - 30 * c, 7 * i)).save(
                root / name / f"{i}.png")
    return root


def test_labels_come_from_class_folders_and_unreadable_files_are_counted(tmp_path):
    root = _folder(tmp_path / "set", {"cat": 3, "dog": 4})
    (root / "dog" / "broken.png").write_bytes(b"not a png")
    (root / "stray.png").write_bytes((root / "cat" / "0.png").read_bytes())  # not in a class
    data = features.load_labelled(root, 32)
    assert data.classes == ["cat", "dog"] and data.images.shape == (7, 3, 32, 32)
    assert data.images.dtype == torch.uint8 and data.skipped == 1
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1, 1]


def test_a_link_in_one_class_to_another_class_keeps_that_class(tmp_path):
    """The walk follows a folder once, the first time it meets it: a link a/b2 -> ../b gave b's
    images to a, and the folder was refused as having one class. A loop and a link out stay."""
    root = _folder(tmp_path / "set", {"a": 2, "b": 3})
    outside = _folder(tmp_path / "more", {"x": 2}) / "x"
    (root / "a" / "b2").symlink_to("../b")
    (root / "a" / "up").symlink_to("..")  # a loop
    (root / "a" / "out").symlink_to(outside)  # images of a, though kept elsewhere
    found = features.class_folders(root)
    assert sorted(found) == ["a", "b"]
    assert len(found["a"]) == 4 and len(found["b"]) == 3


@pytest.mark.parametrize("counts, message", [
    ({}, "no class subfolders"),
    ({"only": 3}, "at least 2 class"),
])
def test_a_folder_that_is_not_labelled_is_refused(tmp_path, counts, message):
    root = _folder(tmp_path / "set", counts)
    root.mkdir(exist_ok=True)
    Image.new("RGB", (8, 8)).save(root / "loose.png")
    with pytest.raises(DataError, match=message):
        features.load_labelled(root, 32)


def test_a_missing_folder_is_refused(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        features.class_folders(tmp_path / "nowhere")
    with pytest.raises(DataError, match="no labelled folder given"):
        features.class_folders(" ")  # blank: not the current folder, nor the sample photos
    with pytest.raises(DataError, match="system folder"):
        features.class_folders("/proc")  # walked as a data folder is, with its guards


def test_an_unknown_users_home_is_refused_in_words():
    """Evaluate's labelled folder "~nosuchuser/set" raised pathlib's bare RuntimeError."""
    with pytest.raises(DataError, match="~nosuchuser-mae-studio names no home folder"):
        features.class_folders("~nosuchuser-mae-studio/set")


def test_knn_without_queries_or_bank_says_so():
    """The live monitor called it with no readable query image: ZeroDivisionError at step 0."""
    features_ = torch.randn(4, 8)
    labels = torch.tensor([0, 1, 0, 1])
    for query, bank in ((features_[:0], features_), (features_, features_[:0])):
        with pytest.raises(DataError, match="needs images on both sides"):
            features.knn_accuracy(query, bank, labels[:len(bank)], labels[:len(query)], 2)


def test_the_split_is_stratified_and_the_same_for_the_same_seed():
    labels = torch.tensor([0] * 10 + [1] * 5 + [2] * 2)
    data = features.Labelled(torch.arange(17).view(17, 1, 1, 1).expand(17, 3, 2, 2), labels,
                             ["a", "b", "c"])
    train, val = features.split(data, 0.2, seed=3)
    assert torch.bincount(val.labels).tolist() == [2, 1, 1]  # every class, at least one
    assert torch.bincount(train.labels).tolist() == [8, 4, 1]
    ids = lambda part: part.images[:, 0, 0, 0].tolist()  # noqa: E731
    assert not set(ids(train)) & set(ids(val))
    again = features.split(data, 0.2, seed=3)[1]
    assert ids(again) == ids(val) and ids(features.split(data, 0.2, seed=4)[1]) != ids(val)
    with pytest.raises(DataError, match="strictly between"):
        features.split(data, 1.0, seed=0)


def test_cross_validation_queries_every_image_once_stratified_and_the_same_for_the_same_seed():
    labels = torch.tensor([0] * 10 + [1] * 5 + [2] * 2 + [3])  # class 3: one image, no neighbour
    data = features.Labelled(torch.zeros(18, 3, 2, 2, dtype=torch.uint8), labels,
                             ["a", "b", "c", "d"])
    splits = features.fold_splits(data, 5, seed=3)
    queries = torch.cat([q for _, q in splits])
    assert sorted(queries.tolist()) == list(range(17))  # each once; the lone image never
    for bank, query in splits:
        assert not set(bank.tolist()) & set(query.tolist())
        assert sorted(bank.tolist() + query.tolist()) == list(range(18))
        assert 17 in bank.tolist()
    # Stratified: class 0's ten images, two per fold; the folds within one image of each other.
    assert [int((labels[q] == 0).sum()) for _, q in splits] == [2] * 5
    assert max(len(q) for _, q in splits) - min(len(q) for _, q in splits) <= 1
    again = features.fold_splits(data, 5, seed=3)
    assert all(q.tolist() == q2.tolist() for (_, q), (_, q2) in zip(splits, again))
    assert [q.tolist() for _, q in features.fold_splits(data, 5, seed=4)] != \
        [q.tolist() for _, q in splits]
    with pytest.raises(DataError, match="at least 2 folds"):
        features.fold_splits(data, 1, seed=0)
    lone = features.Labelled(data.images[:2], torch.tensor([0, 1]), ["a", "b"])
    with pytest.raises(DataError, match="each class needs 2 images"):
        features.fold_splits(lone, 5, seed=0)


def test_embed_sees_every_patch_and_keeps_the_model_mode():
    torch.manual_seed(0)
    model = MaskedAutoencoder(ModelConfig(image_size=32, patch_size=8)).train()
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    cls, mean = features.embed(model, images, batch_size=2)
    assert cls.shape == mean.shape == (3, model.backbone.vit.embed_dim) and model.training
    with torch.no_grad():
        tokens = model.eval().backbone.encode(model.normalize(images))
    assert tokens.shape[1] == 1 + 16  # no masking: the class token and all 16 patches
    torch.testing.assert_close(cls, tokens[:, 0])
    torch.testing.assert_close(mean, tokens[:, 1:].mean(dim=1))


def _clusters(seed: int, per_class: int = 30, classes: int = 6, spread: float = 0.3):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, 16, generator=generator)
    labels = torch.arange(classes).repeat_interleave(per_class)
    return centres[labels] + spread * torch.randn(len(labels), 16, generator=generator), labels


def test_knn_finds_clusters_and_not_noise():
    bank, bank_labels = _clusters(0)
    query, query_labels = _clusters(0, per_class=5)
    result = features.knn_accuracy(query, bank, bank_labels, query_labels, 6, k=20)
    assert result["top1"] == 100.0 and result["k"] == 20
    shuffled = bank_labels[torch.randperm(len(bank_labels), generator=torch.Generator().manual_seed(1))]
    chance = features.knn_accuracy(query, bank, shuffled, query_labels, 6, k=200)
    assert chance["k"] == len(bank) and chance["top1"] < 50  # k capped by the bank's size


def test_knn_in_chunks_scores_exactly_as_all_queries_at_once(monkeypatch):
    """lightly's knn_predict holds a (queries × k × classes) one-hot: 1,000 classes cost 1.6 GB in
    the app, 5,000 would be ~40 GB. The queries go in chunks of bounded size; the scores are the
    ones of one call over every query."""
    from lightly.utils.benchmarking import knn_predict

    bank, bank_labels = _clusters(3, per_class=8, spread=2.0)
    query, query_labels = _clusters(4, per_class=7, spread=2.0)
    whole = knn_predict(torch.nn.functional.normalize(query, dim=1),
                        torch.nn.functional.normalize(bank, dim=1).t().contiguous(), bank_labels, 6,
                        knn_k=10, knn_t=features.KNN_TEMPERATURE)
    expected = {top: features.topk_accuracy(whole, query_labels, top) for top in (1, 5)}
    monkeypatch.setattr(features, "KNN_CHUNK_VALUES", 5 * (10 * 6 + len(bank)))  # 5 queries a chunk
    chunked = features.knn_accuracy(query, bank, bank_labels, query_labels, 6, k=10)
    assert 0 < expected[1] < 100
    assert chunked["top1"] == pytest.approx(expected[1]) and chunked["top5"] == pytest.approx(expected[5])
    hits = features.knn_hits(query, bank, bank_labels, query_labels, 6, k=10)  # image by image
    assert hits.dtype == torch.bool and hits.shape == (len(query),)
    assert 100.0 * hits.float().mean().item() == pytest.approx(expected[1])
    assert torch.equal(hits, whole[:, 0] == query_labels)


def test_the_linear_probe_learns_a_separable_problem_deterministically():
    train_x, train_y = _clusters(2, spread=1.0)
    val_x, val_y = _clusters(2, per_class=10, spread=1.0)
    first = features.linear_probe(train_x, train_y, val_x, val_y, 6, seed=0)
    assert first["top1"] >= 90 and first["top5"] == 100.0
    assert features.linear_probe(train_x, train_y, val_x, val_y, 6, seed=0) == first
    shuffle = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(1))
    noise = features.linear_probe(train_x, train_y[shuffle], val_x, val_y, 6)
    assert noise["top1"] < 60


def test_a_large_folder_is_read_up_to_a_bounded_sorted_subset(tmp_path, monkeypatch):
    root = _folder(tmp_path / "set", {"a": 5, "b": 3, "c": 4})
    monkeypatch.setattr(features, "MAX_IMAGES", 6)  # 2 per class at most
    classes = features.class_folders(root)
    assert {name: [Path(p).name for p in paths] for name, paths in classes.items()} == {
        "a": ["0.png", "1.png"], "b": ["0.png", "1.png"], "c": ["0.png", "1.png"]}


def test_more_classes_than_the_read_can_give_2_images_each_are_refused_in_words(tmp_path,
                                                                               monkeypatch):
    """Past MAX_IMAGES / 2 classes one image per class was kept, and the split then failed with
    "each class needs 2 images" on a folder whose classes all had many."""
    root = _folder(tmp_path / "set", {"a": 3, "b": 3, "c": 3})
    monkeypatch.setattr(features, "MAX_IMAGES", 5)
    with pytest.raises(DataError, match="has 3 classes: the evaluation reads at most 5 images, at "
                                        "least 2 per class, so at most 2 classes"):
        features.class_folders(root)
    monkeypatch.setattr(features, "MAX_IMAGES", 6)
    assert len(features.class_folders(root)) == 3


def test_the_module_example_runs_as_written(tmp_path):
    """The module docstring's example, run line by line on a small labelled folder: it indexed
    features with the split's ``Labelled`` objects and gave ``knn_accuracy`` no query labels."""
    lines = [line.strip()[4:] for line in features.__doc__.splitlines()
             if line.strip().startswith(">>> ")]
    assert lines and "knn_accuracy(" in lines[-1]
    root = _folder(tmp_path / "set", {"a": 5, "b": 5})
    code = "\n".join(lines[:-1] + [f"result = {lines[-1]}"])
    code = code.replace('"checkpoints/.demo-labelled"', repr(str(root))).replace(
        "image_size=64", "image_size=32")
    torch.manual_seed(0)
    namespace = vars(features) | {"model": MaskedAutoencoder(
        ModelConfig(preset="vit-tiny", image_size=32, patch_size=8))}
    exec(compile(code, "features example", "exec"), namespace)
    result = namespace["result"]
    assert result["k"] == 8 and 0 <= result["top1"] <= 100  # k capped by the bank of 8
