"""The recommendation rule of a depth study: which of the points the data cannot tell from the best to recommend.

Among the points not significantly worse than the best: the cheapest, unless another costs an immaterial amount more
(at most IMMATERIAL_FIT_SECONDS of training per run more than the cheapest); then, among those, the point whose test
predictions have the lowest Brier score (where every run wrote its probabilities; else the best accuracy estimate).
The Brier score weighs each prediction's confidence, not only right or wrong, so it can rank points that a few
hundred images' accuracy cannot: on ELPV it lost fewer held-out points than the best accuracy estimate
(bench/verdict_check.py, docs/depth-study.md).

Inference time does not count: the points of a group are one model with the same settings, so at inference they are
the same network, and their measured latencies differ only by the machine's load (on ELPV under load, 10 to 139 ms
per image for the same network), which would decide the recommendation by noise.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from finetune.study.analysis import PointStats

# Below this a cheaper point saves the user nothing worth accuracy: a minute of training per run (what retraining the
# chosen depth costs once). See docs/depth-study.md.
IMMATERIAL_FIT_SECONDS = 60.0
BRIER, ACCURACY = "brier", "accuracy"


@dataclass(frozen=True)
class Rule:
    """The recommendation rule: the extra training seconds per run another point may cost and still be preferred to
    the cheapest point, and what prefers it (`rank_by`: the lowest Brier score, or the best accuracy estimate).
    Rule(0): always the cheapest; Rule(inf, ACCURACY): always the best estimate (bench/verdict_check.py weighs such
    rules by their held-out regret)."""

    fit_seconds: float = IMMATERIAL_FIT_SECONDS
    rank_by: str = BRIER


REPORT_RULE = Rule()  # the report's


def cost_order(point: PointStats) -> tuple:
    seconds = point.cost("time/fit_seconds")
    return (seconds if seconds is not None else float("inf"), point.cost("params/trainable") or 0)


def costs_immaterially_more(point: PointStats, cheapest: PointStats, rule: Rule = REPORT_RULE) -> bool:
    """`point` costs the user at most `rule.fit_seconds` more training per run than `cheapest`; False where training
    time is unknown."""
    seconds, base = point.cost("time/fit_seconds"), cheapest.cost("time/fit_seconds")
    return seconds is not None and base is not None and seconds - base <= rule.fit_seconds


def recommend(not_worse: list[PointStats], rule: Rule = REPORT_RULE) -> tuple:
    """(cheapest, affordable, ranked_by, recommended) among `not_worse` (PointStats not significantly worse than the
    best): the cheapest of them, those within the rule's immaterial extra cost of it, what ranked those, and the
    recommended one."""
    cheapest = min(not_worse, key=cost_order)
    affordable = [p for p in not_worse if p is cheapest or costs_immaterially_more(p, cheapest, rule)]
    ranked_by = BRIER if rule.rank_by == BRIER and all(p.brier is not None for p in affordable) else ACCURACY
    if ranked_by == BRIER:
        recommended = min(affordable, key=lambda p: (p.brier, cost_order(p)))
    else:
        recommended = max(affordable, key=lambda p: p.acc.mean)
    return cheapest, affordable, ranked_by, recommended


def mean_brier(rows_per_run: list[list[dict[str, str]] | None]) -> float | None:
    """The mean multi-class Brier score (sum over classes of (p - [label])^2) of the runs' test predictions (the
    rows of each run's test_predictions.csv); None where a run has none, or a row no probability for every class."""
    scores = []
    for rows in rows_per_run:
        if rows is None:
            return None
        try:
            for row in rows:
                classes = [column[2:] for column in row if column.startswith("p_")]
                if row["label"] not in classes:
                    return None
                scores.append(sum((float(row[f"p_{c}"]) - (c == row["label"])) ** 2 for c in classes))
        except (KeyError, ValueError):
            return None
    return statistics.fmean(scores) if scores else None
