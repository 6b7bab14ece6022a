"""An exponential moving average (EMA) of the weights: what is validated, checkpointed, tested and exported.

Lightning's `EMAWeightAveraging` keeps the average in a copy of the module, updated after every optimizer step. It
swaps the averaged weights in for each validation epoch (so `val/*`, and the checkpoint chosen on them, are the
average's), writes them as the checkpoint's `state_dict` (the training weights go to `current_model_state`, for a
resume), and copies them into the module when training ends. Predict, evaluate and export read `state_dict`: they
get the average.

One difference from Lightning's own: loading a checkpoint outside fitting (the test of the best checkpoint after
training, `trainer.test(ckpt_path=...)`) keeps the averaged weights. Lightning's callback restores
`current_model_state` whenever its average exists, which after a fit would test the raw training weights.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks.weight_averaging import EMAWeightAveraging
from lightning.pytorch.trainer.states import TrainerFn

from finetune.errors import UsageError


class EMA(EMAWeightAveraging):
    """EMA of every parameter and buffer, updated after each optimizer step.

    Args:
        decay: the weight the average keeps at each update; it averages over about 1 / (1 - decay) steps. 0.99
            (about 100 steps) suits short fine-tuning runs: ELPV's 1,700 training images make 54 steps an epoch,
            so 0.999 would still hold a third of the starting weights after 10 epochs.
        update_starting_at_step: optimizer steps before the average starts (it starts as a copy of the weights).
    """

    def __init__(self, decay: float = 0.99, update_starting_at_step: int | None = None) -> None:
        if not 0 < decay < 1:
            raise UsageError(f"callbacks.ema.decay={decay} must be between 0 and 1 (e.g. 0.99: about 100 steps)")
        super().__init__(decay=decay, update_starting_at_step=update_starting_at_step)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            return  # the checkpoint's state_dict, already loaded, holds the averaged weights: test those
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
