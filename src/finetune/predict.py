"""Classify images with a trained checkpoint: `python -m finetune.predict checkpoint=<ckpt> input=<image or folder>
output=<csv>`.

One CSV row per image: its path, the predicted class and probability, the next `top_k - 1` classes and theirs, and
an `error` column; a file that cannot be read gets its error in that column and does not stop the others.
"""

from __future__ import annotations

import csv
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import MISSING
from torch.utils.data import DataLoader, Dataset

from finetune import apps
from finetune.data.folders import list_images
from finetune.data.images import IMAGE_EXTENSIONS, load_rgb
from finetune.data.loaders import default_num_workers
from finetune.errors import UsageError, first_line
from finetune.inference.checkpoint import InferenceOptions, LoadedModel, load_model, quiet_lightning, trainer

USAGE = """\
usage: python -m finetune.predict checkpoint=<ckpt> input=<image file or folder> output=<csv> [key=value ...]

  checkpoint   a checkpoint written by train.py, e.g. <run dir>/checkpoints/best.ckpt
  input        an image file, or a folder searched recursively for images (hidden files ignored)
  output       the CSV to write (its folder is created); an existing file is kept unless overwrite=true
  top_k        classes per image in the CSV (default 3; at most the number of classes)
  batch_size   images per forward pass (default 32)
  device       auto (a CUDA GPU when there is one), cpu, cuda or cuda:N (default auto)
  image_size   crop size fed to the network (default: the size the run trained at, where recorded)
  num_workers  image-decoding processes (default: one per CPU core this process may use but one, at most 8)
  overwrite    replace an existing output file (default false)"""


@dataclass
class PredictOptions(InferenceOptions):
    """The options of `python -m finetune.predict` (see USAGE)."""

    input: str = MISSING
    output: str = MISSING
    top_k: int = 3
    overwrite: bool = False


@apps.command("predict", PredictOptions, USAGE)
def main(options: PredictOptions) -> None:
    """`python -m finetune.predict key=value ...`: writes the predictions CSV (`main(argv)` returns the exit
    code)."""
    if options.top_k < 1:
        raise UsageError(f"top_k={options.top_k} must be at least 1")
    output = Path(options.output).expanduser()
    check_output_file(output, options.overwrite)
    paths = find_images(Path(options.input).expanduser(), os.path.expanduser(options.input))
    loaded = load_model(options)
    print(f"{len(paths)} image(s); {loaded.describe()}", file=sys.stderr)
    probabilities, errors = classify(loaded, paths, options.batch_size, options.num_workers)
    top_k = min(options.top_k, len(loaded.class_names))
    write_predictions(output, paths, probabilities, errors, loaded.class_names, top_k)
    print(
        f"predicted {len(paths) - len(errors)} of {len(paths)} image(s), {len(errors)} unreadable; written to {output}"
    )


def check_output_file(output: Path, overwrite: bool) -> None:
    """Refuses a folder, or an existing file unless `overwrite`; checked before any work is done.

    Raises:
        UsageError: `output` is a folder, or an existing file and `overwrite` is off.
    """
    if output.is_dir():
        raise UsageError(f"output={output} is a folder: pass the path of the CSV file to write")
    if output.exists() and not overwrite:
        raise UsageError(f"{output} already exists; pass overwrite=true to replace it, or another output=")


def find_images(path: Path, shown: str | None = None) -> list[str]:
    """The images to classify: `path` itself if it is a file, else every image file under it, sorted.

    A file named explicitly is taken whatever its extension (if it is no image, its row says so). In a folder,
    sub-folders are searched too; hidden files and folders are skipped.

    Args:
        path: an image file or a folder.
        shown: how the user wrote the path; the returned paths start with it.

    Raises:
        UsageError: the path does not exist, or the folder holds no image.
    """
    shown = str(path) if shown is None else shown
    if path.is_file():
        return [shown]
    if not path.is_dir():
        raise UsageError(f"input {path} does not exist; pass input=<image file or folder of images>")
    images = list_images(shown)
    if not images:
        raise UsageError(f"{path} holds no image files (accepted: {', '.join(IMAGE_EXTENSIONS)}, any case)")
    return images


class _ImageFiles(Dataset):
    """(index, image tensor or None, error or None) per path: an unreadable file is a result, not a crash."""

    def __init__(self, paths: Sequence[str], transform) -> None:
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return index, self.transform(load_rgb(self.paths[index])), None
        except Exception as error:  # whatever a damaged file makes Pillow raise, it is that file's problem
            reason = str(error).strip()
            return index, None, f"{type(error).__name__}: {first_line(error)}" if reason else type(error).__name__


def _collate(items: list[tuple[int, torch.Tensor | None, str | None]]):
    """A batch of the readable images, their indices, and the errors of the others."""
    readable = [(index, image) for index, image, _ in items if image is not None]
    errors = {index: error for index, _, error in items if error is not None}
    images = torch.stack([image for _, image in readable]) if readable else None
    return [index for index, _ in readable], images, errors


def classify(
    loaded: LoadedModel, paths: Sequence[str], batch_size: int, num_workers: int | None
) -> tuple[torch.Tensor, dict[int, str]]:
    """Class probabilities of every image, batched, through Lightning's `Trainer.predict` (eval mode, no autograd).

    Args:
        loaded: the model, its device and preprocessing (`finetune.inference.checkpoint.load_model`).
        paths: image files.
        batch_size: images per forward pass.
        num_workers: decoding processes; None: `finetune.data.loaders.default_num_workers()`.

    Returns:
        probabilities: (len(paths), number of classes), on the CPU; rows of unreadable images are NaN.
        errors: by index into `paths`, why the image could not be read.
    """
    # Imported here: `--help` and option errors answer without importing Lightning.
    import lightning as L

    from finetune.data.transforms import eval_transform

    class Probabilities(L.LightningModule):
        """The classifier's softmax over a batch of `_ImageFiles`, with the batch's indices and errors."""

        def __init__(self, classifier: L.LightningModule) -> None:
            super().__init__()
            self.classifier = classifier

        def predict_step(self, batch):
            indices, images, errors = batch
            probabilities = None if images is None else self.classifier(images).float().softmax(dim=1).cpu()
            return indices, probabilities, errors

    num_workers = default_num_workers() if num_workers is None else num_workers
    dataset = _ImageFiles(paths, eval_transform(loaded.preprocessing))
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=loaded.device.type == "cuda",
    )
    probabilities = torch.full((len(paths), len(loaded.class_names)), float("nan"))
    errors: dict[int, str] = {}
    with quiet_lightning():
        batches = trainer(loaded.device).predict(Probabilities(loaded.model), dataloaders=loader)
    for indices, batch_probabilities, batch_errors in batches:
        errors |= batch_errors
        if batch_probabilities is not None:
            probabilities[indices] = batch_probabilities
    return probabilities, errors


def write_predictions(
    output: Path,
    paths: Sequence[str],
    probabilities: torch.Tensor,
    errors: dict[int, str],
    class_names: Sequence[str],
    top_k: int,
) -> None:
    """Writes the CSV: path, class, probability, top2_class, top2_probability, ..., error; one row per image.

    It is written to a temporary file and renamed into place, so an interrupted run leaves no half CSV behind.
    """
    header = ["path", "class", "probability"]
    for rank in range(2, top_k + 1):
        header += [f"top{rank}_class", f"top{rank}_probability"]
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.partial")
    values, classes = probabilities.topk(top_k, dim=1)
    with open(partial, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow([*header, "error"])
        for index, path in enumerate(paths):
            if index in errors:
                writer.writerow([path, *[""] * (len(header) - 1), errors[index]])
                continue
            ranked = []
            for value, label in zip(values[index].tolist(), classes[index].tolist(), strict=True):
                ranked += [class_names[label], f"{value:.6f}"]
            writer.writerow([path, *ranked, ""])
    os.replace(partial, output)


if __name__ == "__main__":
    sys.exit(main())
