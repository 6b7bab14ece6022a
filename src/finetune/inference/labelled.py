"""The labelled images `python -m finetune.evaluate` scores: the class folders of a folder, or a part of a run's
split (its split.csv), checked against the checkpoint's classes, and served to `Trainer.test` as the weights expect.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from finetune.data.folders import class_folders, list_images
from finetune.data.loaders import ImageDataset
from finetune.data.transforms import eval_transform
from finetune.errors import UsageError
from finetune.inference.checkpoint import run_dir

SPLIT_FOLDERS = {"train", "val", "test"}


def class_folder_images(root: Path, class_names: Sequence[str]) -> list[tuple[str, int]]:
    """(path, label) of every image in the class sub-folders of `root` (recursive, hidden entries skipped).

    Raises:
        UsageError: no class folder, a folder the checkpoint has no class for, or no image at all.
    """
    folders = class_folders(root)
    if not folders:
        raise UsageError(f"{root} holds no class folders: data.root needs one sub-folder of images per class")
    _check_known(folders, class_names, f"{root}")
    samples = [(path, class_names.index(name)) for name in folders for path in list_images(root / name)]
    if not samples:
        raise UsageError(f"the class folders of {root} hold no image files")
    return samples


def split_images(root: Path, split: str, checkpoint: Path, class_names: Sequence[str]) -> list[tuple[str, int]]:
    """(path, label) of the images the run put in `split`, from its split.csv, relative to `root`.

    Raises:
        UsageError: no split.csv, no such split in it, or classes the checkpoint does not know.
    """
    path = run_dir(checkpoint) / "split.csv"
    if not path.is_file():
        raise UsageError(
            f"split={split} reads the run's split.csv, and {path} does not exist; "
            "pass data.root=<labelled folder> without split="
        )
    with open(path, newline="") as file:
        rows = list(csv.DictReader(file))
    chosen = [row for row in rows if row["split"] == split]
    if not chosen:
        available = sorted({row["split"] for row in rows})
        raise UsageError(f"{path} has no {split!r} images; its splits: {', '.join(available)}")
    _check_known(sorted({row["class"] for row in chosen}), class_names, str(path))
    return [(str(root / row["path"]), class_names.index(row["class"])) for row in chosen]


def _check_known(found: Sequence[str], class_names: Sequence[str], where: str) -> None:
    unknown = [name for name in found if name not in class_names]
    if not unknown:
        return
    hint = ""
    if set(found) & SPLIT_FOLDERS:
        hint = "; a folder of train/val/test sub-folders: pass data.root=<it>/test, or split=test"
    raise UsageError(
        f"{where} has classes the checkpoint does not know: {', '.join(unknown)}; it knows "
        f"{', '.join(class_names)} (a subset of them is fine){hint}"
    )


class LabelledImages(L.LightningDataModule):
    """Labelled images (path, label) served for `Trainer.test`, prepared as the weights expect (no augmentation).

    Args:
        samples: the images and their labels.
        preprocessing: the checkpoint's, at the size to evaluate at.
        batch_size: images per batch.
        num_workers: decoding processes.
    """

    def __init__(self, samples: Sequence[tuple[str, int]], preprocessing, batch_size: int, num_workers: int) -> None:
        super().__init__()
        self.samples, self.preprocessing = list(samples), preprocessing
        self.batch_size, self.num_workers = batch_size, num_workers

    def test_dataloader(self) -> DataLoader:
        return DataLoader(
            ImageDataset(self.samples, eval_transform(self.preprocessing)),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
        )
