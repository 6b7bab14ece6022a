"""The LightningModule: a pretrained backbone, a new head, its steps, metrics and optimizer groups.

What a fit does around them lives in callbacks: the unfreeze schedule (`finetune.freezing.Unfreezing`), compiling
and the random state of a resumed run (`finetune.callbacks`), the feature cache (`finetune.features.FeatureCache`),
figures (`finetune.figures.Figures`).
"""

from __future__ import annotations

import logging
import math

import lightning as L
import torch
from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score

from finetune.backbones import Preprocessing, create_backbone, dropout_before_head
from finetune.callbacks import COMPILE_MODES, MemoryFormatAndCompile, ResumeRandomState
from finetune.errors import UsageError
from finetune.features import Cut, classify_features
from finetune.freezing import Unfreezing, keep_frozen_in_eval_mode, set_depth, unfreeze_schedule

log = logging.getLogger(__name__)

OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}
SCHEDULERS = ("cosine", "plateau", "constant")


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
        unfreeze_epoch, unfreeze_every, unfreeze_limit: gradual unfreezing (`finetune.freezing.UnfreezeSchedule`):
            head only for `unfreeze_epoch` epochs, then one more block every `unfreeze_every` up to the limit.
        train_bn: train BatchNorm layers inside frozen blocks too (statistics and affine parameters).
        head_hidden_dim: None for one Linear layer; an int for a Linear-ReLU-Dropout-Linear head.
        head_dropout: dropout in front of the last Linear layer; None keeps the architecture's.
        optimizer: "adamw", "adam" or "sgd" (momentum 0.9).
        lr: learning rate of the head.
        backbone_lr: learning rate of the last block; None uses `lr`.
        layer_decay: discriminative learning rates: each block below the last trains at this factor times the
            learning rate of the block above it (timm's layer decay); None gives all blocks `backbone_lr`.
        weight_decay: decoupled weight decay (AdamW) or L2 penalty (Adam, SGD).
        scheduler: "cosine" (per-step cosine decay to zero after a linear warmup), "plateau" (divide by 10 when
            val/loss stops falling for 2 epochs) or "constant".
        warmup_epochs: length of the linear warmup, in epochs (fractions allowed).
        label_smoothing: label smoothing of the cross-entropy loss.
        class_weights: per-class weights of the training loss (data.balance=loss_weights); validation and test
            losses stay unweighted, so they compare across runs.
        image_size: crop size the network is fed at (the run's `data.image_size`); None: the weights' own. The
            preprocessing at that size travels in checkpoints, for predict, evaluate and export.
        log_misclassified: at test time, log up to this many misclassified images as one grid (captioned
            true -> predicted; `finetune.figures.Figures`); 0 turns it off.
        channels_last: NHWC memory layout for convolutional networks; "auto" uses it where it is faster: on CUDA,
            and on the CPU unless compiled (`finetune.callbacks.prefers_channels_last`).
        compile: compile the network with `torch.compile` when fitting starts: False, True (its default mode) or a
            mode name ("reduce-overhead", "max-autotune", ...). The module is compiled in place
            (`nn.Module.compile`), so checkpoints keep their plain parameter names and load uncompiled anywhere.
    """

    def __init__(
        self,
        name: str,
        class_names: list[str],
        source: str = "torchvision",
        weights: str | None = "DEFAULT",
        unfreeze: int | str = 0,
        unfreeze_epoch: int = 0,
        unfreeze_every: int | None = None,
        unfreeze_limit: int | str | None = None,
        train_bn: bool = False,
        head_hidden_dim: int | None = None,
        head_dropout: float | None = None,
        optimizer: str = "adamw",
        lr: float = 1e-3,
        backbone_lr: float | None = None,
        layer_decay: float | None = None,
        weight_decay: float = 0.0,
        scheduler: str = "cosine",
        warmup_epochs: float = 0.0,
        label_smoothing: float = 0.0,
        class_weights: list[float] | None = None,
        channels_last: bool | str = "auto",
        log_misclassified: int = 16,
        compile: bool | str = False,
        image_size: int | None = None,
    ) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise UsageError(f"unknown optimizer {optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
        if scheduler not in SCHEDULERS:
            raise UsageError(f"unknown scheduler {scheduler!r}: choose one of {', '.join(SCHEDULERS)}")
        if len(class_names) < 2:
            raise UsageError(f"the data has {len(class_names)} class(es); a classifier needs at least two")
        if compile not in (True, False, *COMPILE_MODES):
            raise UsageError(f"model.compile={compile!r}: use false, true or a torch.compile mode "
                             f"({', '.join(COMPILE_MODES)})")
        if layer_decay is not None and not 0 < layer_decay <= 1:
            raise UsageError(f"layer_decay={layer_decay} must be in (0, 1]: each block trains at that factor "
                             "times the learning rate of the block above it")
        # train.py logs the hyperparameters itself, at the end, with the best checkpoint's metrics.
        self.save_hyperparameters(logger=False)

        backbone = create_backbone(name, len(class_names), source=source, weights=weights,
                                   head_hidden_dim=head_hidden_dim, head_dropout=head_dropout)
        self.network = backbone.network
        self.head_name = backbone.head_name
        self.blocks = backbone.blocks
        self.preprocessing = backbone.preprocessing.at_size(image_size)
        self.weights_description = backbone.weights_description
        self.schedule = unfreeze_schedule(self.blocks, name, unfreeze, unfreeze_epoch, unfreeze_every,
                                          unfreeze_limit)
        self.depth, self.frozen_blocks = -1, []
        set_depth(self, self.schedule.depth_at(0))  # the first epoch's, until a fit's Unfreezing takes over
        self.train_images_seen = 0
        # Feature caching (finetune.features): batches then hold what the frozen part gives the cut module.
        self.features_cut: Cut | None = None
        self.head_input_dropout = dropout_before_head(self.network, self.head_name)

        self.loss = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.training_loss_fn = nn.CrossEntropyLoss(
            weight=torch.tensor(class_weights, dtype=torch.float32) if class_weights else None,
            label_smoothing=label_smoothing)
        metrics = MetricCollection(_metrics(len(class_names)))
        self.train_metrics = metrics.clone(prefix="train/")
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        # The mean loss per image as a torchmetrics metric, like the others: under DDP it sums every process's
        # losses and image counts exactly (self.log(sync_dist=True) averages the image count as an integer,
        # which truncates: 13 images on 2 processes count as 6). nan_strategy=nan: a NaN loss shows as NaN
        # ("warn" would drop it; "disable" would also drop the weights, torchmetrics 1.9).
        self.train_loss, self.val_loss, self.test_loss = (MeanMetric(nan_strategy=math.nan) for _ in range(3))
        self.confusion = nn.ModuleDict({stage: MulticlassConfusionMatrix(len(class_names))
                                        for stage in ("val", "test")})
        self.confusion_matrices: dict[str, torch.Tensor] = {}  # the last epoch's, per stage

    @classmethod
    def from_checkpoint(cls, path: str, map_location: str | torch.device = "cpu") -> ImageClassifier:
        """Loads a trained model from a checkpoint without fetching the pretrained weights again."""
        return cls.load_from_checkpoint(path, map_location=map_location, weights=None, weights_only=True)

    def configure_callbacks(self) -> list[L.Callback]:
        # What this model's own settings ask of every fit, whichever Trainer runs it.
        return [Unfreezing(), MemoryFormatAndCompile(), ResumeRandomState()]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # A checkpoint says how to feed the model, whatever weights it started from.
        checkpoint["preprocessing"] = self.preprocessing.as_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "preprocessing" in checkpoint:
            self.preprocessing = Preprocessing.from_dict(checkpoint["preprocessing"])

    @property
    def class_names(self) -> list[str]:
        return list(self.hparams.class_names)

    @property
    def trains_on_features(self) -> bool:
        return self.features_cut is not None

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total) parameter counts."""
        total = sum(p.numel() for p in self.network.parameters())
        trainable = sum(p.numel() for p in self.network.parameters() if p.requires_grad)
        return trainable, total

    def train(self, mode: bool = True) -> ImageClassifier:
        super().train(mode)
        if mode:  # frozen blocks compute what they computed when pretrained (finetune.freezing)
            keep_frozen_in_eval_mode(self.network, self.frozen_blocks, self.hparams.train_bn)
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images)

    def training_step(self, batch, batch_index):
        return self._step(batch, "train")[0]

    def validation_step(self, batch, batch_index):
        loss, logits = self._step(batch, "val")
        return {"loss": loss, "logits": logits}

    def test_step(self, batch, batch_index):
        # The logits go to callbacks too (finetune.figures keeps the misclassified images).
        loss, logits = self._step(batch, "test")
        return {"loss": loss, "logits": logits}

    def _step(self, batch, stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, labels = batch
        if stage == "train":
            self.train_images_seen += len(labels)
        if getattr(self, "uses_channels_last", False) and inputs.dim() == 4:  # images, or cached feature maps
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        logits = classify_features(self, inputs) if self.trains_on_features else self(inputs)
        loss = (self.training_loss_fn if stage == "train" else self.loss)(logits, labels)
        getattr(self, f"{stage}_metrics").update(logits, labels)
        if stage in self.confusion:
            self.confusion[stage].update(logits, labels)
        getattr(self, f"{stage}_loss").update(loss.detach(), weight=len(labels))
        return loss, logits.detach()

    def _log_epoch(self, stage: str) -> None:
        """Logs the stage's epoch metrics, updated at every step: once an epoch, as each `self.log` call costs
        Lightning about half a millisecond, more than a step of the head on cached features (bench/RESULTS.md)."""
        mean_loss = getattr(self, f"{stage}_loss")
        if not mean_loss.update_count:  # no batch in this stage (limit_*_batches=0): nothing to report
            return
        self.log(f"{stage}/loss", mean_loss, prog_bar=stage != "test")
        self.log_dict(getattr(self, f"{stage}_metrics"), prog_bar=stage == "val")

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")
        self._log_confusion("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")
        self._log_confusion("test")

    def _log_confusion(self, stage: str) -> None:
        """Per-class accuracy (recall) as scalars; the matrix stays in `confusion_matrices` for the figures."""
        confusion = self.confusion[stage].compute().cpu()
        self.confusion[stage].reset()
        if self.trainer.sanity_checking:
            return
        self.confusion_matrices[stage] = confusion
        per_class = confusion.diag() / confusion.sum(dim=1).clamp(min=1)
        for name, accuracy in zip(self.class_names, per_class.tolist(), strict=True):
            # Already over every process's images (torchmetrics syncs the matrix): the mean of equal values.
            self.log(f"{stage}/acc_class/{name}", accuracy, sync_dist=True)

    def configure_optimizers(self):
        hp = self.hparams
        options = {"momentum": 0.9} if hp.optimizer == "sgd" else {}
        optimizer = OPTIMIZERS[hp.optimizer](self.parameter_groups(), weight_decay=hp.weight_decay, **options)
        log.info("optimizer %s: %s", hp.optimizer, "; ".join(
            f"{g['name']} lr {g['lr']:.3g} ({sum(p.numel() for p in g['params']):,} parameters)"
            for g in optimizer.param_groups))
        if hp.scheduler == "constant":
            return optimizer
        if hp.scheduler == "plateau":
            plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.1, patience=2)
            return {"optimizer": optimizer,
                    "lr_scheduler": {"scheduler": plateau, "monitor": "val/loss", "interval": "epoch"}}

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

    def parameter_groups(self) -> list[dict]:
        """Optimizer groups for every parameter that ever trains in this run, each at its learning rate.

        Blocks that a gradual schedule unfreezes later are in their groups from the first step (frozen, they
        get no gradient and the optimizer skips them), so no group is ever added mid-run: schedulers see every
        group from the start, and a resumed run restores the same groups.
        """
        hp = self.hparams
        backbone_lr = hp.backbone_lr or hp.lr
        ever_trained = self.blocks[len(self.blocks) - self.schedule.max_depth:] if self.schedule.max_depth else []
        lr_of = {}
        for distance, block in enumerate(reversed(ever_trained)):
            rate = backbone_lr * (hp.layer_decay ** distance if hp.layer_decay else 1.0)
            lr_of.update(dict.fromkeys(block.parameters, (rate, f"block {block.index}" if hp.layer_decay
                                                           else "backbone")))
        head_prefix = self.head_name + "."
        groups: dict[tuple[float, str], list] = {}
        for name, parameter in self.network.named_parameters():
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


def _metrics(num_classes: int) -> dict:
    metrics = {
        "acc": MulticlassAccuracy(num_classes, average="micro"),
        "f1": MulticlassF1Score(num_classes, average="macro"),
    }
    if num_classes > 5:
        metrics["acc_top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    return metrics

