"""Reading a sweep's run folders: each job's configuration, status, metrics, curves and split sizes.

`finetune.report` builds the report from these; nothing here raises for a missing or half-written file (a running
or killed job is reported as it stands), only for a folder that is not a sweep or a run.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from finetune.errors import UsageError
from finetune.study.points import point_label
from finetune.study.regime import Regime, run_regime

DONE, FAILED, INCOMPLETE = "done", "failed", "incomplete"
# Files a run's callbacks write beside metrics.json, merged into its metrics (convergence.json: epochs used and
# whether the run stopped on its own; test_latency.json: inference milliseconds per image).
_EXTRA_METRICS = ("convergence.json", "test_latency.json")
# A line of train.log as Hydra's job logging writes it: `[time][logger][ERROR] - message`.
_ERROR_LINE = re.compile(r"\]\[ERROR\] - (.*)")
_TRACEBACK = "Traceback (most recent call last)"


@dataclass
class RunRow:
    """One job of the sweep.

    Attributes:
        job: the job's folder name (its number in a sweep).
        path: the job's folder.
        status: "done" (metrics.json written), "failed" (an error in train.log) or "incomplete" (neither: still
            running, killed, or stopped without logging why).
        model, strategy, unfreeze, seed: from the job's composed configuration; None where it has none.
        fold, folds: the test fold and the number of folds of a k-fold run (data.fold, data.folds); None otherwise.
        other: the job's overrides that differ between jobs of the sweep, besides the columns above.
        metrics: metrics.json as written by the run; empty unless done.
        val_acc_curve: validation accuracy per epoch (epoch 0 first), from TensorBoard or the CSV logger; partial
            runs have some.
        error: the failure's message, for a failed run.
        point: what identifies the run's point: its configuration without `seed` and `data.fold`.
        split_sizes: images per split (train, val, test) from the run's split.csv.
        regime: the training-time augmentation it was configured with (`finetune.study.regime`); None where its
            configuration does not say.
    """

    job: str
    path: Path
    status: str
    model: str | None = None
    strategy: str | None = None
    unfreeze: int | str | None = None
    seed: int | None = None
    fold: int | None = None
    folds: int | None = None
    other: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    val_acc_curve: list[float] = field(default_factory=list)
    error: str | None = None
    point: str = ""
    split_sizes: dict[str, int] = field(default_factory=dict)
    regime: Regime | None = None

    def get(self, key: str) -> float | None:
        """A metric of metrics.json (`test/acc`, `params/trainable`, ...), None if the run did not write it."""
        value = self.metrics.get(key)
        return value if isinstance(value, int | float) else None

    @property
    def rate(self) -> str | None:
        """The pretrained layers' rate the run chose (`rate_search`): "0.1x" the head's, or "decay 0.7"; or None."""
        if self.get("rate/backbone_factor") is None:
            return None
        decay = self.get("rate/layer_decay")
        return f"decay {decay:g}" if decay else f"{self.get('rate/backbone_factor'):g}x"

    @property
    def label(self) -> str:
        """model/strategy/unfreeze=N/seed=S (and /fold=F), for legends."""
        fold = f"/fold={self.fold}" if self.fold is not None else ""
        return f"{point_label(self.model, self.strategy, self.unfreeze, self.other)}/seed={self.seed}{fold}"


def find_runs(path: Path) -> list[Path]:
    """The run folders of a sweep (sub-folders with `.hydra/`), or [path] if path is a run folder itself.

    Raises:
        UsageError: path is not a folder, or holds no run.
    """
    if not path.is_dir():
        raise UsageError(f"{path} is not a folder: pass a sweep folder (multirun/<date>/<time>) or a run folder")
    if (path / ".hydra").is_dir():
        return [path]
    runs = [child for child in path.iterdir() if (child / ".hydra").is_dir()]
    if not runs:
        raise UsageError(
            f"{path} holds no runs (no sub-folder with .hydra/): pass the folder of a sweep, "
            "multirun/<date>/<time>, written by `python train.py -m ...`"
        )
    return sorted(runs, key=lambda run: natural_order(run.name))


def newest_sweep(root: Path = Path("multirun")) -> Path:
    """The sweep under root (Hydra's sweep root) whose multirun.yaml was written last.

    Raises:
        UsageError: there is none.
    """
    sweeps = [path.parent for path in root.rglob("multirun.yaml")] if root.is_dir() else []
    if not sweeps:
        raise UsageError(
            f"no sweep under {root}/: pass SWEEP_DIR, or run one first, e.g. "
            "`python train.py -m strategy=transfer,finetune`"
        )
    return max(sweeps, key=lambda sweep: ((sweep / "multirun.yaml").stat().st_mtime, str(sweep)))


def not_started(sweep_dir: Path, runs: list[Path]) -> list[str]:
    """The jobs a sweep plans (its multirun.yaml: the sweeper's parameters and the command line's sweeps) that have
    no run folder yet, each as its overrides ("data.fold=3 unfreeze=all"); [] if the plan cannot be read."""
    from itertools import product

    from hydra.core.override_parser.overrides_parser import OverridesParser

    config = _load_yaml(sweep_dir / "multirun.yaml")
    # Only Hydra's basic sweeper runs a planned grid; others (Optuna) choose their trials as they go.
    if not isinstance(config, DictConfig) or "BasicSweeper" not in str(
        OmegaConf.select(config, "hydra.sweeper._target_", default="BasicSweeper")
    ):
        return []
    params = dict(OmegaConf.select(config, "hydra.sweeper.params", default=None) or {})
    for item in OmegaConf.select(config, "hydra.overrides.task", default=None) or []:
        key, _, value = str(item).partition("=")
        params[key] = value
    try:
        parsed = OverridesParser.create().parse_overrides([f"{key}={value}" for key, value in params.items()])
        swept = [(o.key_or_group, list(o.sweep_string_iterator())) for o in parsed if o.is_sweep_override()]
    except Exception:  # a sweeper with its own syntax (optuna): no plan to compare with
        return []
    if not swept:
        return []
    started = {frozenset(_overrides(run)) for run in runs}
    planned = [[f"{key}={value}" for value in values] for key, values in swept]
    return [
        " ".join(combination)
        for combination in product(*planned)
        if not any(set(combination) <= done for done in started)
    ]


def read_run(path: Path) -> RunRow:
    """One run folder: its configuration, status, metrics and validation curve; never raises for missing files."""
    row = RunRow(job=path.name, path=path, status=INCOMPLETE, point=str(path))
    config = _load_yaml(path / ".hydra" / "config.yaml")
    if isinstance(config, DictConfig):
        row.model, row.strategy = _select(config, "model.name"), _select(config, "strategy.name")
        row.unfreeze, row.seed = _normalise_unfreeze(_select(config, "unfreeze")), _select(config, "seed")
        row.folds = _select(config, "data.folds")
        row.fold = _select(config, "data.fold") if row.folds else None
        row.regime = run_regime(config)
        config.pop("seed", None)
        if row.folds:
            config.data.pop("fold", None)
        # Unresolved on purpose: `data.split_seed: ${seed}` stays the same text for every seed.
        row.point = OmegaConf.to_yaml(config)
    row.metrics = _read_metrics(path / "metrics.json")
    if row.metrics:
        row.status = DONE
        for name in _EXTRA_METRICS:
            row.metrics |= {key: value for key, value in _read_metrics(path / name).items() if key not in row.metrics}
        row.split_sizes = _split_sizes(path / "split.csv")
    else:
        row.error = _logged_error(path / "train.log")
        row.status = FAILED if row.error else INCOMPLETE
    row.val_acc_curve = read_curve(path, "val/acc")
    return row


def read_curve(run: Path, tag: str) -> list[float]:
    """A scalar logged once per epoch, in epoch order, from the run's TensorBoard events (`tensorboard/`) or its
    CSV log (`csv/metrics.csv`), whichever it has; [] if neither has it."""
    curve = _tensorboard_curve(run / "tensorboard", tag)
    return curve or _csv_curve(run / "csv" / "metrics.csv", tag)


def _csv_curve(path: Path, tag: str) -> list[float]:
    """The tag per epoch from Lightning's CSVLogger file (one row per logging call, empty cells elsewhere)."""
    try:
        with open(path, newline="") as file:
            rows = list(csv.DictReader(file))
    except (OSError, csv.Error):
        return []
    by_epoch = {}
    for row in rows:
        try:
            value, epoch = float(row.get(tag) or "nan"), int(float(row.get("epoch") or "nan"))
        except ValueError:
            continue
        if value == value:  # not NaN: this row logged the tag
            by_epoch[epoch] = value
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def _split_sizes(path: Path) -> dict[str, int]:
    sizes: dict[str, int] = {}
    try:
        with open(path, newline="", encoding="utf-8") as file:
            for row in csv.DictReader(file):
                sizes[row["split"]] = sizes.get(row["split"], 0) + 1
    except (OSError, KeyError, csv.Error):
        return {}
    return sizes


def _tensorboard_curve(folder: Path, tag: str) -> list[float]:
    """A scalar logged once per epoch, in step order, from every events file in folder; [] if there is none."""
    if not any(folder.glob("events.out.tfevents.*")):
        return []
    # Imported here: TensorBoard's event reader is slow to import and only needed when there are events.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    try:
        events = EventAccumulator(str(folder), size_guidance={"scalars": 0}).Reload()
        if tag not in events.Tags()["scalars"]:
            return []
        # Keyed by step: a step written twice (a resumed run) counts once, with its latest value.
        by_step = {event.step: event.value for event in events.Scalars(tag)}
    except Exception:  # a killed run can leave a truncated events file: no curve, no crash
        return []
    return [by_step[step] for step in sorted(by_step)]


def _load_yaml(path: Path) -> object:
    try:
        return OmegaConf.load(path)
    except (OSError, OmegaConfBaseException, ValueError):
        return None


def _select(config: DictConfig, key: str) -> object:
    # Only the keys read are resolved: others hold Hydra's resolvers (${hydra:...}), unknown outside Hydra.
    try:
        return OmegaConf.select(config, key, throw_on_resolution_failure=False)
    except OmegaConfBaseException:
        return None


def _normalise_unfreeze(value: object) -> int | str | None:
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    if value is None or isinstance(value, int | str):
        return value
    return str(value)  # some other form (a list, a schedule): shown as written


def _read_metrics(path: Path) -> dict[str, float]:
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError):  # not written yet, or being written
        return {}
    return metrics if isinstance(metrics, dict) else {}


def _logged_error(path: Path) -> str | None:
    """The last ERROR line of train.log, or the last line of a traceback in it; None if neither."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    # train.py logs "error: <what>"; the report says "failed: <what>".
    errors = [match.group(1).strip().removeprefix("error: ") for line in lines if (match := _ERROR_LINE.search(line))]
    if errors:
        return errors[-1]
    if any(_TRACEBACK in line for line in lines):
        return next(line.strip() for line in reversed(lines) if line.strip())
    return None


def _overrides(path: Path) -> list[str]:
    overrides = _load_yaml(path / ".hydra" / "overrides.yaml")
    return [str(item) for item in overrides] if overrides is not None and OmegaConf.is_list(overrides) else []


def natural_order(name: str) -> tuple:
    return (0, int(name), "") if name.isdigit() else (1, 0, name)
