"""Export a trained checkpoint to ONNX or TorchScript, normalisation included, and check it against PyTorch.

    python -m finetune.export checkpoint=<run>/checkpoints/best.ckpt format=onnx output=model.onnx
    python -m finetune.export checkpoint=<run>/checkpoints/best.ckpt format=torchscript output=model.pt

The exported model takes a float32 RGB image batch in [0, 1], NCHW, at the training crop size (any batch size),
and returns logits (softmax gives probabilities). Resizing and centre-cropping stay the caller's job; the
`<output>.classes.json` written beside the model says how, and names the classes in output order. Before moving
them into place, the command runs the exported file (ONNX Runtime for ONNX, `torch.jit.load` for TorchScript) and
the checkpoint's PyTorch model on the same random batch, and writes nothing (exit 1) if their logits differ by
more than `atol`.
"""

from __future__ import annotations

import enum
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import MISSING

from finetune import apps
from finetune.errors import UsageError, first_line
from finetune.inference import exporters
from finetune.inference.checkpoint import InferenceOptions, load_model
from finetune.model.preprocessing import Preprocessing


class Format(enum.Enum):
    """What `format=` takes."""

    onnx = "onnx"
    torchscript = "torchscript"


FORMATS = tuple(member.name for member in Format)
EXPORT_BATCH = 2  # the example batch the exporters trace with
CHECK_BATCH = 3  # the parity check runs another batch size: a batch dimension baked in by tracing fails it
CHECK_SEED = 0


USAGE = """\
usage: python -m finetune.export checkpoint=<ckpt> format=onnx|torchscript output=<file> [key=value ...]

  checkpoint   a checkpoint written by train.py, e.g. <run dir>/checkpoints/best.ckpt
  format       onnx (checked with ONNX Runtime) or torchscript (torch.jit.trace, checked with torch.jit.load)
  output       the model file to write (its folder is created); <output>.classes.json is written beside it
  image_size   side of the square input (default: the size the run trained at, where recorded)
  opset        ONNX opset version (default: the exporter's own); format=onnx only
  atol         largest absolute difference of logits accepted against PyTorch (default 1e-4)
  overwrite    replace existing output files (default false)

The exported model takes float32 RGB images in [0, 1], NCHW, [batch, 3, image_size, image_size] (any batch size),
normalises them itself, and returns logits [batch, classes]; resizing and cropping are the caller's job."""


@dataclass
class ExportOptions:
    """The options of `python -m finetune.export` (see USAGE)."""

    checkpoint: str = MISSING
    format: Format = MISSING
    output: str = MISSING
    image_size: int | None = None
    opset: int | None = None
    atol: float = 1e-4
    overwrite: bool = False


class ExportError(Exception):
    """The exported model does not reproduce the PyTorch model within the tolerance (exit code 1)."""


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote and how closely it matches PyTorch.

    Attributes:
        format: "onnx" or "torchscript".
        output: the exported model file.
        classes_file: the JSON description beside it (class names, input, output, preprocessing).
        image_size: side of the square input the model takes.
        max_abs_difference: largest absolute difference between the exported model's and PyTorch's logits.
        max_abs_logit: largest absolute PyTorch logit on the check batch: the scale the difference is measured at.
        atol: the tolerance it was checked against.
        seconds: time taken by export and check.
    """

    format: str
    output: Path
    classes_file: Path
    image_size: int
    max_abs_difference: float
    max_abs_logit: float
    atol: float
    seconds: float

    def parity_line(self) -> str:
        runtime = "ONNX Runtime" if self.format == "onnx" else "TorchScript"
        return (
            f"max abs difference {self.max_abs_difference:.1e} <= {_tolerance(self.atol)}: OK "
            f"({runtime} vs PyTorch on {CHECK_BATCH} random images in [0, 1]; "
            f"logits up to {self.max_abs_logit:.1e})"
        )


def classes_file_for(output: str | Path) -> Path:
    """The JSON description written beside an exported model: `<output>.classes.json`."""
    output = Path(output)
    # The full file name, suffix included, so model.onnx and model.pt side by side each keep their own.
    return output.with_name(output.name + ".classes.json")


def export_model(
    model,
    format: str,
    output: str | Path,
    image_size: int | None = None,
    opset: int | None = None,
    atol: float = 1e-4,
    overwrite: bool = False,
    source: str | None = None,
) -> ExportResult:
    """Exports an `ImageClassifier` with its normalisation, writes the classes file, and checks parity.

    Args:
        model: a `finetune.model.module.ImageClassifier` (its `network`, `preprocessing` and `class_names` are used).
        format: "onnx" or "torchscript".
        output: the file to write.
        image_size: side of the square input; None: `model.preprocessing.crop_size`.
        opset: ONNX opset version; None: the exporter's default. ONNX only.
        atol: largest absolute difference of logits accepted between the exported model and PyTorch.
        overwrite: replace existing output files.
        source: where the model came from (recorded in the classes file).

    The model's network is put in eval mode, float32, on the CPU.

    Returns:
        What was written and the measured difference.

    Raises:
        UsageError: bad arguments, an existing output, a missing export package, an input size the model rejects.
        ExportError: the exported model's logits differ from PyTorch's by more than `atol` (nothing is written).
    """
    started = time.perf_counter()
    format, output = _check_arguments(format, output, opset, atol, overwrite)
    if image_size is not None and image_size < 1:
        raise UsageError(f"image_size={image_size} must be a positive number of pixels")
    preprocessing: Preprocessing = model.preprocessing.at_size(image_size)
    size = preprocessing.crop_size
    if format == "onnx":
        exporters.require_onnx_packages()

    # Eval mode and float32 on the CPU: dropout off, BatchNorm on its running statistics, as when predicting.
    network = model.network.to("cpu", torch.float32).eval()
    wrapper = exporters.NormalizedClassifier(network, preprocessing.mean, preprocessing.std).eval()
    description = exporters.describe(model, preprocessing, format, source)
    generator = torch.Generator().manual_seed(CHECK_SEED)
    example = torch.rand(EXPORT_BATCH, 3, size, size, generator=generator)
    check_images = torch.rand(CHECK_BATCH, 3, size, size, generator=generator)
    # The reference normalises by hand, independently of the wrapper, so a mistake there shows in the check.
    mean = torch.tensor(preprocessing.mean).view(1, 3, 1, 1)
    std = torch.tensor(preprocessing.std).view(1, 3, 1, 1)
    with torch.inference_mode():
        try:
            expected = network((check_images - mean) / std)
        except Exception as error:
            raise UsageError(
                f"{model.hparams.name} does not run on {size}x{size} images ({first_line(error)}); "
                "choose another image_size (e.g. the weights' own, "
                f"{model.preprocessing.crop_size})"
            ) from error

    output.parent.mkdir(parents=True, exist_ok=True)
    # Written into a scratch folder beside the output and moved into place only once the check passes: a failed
    # or mismatching export leaves no file behind, and never destroys the model an overwrite=true would replace.
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=".export-") as scratch:
        staged = Path(scratch) / output.name
        if format == "onnx":
            exporters.export_onnx(wrapper, example, staged, opset, description)
            actual = exporters.run_onnx(staged, check_images)
        else:
            exporters.export_torchscript(wrapper, example, staged, description)
            actual = exporters.run_torchscript(staged, check_images)
        difference = _max_abs_difference(expected, actual)
        largest = expected.abs().max().item()
        if not difference <= atol:  # also catches NaN
            raise ExportError(
                f"the exported {format} model does not match PyTorch: max abs difference "
                f"{difference:.1e} > atol {_tolerance(atol)} (logits of {CHECK_BATCH} random images "
                f"in [0, 1], largest PyTorch logit {largest:.1e}); nothing written; "
                "a larger atol=... accepts it"
            )
        classes_file_for(staged).write_text(json.dumps(description, indent=2) + "\n")
        # Everything the exporter wrote (an ONNX model over 2 GiB comes with its external data file).
        for path in Path(scratch).iterdir():
            os.replace(path, output.parent / path.name)
    return ExportResult(
        format, output, classes_file_for(output), size, difference, largest, atol, time.perf_counter() - started
    )


def _check_arguments(
    format: str, output: str | Path, opset: int | None, atol: float, overwrite: bool
) -> tuple[str, Path]:
    if format.lower() not in FORMATS:
        raise UsageError(f"unknown format {format!r}: choose format=onnx or format=torchscript")
    format = format.lower()
    if opset is not None and format != "onnx":
        raise UsageError(f"opset applies to format=onnx only, not format={format}; leave it out")
    if not atol >= 0:
        raise UsageError(f"atol={atol} must be a non-negative number, e.g. atol=1e-4")
    output = Path(output).expanduser()
    if output.is_dir():
        raise UsageError(
            f"output={output} is a folder; pass the file to write, e.g. output={output / 'model'}"
            f"{'.onnx' if format == 'onnx' else '.pt'}"
        )
    if not overwrite:
        existing = [str(path) for path in (output, classes_file_for(output)) if path.exists()]
        if existing:
            verb = "exists" if len(existing) == 1 else "exist"
            raise UsageError(
                f"{' and '.join(existing)} already {verb}; pass overwrite=true to replace, or choose another output=..."
            )
    return format, output


def _max_abs_difference(expected: torch.Tensor, actual: torch.Tensor) -> float:
    if tuple(actual.shape) != tuple(expected.shape):
        raise ExportError(f"the exported model returns shape {tuple(actual.shape)}, PyTorch {tuple(expected.shape)}")
    return (expected.float() - actual.float()).abs().max().item()


def _tolerance(atol: float) -> str:
    """1e-04 as 1e-04, but 1.5e-4 not rounded to 2e-04."""
    short = f"{atol:.0e}"
    return short if float(short) == atol else f"{atol:g}"


@apps.command("export", ExportOptions, USAGE)
def main(options: ExportOptions) -> None:
    """`python -m finetune.export key=value ...`: exports, checks, and prints what was written.

    `main(argv)` returns the exit code: 0, 1 when the export does not match PyTorch, 2 for a problem the user can
    fix.
    """
    try:
        _export(options)
    except ExportError as error:
        # Not the user's input but the exporter: still one line with the figures; exit code 1.
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None


def _export(options: ExportOptions) -> None:
    format = options.format.name
    # Before loading anything: a refusal to overwrite should not cost a model load.
    _check_arguments(format, options.output, options.opset, options.atol, options.overwrite)
    loaded = _load(options.checkpoint, options.image_size)
    print(loaded.describe(), flush=True)
    result = export_model(
        loaded.model,
        format,
        options.output,
        image_size=loaded.preprocessing.crop_size,
        opset=options.opset,
        atol=options.atol,
        overwrite=options.overwrite,
        source=str(loaded.checkpoint),
    )
    size = result.image_size
    print(
        f"wrote {result.output}: input {exporters.INPUT_NAME} float32 [batch, 3, {size}, {size}] in [0, 1] "
        f"(normalisation included), output {exporters.OUTPUT_NAME} [batch, {len(loaded.class_names)}]"
    )
    print(f"wrote {result.classes_file}: class names, input and output, the resize and crop to do before")
    print(f"parity: {result.parity_line()}; {result.seconds:.1f} s")


def _load(checkpoint: str | Path, image_size: int | None):
    # The CPU: the exported model is meant to run anywhere, and the check compares it with PyTorch on the CPU.
    return load_model(InferenceOptions(checkpoint=str(checkpoint), device="cpu", image_size=image_size))


if __name__ == "__main__":
    sys.exit(main())
