"""Freezing: which parameters train, and keeping frozen blocks truly frozen (BatchNorm statistics, dropout)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from finetune.blocks import Block, trainable_parameter_names
from finetune.errors import UsageError


def parse_unfreeze(value: int | str, num_blocks: int, model_name: str) -> int | str:
    """Checks an `unfreeze` setting against the model: an int from 0 to the number of blocks, or "all".

    Raises:
        UsageError: naming what is accepted, and how many blocks the model has.
    """
    if isinstance(value, str) and value.strip().lower() == "all":
        return "all"
    try:
        depth = int(value)
        if isinstance(value, float | bool) or str(value).strip() != str(depth):
            raise ValueError
    except (TypeError, ValueError):
        raise UsageError(f"unfreeze={value!r} is not accepted: use 0 (head only), a number of blocks "
                         f"from 1 to {num_blocks} ({model_name} has {num_blocks} blocks), or all") from None
    if not 0 <= depth <= num_blocks:
        raise UsageError(f"unfreeze={depth} is out of range: {model_name} has {num_blocks} blocks, so use "
                         f"0..{num_blocks} or all")
    return "all" if depth == num_blocks else depth


@dataclass(frozen=True)
class UnfreezeSchedule:
    """How many blocks train in each epoch: a fixed depth, or a gradual schedule (ULMFiT-style).

    Attributes:
        num_blocks: blocks the model has.
        depth: blocks trained from `start_epoch` on (`num_blocks` for all).
        start_epoch: epochs of head-only training before `depth` blocks unfreeze; 0 trains them from the start.
        every: after `start_epoch`, one more block unfreezes every `every` epochs; None keeps `depth`.
        limit: the deepest `every` goes (None: all blocks).
    """

    num_blocks: int
    depth: int
    start_epoch: int = 0
    every: int | None = None
    limit: int | None = None

    def depth_at(self, epoch: int) -> int:
        """Blocks trained during `epoch` (0-based): a pure function of the epoch, so a resumed run agrees."""
        if epoch < self.start_epoch:
            return 0
        depth = self.depth
        if self.every:
            depth += (epoch - self.start_epoch) // self.every
        return min(depth, self.max_depth)

    @property
    def max_depth(self) -> int:
        """The most blocks that ever train: they all get optimizer groups from the first step."""
        if self.every:
            return self.num_blocks if self.limit is None else max(self.depth, self.limit)
        return self.depth


def apply_unfreeze(network: nn.Module, blocks: list[Block], head_name: str, unfreeze: int | str,
                   train_bn: bool = False) -> list[Block]:
    """Sets `requires_grad`: the head and the last `unfreeze` blocks train, the rest is frozen.

    Args:
        network: the whole network.
        blocks: its blocks, input to output.
        head_name: module name of the new head (always trained).
        unfreeze: a checked setting from `parse_unfreeze`.
        train_bn: also train BatchNorm layers inside frozen blocks (affine parameters and statistics),
            as Lightning's `BaseFinetuning(train_bn=True)` does.

    Returns:
        The frozen blocks.
    """
    trainable = trainable_parameter_names(blocks, unfreeze)
    head_prefix = head_name + "."
    for name, parameter in network.named_parameters():
        parameter.requires_grad = name.startswith(head_prefix) or name in trainable
    frozen = [block for block in blocks if not set(block.parameters) <= trainable]
    if train_bn:
        for module in _modules_of(network, frozen):
            if isinstance(module, _BatchNorm):
                for parameter in module.parameters():
                    parameter.requires_grad = True
    return frozen


def keep_frozen_in_eval_mode(network: nn.Module, frozen: list[Block], train_bn: bool = False) -> None:
    """Puts the modules of frozen blocks in eval mode after a `.train()`, so a frozen block computes exactly
    what it computed when pretrained: BatchNorm uses and keeps its running statistics, dropout is off."""
    for module in _modules_of(network, frozen):
        # One module at a time (not .eval(), which recurses): train_bn's BatchNorm layers keep training.
        module.training = train_bn and isinstance(module, _BatchNorm)


def _modules_of(network: nn.Module, blocks: list[Block]):
    for block in blocks:
        for name in block.modules:
            try:
                yield from network.get_submodule(name).modules()
            except AttributeError:
                continue  # a bare parameter such as ViT's class_token: nothing with a mode
