"""Feature caching: the frozen part of the network runs once over the data, then each step runs only the rest.

With `unfreeze=0` every epoch would repeat the same backbone forward pass over the same images; with `unfreeze=N`
the same holds for the frozen blocks before the N that train. The cache keeps, for each image, what the frozen
part hands the first module that trains (computed in eval mode, as frozen blocks always run): the head's input for
transfer learning, the first trained block's input for fine-tuning. Training then runs from there on: the
architecture's dropout and the head, or the trained blocks and the head (`skipping`). Without training-time
augmentation this is the same computation, epochs later for free; with augmentation the cache holds K augmented
views of every training image and epoch e trains on view e mod K. View v is the image the training loader serves in
epoch v (seeded by the image's path and the epoch), so a depth study's uncached points (unfreeze=all), trained on
live augmentation, see the same K views in their first K epochs as every cached depth does.

Where a network is cut is found, and checked, on a random batch (`finetune.features.cut.find_cut`): a network
that cannot run exactly from a cached activation is trained uncached, with the reason in the log. The DataModule
decides in its `setup` (`should_cache`), from the model it is trained with, and builds the cache (`build_cache`) in
the feature pass's precision (`finetune.model.precision.feature_pass_precision`: bf16 where it pays, which also
halves the cache's memory; the trainable part gets the features back in its own dtype).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from finetune.data.image_cache import memory_limit
from finetune.errors import UsageError
from finetune.features.cut import Cut, find_cut
from finetune.features.partial_forward import skipping
from finetune.features.store import SharedFeatures
from finetune.training.callbacks import wants_channels_last

log = logging.getLogger(__name__)

MODES = ("auto", True, False)


def should_cache(mode: str | bool, model, datamodule, views: int = 1) -> tuple[Cut | None, str]:
    """Where to cut the network for training on cached features, or None; and why, for the log.

    Args:
        mode: "auto" caches where it cannot change results (no training-time augmentation), and with augmentation
            caches `views` augmented views where `views` asks for more than one (then trains uncached where the
            network cannot be cut: a depth study's option); True caches whatever the augmentation (K augmented
            views), and stops where it cannot; False never caches.
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
    if mode is True and (datamodule.mixup or datamodule.cutmix):
        raise UsageError(
            "data.mixup and data.cutmix mix images, not cached features: set strategy.cache_features=auto or false"
        )
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
        if datamodule.mixup or datamodule.cutmix:
            return None, (
                "feature cache off: data.mixup and data.cutmix mix whole batches of images, which cached "
                "features cannot"
            )
        if views < 2:
            return None, (
                "feature cache off: training-time augmentation (data.augment) gives new images every epoch; "
                "strategy.cache_views=K (K > 1) caches K augmented views per image instead"
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


def _cache_bytes(cut: Cut, datamodule, views: int) -> int:
    training_views = views if datamodule.augments else 1
    images = (
        training_views * len(datamodule.splits["train"])
        + len(datamodule.splits["val"])
        + len(datamodule.splits["test"])
    )
    return cut.bytes_per_image * images


def build_cache(
    model,
    datamodule,
    cut: Cut,
    views: int,
    device: torch.device,
    store: SharedFeatures | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, tuple[torch.Tensor, ...]]:
    """The cut module's inputs for every split of `datamodule` (set up): with augmentation, `views` augmented views
    of every training image (view v: what the training loader serves in epoch v); without, the plain images; val
    and test never augmented. Through `store`: features kept for the next run in this process (None: for this run
    only). `dtype`: bfloat16 runs the pass under bf16 autocast and keeps the features in bf16; float32, in fp32."""
    if views < 1:
        raise UsageError(f"strategy.cache_views={views} must be at least 1")
    network = model.network.to(device)
    # The frozen part runs in the layout training will use (never compiled on cached features): as fast as there.
    layout = torch.channels_last if wants_channels_last(model, device, on_features=True) else torch.contiguous_format
    if layout == torch.channels_last:
        network.to(memory_format=layout)
    training_views = views if datamodule.augments else None
    cache = (store or SharedFeatures()).inputs(model, datamodule, cut, device, layout, training_views, dtype)
    _log_size(cache, cut)
    return cache


def _log_size(cache: dict[str, tuple[torch.Tensor, ...]], cut: Cut) -> None:
    size = sum(t.numel() * t.element_size() for tensors in cache.values() for t in tensors)
    log.info(
        "feature cache: %d training view(s), %s features per image (the input of %s), %s, %.1f MB in memory",
        len(cache["train"][0]),
        tuple(cache["train"][0].shape[2:]),
        cut.module,
        str(cache["train"][0].dtype).removeprefix("torch."),
        size / 1e6,
    )


def classify_features(model, features: torch.Tensor) -> torch.Tensor:
    """The network from the cut on, on cached features: at the head, the head with the architecture's own dropout
    in front, as in forward; at a block, the network with the frozen modules before it skipped. Features kept in
    bf16 (the feature pass's precision) reach it in its own dtype."""
    network = model.network
    features = features.to(next(network.parameters()).dtype)
    if model.features_cut.module == model.head_name:
        features = nn.functional.dropout(features, model.head_input_dropout, training=model.training)
        return network.get_submodule(model.head_name)(features)
    with skipping(network, model.features_cut.skipped):
        return network(features)
