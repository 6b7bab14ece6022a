"""What predict, evaluate and export share: the options of a trained checkpoint, loading it for inference
(device, image size), and the Lightning Trainer predict and evaluate run it with.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from finetune.errors import UsageError, first_line
from finetune.model.preprocessing import Preprocessing

DEVICES = ("auto", "cpu", "cuda")


@dataclass
class InferenceOptions:
    """The options of every command that runs a trained checkpoint over images.

    Attributes:
        checkpoint: a checkpoint written by train.py (`<run dir>/checkpoints/best.ckpt`, the one metrics.json
            scores, or `last.ckpt`), or the run folder (its `checkpoints/best.ckpt`).
        batch_size: images per forward pass.
        device: "auto" (a CUDA GPU when there is one), "cpu", "cuda" or "cuda:N".
        image_size: crop size fed to the network; None: the size the run trained at, where it is recorded,
            else the checkpoint's (the pretrained weights') own.
        num_workers: image-decoding processes; None: `finetune.data.loaders.default_num_workers` (one per CPU core
            this process may use, a SLURM job's allocation, but one; at most 8), as in training.
    """

    checkpoint: str = MISSING
    batch_size: int = 32
    device: str = "auto"
    image_size: int | None = None
    num_workers: int | None = None


@dataclass
class LoadedModel:
    """A trained classifier, in eval mode on its device, with the preprocessing its images get.

    Attributes:
        model: the `finetune.model.module.ImageClassifier`.
        device: where it runs.
        preprocessing: the checkpoint's preprocessing at the chosen image size.
        size_source: where that size comes from, for the log line ("image_size=", "the run's config", ...).
        checkpoint: the checkpoint file.
    """

    model: Any
    device: torch.device
    preprocessing: Preprocessing
    size_source: str
    checkpoint: Path

    @property
    def class_names(self) -> list[str]:
        return self.model.class_names

    def describe(self) -> str:
        """One line: what runs where, at which size."""
        return (
            f"{self.checkpoint}: {self.model.hparams.name}, {len(self.class_names)} classes; image size "
            f"{self.preprocessing.crop_size} ({self.size_source}); device {self.device}"
        )


def load_model(options: InferenceOptions) -> LoadedModel:
    """Loads the checkpoint for inference: eval mode, on the chosen device, at the chosen image size.

    Raises:
        UsageError: no such checkpoint, an unreadable one, a bad device or batch size.
    """
    if options.batch_size < 1:
        raise UsageError(f"batch_size={options.batch_size} must be at least 1")
    if options.num_workers is not None and options.num_workers < 0:
        raise UsageError(f"num_workers={options.num_workers} must be 0 (load in the main process) or more")
    device = resolve_device(options.device)
    path = checkpoint_file(options.checkpoint)
    read_checkpoint(path)
    # Imported here: `--help` and option errors answer without importing Lightning.
    from finetune.model.module import ImageClassifier

    try:
        model = ImageClassifier.from_checkpoint(str(path), map_location=device)
    except (RuntimeError, KeyError, TypeError, ValueError) as error:
        # A checkpoint of another version of the model (other arguments, other weight names): one line.
        raise UsageError(
            f"cannot load checkpoint {path} ({first_line(error)}); pass a .ckpt file written by train.py"
        ) from error
    model.eval()
    size, source = image_size(options.image_size, path, model.preprocessing)
    return LoadedModel(model, device, model.preprocessing.at_size(size), source, path)


def resolve_device(name: str) -> torch.device:
    """ "auto" is a CUDA GPU when there is one, else the CPU.

    Raises:
        UsageError: an unknown device, or CUDA asked for where there is none.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.split(":")[0] not in DEVICES:
        raise UsageError(f"unknown device={name}: choose one of {', '.join(DEVICES)} (or cuda:N)")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise UsageError(f"unknown device={name}: choose one of {', '.join(DEVICES)} (or cuda:N)") from error
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise UsageError(f"device={name}, but torch sees no CUDA GPU here; use device=auto or device=cpu")
        if device.index is not None and device.index >= count:
            choices = ", ".join(f"cuda:{index}" for index in range(count))
            raise UsageError(f"device={name}, but torch sees {count} CUDA GPU(s): {choices}")
    return device


def checkpoint_file(text: str) -> Path:
    """The checkpoint file named by the user, checked to exist; a run folder names its best model,
    `checkpoints/best.ckpt`.

    Raises:
        UsageError: it does not exist, or it is a folder without `checkpoints/best.ckpt` (the message lists the
            checkpoints inside it).
    """
    path = Path(text).expanduser()
    if (path / "checkpoints" / "best.ckpt").is_file():
        return path / "checkpoints" / "best.ckpt"
    if path.is_dir():
        found = sorted(str(p) for p in path.rglob("*.ckpt"))[:5]
        listed = f"; found: {', '.join(found)}" if found else "; it holds no .ckpt file"
        raise UsageError(f"checkpoint={path} is a folder without checkpoints/best.ckpt: pass a .ckpt file{listed}")
    if not path.is_file():
        raise UsageError(f"checkpoint {path} does not exist; pass checkpoint=<run dir>/checkpoints/best.ckpt")
    return path


def read_checkpoint(path: Path) -> dict:
    """The checkpoint's contents, memory-mapped (the weights are not read), checked to be train.py's.

    Raises:
        UsageError: torch cannot read the file, or it is no checkpoint of a `finetune` classifier.
    """
    try:
        contents = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # pickle, zip and torch errors alike: the file is not what it should be
        raise UsageError(
            f"{path} is not a checkpoint torch can read ({type(error).__name__}); pass a .ckpt file written by train.py"
        ) from error
    if (
        not isinstance(contents, dict)
        or "state_dict" not in contents
        or "class_names" not in contents.get("hyper_parameters", {})
    ):
        raise UsageError(f"{path} is not a checkpoint written by train.py (no state_dict or class names in it)")
    return contents


def run_dir(checkpoint: Path) -> Path:
    """The training run's folder: `<run>/checkpoints/x.ckpt` belongs to `<run>`; any other checkpoint to its own
    folder."""
    parent = checkpoint.resolve().parent
    return parent.parent if parent.name == "checkpoints" else parent


def run_config(checkpoint: Path) -> Any:
    """The training run's composed Hydra configuration (`<run>/.hydra/config.yaml`), or None if there is none."""
    path = run_dir(checkpoint) / ".hydra" / "config.yaml"
    if not path.is_file():
        return None
    try:
        return OmegaConf.load(path)
    except (OSError, OmegaConfBaseException):
        return None


def image_size(requested: int | None, checkpoint: Path, preprocessing: Preprocessing) -> tuple[int, str]:
    """The crop size to feed the network, and where it comes from.

    An explicit `image_size=` wins. Otherwise `data.image_size` in the run's `.hydra/config.yaml`, where there is
    one; else the checkpoint's preprocessing, which train.py saves at the size the run trained at.

    Args:
        requested: the `image_size=` option, or None.
        checkpoint: the checkpoint file (its run folder may hold the run's configuration).
        preprocessing: the checkpoint's preprocessing.

    Raises:
        UsageError: a requested size below 1.
    """
    if requested is not None:
        if requested < 1:
            raise UsageError(f"image_size={requested} must be a positive number of pixels")
        return requested, "image_size="
    config = run_config(checkpoint)
    trained = (
        OmegaConf.select(config, "data.image_size", default=None, throw_on_resolution_failure=False)
        if config is not None
        else None
    )
    if isinstance(trained, int) and trained > 0:
        return trained, f"data.image_size of the run, {run_dir(checkpoint) / '.hydra' / 'config.yaml'}"
    return preprocessing.crop_size, "the checkpoint's preprocessing"


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Lightning's start-up lines (accelerators found, CUDA_VISIBLE_DEVICES, tips) and its hints about loader
    workers stay out of a command's output; its warnings and errors do not."""
    lightning_log = logging.getLogger("lightning.pytorch")
    level = lightning_log.level
    lightning_log.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            from lightning.pytorch.utilities.warnings import PossibleUserWarning

            warnings.simplefilter("ignore", PossibleUserWarning)
            yield
    finally:
        lightning_log.setLevel(level)


def trainer(device: torch.device, callbacks: Sequence = ()):
    """The Lightning Trainer predict and evaluate run a checkpoint with: one device, no logger, no checkpoints,
    no progress bar; it writes no file."""
    import lightning as L

    accelerator = "gpu" if device.type == "cuda" else "cpu"
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if accelerator == "gpu" else 1
    return L.Trainer(
        accelerator=accelerator,
        devices=devices,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
    )
