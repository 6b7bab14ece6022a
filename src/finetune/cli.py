"""What `python -m finetune.predict` and `python -m finetune.evaluate` share: key=value options over a dataclass,
one-line errors, and a trained checkpoint made ready for inference (device, image size).
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from finetune.backbones import Preprocessing
from finetune.errors import UsageError, close_matches, find_usage_error

DEVICES = ("auto", "cpu", "cuda")


@dataclass
class InferenceOptions:
    """The options of every command that runs a trained checkpoint over images.

    Attributes:
        checkpoint: a checkpoint written by train.py (`<run dir>/checkpoints/last.ckpt` or the best epoch's).
        batch_size: images per forward pass.
        device: "auto" (a CUDA GPU when there is one), "cpu", "cuda" or "cuda:N".
        image_size: crop size fed to the network; None: the size the run trained at, where it is recorded,
            else the checkpoint's (the pretrained weights') own.
        num_workers: image-decoding processes; None: one per CPU core but one, at most 8.
    """

    checkpoint: str = MISSING
    batch_size: int = 32
    device: str = "auto"
    image_size: int | None = None
    num_workers: int | None = None


def parse_options(schema: type, argv: Sequence[str], usage: str) -> Any:
    """Reads `key=value` arguments over the defaults of a dataclass (nested dataclasses give `data.root`-style keys).

    Args:
        schema: the dataclass; fields without a default (`MISSING`) are required.
        argv: the arguments, without the program name.
        usage: printed for `-h` / `--help`.

    Returns:
        An instance of `schema`.

    Raises:
        UsageError: an argument that is not key=value, an unknown key, a value of the wrong type, a required key
            left out. The message names the valid keys.
        SystemExit: after printing `usage`, for `-h` / `--help`.
    """
    if any(argument in ("-h", "--help") for argument in argv):
        print(usage)
        raise SystemExit(0)
    fields = _field_types(schema)
    keys = _describe_keys(schema, fields)
    for argument in argv:
        key, equals, _ = argument.partition("=")
        if not equals or not key:
            raise UsageError(f"{argument!r} is not key=value; valid keys: {keys}")
        if key not in fields:
            raise UsageError(f"unknown key {key!r}{close_matches(key, list(fields), n=1)}; valid keys: {keys}")
    try:
        config = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.from_dotlist(list(argv)))
        for argument in argv:
            key, _, value = argument.partition("=")
            # from_dotlist reads values as YAML: a file named 007 or yes would become 7 or True.
            if fields[key] in (str, str | None) and value != "null":
                OmegaConf.update(config, key, value, merge=False)
    except OmegaConfBaseException as error:
        message = str(error).splitlines()[0]
        raise UsageError(f"{getattr(error, 'full_key', None) or 'arguments'}: {message}; valid keys: {keys}") \
            from error
    missing = sorted(OmegaConf.missing_keys(config))
    if missing:
        raise UsageError(f"missing {', '.join(f'{key}=' for key in missing)}; valid keys: {keys}")
    return OmegaConf.to_object(config)


def _field_types(schema: type, prefix: str = "") -> dict[str, Any]:
    """Every key a dataclass accepts, flattened (`data.root`), with its type."""
    hints = typing.get_type_hints(schema)
    types = {}
    for field in dataclasses.fields(schema):
        kind = hints[field.name]
        if dataclasses.is_dataclass(kind):
            types |= _field_types(kind, f"{prefix}{field.name}.")
        else:
            types[prefix + field.name] = kind
    return types


def _describe_keys(schema: type, fields: dict[str, Any]) -> str:
    defaults = OmegaConf.structured(schema)
    required = [key for key in fields if OmegaConf.is_missing(defaults, key)]
    optional = [key for key in fields if key not in required]
    return f"{', '.join(required)} (required); {', '.join(optional)}" if required else ", ".join(optional)


def run_command(body: Callable[[list[str]], None], argv: Sequence[str] | None = None) -> int:
    """Runs a command's body; a problem the user can fix becomes one line on stderr and exit code 2.

    Returns:
        The exit code: 0, or 2 after a UsageError (other errors propagate with their traceback).
    """
    try:
        body(list(sys.argv[1:] if argv is None else argv))
    except Exception as error:
        usage_error = find_usage_error(error)
        if usage_error is None:
            raise
        print(f"error: {usage_error}", file=sys.stderr)
        return 2
    return 0


@dataclass
class LoadedModel:
    """A trained classifier, in eval mode on its device, with the preprocessing its images get.

    Attributes:
        model: the `finetune.module.ImageClassifier`.
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
        return (f"{self.checkpoint}: {self.model.hparams.name}, {len(self.class_names)} classes; image size "
                f"{self.preprocessing.crop_size} ({self.size_source}); device {self.device}")


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
    contents = read_checkpoint(path)
    # Imported here: `--help` and option errors answer without importing Lightning.
    from finetune.module import ImageClassifier

    try:
        model = ImageClassifier.from_checkpoint(str(path), map_location=device)
    except (RuntimeError, KeyError, TypeError, ValueError) as error:
        # A checkpoint of another version of the model (other arguments, other weight names): one line.
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UsageError(f"cannot load checkpoint {path} ({reason}); pass a .ckpt file written by train.py") \
            from error
    model.eval()
    size, source = image_size(options.image_size, path, contents, model.preprocessing)
    return LoadedModel(model, device, model.preprocessing.at_size(size), source, path)


def resolve_device(name: str) -> torch.device:
    """"auto" is a CUDA GPU when there is one, else the CPU.

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
    """The checkpoint file named by the user, checked to exist.

    Raises:
        UsageError: it does not exist, or it is a folder (the message lists the checkpoints inside it).
    """
    path = Path(text).expanduser()
    if path.is_dir():
        found = sorted(str(p) for p in path.rglob("*.ckpt"))[:5]
        listed = f"; found: {', '.join(found)}" if found else "; it holds no .ckpt file"
        raise UsageError(f"checkpoint={path} is a folder: pass a .ckpt file{listed}")
    if not path.is_file():
        raise UsageError(f"checkpoint {path} does not exist; pass checkpoint=<run dir>/checkpoints/last.ckpt")
    return path


def read_checkpoint(path: Path) -> dict:
    """The checkpoint's contents, memory-mapped (the weights are not read), checked to be train.py's.

    Raises:
        UsageError: torch cannot read the file, or it is no checkpoint of a `finetune` classifier.
    """
    try:
        contents = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # pickle, zip and torch errors alike: the file is not what it should be
        raise UsageError(f"{path} is not a checkpoint torch can read ({type(error).__name__}); "
                         "pass a .ckpt file written by train.py") from error
    if not isinstance(contents, dict) or "state_dict" not in contents \
            or "class_names" not in contents.get("hyper_parameters", {}):
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


def image_size(requested: int | None, checkpoint: Path, contents: dict,
               preprocessing: Preprocessing) -> tuple[int, str]:
    """The crop size to feed the network, and where it comes from.

    An explicit `image_size=` wins. Otherwise the size the run trained at: the checkpoint's own record if it has
    one (`image_size` in the checkpoint or its hyperparameters), else `data.image_size` in the run's
    `.hydra/config.yaml`; without either, the checkpoint's preprocessing (the pretrained weights' crop size).

    Args:
        requested: the `image_size=` option, or None.
        checkpoint: the checkpoint file (its run folder may hold the run's configuration).
        contents: what the checkpoint holds (`read_checkpoint`).
        preprocessing: the checkpoint's preprocessing.

    Raises:
        UsageError: a requested size below 1.
    """
    if requested is not None:
        if requested < 1:
            raise UsageError(f"image_size={requested} must be a positive number of pixels")
        return requested, "image_size="
    recorded = _recorded_image_size(contents)
    if recorded is not None:
        return recorded, "recorded in the checkpoint"
    config = run_config(checkpoint)
    trained = OmegaConf.select(config, "data.image_size", default=None, throw_on_resolution_failure=False) \
        if config is not None else None
    if isinstance(trained, int) and trained > 0:
        return trained, f"data.image_size of the run, {run_dir(checkpoint) / '.hydra' / 'config.yaml'}"
    return preprocessing.crop_size, "the checkpoint's preprocessing"


def _recorded_image_size(contents: dict) -> int | None:
    for value in (contents.get("image_size"), contents.get("hyper_parameters", {}).get("image_size")):
        if isinstance(value, int) and value > 0:
            return value
    return None
