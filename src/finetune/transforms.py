"""Image transforms (torchvision.transforms.v2): what the pretrained weights expect, and training-time augmentation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from finetune.backbones import Preprocessing


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
