"""What a "block" is, defined once for every architecture.

A network's parameters are split into ordered blocks, from the input to the output, by a group matcher in timm's
format (`{"stem": regex, "blocks": regex-or-list}`, as timm's `model.group_matcher(coarse=False)` returns): every
distinct match is one block. timm models bring their own matcher; torchvision models get one from the table
below, by structure. The classifier (the new head) belongs to no block. Parameters that no pattern matches and
that sit between the last block and the head (a pre-logits layer, a final norm) join the last block, so
`unfreeze=0` trains the head alone and `unfreeze=1` the last block with everything after it.

`unfreeze=N` trains the last N blocks plus the head; `unfreeze=all` trains every parameter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from finetune.model.timm_import import import_timm

# timm's sentinel: a match with this suffix joins the group before it.
_JOIN_PREVIOUS = (99999,)

# torchvision has no group_matcher; its families get one here, by class, following each network's own stages.
# Every pattern's numbers order the blocks from the input to the output (docs/architectures.md has the table).
_TORCHVISION_FAMILY_MATCHERS: dict[str, dict] = {
    # DenseNet: the stem convolution, then each dense layer; a transition joins the dense layer before it (as in
    # timm's densenet), and the final norm joins the last block.
    "DenseNet": {
        "stem": r"^features\.(?:conv0|norm0)\.",
        "blocks": [
            (r"^features\.denseblock(\d+)\.denselayer(\d+)\.", None),
            (r"^features\.transition(\d+)\.", _JOIN_PREVIOUS),
        ],
    },
    # RegNet: the stem, then each residual block of trunk_output.block1..block4 (as ResNet's layerN.M).
    "RegNet": {"stem": r"^stem\.", "blocks": r"^trunk_output\.block(\d+)\.block\d+-(\d+)\."},
    # MNASNet: `layers` holds the stem (0-7), six stacks of inverted residual blocks (8-13), then a 1x1
    # convolution and its norm (14-15), which join the last block. Each inverted residual block is a block.
    "MNASNet": {"stem": r"^layers\.[0-7]\.", "blocks": r"^layers\.(8|9|1[0-3])\.(\d+)\."},
    # ShuffleNetV2: conv1 is the stem; each unit of stage2..stage4 is a block; conv5 joins the last one.
    "ShuffleNetV2": {"stem": r"^conv1\.", "blocks": r"^stage(\d+)\.(\d+)\."},
    # MaxViT: the stem, then each MaxViT layer of each stage; the classifier's norm and pre-logits Linear join
    # the last block.
    "MaxVit": {"stem": r"^stem\.", "blocks": r"^blocks\.(\d+)\.layers\.(\d+)\."},
}

# Families whose stages are differently named children of the network: the stem, then each stage in order.
_TORCHVISION_NAMED_STAGES: dict[str, tuple[str, str]] = {
    # GoogLeNet: conv1-conv3, then inception3a ... inception5b (the auxiliary classifiers are removed).
    "GoogLeNet": (r"^conv[123]\.", r"^inception\d[a-e]$"),
    # Inception-v3: Conv2d_1a_3x3 ... Conv2d_4a_3x3, then Mixed_5b ... Mixed_7c (AuxLogits is removed).
    "Inception3": (r"^Conv2d_", r"^Mixed_\d[a-e]$"),
}

# Any other torchvision network, by structure: the modules it has.
_TORCHVISION_MATCHERS: tuple[tuple[str, dict], ...] = (
    # ViT: the patch embedding with class token and position embedding, then each encoder layer.
    (
        "encoder.layers",
        {
            "stem": r"^(?:class_token|conv_proj\.|encoder\.pos_embedding)",
            "blocks": [(r"^encoder\.layers\.encoder_layer_(\d+)\.", None), (r"^encoder\.ln\.", _JOIN_PREVIOUS)],
        },
    ),
    # ResNet, ResNeXt, Wide ResNet: the stem convolution, then each residual block of layer1..layer4.
    ("layer4", {"stem": r"^(?:conv1|bn1)\.", "blocks": r"^layer(\d+)\.(\d+)\."}),
    # AlexNet, VGG, SqueezeNet, MobileNet, EfficientNet, ConvNeXt, Swin: each child of `features`.
    ("features", {"blocks": r"^features\.(\d+)\."}),
)


@dataclass(frozen=True)
class Block:
    """One unit of unfreezing.

    Attributes:
        index: position from the input (0) to the output.
        modules: the fewest module (or parameter) names that cover the block, for people: "features.17".
        parameters: names of the parameters in the block.
    """

    index: int
    modules: tuple[str, ...]
    parameters: tuple[str, ...]

    @property
    def label(self) -> str:
        return " + ".join(self.modules)


def torchvision_block_matcher(network: nn.Module) -> dict | None:
    """The group matcher for a torchvision network, or None if its family has no block definition (it is then
    one block)."""
    family = type(network).__name__
    if family in _TORCHVISION_FAMILY_MATCHERS:
        return _TORCHVISION_FAMILY_MATCHERS[family]
    if family in _TORCHVISION_NAMED_STAGES:
        stem, stage = _TORCHVISION_NAMED_STAGES[family]
        stages = [
            name
            for name, child in network.named_children()
            if re.match(stage, name) and any(True for _ in child.parameters())
        ]
        return {"stem": stem, "blocks": [(rf"^{re.escape(name)}\.", (index,)) for index, name in enumerate(stages)]}
    for module_name, matcher in _TORCHVISION_MATCHERS:
        try:
            network.get_submodule(module_name)
        except AttributeError:
            continue
        return matcher
    return None


def timm_block_matcher(network: nn.Module):
    """The group matcher of a timm network: its own `group_matcher(coarse=False)`, or, for the few models without
    one (MetaFormer, PiT, CSATv2), its stages as `feature_info` names them, the parameters registered before the
    first stage (patch embedding, position embedding, class token, stem) being the stem; None if it has neither."""
    try:
        return network.group_matcher(coarse=False)
    except (AttributeError, NotImplementedError):
        pass
    stages = [info["module"] for info in getattr(network, "feature_info", None) or [] if info.get("module")]
    if not stages:
        return None
    names = [name for name, _ in network.named_parameters()]
    first = next((i for i, name in enumerate(names) if name.startswith(stages[0] + ".")), 0)
    stem = "|".join(re.escape(name) for name in names[:first])
    return {
        "stem": rf"^(?:{stem})$" if stem else r"^$",
        "blocks": [(rf"^{re.escape(stage)}\.", (index,)) for index, stage in enumerate(stages)],
    }


def split_into_blocks(network: nn.Module, matcher: dict, head_name: str) -> list[Block]:
    """Splits the parameters outside the head into ordered blocks with a timm-style group matcher.

    Args:
        network: the whole network.
        matcher: `{"stem": regex, "blocks": regex or [(regex, suffix), ...], ...}` as in timm, or a timm matcher
            function (parameter name -> group number).
        head_name: module name of the classifier, which is left out of every block.

    Returns:
        The blocks, from the input to the output.
    """
    group_parameters = import_timm().models.group_parameters

    head_prefix = head_name + "."
    # Whatever no pattern matches (pre-logits layers, final norms; the head, left out below) joins the last block.
    if callable(matcher):  # some timm models (CaiT, ...) group by a function, which says inf for the rest
        matcher = _joining_the_rest(matcher)
    else:
        matcher = {**matcher, "after_last_block": [(r".*", _JOIN_PREVIOUS)]}
    groups = group_parameters(network, matcher)
    owners = _parameter_owners(network)
    blocks = []
    kept = [names for _, names in sorted(groups.items())]
    kept = [
        parameters
        for parameters in ([name for name in names if not name.startswith(head_prefix)] for names in kept)
        if parameters
    ]
    for index, names in enumerate(kept):
        parameters = tuple(names)
        blocks.append(Block(index, _covering_names(parameters, owners), parameters))
    return blocks


def _joining_the_rest(matcher):
    """A timm matcher function whose unmatched parameters (group inf) join the last block."""
    import math

    def grouping(name: str):
        group = matcher(name)
        if isinstance(group, int | float):
            return (math.inf, *_JOIN_PREVIOUS) if math.isinf(group) else (group,)
        return tuple(group)

    return grouping


def trainable_parameter_names(blocks: list[Block], unfreeze: int | str) -> set[str]:
    """Names of the block parameters that `unfreeze` trains (the head's come on top)."""
    if unfreeze == "all":
        return {name for block in blocks for name in block.parameters}
    chosen = blocks[len(blocks) - unfreeze :] if unfreeze else []
    return {name for block in chosen for name in block.parameters}


def _parameter_owners(network: nn.Module) -> dict[str, set[str]]:
    """For every module name (and "" for the root), the names of all parameters below it."""
    owners: dict[str, set[str]] = {}
    for name, _ in network.named_parameters():
        parts = name.split(".")
        for depth in range(len(parts)):
            owners.setdefault(".".join(parts[:depth]), set()).add(name)
    return owners


def _covering_names(parameters: tuple[str, ...], owners: dict[str, set[str]]) -> tuple[str, ...]:
    """The fewest module names whose parameters all lie in `parameters`, covering them all."""
    inside = set(parameters)
    covering: list[str] = []
    for name in parameters:
        current = name
        while "." in current:
            parent = current.rpartition(".")[0]
            if not owners[parent] <= inside:
                break
            current = parent
        if current not in covering:
            covering.append(current)
    return tuple(covering)
