"""`python -m finetune.blocks mobilenet_v2 timm:deit_tiny_distilled_patch16_224`: what `unfreeze` means for each model.

A block is defined in `finetune.model.blocks`; this command lists each model's blocks and what every depth trains.
"""

import argparse
import sys

from finetune.errors import UsageError
from finetune.model.backbones import create_backbone, source_of
from finetune.model.blocks import trainable_parameter_names


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


def main(argv: list[str] | None = None) -> int:
    """`python -m finetune.blocks [model ...]`: prints the table; an unknown model is one line and exit code 2."""
    parser = argparse.ArgumentParser(
        prog="python -m finetune.blocks",
        description="What unfreeze=1, 2, all train in each model: its blocks and trainable parameter counts.",
    )
    parser.add_argument(
        "models", nargs="*", default=["mobilenet_v2"], help="torchvision or timm names; timm:<name> forces timm"
    )
    try:
        print(describe_blocks(parser.parse_args(argv).models))
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
