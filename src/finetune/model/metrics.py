"""The metrics of a classifier, defined once.

Training, validation and testing (`ImageClassifier`, as `train/...`, `val/...`, `test/...`) and
`python -m finetune.evaluate` (which runs `Trainer.test`, so its numbers are `test/...` too) use the collection
built here:

| key                      | what                                                                      |
|--------------------------|---------------------------------------------------------------------------|
| `acc`                    | accuracy (micro: correct images / images)                                 |
| `f1`                     | macro F1: the mean of the per-class F1 over the classes that occur in the |
|                          | targets or the predictions                                                |
| `balanced_acc`           | mean per-class recall, over the same classes                              |
| `acc_top5`               | top-5 accuracy (more than 5 classes only)                                 |
| `precision_class/<name>` | each class's precision, recall and F1 (0 where undefined, as in           |
| `recall_class/<name>`    | torchmetrics); `<name>` is the class name, or its label where the names   |
| `f1_class/<name>`        | are not given                                                             |
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassRecall,
    MulticlassStatScores,
)

SCORES = ("precision", "recall", "f1")


def classification_metrics(num_classes: int, class_names: Sequence[str] | None = None) -> dict[str, Metric]:
    """The metric collection (see the module docstring), unprefixed: wrap it in a `MetricCollection` and clone it
    per stage (`clone(prefix="val/")`).

    Every metric but `acc` and `acc_top5` counts per-class true and false positives and negatives, so a
    MetricCollection (compute groups, on by default) updates those counts once per batch for all of them.

    Args:
        num_classes: the number of classes.
        class_names: the names in label order, for the per-class keys; None names them by label.
    """
    metrics: dict[str, Metric] = {
        "acc": MulticlassAccuracy(num_classes, average="micro"),
        "f1": MulticlassF1Score(num_classes, average="macro"),
        "balanced_acc": MulticlassRecall(num_classes, average="macro"),
    }
    if num_classes > 5:
        metrics["acc_top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    names = list(class_names) if class_names is not None else [str(label) for label in range(num_classes)]
    for score in SCORES:
        for label, name in enumerate(names):
            metrics[class_key(score, name)] = ClassScore(num_classes, label, score)
    return metrics


def class_key(score: str, name: str) -> str:
    """The key of one class's score: `f1_class/cat`. A dot would break torch's module names: it becomes `_`."""
    return f"{score}_class/{name.replace('.', '_')}"


def confusion_matrix(num_classes: int) -> MulticlassConfusionMatrix:
    """Counts per (true class, predicted class): rows are true classes, columns predicted ones."""
    return MulticlassConfusionMatrix(num_classes)


class ClassScore(MulticlassStatScores):
    """One class's precision, recall or F1, as a scalar metric (loggers take scalars).

    It keeps the per-class counts every macro metric keeps, so in a MetricCollection it shares their update.

    Args:
        num_classes: the number of classes.
        label: the class.
        score: "precision", "recall" or "f1".
    """

    def __init__(self, num_classes: int, label: int, score: str, **kwargs) -> None:
        if score not in SCORES:
            raise ValueError(f"score={score!r}: choose one of {', '.join(SCORES)}")
        super().__init__(num_classes, average=None, **kwargs)
        self.label, self.score = label, score

    def compute(self) -> torch.Tensor:
        tp, fp, _, fn = self._final_state()
        return scores(tp, fp, fn)[self.score][self.label]


def scores(tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-class precision, recall and F1 from the per-class counts; 0 where a denominator is 0 (torchmetrics'
    convention)."""
    return {"precision": _ratio(tp, tp + fp), "recall": _ratio(tp, tp + fn), "f1": _ratio(2 * tp, 2 * tp + fp + fn)}


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    return torch.where(denominator > 0, numerator.float() / denominator.clamp(min=1), 0.0)


def per_class(confusion: torch.Tensor, class_names: Sequence[str]) -> dict[str, dict[str, float]]:
    """Every class's precision, recall, F1 and support (its true images), from a confusion matrix.

    Args:
        confusion: rows true classes, columns predicted, in `class_names` order.
        class_names: the classes.
    """
    confusion = torch.as_tensor(confusion)
    tp = confusion.diag()
    columns = scores(tp, confusion.sum(dim=0) - tp, confusion.sum(dim=1) - tp)
    return {
        name: {score: float(values[label]) for score, values in columns.items()}
        | {"support": int(confusion[label].sum())}
        for label, name in enumerate(class_names)
    }
