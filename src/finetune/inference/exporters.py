"""Writing and running exported models: ONNX (torch.onnx's dynamo exporter, ONNX Runtime) and TorchScript
(`torch.jit.trace`, `torch.jit.load`), with the input normalisation baked in (`NormalizedClassifier`).
`finetune.export` drives them and checks the files they write against PyTorch.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from finetune.errors import UsageError
from finetune.model.preprocessing import Preprocessing

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
METADATA_KEY = "finetune"  # ONNX metadata_props key and TorchScript extra file name of the model description
# ONNX's protobuf limit is 2 GiB; above that the weights must go to an external data file.
ONNX_SINGLE_FILE_LIMIT = 1.8 * 2**30


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


def require_onnx_packages() -> None:
    missing = []
    for package in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(package)
        except ImportError:
            missing.append(package)
    if missing:
        raise UsageError(
            f"format=onnx needs {', '.join(missing)}: pip install 'finetune[export]' "
            "(or pip install onnx onnxscript onnxruntime)"
        )


def export_onnx(wrapper: nn.Module, example: torch.Tensor, output: Path, opset: int | None, description: dict) -> None:
    parameter_bytes = sum(p.numel() * p.element_size() for p in wrapper.parameters())
    external = parameter_bytes > ONNX_SINGLE_FILE_LIMIT
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's own deprecation and tracing chatter, not the user's concern
        program = torch.onnx.export(
            wrapper,
            (example,),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            dynamo=True,
            dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
            external_data=external,
            verbose=False,
        )
    # The exporter converts to a requested opset on a best-effort basis and keeps its own when that fails (below
    # 18, typically), with only a log line to say so: a model at another opset than asked for is an error here.
    written_opset = program.model.opset_imports.get("")
    if opset is not None and written_opset != opset:
        raise UsageError(
            f"opset={opset}: torch {torch.__version__} could not convert this model to opset {opset} "
            f"(it exported opset {written_opset}); choose opset={written_opset} or leave opset out"
        )
    # The description travels inside the model too, so a copied .onnx file still names its classes.
    program.model.metadata_props[METADATA_KEY] = json.dumps(description)
    program.save(output, external_data=external)


def run_onnx(path: Path, images: torch.Tensor) -> torch.Tensor:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})
    return torch.from_numpy(logits)


def export_torchscript(wrapper: nn.Module, example: torch.Tensor, output: Path, description: dict) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        # torch.jit.trace is deprecated in favour of torch.export, and TracerWarnings flag shapes turned into
        # constants; the parity check runs another batch size, so a constant batch size would show there. That
        # check, on the saved and reloaded file, also stands in for trace's own (check_trace) re-run.
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(wrapper, example, check_trace=False)
        torch.jit.save(traced, str(output), _extra_files={f"{METADATA_KEY}.json": json.dumps(description)})


def run_torchscript(path: Path, images: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
        loaded = torch.jit.load(str(path), map_location="cpu")
    loaded.eval()
    with torch.inference_mode():
        return loaded(images)


def describe(model, preprocessing: Preprocessing, format: str, source: str | None) -> dict:
    """The classes file written beside an exported model: class names, input, output, and the preprocessing the
    caller still does (resize and crop) next to what the model does itself (normalisation)."""
    size = preprocessing.crop_size
    class_names = list(model.class_names)
    return {
        "format": format,
        "model": model.hparams.name,
        "source": model.hparams.source,
        "checkpoint": source,
        "class_names": class_names,
        "input": {
            "name": INPUT_NAME,
            "shape": ["batch", 3, size, size],
            "dtype": "float32",
            "layout": "NCHW",
            "channels": "RGB",
            "range": [0.0, 1.0],
            "note": "normalisation (mean, std) is inside the model: feed pixel values / 255",
        },
        "output": {
            "name": OUTPUT_NAME,
            "shape": ["batch", len(class_names)],
            "dtype": "float32",
            "note": "logits in class_names order: softmax over the last axis gives probabilities",
        },
        "preprocessing": {
            **preprocessing.as_dict(),
            "normalization_included": True,
            "caller_does": (
                f"resize the shorter side to {preprocessing.resize_size} ({preprocessing.interpolation}, "
                f"antialiased), centre-crop {size}x{size}, convert RGB to float32 in [0, 1], NCHW"
            ),
        },
    }
