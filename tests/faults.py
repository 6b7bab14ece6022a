"""Faults injected into real CLI runs at an exact training step (tests add them with +callbacks.fault=...)."""

from __future__ import annotations

import os
import signal

import lightning as L
import torch


class FaultAtStep(L.Callback):
    """After the optimizer step number `step`: sends this process `signal` (e.g. SIGTERM, SIGKILL), or raises
    `error` ("oom": what CUDA raises when GPU memory runs out)."""

    def __init__(self, step: int, signal: str | None = None, error: str | None = None) -> None:
        self.step, self.signal, self.error = step, signal, error

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step != self.step:
            return
        if self.error == "oom":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total)")
        os.kill(os.getpid(), getattr(signal, self.signal))


class WrongInLastValidation(L.Callback):
    """In the last epoch's validation, the model gets every image wrong (its true class's logit is pushed to the
    bottom), so that epoch cannot be the best one; testing and the best checkpoint's re-validation stay untouched."""

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, *args) -> None:
        self.remove()
        if trainer.sanity_checking or trainer.current_epoch != trainer.max_epochs - 1:
            return
        labels = batch[1]

        def wrong(module, inputs, logits):
            return logits.scatter(1, labels.view(-1, 1), logits.min().item() - 100.0)

        self.handle = pl_module.network.register_forward_hook(wrong)

    def on_validation_epoch_end(self, *args) -> None:
        self.remove()

    def remove(self) -> None:
        if getattr(self, "handle", None) is not None:
            self.handle.remove()
            self.handle = None


class RecordLabels(L.Callback):
    """Appends the labels of every training batch to `path`, one line per batch (for the class-balance tests)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, *args) -> None:
        with open(self.path, "a") as file:
            file.write(" ".join(str(int(label)) for label in batch[1]) + "\n")
