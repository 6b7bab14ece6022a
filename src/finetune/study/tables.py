"""The report's tables: the verdict's points and comparisons, every run, every point; as Markdown and CSV."""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from finetune.study.stats import Estimate
from finetune.study.verdict import interval_text, points_text


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


def _metric(
    header: str, csv_name: str, key: str, shown: Callable[[object], str] = _accuracy, in_text: bool = True
) -> _Column:
    return _Column(header, csv_name, lambda row: row.get(key), shown, numeric=True, in_text=in_text)


def _rates(stats) -> str:
    labels = [run.rate for run in stats.point.done]
    return " ".join(label or "-" for label in labels) if any(labels) else ""


_RUN_COLUMNS = (
    _Column("job", "job", lambda row: row.job),
    _Column("status", "status", lambda row: row.status),
    _Column("model", "model", lambda row: row.model),
    _Column("strategy", "strategy", lambda row: row.strategy),
    _Column("unfreeze", "unfreeze", lambda row: row.unfreeze),
    _Column("seed", "seed", lambda row: row.seed),
    _Column("fold", "fold", lambda row: row.fold, optional=True),
    _Column("other", "other", lambda row: row.other, optional=True),
    _Column("rate", "rate", lambda row: row.rate, optional=True),
    _metric("trainable params", "trainable_params", "params/trainable", _count),
    _metric("total params", "total_params", "params/total", _count, in_text=False),
    _metric("train acc", "train_acc", "train/acc"),
    _metric("val acc", "val_acc", "val/acc"),
    _metric("val F1", "val_f1", "val/f1", in_text=False),
    _metric("test acc", "test_acc", "test/acc"),
    _metric("test F1", "test_f1", "test/f1"),
    _metric("best epoch", "best_epoch", "best_epoch", _count),
    _metric("epochs", "epochs", "epochs", _count, in_text=False),
    _metric("converged", "converged", "epochs/converged", lambda v: "yes" if v else "no (cap)"),
    _metric("fit s", "fit_seconds", "time/fit_seconds", _one_decimal),
    _metric("images/s", "images_per_second", "time/train_images_per_second", _one_decimal),
    _metric("ms/image", "inference_ms_per_image", "time/inference_ms_per_image", _one_decimal, in_text=False),
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
    ("epochs", "epochs_used", "epochs/used", _one_decimal),
    ("ms/image", "inference_ms_per_image", "time/inference_ms_per_image", _one_decimal),
)


def trainable_params(point) -> float | None:
    return next((run.get("params/trainable") for run in point.runs if run.get("params/trainable") is not None), None)


def _mean_std(key: str, shown: Callable[[object], str]) -> Callable[[object], str | None]:
    def value(point) -> str | None:
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
    _Column("trainable params", "trainable_params", trainable_params, _count, numeric=True),
    *(_Column(header, csv_name, _mean_std(key, shown), numeric=True) for header, csv_name, key, shown in _AGGREGATED),
)
_POINT_CSV_COLUMNS = (
    *_POINT_KEY_COLUMNS,
    _Column("runs", "runs", lambda point: len(point.runs)),
    _Column("seeds", "seeds", lambda point: " ".join(str(seed) for seed in point.seeds)),
    _Column("trainable params", "trainable_params", trainable_params),
    *(
        column
        for _, csv_name, key, _ in _AGGREGATED
        for column in (
            _Column(csv_name, f"{csv_name}_mean", lambda point, key=key: point.mean(key)),
            _Column(csv_name, f"{csv_name}_std", lambda point, key=key: point.std(key)),
        )
    ),
)


def _cell(column: _Column, item: object) -> str:
    value = column.value(item)
    return "" if value is None or value == "" else column.shown(value)


def markdown_table(columns: Iterable[_Column], items: list) -> str:
    """A Markdown table padded to line up in a terminal too; numbers right-aligned."""
    columns = [
        column
        for column in columns
        if column.in_text and not (column.optional and all(column.value(item) in (None, "") for item in items))
    ]
    cells = [[_cell(column, item) for column in columns] for item in items]
    widths = [max([len(column.header), 3, *(len(row[i]) for row in cells)]) for i, column in enumerate(columns)]

    def line(values: list[str]) -> str:
        padded = [
            value.rjust(width) if column.numeric else value.ljust(width)
            for value, width, column in zip(values, widths, columns, strict=True)
        ]
        return "| " + " | ".join(padded) + " |"

    rule = (
        "|"
        + "|".join(
            ("-" * (width + 1) + ":") if column.numeric else "-" * (width + 2)
            for width, column in zip(widths, columns, strict=True)
        )
        + "|"
    )
    return "\n".join([line([column.header for column in columns]), rule, *(line(row) for row in cells)])


def _write_csv(path: Path, columns: Iterable[_Column], items: list) -> None:
    columns = list(columns)
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow([column.csv for column in columns])
        for item in items:
            writer.writerow(["" if (value := column.value(item)) is None else value for column in columns])


# The study's tables: one row per point with its interval and cost, one per paired comparison.


def _percent(estimate: Estimate | None) -> str:
    if estimate is None:
        return ""
    if not math.isfinite(estimate.low):
        return f"{100 * estimate.mean:.1f} (no interval)"
    return f"{100 * estimate.mean:.1f} ({100 * estimate.low:.1f} to {100 * estimate.high:.1f})"


def _p_value(value: object) -> str:
    return f"{value:.3g}"


def _converged(stats) -> str:
    flags = [run.get("epochs/converged") for run in stats.point.done if run.get("epochs/converged") is not None]
    return f"{int(sum(flags))}/{len(flags)}" if flags else ""


def _mean(key: str, shown: Callable[[object], str]) -> Callable[[object], str | None]:
    return lambda stats: None if stats.point.mean(key) is None else shown(stats.point.mean(key))


STUDY_COLUMNS = (
    _Column("point", "point", lambda s: s.name),
    _Column("n", "n", lambda s: s.acc.n, numeric=True),
    _Column("accuracy % (95% CI)", "accuracy", lambda s: _percent(s.acc), numeric=True),
    _Column("macro-F1 % (95% CI)", "macro_f1", lambda s: _percent(s.f1), numeric=True),
    _Column("epochs", "epochs", _mean("epochs/used", _one_decimal), numeric=True),
    _Column("converged", "converged", _converged, numeric=True),
    _Column("rate by run", "rates", _rates, optional=True),
    _Column("rate search s", "rate_search_seconds", _mean("rate/search_seconds", _one_decimal), optional=True),
    _Column("train s", "fit_seconds", _mean("time/fit_seconds", _one_decimal), numeric=True),
    _Column("trainable params", "trainable_params", lambda s: trainable_params(s.point), _count, numeric=True),
    _Column("train img/s", "images_per_second", _mean("time/train_images_per_second", _one_decimal), numeric=True),
    _Column("inference ms/img", "inference_ms", _mean("time/inference_ms_per_image", _one_decimal), numeric=True),
)
COMPARISON_COLUMNS = (
    _Column("point", "point", lambda c: c.point.name),
    _Column("against", "against", lambda c: c.other.name),
    _Column("difference (points)", "difference", lambda c: points_text(c.difference.mean), numeric=True),
    _Column("95% CI", "interval", lambda c: interval_text(c.difference).removeprefix("95% CI "), numeric=True),
    _Column("p", "p", lambda c: c.difference.p, _p_value, numeric=True),
    _Column("p (Holm)", "p_holm", lambda c: c.p_holm, _p_value, numeric=True),
    _Column("significant", "significant", lambda c: "yes" if c.significant else "no"),
)


def study_markdown(study) -> str:
    """The verdict, then per group the points table and the comparisons table."""
    parts = [f"## Verdict\n\n{study.verdict}"]
    for group in study.groups:
        title = f" ({group.title})" if len(study.groups) > 1 else ""
        parts.append(f"## Points{title}\n\n" + markdown_table(STUDY_COLUMNS, group.points))
        comparisons = group.comparisons
        if comparisons:
            parts.append(f"## Paired comparisons{title}\n\n" + markdown_table(COMPARISON_COLUMNS, comparisons))
    parts.append(
        f"Statistics: {study.method}. Accuracy and F1 are means over "
        f"{'folds' if study.design == 'folds' else 'test images'}; train s is the mean fit time per run. "
        "p (Holm): adjusted over each table's comparisons; significant: below 0.05."
    )
    return "\n\n".join(parts)


def report_markdown(report) -> str:
    """The whole report as Markdown: the study (if any), problems, data notes, the runs and the points."""
    parts = [study_markdown(report.study)] if report.study is not None else []
    parts.append("## Runs\n\n" + markdown_table(_RUN_COLUMNS, report.rows))
    problems = report.problems()
    if problems:
        parts.append("Missing from the results:\n\n" + "\n".join(problems))
    parts.extend(report.data_notes())
    if any(len(point.runs) > 1 for point in report.points):
        parts.append(
            "Mean ± standard deviation over seeds and folds, n finished runs per point:\n\n"
            + markdown_table(_POINT_COLUMNS, report.points)
        )
    return "\n\n".join(parts)


def write_tables(report, sweep_dir: Path) -> list[Path]:
    """Writes report.csv (runs), report_by_point.csv and, with a study, report_study.csv (points) and
    report_comparisons.csv (paired comparisons); returns the paths."""
    written = [sweep_dir / "report.csv", sweep_dir / "report_by_point.csv"]
    _write_csv(written[0], _RUN_COLUMNS, report.rows)
    _write_csv(written[1], _POINT_CSV_COLUMNS, report.points)
    if report.study is not None:
        groups = report.study.groups
        written += [sweep_dir / "report_study.csv", sweep_dir / "report_comparisons.csv"]
        _write_csv(written[2], _GROUP + _STUDY_CSV_COLUMNS, [(g, s) for g in groups for s in g.points])
        _write_csv(written[3], _GROUP + _in_group(COMPARISON_COLUMNS), [(g, c) for g in groups for c in g.comparisons])
    return written


# The study's CSV rows are (group, item) pairs: the group's title, then the item's columns.
_GROUP = (_Column("group", "group", lambda pair: pair[0].title),)


def _in_group(columns: Iterable[_Column]) -> tuple[_Column, ...]:
    return tuple(
        _Column(c.header, c.csv, lambda pair, c=c: c.value(pair[1]), c.shown, c.numeric, c.in_text) for c in columns
    )


_STUDY_CSV_COLUMNS = (
    *_in_group(
        (
            _Column("point", "point", lambda s: s.name),
            _Column("unfreeze", "unfreeze", lambda s: s.point.unfreeze),
            _Column("n", "n", lambda s: s.acc.n),
        )
    ),
    *(
        _Column(name, name, lambda pair, what=what, end=end: getattr(getattr(pair[1], what) or _NONE, end))
        for what in ("acc", "f1")
        for end, name in (("mean", what), ("low", f"{what}_low"), ("high", f"{what}_high"))
    ),
    _Column("fit_seconds", "fit_seconds", lambda pair: pair[1].point.mean("time/fit_seconds")),
    _Column("trainable_params", "trainable_params", lambda pair: trainable_params(pair[1].point)),
    _Column("recommended", "recommended", lambda pair: pair[1] is pair[0].recommended),
)
_NONE = Estimate(math.nan, math.nan, math.nan)
