"""The report's plots: curves per run, accuracy against depth, parameters and training cost, pooled confusion.

Figures are made without pyplot: no global backend is switched (a notebook keeps its own), and Figure.savefig
renders PNGs with Agg.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from finetune.model.plots import draw_confusion_matrix
from finetune.study.tables import trainable_params

PLOTS = (
    "pareto_accuracy_vs_training_time.png",
    "acc_vs_unfreeze.png",
    "confusion_pooled.png",
    "val_acc_per_epoch.png",
    "acc_vs_trainable_params.png",
)
DONE = "done"


def write_plots(report, sweep_dir: Path) -> list[Path]:
    """Draws every plot of PLOTS into sweep_dir; returns their paths."""
    paths = []
    draws = (_plot_pareto, _plot_acc_vs_unfreeze, _plot_confusion, _plot_curves, _plot_acc_vs_params)
    for name, draw in zip(PLOTS, draws, strict=True):
        figure = Figure(figsize=(8, 5), layout="constrained")
        draw(report, figure)
        figure.savefig(sweep_dir / name, dpi=110)
        paths.append(sweep_dir / name)
    return paths


def _no_data(axes: Axes, what: str) -> None:
    axes.text(0.5, 0.5, f"no {what} yet", ha="center", va="center", transform=axes.transAxes)


def _accuracy_name(key: str) -> str:
    return "test accuracy" if key == "test/acc" else "validation accuracy (no test split)"


def _plot_curves(report, figure: Figure) -> None:
    """Validation accuracy per epoch, one line per run; the seeds of one point share a colour, not a line style."""
    axes = figure.subplots()
    styles = {
        run.job: (f"C{index % 10}", ("-", "--", ":", "-.")[number % 4])
        for index, point in enumerate(report.points)
        for number, run in enumerate(point.runs)
    }
    runs = [row for row in report.rows if row.val_acc_curve]
    for row in runs:
        colour, linestyle = styles[row.job]
        axes.plot(
            range(len(row.val_acc_curve)),
            row.val_acc_curve,
            marker="o",
            color=colour,
            linestyle=linestyle,
            label=f"{row.label} ({row.status})" if row.status != DONE else row.label,
        )
    if not runs:
        _no_data(axes, "validation curves")
    else:
        axes.legend(fontsize="x-small", ncols=1 + len(runs) // 16)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set(title="Validation accuracy per epoch", xlabel="epoch (0 = first)", ylabel="val/acc")
    axes.grid(alpha=0.3)


def _plot_acc_vs_unfreeze(report, figure: Figure) -> None:
    """Accuracy against unfreeze depth, one line per model, `all` rightmost; error bars: the study's 95% interval
    where there is one, else the standard deviation over runs."""
    axes = figure.subplots()
    key = report.accuracy_key
    intervals = _intervals(report)
    points = [
        point
        for point in report.points
        if point.mean(key) is not None and (isinstance(point.unfreeze, int) or point.unfreeze == "all")
    ]
    depths = sorted({point.unfreeze for point in points if isinstance(point.unfreeze, int)})
    all_at = depths[-1] + 1 if depths else 0

    def x_of(unfreeze: int | str) -> int:
        return all_at if unfreeze == "all" else unfreeze

    lines: dict[str, list] = {}
    for point in points:
        lines.setdefault(f"{point.model} {point.other}".strip(), []).append(point)
    for label, members in lines.items():
        members.sort(key=lambda point: (x_of(point.unfreeze), point.strategy or ""))
        xs = [x_of(point.unfreeze) for point in members]
        ys = [point.mean(key) for point in members]
        errors = _error_bars(members, ys, intervals, key)
        axes.errorbar(xs, ys, yerr=errors, marker="o", capsize=4, label=label)
        for x, y, point in zip(xs, ys, members, strict=True):
            axes.annotate(point.strategy or "", (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    if not points:
        _no_data(axes, "finished runs")
    else:
        ticks = depths + (["all"] if any(point.unfreeze == "all" for point in points) else [])
        axes.set_xticks([x_of(tick) for tick in ticks], [str(tick) for tick in ticks])
        axes.legend(fontsize="small")
    axes.set(
        title=f"{_accuracy_name(key).capitalize()} vs unfreeze depth", xlabel="unfreeze (blocks trained)", ylabel=key
    )
    axes.grid(alpha=0.3)


def _plot_acc_vs_params(report, figure: Figure) -> None:
    """Accuracy against trainable parameters (log scale), one colour per model; error bars as in acc_vs_unfreeze."""
    axes = figure.subplots()
    key = report.accuracy_key
    intervals = _intervals(report)
    points = [point for point in report.points if point.mean(key) is not None and (trainable_params(point) or 0) > 0]
    by_model: dict[str | None, list] = {}
    for point in points:
        by_model.setdefault(point.model, []).append(point)
    for model, members in by_model.items():
        xs = [trainable_params(point) for point in members]
        ys = [point.mean(key) for point in members]
        errors = _error_bars(members, ys, intervals, key)
        axes.errorbar(xs, ys, yerr=errors, marker="o", linestyle="none", capsize=4, label=str(model))
        for x, y, point in zip(xs, ys, members, strict=True):
            axes.annotate(
                f"{point.strategy} ({point.unfreeze})", (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8
            )
    if not points:
        _no_data(axes, "finished runs")
    else:
        axes.set_xscale("log")
        axes.legend(fontsize="small")
    axes.set(
        title=f"{_accuracy_name(key).capitalize()} vs trainable parameters",
        xlabel="trainable parameters (log scale)",
        ylabel=key,
    )
    axes.grid(alpha=0.3, which="both")


def _intervals(report) -> dict[int, object]:
    """id(PointRow) -> its study statistics (accuracy with interval), where the report has a study."""
    if report.study is None:
        return {}
    return {id(stats.point): stats for group in report.study.groups for stats in group.points}


def _error_bars(points: list, ys: list[float], intervals: dict, key: str):
    """Asymmetric error bars: the study's 95% interval (where it has the point and the key is test/acc), else
    the standard deviation over runs; None where there is neither."""
    low, high = [], []
    for point, y in zip(points, ys, strict=True):
        stats = intervals.get(id(point)) if key == "test/acc" else None
        if stats is not None and np.isfinite(stats.acc.low):
            low.append(y - stats.acc.low)
            high.append(stats.acc.high - y)
        else:
            low.append(point.std(key) or 0.0)
            high.append(point.std(key) or 0.0)
    return [low, high] if any(low) or any(high) else None


def _plot_pareto(report, figure: Figure) -> None:
    """Test accuracy (95% interval) against mean training seconds per run; the points no other beats on both
    accuracy and cost (the Pareto front) joined, the recommended one ringed, every point labelled."""
    axes = figure.subplots()
    study = report.study
    if study is None:
        _no_data(axes, "study (finished runs with a test split)")
        return
    labels = []  # (x, y, text, colour)
    for index, group in enumerate(study.groups):
        points = [s for s in group.points if s.point.mean("time/fit_seconds") is not None]
        xs = [s.point.mean("time/fit_seconds") for s in points]
        ys = [100 * s.acc.mean for s in points]
        low = [100 * (s.acc.mean - s.acc.low) if np.isfinite(s.acc.low) else 0 for s in points]
        high = [100 * (s.acc.high - s.acc.mean) if np.isfinite(s.acc.high) else 0 for s in points]
        colour = f"C{index % 10}"
        axes.errorbar(
            xs, ys, yerr=[low, high], marker="o", linestyle="none", capsize=4, color=colour, label=group.title
        )
        front = sorted(
            (x, y)
            for x, y in zip(xs, ys, strict=True)
            if not any(x2 <= x and y2 > y or x2 < x and y2 >= y for x2, y2 in zip(xs, ys, strict=True))
        )
        if len(front) > 1:
            axes.plot(*zip(*front, strict=True), color=colour, alpha=0.4, linestyle="--")
        for x, y, s in zip(xs, ys, points, strict=True):
            labels.append((x, y, s.name, colour))
            if s is group.recommended:
                axes.scatter(
                    [x],
                    [y],
                    s=250,
                    facecolors="none",
                    edgecolors="black",
                    zorder=3,
                    label="recommended" if index == 0 else None,
                )
    if any(s.point.mean("time/fit_seconds") for g in study.groups for s in g.points):
        axes.set_xscale("log")
    axes.legend(fontsize="small")
    axes.set(
        title="Accuracy (95% CI) against training cost",
        xlabel="training seconds per run (log scale)",
        ylabel="test accuracy %",
    )
    axes.grid(alpha=0.3, which="both")
    _label_column(axes, figure, labels)


LABEL_SIZE = 8  # points


def _label_column(axes: Axes, figure: Figure, labels: list[tuple[float, float, str, str]]) -> None:
    """Labels in a column right of the axes, each level with its point where it can be and joined to it by a line.

    Points of a study crowd (close costs, close accuracies), so labels beside them overlap. In one column, a label's
    height apart from the next, they cannot; the figure grows taller where the column needs it.
    """
    if not labels:
        return
    gap_points = 1.5 * LABEL_SIZE
    width, height = figure.get_size_inches()
    height = max(height, (len(labels) + 1) * gap_points / 72 + 1.5)  # 1.5 in: title, axis label, ticks, margin
    figure.set_size_inches(width, height)
    gap = gap_points / ((height - 1.5) * 72)  # in axes fractions; the axes are at least that tall
    axes.autoscale_view()  # the limits the points will be drawn in, so their positions are known now
    to_axes = axes.transScale + axes.transLimits
    heights, ordered = zip(*sorted((float(to_axes.transform(label[:2])[1]), label) for label in labels), strict=True)
    heights = list(heights)
    for i in range(1, len(heights)):  # push up from the bottom, then down from the top, a gap apart
        heights[i] = max(heights[i], heights[i - 1] + gap)
    heights[-1] = min(heights[-1], 1.0)
    for i in range(len(heights) - 2, -1, -1):
        heights[i] = min(heights[i], heights[i + 1] - gap)
    for (x, y, text, colour), height_at in zip(ordered, heights, strict=True):
        axes.annotate(
            text,
            (x, y),
            xytext=(1.03, height_at),
            textcoords="axes fraction",
            va="center",
            fontsize=LABEL_SIZE,
            color=colour,
            arrowprops={"arrowstyle": "-", "color": colour, "alpha": 0.4, "linewidth": 0.6},
            annotation_clip=False,
        )


def _plot_confusion(report, figure: Figure) -> None:
    """One confusion matrix per point, pooled over its runs' test predictions (out-of-fold for k-fold)."""
    # Here, not at the top: torch takes seconds to import, and `python -m finetune.report` imports this module at start.
    from finetune.model.metrics import predicted_confusion

    study = report.study
    points = [s for g in study.groups for s in g.points if s.predictions] if study is not None else []
    if not points:
        _no_data(figure.subplots(), "test predictions (test_predictions.csv)")
        return
    # The classes of any label or prediction, as the test step counts them.
    classes = sorted({name for s in points for _, label, predicted in s.predictions for name in (label, predicted)})
    index = {name: i for i, name in enumerate(classes)}
    columns = min(len(points), 3)
    rows = -(-len(points) // columns)
    figure.set_size_inches(3.2 * columns + 1, 3.0 * rows + 0.6)
    all_axes = np.atleast_1d(figure.subplots(rows, columns)).ravel()
    for axes, stats in zip(all_axes, points, strict=False):
        labels = [index[label] for _, label, _ in stats.predictions]
        predicted = [index[guess] for _, _, guess in stats.predictions]
        recommended = " (recommended)" if any(stats is g.recommended for g in study.groups) else ""
        draw_confusion_matrix(
            axes,
            predicted_confusion(labels, predicted, len(classes)),
            classes,
            f"unfreeze={stats.point.unfreeze}{recommended}",
            fontsize=7,
        )
    for axes in all_axes[len(points) :]:
        axes.axis("off")
    figure.suptitle("Confusion matrices, every test prediction pooled (out-of-fold for k-fold)", fontsize=10)
