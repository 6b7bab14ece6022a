"""Callbacks a fit of an `ImageClassifier` needs besides freezing: memory layout and compiling, and the random state
a resumed run continues from (the model returns them from `configure_callbacks`, so every Trainer runs them); the
count of training images train.py reports (conf/callbacks); and the learning-rate finder (tune.lr_find)."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateFinder
from torch import nn

from finetune.errors import UsageError

log = logging.getLogger(__name__)

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_BACKEND = "inductor"  # torch.compile's own default; the tests swap in a cheaper one


def check_compile_setting(setting) -> None:
    """Raises UsageError unless `setting` is False, True or a torch.compile mode."""
    if setting not in (True, False, *COMPILE_MODES):
        raise UsageError(
            f"model.compile={setting!r}: use false, true or a torch.compile mode ({', '.join(COMPILE_MODES)})"
        )


def prefers_channels_last(network: nn.Module, device: torch.device, compiled: bool = False) -> bool:
    """What `channels_last=auto` picks: NHWC for convolutional networks on CUDA, and on the CPU unless compiled.

    Measured (bench/RESULTS.md): on the CPU, eager NHWC steps are 1.2-2x faster (oneDNN's convolutions prefer it;
    EfficientNet-Lite0, MobileNetV2, ResNet-50, ConvNeXt), while compiled code gained nothing from it. A ViT's only
    convolution is its patch embedding: NHWC buys nothing there.
    """
    convolutions = sum(isinstance(module, nn.Conv2d) for module in network.modules())
    return convolutions > 1 and (device.type == "cuda" or (device.type == "cpu" and not compiled))


def wants_channels_last(model, device: torch.device, on_features: bool) -> bool:
    """Whether the model's network runs NHWC on `device` (`model.channels_last`: True, False or "auto"); a network
    that trains on cached features is never compiled."""
    setting = model.hparams.channels_last
    compiles = bool(model.hparams.get("compile")) and not on_features
    return prefers_channels_last(model.network, device, compiles) if setting == "auto" else bool(setting)


def use_memory_format(model, device: torch.device) -> None:
    """Lays the model's network out NHWC where that is faster (`channels_last`); its steps lay out the batches to
    match (`uses_channels_last`). Called at fit start, where the device is known."""
    model.uses_channels_last = wants_channels_last(model, device, model.trains_on_features)
    if model.uses_channels_last:
        model.network.to(memory_format=torch.channels_last)


class MemoryFormatAndCompile(L.Callback):
    """At fit start: the network's memory layout (`model.channels_last`), then `torch.compile` (`model.compile`),
    once, in place (`nn.Module.compile`), so checkpoints keep their plain parameter names and load uncompiled."""

    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        use_memory_format(pl_module, pl_module.device)
        setting = pl_module.hparams.get("compile", False)
        if not setting or pl_module.compiled:
            return
        if pl_module.trains_on_features:
            # Training from the cut swaps the skipped modules' forward for the duration of each step, which a
            # compiled graph would not see; and the frozen part, most of the work, no longer runs at all.
            log.info(
                "model.compile: not compiling, the network trains on cached features "
                "(strategy.cache_features=false compiles it)"
            )
            return
        options = {} if setting is True else {"mode": setting}
        log.info(
            "compiling the network with torch.compile (%s, mode %s): the first training and evaluation "
            "steps wait for it",
            COMPILE_BACKEND,
            options.get("mode", "default"),
        )
        pl_module.network.compile(backend=COMPILE_BACKEND, **options)
        pl_module.compiled = True


class ResumeRandomState(L.Callback):
    """Saves the training loop's random state (dropout) in checkpoints and restores it when a run resumes, so a
    resumed run draws what an uninterrupted one would."""

    def __init__(self) -> None:
        self.to_restore: dict | None = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["rng_states"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            checkpoint["rng_states"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module, checkpoint: dict) -> None:
        self.to_restore = checkpoint.get("rng_states")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_index: int) -> None:
        # Restored here, not at loading: Lightning's sanity check runs in between and draws random numbers; and
        # not at epoch start, which a run resumed mid-epoch does not pass through.
        states, self.to_restore = self.to_restore, None
        if states:
            torch.set_rng_state(states["torch"])
            if "cuda" in states and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(states["cuda"])


class ImagesSeen(L.Callback):
    """Counts the images this process trained on (a throughput measure; under DDP, each process its share)."""

    def __init__(self) -> None:
        self.images = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_index: int) -> None:
        self.images += len(batch[1])


class FindLearningRate(LearningRateFinder):
    """Lightning's learning-rate range test at fit start (`tune.lr_find`), then training at its suggestion.

    The suggestion becomes the head's rate (`model.hparams.lr`, so checkpoints and HPARAMS hold the rate that
    trained); the unfrozen blocks' rate keeps its ratio to the head's; the optimizers are built again at those
    rates. `chosen` holds them for metrics.json (`lr_find/lr`, `lr_find/backbone_lr`); the plot goes to
    `plot_path`. No suggestion (too few steps): the configured rates stay, and `chosen` stays empty.

    Args:
        num_training_steps: learning rates tried (tune.num_training).
        plot_path: where process 0 saves the loss-against-rate plot; None: no plot.
    """

    def __init__(self, num_training_steps: int = 100, plot_path: str | Path | None = None) -> None:
        super().__init__(num_training_steps=num_training_steps, update_attr=False)
        self.plot_path = Path(plot_path) if plot_path is not None else None
        self.chosen: dict[str, float] = {}

    def lr_find(self, trainer: L.Trainer, pl_module) -> None:
        super().lr_find(trainer, pl_module)
        finder, before = self.optimal_lr, pl_module.hparams.lr
        # Lightning skips the first 10 points by default; a short search (few batches, early divergence) has fewer.
        steps = len(finder.results["lr"]) if finder else 0
        suggestion = finder.suggestion(skip_begin=min(10, steps // 4), skip_end=1) if steps >= 4 else None
        if suggestion is None:
            log.info("learning-rate finder: no suggestion (%d steps); keeping lr %.3g", steps, before)
            return
        pl_module.hparams.lr = suggestion
        if pl_module.hparams.backbone_lr:
            pl_module.hparams.backbone_lr *= suggestion / before
        trainer.strategy.setup_optimizers(trainer)  # the optimizer groups and schedule, at the new rates
        self.chosen = {"lr_find/lr": suggestion}
        if pl_module.hparams.backbone_lr:
            self.chosen["lr_find/backbone_lr"] = pl_module.hparams.backbone_lr
        if self.plot_path is not None and trainer.is_global_zero:  # under DDP: process 0's results, broadcast
            import matplotlib.pyplot as plt  # only runs that ask for the finder pay for matplotlib

            figure = finder.plot(suggest=True)
            figure.savefig(self.plot_path)
            plt.close(figure)
        log.info("learning-rate finder: lr %.3g (was %.3g); plot in %s", suggestion, before, self.plot_path)
