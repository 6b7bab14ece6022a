"""A sweep read into one report: every run with its status and metrics, runs grouped into points (the same
configuration with different seeds or test folds), and the study's statistics and verdict over the points.

`build_report` is what `python -m finetune.report` and the notebooks call; `finetune.study.analysis` computes the
intervals and comparisons, `finetune.study.verdict` puts them into words, `finetune.study.tables` writes them out.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

from finetune.data.scan import STRONG_IMBALANCE
from finetune.study.analysis import analyse
from finetune.study.leakage import leakage_notes
from finetune.study.points import point_label, unfreeze_order
from finetune.study.runs import DONE, FAILED, RunRow, _overrides, find_runs, natural_order, not_started, read_run
from finetune.study.tables import report_markdown
from finetune.study.verdict import judge

# Overrides already shown in their own column; any other override that differs between jobs is shown as `other`.
_COLUMN_KEYS = {
    "model",
    "model.name",
    "strategy",
    "strategy.name",
    "strategy.unfreeze",
    "unfreeze",
    "seed",
    "data.fold",
}


@dataclass
class PointRow:
    """The runs of one point: the same configuration with different seeds or test folds.

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
        return point_label(self.model, self.strategy, self.unfreeze, self.other)

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
        rows: one per job, sorted by model, strategy, unfreeze, seed, fold.
        points: the aggregated rows, one per configuration without `seed` and `data.fold`, in the same order.
        not_started: the sweep's planned jobs (multirun.yaml) with no folder yet, as their overrides.
        study: intervals, comparisons (`finetune.study.analysis`) and the verdict (`finetune.study.verdict`),
            set by `build_report`.
    """

    sweep_dir: Path
    rows: list[RunRow]
    points: list[PointRow]
    not_started: list[str] = field(default_factory=list)
    study: object = None

    @property
    def accuracy_key(self) -> str:
        """`test/acc` if any run has a test split, else `val/acc`: what the plots compare."""
        return "test/acc" if any(row.get("test/acc") is not None for row in self.rows) else "val/acc"

    def to_markdown(self) -> str:
        """The verdict and the study's tables (where there is a study), the runs table, what went wrong in the
        others, and the points table where a point has several runs."""
        return report_markdown(self)

    def problems(self) -> list[str]:
        """One line per run that did not finish, and per planned run not started."""
        lines = [_problem_line(row) for row in self.rows if row.status != DONE]
        # Planned jobs that differ only in their last override share a line: "unfreeze=2 data.fold=0,1,2,3,4".
        grouped: dict[str, list[str]] = {}
        for overrides in self.not_started:
            head, _, last = overrides.rpartition(" ")
            key, _, value = last.partition("=")
            grouped.setdefault(f"{head} {key}".strip(), []).append(value)
        return lines + [f"- {key}={','.join(values)}: not started" for key, values in grouped.items()]

    def data_notes(self) -> list[str]:
        """Warnings about the data: strong class imbalance, unreadable images left out, leakage between splits."""
        notes = []
        imbalanced = [
            row
            for row in self.rows
            if (row.get("data/imbalance") or 0) >= STRONG_IMBALANCE and not row.get("data/balanced")
        ]
        if imbalanced:
            worst = max(row.get("data/imbalance") for row in imbalanced)
            notes.append(
                f"Strong class imbalance in {len(imbalanced)} run(s): the largest training class has up to "
                f"{worst:.1f}x the images of the smallest, so accuracy favours it. Compare F1 and the "
                "per-class accuracy (TensorBoard), and consider data.balance=sampler or "
                "data.balance=loss_weights."
            )
        skipped = [row for row in self.rows if row.get("data/skipped_files")]
        if skipped:
            notes.append(
                f"{int(max(row.get('data/skipped_files') for row in skipped))} unreadable image(s) were left "
                f"out of {len(skipped)} run(s): see skipped_files.txt in the run folders."
            )
        return notes + leakage_notes(self.rows)


def build_report(sweep_dir: Path) -> Report:
    """Reads every job of a sweep (or a single run folder) into one report.

    Args:
        sweep_dir: a sweep folder of `python train.py -m ...` (holding `0/`, `1/`, ...) or one run's folder.

    Raises:
        UsageError: the folder does not exist or holds no run.
    """
    runs = find_runs(Path(sweep_dir))
    rows = [read_run(path) for path in runs]
    _set_other(rows)
    rows.sort(key=_row_order)
    points: dict[str, PointRow] = {}
    for row in rows:
        if row.point not in points:
            points[row.point] = PointRow(row.model, row.strategy, row.unfreeze, row.other, [])
        points[row.point].runs.append(row)
    report = Report(Path(sweep_dir), rows, list(points.values()), not_started(Path(sweep_dir), runs))
    report.study = judge(analyse(report))
    return report


def _set_other(rows: list[RunRow]) -> None:
    """Sets each row's `other`: its overrides that not every job shares, besides model, strategy, unfreeze, seed."""
    overrides = {
        row.job: [item for item in _overrides(row.path) if _override_key(item) not in _COLUMN_KEYS] for row in rows
    }
    # Jobs without an overrides.yaml (a broken folder) say nothing about what the others share.
    known = [set(items) for items in overrides.values() if items]
    shared = set.intersection(*known) if known else set()
    for row in rows:
        row.other = " ".join(sorted(item for item in overrides[row.job] if item not in shared))


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _row_order(row: RunRow) -> tuple:
    # Shallow to deep within a model: transfer, then fine-tuning, then everything, reads as the question does.
    return (
        row.model is None,
        row.model or "",
        unfreeze_order(row.unfreeze),
        row.strategy is None,
        row.strategy or "",
        row.other,
        row.seed is None,
        row.seed or 0,
        row.fold or 0,
        natural_order(row.job),
    )


def _problem_line(row: RunRow) -> str:
    if row.status == FAILED:
        return f"- job {row.job} ({row.label}) failed: {row.error}"
    return (
        f"- job {row.job} ({row.label}) is incomplete: no metrics.json and no error in train.log "
        "(still running, killed, or stopped without logging why)"
    )
