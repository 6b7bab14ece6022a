"""Score a trained checkpoint on a labelled image folder: `python -m finetune.evaluate checkpoint=<ckpt>
data.root=<folder with one sub-folder per class>`.

It runs Lightning's `Trainer.test` on the folder, so the scores are the model's own test metrics, under the names
training gives them (`test/acc`, `test/f1`, `test/balanced_acc`, `test/loss`, ...; `finetune.model.metrics`), plus
per-class precision / recall / F1 / support and the confusion matrix: printed and written as `metrics.json`,
`per_class.csv` and `confusion_matrix.png` into `output` (default: `<run dir>/evaluation/<data.root folder
name>/`). `split=test` scores the run's own test images instead (from its `split.csv`). Unreadable images are
left out and listed. The data folder is only read.
"""

from __future__ import annotations

import csv
import enum
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from finetune import apps
from finetune.data.loaders import default_num_workers
from finetune.data.scan import unreadable_images
from finetune.errors import UsageError
from finetune.inference.checkpoint import (
    InferenceOptions,
    LoadedModel,
    checkpoint_file,
    load_model,
    quiet_lightning,
    read_checkpoint,
    run_config,
    run_dir,
    trainer,
)
from finetune.inference.labelled import LabelledImages, class_folder_images, split_images
from finetune.model.metrics import PER_CLASS, class_key
from finetune.model.plots import confusion_matrix_figure

USAGE = """\
usage: python -m finetune.evaluate checkpoint=<ckpt> data.root=<labelled folder> [key=value ...]

  checkpoint   a checkpoint written by train.py, e.g. <run dir>/checkpoints/best.ckpt
  data.root    one sub-folder of images per class (class names as in training; a subset is fine)
  split        train, val or test: score that part of the run's own split (its split.csv) instead of a whole
               folder; data.root then defaults to the run's
  output       the folder to write into (default <run dir>/evaluation/<data.root name>[-<split>]/)
  batch_size   images per forward pass (default 32)
  device       auto (a CUDA GPU when there is one), cpu, cuda or cuda:N (default auto)
  image_size   crop size fed to the network (default: the size the run trained at, where recorded)
  num_workers  image-decoding processes (default: one per CPU core this process may use but one, at most 8)"""

FILES = ("metrics.json", "per_class.csv", "confusion_matrix.png")
SUMMARY = ("test/acc", "test/f1", "test/balanced_acc", "test/loss")  # the line printed under the table


class Split(enum.Enum):
    """A part of the run's own split (its split.csv)."""

    train = "train"
    val = "val"
    test = "test"


@dataclass
class DataOptions:
    """`data.root`: the labelled folder (required unless `split` is given)."""

    root: str | None = None


@dataclass
class EvaluateOptions(InferenceOptions):
    """The options of `python -m finetune.evaluate` (see USAGE)."""

    data: DataOptions = field(default_factory=DataOptions)
    split: Split | None = None
    output: str | None = None


@apps.command("evaluate", EvaluateOptions, USAGE)
def main(options: EvaluateOptions) -> None:
    """`python -m finetune.evaluate key=value ...`: prints and writes the metrics (`main(argv)` returns the exit
    code)."""
    split = options.split.name if options.split is not None else None
    checkpoint = checkpoint_file(options.checkpoint)
    root = data_root(options.data.root, split, checkpoint)
    output = output_folder(options.output, checkpoint, root, split)
    # The class names are in the checkpoint's hyperparameters: a wrong folder fails before the model loads.
    class_names = list(read_checkpoint(checkpoint)["hyper_parameters"]["class_names"])
    if split is None:
        samples = class_folder_images(root, class_names)
    else:
        samples = split_images(root, split, checkpoint, class_names)
    loaded = load_model(options)
    print(
        f"{len(samples)} image(s) of {root}{f' ({split} split)' if split else ''}; {loaded.describe()}", file=sys.stderr
    )
    results = {
        "checkpoint": str(checkpoint.resolve()),
        "data_root": str(root.resolve()),
        "split": split,
        "image_size": loaded.preprocessing.crop_size,
        **score(loaded, samples, options),
    }
    write_results(output, results, title=f"{root.name}{f' ({split})' if split else ''}")
    print(format_table(results))
    print(f"written to {output}: {', '.join(FILES)}")


def score(loaded: LoadedModel, samples: Sequence[tuple[str, int]], options: InferenceOptions) -> dict:
    """Runs `Trainer.test` over the readable labelled images: the model's own test metrics, and the confusion
    matrix and per-class table behind them.

    Images that cannot be decoded (`finetune.data.scan`, as training finds them) are left out.

    Returns:
        `unreadable` (path to why, for each image left out), the model's `test/...` metrics, `images`,
        `classes`, `per_class` (class name to precision, recall, f1, support) and `confusion_matrix` (rows: true
        class, columns: predicted, in `classes` order).

    Raises:
        UsageError: not one image could be read.
    """
    unreadable = unreadable_images([path for path, _ in samples], None)
    if len(unreadable) == len(samples):
        path, reason = next(iter(unreadable.items()))
        raise UsageError(f"none of the {len(samples)} image(s) could be read; the first: {path}: {reason}")
    kept = [(path, label) for path, label in samples if path not in unreadable]
    class_names = loaded.class_names
    data = LabelledImages(
        kept,
        loaded.preprocessing,
        options.batch_size,
        default_num_workers() if options.num_workers is None else options.num_workers,
    )
    with quiet_lightning():
        (results,) = trainer(loaded.device).test(loaded.model, datamodule=data, verbose=False)
    matrix = loaded.model.confusion_matrices["test"]  # the model's own, of this test
    return {
        "unreadable": unreadable,
        **results,
        "images": len(kept),
        "classes": list(class_names),
        "per_class": per_class_table(results, matrix, class_names),
        "confusion_matrix": matrix.tolist(),
    }


def per_class_table(
    results: dict[str, float], confusion: torch.Tensor, class_names: Sequence[str]
) -> dict[str, dict[str, float]]:
    """Every class's precision, recall and F1 (the test's `test/<score>_class/<name>`) and support (its images)."""
    return {
        name: {score: results[f"test/{class_key(score, name)}"] for score in PER_CLASS}
        | {"support": int(confusion[label].sum())}
        for label, name in enumerate(class_names)
    }


def data_root(root: str | None, split: str | None, checkpoint: Path) -> Path:
    """The labelled folder: `data.root`, or with `split` and no `data.root` the folder the run trained on.

    Raises:
        UsageError: no folder given and none to be found, or not a folder.
    """
    if root is None:
        if split is None:
            raise UsageError(
                "missing data.root=<folder with one sub-folder of images per class> "
                "(or split=test to score the run's own test images)"
            )
        config = run_config(checkpoint)
        if config is None:
            raise UsageError(
                f"split={split}: no training configuration at {run_dir(checkpoint) / '.hydra'} to "
                "find the run's data folder in; pass data.root=<the folder the run trained on>"
            )
        if config.data.get("root") is None:
            from finetune.data.demo import demo_root

            return demo_root(config.data.get("demo", "elpv"))
        root = str(config.data.root)
    path = Path(root).expanduser()
    if not path.is_dir():
        raise UsageError(
            f"data.root {path} is not a folder; pass data.root=<folder with one sub-folder of images per class>"
        )
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
        raise UsageError(
            f"the results would go to {folder}, inside data.root {root}, which is only ever read; "
            "pass output=<a folder elsewhere>"
        )
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"output={folder} is a file: pass a folder")
    return folder


def write_results(output: Path, metrics: dict, title: str) -> None:
    """Writes metrics.json, per_class.csv and confusion_matrix.png into `output` (created if needed)."""
    output.mkdir(parents=True, exist_ok=True)
    (output / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    with open(output / "per_class.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["class", "precision", "recall", "f1", "support"])
        for name, row in metrics["per_class"].items():
            writer.writerow([name, *(f"{row[key]:.6f}" for key in ("precision", "recall", "f1")), row["support"]])
    plot_confusion_matrix(
        metrics["confusion_matrix"],
        metrics["classes"],
        f"{title}: test/acc {metrics['test/acc']:.3f}, {metrics['images']} images",
        output / "confusion_matrix.png",
    )


def plot_confusion_matrix(
    confusion: Sequence[Sequence[int]], class_names: Sequence[str], title: str, path: Path
) -> None:
    """Writes the confusion matrix (rows: true class, columns: predicted) as a PNG."""
    confusion_matrix_figure(confusion, class_names, title).savefig(path, dpi=120)


def format_table(metrics: dict) -> str:
    """The per-class table and the overall scores, as printed."""
    width = max(len("class"), *(len(name) for name in metrics["classes"]))
    lines = [f"{'class':<{width}}  {'precision':>9}  {'recall':>9}  {'f1':>9}  {'support':>8}"]
    for name, row in metrics["per_class"].items():
        lines.append(
            f"{name:<{width}}  {row['precision']:>9.4f}  {row['recall']:>9.4f}  {row['f1']:>9.4f}  {row['support']:>8,}"
        )
    unreadable = len(metrics["unreadable"])
    skipped = f"; {unreadable} unreadable image(s) skipped (listed in metrics.json)" if unreadable else ""
    scores = ", ".join(f"{key} {metrics[key]:.4f}" for key in SUMMARY if key in metrics)
    lines.append(f"{scores} on {metrics['images']:,} images{skipped}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
