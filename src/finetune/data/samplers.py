"""Samplers and the cached features' datasets: every image once per epoch in an order that depends only on
(seed, epoch), under DDP too; cached features (`finetune.features.cache`) served a batch at a time, from view
epoch mod K."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.utils.data import Dataset, DistributedSampler


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
