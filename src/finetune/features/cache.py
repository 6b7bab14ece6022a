"""Feature caching: the frozen part of the network runs once over the data, then each step runs only the rest.

With `unfreeze=0` every epoch would repeat the same backbone forward pass over the same images; with `unfreeze=N`
the same holds for the frozen blocks before the N that train. The cache keeps, for each image, what the frozen
part hands the first module that trains (computed in eval mode, as frozen blocks always run): the head's input for
transfer learning, the first trained block's input for fine-tuning. Training then runs from there on: the
architecture's dropout and the head, or the trained blocks and the head (`skipping`). Without training-time
augmentation this is the same computation, epochs later for free; with augmentation the cache holds K augmented
views of every training image and epoch e trains on view e mod K.

Where a network is cut is found, and checked, on a random batch (`find_cut`): a network whose forward pass does
work between its modules (a ViT adds its position embedding outside any module) cannot run from a cached
activation, and is then trained uncached, with the reason in the log.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

from finetune.data.image_cache import memory_limit
from finetune.errors import UsageError
from finetune.features.partial_forward import modes, module_inputs, restore_modes, skipping
from finetune.features.store import SHARED
from finetune.model.blocks import Block, trainable_parameter_names
from finetune.model.freezing import keep_frozen_in_eval_mode
from finetune.training.callbacks import use_memory_format

log = logging.getLogger(__name__)

MODES = ("auto", True, False)


@dataclass(frozen=True)
class Cut:
    """Where a network is cut for the feature cache.

    Attributes:
        module: the module whose input is cached: the head (transfer learning) or the first block that ever trains.
        skipped: the outermost modules that run before `module` (none at the head, which runs alone); while
            training on the cache they hand their input on unchanged, so the network runs from `module` on.
        shape: the cached tensor of one image.
    """

    module: str
    skipped: tuple[str, ...]
    shape: tuple[int, ...]

    @property
    def bytes_per_image(self) -> int:
        return 4 * math.prod(self.shape)  # kept as float32


def should_cache(mode: str | bool, model, datamodule, views: int = 1) -> tuple[Cut | None, str]:
    """Where to cut the network for training on cached features, or None; and why, for the log.

    Args:
        mode: "auto" caches where it cannot change results (no training-time augmentation); True caches whatever
            the augmentation (K augmented views); False never caches.
        model: the `ImageClassifier`.
        datamodule: the `ImageFolderDataModule`, prepared.
        views: augmented views cached per training image (strategy.cache_views), for the memory estimate.

    Raises:
        UsageError: `mode` is not one of the accepted values, or True where caching cannot apply.
    """
    if mode not in MODES:
        raise UsageError(f"strategy.cache_features={mode!r}: use auto, true or false")
    if mode is False:
        return None, "feature cache off (strategy.cache_features=false)"
    depth = model.schedule.max_depth
    blockers = []
    if depth == len(model.blocks):
        blockers.append(
            "every block trains (unfreeze=all, or a gradual schedule that reaches all), so no frozen "
            "part stays the same"
        )
    if model.hparams.train_bn:
        blockers.append("train_bn=true changes the backbone's BatchNorm layers while training")
    if not blockers and datamodule.augments and mode == "auto":
        return None, (
            "feature cache off: training-time augmentation (data.crop_scale, data.rotation_degrees, "
            "data.horizontal_flip) gives new images every epoch; strategy.cache_features=true caches "
            "strategy.cache_views augmented views per image instead"
        )
    cut = None
    if not blockers:
        cut, why_not = find_cut(model.network, model.blocks, model.head_name, depth, model.preprocessing.crop_size)
        if cut is None:
            blockers.append(why_not)
    if cut is not None:
        needed, limit = _cache_bytes(cut, datamodule, views), memory_limit(None)
        if limit is not None and needed > limit:
            blockers.append(
                f"the cached features would take {needed / 1e9:.1f} GB, over half the memory "
                f"available ({2 * limit / 1e9:.1f} GB)"
            )
    if blockers:
        if mode is True:
            raise UsageError(f"strategy.cache_features=true cannot apply: {'; '.join(blockers)}")
        return None, f"feature cache off: {'; '.join(blockers)}; training runs uncached"
    if not depth:
        return cut, "feature cache on: the frozen backbone runs once over the data, then the head trains alone"
    trained = " + ".join(block.label for block in model.blocks[len(model.blocks) - depth :])
    return cut, (
        f"feature cache on: the frozen blocks before {cut.module} run once over the data, then each step "
        f"runs {trained} + head"
    )


def find_cut(
    network: nn.Module, blocks: list[Block], head_name: str, depth: int, crop_size: int
) -> tuple[Cut | None, str | None]:
    """Where to cut `network` when its last `depth` blocks (0: none) and its head train, checked on a random batch.

    The cut module is the first one of the first trained block that the forward pass calls (or the head). The
    modules whose forward passes finish before it starts are skipped. The cut is accepted only if, on a random
    batch, (1) running the network from the cut gives the whole network's output, (2) every parameter that trains
    gets a gradient that way, and (3) nothing skipped behaves differently while training (dropout or BatchNorm
    outside the frozen blocks).

    Returns:
        (the cut, None), or (None, why the network cannot run from a cached activation).
    """
    first = blocks[len(blocks) - depth] if depth else None
    targets = first.modules if first else (head_name,)
    device = next(network.parameters()).device
    images = torch.randn(2, 3, crop_size, crop_size, generator=torch.Generator().manual_seed(0)).to(device)
    events: list[tuple[str, str]] = []
    cut_at: list[tuple[int, str, torch.Tensor]] = []  # the first target module called: event, name, its input

    def start(name: str, arguments: tuple) -> None:
        if not cut_at and any(name == target or name.startswith(target + ".") for target in targets):
            cut_at.append((len(events), name, arguments[0].detach()))
        events.append(("start", name))

    hooks = []
    for name, module in network.named_modules():
        if name:
            hooks.append(module.register_forward_pre_hook(lambda _, a, name=name: start(name, a)))
            hooks.append(module.register_forward_hook(lambda _, a, o, name=name: events.append(("end", name))))
    saved_modes = modes(network)
    network.eval()
    try:
        with torch.no_grad():
            output = network(images)
        if not cut_at:
            return None, f"the forward pass never calls {targets[0]}"
        index, module, activation = cut_at[0]
        finished = dict.fromkeys(name for kind, name in events[:index] if kind == "end")  # in order, once each
        skipped = tuple(name for name in finished if name.rpartition(".")[0] not in finished) if first else ()
        cut = Cut(module, skipped, tuple(activation.shape[1:]))
        if first:
            why_not = _why_not_runnable_from(
                network,
                cut,
                activation,
                output,
                trainable_parameter_names(blocks, depth) | _parameter_names(network, head_name),
                blocks[: len(blocks) - depth],
            )
            if why_not:
                return None, why_not
        return cut, None
    finally:
        for hook in hooks:
            hook.remove()
        restore_modes(saved_modes)


def _why_not_runnable_from(
    network: nn.Module, cut: Cut, activation: torch.Tensor, output: torch.Tensor, trained: set[str], frozen: list[Block]
) -> str | None:
    cannot = f"the network cannot run from a cached input of {cut.module}"
    try:
        with torch.no_grad(), skipping(network, cut.skipped):
            rerun = network(activation)
    except Exception as error:  # any failure means the same: this architecture does not split there
        return f"{cannot} ({type(error).__name__}: {str(error).splitlines()[0][:120]})"
    scale = output.abs().max().item() or 1.0
    if rerun.shape != output.shape or not torch.allclose(rerun, output, rtol=1e-3, atol=1e-4 * scale):
        return f"{cannot} (its forward pass does work outside its modules before that block)"
    parameters = dict(network.named_parameters())
    wanted = [parameters[name] for name in sorted(trained)]
    requires = [parameter.requires_grad for parameter in wanted]
    try:
        for parameter in wanted:
            parameter.requires_grad_(True)
        with skipping(network, cut.skipped):
            gradients = torch.autograd.grad(network(activation).float().sum(), wanted, allow_unused=True)
    finally:
        for parameter, flag in zip(wanted, requires, strict=True):
            parameter.requires_grad_(flag)
    untrained = [name for name, gradient in zip(sorted(trained), gradients, strict=True) if gradient is None]
    if untrained:
        return f"{cannot} ({untrained[0]} would not train from there)"
    # While training, frozen blocks run in eval mode; a skipped module outside every block would not.
    network.train()
    keep_frozen_in_eval_mode(network, frozen)
    for name in cut.skipped:
        for inner, module in network.get_submodule(name).named_modules(prefix=name):
            stochastic = isinstance(module, _DropoutNd) and module.p > 0 or "droppath" in type(module).__name__.lower()
            if module.training and (stochastic or isinstance(module, _BatchNorm)):
                return f"{inner} ({type(module).__name__}) acts differently while training, before {cut.module}"
    return None


def _parameter_names(network: nn.Module, module_name: str) -> set[str]:
    return {f"{module_name}.{name}" for name, _ in network.get_submodule(module_name).named_parameters()}


def _cache_bytes(cut: Cut, datamodule, views: int) -> int:
    training_views = views if datamodule.augments else 1
    images = (
        training_views * len(datamodule.splits["train"])
        + len(datamodule.splits["val"])
        + len(datamodule.splits["test"])
    )
    return cut.bytes_per_image * images


def build_cache(model, datamodule, cut: Cut, views: int, device: torch.device) -> dict[str, tuple[torch.Tensor, ...]]:
    """The cut module's inputs for every split: `views` passes over the training images, one over val and test
    (without augmentation: one pass, shared with later runs in this process through `SHARED`)."""
    if views < 1:
        raise UsageError(f"strategy.cache_views={views} must be at least 1")
    datamodule.setup("fit")
    network = model.network.to(device)
    use_memory_format(model, device)  # the frozen part runs as fast as it would have in training
    layout = torch.channels_last if model.uses_channels_last else torch.contiguous_format
    if not datamodule.augments:
        cache = SHARED.inputs(model, datamodule, cut, device, layout)
        cache["train"] = (cache["train"][0].unsqueeze(0), cache["train"][1])
        _log_size(cache, cut)
        return cache
    passes = views
    train_views = [
        module_inputs(network, cut.module, datamodule.ordered_dataloader("train", view), device, layout)
        for view in range(passes)
    ]
    cache = {"train": (torch.stack([v[0] for v in train_views]), train_views[0][1])}
    for split in ("val", "test"):
        if datamodule.datasets[split]:
            cache[split] = module_inputs(network, cut.module, datamodule.ordered_dataloader(split), device, layout)
    _log_size(cache, cut)
    return cache


def _log_size(cache: dict[str, tuple[torch.Tensor, ...]], cut: Cut) -> None:
    size = sum(t.numel() * t.element_size() for tensors in cache.values() for t in tensors)
    log.info(
        "feature cache: %d training view(s), %s features per image (the input of %s), %.1f MB in memory",
        len(cache["train"][0]),
        tuple(cache["train"][0].shape[2:]),
        cut.module,
        size / 1e6,
    )


def train_on_cache(model, datamodule, cut: Cut, views: int, device: torch.device) -> None:
    """Builds the cache at `cut`; from now on `datamodule` serves it and `model` trains from the cut on it."""
    model.features_cut = cut  # first: the memory layout the frozen pass runs in depends on it (no compile)
    datamodule.use_features(build_cache(model, datamodule, cut, views, device))


def classify_features(model, features: torch.Tensor) -> torch.Tensor:
    """The network from the cut on, on cached features: at the head, the head with the architecture's own dropout
    in front, as in forward; at a block, the network with the frozen modules before it skipped."""
    network = model.network
    if model.features_cut.module == model.head_name:
        features = nn.functional.dropout(features, model.head_input_dropout, training=model.training)
        return network.get_submodule(model.head_name)(features)
    with skipping(network, model.features_cut.skipped):
        return network(features)


class FeatureCache(Callback):
    """Sets up training on cached features when a fit starts (`setup("fit")`, after the DataModule's): decides
    where to cut (`should_cache`), logs why, and builds the cache the DataModule then serves.

    Args:
        mode: strategy.cache_features: "auto", True or False (see `should_cache`).
        views: strategy.cache_views: augmented views cached per training image.
    """

    def __init__(self, mode: str | bool = "auto", views: int = 1) -> None:
        self.mode, self.views = mode, views

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit" or pl_module.trains_on_features:  # a second fit (after the LR finder's) keeps the cache
            return
        datamodule = trainer.datamodule
        cut, reason = should_cache(self.mode, pl_module, datamodule, self.views)
        log.info(reason)
        if cut:
            if trainer.world_size > 1:
                log.info(
                    "feature cache under DDP: each of the %d processes runs the frozen part over all the "
                    "images once, then trains on its share of them",
                    trainer.world_size,
                )
            train_on_cache(pl_module, datamodule, cut, self.views, trainer.strategy.root_device)
