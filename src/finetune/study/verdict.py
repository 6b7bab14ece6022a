"""The verdict of a study in plain words, in the order a user acts on it: first the differences that are significant
(Holm-adjusted, with their 95% intervals), then the recommendation and why, then what the data cannot decide and
roughly how many images would; last, the training-time augmentation it was measured under."""

from __future__ import annotations

import math

from finetune.study.analysis import FOLDS, Comparison, Group, PointStats, Study
from finetune.study.leakage import verdict_caveat
from finetune.study.recommend import BRIER, IMMATERIAL_FIT_SECONDS, cost_order
from finetune.study.regime import regime_sentence
from finetune.study.stats import Estimate, images_to_resolve


def points_text(value: float) -> str:
    return f"{100 * value:+.1f}"


def interval_text(estimate: Estimate) -> str:
    if not math.isfinite(estimate.low):
        return "no interval from one fold or image"
    return f"95% CI {100 * estimate.low:.1f} to {100 * estimate.high:.1f}"


def judge(study: Study | None) -> Study | None:
    """Sets every group's verdict (the words of `verdict_text`, the augmentation regime it was measured under, and
    what the splits did about related images) and returns the study."""
    for group in study.groups if study is not None else []:
        runs = [run for point in group.points for run in point.point.done]
        verdict = verdict_text(group, study.design, titled=len(study.groups) > 1)
        group.verdict = verdict + regime_sentence(group.points) + verdict_caveat(runs)
    return study


def verdict_text(group: Group, design: str, titled: bool) -> str:
    """The group's verdict: significant differences, the recommendation, what the data cannot decide."""
    title = f"{group.title}: " if titled else ""
    if len(group.points) - len(group.waiting) == 1:
        only = group.best
        return (
            f"{title}Only one point has enough finished runs ({only.name}): {100 * only.acc.mean:.1f}% accuracy "
            f"({interval_text(only.acc)}); nothing to compare it with yet."
        )
    comparisons = group.comparisons
    significant = [c for c in comparisons if c.significant]
    family = f"Holm-adjusted p < 0.05 over {len(comparisons)} comparison{'s' if len(comparisons) != 1 else ''}"
    if significant:
        lead = f"Significant ({family}): " + "; ".join(_difference(c) for c in significant) + "."
    else:
        lead = f"No difference is significant ({family})."
    recommendation, cited = _recommendation(group)
    sentences = [lead, recommendation, _undecided(group, design, cited)]
    if group.waiting:
        names = ", ".join(f"{p.name} ({p.acc.n} fold{'s' if p.acc.n != 1 else ''})" for p in group.waiting)
        sentences.append(f"Not compared yet, too few finished folds: {names}.")
    return title + " ".join(sentence for sentence in sentences if sentence)


def _difference(c: Comparison) -> str:
    """A significant difference, told from the better point's side."""
    if c.difference.mean < 0:
        c = Comparison(c.other, c.point, -c.difference, c.p_holm)
    d = c.difference
    return f"{c.point.name} beats {c.other.name} by {points_text(d.mean)} points ({interval_text(d)}, {_p(c)})"


def _p(c: Comparison) -> str:
    return f"adjusted p = {c.p_holm:.2g}" if c.p_holm is not None else "no p-value"


def _seconds(a: PointStats, b: PointStats) -> float | None:
    """How many more training seconds per run a costs than b; None where either was not timed."""
    ta, tb = a.cost("time/fit_seconds"), b.cost("time/fit_seconds")
    return ta - tb if ta is not None and tb is not None else None


def _recommendation(group: Group) -> tuple[str, Comparison | None]:
    """The recommendation and why, with the comparison it cites (None where it cites none)."""
    recommended, best, cheapest = group.recommended, group.best, group.cheapest
    head = (
        f"Recommended: {recommended.setting} ({100 * recommended.acc.mean:.1f}% accuracy, "
        f"{interval_text(recommended.acc)})"
    )
    if group.ranked_by == BRIER and len(group.affordable) > 1:
        return _by_brier(group, head), None
    if recommended is not cheapest:  # the better estimate, for a cost the user does not feel
        return (
            f"{head}: the best point estimate among the points not significantly worse than the best. The cheapest "
            f"of them, {cheapest.name} at {100 * cheapest.acc.mean:.1f}%, would save only "
            f"{_seconds(recommended, cheapest):.0f} s of training per run, within the {IMMATERIAL_FIT_SECONDS:.0f} s "
            "counted as immaterial, so the better estimate wins.",
            None,
        )
    if recommended is best:
        if not any(cost_order(p) < cost_order(best) for p in group.points):
            return f"{head}: the best point estimate, and the cheapest point.", None
        return f"{head}: the best point estimate; every cheaper point is significantly worse.", None
    cited = group.between(best, recommended)
    d = cited.difference
    extra = _seconds(best, recommended)
    cost = f" costs {extra:.0f} s more training per run{_ratio(best, recommended)} and" if extra is not None else ""
    return (
        f"{head}: the cheapest point not significantly worse than the best estimate. {best.name}{cost} is "
        f"{points_text(d.mean)} points ({interval_text(d)}, {_p(cited)}), which the data cannot tell from zero.",
        cited,
    )


def _by_brier(group: Group, head: str) -> str:
    """Why the Brier score chose among points the data cannot separate at a cost the user does not feel."""
    recommended, cheapest = group.recommended, group.cheapest
    others = ", ".join(f"{p.name} {p.brier:.3f}" for p in group.affordable if p is not recommended)
    text = (
        f"{head}: of the points not significantly worse than the best and within {IMMATERIAL_FIT_SECONDS:.0f} s of "
        f"training per run of the cheapest, its test predictions have the lowest Brier score ({recommended.brier:.3f}; "
        f"{others}). The Brier score weighs each prediction's confidence, not only right or wrong, so it separates "
        "points that accuracy on these images cannot."
    )
    if recommended is not cheapest:
        text += (
            f" The cheapest, {cheapest.name} at {100 * cheapest.acc.mean:.1f}%, would save only "
            f"{_seconds(recommended, cheapest):.0f} s of training per run."
        )
    return text


def _ratio(a: PointStats, b: PointStats) -> str:
    ta, tb = a.cost("time/fit_seconds"), b.cost("time/fit_seconds")
    return f" ({ta / tb:.1f}x the training time)" if ta and tb else ""


def _undecided(group: Group, design: str, cited: Comparison | None) -> str:
    """The largest difference the data cannot decide (besides the one the recommendation cited), and what would."""
    pair = {id(cited.point), id(cited.other)} if cited is not None else set()
    open_questions = [c for c in group.comparisons if not c.significant and {id(c.point), id(c.other)} != pair]
    if not open_questions:
        return ""
    widest = max(open_questions, key=lambda c: abs(c.difference.mean))
    d = widest.difference
    numbers = f"{points_text(d.mean)} points ({interval_text(d)}, {_p(widest)})"
    if group.undecided:
        text = f"The data cannot decide: the largest difference, {widest.point.name} against {widest.other.name}, is"
    elif len(open_questions) == 1:
        text = f"The data cannot decide {widest.point.name} against {widest.other.name}:"
    else:
        other = "other " if cited is not None else ""
        text = f"The data cannot decide the {len(open_questions)} {other}comparisons; the largest, "
        text += f"{widest.point.name} against {widest.other.name}, is"
    text += f" {numbers}."
    if design == FOLDS and d.n < 3:
        # The t-quantile at 1 degree of freedom, not the data, makes that interval wide.
        return text + (
            f" With {d.n} folds compared the interval is wide by construction (t with {d.n - 1} degree of "
            "freedom); the remaining folds will narrow it."
        )
    target = max(abs(d.mean), 0.02)
    n_images = _images(design, group)
    needed = images_to_resolve(n_images, d.half_width, target) if n_images else None
    if needed and needed > n_images:
        text += (
            f" To resolve a difference of {100 * target:.1f} points would take roughly {_rounded(needed):,} "
            f"images instead of the {n_images:,} here (assuming the interval narrows as 1/sqrt(images); more "
            "folds of the same images narrow it little)."
        )
    return text


def _rounded(count: int) -> int:
    """Two significant digits: the approximation is no finer than that."""
    return int(float(f"{count:.2g}"))


def _images(design: str, group: Group) -> int:
    """The images the intervals rest on: every image of the folds (k-fold), or the test images (one split)."""
    runs = [run for p in group.points for run in p.point.done]
    if design == FOLDS:
        return max((sum(run.split_sizes.values()) for run in runs if run.split_sizes), default=0)
    return max((run.split_sizes.get("test", 0) for run in runs if run.split_sizes), default=0)
