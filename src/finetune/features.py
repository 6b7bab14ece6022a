"""Feature caching for transfer learning: the frozen backbone runs once over the data, then the head trains alone.

With `unfreeze=0` every epoch would repeat the same backbone forward pass over the same images. The cache keeps,
for each image, what the frozen backbone hands the head (its input, computed in eval mode, as the frozen blocks
always run), and training then applies only the architecture's dropout and the head. Without training-time
augmentation this is the same computation, epochs later for free; with augmentation the cache holds K augmented
views of every training image and epoch e trains on view e mod K.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from finetune.errors import UsageError

log = logging.getLogger(__name__)

MODES = ("auto", True, False)


def should_cache(mode: str | bool, model, datamodule) -> tuple[bool, str]:
    """Whether to train on cached backbone features, and why (or why not), for the log.

    Args:
        mode: "auto" caches where it cannot change results (transfer learning without training-time
            augmentation); True caches transfer learning whatever the augmentation (K augmented views);
            False never caches.
        model: the `ImageClassifier`.
        datamodule: the `ImageFolderDataModule`.

    Raises:
        UsageError: `mode` is not one of the accepted values, or True where caching cannot apply.
    """
    if mode not in MODES:
        raise UsageError(f"strategy.cache_features={mode!r}: use auto, true or false")
    if mode is False:
        return False, "feature cache off (strategy.cache_features=false)"
    blockers = []
    if model.schedule.max_depth:
        blockers.append(f"unfreeze={model.schedule.max_depth} trains backbone blocks, so their output changes "
                        "every step (the cache covers transfer learning, unfreeze=0)")
    if model.hparams.train_bn:
        blockers.append("train_bn=true changes the backbone's BatchNorm layers while training")
    if blockers:
        if mode is True:
            raise UsageError(f"strategy.cache_features=true cannot apply: {'; '.join(blockers)}")
        return False, f"feature cache off: {'; '.join(blockers)}"
    if datamodule.augments and mode == "auto":
        return False, ("feature cache off: training-time augmentation (data.crop_scale, data.rotation_degrees, "
                       "data.horizontal_flip) gives new images every epoch; strategy.cache_features=true caches "
                       "strategy.cache_views augmented views per image instead")
    return True, "feature cache on: the frozen backbone runs once over the data, then the head trains alone"


@torch.no_grad()
def head_inputs(network: nn.Module, head_name: str, loader: DataLoader,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs the network over `loader` in eval mode and returns what its head receives, with the labels."""
    captured: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []

    def capture(module, arguments):
        captured.append(arguments[0].detach().float().cpu())

    handle = network.get_submodule(head_name).register_forward_pre_hook(capture)
    was_training = network.training
    network.eval()
    try:
        for images, batch_labels in loader:
            network(images.to(device))
            labels.append(batch_labels)
    finally:
        handle.remove()
        network.train(was_training)
    return torch.cat(captured), torch.cat(labels)


def build_cache(model, datamodule, views: int, device: torch.device) -> dict[str, tuple[torch.Tensor, ...]]:
    """The head inputs of every split: `views` passes over the training images, one over val and test."""
    if views < 1:
        raise UsageError(f"strategy.cache_views={views} must be at least 1")
    datamodule.setup("fit")
    network = model.network.to(device)
    passes = views if datamodule.augments else 1
    train_views = [head_inputs(network, model.head_name, datamodule.ordered_dataloader("train", view), device)
                   for view in range(passes)]
    cache = {"train": (torch.stack([v[0] for v in train_views]), train_views[0][1])}
    for split in ("val", "test"):
        if datamodule.datasets[split]:
            cache[split] = head_inputs(network, model.head_name, datamodule.ordered_dataloader(split), device)
    size = sum(t.numel() * t.element_size() for tensors in cache.values() for t in tensors)
    log.info("feature cache: %d training view(s), %s features per image, %.1f MB in memory",
             passes, tuple(cache["train"][0].shape[2:]), size / 1e6)
    return cache


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

    def __init__(self, size: int, seed: int, keyed: bool = False, weights: Sequence[float] | None = None,
                 num_replicas: int = 1, rank: int = 0) -> None:
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
            order += (order * math.ceil(self.total_size / max(1, self.size)))[:self.total_size - self.size]
        mine = order[self.rank:self.total_size:self.num_replicas]
        mine, self.skip = mine[self.skip:], 0
        return iter([(index, self.epoch) for index in mine] if self.keyed else mine)


class ViewSampler(EpochShuffler):
    """Each epoch, every image once, in the EpochShuffler order, from view (epoch mod K)."""

    def __init__(self, dataset: ViewDataset, seed: int, weights: Sequence[float] | None = None,
                 num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset.size, seed, weights=weights, num_replicas=num_replicas, rank=rank)
        self.views = dataset.views

    def __iter__(self):
        offset = (self.epoch % self.views) * self.size
        return (offset + index for index in super().__iter__())
