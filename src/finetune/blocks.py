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

from dataclasses import dataclass

from torch import nn

# timm's sentinel: a match with this suffix joins the group before it.
_JOIN_PREVIOUS = (99999,)

# torchvision has no group_matcher; these give its families one, chosen by the modules a network has.
_TORCHVISION_MATCHERS: tuple[tuple[str, dict], ...] = (
    # ViT: the patch embedding with class token and position embedding, then each encoder layer.
    ("encoder.layers", {
        "stem": r"^(?:class_token|conv_proj\.|encoder\.pos_embedding)",
        "blocks": [(r"^encoder\.layers\.encoder_layer_(\d+)\.", None), (r"^encoder\.ln\.", _JOIN_PREVIOUS)],
    }),
    # ResNet, ResNeXt, Wide ResNet: the stem convolution, then each residual block of layer1..layer4.
    ("layer4", {"stem": r"^(?:conv1|bn1)\.", "blocks": r"^layer(\d+)\.(\d+)\."}),
    # MobileNet, EfficientNet, ConvNeXt, VGG, DenseNet, Swin, ...: each child of `features`.
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
    for module_name, matcher in _TORCHVISION_MATCHERS:
        try:
            network.get_submodule(module_name)
        except AttributeError:
            continue
        return matcher
    return None


def split_into_blocks(network: nn.Module, matcher: dict, head_name: str) -> list[Block]:
    """Splits the parameters outside the head into ordered blocks with a timm-style group matcher.

    Args:
        network: the whole network.
        matcher: `{"stem": regex, "blocks": regex or [(regex, suffix), ...], ...}` as in timm.
        head_name: module name of the classifier, which is left out of every block.

    Returns:
        The blocks, from the input to the output.
    """
    from timm.models import group_parameters

    head_prefix = head_name + "."
    # Whatever no pattern matches (pre-logits layers, final norms; the head, left out below) joins the last block.
    matcher = {**matcher, "after_last_block": [(r".*", _JOIN_PREVIOUS)]}
    groups = group_parameters(network, matcher)
    owners = _parameter_owners(network)
    blocks = []
    kept = [names for _, names in sorted(groups.items())]
    kept = [parameters for parameters in ([name for name in names if not name.startswith(head_prefix)]
                                          for names in kept) if parameters]
    for index, names in enumerate(kept):
        parameters = tuple(names)
        blocks.append(Block(index, _covering_names(parameters, owners), parameters))
    return blocks


def trainable_parameter_names(blocks: list[Block], unfreeze: int | str) -> set[str]:
    """Names of the block parameters that `unfreeze` trains (the head's come on top)."""
    if unfreeze == "all":
        return {name for block in blocks for name in block.parameters}
    chosen = blocks[len(blocks) - unfreeze:] if unfreeze else []
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


def describe_blocks(names: list[str], num_classes: int = 2) -> str:
    """A Markdown table of what `unfreeze` means for each model: `python -m finetune.blocks mobilenet_v2`.

    Args:
        names: torchvision model names, or timm ones as "timm:<name>".
        num_classes: head size used for the parameter counts.
    """
    from finetune.backbones import create_backbone

    rows = ["| model | blocks | unfreeze=1 trains | unfreeze=2 adds | trainable at 0 / 1 / 2 / all |",
            "|---|---|---|---|---|"]
    for entry in names:
        source, _, name = entry.rpartition(":")
        backbone = create_backbone(name, num_classes, source=source or "torchvision", weights=None)
        sizes = dict((n, p.numel()) for n, p in backbone.network.named_parameters())
        head = sum(size for n, size in sizes.items() if n.startswith(backbone.head_name + "."))
        counts = [head + sum(sizes[n] for n in trainable_parameter_names(backbone.blocks, depth))
                  for depth in (0, 1, 2, "all")]
        blocks = backbone.blocks
        rows.append(f"| {entry} | {len(blocks)} | `{blocks[-1].label}` | `{blocks[-2].label}` | "
                    f"{' / '.join(f'{count:,}' for count in counts)} |")
    return "\n".join(rows)


if __name__ == "__main__":
    import sys

    print(describe_blocks(sys.argv[1:] or ["mobilenet_v2"]))
