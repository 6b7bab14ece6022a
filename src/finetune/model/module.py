"""The LightningModule: a pretrained backbone, a new head, its steps, metrics and optimizer groups. What a fit does
around them is in callbacks: `freezing.Unfreezing`, `callbacks`, `figures.Figures`; the DataModule decides whether it
trains on cached features (`finetune.features.cache`)."""

from __future__ import annotations

import logging
import math

import lightning as L
import torch
from torch import nn
from torchmetrics import MeanMetric

from finetune.errors import UsageError
from finetune.features.cache import classify_features
from finetune.features.cut import Cut
from finetune.model.backbones import create_backbone
from finetune.model.freezing import (
    Unfreezing,
    keep_batchnorm_in_eval_mode,
    keep_frozen_in_eval_mode,
    parameter_groups,
    set_depth,
    unfreeze_schedule,
)
from finetune.model.heads import dropout_before_head
from finetune.model.metrics import classification_metrics, confusion_matrix
from finetune.model.preprocessing import Preprocessing
from finetune.model.schedules import SCHEDULERS, FixScheduleLength, lr_scheduler
from finetune.training.callbacks import MemoryFormatAndCompile, ResumeRandomState, check_compile_setting

log = logging.getLogger(__name__)

OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}


class ImageClassifier(L.LightningModule):
    """A pretrained network whose classifier is replaced by a new head, trained to a chosen depth.

    Every argument is a plain value, so `save_hyperparameters()` records the whole recipe and `from_checkpoint(path)`
    rebuilds the model without downloading anything.

    Args:
        name, source: architecture name and library, e.g. "mobilenet_v2" and "torchvision" (or "timm").
        class_names: the data's classes, in label order; they size the head and travel in the checkpoint.
        weights: "DEFAULT", a weights tag, a weights file path, a packaged weights name, or None (random init).
        unfreeze: 0 trains the head only (transfer learning), N the last N blocks and the head, "all" everything.
        unfreeze_epoch, unfreeze_every, unfreeze_limit: gradual unfreezing (`finetune.model.freezing.UnfreezeSchedule`):
            head only for `unfreeze_epoch` epochs, then one more block every `unfreeze_every` up to the limit.
        train_bn: train BatchNorm layers inside frozen blocks too (statistics and affine parameters).
        bn_eval: BatchNorm layers of the trainable blocks normalise with their pretrained running statistics and
            keep them (their scale and shift still train), as Keras advises for fine-tuning: batch statistics of
            small batches of a small data set are noisy, and a head trained on the frozen network's features
            (LP-FT) keeps getting what it was trained on.
        head_hidden_dim, head_dropout: None for one Linear layer, an int for Linear-ReLU-Dropout-Linear; the
            dropout in front of the last Linear layer (None: the architecture's).
        optimizer: "adamw", "adam" or "sgd" (momentum 0.9).
        lr, backbone_lr: learning rates of the head and of the last block (None: `lr`).
        layer_decay: each block below the last trains at this factor times the learning rate of the block above
            it (timm's layer decay); None gives all blocks `backbone_lr`.
        weight_decay: decoupled weight decay (AdamW) or L2 penalty (Adam, SGD). label_smoothing: of the loss.
        scheduler, warmup_epochs: "cosine" (per step, to zero, after a linear warmup of `warmup_epochs`),
            "plateau" (divide by 10 when val/loss stops falling for 2 epochs) or "constant".
        class_weights: per-class weights of the training loss (data.balance=loss_weights); validation and test
            losses stay unweighted, so they compare across runs.
        image_size: crop size fed to the network (`data.image_size`); None: the weights' own. Its preprocessing
            travels in checkpoints (predict, evaluate, export) and the DataModule takes it.
        crop_pct: the share of the resized image the evaluation crop keeps; None: the weights' own (e.g. 224 of
            256), 1.0: the whole image (where objects reach the border, like ELPV's cells).
        log_misclassified: misclassified test images shown as one grid (`finetune.training.figures.Figures`); 0: none.
        channels_last, compile: NHWC layout (True, False or "auto": where faster) and `torch.compile` (False, True
            or a mode), applied at fit start (`finetune.training.callbacks.MemoryFormatAndCompile`).
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
        bn_eval: bool = False,
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
        crop_pct: float | None = None,
    ) -> None:
        super().__init__()
        for key, value, choices in (("optimizer", optimizer, OPTIMIZERS), ("scheduler", scheduler, SCHEDULERS)):
            if value not in choices:
                raise UsageError(f"unknown {key} {value!r}: choose one of {', '.join(choices)}")
        if len(class_names) < 2:
            raise UsageError(f"the data has {len(class_names)} class(es); a classifier needs at least two")
        check_compile_setting(compile)
        if train_bn and bn_eval:
            raise UsageError("train_bn=true and bn_eval=true contradict each other: choose one")
        if layer_decay is not None and not 0 < layer_decay <= 1:
            raise UsageError(
                f"layer_decay={layer_decay} must be in (0, 1]: each block trains at that factor "
                "times the learning rate of the block above it"
            )
        # Logged by training.py, at the end; the image size travels as the preprocessing (on_save_checkpoint).
        self.save_hyperparameters(ignore=["image_size", "crop_pct"], logger=False)

        backbone = create_backbone(
            name,
            len(class_names),
            source=source,
            weights=weights,
            head_hidden_dim=head_hidden_dim,
            head_dropout=head_dropout,
        )
        self.network, self.head_name, self.blocks = backbone.network, backbone.head_name, backbone.blocks
        self.preprocessing = backbone.preprocessing.at_size(image_size, crop_pct)
        self.weights_description = backbone.weights_description
        self.schedule = unfreeze_schedule(self.blocks, name, unfreeze, unfreeze_epoch, unfreeze_every, unfreeze_limit)
        self.depth, self.frozen_blocks = -1, []
        set_depth(self, self.schedule.depth_at(0))  # the first epoch's, until a fit's Unfreezing takes over
        # Where the network is cut when batches hold cached features: the DataModule's choice, read in `setup`.
        self.features_cut: Cut | None = None
        # Set at fit start by callbacks.MemoryFormatAndCompile, once the device is known.
        self.uses_channels_last = False  # the network is NHWC: batches are laid out to match
        self.compiled = False  # the network is torch.compile'd (in place)
        self.head_input_dropout = dropout_before_head(self.network, self.head_name)

        self.loss = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.training_loss_fn = nn.CrossEntropyLoss(
            weight=torch.tensor(class_weights, dtype=torch.float32) if class_weights else None,
            label_smoothing=label_smoothing,
        )
        self.train_metrics, self.val_metrics, self.test_metrics = (
            classification_metrics(len(class_names), class_names, prefix=f"{stage}/")
            for stage in ("train", "val", "test")
        )
        # The mean loss per image as a metric: under DDP it sums every process's losses and image counts exactly
        # (self.log(sync_dist=True) would average the count as an integer). nan_strategy=nan: a NaN loss shows.
        self.train_loss, self.val_loss, self.test_loss = (MeanMetric(nan_strategy=math.nan) for _ in range(3))
        self.confusion = nn.ModuleDict({stage: confusion_matrix(len(class_names)) for stage in ("val", "test")})
        self.confusion_matrices: dict[str, torch.Tensor] = {}  # the last epoch's, per stage

    @classmethod
    def from_checkpoint(cls, path: str, map_location: str | torch.device = "cpu") -> ImageClassifier:
        """Loads a trained model from a checkpoint without fetching the pretrained weights again."""
        return cls.load_from_checkpoint(path, map_location=map_location, weights=None, weights_only=True)

    def configure_callbacks(self) -> list[L.Callback]:  # what its settings ask of every fit, in any Trainer
        return [Unfreezing(), MemoryFormatAndCompile(), ResumeRandomState(), FixScheduleLength()]

    def setup(self, stage: str) -> None:
        # After the DataModule's setup: it serves cached features, cut where it says, or images.
        self.features_cut = getattr(self.trainer.datamodule, "features_cut", None)  # any DataModule may train it

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # A checkpoint says how to feed the model, whatever weights it started from; and the precision it trained
        # in, which a resumed trainer.precision=auto run goes on in (finetune.model.precision).
        checkpoint["preprocessing"] = self.preprocessing.as_dict()
        checkpoint["precision"] = self.trainer.precision

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "preprocessing" in checkpoint:
            self.preprocessing = Preprocessing.from_dict(checkpoint["preprocessing"])

    @property
    def class_names(self) -> list[str]:
        return list(self.hparams.class_names)

    @property
    def trains_on_features(self) -> bool:  # batches hold cached features (finetune.features.cache)
        return self.features_cut is not None

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total) parameter counts."""
        sizes = [(p.numel(), p.requires_grad) for p in self.network.parameters()]
        return sum(size for size, trains in sizes if trains), sum(size for size, _ in sizes)

    def train(self, mode: bool = True) -> ImageClassifier:
        super().train(mode)
        if mode:  # frozen blocks compute what they computed when pretrained (finetune.model.freezing)
            keep_frozen_in_eval_mode(self.network, self.frozen_blocks, self.hparams.train_bn)
            if self.hparams.bn_eval:
                keep_batchnorm_in_eval_mode(self.network)
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images)

    def training_step(self, batch, batch_index):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_index):
        return self._step(batch, "val")

    def test_step(self, batch, batch_index):
        return self._step(batch, "test")

    def _step(self, batch, stage: str) -> dict[str, torch.Tensor]:
        """The loss, and the logits for callbacks (`finetune.training.figures` keeps the misclassified test images)."""
        inputs, labels = batch
        if self.uses_channels_last and inputs.dim() == 4:  # images, or cached feature maps
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        logits = classify_features(self, inputs) if self.trains_on_features else self(inputs)
        loss = (self.training_loss_fn if stage == "train" else self.loss)(logits, labels)
        if labels.dim() == 2:  # class probabilities (data.mixup, data.cutmix): the metrics take the main class
            labels = labels.argmax(dim=1)
        getattr(self, f"{stage}_metrics").update(logits, labels)
        if stage in self.confusion:
            self.confusion[stage].update(logits, labels)
        getattr(self, f"{stage}_loss").update(loss.detach(), weight=len(labels))
        return {"loss": loss, "logits": logits.detach()}

    def _log_epoch(self, stage: str) -> None:
        """Logs the stage's epoch metrics once an epoch (a `self.log` call costs more than a cached-feature step)."""
        mean_loss = getattr(self, f"{stage}_loss")
        if mean_loss.update_count:  # else no batch in this stage (limit_*_batches=0): nothing to report
            self.log(f"{stage}/loss", mean_loss, prog_bar=stage != "test")
            metrics = getattr(self, f"{stage}_metrics")
            # Computed here, not by Lightning: a per-class metric computes a dict, and Lightning logs a Metric
            # object only where it computes one scalar. compute() already sums every process's counts: sync_dist
            # averages equal values, and spares a warning per key under DDP.
            scores = metrics.compute()
            metrics.reset()
            # The progress bar shows the headline scores; the per-class ones go to the loggers only.
            headline = {key: value for key, value in scores.items() if "_class/" not in key}
            self.log_dict(headline, prog_bar=stage == "val", sync_dist=True)
            self.log_dict({key: value for key, value in scores.items() if key not in headline}, sync_dist=True)
        if stage not in self.confusion:
            return
        # The matrix stays in `confusion_matrices` for the figures and `finetune.evaluate`.
        confusion = self.confusion[stage].compute().cpu()
        self.confusion[stage].reset()
        if not self.trainer.sanity_checking:
            self.confusion_matrices[stage] = confusion

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def configure_optimizers(self):
        hp = self.hparams
        options = {"momentum": 0.9} if hp.optimizer == "sgd" else {}
        optimizer = OPTIMIZERS[hp.optimizer](self.parameter_groups(), weight_decay=hp.weight_decay, **options)
        log.info(
            "optimizer %s: %s",
            hp.optimizer,
            "; ".join(
                f"{g['name']} lr {g['lr']:.3g} ({sum(p.numel() for p in g['params']):,} parameters)"
                for g in optimizer.param_groups
            ),
        )
        scheduler = lr_scheduler(optimizer, hp.scheduler, hp.warmup_epochs)
        return {"optimizer": optimizer, "lr_scheduler": scheduler} if scheduler else optimizer

    def parameter_groups(self) -> list[dict]:
        """Every parameter that ever trains in this run, from the first step, at its learning rate (`freezing`)."""
        return parameter_groups(self)
