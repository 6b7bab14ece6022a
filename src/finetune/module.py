"""The LightningModule: a pretrained backbone, a new head, an unfreeze depth, and the metrics we report."""

from __future__ import annotations

import logging
import math

import lightning as L
import torch
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from finetune.backbones import Preprocessing, create_backbone
from finetune.errors import UsageError
from finetune.freezing import apply_unfreeze, keep_frozen_in_eval_mode, parse_unfreeze

log = logging.getLogger(__name__)

OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}
SCHEDULERS = ("cosine", "constant")


class ImageClassifier(L.LightningModule):
    """A pretrained network whose classifier is replaced by a new head, trained to a chosen depth.

    Every argument is a plain value, so `save_hyperparameters()` records the whole recipe and
    `ImageClassifier.from_checkpoint(path)` rebuilds the model without downloading anything.

    Args:
        name: architecture name, e.g. "mobilenet_v2" (torchvision) or "tf_efficientnet_lite0" (timm).
        class_names: the data's classes, in label order; they size the head and travel in the checkpoint.
        source: "torchvision" or "timm".
        weights: "DEFAULT", a weights tag, a weights file path, a packaged weights name, or None (random init).
        unfreeze: 0 trains the head only (transfer learning), N the last N blocks and the head, "all" everything.
        train_bn: train BatchNorm layers inside frozen blocks too (statistics and affine parameters).
        head_hidden_dim: None for one Linear layer; an int for a Linear-ReLU-Dropout-Linear head.
        head_dropout: dropout in front of the last Linear layer; None keeps the architecture's.
        optimizer: "adamw", "adam" or "sgd" (momentum 0.9).
        lr: learning rate of the head.
        backbone_lr: learning rate of the unfrozen blocks; None uses `lr`.
        weight_decay: decoupled weight decay (AdamW) or L2 penalty (Adam, SGD).
        scheduler: "cosine" (per-step cosine decay to zero after a linear warmup) or "constant".
        warmup_epochs: length of the linear warmup, in epochs (fractions allowed).
        label_smoothing: label smoothing of the cross-entropy loss.
    """

    def __init__(
        self,
        name: str,
        class_names: list[str],
        source: str = "torchvision",
        weights: str | None = "DEFAULT",
        unfreeze: int | str = 0,
        train_bn: bool = False,
        head_hidden_dim: int | None = None,
        head_dropout: float | None = None,
        optimizer: str = "adamw",
        lr: float = 1e-3,
        backbone_lr: float | None = None,
        weight_decay: float = 0.0,
        scheduler: str = "cosine",
        warmup_epochs: float = 0.0,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise UsageError(f"unknown optimizer {optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
        if scheduler not in SCHEDULERS:
            raise UsageError(f"unknown scheduler {scheduler!r}: choose one of {', '.join(SCHEDULERS)}")
        if len(class_names) < 2:
            raise UsageError(f"the data has {len(class_names)} class(es); a classifier needs at least two")
        self.save_hyperparameters()

        backbone = create_backbone(name, len(class_names), source=source, weights=weights,
                                   head_hidden_dim=head_hidden_dim, head_dropout=head_dropout)
        self.network = backbone.network
        self.head_name = backbone.head_name
        self.blocks = backbone.blocks
        self.preprocessing = backbone.preprocessing
        self.weights_description = backbone.weights_description
        self.unfreeze = parse_unfreeze(unfreeze, len(self.blocks), name) if self.blocks else \
            _unfreeze_without_blocks(unfreeze, name)
        self.frozen_blocks = apply_unfreeze(self.network, self.blocks, self.head_name, self.unfreeze, train_bn)
        self.train()

        self.loss = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        metrics = MetricCollection(_metrics(len(class_names)))
        self.train_metrics = metrics.clone(prefix="train/")
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")

    @classmethod
    def from_checkpoint(cls, path: str, map_location: str | torch.device = "cpu") -> ImageClassifier:
        """Loads a trained model from a checkpoint without fetching the pretrained weights again."""
        return cls.load_from_checkpoint(path, map_location=map_location, weights=None, weights_only=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # A checkpoint says how to feed the model, whatever weights it started from.
        checkpoint["preprocessing"] = self.preprocessing.as_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "preprocessing" in checkpoint:
            self.preprocessing = Preprocessing.from_dict(checkpoint["preprocessing"])

    @property
    def class_names(self) -> list[str]:
        return list(self.hparams.class_names)

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total) parameter counts."""
        total = sum(p.numel() for p in self.network.parameters())
        trainable = sum(p.numel() for p in self.network.parameters() if p.requires_grad)
        return trainable, total

    def describe(self) -> str:
        """One line on what trains, for the start of the log."""
        trainable, total = self.parameter_counts()
        if self.unfreeze == "all":
            what = "all blocks"
        elif self.unfreeze == 0:
            what = "head only"
        else:
            chosen = self.blocks[len(self.blocks) - self.unfreeze:]
            what = f"last {self.unfreeze} of {len(self.blocks)} blocks ({', '.join(b.label for b in chosen)})"
        return (f"{self.hparams.name}, {self.weights_description}; unfreeze={self.unfreeze}: {what} + head; "
                f"trainable parameters {trainable:,} of {total:,} ({100 * trainable / total:.1f}%)")

    def train(self, mode: bool = True) -> ImageClassifier:
        super().train(mode)
        if mode:
            keep_frozen_in_eval_mode(self.network, self.frozen_blocks, self.hparams.train_bn)
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images)

    def training_step(self, batch, batch_index):
        return self._step(batch, self.train_metrics, "train")

    def validation_step(self, batch, batch_index):
        return self._step(batch, self.val_metrics, "val")

    def test_step(self, batch, batch_index):
        return self._step(batch, self.test_metrics, "test")

    def _step(self, batch, metrics: MetricCollection, stage: str) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        loss = self.loss(logits, labels)
        metrics.update(logits, labels)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, prog_bar=stage != "test",
                 batch_size=len(labels))
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=stage == "val")
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        head_prefix = self.head_name + "."
        head, body = [], []
        for name, parameter in self.network.named_parameters():
            if parameter.requires_grad:
                (head if name.startswith(head_prefix) else body).append(parameter)
        # Only trainable parameters reach the optimizer: frozen ones cost no optimizer state.
        groups = [{"params": head, "lr": hp.lr, "name": "head"}]
        if body:
            groups.append({"params": body, "lr": hp.backbone_lr or hp.lr, "name": "backbone"})
        options = {"momentum": 0.9} if hp.optimizer == "sgd" else {}
        optimizer = OPTIMIZERS[hp.optimizer](groups, weight_decay=hp.weight_decay, **options)
        if hp.scheduler == "constant":
            return optimizer

        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        steps_per_epoch = total_steps / max(1, self.trainer.max_epochs or 1)
        warmup_steps = int(hp.warmup_epochs * steps_per_epoch)

        def factor(step: int) -> float:
            if step < warmup_steps:
                return (step + 1) / warmup_steps
            progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _metrics(num_classes: int) -> dict:
    metrics = {
        "acc": MulticlassAccuracy(num_classes, average="micro"),
        "f1": MulticlassF1Score(num_classes, average="macro"),
    }
    if num_classes > 5:
        metrics["acc_top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    return metrics


def _unfreeze_without_blocks(unfreeze: int | str, name: str) -> int | str:
    if unfreeze in (0, "0", "all"):
        return "all" if unfreeze == "all" else 0
    raise UsageError(f"{name} has no block definition, so unfreeze can only be 0 (head only) or all; "
                     "timm models all have one (model=timm model.name=...)")
