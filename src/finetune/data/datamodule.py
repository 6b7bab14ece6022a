"""The data: an image folder (one sub-folder per class), split into train/val/test, as a LightningDataModule."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import v2 as T

from finetune.config.checks import check_data_settings
from finetune.data import image_cache, samplers
from finetune.data.augment import CanvasDataset, DeviceAugmentation, RandomSteps
from finetune.data.demo import default_cache_dir, demo_root
from finetune.data.folders import SPLITS, Sample, list_and_split
from finetune.data.groups import Leakage
from finetune.data.loaders import ImageDataset, default_num_workers, split_loader
from finetune.data.samplers import FeatureDataset, ViewDataset
from finetune.data.scan import scan_cache_file, scan_images
from finetune.data.transforms import batch_mixing, eval_transform, train_transform
from finetune.errors import UsageError
from finetune.model.preprocessing import Preprocessing

log = logging.getLogger(__name__)

STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ()}


class ImageFolderDataModule(L.LightningDataModule):
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
        cache_images: keep every image decoded and resized in memory (`finetune.data.image_cache`) instead of
            decoding it again every epoch: "auto" where results stay the same (validation and test images, and
            training images when augmentation is off or runs on the device), True for every split (training-time
            augmentation then runs on the stored copies), False never. Each split is cached only if it fits under
            `cache_images_max_gb`: otherwise "auto" leaves it on disk and logs why, True stops.
        cache_images_max_gb: the most memory the decoded images may take, in GB; None: half of the memory
            available when the first split is cached.
        augment_on: where training-time augmentation runs: "loader" (each worker, image by image) or "device"
            (whole batches on the training device, `finetune.data.augment`; needs the training images cached).
        folds: k-fold cross-validation (`finetune.data.folders.split_kfold`): None splits by `split`; K makes fold
            `fold` of K stratified folds (seeded by `split_seed`) the test set, and carves the validation set from
            the rest in the proportion `split[1] : split[0]`. The K runs fold=0..K-1 test every image once.
        fold: the test fold, 0 to folds - 1 (used only with `folds`).
        random_erasing: probability of erasing a random rectangle of each training image (0: off; needs a preset).
        mixup: MixUp alpha for whole training batches (0: off); labels become class probabilities.
        cutmix: CutMix alpha for whole training batches (0: off); with mixup too, one of them per batch.
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
        self.demo = demo
        self.split = tuple(split)
        self.split_seed = split_seed
        self.batch_size = batch_size
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.image_size = image_size
        self.augment = preset
        self.random_erasing = random_erasing
        self.mixup, self.cutmix = mixup, cutmix
        self.mixing = None  # MixUp/CutMix of training batches, built in setup (it needs the class count)
        # Training batches differ from epoch to epoch (what feature caching and the image cache ask).
        self.augments = preset != "none" or bool(mixup or cutmix)
        self.crop_scale = tuple(crop_scale)
        self.rotation_degrees = rotation_degrees
        self.horizontal_flip = horizontal_flip
        self.strict = strict
        self.balance = balance
        self.skipped: dict[str, str] = {}
        self.cache_images = cache_images
        self.cache_images_max_gb = cache_images_max_gb
        self.augment_on = augment_on
        self.folds, self.fold = folds, fold
        self.leakage = Leakage(groups, group_by, duplicates, duplicate_distance)
        self.images = image_cache.SplitImages(cache_images_max_gb)
        self.device_augmentation: DeviceAugmentation | None = None
        self.preprocessing = preprocessing
        self.splits: dict[str, list[Sample]] | None = None
        self.class_names: list[str] = []
        self.datasets: dict[str, Dataset] = {}
        self.serves_features = False

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
            self.root, self.split, self.split_seed, self.folds, self.fold, self._scan, self.leakage
        )
        counts = ", ".join(f"{name} {len(self.splits[name])}" for name in SPLITS)
        log.info("data: %s, %d classes, %s; %s", self.root, len(self.class_names), counts, source)
        samplers.log_classes(self.class_names, self.splits, self.balance)

    def _scan(self, images: list[str]) -> tuple[dict[str, str], dict[str, str]]:
        """The unreadable images, skipped (each logged once) or, with `strict`, an error; the others' hashes."""
        bad, hashes = scan_images(images, scan_cache_file(default_cache_dir(), self.root), hashes=self.leakage.hashes)
        if bad and self.strict:
            path, reason = next(iter(bad.items()))
            raise UsageError(
                f"{len(bad)} unreadable image(s) under {self.root}, e.g. {path}: {reason}; fix or "
                "remove them, or leave out data.strict=true to skip them"
            )
        for path, reason in bad.items():
            log.warning("skipping %s: %s", path, reason)
        return bad, hashes

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

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()
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
        """The split's dataset: from the decoded images if cached, else from the files; finished in the loader
        (normalised float images) or, with augment_on="device", as uint8 images for `on_after_batch_transfer`."""
        images, samples = self.images.decoded.get(split), self.splits[split]
        seed = self.split_seed if split == "train" else 0
        if split == "train" and self.augment != "none":
            training = train_transform(
                preprocessing,
                self.crop_scale,
                self.rotation_degrees,
                self.horizontal_flip,
                self.augment,
                self.random_erasing,
            )
            # Without decoded images (a stage that does not train, such as test, set up before fit) the loader
            # prepares them: its float batches pass through on_after_batch_transfer.
            if augment_on == "device" and images is not None:
                return CanvasDataset(images, [label for _, label in samples], RandomSteps(training), seed)
            return ImageDataset(samples, training, seed, images)
        evaluation = eval_transform(preprocessing)
        if augment_on == "device":  # normalised on the device, by the same kernels
            evaluation = T.Compose([*evaluation.transforms[:2], T.PILToTensor()])
        return ImageDataset(samples, evaluation, seed, images)

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

    def use_features(self, cache: dict[str, tuple[torch.Tensor, ...]]) -> None:
        """Serves cached backbone features (see `finetune.features.cache`) instead of images from now on."""
        if self.mixup or self.cutmix:
            raise UsageError(
                "data.mixup and data.cutmix mix images, not cached features: set strategy.cache_features=auto or false"
            )
        self.images.decoded.clear()  # the images are not needed any more
        train = ViewDataset(*cache["train"])
        self.datasets = {
            "train": train,
            **{split: FeatureDataset(*cache[split]) for split in ("val", "test") if split in cache},
        }
        self.serves_features = True

    def ordered_dataloader(self, split: str, view: int = 0, indices: Sequence[int] | None = None) -> DataLoader:
        """The split's images (or those at `indices`) in a fixed order, with the split's own transform; training
        images get the augmentation of epoch `view`."""
        dataset = self.datasets[split]
        if self.augment_on == "device":  # whatever the training loop gets, these batches come ready
            dataset = self._dataset(split, self.preprocessing, "loader")
        indices = range(len(dataset)) if indices is None else indices
        keys = [(index, view) for index in indices] if split == "train" else list(indices)
        # Its own generator: otherwise each pass draws its workers' base seed from the global one, and a run that
        # builds a feature cache would draw different dropout masks from one that does not.
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=keys,
            generator=torch.Generator(),
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
        )

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
        return split_loader(
            self.datasets[split],
            shuffle=shuffle,
            batch_size=self.batch_size,
            seed=self.split_seed,
            num_workers=self.num_workers,
            in_memory=self.serves_features,
            trainer=self.trainer,
            weights=(
                samplers.sample_weights(self.splits["train"], self.class_counts())
                if shuffle and self.balance == "sampler"
                else None
            ),
            trained_batches=self._trained_batches,
        )

    def _trained_batches(self) -> int:
        # Batches of the current epoch whose optimizer step has run (`processed` counts up after the step).
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed if self.trainer else 0
