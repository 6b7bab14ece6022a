"""Samplers and the cached features' datasets: every image once per epoch in an order that depends only on
(seed, epoch), under DDP too; cached features (`finetune.features.cache`) served a batch at a time, from view
epoch mod K. Class balance: images per class, how uneven the training split is, and the two ways `data.balance`
evens it (the sampler's draw weights, or the loss's class weights)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torch.utils.data import Dataset, DistributedSampler

from finetune.data.folders import SPLITS, Sample
from finetune.data.scan import STRONG_IMBALANCE

log = logging.getLogger(__name__)


class FeatureDataset(Dataset):
    """Cached features and labels, fetched a whole batch at a time (one indexing per batch, not per image)."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.features[index], self.labels[index]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        # The DataLoader hands the batch's indices here when this exists; `as_batch` then passes it through.
        index = torch.as_tensor(indices)
        return self.features[index], self.labels[index]


def as_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The collate function of a FeatureDataset: `__getitems__` already made the batch."""
    return batch


class ViewDataset(FeatureDataset):
    """Cached features of K views of N images, served as K*N samples (view-major)."""

    def __init__(self, views: torch.Tensor, labels: torch.Tensor) -> None:
        super().__init__(views.reshape(-1, *views.shape[2:]), labels.repeat(views.shape[0]))
        self.views, self.size = views.shape[0], views.shape[1]


class EpochShuffler(DistributedSampler):
    """Every index once per epoch, in an order that depends only on (seed, epoch); under DDP, this process's share.

    Lightning calls `set_epoch` before each epoch, so a resumed run shuffles as an uninterrupted one, and the cached
    and uncached paths of one run see their images in the same order. `keyed=True` yields `(index, epoch)` pairs,
    which `ImageDataset` uses to seed each image's augmentation. With `weights`, an epoch is `size` draws with
    replacement, each index with probability proportional to its weight (a class-balancing sampler).

    With `num_replicas` processes, process `rank` takes every `num_replicas`-th index of the same order, starting at
    its rank (the order is padded by its first indices to a multiple of `num_replicas`, so all processes take as
    many steps): step k of a DDP run then trains on the images of step k of a single-process run with
    `num_replicas` times the batch size. It is a `DistributedSampler`, so Lightning uses it as it is instead of
    wrapping it in another one.

    A run resumed mid-epoch calls `resume_at(epoch, done)`: the next iteration of that epoch leaves out the `done`
    samples this process had already trained on, and still counts as a whole epoch in `len()`.
    """

    def __init__(
        self,
        size: int,
        seed: int,
        keyed: bool = False,
        weights: Sequence[float] | None = None,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        super().__init__(range(size), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.size, self.keyed = size, keyed
        self.weights = torch.as_tensor(weights, dtype=torch.float64) if weights is not None else None
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.skip = 0
        super().set_epoch(epoch)

    def resume_at(self, epoch: int, done: int) -> None:
        """The next iteration serves epoch `epoch` from this process's `done`-th sample on."""
        self.epoch, self.skip = epoch, done

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.weights is None:
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = torch.multinomial(self.weights, self.size, replacement=True, generator=generator).tolist()
        if self.total_size > self.size:
            order += (order * math.ceil(self.total_size / max(1, self.size)))[: self.total_size - self.size]
        mine = order[self.rank : self.total_size : self.num_replicas]
        mine, self.skip = mine[self.skip :], 0
        return iter([(index, self.epoch) for index in mine] if self.keyed else mine)


class ViewSampler(EpochShuffler):
    """Each epoch, every image once, in the EpochShuffler order, from view (epoch mod K)."""

    def __init__(
        self,
        dataset: ViewDataset,
        seed: int,
        weights: Sequence[float] | None = None,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        super().__init__(dataset.size, seed, weights=weights, num_replicas=num_replicas, rank=rank)
        self.views = dataset.views

    def __iter__(self):
        offset = (self.epoch % self.views) * self.size
        return (offset + index for index in super().__iter__())


def class_counts(samples: Sequence[Sample], num_classes: int) -> list[int]:
    """Images per class, in class order."""
    counts = [0] * num_classes
    for _, label in samples:
        counts[label] += 1
    return counts


def imbalance(counts: Sequence[int]) -> float:
    """Largest over smallest class count (1.0: balanced)."""
    return max(counts) / max(min(counts), 1)


def loss_weights(counts: Sequence[int]) -> list[float]:
    """Per-class loss weights total / (classes * class count) (`data.balance=loss_weights`)."""
    return [sum(counts) / (len(counts) * count) for count in counts]


def sample_weights(samples: Sequence[Sample], counts: Sequence[int]) -> list[float]:
    """Per-image draw weights that draw each class equally often (`data.balance=sampler`)."""
    return [1.0 / counts[label] for _, label in samples]


def log_classes(class_names: Sequence[str], splits: dict[str, list[Sample]], balance: str | None) -> None:
    """Logs the images per class, and warns of a strong imbalance that no `data.balance` corrects."""
    totals = [sum(c) for c in zip(*(class_counts(splits[s], len(class_names)) for s in SPLITS), strict=True)]
    log.info("classes: %s", ", ".join(f"{name} {count}" for name, count in zip(class_names, totals, strict=True)))
    ratio = imbalance(class_counts(splits["train"], len(class_names)))
    if ratio >= STRONG_IMBALANCE and balance is None:
        log.warning(
            "strong class imbalance: the largest training class has %.1fx the images of the smallest; "
            "accuracy will favour it. Consider data.balance=sampler or data.balance=loss_weights, and "
            "read the per-class accuracy and F1",
            ratio,
        )
