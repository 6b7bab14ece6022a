"""Callbacks a fit of an `ImageClassifier` needs besides freezing: memory layout and compiling, and the random state
a resumed run continues from (the model returns them from `configure_callbacks`, so every Trainer runs them); and
the count of training images train.py reports (conf/callbacks)."""

from __future__ import annotations

import logging

import lightning as L
import torch
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


def use_memory_format(model, device: torch.device) -> None:
    """Lays the model's network out NHWC where that is faster (`channels_last`); its steps lay out the batches to
    match (`uses_channels_last`). Called where the device is known: at fit start, and before a feature cache runs
    the frozen part."""
    setting = model.hparams.channels_last
    compiles = bool(model.hparams.get("compile")) and not model.trains_on_features
    model.uses_channels_last = (
        prefers_channels_last(model.network, device, compiles) if setting == "auto" else bool(setting)
    )
    if model.uses_channels_last:
        model.network.to(memory_format=torch.channels_last)


class MemoryFormatAndCompile(L.Callback):
    """At fit start: the network's memory layout (`model.channels_last`), then `torch.compile` (`model.compile`),
    once, in place (`nn.Module.compile`), so checkpoints keep their plain parameter names and load uncompiled."""

    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        use_memory_format(pl_module, pl_module.device)
        setting = pl_module.hparams.get("compile", False)
        if not setting or getattr(pl_module, "compiled", False):
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
