"""The LightningModule: a pretrained backbone, a new head, an unfreeze depth, and the metrics we report."""

from __future__ import annotations

import logging
import math

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score

from finetune.backbones import Preprocessing, create_backbone, dropout_before_head
from finetune.errors import UsageError
from finetune.features import Cut, skipping
from finetune.freezing import UnfreezeSchedule, apply_unfreeze, keep_frozen_in_eval_mode, parse_unfreeze
from finetune.plots import BackgroundFigures, confusion_matrix_figure, image_grid_figure

log = logging.getLogger(__name__)

OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}
SCHEDULERS = ("cosine", "plateau", "constant")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_BACKEND = "inductor"  # torch.compile's own default; the tests swap in a cheaper one


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
        unfreeze_epoch: gradual unfreezing: the head trains alone for this many epochs, then `unfreeze` blocks
            join; 0 trains them from the start.
        unfreeze_every: gradual unfreezing: after `unfreeze_epoch`, one more block every this many epochs.
        unfreeze_limit: the deepest `unfreeze_every` goes (None: all blocks).
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
        log_misclassified: at test time, log up to this many misclassified images to TensorBoard as one grid
            (captioned true -> predicted); 0 turns it off.
        channels_last: NHWC memory layout for convolutional networks; "auto" uses it where it is faster: on CUDA,
            and on the CPU unless compiled (`prefers_channels_last`).
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
        # train.py logs the hyperparameters itself, once, with the metrics TensorBoard's HPARAMS tab compares.
        self.save_hyperparameters(logger=False)

        backbone = create_backbone(name, len(class_names), source=source, weights=weights,
                                   head_hidden_dim=head_hidden_dim, head_dropout=head_dropout)
        self.network = backbone.network
        self.head_name = backbone.head_name
        self.blocks = backbone.blocks
        self.preprocessing = backbone.preprocessing
        self.weights_description = backbone.weights_description
        self.schedule = _schedule(self.blocks, name, unfreeze, unfreeze_epoch, unfreeze_every, unfreeze_limit)
        self.depth = -1
        self.frozen_blocks = []
        self._set_depth(self.schedule.depth_at(0))
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
        # The confusion matrices and misclassified images, drawn while training goes on.
        self.figures = BackgroundFigures()

    @classmethod
    def from_checkpoint(cls, path: str, map_location: str | torch.device = "cpu") -> ImageClassifier:
        """Loads a trained model from a checkpoint without fetching the pretrained weights again."""
        return cls.load_from_checkpoint(path, map_location=map_location, weights=None, weights_only=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # A checkpoint says how to feed the model, whatever weights it started from.
        checkpoint["preprocessing"] = self.preprocessing.as_dict()
        # The training loop's random state (dropout), so a resumed run draws what an uninterrupted one would.
        checkpoint["rng_states"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            checkpoint["rng_states"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "preprocessing" in checkpoint:
            self.preprocessing = Preprocessing.from_dict(checkpoint["preprocessing"])
        self._rng_to_restore = checkpoint.get("rng_states")

    @property
    def class_names(self) -> list[str]:
        return list(self.hparams.class_names)

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total) parameter counts."""
        total = sum(p.numel() for p in self.network.parameters())
        trainable = sum(p.numel() for p in self.network.parameters() if p.requires_grad)
        return trainable, total

    def describe(self) -> str:
        """One line on what trains (and when, for a gradual schedule), for the start of the log."""
        trainable, total = self.parameter_counts()
        what = self._what_trains(self.schedule.depth if self.schedule.start_epoch else self.depth)
        if self.schedule.start_epoch or self.schedule.every:
            what = f"head only for {self.schedule.start_epoch} epoch(s), then {what}"
            if self.schedule.every:
                what += f", one more block every {self.schedule.every} epoch(s) up to {self.schedule.max_depth}"
        return (f"{self.hparams.name}, {self.weights_description}; {what}; "
                f"trainable parameters {trainable:,} of {total:,} ({100 * trainable / total:.1f}%)")

    def _what_trains(self, depth: int) -> str:
        if depth == 0:
            return "unfreeze=0: head only"
        if depth == len(self.blocks):
            return "unfreeze=all: everything"
        chosen = self.blocks[len(self.blocks) - depth:]
        return (f"unfreeze={depth}: last {depth} of {len(self.blocks)} blocks "
                f"({', '.join(b.label for b in chosen)}) + head")

    def _set_depth(self, depth: int) -> None:
        if depth == self.depth:
            return
        self.depth = depth
        self.frozen_blocks = apply_unfreeze(self.network, self.blocks, self.head_name, depth,
                                            self.hparams.train_bn)
        self.train(self.training)

    def on_train_batch_start(self, batch, batch_index: int) -> None:
        # Restored here, not at loading: Lightning's sanity check runs in between and draws random numbers; and
        # not at epoch start, which a run resumed mid-epoch does not pass through.
        states, self._rng_to_restore = getattr(self, "_rng_to_restore", None), None
        if states:
            torch.set_rng_state(states["torch"])
            if "cuda" in states and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(states["cuda"])

    def on_train_start(self) -> None:
        # A run resumed mid-epoch does not pass through on_train_epoch_start.
        self.on_train_epoch_start()

    def on_train_epoch_start(self) -> None:
        # The schedule is a function of the epoch: a run resumed mid-schedule lands on the same depth.
        depth = self.schedule.depth_at(self.current_epoch)
        if depth != self.depth:
            self._set_depth(depth)
            trainable, total = self.parameter_counts()
            log.info("epoch %d: %s; trainable parameters %s of %s", self.current_epoch, self._what_trains(depth),
                     f"{trainable:,}", f"{total:,}")
            self._rewrap_for_ddp()

    def _rewrap_for_ddp(self) -> None:
        """Wraps the model in DistributedDataParallel again after the trainable parameters changed.

        DDP registers the parameters that require gradients when it wraps the model, and all-reduces only those:
        a block unfrozen later would train on each process's own gradients, and the processes would drift apart
        without an error. Wrapping again registers exactly the parameters that train now (frozen ones never are,
        so no find_unused_parameters is needed) and broadcasts process 0's weights, which all processes share.
        """
        strategy = self.trainer.strategy
        if isinstance(strategy, DDPStrategy) and isinstance(strategy.model, DistributedDataParallel):
            strategy.model = self
            strategy.configure_ddp()
            log.info("DDP: wrapped the model again, so the gradients of the newly unfrozen block(s) are averaged "
                     "across the %d processes", self.trainer.world_size)

    def on_fit_start(self) -> None:
        self.use_memory_format(self.device)
        self._compile()

    def use_memory_format(self, device: torch.device) -> None:
        """Lays the network out NHWC where that is faster (`channels_last`); `_step` lays out the batches to match.
        Called where the device is known: at fit start, and before a feature cache runs the frozen part."""
        setting = self.hparams.channels_last
        compiles = bool(self.hparams.get("compile")) and not self.trains_on_features
        self.uses_channels_last = prefers_channels_last(self.network, device, compiles) if setting == "auto" \
            else bool(setting)
        if self.uses_channels_last:
            self.network.to(memory_format=torch.channels_last)

    @property
    def trains_on_features(self) -> bool:
        return self.features_cut is not None

    def _compile(self) -> None:
        """Compiles the network in place, once (model.compile); not on cached features (see below)."""
        setting = self.hparams.get("compile", False)
        if not setting or getattr(self, "compiled", False):
            return
        if self.trains_on_features:
            # Training from the cut swaps the skipped modules' forward for the duration of each step, which a
            # compiled graph would not see; and the frozen part, most of the work, no longer runs at all.
            log.info("model.compile: not compiling, the network trains on cached features "
                     "(strategy.cache_features=false compiles it)")
            return
        options = {} if setting is True else {"mode": setting}
        log.info("compiling the network with torch.compile (%s, mode %s): the first training and evaluation "
                 "steps wait for it", COMPILE_BACKEND, options.get("mode", "default"))
        self.network.compile(backend=COMPILE_BACKEND, **options)
        self.compiled = True

    def train(self, mode: bool = True) -> ImageClassifier:
        super().train(mode)
        if mode:
            keep_frozen_in_eval_mode(self.network, self.frozen_blocks, self.hparams.train_bn)
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images)

    def classify_features(self, features: torch.Tensor) -> torch.Tensor:
        """The network from the cut on, on cached features: at the head, the head with the architecture's own
        dropout in front, as in forward; at a block, the network with the frozen modules before it skipped."""
        if self.features_cut.module == self.head_name:
            features = nn.functional.dropout(features, self.head_input_dropout, training=self.training)
            return self.network.get_submodule(self.head_name)(features)
        with skipping(self.network, self.features_cut.skipped):
            return self.network(features)

    def training_step(self, batch, batch_index):
        return self._step(batch, self.train_metrics, "train")

    def validation_step(self, batch, batch_index):
        return self._step(batch, self.val_metrics, "val")

    def test_step(self, batch, batch_index):
        return self._step(batch, self.test_metrics, "test")

    def _step(self, batch, metrics: MetricCollection, stage: str) -> torch.Tensor:
        inputs, labels = batch
        if stage == "train":
            self.train_images_seen += len(labels)
        if getattr(self, "uses_channels_last", False) and inputs.dim() == 4:  # images, or cached feature maps
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        logits = self.classify_features(inputs) if self.trains_on_features else self(inputs)
        loss = (self.training_loss_fn if stage == "train" else self.loss)(logits, labels)
        if labels.dim() == 2:  # class probabilities (data.mixup, data.cutmix): the metrics take the main class
            labels = labels.argmax(dim=1)
        metrics.update(logits, labels)
        if stage in self.confusion:
            self.confusion[stage].update(logits, labels)
        if stage == "test" and not self.trains_on_features:
            self._keep_misclassified(inputs, labels, logits.argmax(dim=1))
        getattr(self, f"{stage}_loss").update(loss.detach(), weight=len(labels))
        return loss

    def _log_epoch(self, stage: str) -> None:
        """Logs the stage's epoch metrics (loss, accuracy, F1, ...), updated at every step.

        Logged once an epoch, not at every step: every metric here is an epoch metric, and each `self.log` call
        costs Lightning about half a millisecond (it walks the logged value's metadata), which is more than a step
        of the head on cached features takes (bench/RESULTS.md). Lightning computes and resets them as it would
        have at the epoch's end.
        """
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

    def on_test_epoch_start(self) -> None:
        self.misclassified: list[tuple[torch.Tensor, int, int]] = []

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")
        self._log_confusion("test")
        # Under DDP, the images process 0 got wrong (each process keeps those of its own share).
        if self.misclassified and isinstance(self.logger, TensorBoardLogger) and self.trainer.is_global_zero:
            mean = torch.tensor(self.preprocessing.mean).view(3, 1, 1)
            std = torch.tensor(self.preprocessing.std).view(3, 1, 1)
            images = [(image * std + mean).clamp(0, 1) for image, _, _ in self.misclassified]
            captions = [f"{self.class_names[t]} -> {self.class_names[p]}" for _, t, p in self.misclassified]
            self.figures.add(self.logger.experiment, "test/misclassified",
                             lambda: image_grid_figure(images, captions), self.global_step)

    def teardown(self, stage: str) -> None:
        # Before Lightning closes the logger: every figure of this stage is then in the event file.
        self.figures.wait()

    def _keep_misclassified(self, images: torch.Tensor, labels: torch.Tensor, predicted: torch.Tensor) -> None:
        room = self.hparams.log_misclassified - len(getattr(self, "misclassified", []))
        if room <= 0:
            return
        wrong = (predicted != labels).nonzero().flatten()[:room].tolist()
        self.misclassified.extend((images[i].float().cpu(), int(labels[i]), int(predicted[i])) for i in wrong)

    def _log_confusion(self, stage: str) -> None:
        """Per-class accuracy (recall) as scalars, and the confusion matrix as an image, in TensorBoard."""
        confusion = self.confusion[stage].compute().cpu()
        self.confusion[stage].reset()
        if self.trainer.sanity_checking:
            return
        per_class = confusion.diag() / confusion.sum(dim=1).clamp(min=1)
        for name, accuracy in zip(self.class_names, per_class.tolist(), strict=True):
            # Already over every process's images (torchmetrics syncs the matrix): the mean of equal values.
            self.log(f"{stage}/acc_class/{name}", accuracy, sync_dist=True)
        if isinstance(self.logger, TensorBoardLogger) and self.trainer.is_global_zero:
            title, names = f"{stage}, epoch {self.current_epoch}", self.class_names
            self.figures.add(self.logger.experiment, f"{stage}/confusion_matrix",
                             lambda: confusion_matrix_figure(confusion, names, title), self.global_step)

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


def prefers_channels_last(network: nn.Module, device: torch.device, compiled: bool = False) -> bool:
    """What `channels_last=auto` picks: NHWC for convolutional networks on CUDA, and on the CPU unless compiled.

    Measured (bench/RESULTS.md): on the CPU, eager NHWC steps are 1.2-2x faster (oneDNN's convolutions prefer it;
    EfficientNet-Lite0, MobileNetV2, ResNet-50, ConvNeXt), while compiled code gained nothing from it. A ViT's only
    convolution is its patch embedding: NHWC buys nothing there.
    """
    convolutions = sum(isinstance(module, nn.Conv2d) for module in network.modules())
    return convolutions > 1 and (device.type == "cuda" or (device.type == "cpu" and not compiled))


def _metrics(num_classes: int) -> dict:
    metrics = {
        "acc": MulticlassAccuracy(num_classes, average="micro"),
        "f1": MulticlassF1Score(num_classes, average="macro"),
    }
    if num_classes > 5:
        metrics["acc_top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    return metrics


def _schedule(blocks: list, name: str, unfreeze, start_epoch: int, every: int | None,
              limit) -> UnfreezeSchedule:
    count = len(blocks)

    def depth(value) -> int:
        parsed = parse_unfreeze(value, count, name)
        return count if parsed == "all" else parsed

    if start_epoch < 0 or (every is not None and every < 1):
        raise UsageError(f"unfreeze_epoch={start_epoch} and unfreeze_every={every} must be >= 0 and >= 1")
    return UnfreezeSchedule(count, depth(unfreeze), start_epoch, every, None if limit is None else depth(limit))
