"""Loggers chosen by config (`logger=tensorboard`, `logger=csv`, `logger=mlflow`, `logger=wandb`, or several at once:
`logger=[tensorboard,csv]`), and the hyperparameters each one records, with the best checkpoint's metrics."""

from __future__ import annotations

import importlib.util
import logging
import os

from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from omegaconf import DictConfig

from finetune.errors import UsageError

log = logging.getLogger(__name__)

# The metrics runs are compared by (TensorBoard's HPARAMS tab shows five by default: these five).
HPARAM_METRICS = ("val/acc", "val/f1", "val/loss", "test/acc", "test/f1")

# The optional extras a logger needs: its option name in conf/logger -> (module, pyproject extra).
EXTRAS = {"mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb")}


class WandbLogger(LightningWandbLogger):
    """Lightning's W&B logger, with a W&B run of its own for every run: Lightning's would carry on logging into
    the W&B run still open in the process (a sweep runs its jobs one after another in one process)."""

    @property
    def experiment(self):
        import wandb

        if self._experiment is None and wandb.run is not None:
            wandb.finish()  # the previous run's: finished, its offline files complete
        return super().experiment


def instantiate_loggers(config: DictConfig | None) -> list[Logger]:
    """Every logger of the `logger` group selection (each option holds one `name: {_target_: ...}` entry)."""
    if not config:
        return []
    for name, (module, extra) in EXTRAS.items():
        if name in config and importlib.util.find_spec(module) is None:
            raise UsageError(f"logger={name} needs the {module} package: pip install -e '.[{extra}]'")
    entries = [entry for entry in config.values() if entry and "_target_" in entry]
    if any(str(entry.get("tracking_uri", "")).startswith("file:") for entry in entries):
        # A file store in the run dir, as configured: MLflow 3 asks for this opt-in (it favours a database).
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return [instantiate(entry) for entry in entries]


def hyperparameters(cfg: DictConfig, model) -> dict:
    """What tells runs apart: strategy, depth, seed, model, trainable parameters, and every key set on the command
    line (in a sweep: what it varies). Few, so that TensorBoard's HPARAMS tab, which ticks only the first five
    (alphabetically), shows the ones that matter; the whole configuration is in the run's .hydra/config.yaml."""
    params = {
        "model": cfg.model.name,
        "strategy": cfg.strategy.name,
        "unfreeze": str(cfg.unfreeze),
        "seed": cfg.seed,
        "trainable_params": model.parameter_counts()[0],
    }
    if cfg.tune.lr_find:  # the rate the finder chose, which trained (not the one it replaced)
        params["lr"] = model.hparams.lr
    for override in _command_line_overrides():
        key, _, value = override.lstrip("+~").partition("=")
        if key not in ("unfreeze", "seed", "strategy", "model") and not key.startswith(("hydra.", "paths.")):
            params.setdefault(key, _number_or_text(value))
    return params


def log_hyperparameters(loggers: list[Logger], cfg: DictConfig, model, metrics: dict[str, float]) -> None:
    """Records the run's hyperparameters with the best checkpoint's metrics, in each logger, by its public API.

    TensorBoard: a session of its own, `<run>/tensorboard/hparams`, holding the metrics once: logging them beside
    the curves would add a point to each (or make TensorBoard discard the curve, as a step going back in time).
    CSV: `hparams.yaml`. MLflow: parameters, and the metrics as `best/<name>`. W&B: the run's config, and the
    metrics as `best/<name>` in its summary (what its runs table compares).
    """
    params = hyperparameters(cfg, model)
    chosen = {name: metrics[name] for name in HPARAM_METRICS if name in metrics}
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            session = TensorBoardLogger(save_dir=logger.log_dir, name="", version="hparams", default_hp_metric=False)
            session.log_hyperparams(params, chosen)
            session.finalize("success")
        elif isinstance(logger, MLFlowLogger):
            logger.log_hyperparams(params)
            logger.log_metrics({f"best/{name}": value for name, value in chosen.items()})
        elif isinstance(logger, LightningWandbLogger):
            logger.log_hyperparams(params)
            logger.experiment.summary.update({f"best/{name}": value for name, value in chosen.items()})
        elif isinstance(logger, CSVLogger):
            logger.log_hyperparams(params)
            logger.save()
        else:
            logger.log_hyperparams(params)


def _command_line_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _number_or_text(value: str) -> float | str:
    try:
        return float(value)
    except ValueError:
        return value
