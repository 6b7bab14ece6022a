"""The verdict of a study in plain words: what beats what, by how much (with its 95% interval), at what cost, and
which depth to use; or that the data cannot decide, and roughly how many images would."""

from __future__ import annotations

import math

from finetune.study.analysis import FOLDS, Group, PointStats, compare, cost_order
from finetune.study.stats import Estimate, images_to_resolve


def points_text(value: float) -> str:
    return f"{100 * value:+.1f}"


def interval_text(estimate: Estimate) -> str:
    if not math.isfinite(estimate.low):
        return "no interval from one fold or image"
    return f"95% CI {100 * estimate.low:.1f} to {100 * estimate.high:.1f}"


def _times(a: PointStats, b: PointStats) -> str:
    ta, tb = a.cost("time/fit_seconds"), b.cost("time/fit_seconds")
    return f" and costs {ta / tb:.1f}x the training time" if ta and tb else ""


def verdict_text(group: Group, design: str, report, titled: bool) -> str:
    title = f"{group.title}: " if titled else ""
    recommended, best, transfer = group.recommended, group.best, group.transfer
    if len(group.points) - len(group.waiting) == 1:
        only = best
        return (
            f"{title}Only one point has enough finished runs ({only.name}): {100 * only.acc.mean:.1f}% accuracy "
            f"({interval_text(only.acc)}); nothing to compare it with yet."
        )
    if group.undecided:
        reference = transfer or min((p for p in group.points if p not in group.waiting), key=cost_order)
        widest = compare(best, reference, design) if best is not reference else group.vs_best[0]
        d = widest.difference
        target = max(abs(d.mean), 0.02)
        n_images = _images(report, design, group)
        needed = images_to_resolve(n_images, d.half_width, target) if n_images else None
        if design == FOLDS and d.n < 3:
            needed = None  # the t-quantile at 1 degree of freedom, not the data, makes that interval wide
        more = (
            (
                f" With {d.n} folds compared the interval is wide by construction (t with {d.n - 1} degree of "
                "freedom); the remaining folds will narrow it."
            )
            if design == FOLDS and d.n < 3
            else ""
        )
        more += (
            (
                f" To resolve a difference of {100 * target:.1f} points would take roughly {_rounded(needed):,} "
                f"images instead of the {n_images:,} here (assuming the interval narrows as 1/sqrt(images); more "
                "folds of the same images narrow it little)."
            )
            if needed
            else ""
        )
        return (
            f"{title}The data cannot decide: no depth is significantly better or worse than another. "
            f"The largest difference, {widest.point.name} against {widest.other.name}, is "
            f"{points_text(d.mean)} points ({interval_text(d)}).{more} Until then the cheapest is the safe "
            f"choice. Recommended: {recommended.setting}."
        )
    sentences = []
    if recommended is transfer:
        if best is transfer:
            sentences.append(
                f"Transfer learning (the head alone) is the most accurate point: "
                f"{100 * best.acc.mean:.1f}% ({interval_text(best.acc)})."
            )
        else:
            d = next(c for c in group.vs_transfer if c.point is best).difference
            sentences.append(
                f"Fine-tuning is not significantly better than transfer learning: the best point, "
                f"{best.name}, is {points_text(d.mean)} points ({interval_text(d)})"
                f"{_times(best, transfer)}."
            )
    else:
        if transfer is not None:
            d = next(c for c in group.vs_transfer if c.point is recommended).difference
            verb = "beats" if d.significant and d.mean > 0 else "is not significantly better than"
            sentences.append(
                f"Fine-tuning with {recommended.name} {verb} transfer learning by {points_text(d.mean)} "
                f"points ({interval_text(d)})."
            )
        cheaper = [p for p in group.points if p is not transfer and cost_order(p) < cost_order(recommended)]
        if cheaper:
            top = max(cheaper, key=lambda p: p.acc.mean)
            d = compare(top, recommended, design).difference
            ta, tb = top.cost("time/fit_seconds"), recommended.cost("time/fit_seconds")
            cost = f" at {ta / tb:.1f}x the training time" if ta and tb else ""
            verb = "significantly" if d.significant else "not significantly"
            sentences.append(
                f"The best cheaper point, {top.name}, is {verb} worse ({points_text(d.mean)} points, "
                f"{interval_text(d)}){cost}."
            )
        costlier = [p for p in group.points if cost_order(p) > cost_order(recommended)]
        if costlier:
            top = max(costlier, key=lambda p: p.acc.mean)
            d = compare(top, recommended, design).difference
            verb = "significantly" if d.significant else "not significantly"
            sentences.append(
                f"Costlier points are {verb} better (the best of them, {top.name}: "
                f"{points_text(d.mean)} points, {interval_text(d)}){_times(top, recommended)}."
            )
    sentences.append(
        f"Recommended: {recommended.setting}"
        f" ({100 * recommended.acc.mean:.1f}% accuracy, {interval_text(recommended.acc)})."
    )
    return title + " ".join(sentences)


def _rounded(count: int) -> int:
    """Two significant digits: the approximation is no finer than that."""
    return int(float(f"{count:.2g}"))


def _images(report, design: str, group: Group) -> int:
    """The images the intervals rest on: every image of the folds (k-fold), or the test images (one split)."""
    runs = [run for p in group.points for run in p.point.done]
    if design == FOLDS:
        return max((sum(run.split_sizes.values()) for run in runs if run.split_sizes), default=0)
    return max((run.split_sizes.get("test", 0) for run in runs if run.split_sizes), default=0)
