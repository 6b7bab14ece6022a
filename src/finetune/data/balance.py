"""Class balance: images per class, how uneven the training split is, and the two ways `data.balance` evens it."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from finetune.data.folders import SPLITS, Sample
from finetune.data.scan import STRONG_IMBALANCE

log = logging.getLogger(__name__)


def class_counts(samples: Sequence[Sample], num_classes: int) -> list[int]:
    """Images per class, in class order."""
    counts = [0] * num_classes
    for _, label in samples:
        counts[label] += 1
    return counts


def imbalance(counts: Sequence[int]) -> float:
    """Largest over smallest class count (1.0: balanced)."""
    return max(counts) / max(min(counts), 1)


def loss_weights(counts: Sequence[int]) -> list[float]:
    """Per-class loss weights total / (classes * class count) (`data.balance=loss_weights`)."""
    return [sum(counts) / (len(counts) * count) for count in counts]


def sample_weights(samples: Sequence[Sample], counts: Sequence[int]) -> list[float]:
    """Per-image draw weights that draw each class equally often (`data.balance=sampler`)."""
    return [1.0 / counts[label] for _, label in samples]


def log_classes(class_names: Sequence[str], splits: dict[str, list[Sample]], balance: str | None) -> None:
    """Logs the images per class, and warns of a strong imbalance that no `data.balance` corrects."""
    totals = [sum(c) for c in zip(*(class_counts(splits[s], len(class_names)) for s in SPLITS), strict=True)]
    log.info("classes: %s", ", ".join(f"{name} {count}" for name, count in zip(class_names, totals, strict=True)))
    ratio = imbalance(class_counts(splits["train"], len(class_names)))
    if ratio >= STRONG_IMBALANCE and balance is None:
        log.warning(
            "strong class imbalance: the largest training class has %.1fx the images of the smallest; "
            "accuracy will favour it. Consider data.balance=sampler or data.balance=loss_weights, and "
            "read the per-class accuracy and F1",
            ratio,
        )
