"""`python -m finetune.export`: ONNX and TorchScript files that normalise by themselves and match PyTorch."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from conftest import CLASSES, REPO, offline_env, run_cli, run_module_in_process

from finetune import export
from finetune.inference import exporters
from finetune.model.module import ImageClassifier

PARITY = re.compile(r"max abs difference (\S+) <= 1e-04: OK")
# torch.jit.load works, and is what a TorchScript user calls, but warns that TorchScript is deprecated.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, image_folder):
    """A mobilenet_v2 trained one epoch at 32x32 pixels by the real train.py (its run config records the size)."""
    tmp_path = tmp_path_factory.mktemp("export_run")
    run_cli(
        tmp_path,
        "model=mobilenet_v2",
        "model.weights=null",
        f"data.root={image_folder}",
        "data.image_size=32",
        "data.batch_size=16",
        "data.num_workers=0",
        "trainer.max_epochs=1",
    )
    return tmp_path / "run" / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def reference(checkpoint) -> ImageClassifier:
    """The checkpoint's PyTorch model, loaded once."""
    return ImageClassifier.from_checkpoint(str(checkpoint)).eval()


def reference_logits(model: ImageClassifier, images: torch.Tensor) -> torch.Tensor:
    """The checkpoint's own network on images in [0, 1], normalised here by hand."""
    mean = torch.tensor(model.preprocessing.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.preprocessing.std).view(1, 3, 1, 1)
    with torch.inference_mode():
        return model.network((images - mean) / std)


def random_images(batch: int, size: int = 32) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))


def assert_description(path, format: str, model: ImageClassifier) -> None:
    """The classes file names the classes in output order and says what the caller must do to an image."""
    description = json.loads(path.read_text())
    preprocessing = model.preprocessing.at_size(32)
    assert description["format"] == format
    assert description["class_names"] == list(CLASSES)
    assert description["input"]["shape"] == ["batch", 3, 32, 32]  # the size the run trained at
    assert description["input"]["range"] == [0.0, 1.0]
    assert description["output"]["shape"] == ["batch", 3]
    assert "logits" in description["output"]["note"]
    steps = description["preprocessing"]
    assert steps["crop_size"] == 32 and steps["resize_size"] == preprocessing.resize_size
    assert steps["mean"] == pytest.approx(list(preprocessing.mean))
    assert steps["std"] == pytest.approx(list(preprocessing.std))
    assert steps["normalization_included"] is True
    assert "centre-crop 32x32" in steps["caller_does"]


@pytest.mark.slow
def test_onnx_export_over_the_real_command_line_matches_pytorch(tmp_path, checkpoint, reference):
    import onnx
    import onnxruntime

    output = tmp_path / "out" / "model.onnx"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "finetune.export",
            f"checkpoint={checkpoint}",
            "format=onnx",
            f"output={output}",
            "opset=18",
        ],
        cwd=REPO,
        env=offline_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert float(PARITY.search(result.stdout).group(1)) <= 1e-4
    assert "image size 32 (data.image_size of the run" in result.stdout

    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    for batch in (1, 4):  # the batch dimension is dynamic
        images = random_images(batch)
        (logits,) = session.run(["logits"], {"images": images.numpy()})
        torch.testing.assert_close(torch.from_numpy(logits), reference_logits(reference, images), atol=1e-4, rtol=1e-4)
    assert_description(export.classes_file_for(output), "onnx", reference)
    stored = onnx.load(str(output), load_external_data=False)
    assert {entry.domain: entry.version for entry in stored.opset_import}[""] == 18
    metadata = {entry.key: entry.value for entry in stored.metadata_props}
    assert json.loads(metadata["finetune"])["class_names"] == list(CLASSES)


def test_torchscript_export_matches_pytorch(tmp_path, checkpoint, reference, capsys):
    output = tmp_path / "model.pt"
    assert export.main([f"checkpoint={checkpoint}", "format=torchscript", f"output={output}"]) == 0
    assert float(PARITY.search(capsys.readouterr().out).group(1)) <= 1e-4

    extra_files = {"finetune.json": ""}
    loaded = torch.jit.load(str(output), _extra_files=extra_files)
    images = random_images(5)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(images), reference_logits(reference, images), atol=1e-4, rtol=1e-4)
    assert_description(export.classes_file_for(output), "torchscript", reference)
    assert json.loads(extra_files["finetune.json"])["class_names"] == list(CLASSES)


def test_refuses_to_overwrite_without_overwrite_true(tmp_path, checkpoint, capsys):
    output = tmp_path / "model.pt"
    output.write_bytes(b"an older model")
    arguments = [f"checkpoint={checkpoint}", "format=torchscript", f"output={output}"]

    assert export.main(arguments) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "already exists; pass overwrite=true" in error
    assert output.read_bytes() == b"an older model"

    assert export.main([*arguments, "overwrite=true"]) == 0
    assert torch.jit.load(str(output)) is not None


def test_a_mismatch_fails_with_the_figures_and_writes_nothing(tmp_path, checkpoint, capsys, monkeypatch):
    run = exporters.run_torchscript
    # An exporter that gets the numbers slightly wrong, as a broken operator translation would.
    monkeypatch.setattr(exporters, "run_torchscript", lambda path, images: run(path, images) + 0.01)
    output = tmp_path / "model.pt"

    assert export.main([f"checkpoint={checkpoint}", "format=torchscript", f"output={output}"]) == 1
    error = capsys.readouterr().err
    assert "max abs difference 1.0e-02 > atol 1e-04" in error and "nothing written" in error
    assert error.count("\n") == 1
    assert list(tmp_path.iterdir()) == []  # no model, no classes file, no scratch folder


def test_unknown_format_is_one_line_and_exit_code_2(tmp_path, checkpoint):
    result = run_module_in_process(
        tmp_path, "finetune.export", f"checkpoint={checkpoint}", "format=tflite", f"output={tmp_path / 'model.tflite'}"
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "error: unknown format 'tflite': choose format=onnx or format=torchscript"
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("format", ["onnx", "torchscript"])
def test_exports_a_timm_model(tmp_path, format):
    torch.manual_seed(0)
    model = ImageClassifier("tf_efficientnet_lite0", ["a", "b"], source="timm", weights=None)
    result = export.export_model(model, format, tmp_path / f"lite0.{format}", image_size=64)
    assert result.image_size == 64 and result.max_abs_difference <= 1e-4
    description = json.loads(result.classes_file.read_text())
    assert description["model"] == "tf_efficientnet_lite0" and description["source"] == "timm"
    assert description["input"]["shape"] == ["batch", 3, 64, 64]


def test_an_unknown_key_is_one_line_naming_the_valid_keys(tmp_path):
    result = run_module_in_process(
        tmp_path, "finetune.export", "checkpoint=x.ckpt", "format=onnx", "output=m.onnx", "opsett=17"
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: unknown key 'opsett' (did you mean opset?); valid keys: checkpoint, "
        "format, output (required); image_size, opset, atol, overwrite"
    )
    assert list(tmp_path.iterdir()) == []
