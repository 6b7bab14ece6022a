"""Which images a DataModule serves, in which split: the folder listed, scanned and split (or k-folded), the class
counts and loss weights, and the record of it in the run folder (`split.csv`, `skipped_files.txt`)."""

from __future__ import annotations

import logging
from pathlib import Path

from finetune.data import samplers
from finetune.data.demo import default_cache_dir, demo_root
from finetune.data.folders import SPLITS, Sample, list_and_split, write_skipped, write_split
from finetune.data.groups import Leakage, write_duplicates
from finetune.data.scan import scan_cache_file, skip_unreadable
from finetune.errors import UsageError

log = logging.getLogger(__name__)


class SplitFolder:
    """The image folder's split, for `ImageFolderDataModule` (which sets the attributes below and documents them).

    Attributes:
        root, demo, split, split_seed, folds, fold, strict, balance: the DataModule's arguments.
        output_dir: the run folder, or None. leakage: the groups and near-duplicates (`finetune.data.groups`).
        splits, class_names, skipped: filled by `prepare_data`.
    """

    root: Path | None
    demo: str
    split: tuple[float, ...]
    split_seed: int
    folds: int | None
    fold: int
    strict: bool
    balance: str | None
    output_dir: Path | None
    leakage: Leakage
    splits: dict[str, list[Sample]] | None
    class_names: list[str]
    skipped: dict[str, str]
    recorded: bool

    def prepare_data(self) -> None:
        """Finds the images and splits them (materialising the demo data set first if no root was given)."""
        if self.splits is not None:
            return
        if self.root is None:
            self.root = demo_root(self.demo)
            log.info(
                "data.root not set: using the %s demo data set at %s (licence CC BY-NC-SA 4.0)", self.demo, self.root
            )
        if not self.root.is_dir():
            raise UsageError(
                f"data.root {self.root} is not a folder; pass data.root=<folder with one "
                "sub-folder of images per class>"
            )
        self.class_names, self.splits, self.skipped, source = list_and_split(
            self.root,
            self.split,
            self.split_seed,
            self.folds,
            self.fold,
            lambda images: skip_unreadable(
                images, self.root, scan_cache_file(default_cache_dir(), self.root), self.strict, self.leakage.hashes
            ),
            self.leakage,
        )
        counts = ", ".join(f"{name} {len(self.splits[name])}" for name in SPLITS)
        log.info("data: %s, %d classes, %s; %s", self.root, len(self.class_names), counts, source)
        samplers.log_classes(self.class_names, self.splits, self.balance)

    def class_counts(self, split: str = "train") -> list[int]:
        """Images per class in `split`, in class order."""
        return samplers.class_counts(self.splits[split], len(self.class_names))

    @property
    def imbalance(self) -> float:
        """Largest over smallest class count in the training split (1.0: balanced)."""
        return samplers.imbalance(self.class_counts())

    def loss_weights(self) -> list[float] | None:
        """Per-class training loss weights for `balance="loss_weights"` (None otherwise)."""
        return samplers.loss_weights(self.class_counts()) if self.balance == "loss_weights" else None

    @property
    def has_test(self) -> bool:
        return bool(self.splits and self.splits["test"])

    def _record(self) -> None:
        """Process 0 writes the split, the skipped images and the near-duplicates into the run folder, once."""
        if self.output_dir is None or self.recorded or self.trainer is None or not self.trainer.is_global_zero:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        write_split(self.output_dir / "split.csv", self.splits, self.class_names, self.root)
        write_skipped(self.output_dir / "skipped_files.txt", self.skipped)
        write_duplicates(self.output_dir / "duplicates.csv", self.leakage, self.splits, self.root)
        self.recorded = True
