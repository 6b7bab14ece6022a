"""Export a trained checkpoint to ONNX or TorchScript, normalisation included, and check it against PyTorch.

    python -m finetune.export checkpoint=<run>/checkpoints/last.ckpt format=onnx output=model.onnx
    python -m finetune.export checkpoint=<run>/checkpoints/last.ckpt format=torchscript output=model.pt

The exported model takes a float32 RGB image batch in [0, 1], NCHW, at the training crop size (any batch size),
and returns logits (softmax gives probabilities). Resizing and centre-cropping stay the caller's job; the
`<output>.classes.json` written beside the model says how, and names the classes in output order. Before moving
them into place, the command runs the exported file (ONNX Runtime for ONNX, `torch.jit.load` for TorchScript) and
the checkpoint's PyTorch model on the same random batch, and writes nothing (exit 1) if their logits differ by
more than `atol`.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import MISSING
from torch import nn

from finetune.backbones import Preprocessing
from finetune.cli import InferenceOptions, load_model, parse_options, run_command
from finetune.errors import UsageError

FORMATS = ("onnx", "torchscript")
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
METADATA_KEY = "finetune"  # ONNX metadata_props key and TorchScript extra file name of the model description
EXPORT_BATCH = 2  # the example batch the exporters trace with
CHECK_BATCH = 3  # the parity check runs another batch size: a batch dimension baked in by tracing fails it
CHECK_SEED = 0
# ONNX's protobuf limit is 2 GiB; above that the weights must go to an external data file.
ONNX_SINGLE_FILE_LIMIT = 1.8 * 2**30


USAGE = """\
usage: python -m finetune.export checkpoint=<ckpt> format=onnx|torchscript output=<file> [key=value ...]

  checkpoint   a checkpoint written by train.py, e.g. <run dir>/checkpoints/last.ckpt
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
    format: str = MISSING
    output: str = MISSING
    image_size: int | None = None
    opset: int | None = None
    atol: float = 1e-4
    overwrite: bool = False


class ExportError(Exception):
    """The exported model does not reproduce the PyTorch model within the tolerance (exit code 1)."""


class NormalizedClassifier(nn.Module):
    """The trained network with its input normalisation in front: images in [0, 1] in, logits out.

    Baking the normalisation in means a deployment only has to resize, crop and scale pixels to [0, 1];
    the mean and std cannot be forgotten or mixed up.

    Args:
        network: the classifier network (its forward takes normalised images).
        mean: per-channel mean of the normalisation (RGB).
        std: per-channel standard deviation of the normalisation (RGB).
    """

    def __init__(self, network: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.network = network
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network((images - self.mean) / self.std)


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
        return (f"max abs difference {self.max_abs_difference:.1e} <= {_tolerance(self.atol)}: OK "
                f"({runtime} vs PyTorch on {CHECK_BATCH} random images in [0, 1]; "
                f"logits up to {self.max_abs_logit:.1e})")


def classes_file_for(output: str | Path) -> Path:
    """The JSON description written beside an exported model: `<output>.classes.json`."""
    output = Path(output)
    # The full file name, suffix included, so model.onnx and model.pt side by side each keep their own.
    return output.with_name(output.name + ".classes.json")


def export_checkpoint(checkpoint: str | Path, format: str, output: str | Path, image_size: int | None = None,
                      opset: int | None = None, atol: float = 1e-4, overwrite: bool = False) -> ExportResult:
    """Loads a checkpoint written by train.py and exports it (see `export_model`).

    Args:
        checkpoint: a `.ckpt` file written by train.py.
        format: "onnx" or "torchscript".
        output: the file to write.
        image_size: side of the square input; None: the size the checkpoint was trained at.
        opset: ONNX opset version; None: the exporter's default. ONNX only.
        atol: largest absolute difference of logits accepted between the exported model and PyTorch.
        overwrite: replace existing output files.

    Returns:
        What was written and the measured difference.

    Raises:
        UsageError: bad arguments, an unreadable checkpoint, an existing output, a missing export package.
        ExportError: the exported model's logits differ from PyTorch's by more than `atol` (nothing is written).
    """
    format, output = _check_arguments(format, output, opset, atol, overwrite)
    loaded = _load(checkpoint, image_size)
    return export_model(loaded.model, format, output, image_size=loaded.preprocessing.crop_size, opset=opset,
                        atol=atol, overwrite=overwrite, source=str(loaded.checkpoint))


def export_model(model, format: str, output: str | Path, image_size: int | None = None, opset: int | None = None,
                 atol: float = 1e-4, overwrite: bool = False, source: str | None = None) -> ExportResult:
    """Exports an `ImageClassifier` with its normalisation, writes the classes file, and checks parity.

    Args:
        model: a `finetune.module.ImageClassifier` (its `network`, `preprocessing` and `class_names` are used).
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
        _require_onnx_packages()

    # Eval mode and float32 on the CPU: dropout off, BatchNorm on its running statistics, as when predicting.
    network = model.network.to("cpu", torch.float32).eval()
    wrapper = NormalizedClassifier(network, preprocessing.mean, preprocessing.std).eval()
    description = _description(model, preprocessing, format, output, source)
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
            raise UsageError(f"{model.hparams.name} does not run on {size}x{size} images ({_first_line(error)}); "
                             "choose another image_size (e.g. the weights' own, "
                             f"{model.preprocessing.crop_size})") from error

    output.parent.mkdir(parents=True, exist_ok=True)
    # Written into a scratch folder beside the output and moved into place only once the check passes: a failed
    # or mismatching export leaves no file behind, and never destroys the model an overwrite=true would replace.
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=".export-") as scratch:
        staged = Path(scratch) / output.name
        if format == "onnx":
            _export_onnx(wrapper, example, staged, opset, description)
            actual = _run_onnx(staged, check_images)
        else:
            _export_torchscript(wrapper, example, staged, description)
            actual = _run_torchscript(staged, check_images)
        difference = _max_abs_difference(expected, actual)
        largest = expected.abs().max().item()
        if not difference <= atol:  # also catches NaN
            raise ExportError(f"the exported {format} model does not match PyTorch: max abs difference "
                              f"{difference:.1e} > atol {_tolerance(atol)} (logits of {CHECK_BATCH} random images "
                              f"in [0, 1], largest PyTorch logit {largest:.1e}); nothing written; "
                              "a larger atol=... accepts it")
        classes_file_for(staged).write_text(json.dumps(description, indent=2) + "\n")
        # Everything the exporter wrote (an ONNX model over 2 GiB comes with its external data file).
        for path in Path(scratch).iterdir():
            os.replace(path, output.parent / path.name)
    return ExportResult(format, output, classes_file_for(output), size, difference, largest, atol,
                        time.perf_counter() - started)


def _check_arguments(format: str, output: str | Path, opset: int | None, atol: float,
                     overwrite: bool) -> tuple[str, Path]:
    if format.lower() not in FORMATS:
        raise UsageError(f"unknown format {format!r}: choose format=onnx or format=torchscript")
    format = format.lower()
    if opset is not None and format != "onnx":
        raise UsageError(f"opset applies to format=onnx only, not format={format}; leave it out")
    if not atol >= 0:
        raise UsageError(f"atol={atol} must be a non-negative number, e.g. atol=1e-4")
    output = Path(output).expanduser()
    if output.is_dir():
        raise UsageError(f"output={output} is a folder; pass the file to write, e.g. output={output / 'model'}"
                         f"{'.onnx' if format == 'onnx' else '.pt'}")
    if not overwrite:
        existing = [str(path) for path in (output, classes_file_for(output)) if path.exists()]
        if existing:
            verb = "exists" if len(existing) == 1 else "exist"
            raise UsageError(f"{' and '.join(existing)} already {verb}; pass overwrite=true to replace, "
                             "or choose another output=...")
    return format, output


def _require_onnx_packages() -> None:
    missing = []
    for package in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(package)
        except ImportError:
            missing.append(package)
    if missing:
        raise UsageError(f"format=onnx needs {', '.join(missing)}: pip install 'finetune[export]' "
                         "(or pip install onnx onnxscript onnxruntime)")


def _description(model, preprocessing: Preprocessing, format: str, output: Path, source: str | None) -> dict:
    size = preprocessing.crop_size
    class_names = list(model.class_names)
    return {
        "format": format,
        "model": model.hparams.name,
        "source": model.hparams.source,
        "checkpoint": source,
        "class_names": class_names,
        "input": {
            "name": INPUT_NAME, "shape": ["batch", 3, size, size], "dtype": "float32", "layout": "NCHW",
            "channels": "RGB", "range": [0.0, 1.0],
            "note": "normalisation (mean, std) is inside the model: feed pixel values / 255",
        },
        "output": {
            "name": OUTPUT_NAME, "shape": ["batch", len(class_names)], "dtype": "float32",
            "note": "logits in class_names order: softmax over the last axis gives probabilities",
        },
        "preprocessing": {
            **preprocessing.as_dict(),
            "normalization_included": True,
            "caller_does": (f"resize the shorter side to {preprocessing.resize_size} ({preprocessing.interpolation}, "
                            f"antialiased), centre-crop {size}x{size}, convert RGB to float32 in [0, 1], NCHW"),
        },
    }


def _export_onnx(wrapper: nn.Module, example: torch.Tensor, output: Path, opset: int | None,
                 description: dict) -> None:
    parameter_bytes = sum(p.numel() * p.element_size() for p in wrapper.parameters())
    external = parameter_bytes > ONNX_SINGLE_FILE_LIMIT
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's own deprecation and tracing chatter, not the user's concern
        program = torch.onnx.export(
            wrapper, (example,), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=opset,
            dynamo=True, dynamic_shapes={"images": {0: torch.export.Dim("batch")}}, external_data=external,
            verbose=False,
        )
    # The exporter converts to a requested opset on a best-effort basis and keeps its own when that fails (below
    # 18, typically), with only a log line to say so: a model at another opset than asked for is an error here.
    written_opset = program.model.opset_imports.get("")
    if opset is not None and written_opset != opset:
        raise UsageError(f"opset={opset}: torch {torch.__version__} could not convert this model to opset {opset} "
                         f"(it exported opset {written_opset}); choose opset={written_opset} or leave opset out")
    # The description travels inside the model too, so a copied .onnx file still names its classes.
    program.model.metadata_props[METADATA_KEY] = json.dumps(description)
    program.save(output, external_data=external)


def _run_onnx(path: Path, images: torch.Tensor) -> torch.Tensor:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})
    return torch.from_numpy(logits)


def _export_torchscript(wrapper: nn.Module, example: torch.Tensor, output: Path, description: dict) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        # torch.jit.trace is deprecated in favour of torch.export, and TracerWarnings flag shapes turned into
        # constants; the parity check runs another batch size, so a constant batch size would show there. That
        # check, on the saved and reloaded file, also stands in for trace's own (check_trace) re-run.
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(wrapper, example, check_trace=False)
        torch.jit.save(traced, str(output), _extra_files={f"{METADATA_KEY}.json": json.dumps(description)})


def _run_torchscript(path: Path, images: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
        loaded = torch.jit.load(str(path), map_location="cpu")
    loaded.eval()
    with torch.inference_mode():
        return loaded(images)


def _max_abs_difference(expected: torch.Tensor, actual: torch.Tensor) -> float:
    if tuple(actual.shape) != tuple(expected.shape):
        raise ExportError(f"the exported model returns shape {tuple(actual.shape)}, PyTorch {tuple(expected.shape)}")
    return (expected.float() - actual.float()).abs().max().item()


def _tolerance(atol: float) -> str:
    """1e-04 as 1e-04, but 1.5e-4 not rounded to 2e-04."""
    short = f"{atol:.0e}"
    return short if float(short) == atol else f"{atol:g}"


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m finetune.export key=value ...`: exports, checks, and prints what was written.

    Returns:
        The exit code: 0, 1 when the export does not match PyTorch, 2 for a problem the user can fix.
    """
    try:
        return run_command(_export, argv)
    except ExportError as error:
        # Not the user's input but the exporter: still one line with the figures; exit code 1.
        print(f"error: {error}", file=sys.stderr)
        return 1


def _export(argv: list[str]) -> None:
    options: ExportOptions = parse_options(ExportOptions, argv, USAGE)
    # Before loading anything: a refusal to overwrite should not cost a model load.
    options.format, _ = _check_arguments(options.format, options.output, options.opset, options.atol,
                                         options.overwrite)
    loaded = _load(options.checkpoint, options.image_size)
    print(loaded.describe(), flush=True)
    result = export_model(loaded.model, options.format, options.output, image_size=loaded.preprocessing.crop_size,
                          opset=options.opset, atol=options.atol, overwrite=options.overwrite,
                          source=str(loaded.checkpoint))
    size = result.image_size
    print(f"wrote {result.output}: input {INPUT_NAME} float32 [batch, 3, {size}, {size}] in [0, 1] (normalisation "
          f"included), output {OUTPUT_NAME} [batch, {len(loaded.class_names)}]")
    print(f"wrote {result.classes_file}: class names, input and output, the resize and crop to do before")
    print(f"parity: {result.parity_line()}; {result.seconds:.1f} s")


def _load(checkpoint: str | Path, image_size: int | None):
    # The CPU: the exported model is meant to run anywhere, and the check compares it with PyTorch on the CPU.
    return load_model(InferenceOptions(checkpoint=str(checkpoint), device="cpu", image_size=image_size))


if __name__ == "__main__":
    sys.exit(main())
