"""One table across the runs of a sweep, plus plots: `python -m finetune.report multirun/<date>/<time>`.

A sweep is what `python train.py -m strategy=transfer,finetune ...` writes: one folder per job (`0/`, `1/`, ...),
each with `.hydra/config.yaml`, `train.log`, `tensorboard/` and, once it has finished, `metrics.json`. The report
lists every job with its status (done, failed, incomplete), configuration and final metrics; runs whose
configurations differ only in `seed` are one point, aggregated as mean and standard deviation. It writes
`report.csv`, `report_by_point.csv`, `report.md` and three PNG plots into the sweep folder.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from finetune.errors import UsageError
from finetune.scan import STRONG_IMBALANCE

DONE, FAILED, INCOMPLETE = "done", "failed", "incomplete"
PLOTS = ("val_acc_per_epoch.png", "test_acc_vs_unfreeze.png", "acc_vs_trainable_params.png")

# Overrides already shown in their own column; any other override that differs between jobs is shown as `other`.
_COLUMN_KEYS = {"model", "model.name", "strategy", "strategy.name", "strategy.unfreeze", "unfreeze", "seed"}
# A line of train.log as Hydra's job logging writes it: `[time][logger][ERROR] - message`.
_ERROR_LINE = re.compile(r"\]\[ERROR\] - (.*)")
_TRACEBACK = "Traceback (most recent call last)"
# Other names a metric has had in metrics.json: reports read runs written by other versions too.
_ALIASES = {"time/train_images_per_second": ("train/images_per_second",)}


@dataclass
class RunRow:
    """One job of the sweep.

    Attributes:
        job: the job's folder name (its number in a sweep).
        path: the job's folder.
        status: "done" (metrics.json written), "failed" (an error in train.log) or "incomplete" (neither: still
            running, killed, or stopped without logging why).
        model, strategy, unfreeze, seed: from the job's composed configuration; None where it has none.
        other: the job's overrides that differ between jobs of the sweep, besides the columns above.
        metrics: metrics.json as written by the run; empty unless done.
        val_acc_curve: validation accuracy per epoch (epoch 0 first), from TensorBoard; partial runs have some.
        error: the failure's message, for a failed run.
        point: what identifies the run's point: its configuration without `seed`.
    """

    job: str
    path: Path
    status: str
    model: str | None = None
    strategy: str | None = None
    unfreeze: int | str | None = None
    seed: int | None = None
    other: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    val_acc_curve: list[float] = field(default_factory=list)
    error: str | None = None
    point: str = ""

    def get(self, key: str) -> float | None:
        """A metric of metrics.json (`test/acc`, `params/trainable`, ...), None if the run did not write it."""
        for name in (key, *_ALIASES.get(key, ())):
            if self.metrics.get(name) is not None:
                return self.metrics[name]
        return None

    @property
    def label(self) -> str:
        """model/strategy/unfreeze=N/seed=S, for legends."""
        return f"{_point_label(self.model, self.strategy, self.unfreeze, self.other)}/seed={self.seed}"


@dataclass
class PointRow:
    """The runs of one point: the same configuration with different seeds.

    Attributes:
        model, strategy, unfreeze, other: as in the runs.
        runs: every run of the point, finished or not.
    """

    model: str | None
    strategy: str | None
    unfreeze: int | str | None
    other: str
    runs: list[RunRow]

    @property
    def done(self) -> list[RunRow]:
        """The runs that finished (wrote metrics.json)."""
        return [run for run in self.runs if run.status == DONE]

    @property
    def n(self) -> int:
        """The number of finished runs, which the mean and standard deviation are over."""
        return len(self.done)

    @property
    def seeds(self) -> list[int | None]:
        """The seeds of the finished runs."""
        return [run.seed for run in self.done]

    @property
    def label(self) -> str:
        """model/strategy/unfreeze=N, and any other override that sets the point apart."""
        return _point_label(self.model, self.strategy, self.unfreeze, self.other)

    def values(self, key: str) -> list[float]:
        """A metric of every finished run that has it."""
        return [run.get(key) for run in self.done if run.get(key) is not None]

    def mean(self, key: str) -> float | None:
        """The mean of a metric over the finished runs that have it; None if none has."""
        values = self.values(key)
        return statistics.fmean(values) if values else None

    def std(self, key: str) -> float | None:
        """The sample standard deviation (n - 1) of a metric over the finished runs; None below two values."""
        values = self.values(key)
        return statistics.stdev(values) if len(values) > 1 else None


@dataclass
class Report:
    """The runs of a sweep and their points.

    Attributes:
        sweep_dir: the sweep folder (or the single run's folder).
        rows: one per job, sorted by model, strategy, unfreeze, seed.
        points: the aggregated rows, one per configuration without `seed`, in the same order.
    """

    sweep_dir: Path
    rows: list[RunRow]
    points: list[PointRow]

    @property
    def accuracy_key(self) -> str:
        """`test/acc` if any run has a test split, else `val/acc`: what the plots compare."""
        return "test/acc" if any(row.get("test/acc") is not None for row in self.rows) else "val/acc"

    def to_markdown(self) -> str:
        """The runs table, what went wrong in the others, and the points table where a point has several runs."""
        parts = [_markdown_table(_RUN_COLUMNS, self.rows)]
        problems = [_problem_line(row) for row in self.rows if row.status != DONE]
        if problems:
            parts.append("\n".join(problems))
        parts.extend(self._data_notes())
        if any(len(point.runs) > 1 for point in self.points):
            parts.append("Mean ± standard deviation over seeds, n finished runs per point:\n\n"
                         + _markdown_table(_POINT_COLUMNS, self.points))
        return "\n\n".join(parts)

    def _data_notes(self) -> list[str]:
        notes = []
        imbalanced = [row for row in self.rows if (row.get("data/imbalance") or 0) >= STRONG_IMBALANCE
                      and not row.get("data/balanced")]
        if imbalanced:
            worst = max(row.get("data/imbalance") for row in imbalanced)
            notes.append(f"Strong class imbalance in {len(imbalanced)} run(s): the largest training class has up to "
                         f"{worst:.1f}x the images of the smallest, so accuracy favours it. Compare F1 and the "
                         "per-class accuracy (TensorBoard), and consider data.balance=sampler or "
                         "data.balance=loss_weights.")
        skipped = [row for row in self.rows if row.get("data/skipped_files")]
        if skipped:
            notes.append(f"{int(max(row.get('data/skipped_files') for row in skipped))} unreadable image(s) were left "
                         f"out of {len(skipped)} run(s): see skipped_files.txt in the run folders.")
        return notes


def build_report(sweep_dir: Path) -> Report:
    """Reads every job of a sweep (or a single run folder) into one report.

    Args:
        sweep_dir: a sweep folder of `python train.py -m ...` (holding `0/`, `1/`, ...) or one run's folder.

    Raises:
        UsageError: the folder does not exist or holds no run.
    """
    rows = [read_run(path) for path in find_runs(Path(sweep_dir))]
    _set_other(rows)
    rows.sort(key=_row_order)
    points: dict[str, PointRow] = {}
    for row in rows:
        if row.point not in points:
            points[row.point] = PointRow(row.model, row.strategy, row.unfreeze, row.other, [])
        points[row.point].runs.append(row)
    return Report(Path(sweep_dir), rows, list(points.values()))


def write_report(report: Report, sweep_dir: Path, plots: bool = True) -> list[Path]:
    """Writes report.csv, report_by_point.csv, report.md and (with plots) the three PNGs into sweep_dir.

    Returns:
        The paths written.

    Raises:
        UsageError: sweep_dir cannot be written.
    """
    sweep_dir = Path(sweep_dir)
    written = [sweep_dir / "report.csv", sweep_dir / "report_by_point.csv", sweep_dir / "report.md"]
    try:
        _write_csv(written[0], _RUN_COLUMNS, report.rows)
        _write_csv(written[1], _POINT_CSV_COLUMNS, report.points)
        if plots:
            written += _write_plots(report, sweep_dir)
        images = "".join(f"\n\n![{path.stem}]({path.name})" for path in written[3:])
        written[2].write_text(f"# Sweep report: {report.sweep_dir}\n\n{report.to_markdown()}{images}\n")
    except OSError as error:
        raise UsageError(f"cannot write the report into {sweep_dir}: {error.strerror or error}") from error
    return written


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
        raise UsageError(f"{path} holds no runs (no sub-folder with .hydra/): pass the folder of a sweep, "
                         "multirun/<date>/<time>, written by `python train.py -m ...`")
    return sorted(runs, key=lambda run: _natural(run.name))


def newest_sweep(root: Path = Path("multirun")) -> Path:
    """The sweep under root (Hydra's sweep root) whose multirun.yaml was written last.

    Raises:
        UsageError: there is none.
    """
    sweeps = [path.parent for path in root.rglob("multirun.yaml")] if root.is_dir() else []
    if not sweeps:
        raise UsageError(f"no sweep under {root}/: pass SWEEP_DIR, or run one first, e.g. "
                         "`python train.py -m strategy=transfer,finetune`")
    return max(sweeps, key=lambda sweep: ((sweep / "multirun.yaml").stat().st_mtime, str(sweep)))


def read_run(path: Path) -> RunRow:
    """One run folder: its configuration, status, metrics and validation curve; never raises for missing files."""
    row = RunRow(job=path.name, path=path, status=INCOMPLETE, point=str(path))
    config = _load_yaml(path / ".hydra" / "config.yaml")
    if isinstance(config, DictConfig):
        row.model, row.strategy = _select(config, "model.name"), _select(config, "strategy.name")
        row.unfreeze, row.seed = _normalise_unfreeze(_select(config, "unfreeze")), _select(config, "seed")
        config.pop("seed", None)
        # Unresolved on purpose: `data.split_seed: ${seed}` stays the same text for every seed.
        row.point = OmegaConf.to_yaml(config)
    row.metrics = _read_metrics(path / "metrics.json")
    if row.metrics:
        row.status = DONE
    else:
        row.error = _logged_error(path / "train.log")
        row.status = FAILED if row.error else INCOMPLETE
    row.val_acc_curve = read_curve(path / "tensorboard", "val/acc")
    return row


def read_curve(folder: Path, tag: str) -> list[float]:
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


def _set_other(rows: list[RunRow]) -> None:
    """Sets each row's `other`: its overrides that not every job shares, besides model, strategy, unfreeze, seed."""
    overrides = {row.job: [item for item in _overrides(row.path) if _override_key(item) not in _COLUMN_KEYS]
                 for row in rows}
    # Jobs without an overrides.yaml (a broken folder) say nothing about what the others share.
    known = [set(items) for items in overrides.values() if items]
    shared = set.intersection(*known) if known else set()
    for row in rows:
        row.other = " ".join(sorted(item for item in overrides[row.job] if item not in shared))


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _natural(name: str) -> tuple:
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


def _unfreeze_order(value: int | str | None) -> tuple:
    # Deeper to the right: 0, 1, 2, ..., then all; anything else after.
    if isinstance(value, int):
        return (0, value, "")
    return (1, 0, "") if value == "all" else (2, 0, str(value))


def _row_order(row: RunRow) -> tuple:
    # Shallow to deep within a model: transfer, then fine-tuning, then everything, reads as the question does.
    return (row.model is None, row.model or "", _unfreeze_order(row.unfreeze), row.strategy is None,
            row.strategy or "", row.other, row.seed is None, row.seed or 0, _natural(row.job))


def _point_label(model: str | None, strategy: str | None, unfreeze: int | str | None, other: str) -> str:
    label = f"{model}/{strategy}/unfreeze={unfreeze}"
    return f"{label} {other}" if other else label


def _problem_line(row: RunRow) -> str:
    if row.status == FAILED:
        return f"- job {row.job} ({row.label}) failed: {row.error}"
    return (f"- job {row.job} ({row.label}) is incomplete: no metrics.json and no error in train.log "
            "(still running, killed, or stopped without logging why)")


# The tables.

@dataclass(frozen=True)
class _Column:
    """One column: its header in the text tables, its name in the CSV, its value and how to show it."""

    header: str
    csv: str
    value: Callable[[object], object]
    shown: Callable[[object], str] = str
    numeric: bool = False
    in_text: bool = True  # False: CSV only
    optional: bool = False  # left out of the text tables when empty in every row


def _accuracy(value: object) -> str:
    return f"{value:.4f}"


def _count(value: object) -> str:
    return f"{int(value):,}"


def _one_decimal(value: object) -> str:
    return f"{value:.1f}"


def _metric(header: str, csv_name: str, key: str, shown: Callable[[object], str] = _accuracy,
            in_text: bool = True) -> _Column:
    return _Column(header, csv_name, lambda row: row.get(key), shown, numeric=True, in_text=in_text)


_RUN_COLUMNS = (
    _Column("job", "job", lambda row: row.job),
    _Column("status", "status", lambda row: row.status),
    _Column("model", "model", lambda row: row.model),
    _Column("strategy", "strategy", lambda row: row.strategy),
    _Column("unfreeze", "unfreeze", lambda row: row.unfreeze),
    _Column("seed", "seed", lambda row: row.seed),
    _Column("other", "other", lambda row: row.other, optional=True),
    _metric("trainable params", "trainable_params", "params/trainable", _count),
    _metric("total params", "total_params", "params/total", _count, in_text=False),
    _metric("train acc", "train_acc", "train/acc"),
    _metric("val acc", "val_acc", "val/acc"),
    _metric("val F1", "val_f1", "val/f1", in_text=False),
    _metric("test acc", "test_acc", "test/acc"),
    _metric("test F1", "test_f1", "test/f1"),
    _metric("best epoch", "best_epoch", "best_epoch", _count),
    _metric("epochs", "epochs", "epochs", _count, in_text=False),
    _metric("fit s", "fit_seconds", "time/fit_seconds", _one_decimal),
    _metric("images/s", "images_per_second", "time/train_images_per_second", _one_decimal),
    _Column("error", "error", lambda row: row.error, in_text=False),
)

# What the points table aggregates: (header, CSV name, metric, format).
_AGGREGATED = (
    ("train acc", "train_acc", "train/acc", _accuracy),
    ("val acc", "val_acc", "val/acc", _accuracy),
    ("test acc", "test_acc", "test/acc", _accuracy),
    ("test F1", "test_f1", "test/f1", _accuracy),
    ("fit s", "fit_seconds", "time/fit_seconds", _one_decimal),
    ("images/s", "images_per_second", "time/train_images_per_second", _one_decimal),
)


def _trainable(point: PointRow) -> float | None:
    return next((run.get("params/trainable") for run in point.runs if run.get("params/trainable") is not None), None)


def _mean_std(key: str, shown: Callable[[object], str]) -> Callable[[PointRow], str | None]:
    def value(point: PointRow) -> str | None:
        mean, std = point.mean(key), point.std(key)
        if mean is None:
            return None
        return shown(mean) if std is None else f"{shown(mean)} ± {shown(std)}"
    return value


_POINT_KEY_COLUMNS = (
    _Column("model", "model", lambda point: point.model),
    _Column("strategy", "strategy", lambda point: point.strategy),
    _Column("unfreeze", "unfreeze", lambda point: point.unfreeze),
    _Column("other", "other", lambda point: point.other, optional=True),
    _Column("n", "n", lambda point: point.n, numeric=True),
)
_POINT_COLUMNS = (
    *_POINT_KEY_COLUMNS,
    _Column("seeds", "seeds", lambda point: " ".join(str(seed) for seed in point.seeds)),
    _Column("trainable params", "trainable_params", _trainable, _count, numeric=True),
    *(_Column(header, csv_name, _mean_std(key, shown), numeric=True) for header, csv_name, key, shown in _AGGREGATED),
)
_POINT_CSV_COLUMNS = (
    *_POINT_KEY_COLUMNS,
    _Column("runs", "runs", lambda point: len(point.runs)),
    _Column("seeds", "seeds", lambda point: " ".join(str(seed) for seed in point.seeds)),
    _Column("trainable params", "trainable_params", _trainable),
    *(column for _, csv_name, key, _ in _AGGREGATED for column in (
        _Column(csv_name, f"{csv_name}_mean", lambda point, key=key: point.mean(key)),
        _Column(csv_name, f"{csv_name}_std", lambda point, key=key: point.std(key)))),
)


def _cell(column: _Column, item: object) -> str:
    value = column.value(item)
    return "" if value is None or value == "" else column.shown(value)


def _markdown_table(columns: Iterable[_Column], items: list) -> str:
    """A Markdown table padded to line up in a terminal too; numbers right-aligned."""
    columns = [column for column in columns if column.in_text
               and not (column.optional and all(column.value(item) in (None, "") for item in items))]
    cells = [[_cell(column, item) for column in columns] for item in items]
    widths = [max([len(column.header), 3, *(len(row[i]) for row in cells)]) for i, column in enumerate(columns)]

    def line(values: list[str]) -> str:
        padded = [value.rjust(width) if column.numeric else value.ljust(width)
                  for value, width, column in zip(values, widths, columns, strict=True)]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(("-" * (width + 1) + ":") if column.numeric else "-" * (width + 2)
                          for width, column in zip(widths, columns, strict=True)) + "|"
    return "\n".join([line([column.header for column in columns]), rule, *(line(row) for row in cells)])


def _write_csv(path: Path, columns: Iterable[_Column], items: list) -> None:
    columns = list(columns)
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow([column.csv for column in columns])
        for item in items:
            writer.writerow(["" if (value := column.value(item)) is None else value for column in columns])


# The plots. Figures are made without pyplot: no global backend is switched (a notebook keeps its own), and
# Figure.savefig renders PNGs with Agg.

def _write_plots(report: Report, sweep_dir: Path) -> list[Path]:
    paths = []
    for name, draw in zip(PLOTS, (_plot_curves, _plot_acc_vs_unfreeze, _plot_acc_vs_params), strict=True):
        figure = Figure(figsize=(8, 5), layout="constrained")
        draw(report, figure.subplots())
        figure.savefig(sweep_dir / name, dpi=120)
        paths.append(sweep_dir / name)
    return paths


def _no_data(axes: Axes, what: str) -> None:
    axes.text(0.5, 0.5, f"no {what} yet", ha="center", va="center", transform=axes.transAxes)


def _accuracy_name(key: str) -> str:
    return "test accuracy" if key == "test/acc" else "validation accuracy (no test split)"


def _plot_curves(report: Report, axes: Axes) -> None:
    """Validation accuracy per epoch, one line per run; the seeds of one point share a colour, not a line style."""
    styles = {run.job: (f"C{index % 10}", ("-", "--", ":", "-.")[number % 4])
              for index, point in enumerate(report.points) for number, run in enumerate(point.runs)}
    runs = [row for row in report.rows if row.val_acc_curve]
    for row in runs:
        colour, linestyle = styles[row.job]
        axes.plot(range(len(row.val_acc_curve)), row.val_acc_curve, marker="o", color=colour, linestyle=linestyle,
                  label=f"{row.label} ({row.status})" if row.status != DONE else row.label)
    if not runs:
        _no_data(axes, "validation curves")
    else:
        axes.legend(fontsize="x-small", ncols=1 + len(runs) // 16)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set(title="Validation accuracy per epoch", xlabel="epoch (0 = first)", ylabel="val/acc")
    axes.grid(alpha=0.3)


def _plot_acc_vs_unfreeze(report: Report, axes: Axes) -> None:
    """Accuracy against unfreeze depth, one line per model, `all` rightmost; error bars: std over seeds."""
    key = report.accuracy_key
    points = [point for point in report.points if point.mean(key) is not None
              and (isinstance(point.unfreeze, int) or point.unfreeze == "all")]
    depths = sorted({point.unfreeze for point in points if isinstance(point.unfreeze, int)})
    all_at = depths[-1] + 1 if depths else 0

    def x_of(unfreeze: int | str) -> int:
        return all_at if unfreeze == "all" else unfreeze

    lines: dict[str, list[PointRow]] = {}
    for point in points:
        lines.setdefault(f"{point.model} {point.other}".strip(), []).append(point)
    for label, members in lines.items():
        members.sort(key=lambda point: (x_of(point.unfreeze), point.strategy or ""))
        xs = [x_of(point.unfreeze) for point in members]
        ys = [point.mean(key) for point in members]
        errors = [point.std(key) or 0.0 for point in members]
        axes.errorbar(xs, ys, yerr=errors if any(errors) else None, marker="o", capsize=4, label=label)
        for x, y, point in zip(xs, ys, members, strict=True):
            axes.annotate(point.strategy or "", (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    if not points:
        _no_data(axes, "finished runs")
    else:
        ticks = depths + (["all"] if any(point.unfreeze == "all" for point in points) else [])
        axes.set_xticks([x_of(tick) for tick in ticks], [str(tick) for tick in ticks])
        axes.legend(fontsize="small")
    axes.set(title=f"{_accuracy_name(key).capitalize()} vs unfreeze depth", xlabel="unfreeze (blocks trained)",
             ylabel=key)
    axes.grid(alpha=0.3)


def _plot_acc_vs_params(report: Report, axes: Axes) -> None:
    """Accuracy against trainable parameters (log scale), one colour per model; error bars: std over seeds."""
    key = report.accuracy_key
    points = [point for point in report.points if point.mean(key) is not None and (_trainable(point) or 0) > 0]
    by_model: dict[str | None, list[PointRow]] = {}
    for point in points:
        by_model.setdefault(point.model, []).append(point)
    for model, members in by_model.items():
        xs = [_trainable(point) for point in members]
        ys = [point.mean(key) for point in members]
        errors = [point.std(key) or 0.0 for point in members]
        axes.errorbar(xs, ys, yerr=errors if any(errors) else None, marker="o", linestyle="none", capsize=4,
                      label=str(model))
        for x, y, point in zip(xs, ys, members, strict=True):
            axes.annotate(f"{point.strategy} ({point.unfreeze})", (x, y), textcoords="offset points",
                          xytext=(5, 5), fontsize=8)
    if not points:
        _no_data(axes, "finished runs")
    else:
        axes.set_xscale("log")
        axes.legend(fontsize="small")
    axes.set(title=f"{_accuracy_name(key).capitalize()} vs trainable parameters",
             xlabel="trainable parameters (log scale)", ylabel=key)
    axes.grid(alpha=0.3, which="both")


def main(argv: list[str] | None = None) -> int:
    """`python -m finetune.report [SWEEP_DIR] [--no-plots]`: prints the report and writes it into SWEEP_DIR."""
    parser = argparse.ArgumentParser(
        prog="python -m finetune.report",
        description="One table across the runs of a sweep (python train.py -m ...), plus plots, written into it.")
    parser.add_argument("sweep_dir", nargs="?", type=Path, metavar="SWEEP_DIR",
                        help="a sweep folder (multirun/<date>/<time>) or one run's folder; "
                             "default: the newest sweep under multirun/")
    parser.add_argument("--no-plots", action="store_true", help="write the tables only")
    args = parser.parse_args(argv)
    try:
        sweep_dir = args.sweep_dir
        if sweep_dir is None:
            sweep_dir = newest_sweep()
            print(f"the newest sweep under multirun/: {sweep_dir}")
        report = build_report(sweep_dir)
        written = write_report(report, sweep_dir, plots=not args.no_plots)
    except UsageError as error:
        # A problem the user can fix: one line, exit code 2, no traceback.
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(report.to_markdown())
    print("\nwritten: " + ", ".join(str(path) for path in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
