"""Datasets and loaders over image files: seeded per-image augmentation, resumable training order, worker count."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from finetune.augment import augmentation_seed
from finetune.folders import Sample
from finetune.images import load_rgb


class ImageDataset(Dataset):
    """Images and labels from a list of (path, label) pairs; every image decoded to RGB, or taken from `images`
    (the same images decoded beforehand, see `finetune.image_cache`).

    Indexed by `(index, epoch)` (as `EpochShuffler(keyed=True)` yields), the random transform of an image is
    seeded by (seed, epoch, index): the same augmentation whichever worker draws it, and after a resume.
    """

    def __init__(self, samples: Sequence[Sample], transform, seed: int = 0,
                 images: Sequence[torch.Tensor] | None = None) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.seed = seed
        self.images = images

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
            torch.manual_seed(augmentation_seed(self.seed, epoch, index))
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
