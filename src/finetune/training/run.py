"""One training run from a composed Hydra config: data, model, trainer; fit; evaluate the best checkpoint."""

from __future__ import annotations

import json
import logging
import shlex
import sys
import time
import warnings
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf

from finetune.allocator import keep_freed_memory
from finetune.config.schema import check_resolved
from finetune.data.datamodule import ImageFolderDataModule
from finetune.errors import UsageError
from finetune.features.store import SharedFeatures
from finetune.model.freezing import describe
from finetune.model.module import ImageClassifier
from finetune.model.precision import choose_precision
from finetune.training.callbacks import FindLearningRate, ImagesSeen
from finetune.training.console import format_table, quiet_lightning, quiet_trainer
from finetune.training.convergence import choose_rate
from finetune.training.loggers import instantiate_loggers, log_hyperparameters
from finetune.training.run_dir import SaveOnInterrupt, resume_from
from finetune.training.scaling import check_distributed

log = logging.getLogger(__name__)

# What `monitor` may name: validation scores where higher is better (ModelCheckpoint and EarlyStopping use mode max).
MONITORS = ("val/acc", "val/f1", "val/balanced_acc")

# Frozen blocks are in eval mode on purpose (BatchNorm statistics and dropout stay as pretrained).
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
# The evaluation trainer restores only weights from the best checkpoint: it needs none of the fit's callbacks.
warnings.filterwarnings("ignore", message=r"Be aware that when using `ckpt_path`, callbacks used")
# Lightning 2.6 builds its batch trees with torch's deprecated LeafSpec(): a FutureWarning about Lightning's code.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)


quiet_lightning()


def run(cfg: DictConfig, feature_store: SharedFeatures | None = None) -> dict[str, float]:
    """Trains, picks the best checkpoint by `monitor` (val/acc by default), tests it, writes `metrics.json`.

    Under DDP every process runs this function (Lightning starts the others at `trainer.fit`, or the cluster
    starts them all); each computes the same metrics, and process 0 alone writes files.

    Args:
        cfg: the composed configuration (conf/train.yaml); read, never changed.
        feature_store: cached features kept between the runs of one process (a sweep's folds and seeds), owned
            by the caller that runs them; None: this run's features are its own.

    Returns:
        The final metrics: `val/*` and `test/*` of the best checkpoint, its epoch, parameter counts, fit time.
    """
    output_dir = Path(cfg.paths.output_dir)
    # Mistakes that would stop the run later stop it now, before any work.
    if OmegaConf.is_missing(cfg.model, "name"):  # model=timm and model=torchvision name no architecture
        example = "convnext_nano" if cfg.model.source == "timm" else "densenet121"
        raise UsageError(
            f"model={cfg.model.source} needs the architecture: add model.name=<name>, e.g. "
            f"model={cfg.model.source} model.name={example} (docs/architectures.md lists them)"
        )
    if cfg.get("monitor", "val/acc") not in MONITORS:
        raise UsageError(f"monitor={cfg.monitor}: choose one of {', '.join(MONITORS)} (the best checkpoint's score)")
    resume = resume_from(cfg.ckpt_path, output_dir)
    check_resolved(cfg)  # the types themselves Hydra checked while composing (finetune.config.schema)
    keep_freed_memory()  # steps reuse the memory the last step freed, instead of the kernel zeroing it again
    L.seed_everything(cfg.seed, workers=True)

    datamodule: ImageFolderDataModule = instantiate(cfg.data, feature_store=feature_store)
    datamodule.prepare_data()  # the same split in every process: a function of the files and data.split_seed
    build_model = partial(
        instantiate, cfg.model, class_names=datamodule.class_names, class_weights=datamodule.loss_weights()
    )
    # trainer.precision=auto: bf16-mixed where the CPU has bf16 and a timed step of this model pays for it.
    precision = choose_precision(cfg.trainer, build_model, datamodule, resume)
    log.info("precision: %s", precision.line)
    # rate_search: this run's pretrained layers' rate
    rate, rate_facts = choose_rate(cfg, datamodule, build_model, precision.precision)
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # the model starts as it would without the search
    model: ImageClassifier = build_model(**rate)
    log.info("model: %s", describe(model))
    callbacks = [instantiate(callback) for callback in cfg.callbacks.values()]
    if cfg.tune.lr_find:  # Lightning's range test at fit start, on the data the fit serves (cached features too)
        callbacks.append(FindLearningRate(cfg.tune.num_training, output_dir / "lr_find.png"))
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers, precision=precision.precision)
    check_distributed(trainer, datamodule.splits, sync_batchnorm=bool(cfg.trainer.get("sync_batchnorm")))
    status = "failed"
    try:
        started = time.perf_counter()
        with memory_hint(cfg):
            fit(trainer, model, datamodule, resume, output_dir)
        fit_seconds = time.perf_counter() - started
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if best:
            log.info("best checkpoint: %s", best)
        else:
            log.info("no checkpoint was saved (checkpointing is off in this run): evaluating the final weights")
        last_epoch = {
            name: float(value) for name, value in trainer.callback_metrics.items() if name.startswith("train/")
        }
        with memory_hint(cfg):
            metrics = _evaluate(cfg, trainer, model, datamodule, best or None) | last_epoch
        metrics |= run_facts(trainer, model, datamodule, fit_seconds, best) | rate_facts | precision.facts()
        if trainer.is_global_zero:
            log_hyperparameters(trainer.loggers, cfg, model, metrics)
            (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
            log.info("final metrics (%s):\n%s", output_dir / "metrics.json", format_table(metrics))
        status = "success"
    finally:
        for logger in trainer.loggers:  # a failed run is marked so where the logger records it (MLflow)
            logger.finalize(status)
    return metrics


def run_facts(
    trainer: L.Trainer, model: ImageClassifier, datamodule: ImageFolderDataModule, fit_seconds: float, best: str
) -> dict[str, float]:
    """What the metrics file records besides scores: parameters, data, epochs, time, throughput, and the learning
    rates the finder chose (`lr_find/lr`, `lr_find/backbone_lr`)."""
    # Under DDP, the images every process trained on.
    seen = sum(callback.images for callback in trainer.callbacks if isinstance(callback, ImagesSeen))
    images_seen = float(
        trainer.strategy.reduce(torch.tensor(float(seen), device=trainer.strategy.root_device), reduce_op="sum")
    )
    trainable, total = model.parameter_counts()
    facts = {
        "params/trainable": trainable,
        "params/total": total,
        "data/skipped_files": len(datamodule.skipped),
        # What the report's leakage notes read: groups the split kept together, near-duplicates across splits.
        "data/groups": datamodule.leakage.group_count,
        "data/cross_split_duplicates": datamodule.leakage.crossing(datamodule.splits),
        "data/imbalance": datamodule.imbalance,
        "data/balanced": float(datamodule.balance is not None),
        # The augmentation regime the study reports (finetune.study.regime): the views of each training image
        # served from the feature cache (K augmented ones, or the plain one), 0 where the fit trained on images.
        "data/cached_views": datamodule.datasets["train"].views if datamodule.serves_features else 0,
        "epochs": trainer.current_epoch,
        "time/fit_seconds": fit_seconds,
        # Over the whole fit, validation included: what a user waits for, per training image.
        "time/train_images_per_second": images_seen / fit_seconds,
    }
    if best:
        facts["best_epoch"] = torch.load(best, map_location="cpu", weights_only=True, mmap=True)["epoch"]
    if trainer.world_size > 1:
        facts["processes"] = trainer.world_size
    if datamodule.feature_pass is not None:  # the frozen part's precision, where its features were cached
        facts |= datamodule.feature_pass.facts("precision/feature_pass_")
    for callback in trainer.callbacks:  # the rates the learning-rate finder chose, which trained
        if isinstance(callback, FindLearningRate):
            facts |= callback.chosen
    return facts


def _evaluate(
    cfg: DictConfig,
    trainer: L.Trainer,
    model: ImageClassifier,
    datamodule: ImageFolderDataModule,
    checkpoint: str | None,
) -> dict[str, float]:
    # The best checkpoint's validation scores come from a trainer without a logger, so TensorBoard's val/*
    # curves keep one point per epoch; its test scores go to TensorBoard.
    evaluator = quiet_trainer(cfg.trainer, precision=trainer.precision)
    results = evaluator.validate(model, datamodule=datamodule, ckpt_path=checkpoint, weights_only=True, verbose=False)[
        0
    ]
    if datamodule.has_test:
        results |= trainer.test(model, datamodule=datamodule, ckpt_path=checkpoint, weights_only=True, verbose=False)[0]
    else:
        log.info("no test split (train/ and val/ folders without test/): test metrics are not computed")
    return {name: float(value) for name, value in results.items()}


def fit(
    trainer: L.Trainer, model: ImageClassifier, datamodule: ImageFolderDataModule, resume: str | None, output_dir: Path
) -> None:
    """`trainer.fit`; after Ctrl-C or SIGTERM, says where training was saved and how to resume, and exits."""
    try:
        # weights_only: a checkpoint holds tensors and plain values; nothing in it may run code (torch >= 2.6).
        trainer.fit(model, datamodule=datamodule, ckpt_path=resume, weights_only=True)
    except MisconfigurationException as error:
        # Lightning refuses a checkpoint whose epoch is past max_epochs, before anything trains.
        if "You restored a checkpoint with current_epoch" not in str(error):
            raise
        epoch = str(error).split("current_epoch=")[1].split(",")[0]
        raise UsageError(
            f"ckpt_path={resume} was saved at epoch {epoch} (counted from 0), past trainer.max_epochs="
            f"{trainer.max_epochs}: resume with a larger trainer.max_epochs (the run's own, or more)"
        ) from error
    except SystemExit:  # how Lightning ends a fit on Ctrl-C (after its callbacks) and SIGTERM
        saver = next((c for c in trainer.callbacks if isinstance(c, SaveOnInterrupt)), None)
        if saver is None or saver.signal is None:
            raise
        if saver.saved is None:
            log.warning("%s before training started: nothing to save", saver.signal)
        else:
            log.warning(
                "%s: training state saved in %s; resume with: python train.py %s",
                saver.signal,
                saver.saved,
                resume_command(output_dir),
            )
        sys.exit(130 if saver.signal == "Ctrl-C" else 143)  # the shell's codes for SIGINT and SIGTERM


def resume_command(output_dir: Path) -> str:
    """The overrides that resume this run where it stopped (Hydra's record of this run's, plus two)."""
    from hydra.core.hydra_config import HydraConfig

    overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith(("ckpt_path=", "hydra.run.dir="))]
    return " ".join(
        [*(shlex.quote(o) for o in overrides), shlex.quote(f"hydra.run.dir={output_dir}"), "ckpt_path=last"]
    )


@contextmanager
def memory_hint(cfg: DictConfig):
    """Turns an out-of-memory error into one line naming the settings that lower memory use."""
    try:
        yield
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as error:
        text = str(error)
        if not isinstance(error, torch.OutOfMemoryError | MemoryError) and "can't allocate memory" not in text:
            raise
        where = "GPU" if isinstance(error, torch.OutOfMemoryError) else "CPU"
        size = cfg.data.image_size or "null (the weights' size)"
        bf16 = where == "GPU" and "bf16" not in str(cfg.trainer.precision)
        raise UsageError(
            f"out of {where} memory with data.batch_size={cfg.data.batch_size}, data.image_size={size}, "
            f"unfreeze={cfg.unfreeze}: lower data.batch_size first, then data.image_size or unfreeze"
            f"{', or use trainer.precision=bf16-mixed' if bf16 else ''}; the checkpoints saved so far are in "
            f"{cfg.paths.output_dir}/checkpoints"
        ) from error
