"""Each point of a study at its best: trained to its own convergence, at its own learning rate.

A study that gives every depth the same epoch count favours whichever converges faster: a head on cached features
needs many cheap epochs, a fine-tuned network fewer expensive ones. `experiment=depth_study` therefore trains every
point until the validation loss has not improved for `patience` epochs (under a generous `trainer.max_epochs`),
and `StopWhenConverged` writes `convergence.json` into the run folder, which the report shows next to the accuracy.

One learning rate for every depth favours the depths it suits: 2 blocks and 17 need not want the same. With
`rate_search` (on in the depth studies), `choose_rate` gives each run the pretrained layers' rate that does best on
that run's own validation split, from a small grid (shares of the head's rate, and layer-wise decay), each candidate
trained for a few epochs from the same start. The test split is never read, so a fold's choice cannot see the images
it is scored on.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import EarlyStopping
from omegaconf import DictConfig

from finetune.features.cache import should_cache
from finetune.training.console import quiet_trainer

log = logging.getLogger(__name__)


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


def choose_rate(
    cfg: DictConfig, datamodule, build_model: Callable[..., L.LightningModule], precision: str | int | None
) -> tuple[dict, dict]:
    """The pretrained layers' learning rate for this run, chosen on its validation split (`rate_search`).

    Every candidate of the grid trains a model built by `build_model` from the same seed for a few epochs on the
    training split; the one with the lowest validation loss wins. Off (no overrides) when `rate_search` is null,
    for strategies other than plain fine-tuning (`finetune`, `full`), and where only the head trains.

    Args:
        cfg: the run's configuration (`rate_search`, `strategy`, `trainer`, `seed`).
        datamodule: the run's DataModule, prepared; its features are cached once and shared by the candidates.
        build_model: makes the run's model, given overrides of `backbone_lr` and `layer_decay`.
        precision: the run's training precision (`finetune.model.precision.choose_precision`).

    Returns:
        The model overrides to train with, and what metrics.json records of the choice (`rate/*`).
    """
    search = cfg.get("rate_search")
    if not search or cfg.strategy.name not in ("finetune", "full") or str(cfg.unfreeze) == "0":
        return {}, {}
    lr = cfg.strategy.lr
    candidates = {f"{factor:g}x": {"backbone_lr": lr * factor, "layer_decay": None} for factor in search.factors}
    if str(cfg.unfreeze) != "1" or 1.0 not in search.factors:
        # Layer decay keeps the last block at the head's rate: with one pretrained block to train, that is 1x again.
        candidates |= {f"decay {d:g}": {"backbone_lr": None, "layer_decay": d} for d in search.layer_decays}
    started, losses = time.perf_counter(), {}
    epochs = None
    for label, overrides in candidates.items():
        L.seed_everything(cfg.seed, workers=True, verbose=False)  # every candidate from the same start and batches
        model = build_model(**overrides)
        if epochs is None:  # the candidates differ in rates only: one cut decides for all
            cut = should_cache(datamodule.cache_features, model, datamodule, datamodule.cache_views)[0]
            epochs = search.probe_epochs if cut is not None else search.probe_epochs_uncached
        lowest = _LowestValidationLoss()
        trainer = quiet_trainer(cfg.trainer, [lowest], max_epochs=epochs, num_sanity_val_steps=0, precision=precision)
        trainer.fit(model, datamodule=datamodule)  # the training and validation splits only
        losses[label] = lowest.value
    chosen = min(losses, key=losses.get)
    log.info(
        "pretrained layers' rate, chosen on the validation split: %s (val/loss %s)",
        chosen,
        ", ".join(f"{label} {loss:.4f}" for label, loss in losses.items()),
    )
    overrides = candidates[chosen]
    facts = {
        "rate/backbone_factor": (overrides["backbone_lr"] or lr) / lr,
        "rate/layer_decay": overrides["layer_decay"] or 0.0,
        "rate/search_seconds": time.perf_counter() - started,
    }
    return overrides, facts | {f"rate/val_loss/{label}": loss for label, loss in losses.items()}


class _LowestValidationLoss(L.Callback):
    """The lowest `val/loss` over a fit's epochs (read after each validation, once the module has logged it)."""

    def __init__(self) -> None:
        self.value = math.inf

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        if not trainer.sanity_checking and "val/loss" in trainer.callback_metrics:
            self.value = min(self.value, float(trainer.callback_metrics["val/loss"]))
