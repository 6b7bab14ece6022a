"""Training each point to its own convergence: early stopping that records how many epochs a run used.

A study that gives every depth the same epoch count favours whichever converges faster: a head on cached features
needs many cheap epochs, a fine-tuned network fewer expensive ones. `experiment=depth_study` therefore trains every
point until the validation loss has not improved for `patience` epochs (under a generous `trainer.max_epochs`),
and this callback writes `convergence.json` into the run folder, which the report shows next to the accuracy.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import EarlyStopping


class StopWhenConverged(EarlyStopping):
    """Lightning's `EarlyStopping`, plus `convergence.json`: epochs used, whether it stopped on its own.

    Args:
        dirpath: the run folder (`${paths.output_dir}`).
        **kwargs: `EarlyStopping`'s (monitor, patience, min_delta, mode, ...).
    """

    def __init__(self, dirpath: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.dirpath = Path(dirpath)

    def on_fit_end(self, trainer: L.Trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        best = float(self.best_score)
        record = {
            "epochs/used": trainer.current_epoch,
            "epochs/max": trainer.max_epochs,
            # Stopped because the monitored value stopped improving, not at the cap (or by an interrupt).
            "epochs/converged": float(bool(self.stopped_epoch)),
            "epochs/patience": self.patience,
            "epochs/monitor": self.monitor,
            "epochs/best_monitored": best if math.isfinite(best) else None,
        }
        (self.dirpath / "convergence.json").write_text(json.dumps(record, indent=2) + "\n")
