"""The depth study: k-fold splits, the study's verdict, and a small study through the real command line."""

from __future__ import annotations

import pytest

from finetune.errors import UsageError
from finetune.folders import split_kfold

NAMES = ["a", "b", "c"]


def _classes(sizes=(23, 11, 7)) -> dict[int, list[str]]:
    return {label: [f"{NAMES[label]}/{i:03d}.png" for i in range(size)] for label, size in enumerate(sizes)}


def test_k_folds_test_every_image_exactly_once_and_keep_classes_in_every_split():
    by_class, k = _classes(), 5
    tested = []
    for fold in range(k):
        splits = split_kfold(by_class, k, fold, val_share=0.2 / 0.9, seed=3, class_names=NAMES)
        paths = {name: [path for path, _ in samples] for name, samples in splits.items()}
        assert not set(paths["test"]) & set(paths["train"]) and not set(paths["test"]) & set(paths["val"])
        assert not set(paths["train"]) & set(paths["val"])
        assert sum(len(p) for p in paths.values()) == 41
        for name in ("train", "val", "test"):
            assert {label for _, label in splits[name]} == {0, 1, 2}, (fold, name)
        tested += paths["test"]
    assert sorted(tested) == sorted(path for paths in by_class.values() for path in paths)


def test_folds_are_balanced_seeded_and_carve_the_validation_share_from_the_rest():
    by_class = _classes((40, 20))
    sizes = [len(split_kfold(by_class, 5, fold, 0.25, 0, NAMES)["test"]) for fold in range(5)]
    assert sizes == [12] * 5
    first = split_kfold(by_class, 5, 2, 0.25, seed=7, class_names=NAMES)
    assert first == split_kfold(by_class, 5, 2, 0.25, seed=7, class_names=NAMES)
    assert first != split_kfold(by_class, 5, 2, 0.25, seed=8, class_names=NAMES)
    assert len(first["val"]) == 8 + 4  # a quarter of each class's 32 and 16 left for training and validation
    # Uneven classes: fold sizes differ by at most one image.
    uneven = [len(split_kfold(_classes(), 5, fold, 0.2, 0, NAMES)["test"]) for fold in range(5)]
    assert max(uneven) - min(uneven) <= 1


@pytest.mark.parametrize(("folds", "fold", "message"), [
    (1, 0, "data.folds=1 must be at least 2"),
    (5, 5, "data.fold=5 must be one of 0..4"),
    (8, 0, "class 'c' has 7 image(s): too few for data.folds=8"),
])
def test_bad_fold_settings_name_the_fix(folds, fold, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        split_kfold(_classes(), folds, fold, 0.2, 0, NAMES)
