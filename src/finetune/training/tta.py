"""Test-time augmentation (tta=flip|flip5crop): at test, each image is also classified in other views, and the
mean of the views' class probabilities is scored as `test_tta/*`, next to the plain `test/*` scores.

A Lightning callback, so it serves every `Trainer.test`: the one after training (train.py) and an evaluation of a
saved checkpoint alike. Views of the evaluation image (already resized and centre-cropped to the network's size):

| tta         | views                                                                                       |
|-------------|---------------------------------------------------------------------------------------------|
| `none`      | none: no `test_tta/*` scores                                                                |
| `flip`      | the image and its mirror image (2)                                                          |
| `flip5crop` | those, plus the four corner crops and the centre crop of 87.5% of the side, each resized back |
|             | to the network's size, and their mirror images (12)                                         |

With a feature cache (`strategy.cache_features`), the test batches hold features, not images: the callback then
classifies the test images itself, from the files, with the evaluation transform.
"""

from __future__ import annotations

import logging

import lightning as L
import torch
from torch.utils.data import DataLoader
from torchmetrics import MetricCollection
from torchvision.transforms.v2 import functional as F

from finetune.errors import UsageError
from finetune.model.metrics import classification_metrics

log = logging.getLogger(__name__)

VIEWS = ("none", "flip", "flip5crop")
CROP_FRACTION = 0.875  # the 5 crops' side, as a fraction of the image's: small shifts and a slight zoom


def views_of(images: torch.Tensor, kind: str) -> list[torch.Tensor]:
    """The batch `images` (B, C, S, S) in each view of `kind` ("flip" or "flip5crop"), each (B, C, S, S)."""
    views = [images]
    if kind == "flip5crop":
        size = images.shape[-2:]
        crop = [max(1, round(side * CROP_FRACTION)) for side in size]
        views += [F.resize(part, list(size), antialias=True) for part in F.five_crop(images, crop)]
    return views + [view.flip(-1) for view in views]


class TestTimeAugmentation(L.Callback):
    """Scores the test images' mean class probabilities over several views with the test step's metrics
    (`finetune.model.metrics`), as `test_tta/acc`, `test_tta/f1`, `test_tta/recall_class/<class>`, ...

    Args:
        views: "none" (off), "flip" or "flip5crop" (see the table in this module's docstring).
    """

    def __init__(self, views: str = "none") -> None:
        if views not in VIEWS:
            raise UsageError(f"tta={views!r}: choose one of {', '.join(VIEWS)}")
        self.views = views
        self.metrics: MetricCollection | None = None

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.views == "none":
            return
        names = pl_module.class_names
        self.metrics = classification_metrics(len(names), names, prefix="test_tta/").to(pl_module.device)

    @torch.no_grad()
    def probabilities(self, pl_module: L.LightningModule, images: torch.Tensor) -> torch.Tensor:
        """The mean of the views' class probabilities for a batch of evaluation images."""
        if pl_module.uses_channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return torch.stack([pl_module(view).softmax(dim=1) for view in views_of(images, self.views)]).mean(0)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.metrics is None or pl_module.trains_on_features:
            return
        images, labels = batch[0], batch[1]
        self.metrics.update(self.probabilities(pl_module, images), labels)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.metrics is None:
            return
        if pl_module.trains_on_features:
            self._classify_images_itself(trainer, pl_module)
        scores = self.metrics.compute()
        self.metrics = None
        # torchmetrics already summed every process's images: sync_dist averages equal values, and spares a
        # warning per key under DDP.
        pl_module.log_dict(scores, sync_dist=True)
        log.info(
            "test-time augmentation (tta=%s, %d views): test_tta/acc %.4f",
            self.views,
            len(views_of(torch.zeros(1, 1, 8, 8), self.views)),
            float(scores["test_tta/acc"]),
        )

    def _classify_images_itself(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The test batches held cached features: classify the test images from their files instead."""
        datamodule = trainer.datamodule
        loader = DataLoader(
            datamodule.evaluation_images("test", trainer.global_rank, trainer.world_size),
            batch_size=datamodule.batch_size,
            num_workers=datamodule.num_workers,
        )
        for images, labels in loader:
            self.metrics.update(self.probabilities(pl_module, images.to(pl_module.device)), labels.to(pl_module.device))
