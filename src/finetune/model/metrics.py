"""The metrics of a classifier, defined once.

Training, validation and testing (`ImageClassifier`, as `train/...`, `val/...`, `test/...`), test-time augmentation
(`finetune.training.tta`, as `test_tta/...`) and `python -m finetune.evaluate` (which runs `Trainer.test`, so its
numbers are `test/...` too) use the collection built here:

| key                      | what                                                                      |
|--------------------------|---------------------------------------------------------------------------|
| `acc`                    | accuracy (micro: correct images / images)                                 |
| `f1`                     | macro F1: the mean of the per-class F1 over the classes that occur in the |
|                          | targets or the predictions                                                |
| `balanced_acc`           | mean per-class recall, over the same classes                              |
| `acc_top5`               | top-5 accuracy (more than 5 classes only)                                 |
| `precision_class/<name>` | each class's precision, recall (its accuracy) and F1 (0 where undefined,  |
| `recall_class/<name>`    | as in torchmetrics); `<name>` is the class name, or its label where the   |
| `f1_class/<name>`        | names are not given                                                       |

The study report scores the runs' saved predictions (`test_predictions.csv`) with `predicted_confusion` and
`predicted_macro_f1`: torchmetrics' functional forms of the same confusion matrix and macro F1.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)
from torchmetrics.functional.classification import multiclass_confusion_matrix, multiclass_f1_score
from torchmetrics.wrappers import ClasswiseWrapper

# After a reset, the metrics a ClasswiseWrapper holds share their compute group's updated state but not its update
# count, so torchmetrics warns at every epoch's compute that they were never updated; their values are right (tested
# in tests/test_evaluate.py against a fresh collection).
warnings.filterwarnings(
    "ignore", message=r"The ``compute`` method of metric Multiclass(Precision|Recall|F1Score) was called before"
)

ArrayLike = torch.Tensor | np.ndarray | Sequence[int]
PER_CLASS = {"precision": MulticlassPrecision, "recall": MulticlassRecall, "f1": MulticlassF1Score}


def classification_metrics(
    num_classes: int, class_names: Sequence[str] | None = None, prefix: str | None = None
) -> MetricCollection:
    """The metric collection (see the module docstring); its keys start with `prefix` (e.g. "val/").

    Every metric but `acc` and `acc_top5` counts per-class true and false positives and negatives, so the
    collection (compute groups, on by default) updates those counts once per batch for all of them. The per-class
    scores are torchmetrics' `ClasswiseWrapper`s: each computes a dict of scalars (loggers take scalars), which the
    collection's `compute()` flattens into its keys.

    Args:
        num_classes: the number of classes.
        class_names: the names in label order, for the per-class keys; None names them by label.
        prefix: put in front of every key.
    """
    names = list(class_names) if class_names is not None else [str(label) for label in range(num_classes)]
    metrics = {
        "acc": MulticlassAccuracy(num_classes, average="micro"),
        "f1": MulticlassF1Score(num_classes, average="macro"),
        "balanced_acc": MulticlassRecall(num_classes, average="macro"),
    }
    if num_classes > 5:
        metrics["acc_top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    for score, metric in PER_CLASS.items():
        metrics[f"{score}_class"] = ClasswiseWrapper(metric(num_classes, average=None), names, prefix=class_key(score))
    return MetricCollection(metrics, prefix=prefix)


def class_key(score: str, name: str = "") -> str:
    """The key of one class's score, e.g. `f1_class/cat` (without a name: the keys' common start)."""
    return f"{score}_class/{name}"


def confusion_matrix(num_classes: int) -> MulticlassConfusionMatrix:
    """Counts per (true class, predicted class): rows are true classes, columns predicted ones."""
    return MulticlassConfusionMatrix(num_classes)


def predicted_confusion(labels: ArrayLike, predicted: ArrayLike, num_classes: int) -> torch.Tensor:
    """`confusion_matrix` of predicted labels (integer tensors or arrays, not logits), in one call."""
    return multiclass_confusion_matrix(torch.as_tensor(predicted), torch.as_tensor(labels), num_classes)


def predicted_macro_f1(labels: ArrayLike, predicted: ArrayLike, num_classes: int) -> float:
    """The collection's `f1` of predicted labels (integer tensors or arrays, not logits), in one call: cheap
    enough for a bootstrap.

    `validate_args=False`: the callers' labels and predictions are below `num_classes` by construction, and the
    check would take most of the call's time.
    """
    predicted, labels = torch.as_tensor(predicted), torch.as_tensor(labels)
    return float(multiclass_f1_score(predicted, labels, num_classes, average="macro", validate_args=False))
