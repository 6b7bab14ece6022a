"""The data: an image folder (one sub-folder per class), split into train/val/test, as a LightningDataModule."""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from finetune.backbones import Preprocessing
from finetune.demo import DEMO_NAMES, demo_root
from finetune.errors import UsageError
from finetune.features import EpochShuffler, FeatureDataset, ViewDataset, ViewSampler, as_batch
from finetune.images import IMAGE_EXTENSIONS, is_image_file, load_rgb

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
Sample = tuple[str, int]  # (path, label)


class ImageDataset(Dataset):
    """Images and labels from a list of (path, label) pairs; every image decoded to RGB.

    Indexed by `(index, epoch)` (as `EpochShuffler(keyed=True)` yields), the random transform of an image is
    seeded by (seed, epoch, index): the same augmentation whichever worker draws it, and after a resume.
    """

    def __init__(self, samples: Sequence[Sample], transform, seed: int = 0) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]):
        index, epoch = key if isinstance(key, tuple) else (key, None)
        path, label = self.samples[index]
        image = load_rgb(path)
        if epoch is None:
            return self.transform(image), label
        # fork_rng: the global generator of the process (the training loop's, with workers=0) stays untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((self.seed * 1_000_003 + epoch) * 1_000_033 + index) % 2**63)
            return self.transform(image), label


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
        image_size: crop size fed to the network; None uses the pretrained weights' own.
        augment: training-time augmentation (the three settings below); off, training images are prepared
            exactly as evaluation images are.
        crop_scale: area range of the training-time random resized crop.
        rotation_degrees: training-time random rotation range, in degrees (0 turns it off).
        horizontal_flip: training-time random horizontal flips.
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
        augment: bool = True,
        crop_scale: Sequence[float] = (0.8, 1.0),
        rotation_degrees: float = 15.0,
        horizontal_flip: bool = True,
    ) -> None:
        super().__init__()
        if len(split) != 3 or any(f < 0 for f in split) or not 0.999 < sum(split) < 1.001 or split[0] <= 0:
            raise UsageError(f"data.split={list(split)} must be three fractions (train, val, test) summing to 1, "
                             "with train and val above 0, e.g. [0.7,0.2,0.1]")
        if root is None and demo not in DEMO_NAMES:
            raise UsageError(f"unknown data.demo {demo!r}: choose one of {', '.join(DEMO_NAMES)}, "
                             "or pass data.root=<your image folder>")
        if split[1] <= 0:
            raise UsageError("data.split needs a validation fraction above 0: the best checkpoint is chosen on it")
        self.root = Path(root).expanduser() if root is not None else None
        self.demo = demo
        self.split = tuple(split)
        self.split_seed = split_seed
        self.batch_size = batch_size
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.image_size = image_size
        self.augments = augment
        self.crop_scale = tuple(crop_scale)
        self.rotation_degrees = rotation_degrees
        self.horizontal_flip = horizontal_flip
        self.preprocessing: Preprocessing | None = None
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
            log.info("data.root not set: using the %s demo data set at %s (licence CC BY-NC-SA 4.0)",
                     self.demo, self.root)
        if not self.root.is_dir():
            raise UsageError(f"data.root {self.root} is not a folder; pass data.root=<folder with one "
                             "sub-folder of images per class>")
        if (self.root / "train").is_dir() and (self.root / "val").is_dir():
            self.class_names, self.splits = _read_split_folders(self.root)
            source = "its train/val" + ("/test" if self.splits["test"] else "") + " folders"
        else:
            self.class_names, by_class = _read_class_folders(self.root)
            self.splits = split_stratified(by_class, self.split, self.split_seed, self.class_names)
            source = f"a stratified {'/'.join(f'{f:g}' for f in self.split)} split (seed {self.split_seed})"
        counts = ", ".join(f"{name} {len(self.splits[name])}" for name in SPLITS)
        log.info("data: %s, %d classes, %s; %s", self.root, len(self.class_names), counts, source)

    @property
    def has_test(self) -> bool:
        return bool(self.splits and self.splits["test"])

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()
        if self.serves_features:
            return
        if self.preprocessing is None:
            raise RuntimeError("set datamodule.preprocessing (the model's) before training")
        preprocessing = self.preprocessing.at_size(self.image_size)
        evaluation = eval_transform(preprocessing)
        training = train_transform(preprocessing, self.crop_scale, self.rotation_degrees, self.horizontal_flip) \
            if self.augments else evaluation
        self.datasets = {
            "train": ImageDataset(self.splits["train"], training, self.split_seed),
            "val": ImageDataset(self.splits["val"], evaluation),
            "test": ImageDataset(self.splits["test"], evaluation),
        }

    def save_split(self, path: str | os.PathLike) -> None:
        """Writes the split as CSV (split, class, path relative to the data root), one row per image."""
        with open(path, "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["split", "class", "path"])
            for split in SPLITS:
                for image, label in self.splits[split]:
                    writer.writerow([split, self.class_names[label], os.path.relpath(image, self.root)])

    def use_features(self, cache: dict[str, tuple[torch.Tensor, ...]]) -> None:
        """Serves cached backbone features (see `finetune.features`) instead of images from now on."""
        train = ViewDataset(*cache["train"])
        self.datasets = {"train": train, **{split: FeatureDataset(*cache[split]) for split in ("val", "test")
                                            if split in cache}}
        self.serves_features = True

    def ordered_dataloader(self, split: str, view: int = 0) -> DataLoader:
        """The split's images in a fixed order (no shuffling), with the split's own transform; training images
        get the augmentation of epoch `view`."""
        keys = [(index, view) for index in range(len(self.datasets[split]))] if split == "train" else None
        return DataLoader(self.datasets[split], batch_size=self.batch_size, sampler=keys,
                          num_workers=self.num_workers, pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        # Under DDP every process loads its own share; the samplers are DistributedSamplers, so Lightning keeps them.
        shards = {"num_replicas": self.trainer.world_size, "rank": self.trainer.global_rank} if self.trainer \
            else {"num_replicas": 1, "rank": 0}
        dataset = self.datasets[split]
        sampler = None
        if shuffle:
            sampler = ViewSampler(dataset, self.split_seed, **shards) if self.serves_features else EpochShuffler(
                len(dataset), self.split_seed, keyed=True, **shards)
            # A resumed run's loader starts prefetching before Lightning calls set_epoch: start it at the epoch
            # Lightning will train next (its own count for set_epoch), or that epoch would replay an earlier order.
            sampler.set_epoch(self.trainer.fit_loop.epoch_progress.current.processed if self.trainer else 0)
        elif shards["num_replicas"] > 1:
            # Every image evaluated exactly once: no padding with repeated images (Lightning's DistributedSampler
            # pads, which biases the metrics). Processes may run one batch more than others, which is safe without
            # gradients as long as each runs at least one (finetune.scaling.check_distributed makes sure).
            sampler = UnrepeatedDistributedSampler(dataset, shuffle=False, **shards)
        if self.serves_features:
            # In-memory tensors: worker processes would only add start-up and copying.
            return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, collate_fn=as_batch)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            # Its own generator: creating the loader's iterator then draws nothing from the training loop's.
            generator=torch.Generator().manual_seed(self.split_seed),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )


def default_num_workers() -> int:
    """Loader processes: one per CPU core this process may use but one (which stays with the training loop),
    at most 8. The cores are those of the process's affinity: under SLURM, the job's allocation."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(cores - 1, 8))


def eval_transform(preprocessing: Preprocessing) -> T.Compose:
    """Resize, centre crop, normalise: exactly what the pretrained weights were evaluated with."""
    return T.Compose([
        T.Resize(preprocessing.resize_size, interpolation=InterpolationMode(preprocessing.interpolation),
                 antialias=True),
        T.CenterCrop(preprocessing.crop_size),
        *_to_normalised_tensor(preprocessing),
    ])


def train_transform(preprocessing: Preprocessing, crop_scale: Sequence[float], rotation_degrees: float,
                    horizontal_flip: bool) -> T.Compose:
    """The tutorials' augmentation preset at the weights' crop size and interpolation."""
    interpolation = InterpolationMode(preprocessing.interpolation)
    steps = [T.RandomResizedCrop(preprocessing.crop_size, scale=tuple(crop_scale), interpolation=interpolation,
                                 antialias=True)]
    if rotation_degrees:
        steps.append(T.RandomRotation(rotation_degrees, interpolation=InterpolationMode.BILINEAR))
    if horizontal_flip:
        steps.append(T.RandomHorizontalFlip())
    return T.Compose([*steps, *_to_normalised_tensor(preprocessing)])


def _to_normalised_tensor(preprocessing: Preprocessing) -> list:
    return [T.ToImage(), T.ToDtype(torch.float32, scale=True),
            T.Normalize(mean=list(preprocessing.mean), std=list(preprocessing.std))]


def split_stratified(by_class: dict[int, list[str]], fractions: Sequence[float], seed: int,
                     class_names: list[str]) -> dict[str, list[Sample]]:
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
            raise UsageError(f"class {class_names[label]!r} has {len(paths)} image(s): too few to split "
                             f"{'/'.join(f'{f:g}' for f in fractions)} with one in each split; add images "
                             "or change data.split")
        order = generator.permutation(len(paths))
        shuffled = [paths[i] for i in order]
        sizes = [max(1, round(len(paths) * f)) if f > 0 else 0 for f in fractions[1:]]
        n_val, n_test = sizes
        n_train = len(paths) - n_val - n_test
        pieces = {"train": shuffled[:n_train], "val": shuffled[n_train:n_train + n_val],
                  "test": shuffled[n_train + n_val:]}
        for name, chosen in pieces.items():
            splits[name].extend((path, label) for path in chosen)
    return splits


def _read_class_folders(root: Path) -> tuple[list[str], dict[int, list[str]]]:
    class_names = sorted(entry.name for entry in os.scandir(root) if entry.is_dir()
                         and not entry.name.startswith("."))
    if len(class_names) < 2:
        raise UsageError(f"{root} holds {len(class_names)} class folder(s): a classifier needs at least two "
                         "sub-folders of images, one per class")
    by_class = {label: _list_images(root / name) for label, name in enumerate(class_names)}
    for label, paths in by_class.items():
        if not paths:
            raise UsageError(f"class folder {root / class_names[label]} holds no images "
                             f"(accepted: {', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder")
    return class_names, by_class


def _read_split_folders(root: Path) -> tuple[list[str], dict[str, list[Sample]]]:
    found = {split: _read_class_folders(root / split) for split in SPLITS if (root / split).is_dir()}
    class_names = found["train"][0]
    for split, (names, _) in found.items():
        if names != class_names:
            missing = sorted(set(class_names) - set(names))
            extra = sorted(set(names) - set(class_names))
            raise UsageError(f"{root / split} has other classes than {root / 'train'} (missing: {missing}, "
                             f"extra: {extra}); every split folder needs the same class sub-folders")
    splits: dict[str, list[Sample]] = {split: [] for split in SPLITS}
    for split, (_, by_class) in found.items():
        for label in sorted(by_class):
            splits[split].extend((path, label) for path in sorted(by_class[label]))
    return class_names, splits


def _list_images(folder: Path) -> list[str]:
    images = []
    for directory, subdirectories, files in os.walk(folder, followlinks=True):
        subdirectories[:] = sorted(d for d in subdirectories if not d.startswith("."))
        images.extend(os.path.join(directory, name) for name in sorted(files) if is_image_file(name))
    return images
