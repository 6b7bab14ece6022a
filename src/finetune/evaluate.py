"""Score a trained checkpoint on a labelled image folder: `python -m finetune.evaluate checkpoint=<ckpt>
data.root=<folder with one sub-folder per class>`.

Accuracy, macro F1, per-class precision / recall / F1 / support and the confusion matrix (torchmetrics), printed
and written as `metrics.json`, `per_class.csv` and `confusion_matrix.png` into `output` (default:
`<run dir>/evaluation/<data.root folder name>/`). `split=test` scores the run's own test images instead (from its
`split.csv`). The data folder is only read.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from finetune.cli import (
    InferenceOptions,
    LoadedModel,
    checkpoint_file,
    load_model,
    parse_options,
    read_checkpoint,
    run_command,
    run_config,
    run_dir,
)
from finetune.errors import UsageError
from finetune.plots import confusion_matrix_figure
from finetune.predict import classify, list_images

USAGE = """\
usage: python -m finetune.evaluate checkpoint=<ckpt> data.root=<labelled folder> [key=value ...]

  checkpoint   a checkpoint written by train.py, e.g. <run dir>/checkpoints/last.ckpt
  data.root    one sub-folder of images per class (class names as in training; a subset is fine)
  split        train, val or test: score that part of the run's own split (its split.csv) instead of a whole
               folder; data.root then defaults to the run's
  output       the folder to write into (default <run dir>/evaluation/<data.root name>[-<split>]/)
  batch_size   images per forward pass (default 32)
  device       auto (a CUDA GPU when there is one), cpu, cuda or cuda:N (default auto)
  image_size   crop size fed to the network (default: the size the run trained at, where recorded)
  num_workers  image-decoding processes (default: one per CPU core but one, at most 8)"""

FILES = ("metrics.json", "per_class.csv", "confusion_matrix.png")
SPLIT_FOLDERS = {"train", "val", "test"}


@dataclass
class DataOptions:
    """`data.root`: the labelled folder (required unless `split` is given)."""

    root: str | None = None


@dataclass
class EvaluateOptions(InferenceOptions):
    """The options of `python -m finetune.evaluate` (see USAGE)."""

    data: DataOptions = field(default_factory=DataOptions)
    split: str | None = None
    output: str | None = None


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m finetune.evaluate key=value ...`: prints and writes the metrics; returns the exit code."""
    return run_command(_evaluate, argv)


def _evaluate(argv: list[str]) -> None:
    options: EvaluateOptions = parse_options(EvaluateOptions, argv, USAGE)
    checkpoint = checkpoint_file(options.checkpoint)
    root = data_root(options.data.root, options.split, checkpoint)
    output = output_folder(options.output, checkpoint, root, options.split)
    # The class names are in the checkpoint's hyperparameters: a wrong folder fails before the model loads.
    class_names = list(read_checkpoint(checkpoint)["hyper_parameters"]["class_names"])
    if options.split is None:
        samples = class_folder_images(root, class_names)
    else:
        samples = split_images(root, options.split, checkpoint, class_names)
    loaded = load_model(options)
    print(f"{len(samples)} image(s) of {root}{f' ({options.split} split)' if options.split else ''}; "
          f"{loaded.describe()}", file=sys.stderr)
    metrics = {"checkpoint": str(checkpoint.resolve()), "data_root": str(root.resolve()), "split": options.split,
               "image_size": loaded.preprocessing.crop_size, **score(loaded, samples, options)}
    write_results(output, metrics, title=f"{root.name}{f' ({options.split})' if options.split else ''}")
    print(format_table(metrics))
    print(f"written to {output}: {', '.join(FILES)}")


def score(loaded: LoadedModel, samples: Sequence[tuple[str, int]], options: InferenceOptions) -> dict:
    """Classifies the labelled images and computes the metrics (`compute_metrics`) over the readable ones.

    Returns:
        The metrics, and `unreadable`: path to error for every image that could not be read (left out).

    Raises:
        UsageError: not one image could be read.
    """
    paths = [path for path, _ in samples]
    probabilities, errors = classify(loaded, paths, options.batch_size, options.num_workers)
    if len(errors) == len(paths):
        raise UsageError(f"none of the {len(paths)} image(s) could be read; the first: {paths[0]}: {errors[0]}")
    kept = [index for index in range(len(paths)) if index not in errors]
    targets = torch.tensor([samples[index][1] for index in kept])
    metrics = compute_metrics(probabilities[kept].argmax(dim=1), targets, loaded.class_names)
    return {"unreadable": {paths[index]: error for index, error in sorted(errors.items())}, **metrics}


def data_root(root: str | None, split: str | None, checkpoint: Path) -> Path:
    """The labelled folder: `data.root`, or with `split` and no `data.root` the folder the run trained on.

    Raises:
        UsageError: no folder given and none to be found, or not a folder.
    """
    if root is None:
        if split is None:
            raise UsageError("missing data.root=<folder with one sub-folder of images per class> "
                             "(or split=test to score the run's own test images)")
        config = run_config(checkpoint)
        if config is None:
            raise UsageError(f"split={split}: no training configuration at {run_dir(checkpoint) / '.hydra'} to "
                             "find the run's data folder in; pass data.root=<the folder the run trained on>")
        if config.data.get("root") is None:
            from finetune.demo import demo_root

            return demo_root(config.data.get("demo", "elpv"))
        root = str(config.data.root)
    path = Path(root).expanduser()
    if not path.is_dir():
        raise UsageError(f"data.root {path} is not a folder; pass data.root=<folder with one sub-folder of images "
                         "per class>")
    return path


def output_folder(output: str | None, checkpoint: Path, root: Path, split: str | None) -> Path:
    """Where the results go: `output`, or `<run dir>/evaluation/<data root name>[-<split>]/`.

    Raises:
        UsageError: the folder would be inside the data folder, which is only ever read.
    """
    if output is not None:
        folder = Path(output).expanduser()
    else:
        folder = run_dir(checkpoint) / "evaluation" / (root.resolve().name + (f"-{split}" if split else ""))
    if folder.resolve().is_relative_to(root.resolve()):
        raise UsageError(f"the results would go to {folder}, inside data.root {root}, which is only ever read; "
                         "pass output=<a folder elsewhere>")
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"output={folder} is a file: pass a folder")
    return folder


def class_folder_images(root: Path, class_names: Sequence[str]) -> list[tuple[str, int]]:
    """(path, label) of every image in the class sub-folders of `root` (recursive, hidden entries skipped).

    Raises:
        UsageError: no class folder, a folder the checkpoint has no class for, or no image at all.
    """
    folders = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
    if not folders:
        raise UsageError(f"{root} holds no class folders: data.root needs one sub-folder of images per class")
    _check_known(folders, class_names, f"{root}")
    samples = [(os.path.join(root, name, relative), class_names.index(name))
               for name in folders for relative in list_images(root / name)]
    if not samples:
        raise UsageError(f"the class folders of {root} hold no image files")
    return samples


def split_images(root: Path, split: str, checkpoint: Path, class_names: Sequence[str]) -> list[tuple[str, int]]:
    """(path, label) of the images the run put in `split`, from its split.csv, relative to `root`.

    Raises:
        UsageError: no split.csv, no such split in it, or classes the checkpoint does not know.
    """
    path = run_dir(checkpoint) / "split.csv"
    if not path.is_file():
        raise UsageError(f"split={split} reads the run's split.csv, and {path} does not exist; "
                         "pass data.root=<labelled folder> without split=")
    with open(path, newline="") as file:
        rows = list(csv.DictReader(file))
    chosen = [row for row in rows if row["split"] == split]
    if not chosen:
        available = sorted({row["split"] for row in rows})
        raise UsageError(f"{path} has no {split!r} images; its splits: {', '.join(available)}")
    _check_known(sorted({row["class"] for row in chosen}), class_names, str(path))
    return [(str(root / row["path"]), class_names.index(row["class"])) for row in chosen]


def _check_known(found: Sequence[str], class_names: Sequence[str], where: str) -> None:
    unknown = [name for name in found if name not in class_names]
    if not unknown:
        return
    hint = ""
    if set(found) & SPLIT_FOLDERS:
        hint = "; a folder of train/val/test sub-folders: pass data.root=<it>/test, or split=test"
    raise UsageError(f"{where} has classes the checkpoint does not know: {', '.join(unknown)}; it knows "
                     f"{', '.join(class_names)} (a subset of them is fine){hint}")


def compute_metrics(predictions: torch.Tensor, targets: torch.Tensor, class_names: Sequence[str]) -> dict:
    """Accuracy, macro F1, per-class precision / recall / F1 / support, and the confusion matrix.

    Every class of the checkpoint gets a row, present in the data or not (a model can predict an absent class).
    Macro F1 is torchmetrics': the mean over the classes that occur in the targets or the predictions.

    Args:
        predictions: predicted labels.
        targets: true labels.
        class_names: the checkpoint's classes, in label order.

    Returns:
        `accuracy`, `macro_f1`, `images`, `classes`, `per_class` (class name to precision, recall, f1, support)
        and `confusion_matrix` (rows: true class, columns: predicted, in `classes` order).
    """
    from torchmetrics.functional.classification import (
        multiclass_accuracy,
        multiclass_confusion_matrix,
        multiclass_f1_score,
        multiclass_precision,
        multiclass_recall,
    )

    n = len(class_names)
    confusion = multiclass_confusion_matrix(predictions, targets, n)
    columns = {
        "precision": multiclass_precision(predictions, targets, n, average=None),
        "recall": multiclass_recall(predictions, targets, n, average=None),
        "f1": multiclass_f1_score(predictions, targets, n, average=None),
    }
    per_class = {name: {key: float(values[label]) for key, values in columns.items()}
                 | {"support": int(confusion[label].sum())} for label, name in enumerate(class_names)}
    return {
        "accuracy": float(multiclass_accuracy(predictions, targets, n, average="micro")),
        "macro_f1": float(multiclass_f1_score(predictions, targets, n, average="macro")),
        "images": len(targets),
        "classes": list(class_names),
        "per_class": per_class,
        "confusion_matrix": confusion.tolist(),
    }


def write_results(output: Path, metrics: dict, title: str) -> None:
    """Writes metrics.json, per_class.csv and confusion_matrix.png into `output` (created if needed)."""
    output.mkdir(parents=True, exist_ok=True)
    (output / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    with open(output / "per_class.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["class", "precision", "recall", "f1", "support"])
        for name, row in metrics["per_class"].items():
            writer.writerow([name, *(f"{row[key]:.6f}" for key in ("precision", "recall", "f1")), row["support"]])
    plot_confusion_matrix(metrics["confusion_matrix"], metrics["classes"],
                          f"{title}: accuracy {metrics['accuracy']:.3f}, {metrics['images']} images",
                          output / "confusion_matrix.png")


def plot_confusion_matrix(confusion: Sequence[Sequence[int]], class_names: Sequence[str], title: str,
                          path: Path) -> None:
    """Writes the confusion matrix (rows: true class, columns: predicted) as a PNG."""
    confusion_matrix_figure(confusion, class_names, title).savefig(path, dpi=120)


def format_table(metrics: dict) -> str:
    """The per-class table and the overall scores, as printed."""
    width = max(len("class"), *(len(name) for name in metrics["classes"]))
    lines = [f"{'class':<{width}}  {'precision':>9}  {'recall':>9}  {'f1':>9}  {'support':>8}"]
    for name, row in metrics["per_class"].items():
        lines.append(f"{name:<{width}}  {row['precision']:>9.4f}  {row['recall']:>9.4f}  {row['f1']:>9.4f}  "
                     f"{row['support']:>8,}")
    unreadable = len(metrics["unreadable"])
    skipped = f"; {unreadable} unreadable image(s) skipped (listed in metrics.json)" if unreadable else ""
    lines.append(f"accuracy {metrics['accuracy']:.4f}, macro F1 {metrics['macro_f1']:.4f} on "
                 f"{metrics['images']:,} images{skipped}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
