"""Image transforms (torchvision.transforms.v2): what the pretrained weights expect, and training-time augmentation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from finetune.backbones import Preprocessing


def eval_transform(preprocessing: Preprocessing) -> T.Compose:
    """Resize, centre crop, normalise: exactly what the pretrained weights were evaluated with (timm's eval
    transform, its `crop_mode` included: `Preprocessing.crop_mode`)."""
    interpolation = InterpolationMode(preprocessing.interpolation)
    size, crop = preprocessing.resize_size, preprocessing.crop_size
    if preprocessing.crop_mode == "squash":
        resize = [T.Resize((size, size), interpolation=interpolation, antialias=True), T.CenterCrop(crop)]
    elif preprocessing.crop_mode == "border":
        from timm.data.transforms import CenterCropOrPad, ResizeKeepRatio

        fill = [round(255 * value) for value in preprocessing.mean]
        resize = [ResizeKeepRatio(size, interpolation=preprocessing.interpolation, longest=1.0),
                  CenterCropOrPad(crop, fill=fill)]
    else:
        resize = [T.Resize(size, interpolation=interpolation, antialias=True), T.CenterCrop(crop)]
    return T.Compose([*resize, *_to_normalised_tensor(preprocessing)])


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
