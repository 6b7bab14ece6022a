"""The data: an image folder (one sub-folder per class), split into train/val/test, as a LightningDataModule."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from finetune.config.checks import check_data_settings
from finetune.data import image_cache, loaders, samplers
from finetune.data.folders import SPLITS, Sample
from finetune.data.groups import Leakage
from finetune.data.split_folder import SplitFolder
from finetune.data.transforms import DeviceAugmentation, batch_mixing, eval_transform
from finetune.errors import UsageError
from finetune.features.cut import Cut
from finetune.features.store import SharedFeatures
from finetune.model.precision import Choice
from finetune.model.preprocessing import Preprocessing

log = logging.getLogger(__name__)

STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ()}


class ImageFolderDataModule(SplitFolder, L.LightningDataModule):
    """Serves an image folder to training: split, transformed as the pretrained weights expect, batched.

    The folder holds one sub-folder per class. If it holds `train/` and `val/` (and optionally `test/`) with
    the same classes, those are the splits; otherwise every class is split on its own (stratified), seeded, so
    every run with the same `split_seed` sees the same split.

    Args:
        root: the image folder; None uses the demo data set named by `demo`.
        demo: the demo data set used when `root` is None ("elpv": ELPV solar cells, 2 classes; "elpv4": 4).
        split: fractions of each class for train, val and test.
        split_seed: seed of the split and of the training order (each epoch's shuffle depends only on it and the
            epoch, so strategies compared under one split_seed see the same images in the same order, and a
            resumed run the order an uninterrupted one would).
        batch_size: images per batch.
        num_workers: loader processes; None picks one per CPU core this process may use (a SLURM job's
            allocation, not the whole node) but one, at most 8.
        image_size: crop size fed to the network; None uses the pretrained weights' own. The model owns it (its
            preprocessing is at that size; conf/train.yaml gives it `data.image_size`): checked against the
            model's in `setup`.
        preprocessing: how images are prepared, for a DataModule used without a model; under a Trainer, `setup`
            takes the model's (`trainer.lightning_module.preprocessing`).
        augment: the training-time augmentation preset (`finetune.data.transforms.train_transform`): "basic" (the
            three settings below), "randaugment", "trivialaugment" or "none" (training images are prepared exactly
            as evaluation images are); True is "basic", False "none".
        crop_scale: area range of the training-time random resized crop.
        rotation_degrees: training-time random rotation range, in degrees (0 turns it off).
        horizontal_flip: training-time random horizontal flips.
        strict: stop on any unreadable image instead of skipping it (skipped images are logged and listed in
            the run's skipped_files.txt).
        balance: "loss_weights" (default) weights each class's training loss by total / (classes * class count),
            so a minority class is not traded away (all weights 1 on balanced data); "sampler" draws training
            images with probabilities that make every class equally frequent (with replacement; an epoch stays as
            long); None trains on the data as they are.
        cache_images: keep every image decoded and resized in memory (`finetune.data.image_cache`): "auto" where
            results stay the same (evaluation images; training images without augmentation or with it on the
            device), True every split, False none; a split that does not fit `cache_images_max_gb` stays on disk
            ("auto", logged) or stops (True).
        cache_images_max_gb: the most memory the decoded images may take, in GB; None: half of the memory
            available when the first split is cached.
        augment_on: where training-time augmentation runs: "loader" (each worker, image by image) or "device"
            (whole batches on the training device, `finetune.data.transforms`; needs the training images cached).
        folds: k-fold cross-validation (`finetune.data.folders.split_kfold`): None splits by `split`; K makes fold
            `fold` of K stratified folds (seeded by `split_seed`) the test set, and carves the validation set from
            the rest in the proportion `split[1] : split[0]`. The K runs fold=0..K-1 test every image once.
        fold: the test fold, 0 to folds - 1 (used only with `folds`).
        random_erasing: probability of erasing a random rectangle of each training image (0: off; needs a preset).
        mixup: MixUp alpha for whole training batches (0: off); labels become class probabilities.
        cutmix: CutMix alpha for whole training batches (0: off); with mixup too, one of them per batch.
        cache_features, cache_views: strategy.cache_features and strategy.cache_views: whether a fit's `setup`
            serves the frozen part's features instead of images (`finetune.features.cache.should_cache`, which
            reads the model being fitted); off by default outside train.py.
        feature_store: features kept between the runs of one process (`finetune.features.store`); None: none.
        feature_precision: the feature pass's precision (`finetune.model.precision.feature_pass_precision`):
            "auto" runs it in bf16 where the CPU has bf16 and that is measured to pay, a bf16 precision
            ("bf16-mixed") always, any other fp32; None: as the Trainer's precision. train.py: trainer.precision.
        output_dir: where process 0 writes split.csv, skipped_files.txt, duplicates.csv under a Trainer (or None).
        groups, group_by, duplicates, duplicate_distance: which images stay on one side of every split and fold,
            and the near-duplicates looked for (`finetune.data.groups.Leakage`).
    """

    def __init__(
        self,
        root: str | None = None,
        demo: str = "elpv",
        split: Sequence[float] = (0.7, 0.2, 0.1),
        split_seed: int = 0,
        batch_size: int = 32,
        num_workers: int | None = None,
        image_size: int | None = None,
        augment: bool | str = "none",
        crop_scale: Sequence[float] = (0.8, 1.0),
        rotation_degrees: float = 15.0,
        horizontal_flip: bool = True,
        strict: bool = False,
        balance: str | None = "loss_weights",
        cache_images: str | bool = "auto",
        cache_images_max_gb: float | None = None,
        augment_on: str = "loader",
        preprocessing: Preprocessing | None = None,
        folds: int | None = None,
        fold: int = 0,
        random_erasing: float = 0.0,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        cache_features: str | bool = False,
        cache_views: int = 1,
        feature_store: SharedFeatures | None = None,
        feature_precision: str | None = None,
        output_dir: str | None = None,
        groups: str | None = None,
        group_by: int | None = None,
        duplicates: str = "report",
        duplicate_distance: int = 6,
    ) -> None:
        super().__init__()
        preset = check_data_settings(
            root=root,
            demo=demo,
            split=split,
            balance=balance,
            batch_size=batch_size,
            cache_images=cache_images,
            augment_on=augment_on,
            augment=augment,
            random_erasing=random_erasing,
            mixup=mixup,
            cutmix=cutmix,
        )
        self.root = Path(root).expanduser() if root is not None else None
        self.demo, self.split, self.split_seed, self.batch_size = demo, tuple(split), split_seed, batch_size
        self.num_workers = loaders.default_num_workers() if num_workers is None else num_workers
        self.image_size = image_size
        self.augment = preset
        self.random_erasing = random_erasing
        self.mixup, self.cutmix = mixup, cutmix
        self.mixing = None  # MixUp/CutMix of training batches, built in setup (it needs the class count)
        # Training batches differ from epoch to epoch (what feature caching and the image cache ask).
        self.augments = preset != "none" or bool(mixup or cutmix)
        self.crop_scale, self.rotation_degrees = tuple(crop_scale), rotation_degrees
        self.horizontal_flip = horizontal_flip
        self.strict, self.balance = strict, balance
        self.skipped: dict[str, str] = {}
        self.cache_images, self.cache_images_max_gb = cache_images, cache_images_max_gb
        self.augment_on, self.folds, self.fold = augment_on, folds, fold
        self.images = image_cache.SplitImages(cache_images_max_gb)
        self.device_augmentation: DeviceAugmentation | None = None
        self.splits: dict[str, list[Sample]] | None = None
        self.class_names: list[str] = []
        self.datasets: dict[str, Dataset] = {}
        self.cache_features, self.cache_views, self.feature_store = cache_features, cache_views, feature_store
        self.features_cut: Cut | None = None  # where the model is cut, while the splits serve cached features
        self.preprocessing, self.feature_precision = preprocessing, feature_precision
        self.feature_pass: Choice | None = None  # the feature pass's precision and why, once it has run
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.leakage = Leakage(groups, group_by, duplicates, duplicate_distance)
        self.recorded = False  # split.csv and skipped_files.txt written

    @property
    def serves_features(self) -> bool:
        return self.features_cut is not None

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()
        self._record()
        if self.serves_features:
            return
        preprocessing = self._model_preprocessing()
        self.mixing = batch_mixing(len(self.class_names), self.mixup, self.cutmix)
        for split in STAGE_SPLITS.get(stage, SPLITS):
            self._cache(split, preprocessing)
        if self.augment_on == "device":
            self.device_augmentation = DeviceAugmentation(
                preprocessing.crop_size,
                preprocessing.mean,
                preprocessing.std,
                preprocessing.interpolation,
                rotates=bool(self.rotation_degrees),
            )
        self.datasets = {split: self._dataset(split, preprocessing, self.augment_on) for split in SPLITS}
        if stage == "fit" and self.trainer is not None:
            self._serve_features(self.trainer)

    def _serve_features(self, trainer: L.Trainer) -> None:
        """Serves the frozen part's features from now on, if `cache_features` and the model allow it."""
        served = loaders.frozen_feature_datasets(self, trainer)
        if served is not None:
            self.images.decoded.clear()  # the images are not needed any more
            self.datasets, self.features_cut, self.feature_pass = served

    def _model_preprocessing(self) -> Preprocessing:
        """The model's preprocessing, already at the size it is fed: read from the model the Trainer runs with this
        DataModule; without one (a DataModule used on its own), the one given as `preprocessing`."""
        model = self.trainer.lightning_module if self.trainer is not None else None
        if model is not None and getattr(model, "preprocessing", None) is not None:
            self.preprocessing = model.preprocessing
        if self.preprocessing is None:
            raise RuntimeError(
                "no preprocessing: run this DataModule with a model (trainer.fit(model, datamodule)) "
                "or pass preprocessing="
            )
        if self.image_size is not None and self.preprocessing.crop_size != self.image_size:
            raise UsageError(
                f"data.image_size={self.image_size}, but the model is fed {self.preprocessing.crop_size} "
                "px: set data.image_size alone (the model's image_size follows it)"
            )
        return self.preprocessing

    def _dataset(self, split: str, preprocessing: Preprocessing, augment_on: str) -> Dataset:
        """The split's images (`finetune.data.datasets.image_dataset`), from memory where decoded."""
        training = split == "train"
        return loaders.image_dataset(
            self.splits[split],
            preprocessing,
            self.split_seed if training else 0,
            self.images.decoded.get(split),
            self.augment if training else "none",
            augment_on,
            self.crop_scale,
            self.rotation_degrees,
            self.horizontal_flip,
            self.random_erasing,
        )

    def _cache(self, split: str, preprocessing: Preprocessing) -> None:
        """Decodes the split into memory where `cache_images` and the memory limit allow it (once)."""
        if self.splits[split]:
            why_not, required_by = image_cache.caching_policy(
                split, self.cache_images, self.augment != "none", self.augment_on
            )
            resize = eval_transform(preprocessing).transforms[0]
            paths = [path for path, _ in self.splits[split]]
            self.images.add(split, paths, resize, preprocessing, why_not, required_by)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """With augment_on="device": augments (training) or only normalises (evaluation) the uint8 batch where it
        now is; batches already prepared by the loader pass through."""
        images = batch[0]
        if self.device_augmentation is not None and isinstance(images, torch.Tensor) and images.dtype == torch.uint8:
            if len(batch) == 3:  # a CanvasDataset batch: images, labels, random parameters
                batch = self.device_augmentation(images, batch[2]), batch[1]
            else:
                batch = self.device_augmentation.normalise(images), batch[1]
        if self.mixing is not None and self.trainer is not None and self.trainer.training:
            batch = self.mixing(*batch)  # labels become class probabilities
        return batch

    def ordered_dataloader(self, split: str, view: int = 0, indices: Sequence[int] | None = None) -> DataLoader:
        """The split's images (or those at `indices`) in a fixed order, with the split's own transform; training
        images get the augmentation of epoch `view`."""
        dataset = self.datasets[split]
        if self.augment_on == "device":  # whatever the training loop gets, these batches come ready
            dataset = self._dataset(split, self.preprocessing, "loader")
        return loaders.ordered_loader(dataset, self.batch_size, self.num_workers, split == "train", view, indices)

    def evaluation_images(self, split: str, rank: int = 0, world_size: int = 1) -> Dataset:
        """The split's images as evaluated, `rank`'s share as its loader serves it (batches may hold features)."""
        dataset = self._dataset(split, self.preprocessing, "loader")
        return Subset(dataset, range(rank, len(dataset), world_size))

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        balanced = shuffle and self.balance == "sampler"
        return loaders.split_loader(
            self.datasets[split],
            shuffle=shuffle,
            batch_size=self.batch_size,
            seed=self.split_seed,
            num_workers=self.num_workers,
            in_memory=self.serves_features,
            trainer=self.trainer,
            weights=samplers.sample_weights(self.splits["train"], self.class_counts()) if balanced else None,
            trained_batches=self._trained_batches,
        )

    def _trained_batches(self) -> int:
        # Batches of the current epoch whose optimizer step has run (`processed` counts up after the step).
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed if self.trainer else 0
