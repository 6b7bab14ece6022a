"""Checks of a composed configuration against the constructors it will call, before any work starts; and the
DataModule's settings, which only make sense together.

The YAML configs carry no types, so `data.batch_size=abc` would otherwise reach the data module as text and fail
deep inside it. Each `_target_` section is compared with its constructor's annotations, and a value of the wrong
type stops the run with its key named.
"""

from __future__ import annotations

import collections.abc
import inspect
import re
import types
import typing
from typing import Any

from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

from finetune.data import image_cache
from finetune.data.demo import DEMO_NAMES
from finetune.data.transforms import PLACES, augment_preset, batch_mixing
from finetune.errors import UsageError

BALANCES = (None, "sampler", "loss_weights")  # data.balance


def check_arguments(cfg: DictConfig, key: str) -> None:
    """Checks the values of the `_target_` section `cfg[key]` against the target's annotated parameters.

    Raises:
        UsageError: naming the key, the value given and the type expected.
    """
    section = cfg[key]
    hints = _parameter_types(get_object(section._target_))
    values = OmegaConf.to_container(section, resolve=True)
    written = OmegaConf.to_container(section, resolve=False)
    for name, value in values.items():
        if name in hints and not matches(value, hints[name]):
            # A value taken from elsewhere (model.lr: ${strategy.lr}) is named where the user sets it.
            source = re.fullmatch(r"\$\{([\w.]+)\}", str(written[name]))
            shown_key = source.group(1) if source else f"{key}.{name}"
            raise UsageError(
                f"{shown_key}={_shown(value)} is not {describe(hints[name])}; e.g. {shown_key}={_example(hints[name])}"
            )


def _parameter_types(target) -> dict[str, Any]:
    try:
        hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    except Exception:
        return {}  # annotations this Python cannot evaluate: nothing to check against
    hints.pop("return", None)
    return hints


def matches(value, hint) -> bool:
    """Whether a plain config value (from YAML or an override) fits the annotation `hint`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if origin is typing.Literal:
        return value in args
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, list | tuple):
            return False
        item = args[0] if args else Any
        return all(matches(element, item) for element in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return True  # an object type (an Accelerator, a Logger...): not expressible in YAML, nothing to check


def describe(hint) -> str:
    """The annotation in words, for an error message."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(describe(arg) for arg in args if describe(arg)))
    if origin is typing.Literal:
        return "one of " + ", ".join(str(arg) for arg in args)
    if origin in (list, tuple, collections.abc.Sequence):
        return f"a list of {_plural(describe(args[0]))}" if args else "a list"
    return {bool: "true or false", int: "a whole number", float: "a number", str: "text", type(None): "null"}.get(
        hint, ""
    )


def _plural(words: str) -> str:
    return {"a whole number": "whole numbers", "a number": "numbers"}.get(words, words)


def _example(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return _example(next(arg for arg in args if arg is not type(None)))
    if origin is typing.Literal:
        return str(args[0])
    if origin in (list, tuple, collections.abc.Sequence):
        return f"[{_example(args[0]) if args else 1},{_example(args[0]) if args else 2}]"
    return {bool: "true", int: "32", float: "0.5", str: "name"}.get(hint, "...")


def _shown(value) -> str:
    return "(empty)" if value == "" else repr(value) if isinstance(value, str) else str(value)


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
