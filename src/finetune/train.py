"""One training run from a composed Hydra config: data, model, trainer; fit; evaluate the best checkpoint."""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from finetune.data import ImageFolderDataModule
from finetune.module import ImageClassifier

log = logging.getLogger(__name__)

# Frozen blocks are in eval mode on purpose (BatchNorm statistics and dropout stay as pretrained).
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")


def run(cfg: DictConfig) -> dict[str, float]:
    """Trains, picks the best checkpoint by `val/acc`, tests it, and writes `metrics.json` to the run dir.

    Returns:
        The final metrics: `val/*` and `test/*` of the best checkpoint, its epoch, parameter counts, fit time.
    """
    output_dir = Path(cfg.paths.output_dir)
    L.seed_everything(cfg.seed, workers=True)

    datamodule: ImageFolderDataModule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.save_split(output_dir / "split.csv")

    model: ImageClassifier = instantiate(cfg.model, class_names=datamodule.class_names)
    datamodule.preprocessing = model.preprocessing
    log.info("model: %s", model.describe())

    callbacks = [instantiate(callback) for callback in cfg.callbacks.values()]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=instantiate(cfg.logger))
    started = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    fit_seconds = time.perf_counter() - started

    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if best:
        log.info("best checkpoint: %s", best)
    else:
        log.info("no checkpoint was saved (checkpointing is off in this run): evaluating the final weights")
    metrics = _evaluate(cfg, trainer, model, datamodule, best or None)
    trainable, total = model.parameter_counts()
    metrics.update({"params/trainable": trainable, "params/total": total, "time/fit_seconds": fit_seconds})
    if best:
        metrics["best_epoch"] = torch.load(best, map_location="cpu", weights_only=True, mmap=True)["epoch"]

    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    log.info("final metrics (%s):\n%s", output_dir / "metrics.json", format_table(metrics))
    return metrics


def _evaluate(cfg: DictConfig, trainer: L.Trainer, model: ImageClassifier, datamodule: ImageFolderDataModule,
              checkpoint: str | None) -> dict[str, float]:
    # The best checkpoint's validation scores come from a trainer without a logger, so TensorBoard's val/*
    # curves keep one point per epoch; its test scores go to TensorBoard.
    evaluator: L.Trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False,
                                       enable_progress_bar=False, enable_model_summary=False)
    results = evaluator.validate(model, datamodule=datamodule, ckpt_path=checkpoint, weights_only=True,
                                 verbose=False)[0]
    if datamodule.has_test:
        results |= trainer.test(model, datamodule=datamodule, ckpt_path=checkpoint, weights_only=True,
                                verbose=False)[0]
    else:
        log.info("no test split (train/ and val/ folders without test/): test metrics are not computed")
    return {name: float(value) for name, value in results.items()}


def format_table(metrics: dict[str, float]) -> str:
    """The metrics as a two-column text table."""
    width = max(len(name) for name in metrics)
    lines = []
    for name in sorted(metrics):
        value = metrics[name]
        shown = f"{value:,}" if isinstance(value, int) else f"{value:.4f}"
        lines.append(f"  {name:<{width}}  {shown:>12}")
    return "\n".join(lines)
