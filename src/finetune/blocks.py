"""`python -m finetune.blocks mobilenet_v2 timm:deit_tiny_distilled_patch16_224`: what `unfreeze` means for each model.

A block is defined in `finetune.model.blocks`; this command lists each model's blocks and what every depth trains.
It is a Hydra app like every command: the model names may be given as bare words (as above) or as
`models=[mobilenet_v2,resnet18] num_classes=3`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from finetune import apps
from finetune.model.backbones import create_backbone, source_of
from finetune.model.blocks import trainable_parameter_names

USAGE = """\
python -m finetune.blocks NAME [NAME ...]     e.g. python -m finetune.blocks densenet121 timm:resnet18

A Markdown table per model: its blocks, what unfreeze=1 and 2 train, and the trainable parameters at 0 / 1 / 2 / all.
NAME is a torchvision or timm model name (a torchvision name wins; timm:<name> forces timm). No weights are loaded.

Keys (Hydra style, instead of bare names):
  models=[NAME,...]    the models (default: [mobilenet_v2])
  num_classes=N        the head size the parameter counts use (default: 2)
"""


@dataclass
class BlocksOptions:
    """The options of `python -m finetune.blocks` (see USAGE)."""

    models: list[str] = field(default_factory=lambda: ["mobilenet_v2"])
    num_classes: int = 2


def describe_blocks(names: list[str], num_classes: int = 2) -> str:
    """A Markdown table of what `unfreeze` means for each model: `python -m finetune.blocks mobilenet_v2`.

    Args:
        names: torchvision or timm model names (a torchvision name wins; "timm:<name>" forces timm).
        num_classes: head size used for the parameter counts.
    """
    rows = [
        "| model | blocks | unfreeze=1 trains | unfreeze=2 adds | trainable at 0 / 1 / 2 / all |",
        "|---|---|---|---|---|",
    ]
    for entry in names:
        source, _, name = entry.rpartition(":")
        backbone = create_backbone(name, num_classes, source=source or source_of(name), weights=None)
        sizes = dict((n, p.numel()) for n, p in backbone.network.named_parameters())
        head = sum(size for n, size in sizes.items() if n.startswith(backbone.head_name + "."))
        depths = [depth for depth in (0, 1, 2) if depth < len(backbone.blocks)] + ["all"]
        counts = [head + sum(sizes[n] for n in trainable_parameter_names(backbone.blocks, depth)) for depth in depths]
        blocks = backbone.blocks
        second = f"`{blocks[-2].label}`" if len(blocks) > 1 else "-"
        rows.append(
            f"| {entry} | {len(blocks)} | `{blocks[-1].label}` | {second} | "
            f"{' / '.join(f'{count:,}' for count in counts)} |"
        )
    return "\n".join(rows)


@apps.command("blocks", BlocksOptions, USAGE)
def _app(options: BlocksOptions) -> None:
    print(describe_blocks(options.models, options.num_classes))


def main(argv: Sequence[str] | None = None) -> int:
    """The command: bare model names become `models=[...]`; everything else goes to Hydra as it is."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    names = [a for a in arguments if "=" not in a and not a.startswith("-")]
    if names:
        quoted = ",".join(f"'{name}'" for name in names)
        arguments = [a for a in arguments if a not in names] + [f"models=[{quoted}]"]
    return _app(arguments)


if __name__ == "__main__":
    sys.exit(main())
