"""Freezing: which parameters train in each epoch, and keeping frozen blocks truly frozen (BatchNorm statistics,
dropout). `Unfreezing` is the Lightning callback that follows a model's schedule through a fit."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

from finetune.errors import UsageError
from finetune.model.blocks import Block, trainable_parameter_names

log = logging.getLogger(__name__)


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
        raise UsageError(
            f"unfreeze={value!r} is not accepted: use 0 (head only), a number of blocks "
            f"from 1 to {num_blocks} ({model_name} has {num_blocks} blocks), or all"
        ) from None
    if not 0 <= depth <= num_blocks:
        raise UsageError(
            f"unfreeze={depth} is out of range: {model_name} has {num_blocks} blocks, so use 0..{num_blocks} or all"
        )
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


def apply_unfreeze(
    network: nn.Module, blocks: list[Block], head_name: str, unfreeze: int | str, train_bn: bool = False
) -> list[Block]:
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


def keep_batchnorm_in_eval_mode(network: nn.Module) -> None:
    """Puts every BatchNorm layer in eval mode after a `.train()` (`bn_eval=true`): trainable blocks too normalise
    with their pretrained running statistics, and keep them; their scale and shift still train."""
    for module in network.modules():
        if isinstance(module, _BatchNorm):
            module.training = False


def _modules_of(network: nn.Module, blocks: list[Block]):
    for block in blocks:
        for name in block.modules:
            try:
                yield from network.get_submodule(name).modules()
            except AttributeError:
                continue  # a bare parameter such as ViT's class_token: nothing with a mode


def unfreeze_schedule(
    blocks: list[Block],
    model_name: str,
    unfreeze: int | str,
    start_epoch: int = 0,
    every: int | None = None,
    limit: int | str | None = None,
) -> UnfreezeSchedule:
    """The schedule of a model's `unfreeze*` settings, checked against its blocks.

    Raises:
        UsageError: a depth the model does not have, or a negative start / an `every` below 1.
    """
    count = len(blocks)

    def depth(value) -> int:
        parsed = parse_unfreeze(value, count, model_name)
        return count if parsed == "all" else parsed

    if start_epoch < 0 or (every is not None and every < 1):
        raise UsageError(f"unfreeze_epoch={start_epoch} and unfreeze_every={every} must be >= 0 and >= 1")
    return UnfreezeSchedule(count, depth(unfreeze), start_epoch, every, None if limit is None else depth(limit))


def set_depth(model, depth: int) -> bool:
    """Trains the head and the last `depth` blocks of an `ImageClassifier`; the other blocks are frozen and, in a
    training model, in eval mode. Returns whether the depth changed."""
    if depth == model.depth:
        return False
    model.depth = depth
    model.frozen_blocks = apply_unfreeze(model.network, model.blocks, model.head_name, depth, model.hparams.train_bn)
    model.train(model.training)  # unfrozen blocks back in train mode, frozen ones in eval mode
    return True


def what_trains(model, depth: int) -> str:
    """`unfreeze=N: last N of M blocks (...) + head`, for the log."""
    blocks = model.blocks
    if depth == 0:
        return "unfreeze=0: head only"
    if depth == len(blocks):
        return "unfreeze=all: everything"
    chosen = blocks[len(blocks) - depth :]
    return f"unfreeze={depth}: last {depth} of {len(blocks)} blocks ({', '.join(b.label for b in chosen)}) + head"


def describe(model) -> str:
    """One line on what trains (and when, for a gradual schedule), for the start of the log."""
    schedule = model.schedule
    trainable, total = model.parameter_counts()
    what = what_trains(model, schedule.depth if schedule.start_epoch else model.depth)
    if schedule.start_epoch or schedule.every:
        what = f"head only for {schedule.start_epoch} epoch(s), then {what}"
        if schedule.every:
            what += f", one more block every {schedule.every} epoch(s) up to {schedule.max_depth}"
    return (
        f"{model.hparams.name}, {model.weights_description}; {what}; "
        f"trainable parameters {trainable:,} of {total:,} ({100 * trainable / total:.1f}%)"
    )


class Unfreezing(Callback):
    """Follows the model's unfreeze schedule: at each epoch's start, the depth of that epoch.

    Like Lightning's `BaseFinetuning`, but no parameter group is ever added: every parameter that will ever train
    is in its optimizer group from the first step (`ImageClassifier.parameter_groups`), so schedulers and resumed
    runs see the same groups. The depth is a function of the epoch, so a resumed run (mid-epoch too) lands on the
    depth an uninterrupted one had; frozen blocks stay in eval mode (BatchNorm statistics, dropout). The model
    returns this callback from `configure_callbacks`: any Trainer that fits it follows its schedule.
    """

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        if stage == "fit":  # before configure_optimizers, which sees the first epoch's trainable parameters
            set_depth(pl_module, pl_module.schedule.depth_at(0))

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        # A run resumed mid-epoch does not pass through on_train_epoch_start.
        self.on_train_epoch_start(trainer, pl_module)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module) -> None:
        depth = pl_module.schedule.depth_at(trainer.current_epoch)
        if set_depth(pl_module, depth):
            trainable, total = pl_module.parameter_counts()
            log.info(
                "epoch %d: %s; trainable parameters %s of %s",
                trainer.current_epoch,
                what_trains(pl_module, depth),
                f"{trainable:,}",
                f"{total:,}",
            )
            rewrap_for_ddp(trainer, pl_module)


def rewrap_for_ddp(trainer: L.Trainer, pl_module) -> None:
    """Wraps the model in DistributedDataParallel again after the trainable parameters changed.

    DDP registers the parameters that require gradients when it wraps the model, and all-reduces only those:
    a block unfrozen later would train on each process's own gradients, and the processes would drift apart
    without an error. Wrapping again registers exactly the parameters that train now (frozen ones never are,
    so no find_unused_parameters is needed) and broadcasts process 0's weights, which all processes share.
    """
    strategy = trainer.strategy
    if isinstance(strategy, DDPStrategy) and isinstance(strategy.model, DistributedDataParallel):
        strategy.model = pl_module
        strategy.configure_ddp()
        log.info(
            "DDP: wrapped the model again, so the gradients of the newly unfrozen block(s) are averaged "
            "across the %d processes",
            trainer.world_size,
        )


def parameter_groups(model) -> list[dict]:
    """Optimizer groups for every parameter that ever trains in this run, each at its learning rate: blocks a
    gradual schedule unfreezes later are in their groups from the first step (frozen, they get no gradient and
    the optimizer skips them), so schedulers see every group from the start and a resumed run the same ones."""
    hp = model.hparams
    backbone_lr = hp.backbone_lr or hp.lr
    ever_trained = model.blocks[len(model.blocks) - model.schedule.max_depth :] if model.schedule.max_depth else []
    lr_of = {}
    for distance, block in enumerate(reversed(ever_trained)):
        rate = backbone_lr * (hp.layer_decay**distance if hp.layer_decay else 1.0)
        lr_of.update(dict.fromkeys(block.parameters, (rate, f"block {block.index}" if hp.layer_decay else "backbone")))
    head_prefix = model.head_name + "."
    groups: dict[tuple[float, str], list] = {}
    for name, parameter in model.network.named_parameters():
        if name.startswith(head_prefix):
            key = (hp.lr, "head")
        elif name in lr_of:
            key = lr_of[name]
        elif parameter.requires_grad:  # BatchNorm of a frozen block under train_bn
            key = (backbone_lr, "backbone")
        else:
            continue  # frozen for the whole run: no optimizer state
        groups.setdefault(key, []).append(parameter)
    ordered = sorted(groups.items(), key=lambda item: item[0][1] != "head")
    return [{"params": params, "lr": lr, "name": name} for (lr, name), params in ordered]
