"""Image folders: listing the images of one sub-folder per class, and splitting them into train/val/test."""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from finetune.data.groups import Leakage, split_grouped
from finetune.data.images import IMAGE_EXTENSIONS, is_image_file
from finetune.data.scan import near_duplicates
from finetune.errors import UsageError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
Sample = tuple[str, int]  # (path, label)


def split_stratified(
    by_class: dict[int, list[str]], fractions: Sequence[float], seed: int, class_names: list[str]
) -> dict[str, list[Sample]]:
    """Splits every class on its own by `fractions` (train, val, test), shuffled by `seed`.

    Each non-zero fraction gets at least one image of every class, so every class is seen in every split.

    Raises:
        UsageError: a class has too few images for that.
    """
    generator = np.random.default_rng(seed)
    splits: dict[str, list[Sample]] = {name: [] for name in SPLITS}
    needed = 1 + sum(1 for f in fractions[1:] if f > 0)
    for label in sorted(by_class):
        paths = sorted(by_class[label])
        if len(paths) < needed:
            raise UsageError(
                f"class {class_names[label]!r} has {len(paths)} image(s): too few to split "
                f"{'/'.join(f'{f:g}' for f in fractions)} with one in each split; add images "
                "or change data.split"
            )
        order = generator.permutation(len(paths))
        shuffled = [paths[i] for i in order]
        sizes = [max(1, round(len(paths) * f)) if f > 0 else 0 for f in fractions[1:]]
        n_val, n_test = sizes
        n_train = len(paths) - n_val - n_test
        if n_train < 1:  # rounding up val and test took every image: the class would never be trained on
            raise UsageError(
                f"class {class_names[label]!r} has {len(paths)} image(s): data.split="
                f"[{','.join(f'{f:g}' for f in fractions)}] gives {n_val} to val and {n_test} to "
                "test and none to train; add images or give train a larger share"
            )
        pieces = {
            "train": shuffled[:n_train],
            "val": shuffled[n_train : n_train + n_val],
            "test": shuffled[n_train + n_val :],
        }
        for name, chosen in pieces.items():
            splits[name].extend((path, label) for path in chosen)
    return splits


def split_kfold(
    by_class: dict[int, list[str]], folds: int, fold: int, val_share: float, seed: int, class_names: list[str]
) -> dict[str, list[Sample]]:
    """Stratified k-fold: fold `fold` of `folds` is the test set; a validation share is carved from the rest.

    Every class is shuffled by `seed` and dealt round the folds, continuing where the previous class stopped, so
    folds differ in size by at most one image and the `folds` runs of one seed test every image exactly once.
    From each class's images outside the test fold, a `val_share` (at least one image) is the validation set.

    Args:
        by_class: each class's images.
        folds: the number of folds (at least 2).
        fold: the fold that is the test set, 0 to folds - 1.
        val_share: the validation set's share of the images left for training and validation, e.g. 0.2 / 0.9.
        seed: the shuffle's seed: the same seed gives the same folds in every run.
        class_names: for the error message.

    Raises:
        UsageError: folds or fold out of range, or a class too small to have a test, a validation and a training
            image in every fold.
    """
    if not isinstance(folds, int) or folds < 2:
        raise UsageError(f"data.folds={folds} must be at least 2 (or null: one train/val/test split)")
    if not isinstance(fold, int) or not 0 <= fold < folds:
        raise UsageError(f"data.fold={fold} must be one of 0..{folds - 1} with data.folds={folds}")
    generator = np.random.default_rng(seed)
    splits: dict[str, list[Sample]] = {name: [] for name in SPLITS}
    dealt = 0  # images dealt so far: the next class starts at the next fold
    for label in sorted(by_class):
        paths = sorted(by_class[label])
        # The fewest images left for training and validation in any fold: n - ceil(n / folds).
        if len(paths) < folds or len(paths) - -(-len(paths) // folds) < 2:
            raise UsageError(
                f"class {class_names[label]!r} has {len(paths)} image(s): too few for data.folds="
                f"{folds} (every fold needs one test, one validation and one training image of every "
                "class); add images or lower data.folds"
            )
        shuffled = [paths[i] for i in generator.permutation(len(paths))]
        test = [path for index, path in enumerate(shuffled) if (dealt + index) % folds == fold]
        rest = [path for index, path in enumerate(shuffled) if (dealt + index) % folds != fold]
        dealt += len(paths)
        n_val = min(len(rest) - 1, max(1, round(len(rest) * val_share)))
        splits["test"].extend((path, label) for path in test)
        splits["val"].extend((path, label) for path in rest[:n_val])
        splits["train"].extend((path, label) for path in rest[n_val:])
    return splits


def read_class_folders(root: Path) -> tuple[list[str], dict[int, list[str]]]:
    """The class names (the sub-folders of `root`, sorted, hidden ones skipped) and each class's images.

    Raises:
        UsageError: fewer than two class folders.
    """
    class_names = class_folders(root)
    if len(class_names) < 2:
        raise UsageError(
            f"{root} holds {len(class_names)} class folder(s): a classifier needs at least two "
            "sub-folders of images, one per class"
        )
    return class_names, {label: list_images(root / name) for label, name in enumerate(class_names)}


def class_folders(root: Path) -> list[str]:
    """The sub-folders of `root` (one per class), sorted; hidden ones are no classes."""
    return sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))


def read_split_folders(root: Path) -> tuple[list[str], dict[str, dict[int, list[str]]]]:
    found = {split: read_class_folders(root / split) for split in SPLITS if (root / split).is_dir()}
    class_names = found["train"][0]
    for split, (names, _) in found.items():
        if names != class_names:
            missing = sorted(set(class_names) - set(names))
            extra = sorted(set(names) - set(class_names))
            raise UsageError(
                f"{root / split} has other classes than {root / 'train'} (missing: {missing}, "
                f"extra: {extra}); every split folder needs the same class sub-folders"
            )
    return class_names, {split: by_class for split, (_, by_class) in found.items()}


def usable_images(
    folder: Path, class_names: list[str], by_class: dict[int, list[str]], skipped: dict[str, str]
) -> dict[int, list[str]]:
    """Each class's images less the unreadable ones.

    Raises:
        UsageError: a class folder under `folder` is left with no image.
    """
    usable = {}
    for label, paths in by_class.items():
        usable[label] = [path for path in paths if path not in skipped]
        if not usable[label]:
            what = (
                f"no usable images ({len(paths)} unreadable)"
                if paths
                else f"no images (accepted: {', '.join(IMAGE_EXTENSIONS)})"
            )
            raise UsageError(
                f"class folder {folder / class_names[label]} holds {what}; add images or remove the folder"
            )
    return usable


def list_images(folder: str | os.PathLike) -> list[str]:
    """Every image file under `folder` (recursively, following links), sorted: the one image-folder walker of
    training, predict and evaluate.

    Hidden files and folders are skipped, and so are files that are not images by name (`is_image_file`); those
    are logged (at INFO), not returned.

    Returns:
        The paths, each `folder` as given joined with the path below it.
    """
    images, others = [], []
    for directory, subdirectories, files in os.walk(os.fspath(folder), followlinks=True):
        subdirectories[:] = sorted(d for d in subdirectories if not d.startswith("."))
        for name in sorted(files):
            if is_image_file(name):
                images.append(os.path.join(directory, name))
            else:
                others.append(name)
    # Hidden files (.DS_Store, AppleDouble ._* companions) and others (Thumbs.db, notes) are not images.
    if others:
        log.info(
            "%s: ignored %d file(s) that are not images by name, e.g. %s", folder, len(others), ", ".join(others[:3])
        )
    return sorted(images)


def list_and_split(
    root: Path,
    fractions: Sequence[float],
    seed: int,
    folds: int | None,
    fold: int,
    scan: Callable[[list[str]], tuple[dict[str, str], dict[str, str]]],
    leakage: Leakage | None = None,
) -> tuple[list[str], dict[str, list[Sample]], dict[str, str], str]:
    """Lists an image folder and splits it: its own train/val(/test) folders, k folds, or a stratified split.

    Args:
        root: one sub-folder per class, or train/ and val/ (and test/) folders of class sub-folders.
        fractions: train, val and test fractions of every class (without `folds`).
        seed: the split's seed.
        folds: K for k-fold cross-validation (fold `fold` is the test set; validation is carved from the rest in
            the proportion val : train of `fractions`), or None.
        fold: the test fold.
        scan: returns the unreadable images among those it is given, with the reason, and the perceptual hashes of
            the others (`finetune.data.scan.scan_images`).
        leakage: the groups to keep together and near-duplicates to look for (`finetune.data.groups`); it receives
            the pairs found and the number of groups. None: neither.

    Returns:
        The class names, the images of each split, the unreadable (skipped) images, and a phrase naming the split.
    """
    if (root / "train").is_dir() and (root / "val").is_dir():
        class_names, listed = read_split_folders(root)
    else:
        class_names, by_class = read_class_folders(root)
        listed = {"": by_class}
    leakage = leakage or Leakage(duplicates="ignore")
    skipped, hashes = scan([path for by_class in listed.values() for paths in by_class.values() for path in paths])
    usable = {split: usable_images(root / split, class_names, by_class, skipped) for split, by_class in listed.items()}
    leakage.pairs = near_duplicates(hashes, leakage.duplicate_distance) if leakage.hashes else []
    if "" in usable and leakage.groups_asked:
        groups = leakage.image_groups(root, class_names, usable[""])
        leakage.group_count = len(set(groups.values()))
        if leakage.group_count < len(groups):  # else every image is its own group: the plain split, unchanged
            splits = split_grouped(usable[""], groups, fractions, seed, folds, fold, class_names)
            shape = f"fold {fold} of {folds} folds as test" if folds else "/".join(f"{f:g}" for f in fractions)
            source = f"a stratified group {shape} split ({leakage.group_count} groups, seed {seed})"
            return class_names, splits, skipped, source
        leakage.group_count = 0
    if "" not in usable and leakage.groups_asked:
        raise UsageError(
            f"data.groups, data.group_by and data.duplicates=group choose how the run splits a folder, but {root} "
            "holds train/ and val/ folders (a fixed split): leave them out (data.duplicates=report lists the "
            "near-duplicates across those folders), or point data.root at a folder of class sub-folders"
        )
    if "" in usable and folds is not None:
        val_share = fractions[1] / (fractions[0] + fractions[1])
        splits = split_kfold(usable[""], folds, fold, val_share, seed, class_names)
        return class_names, splits, skipped, f"fold {fold} of {folds} stratified folds as test (seed {seed})"
    if "" in usable:
        splits = split_stratified(usable[""], fractions, seed, class_names)
        return class_names, splits, skipped, f"a stratified {'/'.join(f'{f:g}' for f in fractions)} split (seed {seed})"
    if folds is not None:
        raise UsageError(
            f"data.folds={folds} splits one folder of class sub-folders, but {root} holds train/ and "
            "val/ folders (a fixed split): leave out data.folds, or point data.root at a folder of class "
            "sub-folders"
        )
    splits = {
        split: [(path, label) for label in sorted(usable.get(split, {})) for path in sorted(usable[split][label])]
        for split in SPLITS
    }
    return class_names, splits, skipped, "its train/val" + ("/test" if splits["test"] else "") + " folders"


def write_split(path: str | os.PathLike, splits: dict[str, list[Sample]], class_names: list[str], root: Path) -> None:
    """Writes the split as CSV (split, class, path relative to the data root), one row per image."""
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["split", "class", "path"])
        for split in SPLITS:
            for image, label in splits[split]:
                writer.writerow([split, class_names[label], os.path.relpath(image, root)])


def write_skipped(path: str | os.PathLike, skipped: dict[str, str]) -> None:
    """Writes the skipped (unreadable) images, one `path<TAB>reason` line each, if there were any."""
    if skipped:
        Path(path).write_text("".join(f"{image}\t{reason}\n" for image, reason in skipped.items()), encoding="utf-8")
        log.warning("skipped %d unreadable image(s); the list is in %s", len(skipped), path)
