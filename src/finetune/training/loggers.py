"""Loggers chosen by config (`logger=tensorboard`, `logger=csv`, `logger=mlflow`, `logger=wandb`, or several at once:
`logger=[tensorboard,csv]`), and the hyperparameters each one records, with the best checkpoint's metrics."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard.summary import hparams

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
    """What tells runs apart, for TensorBoard's HPARAMS tab (which ticks five columns, those that differ between
    runs first) and the other loggers; the whole configuration is in the run's .hydra/config.yaml.

    In a sweep: the keys it varies (read from the sweep's multirun.yaml) and the trainable parameters; constant keys
    are left out, so that what the sweep compares is what the tab shows. A single run: strategy, depth, seed, model,
    trainable parameters, and every key set on the command line.
    """
    swept = _swept_keys()
    params = (
        {}
        if swept is not None
        else {
            "model": cfg.model.name,
            "strategy": cfg.strategy.name,
            "unfreeze": str(cfg.unfreeze),
            "seed": cfg.seed,
        }
    )
    params["trainable_params"] = model.parameter_counts()[0]
    if cfg.tune.lr_find:  # the rate the finder chose, which trained (not the one it replaced)
        params["lr"] = model.hparams.lr
    for override in _command_line_overrides():
        key, _, value = override.lstrip("+~").partition("=")
        if key.startswith(("hydra.", "paths.")) or (swept is not None and key not in swept):
            continue
        params.setdefault(key, value if key in ("unfreeze", "strategy", "model") else _number_or_text(value))
    return params


def log_hyperparameters(loggers: list[Logger], cfg: DictConfig, model, metrics: dict[str, float]) -> None:
    """Records the run's hyperparameters with the best checkpoint's metrics, in each logger, by its public API.

    TensorBoard: the run's session (hyperparameters) beside its curves, so each run is one entry of the run list,
    and the best checkpoint's metrics as `best/<name>` scalars of one point each (new tags: the curves keep one point
    per epoch; sorted first, they are the five metric columns the tab shows). No experiment summary is written:
    TensorBoard then builds it from all the runs' sessions and marks the hyperparameters that differ.
    CSV: `hparams.yaml`. MLflow: parameters, and the metrics as `best/<name>`. W&B: the run's config, and the
    metrics as `best/<name>` in its summary (what its runs table compares).
    """
    params = hyperparameters(cfg, model)
    chosen = {name: metrics[name] for name in HPARAM_METRICS if name in metrics}
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            _tensorboard_session(logger, params, chosen)
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


def _tensorboard_session(logger: TensorBoardLogger, params: dict, metrics: dict[str, float]) -> None:
    logger.log_hyperparams(params)  # hparams.yaml (Lightning writes no events without metrics)
    # torch's summary gives the experiment, session-start and session-end records; the experiment is left out.
    _, session_start, session_end = hparams(params, {f"best/{name}": value for name, value in metrics.items()})
    writer = logger.experiment
    events = writer._get_file_writer()  # reopened after the fit closed it (as Lightning's log_hyperparams does)
    events.add_summary(session_start)
    events.add_summary(session_end)
    for name, value in metrics.items():
        writer.add_scalar(f"best/{name}", value, global_step=0)
    writer.flush()


def _swept_keys() -> set[str] | None:
    """The keys the current Hydra sweep varies (its multirun.yaml: command line and sweeper params); None outside a
    sweep, or where the sweep left no record."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    record = Path(HydraConfig.get().sweep.dir) / "multirun.yaml"
    if not record.is_file():
        return None
    sweep = OmegaConf.load(record).hydra
    given = [*sweep.overrides.task, *(f"{key}={value}" for key, value in (sweep.sweeper.get("params") or {}).items())]
    try:
        overrides = OverridesParser.create().parse_overrides(given)
    except OverrideParseException:  # a sweeper's own syntax: the single run's keys then
        return None
    return {override.key_or_group for override in overrides if override.is_sweep_override()}


def _command_line_overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _number_or_text(value: str) -> float | str:
    try:
        return float(value)
    except ValueError:
        return value
