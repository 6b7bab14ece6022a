"""Leakage-aware splits: images that belong together (one object, patient, module or scene, or near-duplicates of
one picture) stay on one side of every split and fold, still stratified by class.

Groups come from a CSV (`data.groups`), from a sub-folder level below the class folders (`data.group_by`), and with
`data.duplicates=group` from the scan's near-duplicate pairs (`finetune.data.scan.near_duplicates`). The splits are
scikit-learn's `StratifiedGroupKFold`: for k folds as they are, and for one train/val/test split as one of
round(1 / test share) folds for the test set, then one of round(1 / validation share) folds of the rest.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sklearn.model_selection import StratifiedGroupKFold

from finetune.errors import UsageError

log = logging.getLogger(__name__)

DUPLICATES = ("group", "report", "ignore")  # data.duplicates
Pair = tuple[str, str, int]  # (path_a, path_b, hash distance)


@dataclass
class Leakage:
    """What keeps related images apart (the data.* settings), and what the split found.

    Attributes:
        groups: a CSV with `path,group` columns (paths relative to the data root), or None.
        group_by: the sub-folder level below each class folder that names an image's group (1: the first), or None.
        duplicates: "group" (near-duplicates form one group), "report" (listed and warned about) or "ignore" (not
            looked for: no hashing).
        duplicate_distance: the most perceptual-hash bits (of 256) in which two near-duplicates differ.
        pairs: the near-duplicate pairs found.
        group_count: the groups the split kept together (0: the split did not group).
    """

    groups: str | None = None
    group_by: int | None = None
    duplicates: str = "report"
    duplicate_distance: int = 6
    pairs: list[Pair] = field(default_factory=list)
    group_count: int = 0

    def __post_init__(self) -> None:
        if self.duplicates not in DUPLICATES:
            raise UsageError(f"data.duplicates={self.duplicates}: choose group, report or ignore")
        if self.groups is not None and self.group_by is not None:
            raise UsageError("data.groups and data.group_by both name groups: keep one of them")
        if self.group_by is not None and (not isinstance(self.group_by, int) or self.group_by < 1):
            raise UsageError(
                f"data.group_by={self.group_by} must be a sub-folder level below the class folders: 1, 2, ... (or null)"
            )
        if not isinstance(self.duplicate_distance, int) or not 0 <= self.duplicate_distance < 256:
            raise UsageError(f"data.duplicate_distance={self.duplicate_distance} must be a number of bits, 0..255")

    @property
    def hashes(self) -> bool:
        """Whether the scan hashes the images."""
        return self.duplicates != "ignore"

    @property
    def groups_asked(self) -> bool:
        return self.groups is not None or self.group_by is not None or self.duplicates == "group"

    def crossing(self, splits: dict[str, list[tuple[str, int]]]) -> int:
        """The near-duplicate pairs whose two images are in different splits."""
        where = _split_of(splits)
        return sum(1 for a, b, _ in self.pairs if where.get(a) != where.get(b))

    def image_groups(self, root: Path, class_names: list[str], by_class: dict[int, list[str]]) -> dict[str, str]:
        """Each image's group: from the CSV or the sub-folder, merged along near-duplicate pairs (with "group");
        an image in no group is its own."""
        paths = [path for label in sorted(by_class) for path in by_class[label]]
        named = {}
        if self.groups is not None:
            named = read_groups(Path(self.groups).expanduser(), root, paths)
        elif self.group_by is not None:
            for label, images in by_class.items():
                for path in images:
                    folders = Path(os.path.relpath(path, root / class_names[label])).parts[:-1]
                    # The same sub-folder name under two classes is one group (one patient, healthy and ill).
                    if len(folders) >= self.group_by:
                        named[path] = "/".join(folders[: self.group_by])
        groups = {path: named.get(path, path) for path in paths}
        if self.duplicates == "group":
            groups = _merged(groups, self.pairs)
        return groups


def read_groups(path: Path, root: Path, images: Sequence[str]) -> dict[str, str]:
    """The `path,group` rows of the CSV at `path`, by image (paths relative to `root`, or absolute).

    Raises:
        UsageError: no such file, no `path` and `group` columns, or a path that is no image under `root`.
    """
    if not path.is_file():
        raise UsageError(
            f"data.groups={path} is not a file; give a CSV with a header row path,group (paths relative to data.root)"
        )
    with open(path, newline="", encoding="utf-8-sig") as file:
        reader = csv.DictReader(file)
        columns = reader.fieldnames or []
        if "path" not in columns or "group" not in columns:
            raise UsageError(
                f"data.groups={path} has the columns {columns}; it needs a header row with path and group "
                "(one row per image: its path relative to data.root, and its group)"
            )
        rows = [(row["path"], row["group"]) for row in reader]
    known = {os.path.normpath(image): image for image in images}
    groups, strangers = {}, []
    for name, group in rows:
        image = known.get(os.path.normpath(root / name))
        if image is None:
            strangers.append(name)
        else:
            groups[image] = group
    if strangers:
        raise UsageError(
            f"data.groups={path}: {len(strangers)} path(s) are no image under data.root={root}, e.g. "
            f"{strangers[0]!r}; paths are relative to data.root (as in a run's split.csv)"
        )
    log.info("data.groups: %d of %d image(s) in %d group(s)", len(groups), len(images), len(set(groups.values())))
    return groups


def _merged(groups: dict[str, str], pairs: Sequence[Pair]) -> dict[str, str]:
    """The groups joined wherever a pair links two of them (union-find over group names)."""
    parent = {group: group for group in groups.values()}

    def root(group: str) -> str:
        while parent[group] != group:
            parent[group] = parent[parent[group]]
            group = parent[group]
        return group

    for path_a, path_b, _ in pairs:
        if path_a in groups and path_b in groups:
            a, b = root(groups[path_a]), root(groups[path_b])
            if a != b:
                parent[max(a, b)] = min(a, b)  # the smaller name: the same groups whatever the pairs' order
    return {path: root(group) for path, group in groups.items()}


def _fold(samples: list[tuple[str, int]], groups: dict[str, str], folds: int, fold: int, seed: int) -> set[int]:
    """The indices of `samples` in fold `fold` of `folds` stratified group folds."""
    labels = [label for _, label in samples]
    ids = [groups[path] for path, _ in samples]
    distinct = len(set(ids))
    if distinct < folds:
        raise UsageError(
            f"{distinct} group(s) are too few for {folds} folds that keep groups together; add images or groups, "
            "or lower data.folds (or give val and test larger shares in data.split)"
        )
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for index, (_, chosen) in enumerate(splitter.split(samples, labels, ids)):
        if index == fold:
            return set(chosen.tolist())
    raise AssertionError("unreachable: fold < folds")


def split_grouped(
    by_class: dict[int, list[str]],
    groups: dict[str, str],
    fractions: Sequence[float],
    seed: int,
    folds: int | None,
    fold: int,
    class_names: list[str],
) -> dict[str, list[tuple[str, int]]]:
    """Train/val/test with every group on one side: fold `fold` of `folds` (or, without folds, one of round(1 / test
    share) folds) is the test set; one of round(1 / val share) folds of the rest is the validation set.

    Raises:
        UsageError: too few groups, or a split left without an image of some class.
    """
    if folds is not None and (not isinstance(folds, int) or folds < 2 or not isinstance(fold, int)):
        raise UsageError(f"data.folds={folds} must be at least 2 and data.fold={fold} one of 0..folds-1")
    if folds is not None and not 0 <= fold < folds:
        raise UsageError(f"data.fold={fold} must be one of 0..{folds - 1} with data.folds={folds}")
    samples = [(path, label) for label in sorted(by_class) for path in sorted(by_class[label])]
    val_share = fractions[1] / (fractions[0] + fractions[1])
    if folds is None:
        test = _fold(samples, groups, max(2, round(1 / fractions[2])), 0, seed) if fractions[2] > 0 else set()
    else:
        test = _fold(samples, groups, folds, fold, seed)
    rest = [sample for index, sample in enumerate(samples) if index not in test]
    val = _fold(rest, groups, max(2, round(1 / val_share)), 0, seed) if fractions[1] > 0 else set()
    splits = {
        "train": [sample for index, sample in enumerate(rest) if index not in val],
        "val": [rest[index] for index in sorted(val)],
        "test": [samples[index] for index in sorted(test)],
    }
    # As in the plain split, every class is in every split that has a share (the test fold always has one).
    required = {"train": True, "val": fractions[1] > 0, "test": folds is not None or fractions[2] > 0}
    for split, chosen in splits.items():
        present = {label for _, label in chosen}
        missing = [class_names[label] for label in sorted(by_class) if label not in present]
        if missing and required[split]:
            raise UsageError(
                f"keeping groups together leaves no image of class {missing[0]!r} in the {split} split; add "
                "images or groups of that class, or change data.split"
            )
    return splits


def write_duplicates(
    path: str | os.PathLike, leakage: Leakage, splits: dict[str, list[tuple[str, int]]], root: Path
) -> None:
    """Writes the near-duplicate pairs (path_a, path_b, split_a, split_b, distance; paths relative to the data root),
    if there are any, and logs them in one line: a warning where some cross splits."""
    if not leakage.pairs:
        return
    where = _split_of(splits)
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["path_a", "path_b", "split_a", "split_b", "distance"])
        for a, b, distance in leakage.pairs:
            writer.writerow([os.path.relpath(a, root), os.path.relpath(b, root), where.get(a), where.get(b), distance])
    crossing = leakage.crossing(splits)
    if crossing:
        log.warning(
            "%d near-duplicate image pair(s) cross splits (of %d found): test scores may measure memory; listed "
            "in %s; data.duplicates=group keeps each pair on one side",
            crossing,
            len(leakage.pairs),
            path,
        )
    else:
        log.info("%d near-duplicate image pair(s), each within one split: %s", len(leakage.pairs), path)


def _split_of(splits: dict[str, list[tuple[str, int]]]) -> dict[str, str]:
    return {image: split for split, samples in splits.items() for image, _ in samples}
