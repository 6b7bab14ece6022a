"""The DataModule's settings, which only make sense together, checked before any work starts. (Their types are
checked by Hydra as it composes the configuration: finetune.config.schema.)"""

from __future__ import annotations

from finetune.data import image_cache
from finetune.data.demo import DEMO_NAMES
from finetune.data.transforms import PLACES, augment_preset, batch_mixing
from finetune.errors import UsageError

BALANCES = (None, "sampler", "loss_weights")  # data.balance


def check_data_settings(
    *, root, demo, split, balance, batch_size, cache_images, augment_on, augment, random_erasing, mixup, cutmix
) -> str:
    """Checks the DataModule's settings together, before any work (`ImageFolderDataModule` documents each).

    Returns:
        The augmentation preset `augment` names.

    Raises:
        UsageError: one line naming the setting and what to do.
    """
    if len(split) != 3 or any(f < 0 for f in split) or not 0.999 < sum(split) < 1.001 or split[0] <= 0:
        raise UsageError(
            f"data.split={list(split)} must be three fractions (train, val, test) summing to 1, "
            "with train and val above 0, e.g. [0.7,0.2,0.1]"
        )
    if root is None and demo not in DEMO_NAMES:
        raise UsageError(
            f"unknown data.demo {demo!r}: choose one of {', '.join(DEMO_NAMES)}, or pass data.root=<your image folder>"
        )
    if split[1] <= 0:
        raise UsageError("data.split needs a validation fraction above 0: the best checkpoint is chosen on it")
    if balance not in BALANCES:
        raise UsageError(f"data.balance={balance}: choose sampler, loss_weights or null (leave the data as is)")
    if batch_size < 1:
        raise UsageError(f"data.batch_size={batch_size} must be at least 1")
    if cache_images not in image_cache.MODES:
        raise UsageError(f"data.cache_images={cache_images!r}: use auto, true or false")
    if augment_on not in PLACES:
        raise UsageError(f"data.augment_on={augment_on!r}: use {' or '.join(PLACES)}")
    preset = augment_preset(augment)
    if not 0 <= random_erasing <= 1:
        raise UsageError(f"data.random_erasing={random_erasing} must be a probability, 0 (off) to 1")
    if random_erasing and preset == "none":
        raise UsageError(
            "data.random_erasing erases part of augmented training images: set data.augment to "
            "basic, randaugment or trivialaugment, or data.random_erasing=0"
        )
    batch_mixing(2, mixup, cutmix)  # checks the alphas now, before any work
    if augment_on == "device" and (preset in ("randaugment", "trivialaugment") or random_erasing):
        what = f"data.augment={preset}" if preset != "basic" else "data.random_erasing"
        raise UsageError(
            f"{what} runs image by image in the loader, not on whole batches: use "
            "data.augment_on=loader (data.mixup and data.cutmix work in both places)"
        )
    if augment_on == "device" and cache_images is False:
        raise UsageError(
            "data.augment_on=device augments decoded images held in memory: set "
            "data.cache_images=auto or true, or data.augment_on=loader"
        )
    return preset
