"""What a run prints: the final table (the scores a user reads; metrics.json keeps everything), the network's
summary, and Lightning's messages, each once and without the ones that tell the user nothing."""

from __future__ import annotations

import logging

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.utilities.model_summary import get_human_readable_count, summarize

log = logging.getLogger(__name__)

# The final table: the best checkpoint's validation and test scores, and the test scores of each class.
SHOWN_PREFIXES = ("val/", "test/", "test_tta/")
PER_CLASS = "_class/"


def quiet_trainer(trainer_config, callbacks=(), **overrides) -> L.Trainer:
    """The run's Trainer for a side job (the best checkpoint's re-check, a rate probe): no logger, checkpoint,
    progress bar or summary of its own; `overrides` on top (e.g. max_epochs)."""
    return instantiate(
        trainer_config,
        logger=False,
        callbacks=list(callbacks),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **overrides,
    )


def shown_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics the final table shows: `val/*`, `test/*` and `test_tta/*` scores, per class for test only."""
    return {
        name: value
        for name, value in metrics.items()
        if name.startswith(SHOWN_PREFIXES) and (PER_CLASS not in name or name.startswith("test/"))
    }


def format_table(metrics: dict[str, float]) -> str:
    """The metrics `shown_metrics` picks, as a two-column text table."""
    shown = shown_metrics(metrics)
    width = max((len(name) for name in shown), default=0)
    lines = []
    # Validation, then test, then test per class.
    for name in sorted(shown, key=lambda name: (name.startswith("test"), PER_CLASS in name, name)):
        value = shown[name]
        text = f"{value:,}" if isinstance(value, int) else f"{value:.4f}"
        lines.append(f"  {name:<{width}}  {text:>12}")
    return "\n".join(lines)


class NetworkSummary(ModelSummary):
    """Lightning's model summary, of the network alone: the loss and metric modules of the LightningModule hold no
    parameters, and no FLOPs are counted (the module has no `example_input_array`), so neither is shown.

    Args:
        max_depth: the depth of the network's layers listed (1: the network; 2: its children, ...; 0: off).
    """

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._max_depth or not trainer.is_global_zero:
            return
        summary = summarize(pl_module, max_depth=self._max_depth + 1)  # + 1: the network is one level down
        rows = [
            (name, kind, get_human_readable_count(count), "train" if training else "eval")
            for name, kind, count, training in zip(
                summary.layer_names, summary.layer_types, summary.param_nums, summary.training_modes, strict=True
            )
            if name == "network" or name.startswith("network.")
        ]
        header = ("Name", "Type", "Params", "Mode")
        widths = [max(len(row[column]) for row in (header, *rows)) for column in range(len(header))]
        lines = [
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in (header, *rows)
        ]
        trainable, total = summary.trainable_parameters, summary.total_parameters
        count = get_human_readable_count
        lines.append(
            f"trainable params {count(trainable)}, frozen {count(total - trainable)}, total {count(total)} "
            f"({summary.model_size:.1f} MB)"
        )
        log.info("the network:\n%s", "\n".join(lines))


# Lightning's messages shown once per process (they reach the console only: train.log has the run's own).
ONCE = (
    "Restoring states from the checkpoint",
    "Loaded model weights from the checkpoint",
    "GPU available:",
    "TPU available:",
    "HPU available:",
)


class _LightningNoise(logging.Filter):
    """Drops Lightning info lines that tell the user nothing, and repeats.

    - its "Tip: ... litlogger" advertisement (every fit);
    - the note that the model's own callbacks (`configure_callbacks`) replace those of the fit when the same Trainer
      tests the best checkpoint (as intended);
    - the note that `NetworkSummary` replaces its default summary;
    - a repeat of a message `ONCE` names: the best checkpoint is restored by the validation and again by the test
      (the message names the checkpoint, so every run shows its own), and the evaluation's Trainer reports the
      same devices as the fit's (the machine is the same for every run of a sweep).
    """

    def __init__(self) -> None:
        super().__init__()
        self.shown: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if (
            "litlogger" in message
            or "will override existing callbacks passed to Trainer" in message
            or "Skipping setting a default `ModelSummary` callback" in message
            or message in self.shown
        ):
            return False
        if message.startswith(ONCE):
            self.shown.add(message)
        return True


def quiet_lightning() -> None:
    """Installs the filter of Lightning's info messages (rank_zero_info's loggers); once per process."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(existing, _LightningNoise) for existing in logger.filters):
            logger.addFilter(_LightningNoise())
