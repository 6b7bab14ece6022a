"""Datasets and loaders: image files with seeded per-image augmentation, or cached features (what each split
serves); resumable training order; worker count; fixed-order passes."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2 as T

from finetune.data.folders import Sample
from finetune.data.images import load_rgb
from finetune.data.samplers import EpochShuffler, FeatureDataset, ViewDataset, ViewSampler, as_batch
from finetune.data.transforms import (
    CanvasDataset,
    RandomSteps,
    augmentation_seed,
    eval_transform,
    image_key,
    train_transform,
)
from finetune.features.cache import build_cache, should_cache
from finetune.features.cut import Cut
from finetune.model.backbones import Preprocessing
from finetune.model.precision import Choice, feature_pass_precision

log = logging.getLogger(__name__)


class ImageDataset(Dataset):
    """Images and labels from a list of (path, label) pairs; every image decoded to RGB, or taken from `images`
    (the same images decoded beforehand, see `finetune.data.image_cache`).

    Indexed by `(index, epoch)` (as `EpochShuffler(keyed=True)` yields), the random transform of an image is
    seeded by (seed, epoch, its path): the same augmentation whichever worker draws it, after a resume, and in
    every fold the image trains in.
    """

    def __init__(
        self, samples: Sequence[Sample], transform, seed: int = 0, images: Sequence[torch.Tensor] | None = None
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.seed = seed
        self.images = images
        self.keys = [image_key(path) for path, _ in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]):
        index, epoch = key if isinstance(key, tuple) else (key, None)
        path, label = self.samples[index]
        image = load_rgb(path) if self.images is None else self.images[index]
        if epoch is None:
            return self.transform(image), label
        # fork_rng: the global generator of the process (the training loop's, with workers=0) stays untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(augmentation_seed(self.seed, epoch, self.keys[index]))
            return self.transform(image), label


class ResumableLoader(DataLoader):
    """The training loader, whose place in the epoch travels in checkpoints (Lightning's stateful-loader protocol).

    A run resumed from a mid-epoch checkpoint (a step checkpoint, or the one saved on Ctrl-C or SIGTERM) then
    trains the rest of that epoch in the same order, instead of starting the epoch over.

    Args:
        trained_batches: how many batches of the current epoch the training loop has trained on.
    """

    def __init__(self, *args, trained_batches: Callable[[], int], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.trained_batches = trained_batches

    def state_dict(self) -> dict:
        return {"epoch": self.sampler.epoch, "samples_done": self.trained_batches() * self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        # Lightning loads this after `train_dataloader()` set the epoch it resumes at: a checkpoint from the end
        # of an epoch names the epoch before, which is over.
        if state["epoch"] == self.sampler.epoch:
            self.sampler.resume_at(state["epoch"], state["samples_done"])


def default_num_workers() -> int:
    """Loader processes: one per CPU core this process may use but one (which stays with the training loop),
    at most 8. The cores are those of the process's affinity: under SLURM, the job's allocation."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(cores - 1, 8))


def split_loader(
    dataset: Dataset,
    *,
    shuffle: bool,
    batch_size: int,
    seed: int,
    num_workers: int,
    in_memory: bool,
    trainer=None,
    weights: Sequence[float] | None = None,
    trained_batches: Callable[[], int] | None = None,
) -> DataLoader:
    """The loader of one split: shuffled by epoch and resumable for training, in order for evaluation.

    Args:
        dataset: the split's images (or cached features, `in_memory`).
        shuffle: the training loader (`EpochShuffler`/`ViewSampler`, `ResumableLoader`).
        batch_size: images per batch (per process).
        seed: the shuffle's seed (each epoch's order depends only on it and the epoch).
        num_workers: loader processes (not for in-memory tensors).
        in_memory: the dataset holds cached features: no worker processes, `as_batch` collation.
        trainer: the Lightning Trainer, for the processes' shares and the epoch to start at; None: one process.
        weights: per-image draw weights (data.balance=sampler).
        trained_batches: how many batches of the current epoch have trained (the resume position).
    """
    # Under DDP every process loads its own share; the samplers are DistributedSamplers, so Lightning keeps them.
    shards = (
        {"num_replicas": trainer.world_size, "rank": trainer.global_rank} if trainer else {"num_replicas": 1, "rank": 0}
    )
    sampler = None
    if shuffle:
        sampler = (
            ViewSampler(dataset, seed, weights, **shards)
            if in_memory
            else EpochShuffler(len(dataset), seed, keyed=True, weights=weights, **shards)
        )
        # A resumed run's loader starts prefetching before Lightning calls set_epoch: start it at the epoch
        # Lightning will train next (its own count for set_epoch), or that epoch would replay an earlier order.
        sampler.set_epoch(trainer.fit_loop.epoch_progress.current.processed if trainer else 0)
    elif shards["num_replicas"] > 1:
        # Every image evaluated exactly once: no padding with repeated images (Lightning's DistributedSampler
        # pads, which biases the metrics). Processes may run one batch more than others, which is safe without
        # gradients as long as each runs at least one (finetune.training.scaling.check_distributed makes sure).
        sampler = UnrepeatedDistributedSampler(dataset, shuffle=False, **shards)
    loader = ResumableLoader if shuffle else DataLoader
    common = {
        "batch_size": batch_size,
        "sampler": sampler,
        # Its own generator: creating the loader's iterator then draws nothing from the training loop's, so
        # the dropout masks do not depend on how many loaders a run made (or on a feature cache).
        "generator": torch.Generator().manual_seed(seed),
        **({"trained_batches": trained_batches} if shuffle else {}),
    }
    if in_memory:  # in-memory tensors: worker processes would only add start-up and copying
        return loader(dataset, collate_fn=as_batch, **common)
    return loader(
        dataset,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        **common,
    )


def image_dataset(
    samples: list[Sample],
    preprocessing: Preprocessing,
    seed: int,
    images=None,
    augment: str = "none",
    augment_on: str = "loader",
    crop_scale: Sequence[float] = (0.8, 1.0),
    rotation_degrees: float = 0.0,
    horizontal_flip: bool = False,
    random_erasing: float = 0.0,
) -> Dataset:
    """A split's images: from `images` (decoded in memory) if given, else from the files. Finished in the loader
    (normalised float images) or, with augment_on="device", as uint8 images the DataModule's
    `on_after_batch_transfer` finishes. `augment`: the training preset ("none" for evaluation splits)."""
    if augment != "none":
        training = train_transform(
            preprocessing, crop_scale, rotation_degrees, horizontal_flip, augment, random_erasing
        )
        # Without decoded images (a stage that does not train, such as test, set up before fit) the loader
        # prepares them: its float batches pass through on_after_batch_transfer.
        if augment_on == "device" and images is not None:
            labels, keys = [label for _, label in samples], [image_key(path) for path, _ in samples]
            return CanvasDataset(images, labels, RandomSteps(training), seed, keys)
        return ImageDataset(samples, training, seed, images)
    evaluation = eval_transform(preprocessing)
    if augment_on == "device":  # normalised on the device, by the same kernels
        evaluation = T.Compose([*evaluation.transforms[:2], T.PILToTensor()])
    return ImageDataset(samples, evaluation, seed, images)


def feature_datasets(cache: dict[str, tuple[torch.Tensor, ...]]) -> dict[str, Dataset]:
    """The splits' cached features: the training views (one per epoch, in turn) and the val and test features."""
    return {
        "train": ViewDataset(*cache["train"]),
        **{split: FeatureDataset(*cache[split]) for split in ("val", "test") if split in cache},
    }


def frozen_feature_datasets(datamodule, trainer) -> tuple[dict[str, Dataset], Cut, Choice] | None:
    """Every split as the frozen part's features (computed once, `finetune.features.cache`), with the cut and the
    feature pass's precision; None where `cache_features` or the model rule it out (the log says why)."""
    model, device = trainer.lightning_module, trainer.strategy.root_device
    cut, reason = should_cache(datamodule.cache_features, model, datamodule, datamodule.cache_views)
    log.info(reason)
    if cut is None:
        return None
    setting = trainer.precision if datamodule.feature_precision is None else datamodule.feature_precision
    feature_pass = feature_pass_precision(setting, model, cut, datamodule.batch_size, device, trainer.world_size)
    log.info("feature pass: %s", feature_pass.line)
    cache = build_cache(
        model, datamodule, cut, datamodule.cache_views, device, datamodule.feature_store, feature_pass.dtype
    )
    if trainer.world_size > 1:
        log.info("feature cache under DDP: every process runs the frozen part once, then trains on its share")
    return feature_datasets(cache), cut, feature_pass


def ordered_loader(
    dataset: Dataset, batch_size: int, num_workers: int, training: bool, view: int = 0, indices=None
) -> DataLoader:
    """`dataset` (or its items at `indices`) in a fixed order; training images get the augmentation of epoch
    `view`."""
    indices = range(len(dataset)) if indices is None else indices
    keys = [(index, view) for index in indices] if training else list(indices)
    # Its own generator: otherwise each pass draws its workers' base seed from the global one, and a run that
    # builds a feature cache would draw different dropout masks from one that does not.
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=keys,
        generator=torch.Generator(),
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
    )
