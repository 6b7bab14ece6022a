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
