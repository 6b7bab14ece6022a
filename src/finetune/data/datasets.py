"""What each split serves: images (from the files or decoded in memory), prepared as the model expects, or the
cached features of the frozen part of the network (`finetune.features.cache`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2 as T

from finetune.data.augment import CanvasDataset, RandomSteps
from finetune.data.folders import Sample
from finetune.data.loaders import ImageDataset
from finetune.data.samplers import FeatureDataset, ViewDataset
from finetune.data.transforms import eval_transform, train_transform
from finetune.model.backbones import Preprocessing


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
            return CanvasDataset(images, [label for _, label in samples], RandomSteps(training), seed)
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
