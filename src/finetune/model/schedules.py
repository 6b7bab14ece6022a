"""The cosine learning-rate schedule, whose length travels with the checkpoint so a resumed run decays as an
uninterrupted one does."""

from __future__ import annotations

import math

import lightning as L
import torch

SCHEDULERS = ("cosine", "plateau", "constant")


class WarmupCosine:
    """The cosine schedule's factor at each optimizer step: a linear warmup, then a cosine decay to zero.

    A callable object rather than a closure, so `LambdaLR.state_dict()` saves its length with the checkpoint and a
    resumed run decays over the same number of steps as the uninterrupted one.

    Args:
        warmup_epochs: length of the linear warmup, in epochs (fractions allowed).
    """

    def __init__(self, warmup_epochs: float = 0.0) -> None:
        self.warmup_epochs = warmup_epochs
        self.total_steps: int | None = None  # known once the training loader is (set_length)
        self.warmup_steps = 0

    def set_length(self, total_steps: float, max_epochs: int | None, scheduler) -> None:
        """Fixes the length (unless a resumed run restored it) and sets every group's learning rate for the
        scheduler's current step, which `LambdaLR` computed before the length was known."""
        if self.total_steps is None:
            self.total_steps = max(1, int(total_steps))
            self.warmup_steps = int(self.warmup_epochs * self.total_steps / max(1, max_epochs or 1))
        scheduler._last_lr = []
        for group, base_lr in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, strict=True):
            group["lr"] = base_lr * self(scheduler.last_epoch)
            scheduler._last_lr.append(group["lr"])

    def __call__(self, step: int) -> float:
        if self.total_steps is None:
            return 1.0  # before set_length: replaced before the first step
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class FixScheduleLength(L.Callback):
    """Gives a `WarmupCosine` schedule its length when training starts.

    Not in `configure_optimizers`: there `trainer.estimated_stepping_batches` builds the training loader before a
    resumed run's loop state is restored, which starts the loader at epoch 0, keeps it from loading its saved place,
    and fires `on_train_start` too early. Under the learning-rate finder its own scheduler stands in for ours, and
    nothing is done.
    """

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for config in trainer.lr_scheduler_configs:
            cosine = getattr(config.scheduler, "lr_lambdas", [None])[0]
            if isinstance(cosine, WarmupCosine):
                cosine.set_length(trainer.estimated_stepping_batches, trainer.max_epochs, config.scheduler)


def lr_scheduler(optimizer: torch.optim.Optimizer, name: str, warmup_epochs: float = 0.0) -> dict | None:
    """Lightning's scheduler configuration for `name` (one of SCHEDULERS); None for "constant".

    "cosine": per step, a linear warmup then a cosine decay to zero (`WarmupCosine`); "plateau": the rate divided by
    10 when val/loss has not fallen for 2 epochs.
    """
    if name == "constant":
        return None
    if name == "plateau":
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.1, patience=2)
        return {"scheduler": plateau, "monitor": "val/loss", "interval": "epoch"}
    # The length is set when training starts (FixScheduleLength), not here: a resumed run's loop state is not
    # restored yet, and `estimated_stepping_batches` would build its loader at epoch 0.
    return {"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup_epochs)), "interval": "step"}
