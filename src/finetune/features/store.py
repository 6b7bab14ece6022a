"""Features shared between the runs of one process: a depth study's folds and seeds run the frozen part once.

One store per process that runs several runs (`finetune.training.run.run` is handed it by its caller); the
DataModule takes it as `feature_store`."""

from __future__ import annotations

import hashlib
import logging

import torch

from finetune.features.cut import Cut
from finetune.features.partial_forward import module_inputs

log = logging.getLogger(__name__)


class SharedFeatures:
    """Each image's features at one cut, kept for the next run in this process: the runs of a Hydra multirun (the
    folds and seeds of a depth study) share them instead of running the frozen part over the same images again.

    Only features that do not change from run to run are kept: those of unaugmented images, and those of augmented
    training views (view v of an image is what the training loader serves it in epoch v, seeded by the image's path,
    not its place in the fold: `finetune.data.transforms.image_key`). The key is made of the cut, the preprocessing,
    the memory layout, the dtype of the pass (bf16 features are not fp32 ones), the augmentation's settings and seed
    where views are cached, and a digest of every weight outside the head (a new seed that only redraws the head
    keeps the key; other weights, another cut, image size or precision change it). One key at a time: the study
    sweeps every fold of a depth before the next, so memory stays about that of one run's cache (every image's views,
    not only one fold's training images').
    """

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.by_image: dict[tuple[str, int | None], torch.Tensor] = {}  # (path, view; None: unaugmented)

    def inputs(
        self, model, datamodule, cut: Cut, device, layout, views: int | None = None, dtype: torch.dtype = torch.float32
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each non-empty split's features and labels: those kept reused, the rest computed (and kept). The training
        features are (views, images, ...): `views` augmented views of each training image, or (None) the one plain
        image; validation and test images are never augmented. `dtype`: the feature pass's
        (`finetune.features.partial_forward.module_inputs`)."""
        augmentation = _augmentation(datamodule) if views else None
        # Once a run: reads every weight.
        key = (cut, repr(model.preprocessing), str(layout), str(dtype), augmentation, _weights_digest(model))
        if key != self.key:
            self.key, self.by_image = key, {}
        cache = {}
        for split in ("train", "val", "test"):
            if not datamodule.splits[split]:
                continue
            if split != "train":
                cache[split] = self._split_inputs(model, datamodule, cut, split, None, device, layout, dtype)
                continue
            per_view = [
                self._split_inputs(model, datamodule, cut, split, view, device, layout, dtype)
                for view in (range(views) if views else [None])
            ]
            cache[split] = (torch.stack([features for features, _ in per_view]), per_view[0][1])
        return cache

    def _split_inputs(
        self, model, datamodule, cut: Cut, split: str, view: int | None, device, layout, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        samples = datamodule.splits[split]
        missing = [index for index, (path, _) in enumerate(samples) if (path, view) not in self.by_image]
        if missing:
            loader = datamodule.ordered_dataloader(split, view=view or 0, indices=missing)
            features, _ = module_inputs(model.network, cut.module, loader, device, layout, dtype)
            self.by_image.update(
                ((samples[index][0], view), feature) for index, feature in zip(missing, features, strict=True)
            )
        if len(missing) < len(samples):
            log.info(
                "feature cache: %d of %d %s images' features reused from an earlier run in this process%s",
                len(samples) - len(missing),
                len(samples),
                split,
                f" (augmented view {view})" if view is not None else "",
            )
        features = torch.stack([self.by_image[path, view] for path, _ in samples])
        return features, torch.tensor([label for _, label in samples])


def _augmentation(datamodule) -> tuple:
    """What, besides an image's path and the epoch, decides its augmented training view: the preset, its settings,
    the seed, and whether it is cut from the decoded copy in memory (`finetune.data.image_cache`) or the file."""
    settings = (
        datamodule.crop_scale,
        datamodule.rotation_degrees,
        datamodule.horizontal_flip,
        datamodule.random_erasing,
    )
    return datamodule.augment, settings, datamodule.split_seed, "train" in datamodule.images.decoded


def _weights_digest(model) -> str:
    """A digest of the network's weights and buffers outside the head, whose input the cache never depends on."""
    digest = hashlib.blake2b(digest_size=16)
    head = model.head_name + "."
    for name, tensor in [*model.network.named_parameters(), *model.network.named_buffers()]:
        if not name.startswith(head):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
