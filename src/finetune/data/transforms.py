"""Image transforms (torchvision.transforms.v2): what the pretrained weights expect, and training-time augmentation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from finetune.errors import UsageError
from finetune.model.preprocessing import Preprocessing


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
        resize = [
            ResizeKeepRatio(size, interpolation=preprocessing.interpolation, longest=1.0),
            CenterCropOrPad(crop, fill=fill),
        ]
    else:
        resize = [T.Resize(size, interpolation=interpolation, antialias=True), T.CenterCrop(crop)]
    return T.Compose([*resize, *_to_normalised_tensor(preprocessing)])


# data.augment: the training-time augmentation preset. true/false stay accepted as basic/none.
PRESETS = ("basic", "randaugment", "trivialaugment", "none")


def augment_preset(value: bool | str | None) -> str:
    """The preset named by `data.augment`: true is basic (the tutorials' crop/rotate/flip), false or null none.

    Raises:
        UsageError: `value` names no preset.
    """
    if value is True:
        return "basic"
    if value is False or value is None:
        return "none"
    if value not in PRESETS:
        raise UsageError(f"data.augment={value!r}: choose one of {', '.join(PRESETS)} (true is basic, false none)")
    return value


def train_transform(
    preprocessing: Preprocessing,
    crop_scale: Sequence[float],
    rotation_degrees: float,
    horizontal_flip: bool,
    preset: str = "basic",
    random_erasing: float = 0.0,
) -> T.Compose:
    """A training-time augmentation preset at the weights' crop size and interpolation.

    Args:
        preprocessing: the weights' preprocessing (crop size, interpolation, normalisation).
        crop_scale: area range of the random resized crop (every preset crops).
        rotation_degrees: random rotation range (basic only: RandAugment and TrivialAugment rotate themselves).
        horizontal_flip: random horizontal flips (every preset).
        preset: "basic" (crop, rotate, flip: the tutorials'), "randaugment" (crop, flip, then torchvision's
            RandAugment: 2 random operations of magnitude 9 out of 31) or "trivialaugment" (crop, flip, then
            TrivialAugmentWide: one random operation at a random magnitude, no tuning).
        random_erasing: probability of erasing one random rectangle of the normalised image (0: off).
    """
    interpolation = InterpolationMode(preprocessing.interpolation)
    steps = [
        T.RandomResizedCrop(
            preprocessing.crop_size, scale=tuple(crop_scale), interpolation=interpolation, antialias=True
        )
    ]
    if rotation_degrees and preset == "basic":
        steps.append(T.RandomRotation(rotation_degrees, interpolation=InterpolationMode.BILINEAR))
    if horizontal_flip:
        steps.append(T.RandomHorizontalFlip())
    if preset == "randaugment":
        steps.append(T.RandAugment(interpolation=InterpolationMode.BILINEAR))
    elif preset == "trivialaugment":
        steps.append(T.TrivialAugmentWide(interpolation=InterpolationMode.BILINEAR))
    steps.extend(_to_normalised_tensor(preprocessing))
    if random_erasing:
        steps.append(T.RandomErasing(p=random_erasing, value=0))  # 0: the data's mean colour after normalising
    return T.Compose(steps)


def batch_mixing(num_classes: int, mixup: float = 0.0, cutmix: float = 0.0) -> T.Transform | None:
    """MixUp and/or CutMix of whole training batches (one of them, at random, per batch, if both are set).

    Labels come back as class probabilities (B, classes); the training loss takes them as they are.

    Args:
        num_classes: the number of classes.
        mixup: MixUp's Beta(alpha, alpha) parameter (0: off); 0.2 to 0.4 is usual for fine-tuning.
        cutmix: CutMix's alpha (0: off); 1.0 is usual.
    """
    for name, alpha in (("data.mixup", mixup), ("data.cutmix", cutmix)):
        if alpha < 0:
            raise UsageError(f"{name}={alpha} must be 0 (off) or a positive Beta alpha such as 0.2 or 1.0")
    mixers = ([T.MixUp(alpha=mixup, num_classes=num_classes)] if mixup else []) + (
        [T.CutMix(alpha=cutmix, num_classes=num_classes)] if cutmix else []
    )
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else T.RandomChoice(mixers)


def _to_normalised_tensor(preprocessing: Preprocessing) -> list:
    return [
        T.ToImage(),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(mean=list(preprocessing.mean), std=list(preprocessing.std)),
    ]
