"""The verdict of a depth study: intervals per point, paired comparisons, and a recommendation in plain words.

Points are compared within a group (one model, the same other settings). Per point: mean test accuracy and macro-F1
with a 95% interval. Pairs: each point against transfer learning (unfreeze=0) and against the most accurate point,
on the same folds (corrected resampled t-test) or the same test images (bootstrap interval, McNemar's exact test),
see `finetune.study.stats`. The p-values of a group's comparisons (one model's depth study, the comparisons table)
are Holm-adjusted, and "significant" means an adjusted p below 5% everywhere: table, verdict and recommendation.

The recommendation is `finetune.study.recommend`'s rule; the words are `finetune.study.verdict`'s.
"""

from __future__ import annotations

import csv
import statistics
from dataclasses import dataclass, field

import numpy as np

from finetune.study.points import is_depth_only, point_name, point_setting
from finetune.study.recommend import REPORT_RULE, Rule, mean_brier, recommend
from finetune.study.stats import ALPHA, Estimate, bootstrap, corrected_t, holm, mcnemar_exact

FOLDS, SPLIT = "folds", "split"
METHODS = {
    FOLDS: "corrected resampled t-test over folds (Nadeau & Bengio 2003; Bouckaert & Frank 2004): variance "
    "(1/k + n_test/n_train) s^2, t with k-1 degrees of freedom; paired over the same folds",
    SPLIT: "percentile bootstrap over test images (2,000 resamples); paired comparisons on the same images, "
    "p-values from McNemar's exact test (one seed) or the paired bootstrap (several seeds)",
}


@dataclass
class PointStats:
    """One point's accuracy, F1 and cost. `per_unit`: its accuracy per fold, or correctness per test image."""

    point: object  # sweep.PointRow
    acc: Estimate
    f1: Estimate | None
    per_unit: dict = field(default_factory=dict)
    predictions: list[tuple[str, str, str]] = field(default_factory=list)  # (path, label, predicted), every run
    brier: float | None = None  # the mean Brier score of every run's test predictions; None where one lacks them

    def cost(self, key: str) -> float | None:
        return self.point.mean(key)

    @property
    def name(self) -> str:
        return point_name(self.point.unfreeze, self.point.strategy)

    @property
    def setting(self) -> str:
        return point_setting(self.point.unfreeze, self.point.strategy)


@dataclass(frozen=True)
class Comparison:
    """`point` minus `other` on the units both have (folds or images); `p_holm`: its p-value Holm-adjusted over the
    group's comparisons (None where it has no p-value)."""

    point: PointStats
    other: PointStats
    difference: Estimate
    p_holm: float | None = None

    @property
    def significant(self) -> bool:
        """The two points differ: the Holm-adjusted p-value is below ALPHA (5%)."""
        return self.p_holm is not None and self.p_holm < ALPHA


@dataclass
class Group:
    """The points of one model (and other settings), their comparisons and verdict.

    Attributes:
        best: the best point estimate; cheapest: the cheapest point not significantly worse than it;
        recommended: see the module's docstring. verdict: set by `finetune.study.verdict.judge`.
    """

    title: str
    points: list[PointStats]
    transfer: PointStats | None
    best: PointStats
    cheapest: PointStats
    recommended: PointStats
    affordable: list[PointStats]  # the points not significantly worse than the best at an immaterial extra cost
    ranked_by: str  # what chose the recommendation among them: BRIER or ACCURACY
    vs_transfer: list[Comparison]
    vs_best: list[Comparison]
    undecided: bool
    waiting: list[PointStats] = field(default_factory=list)
    verdict: str = ""

    @property
    def comparisons(self) -> list[Comparison]:
        """Each point against transfer learning, then against the best (each pair once): the Holm family."""
        return self.vs_transfer + [c for c in self.vs_best if self.transfer not in (c.point, c.other)]

    def between(self, a: PointStats, b: PointStats) -> Comparison | None:
        """The table's comparison of a and b, as a minus b; None where the table does not compare them."""
        for c in self.comparisons:
            if (c.point, c.other) == (a, b):
                return c
            if (c.point, c.other) == (b, a):
                return Comparison(a, b, -c.difference, c.p_holm)
        return None


@dataclass
class Study:
    """What `finetune.report` shows above the tables."""

    design: str
    method: str
    groups: list[Group]

    @property
    def verdict(self) -> str:
        return "\n\n".join(group.verdict for group in self.groups)


def analyse(report, rule: Rule = REPORT_RULE) -> Study | None:
    """The study of a report's finished runs; None where there is nothing to compare (or no test split).
    `rule`: the recommendation rule (the default is the report's)."""
    done = [run for run in report.rows if run.status == "done" and run.get("test/acc") is not None]
    if not done:
        return None
    design = FOLDS if any(run.fold is not None for run in done) else SPLIT
    groups: dict[tuple, list] = {}
    for point in report.points:
        if point.done:
            groups.setdefault((point.model, point.other), []).append(point)
    result = []
    for (model, other), points in groups.items():
        stats = [s for s in (_point_stats(point, design) for point in points) if s is not None]
        if stats:
            result.append(_group(f"{model} {other}".strip(), stats, design, rule))
    return Study(design, METHODS[design], result) if result else None


def _point_stats(point, design: str) -> PointStats | None:
    runs = [run for run in point.done if run.get("test/acc") is not None]
    if not runs:
        return None
    rows = [_read_rows(run.path) for run in runs]  # each run's test_predictions.csv, read once
    if design == FOLDS:
        by_fold: dict[int, list] = {}
        for run in runs:
            by_fold.setdefault(run.fold, []).append(run)
        acc = {fold: statistics.fmean(r.get("test/acc") for r in rs) for fold, rs in by_fold.items()}
        f1 = [
            statistics.fmean(r.get("test/f1") for r in rs)
            for rs in by_fold.values()
            if all(r.get("test/f1") is not None for r in rs)
        ]
        n_train, n_test = _sizes(runs)
        stats = PointStats(
            point,
            _clipped(corrected_t(list(acc.values()), n_train, n_test)),
            _clipped(corrected_t(f1, n_train, n_test)) if len(f1) == len(acc) else None,
            acc,
        )
        stats.predictions = [p for run_rows in rows for p in _predictions(run_rows)]
        stats.brier = mean_brier(rows)
        return stats
    predictions = [_predictions(run_rows) for run_rows in rows]
    if not all(predictions):  # runs written before test_predictions.csv: no per-image statistics
        return None
    correct: dict[str, list[float]] = {}
    for run_predictions in predictions:
        for path, label, predicted in run_predictions:
            correct.setdefault(path, []).append(float(label == predicted))
    per_image = {path: statistics.fmean(values) for path, values in correct.items()}
    images = sorted(per_image)
    scores = np.array([per_image[path] for path in images])
    acc = bootstrap(lambda idx: float(scores[idx].mean()), len(images))
    f1 = _bootstrap_f1(predictions, images)
    stats = PointStats(point, acc, f1, per_image)
    stats.predictions = [p for run_predictions in predictions for p in run_predictions]
    stats.brier = mean_brier(rows)
    return stats


def _clipped(estimate: Estimate) -> Estimate:
    """An accuracy's interval within [0, 1] (the t-interval knows no bounds)."""
    return Estimate(estimate.mean, max(0.0, estimate.low), min(1.0, estimate.high), estimate.p, estimate.n)


def _bootstrap_f1(predictions: list[list[tuple[str, str, str]]], images: list[str]) -> Estimate:
    # Here, not at the top: torch takes seconds to import, and `python -m finetune.report` imports this module at start.
    from finetune.model.metrics import predicted_macro_f1

    # The classes of any label or prediction, as the test step counts them (its `test/f1`).
    classes = sorted({name for run in predictions for _, label, predicted in run for name in (label, predicted)})
    index = {name: i for i, name in enumerate(classes)}
    position = {path: i for i, path in enumerate(images)}
    # One row per (image, seed): a resample draws images, each with every seed's prediction.
    rows = [(position[path], index[label], index[predicted]) for run in predictions for path, label, predicted in run]
    image_of, labels, predicted = (np.array(column) for column in zip(*rows, strict=True))
    by_image = [np.flatnonzero(image_of == i) for i in range(len(images))]

    def f1(idx: np.ndarray) -> float:
        chosen = np.concatenate([by_image[i] for i in idx])
        return predicted_macro_f1(labels[chosen], predicted[chosen], len(classes))

    return bootstrap(f1, len(images), resamples=500)


def _sizes(runs) -> tuple[float, float]:
    train = [run.split_sizes.get("train", 0) for run in runs if run.split_sizes]
    test = [run.split_sizes.get("test", 0) for run in runs if run.split_sizes]
    if not train or not test or not min(train):
        return 4.0, 1.0  # no split.csv: the ratio of 5-fold cross-validation
    return statistics.fmean(train), statistics.fmean(test)


def _read_rows(run_dir) -> list[dict[str, str]] | None:
    """The rows of a run's test_predictions.csv; None where it has none or cannot be read."""
    try:
        with open(run_dir / "test_predictions.csv", newline="", encoding="utf-8") as file:
            return list(csv.DictReader(file))
    except (OSError, csv.Error):
        return None


def _predictions(rows: list[dict[str, str]] | None) -> list[tuple[str, str, str]]:
    """(path, label, predicted) of each row; none where the file was missing or lacks a column."""
    try:
        return [(row["path"], row["label"], row["predicted"]) for row in rows or []]
    except KeyError:
        return []


def compare(a: PointStats, b: PointStats, design: str) -> Comparison:
    """a minus b on their shared folds (corrected t) or test images (bootstrap; McNemar with one seed each)."""
    shared = sorted(set(a.per_unit) & set(b.per_unit), key=str)
    differences = np.array([a.per_unit[unit] - b.per_unit[unit] for unit in shared])
    if design == FOLDS:
        runs = [run for point in (a.point, b.point) for run in point.done]
        return Comparison(a, b, corrected_t(differences, *_sizes(runs)))
    estimate = bootstrap(lambda idx: float(differences[idx].mean()), len(shared))
    if a.point.n == 1 and b.point.n == 1:
        p = mcnemar_exact([a.per_unit[u] == 1 for u in shared], [b.per_unit[u] == 1 for u in shared])
        estimate = Estimate(estimate.mean, estimate.low, estimate.high, p, estimate.n)
    return Comparison(a, b, estimate)


def _group(title: str, points: list[PointStats], design: str, rule: Rule = REPORT_RULE) -> Group:
    # A point with one finished fold has no interval: shown in the table, compared once a second fold is in.
    ready = [p for p in points if design == SPLIT or p.acc.n >= 2] or points
    # The reference: the head alone, trained plainly (an LP-FT point at depth 0 is compared with it too).
    at_zero = [p for p in ready if p.point.unfreeze == 0]
    transfer = next((p for p in at_zero if is_depth_only(p.point.strategy)), at_zero[0] if at_zero else None)
    best = max(ready, key=lambda p: p.acc.mean)
    vs_transfer = [compare(p, transfer, design) for p in ready if transfer is not None and p is not transfer]
    vs_best = [compare(p, best, design) for p in ready if p is not best]
    vs_transfer, vs_best = _holm_adjusted(vs_transfer, vs_best, transfer)
    not_worse = [best] + [c.point for c in vs_best if not c.significant]
    cheapest, affordable, ranked_by, recommended = recommend(not_worse, rule)
    undecided = len(ready) > 1 and not any(c.significant for c in vs_transfer + vs_best)
    waiting = [p for p in points if p not in ready]
    return Group(
        title,
        points,
        transfer,
        best,
        cheapest,
        recommended,
        affordable,
        ranked_by,
        vs_transfer,
        vs_best,
        undecided,
        waiting,
    )


def _holm_adjusted(vs_transfer: list[Comparison], vs_best: list[Comparison], transfer) -> tuple[list, list]:
    """Both lists with Holm-adjusted p-values over the group's comparisons, each pair counted once (the best
    against transfer learning is in both lists)."""
    family = vs_transfer + [c for c in vs_best if transfer not in (c.point, c.other)]
    adjusted = dict(
        zip(
            (frozenset((id(c.point), id(c.other))) for c in family), holm([c.difference.p for c in family]), strict=True
        )
    )

    def with_p(c: Comparison) -> Comparison:
        return Comparison(c.point, c.other, c.difference, adjusted[frozenset((id(c.point), id(c.other)))])

    return [with_p(c) for c in vs_transfer], [with_p(c) for c in vs_best]
